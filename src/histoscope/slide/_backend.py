"""The one abstraction every slide format sits behind.

A backend knows its pyramid geometry and how to decode one native tile. It
knows nothing of dask, napari or resampling: :class:`histoscope.slide.Slide`
builds all of that on top.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: Value every pixel of an empty, transparent or unreadable tile takes.
BACKGROUND = 255


@dataclass(frozen=True)
class LevelInfo:
    """Geometry of one pyramid level.

    Attributes
    ----------
    shape
        ``(height, width)`` in pixels of this level.
    tile
        ``(tile_height, tile_width)``: the native chunk the file stores.
    downsample
        Level-0 pixels per pixel of this level (along x).
    """

    shape: tuple[int, int]
    tile: tuple[int, int]
    downsample: float


@dataclass
class SlideMetadata:
    """What a backend knows about a slide beyond its pixels."""

    vendor: str = "unknown"
    mpp: float | None = None
    magnification: float | None = None
    properties: dict[str, Any] = field(default_factory=dict)


class Backend:
    """Base class of slide backends.

    Subclasses set :attr:`levels`, :attr:`metadata` and implement
    :meth:`read_tile`. ``read_tile`` must be thread-safe: napari and dask read
    from several threads at once.
    """

    name = "base"
    #: Whether the tiles of one read may be decoded in parallel threads
    #: (true where decoding releases the GIL and ``read_tile`` is thread-safe).
    threaded_tiles = False
    #: Whether :class:`Slide` keeps recently decoded tiles (where decoding is the cost).
    cache_tiles = False

    def __init__(self, path: Path) -> None:
        self.path = path
        self.levels: list[LevelInfo] = []
        self.metadata = SlideMetadata()

    def read_tile(self, level: int, ty: int, tx: int) -> np.ndarray:
        """Decode tile ``(ty, tx)`` of ``level`` as ``(th, tw, 3)`` uint8.

        Edge tiles are returned cropped to the level's extent.
        """
        raise NotImplementedError

    def read_block(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray | None:
        """Optionally read an arbitrary block in one call (``None``: use tiles)."""
        return None

    def associated_images(self) -> dict[str, np.ndarray]:
        """Label, macro, thumbnail... as RGB arrays (may be empty)."""
        return {}

    def close(self) -> None:
        """Release file handles."""


def white_tile(h: int, w: int) -> np.ndarray:
    """An all-background RGB tile."""
    return np.full((h, w, 3), BACKGROUND, dtype=np.uint8)


def to_rgb_uint8(arr: np.ndarray) -> np.ndarray:
    """Bring a decoded tile to ``(h, w, 3)`` uint8 RGB, compositing alpha on white."""
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.integer):
            scale = np.iinfo(arr.dtype).max / 255.0
            arr = np.clip(arr / scale, 0, 255).astype(np.uint8)
        else:
            arr = np.clip(arr * (255.0 if arr.max(initial=0) <= 1 else 1.0), 0, 255)
            arr = arr.astype(np.uint8)
    c = arr.shape[-1]
    if c == 1:
        return np.repeat(arr, 3, axis=-1)
    if c == 2:  # grey + alpha
        arr = np.concatenate([np.repeat(arr[..., :1], 3, axis=-1), arr[..., 1:2]], axis=-1)
        c = 4
    if c >= 4:
        rgb = arr[..., :3].astype(np.uint16)
        alpha = arr[..., 3:4].astype(np.uint16)
        out = (rgb * alpha + BACKGROUND * (255 - alpha) + 127) // 255
        return out.astype(np.uint8)
    return np.ascontiguousarray(arr[..., :3])
