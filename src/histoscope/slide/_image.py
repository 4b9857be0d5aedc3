"""Plain images (PNG, JPEG, BMP, untiled TIFF) and array data from other readers.

:class:`ImageBackend` decodes a plain image file once and holds it in memory.
:class:`ArrayBackend` wraps arrays that already exist (a napari layer's data:
numpy, dask or zarr, one per level) without reading them: a read slices the
arrays, so only the chunks a window touches are ever loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histoscope.errors import SlideError
from histoscope.slide._backend import Backend, LevelInfo, SlideMetadata, to_rgb_uint8

#: Larger plain images should be converted to a pyramidal TIFF first.
MAX_PIXELS = 40_000 * 40_000
_CHUNK = 1024


class ImageBackend(Backend):
    """A single-level image decoded once at open."""

    name = "image"

    def __init__(self, path: Path, array: np.ndarray | None = None) -> None:
        super().__init__(path)
        if array is None:
            array = _decode(path)
        self._arr = to_rgb_uint8(np.asarray(array))
        h, w = self._arr.shape[:2]
        if h == 0 or w == 0:
            raise SlideError(f"{path}: image has no pixels", path=path, damaged=True)
        self.levels = [
            LevelInfo(shape=(h, w), tile=(min(h, _CHUNK), min(w, _CHUNK)), downsample=1.0)
        ]
        self.metadata = SlideMetadata(vendor="image")

    def read_tile(self, level: int, ty: int, tx: int) -> np.ndarray:
        th, tw = self.levels[0].tile
        return self._arr[ty * th : (ty + 1) * th, tx * tw : (tx + 1) * tw].copy()

    def read_block(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return self._arr[y0:y1, x0:x1].copy()  # a caller may write into what it gets


class ArrayBackend(Backend):
    """Levels given as array-likes ``(Y, X, 3 or 4)``, largest first, read lazily.

    Each level is kept as a dask array (numpy and zarr arrays are wrapped at
    their own chunking, never copied or computed); reading a block computes
    only the chunks it overlaps. An alpha channel is composited onto white per
    block, like every other backend's tiles.
    """

    name = "array"

    def __init__(self, path: Path, levels: Sequence[Any]) -> None:
        super().__init__(path)
        if not len(levels):
            raise SlideError(f"{path}: no image data", path=path, damaged=True)
        self._arrays = [_as_dask(a) for a in levels]
        for arr in self._arrays:
            if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
                raise SlideError(f"{path}: not an RGB(A) image (shape {arr.shape})", path=path)
            if arr.shape[0] == 0 or arr.shape[1] == 0:
                raise SlideError(f"{path}: image has no pixels", path=path, damaged=True)
        base_w = self._arrays[0].shape[1]
        for arr in self._arrays:
            h, w = arr.shape[:2]
            tile = (arr.chunks[0][0], arr.chunks[1][0])  # the source's own chunking
            self.levels.append(LevelInfo(shape=(h, w), tile=tile, downsample=base_w / w))
        self.metadata = SlideMetadata(vendor="array")

    @property
    def arrays(self) -> list:
        """The source levels as (uncomputed) dask arrays."""
        return list(self._arrays)

    def read_block(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        if y1 <= y0 or x1 <= x0:  # dask asks for an empty slice to learn the dtype
            return np.empty((max(y1 - y0, 0), max(x1 - x0, 0), 3), dtype=np.uint8)
        out = to_rgb_uint8(np.asarray(self._arrays[level][y0:y1, x0:x1].compute()))
        # A caller may write into what it gets: never hand out a view of the source.
        return out.copy() if out.base is not None or not out.flags.writeable else out

    def read_tile(self, level: int, ty: int, tx: int) -> np.ndarray:
        info = self.levels[level]
        th, tw = info.tile
        return self.read_block(level, ty * th, min((ty + 1) * th, info.shape[0]),
                               tx * tw, min((tx + 1) * tw, info.shape[1]))  # fmt: skip


def _as_dask(arr: Any):
    """``arr`` as a dask array, without reading it (numpy at :data:`_CHUNK` tiles)."""
    import dask.array as da

    if isinstance(arr, da.Array):
        return arr
    if not hasattr(arr, "shape") or not hasattr(arr, "dtype"):
        arr = np.asarray(arr)
    chunks = getattr(arr, "chunks", None)
    if not (isinstance(chunks, tuple) and len(chunks) == len(arr.shape)):
        chunks = tuple(min(n, _CHUNK) for n in arr.shape[:2]) + tuple(arr.shape[2:])
    # name=False: a random name instead of hashing every pixel of the source.
    return da.from_array(arr, chunks=chunks, name=False, lock=False)


def _decode(path: Path) -> np.ndarray:
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        try:
            return tifffile.imread(path, key=0)
        except Exception as exc:
            raise SlideError(
                f"{path}: not a readable TIFF image ({exc})", path=path, damaged=True
            ) from exc
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("RGB", "RGBA", "L", "LA"):
                im = im.convert("RGBA")
            return np.asarray(im)
    except Exception as exc:
        raise SlideError(f"{path}: not a readable image ({exc})", path=path, damaged=True) from exc
