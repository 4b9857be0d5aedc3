"""Level dask arrays: tile chunks, and small windows read as one task."""

from __future__ import annotations

from dataclasses import dataclass

import dask.array as da
import numpy as np
import pytest

import histoscope as hs
from histoscope.slide import _levels
from tests.slide.conftest import TILE


@dataclass(frozen=True)
class IndexCase:
    id: str
    index: tuple
    one_task: bool


INDEXES = [
    IndexCase("window", np.s_[100:400, 250:777], True),
    IndexCase("window-channels", np.s_[100:400, 250:777, 1:], True),
    IndexCase("negative-bounds", np.s_[-300:-5, -7:], True),
    IndexCase("rows-only", np.s_[10:20], True),
    IndexCase("step", np.s_[::3, 5:900:2], False),
    IndexCase("int-row", np.s_[7], False),
    IndexCase("ellipsis", np.s_[..., 0], False),
    IndexCase("empty", np.s_[10:10, :], False),
]


@pytest.mark.parametrize("case", INDEXES, ids=lambda c: c.id)
def test_indexing_matches_numpy(ome_zarr, image0, case):
    level = hs.open_slide(ome_zarr).levels[0]
    got = level[case.index]
    assert (len(got.__dask_graph__()) == 1) is case.one_task
    np.testing.assert_array_equal(got.compute(), image0[case.index])
    np.testing.assert_array_equal(np.asarray(got), image0[case.index])


def test_large_windows_keep_tile_chunks(ome_zarr, image0, monkeypatch):
    monkeypatch.setattr(_levels, "FAST_SLICE_PIXELS", 1000)
    level = hs.open_slide(ome_zarr).levels[0]
    window = level[0:600, 0:700]
    assert window.chunksize == (TILE, TILE, 3) and len(window.__dask_graph__()) > 1
    np.testing.assert_array_equal(window.compute(), image0[:600, :700])


def test_levels_are_ordinary_tile_chunked_dask_arrays(tiled_tiff):
    slide = hs.open_slide(tiled_tiff)
    level = slide.levels[0]
    assert isinstance(level, da.Array) and level.chunksize == (TILE, TILE, 3)
    assert level.numblocks == (5, 6, 1)
    block = level.blocks[1, 2].compute()
    np.testing.assert_array_equal(block, slide.read_region(2 * TILE, TILE, TILE, TILE))
    mean = level.mean(axis=(0, 1)).compute()
    np.testing.assert_allclose(mean, level.compute().mean(axis=(0, 1)), rtol=1e-6)


def test_windows_of_two_slides_never_share_keys(tiled_tiff):
    a = hs.open_slide(tiled_tiff).levels[0][:50, :50]
    b = hs.open_slide(tiled_tiff).levels[0][:50, :50]
    assert a.name != b.name
    np.testing.assert_array_equal(*da.compute(a, b))


def test_dask_compute_takes_the_ordinary_route_with_same_pixels(tiled_tiff):
    level = hs.open_slide(tiled_tiff).levels[0]
    window = level[100:400, 250:777]
    (via_dask,) = da.compute(window)
    np.testing.assert_array_equal(via_dask, window.compute())
    np.testing.assert_array_equal((window + 0).compute(), window.compute())


@pytest.mark.parametrize("fixture", ["tiled_tiff", "ome_zarr", "png"])
def test_slides_and_levels_pickle_by_path(request, fixture):
    import pickle

    slide = hs.open_slide(request.getfixturevalue(fixture), mpp=0.7, on_tile_error="blank")
    again = pickle.loads(pickle.dumps(slide))
    assert (again.path, again.mpp, again.on_tile_error) == (slide.path, 0.7, "blank")
    level = pickle.loads(pickle.dumps(slide.levels[0]))
    np.testing.assert_array_equal(level[:50, :60].compute(), slide.levels[0][:50, :60].compute())
    np.testing.assert_array_equal(level.compute(), slide.levels[0].compute())
