"""A small, thread-safe LRU of decoded tiles, bounded in bytes.

napari asks for overlapping windows while the user pans and zooms; keeping
recently decoded tiles saves decoding them again (OpenSlide keeps a similar
cache of its own).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable

import numpy as np

#: Default budget per slide (about 340 RGB tiles of 256 x 256).
TILE_CACHE_BYTES = 64 * 2**20


class TileCache:
    """Least-recently-used decoded tiles; arrays are stored read-only."""

    def __init__(self, max_bytes: int = TILE_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> np.ndarray | None:
        """The tile under ``key``, or ``None``."""
        with self._lock:
            tile = self._items.get(key)
            if tile is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return tile

    def put(self, key: Hashable, tile: np.ndarray) -> None:
        """Keep ``tile`` (made read-only), evicting the oldest beyond the budget."""
        if tile.nbytes > self.max_bytes:
            return
        tile.flags.writeable = False
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._items[key] = tile
            self._bytes += tile.nbytes
            while self._bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= dropped.nbytes

    def clear(self) -> None:
        """Drop every tile."""
        with self._lock:
            self._items.clear()
            self._bytes = 0
