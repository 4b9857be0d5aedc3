"""The decoded-tile cache: bounded, least-recently-used, never aliased by reads."""

from __future__ import annotations

import numpy as np

import histoscope as hs
from histoscope.slide._cache import TileCache


def _tile(value: int) -> np.ndarray:
    return np.full((10, 10, 3), value, np.uint8)  # 300 bytes


def test_evicts_least_recently_used_beyond_budget():
    cache = TileCache(max_bytes=900)
    for i in range(3):
        cache.put(i, _tile(i))
    assert cache.get(0) is not None  # 0 is now the most recent
    cache.put(3, _tile(3))
    assert cache.get(1) is None and cache.get(0) is not None and cache.get(3) is not None
    assert not cache.get(3).flags.writeable
    cache.put(4, np.zeros((100, 100, 3), np.uint8))  # larger than the budget: not kept
    assert cache.get(4) is None and cache.get(2) is not None


def test_repeated_reads_hit_the_cache_and_stay_private(tiled_tiff):
    slide = hs.open_slide(tiled_tiff)
    first = slide.read_region(100, 100, 300, 300)
    misses = slide._cache.misses
    second = slide.read_region(100, 100, 300, 300)
    assert slide._cache.misses == misses and slide._cache.hits >= 4
    np.testing.assert_array_equal(first, second)
    second[...] = 0
    np.testing.assert_array_equal(slide.read_region(100, 100, 300, 300), first)
