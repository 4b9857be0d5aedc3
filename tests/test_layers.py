"""Layer data tuples and the slides behind image layers from other readers."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import pytest

from histoscope.errors import SlideError
from histoscope.layers import SLIDE_KEY, layer_mpp, layer_slide, slide_layer
from histoscope.slide import Slide
from tests.conftest import make_rgb


class ChunkLog:
    """A dask array whose chunks record themselves when read (and only then)."""

    def __init__(self, shape: tuple[int, int, int], chunk: int) -> None:
        import dask.array as da

        self.read: list[tuple[int, int]] = []
        self._lock = threading.Lock()
        base = da.zeros(shape, dtype=np.uint8, chunks=(chunk, chunk, shape[-1]))
        self.array = base.map_blocks(self._record, dtype=np.uint8)

    def _record(self, block: np.ndarray, block_info=None) -> np.ndarray:
        with self._lock:
            self.read.append(tuple(block_info[None]["chunk-location"][:2]))
        return block + 7  # not the zeros of the base, so the read is checked too


def test_dask_layer_becomes_slide_without_reading_it():
    log = ChunkLog((20_000, 20_000, 3), chunk=1000)
    slide = layer_slide(log.array, {}, (1.0, 1.0), "big", units=("pixel", "pixel"))
    assert slide.shape == (20_000, 20_000) and slide.backend == "array"
    assert slide.levels[0].chunksize == (1000, 1000, 3)
    assert log.read == []
    region = slide.read_region(1990, 10, 20, 30)  # straddles chunks (0, 1) and (0, 2)
    assert region.shape == (30, 20, 3) and (region == 7).all()
    assert sorted(set(log.read)) == [(0, 1), (0, 2)]
    region[:] = 0  # the caller owns what it reads
    assert (slide.read_region(1990, 10, 20, 30) == 7).all()


def test_multiscale_layer_keeps_its_levels_lazily():
    log = ChunkLog((4096, 6144, 4), chunk=512)
    levels = [log.array, log.array[::2, ::2], log.array[::4, ::4]]
    slide = layer_slide(levels, {}, (0.25, 0.25), "pyr", units=("um", "um"))
    assert slide.level_downsamples == [1.0, 2.0, 4.0] and slide.mpp == 0.25
    assert log.read == []
    assert slide.read_region(0, 0, 16, 16, mpp=1.0).shape == (16, 16, 3)  # RGBA -> RGB
    assert set(log.read) == {(0, 0)}  # from level 2: one source chunk


def test_rgba_numpy_layer_composites_alpha_on_white_and_stays_unchanged():
    rgba = np.zeros((40, 50, 4), np.uint8)
    rgba[..., :3] = make_rgb(40, 50)
    rgba[:, 25:, 3] = 255
    slide = layer_slide(rgba, {}, (1, 1), "rgba")
    got = slide.read_region(0, 0, 50, 40)
    assert (got[:, :25] == 255).all()
    np.testing.assert_array_equal(got[:, 25:], rgba[:, 25:, :3])
    got[:] = 0
    assert rgba[..., :3].any()


def test_not_rgb_layer_is_refused():
    with pytest.raises(ValueError, match="grey"):
        layer_slide(np.zeros((10, 10), np.uint8), {}, (1, 1), "grey")


def test_layer_that_holds_a_slide_gives_that_slide(pyramid_tiff):
    from histoscope.slide import open_slide

    slide = open_slide(pyramid_tiff)
    data, kwargs, _ = slide_layer(slide)
    assert layer_slide(data, kwargs["metadata"], (9, 9), "x") is slide
    assert kwargs["metadata"][SLIDE_KEY]["mpp"] == pytest.approx(0.5)


@dataclass(frozen=True)
class MppCase:
    id: str
    scale: tuple
    units: tuple | None
    metadata: dict
    mpp: float | None


MPP_CASES = [
    MppCase("default-scale-pixel-units", (1.0, 1.0), ("pixel", "pixel"), {}, None),
    MppCase("default-scale-no-units", (1.0, 1.0), None, {}, None),
    MppCase("um-units", (0.25, 0.25), ("um", "um"), {}, 0.25),
    MppCase("micrometer-unit-one", (1.0, 1.0), ("micrometer", "micrometer"), {}, 1.0),
    MppCase("nm-units", (500.0, 500.0), ("nanometer", "nanometer"), {}, 0.5),
    MppCase("explicit-scale-pixel-units", (0.5, 0.5), ("pixel", "pixel"), {}, 0.5),
    MppCase("reader-metadata", (1.0, 1.0), None, {"mpp": 0.34}, 0.34),
    MppCase("slide-summary", (1.0, 1.0), None, {SLIDE_KEY: {"mpp": 0.5}}, 0.5),
    MppCase("summary-without-mpp", (1.0, 1.0), None, {SLIDE_KEY: {"mpp": None}}, None),
]


@pytest.mark.parametrize("case", MPP_CASES, ids=lambda c: c.id)
def test_mpp_comes_from_the_layer_or_stays_unknown(case):
    assert layer_mpp(case.scale, case.units, case.metadata) == pytest.approx(case.mpp)
    rgb = np.zeros((8, 8, 3), np.uint8)
    slide = layer_slide(rgb, case.metadata, case.scale, "x", units=case.units)
    assert slide.mpp == pytest.approx(case.mpp)


def test_pint_units_of_napari_layers():
    from napari.layers import Image

    rgb = np.zeros((8, 8, 3), np.uint8)
    plain = Image(rgb, rgb=True)
    assert layer_slide(plain.data, plain.metadata, plain.scale, "p", units=plain.units).mpp is None
    um = Image(rgb, rgb=True, scale=(0.25, 0.25), units=("um", "um"))
    assert layer_slide(um.data, um.metadata, um.scale, "u", units=um.units).mpp == 0.25
    mm = Image(rgb, rgb=True, scale=(0.001, 0.001), units=("millimeter", "millimeter"))
    assert layer_mpp(mm.scale, mm.units) == pytest.approx(1.0)
    multi = Image([np.zeros((64, 64, 3), np.uint8), rgb], rgb=True, multiscale=True)
    assert layer_slide(multi.data, {}, multi.scale, "m").level_downsamples == [1.0, 8.0]


def test_unknown_mpp_is_refused_by_a_read_at_mpp():
    slide = layer_slide(np.zeros((8, 8, 3), np.uint8), {}, (1, 1), "x")
    assert isinstance(slide, Slide) and slide.mpp is None
    with pytest.raises(SlideError, match="µm/px"):
        slide.read_region(0, 0, 4, 4, mpp=0.5)
