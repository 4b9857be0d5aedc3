"""``to_rgb_uint8``: every decoded layout becomes RGB uint8, alpha over white."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from histoscope.slide._backend import to_rgb_uint8, white_tile


@dataclass(frozen=True)
class RgbCase:
    id: str
    data: np.ndarray
    expect: tuple[int, int, int]


def _px(values, dtype) -> np.ndarray:
    return np.array(values, dtype=dtype).reshape(1, 1, -1)


RGB = [
    RgbCase("rgb8", _px([10, 20, 30], np.uint8), (10, 20, 30)),
    RgbCase("grey8-2d", np.full((1, 1), 77, np.uint8), (77, 77, 77)),
    RgbCase("grey-alpha-half", _px([0, 128], np.uint8), (127, 127, 127)),
    RgbCase("rgba-opaque", _px([1, 2, 3, 255], np.uint8), (1, 2, 3)),
    RgbCase("rgba-clear", _px([1, 2, 3, 0], np.uint8), (255, 255, 255)),
    RgbCase("rgb16", _px([0, 257 * 100, 65535], np.uint16), (0, 100, 255)),
    RgbCase("float-unit", _px([0.0, 0.5, 1.0], np.float32), (0, 127, 255)),
    RgbCase("float-255", _px([0.0, 100.0, 255.0], np.float64), (0, 100, 255)),
]


@pytest.mark.parametrize("case", RGB, ids=lambda c: c.id)
def test_to_rgb_uint8(case):
    out = to_rgb_uint8(case.data)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 3)
    assert tuple(int(v) for v in out[0, 0]) == pytest.approx(case.expect, abs=1)


def test_white_tile():
    t = white_tile(3, 5)
    assert t.shape == (3, 5, 3) and (t == 255).all()
