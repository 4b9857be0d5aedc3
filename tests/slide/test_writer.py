"""``write_pyramidal_tiff``: pyramids both readers take, written atomically."""

from __future__ import annotations

import numpy as np
import pytest

import histoscope as hs
from histoscope.slide import write_pyramidal_tiff
from histoscope.slide._openslide import OpenSlideBackend
from histoscope.slide._slide import Slide
from tests.slide.conftest import texture


def test_render_function_pyramid_with_progress(tmp_path):
    calls: list[tuple[int, int]] = []
    path = write_pyramidal_tiff(tmp_path / "r.tif", texture, mpp=0.25, shape=(700, 1000),
                                tile=128, min_size=200, progress=lambda d, t: calls.append((d, t)))  # fmt: skip
    assert not list(tmp_path.glob(".*.part*")) and not list(tmp_path.glob(".histoscope-*"))
    slide = hs.open_slide(path)
    assert [lv.shape[:2] for lv in slide.levels] == [(700, 1000), (350, 500), (175, 250),
                                                      (87, 125)]  # fmt: skip
    assert slide.mpp == pytest.approx(0.25) and slide.levels[0].chunksize == (128, 128, 3)
    assert calls[-1][0] == calls[-1][1] == len(calls)
    ref = Slide(OpenSlideBackend(path))
    assert [lv.shape for lv in ref.levels] == [lv.shape for lv in slide.levels]
    assert ref.mpp == pytest.approx(0.25)
    img = texture(0, 0, 700, 1000)
    assert np.abs(slide.levels[0].compute().astype(np.int16) - img).mean() < 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"source": np.zeros((10, 10), np.uint8)}, "source array"),
     ({"source": texture}, "shape"),
     ({"tile": 100}, "multiple of 16"),
     ({"mpp": 0}, "mpp")],
    ids=["2d-array", "function-without-shape", "tile-100", "mpp-0"],
)  # fmt: skip
def test_invalid_arguments(tmp_path, kwargs, match):
    args = {"source": np.zeros((64, 64, 3), np.uint8), "mpp": 0.5, **kwargs}
    with pytest.raises(ValueError, match=match):
        write_pyramidal_tiff(tmp_path / "x.tif", **args)
    assert not list(tmp_path.iterdir())


def test_render_returning_wrong_shape_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="render returned"):
        write_pyramidal_tiff(tmp_path / "x.tif", lambda y, x, h, w: np.zeros((1, 1, 3), np.uint8),
                             mpp=0.5, shape=(64, 64))  # fmt: skip
    assert not list(tmp_path.iterdir())
