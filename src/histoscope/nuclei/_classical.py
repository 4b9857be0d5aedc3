"""The classical nucleus detector: no weights, only colour, shape and size.

Haematoxylin from colour deconvolution (Ruifrok & Johnston's H&E vectors,
:data:`histoscope.stains.HE`), Gaussian smoothing, the local background
subtracted (white top-hat), a threshold, pixels darker than a fraction of
their neighbourhood's peak dropped, small holes filled, touching nuclei
split by a watershed on the distance transform (weighted by the haematoxylin
contrast) seeded at its h-maxima, each nucleus trimmed to half its mean
contrast, then size, solidity and colour filters. Measurements follow
QuPath's cell detection: area (the nucleus's pixel count times ``mpp²``, not
the area inside its outline), perimeter (the length of the smoothed outline),
circularity ``4π·area/perimeter²`` of those two (capped at 1), eccentricity of
the pixels' moment ellipse, and mean and standard deviation of haematoxylin
and eosin optical density over the nucleus's pixels. The centroid is the mean
of the pixel centres; the outline is the marching-squares contour of the mask
(midway between inside and outside pixel centres), smoothed, so the polygon
encloses a little less than the pixel count (about 1 % at 300 px, 5 % at
80 px). Coordinates put the centre of pixel
``(row i, column j)`` at ``(x=j, y=i)`` (see :class:`Nuclei`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from histoscope.nuclei._morph import h_maxima
from histoscope.nuclei._params import NucleiParams
from histoscope.nuclei._table import COLUMNS, Nuclei
from histoscope.stains import HE, deconvolve


def stain_channels(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Haematoxylin and eosin optical density ``(H, W)`` float32 of an RGB image."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {rgb.dtype} {rgb.shape}")
    conc = deconvolve(rgb[..., :3], HE)
    return np.ascontiguousarray(conc[..., 0]), np.ascontiguousarray(conc[..., 1])


def segment(hema: np.ndarray, mpp: float, params: NucleiParams) -> np.ndarray:
    """Label image ``(H, W)`` int32 of nucleus candidates (before the filters).

    Parameters
    ----------
    hema
        Haematoxylin optical density.
    mpp
        µm per pixel of ``hema``.
    params
        ``threshold``, ``sigma_um``, ``background_um``, ``local_fraction``,
        ``local_radius_um``, ``split_um`` and ``max_area_um2``.
    """
    from scipy import ndimage as ndi
    from skimage import filters, morphology, segmentation

    sigma = params.sigma_um / mpp
    smooth = ndi.gaussian_filter(hema, sigma) if sigma > 0 else hema
    size = int(round(2 * params.background_um / mpp)) | 1
    if size > 1:  # white top-hat: subtract the local background (cytoplasm, stroma)
        smooth = smooth - ndi.grey_opening(smooth, size=(size, size))
    thr = params.threshold
    if thr <= 0:  # Otsu over the stained pixels (glass would pull it down)
        stained = smooth[smooth > 0.05]
        # a tile of glass (no stained pixel) or of one flat value has no nuclei to find
        if stained.size < 2 or np.ptp(stained) <= 0:
            return np.zeros(hema.shape, np.int32)
        thr = float(filters.threshold_otsu(stained))
    fg = smooth > thr
    radius = int(round(params.local_radius_um / mpp))
    if params.local_fraction > 0 and radius > 0:  # nuclei fused by haematoxylin-rich cytoplasm
        fg &= smooth >= params.local_fraction * ndi.maximum_filter(smooth, size=2 * radius + 1)
    fg = morphology.remove_small_holes(fg, max_size=int(params.max_area_um2 / mpp**2))
    if not fg.any():
        return np.zeros(hema.shape, np.int32)
    dist = ndi.distance_transform_edt(fg).astype(np.float32)
    # weighted by the haematoxylin contrast (smoothed at 1 µm), so a dark nucleus in a
    # paler halo of cytoplasm rises above its neighbours even when the mask fuses them
    contrast = ndi.gaussian_filter(smooth, 1.0 / mpp)
    dist *= np.clip(contrast / thr, 0.0, None)
    dist = ndi.gaussian_filter(dist, 1.0)
    h = params.split_um / mpp
    peaks = h_maxima(dist, h) if h > 0 else morphology.local_maxima(dist)
    markers = ndi.label(peaks & fg)[0]
    labels = segmentation.watershed(-dist, markers, mask=fg).astype(np.int32)
    return _trim(labels, smooth)


def _trim(labels: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Each nucleus cut back to half its mean contrast, holes filled.

    Undoes the spread of the smoothing and of a low threshold, so areas are those
    of the nucleus, not of its blurred edge.
    """
    from scipy import ndimage as ndi

    n = int(labels.max())
    if n == 0:
        return labels
    flat = labels.ravel()
    count = np.maximum(np.bincount(flat, minlength=n + 1), 1)
    mean = np.bincount(flat, value.ravel(), minlength=n + 1) / count
    kept = (labels > 0) & (value >= 0.5 * mean[labels])
    # holes filled as ndi.binary_fill_holes fills them (background not 4-connected to the
    # image border), by one labelling instead of a dilation repeated until it settles
    gaps, m = ndi.label(~kept)
    hole = np.ones(m + 1, bool)
    hole[0] = False
    hole[np.concatenate([gaps[0], gaps[-1], gaps[:, 0], gaps[:, -1]])] = False
    return np.where(kept | hole[gaps], labels, 0).astype(np.int32)


def _rings(labels: np.ndarray, ids: np.ndarray, slices) -> list[np.ndarray]:
    """Marching-squares outline ``(k, 2)`` [row, col] of each object, in its padded bounding box.

    The longest contour of ``find_contours(pad(labels[sl] == i), 0.5)``, without
    its closing vertex, as scikit-image assembles it: a single contour starts
    at the end of the last segment the scan meets and follows the segments (the
    assembly closes a contour with the last of its segments). Objects with more
    than one contour (holes, pieces touching at a corner) go through
    ``find_contours`` itself.
    """
    from skimage import measure

    try:  # find_contours' own segments (private: fall back to find_contours if it moves)
        from skimage.measure._find_contours_cy import _get_contour_segments
    except ImportError:  # pragma: no cover - depends on the installed scikit-image
        _get_contour_segments = None
    out = []
    for i in ids:
        sl = slices[i]
        img = np.zeros((sl[0].stop - sl[0].start + 2, sl[1].stop - sl[1].start + 2))
        img[1:-1, 1:-1] = labels[sl] == i + 1
        ring = []
        if _get_contour_segments is not None:
            segs = _get_contour_segments(img, 0.5, False, None)
            step = dict(segs)
            first = segs[-1][1]
            ring.append(first)
            p = step[first]
            while p != first and len(ring) <= len(segs):
                ring.append(p)
                p = step.get(p, first)
            if len(ring) != len(segs) or len(step) != len(segs):  # not one closed contour
                ring = []
        if not ring:
            ring = max(measure.find_contours(img, 0.5), key=len)[:-1]
        out.append(np.asarray(ring, np.float64))
    return out


def _outlines(rings: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Smoothed outlines of all rings at once: vertices ``(m, 2)`` float32 [x, y], owner, start.

    Each ring is smoothed three times by the mean of each vertex and its two
    neighbours (the marching-squares staircase adds ~9 % to perimeters), then,
    past 24 vertices (about one per boundary pixel), every second vertex is kept.
    Coordinates are those of the padded box, less the padding.
    """
    size = np.array([len(r) for r in rings], np.int64)
    start = np.concatenate([[0], np.cumsum(size)[:-1]])
    owner = np.repeat(np.arange(len(rings)), size)
    k = np.arange(owner.size) - start[owner]  # position in its ring
    n = size[owner]
    before = start[owner] + (k - 1) % n
    after = start[owner] + (k + 1) % n
    xy = np.concatenate(rings) if rings else np.zeros((0, 2))
    for _ in range(3):
        xy = (xy[before] + xy + xy[after]) / 3
    keep = (n <= 24) | (k % 2 == 0)
    xy, owner = xy[keep], owner[keep]
    size = np.bincount(owner, minlength=len(rings))
    start = np.concatenate([[0], np.cumsum(size)[:-1]])
    return (xy[:, ::-1] - 1.0).astype(np.float32), owner, start


def _ring_measures(xy: np.ndarray, owner: np.ndarray, start: np.ndarray, n: int):
    """Perimeter (px) and solidity (area over convex-hull area, as QuPath's) of each outline."""
    import shapely

    size = np.bincount(owner, minlength=n)
    k = np.arange(len(owner)) - start[owner]
    after = start[owner] + (k + 1) % np.maximum(size[owner], 1)
    d = xy[after] - xy
    perim = np.bincount(owner, np.hypot(d[:, 0], d[:, 1]).astype(np.float64), minlength=n)
    x, y = xy[:, 0].astype(np.float64), xy[:, 1].astype(np.float64)
    cross = x * y[after] - x[after] * y
    area = 0.5 * np.abs(np.bincount(owner, cross, minlength=n))
    hull = shapely.area(shapely.convex_hull(shapely.multipoints(xy.astype(np.float64),
                                                                indices=owner)))  # fmt: skip
    solidity = np.divide(area, hull, out=np.zeros(n), where=hull > 0)
    return perim, solidity


def _moments(labels: np.ndarray, n: int, count: np.ndarray, corner: np.ndarray):
    """Centroid ``(row, col)`` in each object's box and eccentricity of its moment ellipse.

    The centroid is the mean of the pixel centres; the second central moments add
    1/12 (a pixel is a unit square, not a point).
    """
    flat = labels.ravel()
    at = np.flatnonzero(flat)
    lab = flat[at]
    rr = at // labels.shape[1] - corner[lab - 1, 0]
    cc = at % labels.shape[1] - corner[lab - 1, 1]
    c = np.maximum(count, 1)
    cy = np.bincount(lab, rr.astype(np.float64), minlength=n + 1)[1:] / c
    cx = np.bincount(lab, cc.astype(np.float64), minlength=n + 1)[1:] / c
    dy, dx = rr - cy[lab - 1], cc - cx[lab - 1]
    myy = np.bincount(lab, dy * dy, minlength=n + 1)[1:] / c + 1 / 12
    mxx = np.bincount(lab, dx * dx, minlength=n + 1)[1:] / c + 1 / 12
    mxy = np.bincount(lab, dx * dy, minlength=n + 1)[1:] / c
    tr, det = myy + mxx, myy * mxx - mxy * mxy
    disc = np.sqrt(np.maximum(tr * tr / 4 - det, 0.0))
    l1, l2 = tr / 2 + disc, np.maximum(tr / 2 - disc, 0.0)
    ecc = np.sqrt(1 - np.divide(l2, l1, out=np.ones(n), where=l1 > 0))
    ecc[count < 3] = 0.0
    return cy, cx, ecc


def measure(
    labels: np.ndarray, hema: np.ndarray, eosin: np.ndarray, mpp: float, params: NucleiParams
) -> Nuclei:
    """Measure the labelled objects and keep those passing the size, shape and colour filters.

    Parameters
    ----------
    labels
        ``(H, W)`` int labels (0 background).
    hema, eosin
        Optical densities of the same image.
    mpp
        µm per pixel of the image; coordinates stay in its pixels.
    params
        ``min_area_um2``, ``max_area_um2``, ``min_solidity`` and ``max_eosin_ratio``.
    """
    from scipy import ndimage as ndi

    n = int(labels.max())
    if n == 0:
        return Nuclei.empty(mpp)
    flat = labels.ravel()
    count = np.bincount(flat, minlength=n + 1)[1:].astype(np.float64)
    area = count * mpp**2
    ok = (count > 0) & (area >= params.min_area_um2) & (area <= params.max_area_um2)

    def stats(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = np.bincount(flat, v.ravel(), minlength=n + 1)[1:]
        s2 = np.bincount(flat, np.square(v.ravel(), dtype=np.float64), minlength=n + 1)[1:]
        mean = s / np.maximum(count, 1)
        return mean, np.sqrt(np.maximum(s2 / np.maximum(count, 1) - mean**2, 0.0))

    h_mean, h_std = stats(hema)
    e_mean, e_std = stats(eosin)
    ok &= e_mean <= params.max_eosin_ratio * h_mean
    ids = np.flatnonzero(ok)
    if not len(ids):
        return Nuclei.empty(mpp)
    slices = ndi.find_objects(labels)
    corner = np.array([(s[0].start, s[1].start) if s else (0, 0) for s in slices], np.int64)
    xy, owner, start = _outlines(_rings(labels, ids, slices))
    perim_px, solidity = _ring_measures(xy, owner, start, len(ids))
    size = np.bincount(owner, minlength=len(ids))
    good = (size >= 3) & (solidity >= params.min_solidity)
    if not good.any():
        return Nuclei.empty(mpp)
    cy, cx, ecc = _moments(labels, n, count, corner)
    xy += corner[ids[owner]][:, ::-1].astype(np.float32)  # into the image's pixels
    outlines = [o for o, g in zip(np.split(xy, start[1:]), good, strict=True) if g]
    keep = ids[good]
    perim = perim_px[good] * mpp
    circ = np.minimum(1.0, np.divide(4 * np.pi * area[keep], perim**2, out=np.zeros(len(keep)),
                                     where=perim > 0))  # fmt: skip
    meas = pd.DataFrame(np.stack([area[keep], perim, circ, ecc[keep], h_mean[keep], h_std[keep],
                                  e_mean[keep], e_std[keep]], axis=1), columns=list(COLUMNS))  # fmt: skip
    return Nuclei(x=cx[keep] + corner[keep, 1], y=cy[keep] + corner[keep, 0], outlines=outlines,
                  measurements=meas, mpp=mpp)  # fmt: skip


def detect_classical(rgb: np.ndarray, mpp: float, params: NucleiParams) -> Nuclei:
    """Nuclei of one H&E image by the classical detector (coordinates in its pixels)."""
    hema, eosin = stain_channels(rgb)
    labels = segment(hema, mpp, params)
    return measure(labels, hema, eosin, mpp, params)
