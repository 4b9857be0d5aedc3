"""The classical nucleus detector: detection, tiles, measurements, cancel, errors."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from histoscope.nuclei import (
    COLUMNS,
    MissingBackendError,
    Nuclei,
    NucleiParams,
    detect_nuclei,
    detect_slide,
    detector,
    iter_detect,
)
from histoscope.params import ParamError
from histoscope.stains import HE, reconvolve

MPP = 0.5


class ArraySlide:
    """A level-0-only slide over an RGB array (white outside); records the reads."""

    def __init__(self, rgb: np.ndarray, mpp: float = MPP):
        self.rgb, self.mpp, self.path = rgb, mpp, Path("array.tif")
        self.dimensions = (rgb.shape[1], rgb.shape[0])
        self.reads: list[tuple[int, int, int, int]] = []

    def read_region(self, x, y, w, h, mpp=None):
        assert mpp is None or abs(mpp - self.mpp) < 1e-9
        self.reads.append((x, y, w, h))
        out = np.full((h, w, 3), 255, np.uint8)
        H, W = self.rgb.shape[:2]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self.rgb[y0:y1, x0:x1]
        return out


def he_image(shape, nuclei, hema=0.8, eosin=0.25):
    """Pink stroma with dark ellipses ``(x, y, a, b, theta)`` of haematoxylin (OD ``hema``)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    conc = np.zeros((*shape, 3), np.float32)
    conc[..., 1] = eosin
    for x, y, a, b, t in nuclei:
        u = (xx - x) * np.cos(t) + (yy - y) * np.sin(t)
        v = -(xx - x) * np.sin(t) + (yy - y) * np.cos(t)
        conc[..., 0][(u / a) ** 2 + (v / b) ** 2 <= 1] = hema
    return reconvolve(conc, HE)


# ------------------------------------------------------------------ detection
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A small synthetic H&E slide and its true cell centroids (level-0 px)."""
    from histoscope.synthetic import generate

    s = generate(tmp_path_factory.mktemp("nuc"), "he", (640, 640), seed=31, mpp=MPP)
    with open(s.cells_csv) as fh:
        xy = np.array([[float(r["x"]), float(r["y"])] for r in csv.DictReader(fh)])
    return s.slide, xy


def _match(truth: np.ndarray, found: np.ndarray, radius: float) -> int:
    """One-to-one matches within ``radius``, nearest pairs first."""
    from scipy.spatial import cKDTree

    pairs = cKDTree(found).sparse_distance_matrix(cKDTree(truth), radius, output_type="coo_matrix")
    used_f, used_t, n = set(), set(), 0
    for k in np.argsort(pairs.data, kind="stable"):
        f, t = pairs.row[k], pairs.col[k]
        if f not in used_f and t not in used_t:
            used_f.add(f), used_t.add(t)
            n += 1
    return n


def test_finds_most_true_nuclei_on_a_synthetic_slide(synthetic):
    import histoscope as hs

    path, truth = synthetic
    slide = hs.open_slide(path)
    nuc = detect_nuclei(slide.read_region(0, 0, 640, 640, mpp=MPP), MPP)
    matched = _match(truth, np.stack([nuc.x, nuc.y], 1), 4.0 / MPP)
    recall, precision = matched / len(truth), matched / len(nuc)
    assert len(truth) > 200
    assert recall > 0.75 and precision > 0.8, (recall, precision, len(truth), len(nuc))
    # far from everything (random points) matches almost nothing: the test can fail
    rng = np.random.default_rng(0)
    rand = rng.uniform(0, 640, (len(nuc), 2))
    assert _match(truth, rand, 4.0 / MPP) < matched / 2


def test_table_shapes_and_columns(synthetic):
    import histoscope as hs

    slide = hs.open_slide(synthetic[0])
    nuc = detect_nuclei(slide.read_region(0, 0, 256, 256, mpp=MPP), MPP)
    assert len(nuc) > 10 and nuc.mpp == MPP
    assert nuc.x.dtype == np.float64 and nuc.y.shape == (len(nuc),)
    assert list(nuc.measurements.columns) == list(COLUMNS)
    assert len(nuc.outlines) == len(nuc)
    for o, x, y in zip(nuc.outlines, nuc.x, nuc.y, strict=True):
        assert o.dtype == np.float32 and o.ndim == 2 and o.shape[1] == 2 and len(o) >= 3
        assert not np.array_equal(o[0], o[-1])  # ring not closed
        assert o[:, 0].min() - 0.5 <= x <= o[:, 0].max() + 0.5
        assert o[:, 1].min() - 0.5 <= y <= o[:, 1].max() + 0.5
    sub = nuc.subset(nuc.x < 128)
    assert len(sub) == int((nuc.x < 128).sum()) and len(sub.outlines) == len(sub)
    both = Nuclei.concat([sub, nuc.subset(np.flatnonzero(nuc.x >= 128))], MPP)
    assert len(both) == len(nuc)
    assert sorted(both.x) == sorted(nuc.x)


# ---------------------------------------------------------------- measurements
def test_disk_measurements_match_geometry():
    r = 10.0  # px: 5 µm, area 78.5 µm²
    img = he_image((64, 64), [(31.0, 30.0, r, r, 0.0)], hema=0.8, eosin=0.25)
    nuc = detect_nuclei(img, MPP)
    assert len(nuc) == 1
    m = nuc.measurements.iloc[0]
    area = np.pi * (r * MPP) ** 2
    assert m["Nucleus: Area µm^2"] == pytest.approx(area, rel=0.1)
    assert m["Nucleus: Perimeter µm"] == pytest.approx(2 * np.pi * r * MPP, rel=0.1)
    assert m["Nucleus: Circularity"] > 0.9
    assert m["Nucleus: Eccentricity"] < 0.2
    assert m["Nucleus: Hematoxylin OD mean"] == pytest.approx(0.8, abs=0.08)
    assert m["Nucleus: Hematoxylin OD std dev"] < 0.1
    assert m["Nucleus: Eosin OD mean"] == pytest.approx(0.25, abs=0.08)
    assert (nuc.x[0], nuc.y[0]) == pytest.approx((31.0, 30.0), abs=0.3)


def test_ellipse_eccentricity_and_circularity():
    a, b = 14.0, 5.0
    img = he_image((64, 64), [(32.0, 32.0, a, b, 0.5)])
    nuc = detect_nuclei(img, MPP)
    assert len(nuc) == 1
    m = nuc.measurements.iloc[0]
    assert m["Nucleus: Eccentricity"] == pytest.approx(np.sqrt(1 - (b / a) ** 2), abs=0.05)
    assert m["Nucleus: Circularity"] < 0.85
    assert m["Nucleus: Area µm^2"] == pytest.approx(np.pi * a * b * MPP**2, rel=0.12)


def test_touching_nuclei_are_split_and_sizes_filtered():
    disks = [(20.0, 30.0, 8, 8, 0), (34.0, 30.0, 8, 8, 0), (70.0, 30.0, 1.5, 1.5, 0)]
    nuc = detect_nuclei(he_image((60, 100), disks), MPP)
    assert sorted(np.round(nuc.x).astype(int).tolist()) == [20, 34]  # the 1.8 µm² dot is dropped


# ---------------------------------------------------------------------- tiles
def _grid_image(step=40, size=400, seed=0):
    rng = np.random.default_rng(seed)
    spots = [(x + rng.uniform(-6, 6), y + rng.uniform(-6, 6), rng.uniform(5, 9),
              rng.uniform(4, 6), rng.uniform(0, np.pi))
             for y in range(20, size, step) for x in range(20, size, step)]  # fmt: skip
    return he_image((size, size), spots), np.array([s[:2] for s in spots])


def test_iter_detect_keeps_each_nucleus_once_at_tile_borders():
    # nuclei straddling the 128 px tile borders
    img = he_image((400, 400), [(128.0, 60.0, 8, 6, 0.3), (256.0, 256.0, 7, 7, 0),
                                (60.0, 128.5, 6, 7.5, 1.0)])  # fmt: skip
    slide = ArraySlide(img)
    nuc = detect_slide(slide, NucleiParams(tile_size=128))
    assert len(detect_slide(ArraySlide(img), NucleiParams(tile_size=512))) == 3
    assert len(nuc) == 3
    assert len(slide.reads) == 16  # 4 x 4 tiles
    assert sorted(np.round(nuc.x).tolist()) == [60.0, 128.0, 256.0]


def test_tiled_equals_single_tile_run():
    img, centres = _grid_image(seed=1)
    slide = ArraySlide(img)
    tiled = detect_slide(slide, NucleiParams(tile_size=96))
    whole = detect_slide(ArraySlide(img), NucleiParams(tile_size=512))
    assert len(whole) == len(centres)
    assert len(tiled) == len(whole)
    a = np.sort(np.stack([tiled.x, tiled.y], 1).view("f8,f8"), axis=0)
    b = np.sort(np.stack([whole.x, whole.y], 1).view("f8,f8"), axis=0)
    diff = np.abs(a.view("f8").reshape(-1, 2) - b.view("f8").reshape(-1, 2))
    assert diff.max() < 0.5
    # level-0 placement of a region: only nuclei with centroids inside it
    part = detect_slide(ArraySlide(img), NucleiParams(tile_size=96), region=(100, 100, 200, 150))
    inside = (whole.x >= 100) & (whole.x < 300) & (whole.y >= 100) & (whole.y < 250)
    assert len(part) == int(inside.sum()) > 5
    assert part.measurements["Nucleus: Area µm^2"].sum() == pytest.approx(
        whole.measurements["Nucleus: Area µm^2"][inside].sum(), rel=0.01
    )


def test_cancel_returns_the_finished_tiles():
    img, _ = _grid_image(seed=2)
    gen = iter_detect(ArraySlide(img), NucleiParams(tile_size=128))
    done, total, first = next(gen)
    assert (done, total) == (1, 16) and len(first) > 0
    done, total, second = gen.send(None)
    with pytest.raises(StopIteration) as stop:
        gen.send(False)
    out = stop.value.value
    assert len(out) == len(first) + len(second)
    assert len(out) < len(detect_slide(ArraySlide(img), NucleiParams(tile_size=128)))


def test_threads_give_the_same_nuclei_in_the_same_order_and_stop_too():
    img, _ = _grid_image(seed=3)
    one = detect_slide(ArraySlide(img), NucleiParams(tile_size=96))
    two = detect_slide(ArraySlide(img), NucleiParams(tile_size=96), workers=3)
    np.testing.assert_array_equal(one.x, two.x)
    np.testing.assert_array_equal(one.y, two.y)
    pd.testing.assert_frame_equal(one.measurements, two.measurements)
    gen = iter_detect(ArraySlide(img), NucleiParams(tile_size=96), workers=3)
    steps = [next(gen), gen.send(None)]
    with pytest.raises(StopIteration) as stop:
        gen.send(False)
    assert [s[0] for s in steps] == [1, 2]
    assert len(stop.value.value) == sum(len(s[2]) for s in steps) < len(one)
    with pytest.raises(ValueError, match="workers"):
        next(iter_detect(ArraySlide(img), NucleiParams(), workers=0))


def test_tissue_mask_skips_tiles_and_near_goes_first():
    from histoscope.tissue import TissueMask

    img, _ = _grid_image(seed=3)
    mask = np.zeros((50, 50), bool)  # 4 µm/px = 8 level-0 px per mask px
    mask[20:30, 20:30] = True  # level-0 160..240: the tiles around the middle
    slide = ArraySlide(img)
    gen = iter_detect(slide, NucleiParams(tile_size=128), tissue=TissueMask(mask, 4.0, 0.5),
                      near=(390.0, 390.0))  # fmt: skip
    first = next(gen)
    assert first[:2] == (1, 16) and len(first[2]) == 0  # the corner tile: no tissue, not read
    rest = list(gen)
    assert len(rest) == 15
    # tissue at level-0 160..240 touches the cores 128..256 and 256..384 (with the overlap)
    assert sorted((x, y) for x, y, *_ in slide.reads) == [(104, 104), (104, 232), (232, 104),
                                                         (232, 232)]  # fmt: skip

    slide = ArraySlide(img)
    gen = iter_detect(slide, NucleiParams(tile_size=128), near=(390.0, 10.0))
    next(gen)
    assert slide.reads[0][:2] == (360, -24)  # the top-right tile first


# --------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs",
    [
        {"threshold": -0.1},
        {"tile_size": 10},
        {"method": "unet"},
        {"min_area_um2": 50.0, "max_area_um2": 40.0},
        {"overlap_um": 5.0},
        {"sigma_um": float("nan")},
    ],
    ids=["threshold", "tile_size", "method", "areas", "overlap", "nan"],
)
def test_bad_params_are_refused(kwargs):
    with pytest.raises(ParamError, match="nuclei"):
        NucleiParams(**kwargs)


def test_bad_images_are_refused():
    with pytest.raises(ValueError, match="RGB"):
        detect_nuclei(np.zeros((10, 10), np.uint8), MPP)
    with pytest.raises(ValueError, match="mpp"):
        detect_nuclei(np.zeros((10, 10, 3), np.uint8), 0.0)


@pytest.mark.parametrize("method", ["stardist", "cellpose"])
def test_missing_backend_says_what_to_install(method):
    if importlib.util.find_spec(method) is not None:
        pytest.skip(f"{method} is installed here")
    params = NucleiParams(method=method, weights="/nowhere/model")
    with pytest.raises(MissingBackendError, match=f"pip install {method}"):
        detector(params)
    with pytest.raises(MissingBackendError):  # before any tile is read
        next(iter_detect(ArraySlide(np.full((64, 64, 3), 255, np.uint8)), params))


@pytest.mark.parametrize("value", [245, 200], ids=["glass", "flat"])
def test_otsu_threshold_on_a_tile_without_stain_finds_nothing(value):
    """threshold=0 (Otsu per tile) on glass or one flat colour: no nuclei, no crash."""
    found = detect_nuclei(np.full((256, 256, 3), value, np.uint8), MPP, NucleiParams(threshold=0))
    assert len(found) == 0 and list(found.measurements.columns) == list(COLUMNS)
    # and still finds nuclei when the tile has some
    img = he_image((128, 128), [(40, 40, 6, 5, 0.0), (90, 80, 7, 6, 0.5)])
    assert len(detect_nuclei(img, MPP, NucleiParams(threshold=0))) == 2


def test_area_is_a_pixel_count_and_outlines_put_pixel_centres_at_integers():
    """What the docstrings say: area = pixel count x mpp², outlines centred on pixel centres."""
    import histoscope.nuclei._classical as classical
    from histoscope.nuclei._classical import measure

    yy, xx = np.mgrid[:48, :48]
    disk = (yy - 20) ** 2 + (xx - 25) ** 2 <= 36
    labels = disk.astype(np.int32)
    hema, eosin = np.where(disk, 0.8, 0.0), np.where(disk, 0.1, 0.0)
    nuc = measure(labels, hema, eosin, MPP, NucleiParams())
    assert len(nuc) == 1
    assert nuc.measurements["Nucleus: Area µm^2"][0] == disk.sum() * MPP**2  # exactly the count
    assert (nuc.x[0], nuc.y[0]) == (25.0, 20.0)  # the disk's centre pixel, not 25.5, 20.5
    ring = nuc.outlines[0].astype(np.float64)
    assert ring.mean(0) == pytest.approx([25.0, 20.0], abs=0.05)
    r = np.hypot(ring[:, 0] - 25, ring[:, 1] - 20)
    assert 5.5 < r.min() and r.max() < 6.5  # between the boundary pixel centres and their edges
    doc = " ".join((classical.__doc__ + Nuclei.__doc__).split())
    assert "pixel count" in doc and "QuPath or any other corner-based" in doc


# ------------------------------------------------- fast paths vs the slow reference
def _reference_measure(labels, hema, eosin, mpp, params):
    """The detector's measurements computed one object at a time, as they were first written
    (``find_contours`` per object, ``np.roll`` smoothing, Qhull's hull, per-object moments)."""
    from scipy import ndimage as ndi
    from scipy.spatial import ConvexHull, QhullError
    from skimage import measure

    n = int(labels.max())
    flat = labels.ravel()
    count = np.bincount(flat, minlength=n + 1)[1:].astype(np.float64)
    area = count * mpp**2
    ok = (count > 0) & (area >= params.min_area_um2) & (area <= params.max_area_um2)

    def stats(v):
        s = np.bincount(flat, v.ravel(), minlength=n + 1)[1:]
        s2 = np.bincount(flat, np.square(v.ravel(), dtype=np.float64), minlength=n + 1)[1:]
        mean = s / np.maximum(count, 1)
        return mean, np.sqrt(np.maximum(s2 / np.maximum(count, 1) - mean**2, 0.0))

    h_mean, h_std = stats(hema)
    e_mean, e_std = stats(eosin)
    ok &= e_mean <= params.max_eosin_ratio * h_mean
    slices = ndi.find_objects(labels)
    rows, outlines = [], []
    for i in np.flatnonzero(ok):
        sl = slices[i]
        sub = labels[sl] == i + 1
        ring = max(measure.find_contours(np.pad(sub, 1).astype(np.float32), 0.5), key=len)[:-1]
        for _ in range(3):
            ring = (np.roll(ring, 1, axis=0) + ring + np.roll(ring, -1, axis=0)) / 3
        if len(ring) > 24:
            ring = ring[::2]
        ring = (ring[:, ::-1] - 1.0).astype(np.float32)
        if len(ring) < 3:
            continue
        x, y = ring[:, 0].astype(np.float64), ring[:, 1].astype(np.float64)
        poly = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))
        try:
            hull = ConvexHull(ring).volume
        except QhullError:
            hull = 0.0
        if (poly / hull if hull > 0 else 0.0) < params.min_solidity:
            continue
        rr, cc = np.nonzero(sub)
        cy, cx = rr.mean(), cc.mean()
        ecc = 0.0
        if len(rr) >= 3:
            dy, dx = rr - cy, cc - cx
            myy, mxx = (dy * dy).mean() + 1 / 12, (dx * dx).mean() + 1 / 12
            mxy = (dx * dy).mean()
            tr, det = myy + mxx, myy * mxx - mxy * mxy
            disc = np.sqrt(max(tr * tr / 4 - det, 0.0))
            l1, l2 = tr / 2 + disc, max(tr / 2 - disc, 0.0)
            ecc = float(np.sqrt(1 - l2 / l1)) if l1 > 0 else 0.0
        perim = float(np.hypot(*(np.roll(ring, -1, axis=0) - ring).T).sum()) * mpp
        ring[:, 0] += sl[1].start
        ring[:, 1] += sl[0].start
        outlines.append(ring)
        circ = min(1.0, 4 * np.pi * area[i] / perim**2) if perim > 0 else 0.0
        rows.append((cx + sl[1].start, cy + sl[0].start, area[i], perim, circ, ecc,
                     h_mean[i], h_std[i], e_mean[i], e_std[i]))  # fmt: skip
    return np.asarray(rows, np.float64).reshape(-1, 10), outlines


def _assert_same_as_reference(labels, hema, eosin, params=None):
    from histoscope.nuclei._classical import measure

    params = params or NucleiParams()
    table, outlines = _reference_measure(labels, hema, eosin, MPP, params)
    nuc = measure(labels, hema, eosin, MPP, params)
    assert len(nuc) == len(table) == len(outlines)
    np.testing.assert_array_equal(nuc.x, table[:, 0])  # centroids: the same numbers
    np.testing.assert_array_equal(nuc.y, table[:, 1])
    for a, b in zip(nuc.outlines, outlines, strict=True):
        np.testing.assert_array_equal(a, b)  # same vertices, same start, same order
    # perimeters are float32 sums in the reference: equal to its rounding
    np.testing.assert_allclose(nuc.measurements.to_numpy(), table[:, 2:], rtol=1e-5, atol=1e-9)
    return nuc


def test_fast_measure_equals_the_per_object_reference_on_a_synthetic_tile(synthetic):
    import histoscope as hs
    from histoscope.nuclei._classical import segment, stain_channels

    rgb = hs.open_slide(synthetic[0]).read_region(0, 0, 640, 640, mpp=MPP)
    hema, eosin = stain_channels(rgb)
    labels = segment(hema, MPP, NucleiParams())
    nuc = _assert_same_as_reference(labels, hema, eosin)
    assert len(nuc) > 200
    # a low threshold fuses and frays more: odd shapes, which the filters must treat alike
    low = NucleiParams(threshold=0.05, local_fraction=0.0, min_area_um2=2.0)
    labels = segment(hema, MPP, low)
    assert len(_assert_same_as_reference(labels, hema, eosin, low)) > 100


def test_fast_measure_equals_the_reference_on_awkward_shapes():
    """Holes, pieces touching at a corner, one-pixel objects, and the image border."""
    labels = np.zeros((40, 60), np.int32)
    yy, xx = np.mgrid[:40, :60]
    labels[(yy - 12) ** 2 + (xx - 12) ** 2 <= 64] = 1
    labels[(yy - 12) ** 2 + (xx - 12) ** 2 <= 4] = 0  # a hole: two contours
    labels[20:26, 30:36] = 2
    labels[26:31, 36:40] = 2  # touches the square only at a corner: two pieces
    labels[0:6, 50:60] = 3  # on the border
    labels[35, 5] = 4  # one pixel
    labels[30:38, 10:30] = 5  # a bar: eccentric
    labels[2:10, 30:34] = 6
    labels[2:4, 34:44] = 6  # an L: low solidity
    rng = np.random.default_rng(3)
    hema = (labels > 0) * 0.7 + rng.uniform(0, 0.1, labels.shape)
    eosin = rng.uniform(0, 0.2, labels.shape)
    loose = NucleiParams(min_area_um2=0.0, min_solidity=0.0)
    nuc = _assert_same_as_reference(labels, hema, eosin, loose)
    assert len(nuc) == 6
    assert len(_assert_same_as_reference(labels, hema, eosin)) < 6  # the filters still cut


def _hmax_cases():
    from scipy import ndimage as ndi

    rng = np.random.default_rng(7)
    for _ in range(60):
        shape = tuple(rng.integers(3, 40, 2))
        img = rng.integers(0, rng.integers(2, 10), shape).astype(np.float32)
        img *= np.float32(rng.choice([0.1, 0.25, 1.0]))  # many ties
        img[rng.random(shape) < 0.3] = 0
        if rng.random() < 0.5:
            img = ndi.gaussian_filter(img, 1.0)
        yield img, float(rng.choice([0.1, 0.25, 0.5, 1.0]))


def test_fast_h_maxima_marks_the_same_pixels_as_scikit_image():
    from scipy import ndimage as ndi
    from skimage import morphology

    from histoscope.nuclei._morph import h_maxima

    compared = 0
    for img, h in _hmax_cases():
        want = morphology.h_maxima(img, h)
        got = h_maxima(img, h)
        assert got.dtype == want.dtype == np.uint8
        np.testing.assert_array_equal(got, want)
        compared += int(want.sum() > 0)
    assert compared > 30
    # the detector's own input: a contrast-weighted distance transform of touching nuclei
    img, _ = _grid_image(step=14, size=200, seed=4)  # crowded: nuclei touch and fuse
    fg = img.mean(2) < 200
    dist = ndi.gaussian_filter(ndi.distance_transform_edt(fg).astype(np.float32), 1.0)
    want = morphology.h_maxima(dist, 0.5)
    assert want.sum() > 20
    np.testing.assert_array_equal(h_maxima(dist, 0.5), want)
    # images it does not speed up go to scikit-image unchanged
    for other in (dist.astype(np.float64), dist - 1.0):
        np.testing.assert_array_equal(h_maxima(other, 0.5), morphology.h_maxima(other, 0.5))


def test_fast_segment_equals_the_reference_on_a_synthetic_tile(synthetic, monkeypatch):
    """The same labels as scikit-image's h-maxima and SciPy's hole filling give."""
    from scipy import ndimage as ndi
    from skimage import morphology

    import histoscope as hs
    import histoscope.nuclei._classical as classical

    rgb = hs.open_slide(synthetic[0]).read_region(0, 0, 640, 640, mpp=MPP)
    hema, _ = classical.stain_channels(rgb)
    fast = classical.segment(hema, MPP, NucleiParams())

    def trim(labels, value):
        n = int(labels.max())
        flat = labels.ravel()
        count = np.maximum(np.bincount(flat, minlength=n + 1), 1)
        mean = np.bincount(flat, value.ravel(), minlength=n + 1) / count
        kept = (labels > 0) & (value >= 0.5 * mean[labels])
        return np.where(ndi.binary_fill_holes(kept), labels, 0).astype(np.int32)

    monkeypatch.setattr(classical, "h_maxima", morphology.h_maxima)
    monkeypatch.setattr(classical, "_trim", trim)
    slow = classical.segment(hema, MPP, NucleiParams())
    assert fast.max() > 200
    np.testing.assert_array_equal(fast, slow)


def test_h_maxima_matches_scikit_image_for_any_h_type():
    from skimage.morphology import h_maxima as reference

    from histoscope.nuclei._morph import h_maxima

    img = np.array([[2, 0, 0.7]], np.float32)
    for h in (np.float64(0.7), 0.7, np.float32(0.7), 1e-50, 1):
        np.testing.assert_array_equal(h_maxima(img, h), reference(img, h), err_msg=repr(h))
    with pytest.raises(ValueError):
        reference(np.ones((1, 4), np.float32), -0.5)
    with pytest.raises(ValueError):
        h_maxima(np.ones((1, 4), np.float32), -0.5)


def test_trim_fills_holes_as_binary_fill_holes_does_on_random_nuclei():
    from scipy import ndimage as ndi

    from histoscope.nuclei._classical import _trim

    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w = rng.integers(1, 24, 2)
        labels = ndi.label(rng.random((h, w)) < rng.uniform(0.3, 0.9))[0].astype(np.int32)
        value = rng.random((h, w)).astype(np.float32)
        n = int(labels.max())
        if n == 0:
            continue
        count = np.maximum(np.bincount(labels.ravel(), minlength=n + 1), 1)
        mean = np.bincount(labels.ravel(), value.ravel(), minlength=n + 1) / count
        kept = (labels > 0) & (value >= 0.5 * mean[labels])
        want = np.where(ndi.binary_fill_holes(kept), labels, 0)  # the slow reference
        np.testing.assert_array_equal(_trim(labels, value), want)
