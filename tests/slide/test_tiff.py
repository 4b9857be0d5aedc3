"""The tifffile backend: empty and transparent tiles, sample layouts, µm/px tags."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import histoscope as hs
from histoscope.slide._openslide import OpenSlideBackend
from histoscope.slide._slide import Slide
from tests.slide.conftest import MPP, texture


def _sparse_jpeg_tiff(path: Path, img: np.ndarray, empty: set[int]) -> Path:
    """A JPEG-tiled TIFF whose tiles in ``empty`` have no data (byte count 0)."""
    import imagecodecs
    import tifffile

    h, w = img.shape[:2]
    tiles = []
    for i, (y, x) in enumerate((y, x) for y in range(0, h, 256) for x in range(0, w, 256)):
        block = np.full((256, 256, 3), 255, np.uint8)
        part = img[y : y + 256, x : x + 256]
        block[: part.shape[0], : part.shape[1]] = part
        tiles.append(b"" if i in empty else imagecodecs.jpeg8_encode(block, level=95))
    tifffile.imwrite(path, iter(tiles), shape=(h, w, 3), dtype=np.uint8, tile=(256, 256),
                     photometric="rgb", compression="jpeg", resolution=(2e4, 2e4),
                     resolutionunit="CENTIMETER", metadata=None)  # fmt: skip
    return path


def test_empty_tiles_read_white_in_both_backends(tmp_path):
    img = texture(0, 0, 600, 700)
    path = _sparse_jpeg_tiff(tmp_path / "sparse.tif", img, empty={1, 5})
    for slide in (hs.open_slide(path), Slide(OpenSlideBackend(path))):
        got = slide.levels[0].compute()
        assert (got[:256, 256:512] == 255).all(), slide.backend  # tile 1
        assert (got[256:512, 512:] == 255).all(), slide.backend  # tile 5 (edge tile)
        assert np.abs(got[:256, :256].astype(np.int16) - img[:256, :256]).mean() < 3
        assert (slide.read_region(300, 10, 100, 100) == 255).all()


@dataclass(frozen=True)
class SampleCase:
    id: str
    make: object  # (rgb image) -> array written to the TIFF
    photometric: str
    expect: object  # (rgb image) -> expected RGB read back


def _alpha(img: np.ndarray) -> np.ndarray:
    a = np.full(img.shape[:2] + (1,), 255, np.uint8)
    a[:, : img.shape[1] // 2] = 0  # left half fully transparent
    return np.concatenate([img, a], axis=-1)


def _alpha_expect(img: np.ndarray) -> np.ndarray:
    out = img.copy()
    out[:, : img.shape[1] // 2] = 255
    return out


SAMPLES = [
    SampleCase("rgba-transparent-is-white", _alpha, "rgb", _alpha_expect),
    SampleCase("grey8", lambda im: im[..., 1], "minisblack",
               lambda im: np.repeat(im[..., 1:2], 3, axis=-1)),
    SampleCase("rgb16", lambda im: im.astype(np.uint16) * 257, "rgb", lambda im: im),
]  # fmt: skip


@pytest.mark.parametrize("case", SAMPLES, ids=lambda c: c.id)
def test_sample_layouts_become_rgb_uint8(case, tmp_path):
    import tifffile

    img = texture(0, 0, 300, 340)
    path = tmp_path / "s.tif"
    extra = {"extrasamples": ["unassalpha"]} if "rgba" in case.id else {}
    tifffile.imwrite(path, case.make(img), photometric=case.photometric, tile=(128, 128),
                     compression="zlib", metadata=None, **extra)  # fmt: skip
    got = hs.open_slide(path).levels[0].compute()
    np.testing.assert_array_equal(got, case.expect(img))


@dataclass(frozen=True)
class ResCase:
    id: str
    resolution: tuple[float, float]
    unit: str
    mpp: float | None


RESOLUTIONS = [
    ResCase("pixels-per-cm", (2e4, 2e4), "CENTIMETER", 0.5),
    ResCase("pixels-per-inch", (25400 / 0.25, 25400 / 0.25), "INCH", 0.25),
    ResCase("screen-72-dpi-is-not-microscopy", (72, 72), "INCH", None),
    ResCase("no-unit", (2, 2), "NONE", None),
]


@pytest.mark.parametrize("case", RESOLUTIONS, ids=lambda c: c.id)
def test_mpp_from_tiff_resolution(case, tmp_path):
    import tifffile

    path = tmp_path / "r.tif"
    tifffile.imwrite(path, texture(0, 0, 64, 64), photometric="rgb", tile=(64, 64),
                     resolution=case.resolution, resolutionunit=case.unit, metadata=None)  # fmt: skip
    mpp = hs.open_slide(path).mpp
    assert mpp == pytest.approx(case.mpp) if case.mpp else mpp is None


def test_ome_tiff_has_no_associated_images_and_keeps_description(ome_tiff):
    slide = hs.open_slide(ome_tiff)
    assert slide.associated_images == {}
    assert "OME" in slide.properties["tiff.ImageDescription"]


def test_planes_that_are_not_rgb_are_refused(tmp_path):
    import tifffile

    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.zeros((5, 64, 64), np.uint8), photometric="minisblack",
                     metadata={"axes": "ZYX"})  # fmt: skip
    with pytest.raises(hs.SlideError, match=str(path)):
        hs.open_slide(path).levels[0].compute()


def test_closed_slide_cannot_be_read(tiled_tiff):
    slide = hs.open_slide(tiled_tiff)
    slide.levels[0][:10, :10].compute()
    slide.close()
    with pytest.raises(hs.SlideError, match=str(tiled_tiff)):
        slide.read_region(0, 0, 10, 10)


def test_edge_tiles_are_cropped_to_the_level(tiled_tiff, image0):
    slide = hs.open_slide(tiled_tiff)
    edge = slide.levels[0][-5:, -7:].compute()
    assert edge.shape == (5, 7, 3)
    assert np.abs(edge.astype(np.int16) - image0[-5:, -7:]).mean() < 4
    assert slide.mpp == pytest.approx(MPP)


# --------------------------------------------------------- lazy directories
@pytest.mark.parametrize("fixture", ["tiled_tiff", "ome_tiff", "svs"])
def test_open_reads_directories_only_and_matches_full_parse(request, fixture, monkeypatch):
    from histoscope.slide import _tiff

    path = request.getfixturevalue(fixture)
    lazy = hs.open_slide(path)
    assert lazy._backend._handles["tif"] is None  # tifffile (and every tile table) untouched
    monkeypatch.setattr(_tiff.TiffBackend, "_init_lazy", lambda self: False)
    full = hs.open_slide(path)
    assert full._backend._handles["tif"] is not None
    assert lazy._backend.levels == full._backend.levels
    assert lazy.metadata == full.metadata and lazy.properties == full.properties
    for level in (len(full.levels) - 1, 0):
        np.testing.assert_array_equal(lazy.levels[level].compute(), full.levels[level].compute())
    assert set(lazy.associated_images) == set(full.associated_images)


def test_unknown_layouts_use_the_full_parse(tmp_path):
    import tifffile

    path = tmp_path / "two-pages.tif"  # two full-size pages: not a pyramid the scanner knows
    img = texture(0, 0, 128, 128)
    tifffile.imwrite(path, np.stack([img, img]), photometric="rgb", tile=(64, 64), metadata=None)
    with pytest.raises(hs.SlideError, match="2 planes"):
        hs.open_slide(path)


def test_bigtiff_pyramid_opens_lazily(tmp_path):
    import tifffile

    path = tmp_path / "big.tif"
    img = texture(0, 0, 300, 500)
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(img, tile=(128, 128), photometric="rgb", resolution=(2e4, 2e4),
                 resolutionunit="CENTIMETER", metadata=None)  # fmt: skip
        tw.write(img[::2, ::2], tile=(128, 128), photometric="rgb", subfiletype=1, metadata=None)
    slide = hs.open_slide(path)
    assert slide._backend._handles["tif"] is None and len(slide.levels) == 2
    assert slide.mpp == pytest.approx(0.5)
    np.testing.assert_array_equal(slide.levels[0].compute(), img)
    np.testing.assert_array_equal(slide.levels[1].compute(), img[::2, ::2])
