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
    peaks = morphology.h_maxima(dist, h) if h > 0 else morphology.local_maxima(dist)
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
    return np.where(ndi.binary_fill_holes(kept), labels, 0).astype(np.int32)


def _outline(sub: np.ndarray) -> np.ndarray:
    """The outline ``(k, 2)`` [x, y] of one object's bounding-box mask, pixel centres at integers."""
    from skimage import measure

    contours = measure.find_contours(np.pad(sub, 1).astype(np.float32), 0.5)
    ring = max(contours, key=len)[:-1]
    for _ in range(3):  # smooth the marching-squares staircase (it adds ~9 % to perimeters)
        ring = (np.roll(ring, 1, axis=0) + ring + np.roll(ring, -1, axis=0)) / 3
    if len(ring) > 24:  # about one vertex per boundary pixel: every second is plenty
        ring = ring[::2]
    return (ring[:, ::-1] - 1.0).astype(np.float32)


def _solidity(ring: np.ndarray) -> float:
    """Polygon area over its convex hull's area (as QuPath's ROI solidity)."""
    from scipy.spatial import ConvexHull, QhullError

    x, y = ring[:, 0].astype(np.float64), ring[:, 1].astype(np.float64)
    area = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))
    try:
        hull = ConvexHull(ring).volume  # in 2-D, the area
    except QhullError:  # degenerate (a line)
        return 0.0
    return float(area / hull) if hull > 0 else 0.0


def _perimeter(ring: np.ndarray) -> float:
    return float(np.hypot(*(np.roll(ring, -1, axis=0) - ring).T).sum())


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
    slices = ndi.find_objects(labels)
    rows: list[tuple] = []
    outlines: list[np.ndarray] = []
    for i in np.flatnonzero(ok):
        sl = slices[i]
        sub = labels[sl] == i + 1
        ring = _outline(sub)
        if len(ring) < 3:
            continue
        if _solidity(ring) < params.min_solidity:
            continue
        ecc, cy, cx = _shape(sub)
        perim = _perimeter(ring) * mpp
        ring[:, 0] += sl[1].start
        ring[:, 1] += sl[0].start
        outlines.append(ring)
        circ = min(1.0, 4 * np.pi * area[i] / perim**2) if perim > 0 else 0.0
        rows.append((cx + sl[1].start, cy + sl[0].start, area[i], perim, circ, ecc,
                     h_mean[i], h_std[i], e_mean[i], e_std[i]))  # fmt: skip
    if not rows:
        return Nuclei.empty(mpp)
    table = np.asarray(rows, np.float64)
    meas = pd.DataFrame(table[:, 2:], columns=list(COLUMNS))
    return Nuclei(x=table[:, 0], y=table[:, 1], outlines=outlines, measurements=meas, mpp=mpp)


def _shape(sub: np.ndarray) -> tuple[float, float, float]:
    """Eccentricity of the moment ellipse and centroid ``(row, col)`` of one object's mask."""
    rr, cc = np.nonzero(sub)
    cy, cx = rr.mean(), cc.mean()
    if len(rr) < 3:
        return 0.0, float(cy), float(cx)
    dy, dx = rr - cy, cc - cx
    # second central moments (+1/12: a pixel is a unit square, not a point)
    myy, mxx, mxy = (dy * dy).mean() + 1 / 12, (dx * dx).mean() + 1 / 12, (dx * dy).mean()
    tr, det = myy + mxx, myy * mxx - mxy * mxy
    disc = np.sqrt(max(tr * tr / 4 - det, 0.0))
    l1, l2 = tr / 2 + disc, max(tr / 2 - disc, 0.0)
    ecc = float(np.sqrt(1 - l2 / l1)) if l1 > 0 else 0.0
    return ecc, float(cy), float(cx)


def detect_classical(rgb: np.ndarray, mpp: float, params: NucleiParams) -> Nuclei:
    """Nuclei of one H&E image by the classical detector (coordinates in its pixels)."""
    hema, eosin = stain_channels(rgb)
    labels = segment(hema, mpp, params)
    return measure(labels, hema, eosin, mpp, params)
