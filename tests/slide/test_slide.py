"""``Slide``: region reads at a target µm/px, thread-safety, bad tiles, thumbnails."""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

import histoscope as hs
from histoscope.errors import HistoScopeWarning
from tests.slide.conftest import JPEG_TOL, MPP, TILE, corrupt_tile, half


def _err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# ----------------------------------------------------------- read_region
@pytest.fixture(scope="module")
def zslide(ome_zarr):
    """The lossless OME-Zarr slide: pixels equal ``image0`` exactly."""
    return hs.open_slide(ome_zarr)


@dataclass(frozen=True)
class RegionCase:
    id: str
    x: int
    y: int
    w: int
    h: int


REGIONS = [
    RegionCase("origin", 0, 0, 100, 80),
    RegionCase("across-tiles", TILE - 17, 2 * TILE - 5, 300, 290),
    RegionCase("edge-tiles", 1300 - 150, 1100 - 120, 150, 120),
    RegionCase("one-pixel", 777, 555, 1, 1),
]


@pytest.mark.parametrize("case", REGIONS, ids=lambda c: c.id)
def test_level0_region_is_exact(zslide, image0, case):
    got = zslide.read_region(case.x, case.y, case.w, case.h)
    assert got.shape == (case.h, case.w, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, image0[case.y : case.y + case.h, case.x : case.x + case.w])
    np.testing.assert_array_equal(got, zslide.read_region(case.x, case.y, case.w, case.h, mpp=MPP))


@pytest.mark.parametrize("case", REGIONS, ids=lambda c: c.id)
def test_jpeg_tiff_region_matches_source(tiled_tiff, image0, case):
    slide = hs.open_slide(tiled_tiff)
    got = slide.read_region(case.x, case.y, case.w, case.h)
    ref = image0[case.y : case.y + case.h, case.x : case.x + case.w]
    assert _err(got, ref) <= JPEG_TOL
    lazy = slide.levels[0][case.y : case.y + case.h, case.x : case.x + case.w].compute()
    np.testing.assert_array_equal(got, lazy)


def test_best_level_is_the_coarsest_still_detailed_enough(zslide):
    assert zslide.level_downsamples == [1.0, 2.0, 4.0]
    assert [zslide.best_level(d) for d in (0.5, 1, 1.99, 2, 3.9, 4, 100)] == [0, 0, 0, 1, 1, 2, 2]


def test_exact_level_mpp_reads_that_level(zslide, image0):
    got = zslide.read_region(200, 100, 120, 90, mpp=2 * MPP)
    np.testing.assert_array_equal(got, half(image0)[50:140, 100:220])
    got = zslide.read_region(200, 100, 60, 40, mpp=4 * MPP)
    np.testing.assert_array_equal(got, half(image0, 2)[25:65, 50:110])


@pytest.mark.parametrize("factor", [1.5, 3.0, 5.0], ids=lambda f: f"x{f}")
def test_between_levels_resamples_from_finer_level(zslide, image0, factor):
    x, y, w, h = 120, 60, 100, 80
    got = zslide.read_region(x, y, w, h, mpp=factor * MPP)
    assert got.shape == (h, w, 3)
    src = image0[y : y + round(h * factor), x : x + round(w * factor)]
    ref = np.asarray(Image.fromarray(src).resize((w, h), Image.Resampling.BOX))
    assert _err(got, ref) < 2.0


def test_upsampling_below_level0_mpp(zslide, image0):
    got = zslide.read_region(400, 300, 200, 200, mpp=MPP / 2)
    ref = np.asarray(Image.fromarray(image0[300:400, 400:500]).resize((200, 200)))
    assert _err(got, ref) < 2.0


def test_level_argument_reads_native_level(zslide, image0):
    got = zslide.read_region(40, 20, 50, 30, level=1)
    np.testing.assert_array_equal(got, half(image0)[10:40, 20:70])


@pytest.mark.parametrize(
    ("x", "y", "mpp"),
    [(-100, -60, None), (1300 - 50, 1100 - 40, None), (-100, 500, 2 * MPP), (-37, -11, 1.5 * MPP)],
)
def test_outside_the_slide_reads_white(zslide, image0, x, y, mpp):
    w, h = 160, 120
    got = zslide.read_region(x, y, w, h, mpp=mpp)
    f = (mpp or MPP) / MPP
    yy, xx = np.mgrid[0:h, 0:w]
    outside = (
        (x + (xx + 1) * f <= 0)
        | (y + (yy + 1) * f <= 0)
        | (x + xx * f >= 1300)
        | (y + yy * f >= 1100)
    )
    assert outside.any() and (~outside).any()
    assert (got[outside] == 255).all()
    inside = ~outside & (x + xx * f >= 1) & (y + yy * f >= 1) & (x + (xx + 1) * f < 1299)
    assert (got[inside & (y + (yy + 1) * f < 1099)] < 250).any()


def test_region_far_outside_is_all_white(zslide):
    assert (zslide.read_region(10_000, -5_000, 64, 32, mpp=3.0) == 255).all()


def test_region_needs_slide_mpp_for_target_mpp(png):
    slide = hs.open_slide(png)
    with pytest.raises(hs.SlideError, match=str(png)):
        slide.read_region(0, 0, 10, 10, mpp=0.5)
    assert slide.read_region(0, 0, 10, 10).shape == (10, 10, 3)


@pytest.mark.parametrize(("w", "h"), [(0, 10), (10, -1)])
def test_region_size_must_be_positive(zslide, w, h):
    with pytest.raises(ValueError, match="positive"):
        zslide.read_region(0, 0, w, h)


# ----------------------------------------------------------- thread-safety
@pytest.mark.parametrize("fixture", ["tiled_tiff", "svs", "ome_zarr", "png"])
def test_threaded_reads_equal_serial_reads(request, fixture):
    slide = hs.open_slide(request.getfixturevalue(fixture))
    level = slide.levels[0]
    hh, ww = level.shape[:2]
    rng = np.random.default_rng(7)
    boxes = [
        (int(rng.integers(0, hh - 1)), int(rng.integers(0, ww - 1)),
         int(rng.integers(1, 400)), int(rng.integers(1, 400)))
        for _ in range(60)
    ]  # fmt: skip
    serial = [level[y : y + h, x : x + w].compute(scheduler="sync") for y, x, h, w in boxes]

    def read(box):
        y, x, h, w = box
        return level[y : y + h, x : x + w].compute()

    with ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(read, boxes * 3))
    for got, ref in zip(threaded, serial * 3, strict=True):
        np.testing.assert_array_equal(got, ref)


def test_threaded_read_region_equals_serial(tiled_tiff):
    slide = hs.open_slide(tiled_tiff)
    rng = np.random.default_rng(3)
    args = [(int(rng.integers(-50, 1200)), int(rng.integers(-50, 1000)), 150, 100,
             float(rng.choice([MPP, 1.3 * MPP, 2 * MPP]))) for _ in range(40)]  # fmt: skip
    serial = [slide.read_region(*a[:4], mpp=a[4]) for a in args]
    with ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(lambda a: slide.read_region(*a[:4], mpp=a[4]), args * 2))
    for got, ref in zip(threaded, serial * 2, strict=True):
        np.testing.assert_array_equal(got, ref)


# ------------------------------------------------------------- bad tiles
BAD_TILES = (3, 10)  # tile indices of level 0: (row 0, col 3) and (row 1, col 4)


def _tile_box(index: int, ncols: int = 6) -> tuple[slice, slice]:
    ty, tx = divmod(index, ncols)
    return slice(ty * TILE, (ty + 1) * TILE), slice(tx * TILE, (tx + 1) * TILE)


@pytest.fixture
def damaged(slide_copy):
    for i in BAD_TILES:
        corrupt_tile(slide_copy, i)
    return slide_copy


def test_corrupt_tile_raises_at_first_read_with_path(damaged):
    slide = hs.open_slide(damaged)
    slide.levels[0][TILE:, :TILE].compute()  # good tiles still read
    with pytest.raises(hs.SlideError, match="tile") as info:
        slide.levels[0][:TILE, 3 * TILE : 4 * TILE].compute()
    assert str(damaged) in str(info.value)
    with pytest.raises(hs.SlideError, match=str(damaged)):
        slide.read_region(3 * TILE + 10, 10, 50, 50)


def test_corrupt_tiles_read_white_with_exactly_one_warning(damaged, tiled_tiff):
    good = hs.open_slide(tiled_tiff).levels[0].compute()
    slide = hs.open_slide(damaged, on_tile_error="blank")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            full = slide.levels[0].compute()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: slide.read_region(3 * TILE + i, i, 64, 64), range(16)))
        slide.read_region(0, 0, 600, 500, mpp=1.5 * MPP)
        slide.thumbnail(400)
    ours = [w for w in caught if issubclass(w.category, HistoScopeWarning)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert str(damaged) in str(ours[0].message)
    mask = np.zeros(full.shape[:2], bool)
    for i in BAD_TILES:
        ys, xs = _tile_box(i)
        assert (full[ys, xs] == 255).all()
        mask[ys, xs] = True
    np.testing.assert_array_equal(full[~mask], good[~mask])
    assert slide.bad_tiles == len(BAD_TILES)


def test_on_warning_callback_replaces_warnings(damaged):
    seen: list[str] = []
    slide = hs.open_slide(damaged, on_tile_error="blank", on_warning=seen.append)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warnings.warn would fail the test
        slide.levels[0].compute()
        slide.levels[0].compute()
    assert len(seen) == 1 and str(damaged) in seen[0]


# ------------------------------------------------------ thumbnail, metadata
@pytest.mark.parametrize("max_size", [100, 333, 5000])
def test_thumbnail_fits_max_size_and_keeps_aspect(tiled_tiff, image0, max_size):
    thumb = hs.open_slide(tiled_tiff).thumbnail(max_size)
    assert max(thumb.shape[:2]) == min(max_size, 1300)
    assert thumb.shape[1] / thumb.shape[0] == pytest.approx(1300 / 1100, rel=0.02)
    ref = np.asarray(Image.fromarray(image0).resize(thumb.shape[1::-1], Image.Resampling.BOX))
    assert _err(thumb, ref) < 4


def test_metadata_is_plain_data(svs):
    slide = hs.open_slide(svs)
    meta = slide.metadata
    assert meta["path"] == str(svs) and meta["mpp"] == pytest.approx(MPP)
    assert meta["magnification"] == 20 and meta["dimensions"] == (1300, 1100)
    assert meta["level_downsamples"] == pytest.approx([1.0, 4.0], rel=0.01)
    assert "1300x1100" in repr(slide)


def test_magnification_estimated_from_mpp(tiled_tiff):
    assert hs.open_slide(tiled_tiff).magnification == pytest.approx(20)
    assert hs.open_slide(tiled_tiff, mpp=0.25).magnification == pytest.approx(40)


@pytest.mark.parametrize("fixture", ["tiled_tiff", "ome_zarr", "png", "plain_tiff"])
def test_changing_a_read_never_changes_the_slide(request, fixture):
    slide = hs.open_slide(request.getfixturevalue(fixture))
    before = slide.read_region(0, 0, 64, 48)
    for out in (slide.read_region(0, 0, 64, 48), slide.levels[0][:48, :64].compute(),
                slide.levels[0].compute(), slide.thumbnail(5000)):  # fmt: skip
        out[...] = 0
    np.testing.assert_array_equal(slide.read_region(0, 0, 64, 48), before)
    assert (before != 0).any()


@pytest.mark.parametrize(
    ("x", "y", "mpp", "level"),
    [(0, 0, None, None), (3, 5, 1.5 * MPP, None), (-40, -40, None, None), (10, 10, None, 1),
     (0, 0, 4 * MPP, None), (7, 9, MPP / 2, None)],
)  # fmt: skip
def test_reads_are_writable_arrays(zslide, x, y, mpp, level):
    out = zslide.read_region(x, y, 64, 48, mpp=mpp, level=level)
    assert out.flags.writeable and out.shape == (48, 64, 3)
    assert zslide.thumbnail(200).flags.writeable
