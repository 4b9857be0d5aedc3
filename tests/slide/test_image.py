"""Plain images (PNG, JPEG, untiled TIFF): one level, white where transparent."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import histoscope as hs
from tests.slide.conftest import texture


@dataclass(frozen=True)
class ModeCase:
    id: str
    mode: str
    suffix: str


MODES = [
    ModeCase("rgba-png", "RGBA", ".png"),
    ModeCase("grey-alpha-png", "LA", ".png"),
    ModeCase("palette-png", "P", ".png"),
    ModeCase("grey-png", "L", ".png"),
    ModeCase("bmp", "RGB", ".bmp"),
]


@pytest.mark.parametrize("case", MODES, ids=lambda c: c.id)
def test_image_modes_become_rgb_with_transparency_white(case, tmp_path):
    rgb = texture(0, 0, 120, 160)
    img = Image.fromarray(rgb).convert(case.mode)
    if "A" in case.mode:
        alpha = np.full((120, 160), 255, np.uint8)
        alpha[:, :40] = 0
        img.putalpha(Image.fromarray(alpha))
    path = tmp_path / f"im{case.suffix}"
    img.save(path)
    slide = hs.open_slide(path)
    got = slide.levels[0].compute()
    assert got.shape == (120, 160, 3) and got.dtype == np.uint8
    ref = np.asarray(img.convert("RGB"))
    if "A" in case.mode:
        assert (got[:, :40] == 255).all()
        np.testing.assert_array_equal(got[:, 40:], ref[:, 40:])
    else:
        np.testing.assert_array_equal(got, ref)
    assert slide.mpp is None and len(slide.levels) == 1


def test_image_larger_than_one_chunk_is_chunked(tmp_path):
    rgb = texture(0, 0, 1500, 1100)
    path = tmp_path / "big.png"
    Image.fromarray(rgb).save(path)
    slide = hs.open_slide(path, mpp=1.0)
    assert slide.levels[0].chunksize == (1024, 1024, 3)
    np.testing.assert_array_equal(slide.levels[0].compute(), rgb)
    np.testing.assert_array_equal(slide.read_region(1000, 1400, 200, 200)[:100, :100],
                                  rgb[1400:, 1000:1100])  # fmt: skip
    assert (slide.read_region(1000, 1400, 200, 200)[100:] == 255).all()


def test_thumbnail_of_small_image_is_the_image(png, small_image):
    np.testing.assert_array_equal(hs.open_slide(png).thumbnail(1024), small_image)


def test_array_backend_wraps_numpy_and_zarr_at_their_chunking():
    import zarr

    from histoscope.slide import Slide
    from histoscope.slide._image import ArrayBackend

    rgb = texture(0, 0, 1500, 1100)
    z = zarr.create_array(store={}, shape=rgb.shape, chunks=(256, 256, 3), dtype=np.uint8)
    z[:] = rgb
    for source, chunks in ((rgb, (1024, 1024, 3)), (z, (256, 256, 3))):
        backend = ArrayBackend(Path("layer"), [source])
        assert backend.arrays[0].chunksize == chunks
        slide = Slide(backend, mpp=0.5)
        assert slide.levels[0].chunksize == chunks and slide.mpp == 0.5
        np.testing.assert_array_equal(slide.read_region(1000, 1400, 100, 100),
                                      rgb[1400:, 1000:])  # fmt: skip
        np.testing.assert_array_equal(slide.levels[0][:300, :200].compute(), rgb[:300, :200])


def test_array_backend_refuses_what_is_not_an_rgb_image():
    from histoscope.errors import SlideError
    from histoscope.slide._image import ArrayBackend

    for levels in ([], [np.zeros((5, 5), np.uint8)], [np.zeros((0, 5, 3), np.uint8)]):
        with pytest.raises(SlideError, match="layer"):
            ArrayBackend(Path("layer"), levels)
