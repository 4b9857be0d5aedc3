"""The OpenSlide backend: same pixels as the tifffile path, bad tiles, fallbacks."""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pytest

import histoscope as hs
from histoscope.errors import HistoScopeWarning
from histoscope.slide._openslide import OpenSlideBackend
from histoscope.slide._slide import Slide
from tests.slide.conftest import MPP, TILE, corrupt_tile, texture


def via_openslide(path, **kwargs) -> Slide:
    return Slide(OpenSlideBackend(path), **kwargs)


@dataclass(frozen=True)
class AgreeCase:
    id: str
    fixture: str
    vendor: str
    magnification: float | None


AGREE = [
    AgreeCase("generic-tiff", "tiled_tiff", "generic-tiff", None),
    AgreeCase("aperio-svs", "svs", "aperio", 20.0),
]


@pytest.mark.parametrize("case", AGREE, ids=lambda c: c.id)
def test_openslide_and_tifffile_paths_agree(case, request):
    path = request.getfixturevalue(case.fixture)
    fast, ref = hs.open_slide(path), via_openslide(path)
    assert (fast.backend, ref.backend) == ("tifffile", "openslide")
    assert ref.vendor == case.vendor == fast.vendor
    assert ref.mpp == pytest.approx(MPP) and fast.mpp == pytest.approx(MPP)
    assert [lv.shape for lv in ref.levels] == [lv.shape for lv in fast.levels]
    assert ref.level_downsamples == pytest.approx(fast.level_downsamples, rel=0.01)
    if case.magnification:
        assert ref.magnification == fast.magnification == case.magnification
    for lvl in range(len(ref.levels)):
        a, b = ref.levels[lvl].compute(), fast.levels[lvl].compute()
        assert np.abs(a.astype(np.int16) - b).mean() < 1.0  # same JPEG, maybe another IDCT
    for args in [(13, 7, 300, 200, None), (400, 300, 120, 100, 2 * MPP), (-20, 900, 80, 400, 3)]:
        a = ref.read_region(*args[:4], mpp=args[4])
        b = fast.read_region(*args[:4], mpp=args[4])
        assert np.abs(a.astype(np.int16) - b).mean() < 1.0


def test_associated_images_of_svs_agree(svs):
    fast, ref = hs.open_slide(svs).associated_images, via_openslide(svs).associated_images
    assert {"label", "macro", "thumbnail"} <= set(ref)
    assert {"label", "macro", "thumbnail"} <= set(fast)
    for key in ("label", "macro", "thumbnail"):
        assert fast[key].shape == ref[key].shape and fast[key].dtype == np.uint8
    assert tuple(ref["label"][5, 5]) == (30, 200, 30)


def test_openslide_properties_are_kept(svs):
    props = via_openslide(svs).properties
    assert props["openslide.vendor"] == "aperio"
    assert props["aperio.AppMag"] == "20"


def test_tiff_flavour_tifffile_cannot_take_falls_back_to_openslide(tmp_path):
    import tifffile

    img = texture(0, 0, 600, 700)
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, np.moveaxis(img, -1, 0), photometric="rgb", planarconfig="separate",
                     tile=(256, 256), compression="zlib", resolution=(2e4, 2e4),
                     resolutionunit="CENTIMETER")  # fmt: skip
    slide = hs.open_slide(path)
    assert slide.backend == "openslide" and slide.mpp == pytest.approx(0.5)
    np.testing.assert_array_equal(slide.levels[0].compute(), img)


def test_openslide_threaded_reads_equal_serial(tiled_tiff):
    slide = via_openslide(tiled_tiff)
    rng = np.random.default_rng(5)
    boxes = [(int(rng.integers(0, 1000)), int(rng.integers(0, 1200)), 200, 150) for _ in range(30)]
    serial = [
        slide.levels[0][y : y + h, x : x + w].compute(scheduler="sync") for y, x, h, w in boxes
    ]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda b: slide.levels[0][b[0] : b[0] + b[2], b[1] : b[1] + b[3]]
                            .compute(), boxes * 2))  # fmt: skip
    for a, b in zip(got, serial * 2, strict=True):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------- bad tiles
def test_corrupt_tile_raises_and_the_rest_stays_readable(slide_copy, tiled_tiff):
    corrupt_tile(slide_copy, 3)
    slide = via_openslide(slide_copy)
    with pytest.raises(hs.SlideError, match="tile") as info:
        slide.levels[0][:TILE, 3 * TILE : 4 * TILE].compute()
    assert str(slide_copy) in str(info.value)
    # OpenSlide poisons a handle after one error; the backend must recover.
    good = hs.open_slide(tiled_tiff).levels[0][TILE:, :].compute()
    again = slide.levels[0][TILE:, :].compute()
    assert np.abs(again.astype(np.int16) - good).mean() < 1.0


def test_corrupt_tile_blank_through_openslide(slide_copy, tiled_tiff):
    corrupt_tile(slide_copy, 3)
    slide = via_openslide(slide_copy, on_tile_error="blank")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        full = slide.levels[0].compute()
        region = slide.read_region(0, 0, 1300, 600)  # one block read spanning the bad tile
        slide.levels[0].compute()
    assert len([w for w in caught if issubclass(w.category, HistoScopeWarning)]) == 1
    for img in (full, region):
        assert (img[:TILE, 3 * TILE : 4 * TILE] == 255).all()
    good = hs.open_slide(tiled_tiff).levels[0].compute()
    assert np.abs(full[:, : 3 * TILE].astype(np.int16) - good[:, : 3 * TILE]).mean() < 1.0
    assert np.abs(region[:, 4 * TILE :].astype(np.int16) - good[:600, 4 * TILE :]).mean() < 1.0
