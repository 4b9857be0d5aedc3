"""Pyramid levels as dask arrays chunked at the native tile size.

A level is an ordinary dask array: each chunk is one native tile, so lazy
reductions, ``map_blocks``, ``blocks`` and pickling work as usual.

Small windows are the common case (napari asks for the visible part of one
level, models ask for one patch), and for them dask's per-task cost (building,
ordering and running one task per tile plus a concatenation) is several times
the cost of decoding the tiles. So slicing a level with plain step-1 slices,
up to :data:`FAST_SLICE_PIXELS` pixels, returns a dask array of *one* task that
reads the window straight from the slide (decoding its tiles in parallel).
Anything else - larger slices, steps, fancy indexing, every other dask
operation - goes through dask unchanged. Such windows bypass dask callbacks,
napari's opportunistic dask cache included; the slide's own decoded-tile cache
(:mod:`._cache`) is what saves work when napari pans over tiles it has shown.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from histoscope.slide._slide import Slide

#: Windows up to this many pixels are read as one task (16 MP, 48 MB of RGB).
FAST_SLICE_PIXELS = 4096 * 4096


class LevelStore:
    """Array-like view of one level that dask slices; decodes only the tiles needed."""

    def __init__(self, slide: Slide, level: int) -> None:
        info = slide._backend.levels[level]
        self._slide = slide
        self.level = level
        self.shape = (*info.shape, 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3
        self.tile = info.tile

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        ys, xs = (list(key) + [slice(None), slice(None)])[:2]
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        out = self._slide._read_level(self.level, y0, y1, x0, x1)
        return out[(slice(None), slice(None), *key[2:])] if len(key) > 2 else out


def _read_window(store: LevelStore, y0: int, y1: int, x0: int, x1: int, c: slice) -> np.ndarray:
    return store[y0:y1, x0:x1, c]


def _plain_window(key: object, shape: tuple[int, ...]) -> tuple[int, int, int, int, slice] | None:
    """``(y0, y1, x0, x1, channels)`` when ``key`` is a small step-1 window, else ``None``."""
    if not isinstance(key, tuple):
        key = (key,)
    if len(key) > 3 or not all(isinstance(k, slice) for k in key):
        return None
    key = key + (slice(None),) * (3 - len(key))
    bounds = []
    for k, n in zip(key[:2], shape[:2], strict=True):
        if k.step not in (None, 1):
            return None
        start, stop, _ = k.indices(n)
        if stop <= start:
            return None
        bounds += [start, stop]
    y0, y1, x0, x1 = bounds
    if (y1 - y0) * (x1 - x0) > FAST_SLICE_PIXELS:
        return None
    return y0, y1, x0, x1, key[2]


@functools.cache
def _level_array_class():
    import dask.array as da
    from dask.highlevelgraph import HighLevelGraph
    from dask.local import get_sync

    class WindowArray(da.Array):
        """One window of a level, read by a single task.

        The task already decodes its tiles in parallel, so it runs in the
        calling thread (no thread-pool hop) and its one-node graph needs no
        optimisation. ``compute()`` and ``numpy.asarray`` call the task
        directly: dask's machinery around one task costs about as much as
        decoding a 512 x 512 window. ``dask.compute(...)`` and ``persist``
        still take the ordinary route.
        """

        __slots__ = ()
        __dask_scheduler__ = staticmethod(get_sync)

        @staticmethod
        def __dask_optimize__(dsk, keys, **kwargs):
            return dsk

        def compute(self, **kwargs):
            return self._hs_read()

        def __array__(self, dtype=None, copy=None):
            out = self._hs_read()
            return out if dtype is None else out.astype(dtype, copy=False)

    class LevelArray(da.Array):
        """A tile-chunked level whose small step-1 windows are read as one task."""

        __slots__ = ()

        def __getitem__(self, index):
            window = _plain_window(index, self.shape)
            store = getattr(self, "_hs_store", None)
            if window is None or store is None:
                return super().__getitem__(index)
            y0, y1, x0, x1, c = window
            nc = len(range(*c.indices(3)))
            key = f"{self.name}-{y0}-{y1}-{x0}-{x1}-{c.start}-{c.stop}-{c.step}"
            graph = {(key, 0, 0, 0): (_read_window, store, y0, y1, x0, x1, c)}
            hlg = HighLevelGraph.from_collections(key, graph, dependencies=())
            out = WindowArray(hlg, key, ((y1 - y0,), (x1 - x0,), (nc,)), meta=self._meta)
            out._hs_read = functools.partial(_read_window, store, y0, y1, x0, x1, c)
            return out

    return LevelArray


def level_array(store: LevelStore, name: str):
    """The dask array of one level (tile-chunked; small windows read as one task)."""
    import dask.array as da

    base = da.from_array(
        store, chunks=(*store.tile, 3), name=name, asarray=False, fancy=False, lock=False,
        inline_array=True,
    )  # fmt: skip
    arr = _level_array_class()(base.dask, base.name, base.chunks, meta=base._meta)
    arr._hs_store = store
    return arr
