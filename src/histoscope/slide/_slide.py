""":class:`Slide`, a lazy dask pyramid with physical units, and :func:`open_slide`."""

from __future__ import annotations

import functools
import itertools
import os
import threading
import warnings
from collections import deque
from collections.abc import Callable
from functools import cached_property
from typing import Any, Literal

import numpy as np

import histoscope.slide._cache as _cache  # the budget is read when a slide opens
from histoscope.errors import HistoScopeWarning, SlideError
from histoscope.slide._backend import BACKGROUND, Backend, white_tile
from histoscope.slide._cache import TileCache
from histoscope.slide._levels import LevelStore, level_array
from histoscope.slide._open import open_backend

#: ``"raise"``: a bad tile raises :class:`SlideError`. ``"blank"``: it reads
#: as white and one :class:`HistoScopeWarning` is issued for the slide.
TileErrorPolicy = Literal["raise", "blank"]

_token = itertools.count()


@functools.cache
def _pool():
    """Threads that decode the tiles of one read in parallel (shared by all slides)."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max(2, os.cpu_count() or 2), thread_name_prefix="histoscope-tile")


def _run_shared(fn: Callable[[Any], None], items: list) -> None:
    """Call ``fn`` on every item, in this thread and in idle pool threads.

    The caller works through the items itself while up to ``cpu_count - 1``
    helpers take items from the same queue, so a read never waits for a busy
    pool: helpers that have not started by the time the caller runs out of
    items are cancelled. The first exception raised by ``fn`` is re-raised.
    """
    queue = deque(items)

    def drain() -> None:
        while True:
            try:
                item = queue.popleft()
            except IndexError:
                return
            fn(item)

    n_help = min(len(items) - 1, (os.cpu_count() or 2) - 1)
    helpers = [_pool().submit(drain) for _ in range(max(n_help, 1))]
    try:
        drain()
    except BaseException:
        queue.clear()  # helpers stop at their next item
        raise
    finally:
        for f in helpers:
            if not f.cancel():
                f.result()


class Slide:
    """A whole-slide image as a lazy pyramid with physical units.

    Use :func:`histoscope.open_slide` to create one.

    Attributes
    ----------
    path
        The file (or OME-Zarr directory) the slide was read from.
    levels
        ``list`` of dask arrays ``(Y, X, 3)`` uint8 RGB, largest first, chunked
        at the file's native tile size.
    mpp
        µm per level-0 pixel, or ``None`` when truly unknown.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        mpp: float | None = None,
        on_tile_error: TileErrorPolicy = "raise",
        on_warning: Callable[[str], None] | None = None,
    ) -> None:
        if on_tile_error not in ("raise", "blank"):
            raise ValueError(f"on_tile_error must be 'raise' or 'blank', not {on_tile_error!r}")
        if mpp is not None and not (mpp > 0 and np.isfinite(mpp)):
            raise ValueError(f"mpp must be a positive number of µm per pixel, not {mpp!r}")
        self._backend = backend
        self.path = backend.path
        self.mpp: float | None = mpp if mpp is not None else backend.metadata.mpp
        self._user_mpp = mpp
        budget = _cache.TILE_CACHE_BYTES
        self._cache = TileCache(budget) if backend.cache_tiles and budget > 0 else None
        self.on_tile_error: TileErrorPolicy = on_tile_error
        self._on_warning = on_warning
        self._bad_tiles: set[tuple[int, int, int]] = set()
        self._lock = threading.Lock()
        self._name = f"histoscope-{next(_token)}"

    # ----------------------------------------------------------------- pyramid
    @cached_property
    def levels(self) -> list:
        """Lazy dask arrays, one per pyramid level, largest first."""
        return [
            level_array(LevelStore(self, i), f"{self._name}-L{i}")
            for i in range(len(self._backend.levels))
        ]

    @property
    def level_downsamples(self) -> list[float]:
        """Level-0 pixels per pixel of each level."""
        return [lvl.downsample for lvl in self._backend.levels]

    @property
    def dimensions(self) -> tuple[int, int]:
        """``(width, height)`` of level 0, as OpenSlide orders it."""
        h, w = self._backend.levels[0].shape
        return w, h

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` of level 0."""
        return self._backend.levels[0].shape

    @property
    def vendor(self) -> str:
        return self._backend.metadata.vendor

    @property
    def backend(self) -> str:
        """Name of the reader behind this slide (tifffile, openslide, ome-zarr, image)."""
        return self._backend.name

    @property
    def magnification(self) -> float | None:
        """Objective power from the file, or estimated as ``10 / mpp`` (0.25 µm/px -> 40x)."""
        mag = self._backend.metadata.magnification
        if mag is None and self.mpp:
            mag = round(10.0 / self.mpp, 1)
        return mag

    @property
    def properties(self) -> dict[str, Any]:
        """Vendor properties as the file states them."""
        return dict(self._backend.metadata.properties)

    @cached_property
    def associated_images(self) -> dict[str, np.ndarray]:
        """Label, macro and thumbnail images stored in the file, as RGB arrays."""
        return self._backend.associated_images()

    @property
    def metadata(self) -> dict[str, Any]:
        """Plain-data summary carried on napari layers and in outputs."""
        return {
            "path": str(self.path),
            "vendor": self.vendor,
            "backend": self.backend,
            "mpp": self.mpp,
            "magnification": self.magnification,
            "dimensions": self.dimensions,
            "level_downsamples": self.level_downsamples,
        }

    # ------------------------------------------------------------------ reading
    def _tile(self, level: int, ty: int, tx: int) -> np.ndarray:
        """One decoded tile (read-only when it comes from the cache)."""
        cache = self._cache
        if cache is not None and (tile := cache.get((level, ty, tx))) is not None:
            return tile
        try:
            tile = self._backend.read_tile(level, ty, tx)
        except Exception as exc:
            msg = f"{self.path}: tile ({ty}, {tx}) of level {level} cannot be decoded ({exc})"
            if self.on_tile_error == "raise":
                raise SlideError(msg, path=self.path, damaged=True) from exc
            self._note_bad_tile((level, ty, tx), msg)
            info = self._backend.levels[level]
            th, tw = info.tile
            return white_tile(min(th, info.shape[0] - ty * th), min(tw, info.shape[1] - tx * tw))
        if cache is not None:
            cache.put((level, ty, tx), tile)
        return tile

    def _note_bad_tile(self, key: tuple[int, int, int], msg: str) -> None:
        with self._lock:
            first = not self._bad_tiles
            self._bad_tiles.add(key)
        if first:  # one warning per slide, never a flood
            text = f"{msg}; it and any further bad tiles are shown blank"
            if self._on_warning is not None:
                self._on_warning(text)
            else:
                warnings.warn(text, HistoScopeWarning, stacklevel=3)

    @property
    def bad_tiles(self) -> int:
        """How many tiles failed to decode so far (``on_tile_error="blank"``)."""
        return len(self._bad_tiles)

    def _read_level(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Read ``[y0:y1, x0:x1]`` of a level (clipped to its extent).

        Backends with a block reader (OpenSlide, Zarr, in-memory images) read
        the block in one call; if that fails, the block is re-read tile by tile
        so only the bad tiles are reported (or blanked). Tiled backends decode
        the block's tiles in parallel threads (the codecs release the GIL).
        """
        try:
            block = self._backend.read_block(level, y0, y1, x0, x1)
        except Exception:
            block = None
        if block is not None:
            return block
        th, tw = self._backend.levels[level].tile
        # White, not np.empty: a tile that decodes short must not leave garbage.
        out = np.full((max(y1 - y0, 0), max(x1 - x0, 0), 3), BACKGROUND, dtype=np.uint8)
        tiles = [
            (ty, tx) for ty in range(y0 // th, -(-y1 // th)) for tx in range(x0 // tw, -(-x1 // tw))
        ]

        def paste(t: tuple[int, int]) -> None:
            ty, tx = t
            tile = self._tile(level, ty, tx)
            ty0, tx0 = ty * th, tx * tw
            sy0, sy1 = max(y0, ty0), min(y1, ty0 + tile.shape[0])
            sx0, sx1 = max(x0, tx0), min(x1, tx0 + tile.shape[1])
            out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = tile[
                sy0 - ty0 : sy1 - ty0, sx0 - tx0 : sx1 - tx0
            ]

        if len(tiles) < 2 or not self._backend.threaded_tiles:
            for t in tiles:
                paste(t)
        else:
            _run_shared(paste, tiles)
        return out

    def best_level(self, downsample: float) -> int:
        """The smallest level still at least as detailed as ``downsample``."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= downsample * 1.001:
                best = i
        return best

    def read_region(
        self, x: int, y: int, w: int, h: int, mpp: float | None = None, *, level: int | None = None
    ) -> np.ndarray:
        """Read a region at a target resolution.

        Parameters
        ----------
        x, y
            Top-left corner in level-0 pixels (may lie outside the slide:
            the outside reads as white background).
        w, h
            Output size in pixels at the requested resolution.
        mpp
            Target µm per pixel. ``None`` reads at level-0 resolution.
        level
            Read this level's native resolution instead of ``mpp``.

        Returns
        -------
        numpy.ndarray
            ``(h, w, 3)`` uint8 RGB.
        """
        if w <= 0 or h <= 0:
            raise ValueError(f"region size must be positive, got w={w}, h={h}")
        if level is not None:
            factor = self.level_downsamples[level]
        elif mpp is None:
            factor = 1.0
        else:
            if not self.mpp:
                raise SlideError(
                    f"{self.path}: the slide has no µm/px, so mpp={mpp} cannot be honoured; "
                    "pass mpp= to open_slide",
                    path=self.path,
                    mpp_unknown=True,
                )
            if not mpp > 0:
                raise ValueError(f"mpp must be positive, got {mpp}")
            factor = mpp / self.mpp
        lvl = level if level is not None else self.best_level(factor)
        ds = self.level_downsamples[lvl]
        scale = factor / ds  # level pixels per output pixel
        lx0, ly0 = x / ds, y / ds
        lx1, ly1 = lx0 + w * scale, ly0 + h * scale
        ix0, iy0 = int(np.floor(lx0)), int(np.floor(ly0))
        ix1, iy1 = int(np.ceil(lx1)), int(np.ceil(ly1))
        region = self._padded(lvl, iy0, iy1, ix0, ix1)
        if abs(scale - 1.0) < 1e-6 and ix0 == lx0 and iy0 == ly0:
            return region[:h, :w]
        from PIL import Image

        box = (lx0 - ix0, ly0 - iy0, lx1 - ix0, ly1 - iy0)
        resample = Image.Resampling.BOX if scale > 1 else Image.Resampling.BILINEAR
        img = Image.fromarray(region).resize((w, h), resample=resample, box=box)
        return np.array(img)  # writable, like every other read

    def _padded(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        lh, lw = self._backend.levels[level].shape
        cy0, cy1, cx0, cx1 = max(y0, 0), min(y1, lh), max(x0, 0), min(x1, lw)
        if cy0 == y0 and cx0 == x0 and cy1 == y1 and cx1 == x1:
            return self._read_level(level, y0, y1, x0, x1)
        out = np.full((y1 - y0, x1 - x0, 3), 255, dtype=np.uint8)
        if cy1 > cy0 and cx1 > cx0:
            out[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = self._read_level(
                level, cy0, cy1, cx0, cx1
            )
        return out

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """An RGB overview whose longer side is ``max_size`` pixels (or less)."""
        h0, w0 = self.shape
        factor = max(h0, w0) / max_size
        if factor <= 1:
            return self._read_level(0, 0, h0, 0, w0)
        w, h = max(1, round(w0 / factor)), max(1, round(h0 / factor))
        lvl = self.best_level(factor)
        lh, lw = self._backend.levels[lvl].shape
        region = self._read_level(lvl, 0, lh, 0, lw)
        if (lh, lw) == (h, w):
            return region
        from PIL import Image

        return np.array(Image.fromarray(region).resize((w, h), Image.Resampling.BOX))

    # ---------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Release the file; the slide cannot be read afterwards."""
        if self._cache is not None:
            self._cache.clear()
        self._backend.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self):
        """Pickle as "open this path again" (file handles never travel).

        So level arrays can be shipped to ``dask.distributed`` workers that see
        the same file system. An ``on_warning`` callback is not carried over.
        """
        kwargs = {"mpp": self._user_mpp, "on_tile_error": self.on_tile_error}
        return (functools.partial(open_slide, **kwargs), (str(self.path),))

    def __repr__(self) -> str:
        w, h = self.dimensions
        return (
            f"Slide({str(self.path)!r}, {w}x{h}, levels={len(self._backend.levels)}, "
            f"mpp={self.mpp}, backend={self.backend!r})"
        )


def open_slide(
    path: str | os.PathLike,
    *,
    mpp: float | None = None,
    on_tile_error: TileErrorPolicy = "raise",
    on_warning: Callable[[str], None] | None = None,
) -> Slide:
    """Open a whole-slide image (or a plain image) as a :class:`Slide`.

    Parameters
    ----------
    path
        SVS, NDPI, MRXS, SCN, BIF, Philips TIFF, DICOM, generic tiled TIFF,
        OME-TIFF, an OME-Zarr directory, or a PNG/JPEG/TIFF image.
    mpp
        µm per level-0 pixel; overrides what the file says (needed for plain
        images, which carry none).
    on_tile_error
        ``"raise"`` (default): reading a corrupt tile raises :class:`SlideError`.
        ``"blank"``: the tile reads as white and one warning is issued.
    on_warning
        Called with the warning text instead of :func:`warnings.warn`
        (napari uses this to show one notification).

    Raises
    ------
    SlideError
        With the path and the reason: missing, empty, truncated, unsupported
        or unreadable file.
    """
    backend = open_backend(path)
    return Slide(backend, mpp=mpp, on_tile_error=on_tile_error, on_warning=on_warning)
