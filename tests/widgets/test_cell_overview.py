"""The Cells panel's overview of many cells: one pixel per cell at each level, and the view box."""

from __future__ import annotations

import numpy as np

from histoscope._widgets._cell_overview import (
    OVERVIEW_TOP_PX,
    OverviewGrid,
    class_codes,
    code_colormap,
    in_box,
    overview_um,
    value_codes,
)


def test_levels_paint_each_kept_cell_in_its_pixel_and_halve_down_to_the_top_size():
    coords = np.array([[0.5, 0.5], [10.0, 30.0], [10.4, 30.4], [5000.0, 9000.0]])  # µm, [y, x]
    codes = np.array([1, 2, 3, 4], np.uint8)
    grid = OverviewGrid(coords, 2.0)
    # 2501 x 4501 px of cells, padded so that each of the 5 levels halves exactly (napari
    # places a level by the ratio of its shape to the finest: an odd side misplaced it)
    assert grid.shape == (2512, 4512)
    levels = grid.levels(codes, np.array([True, True, True, True]))
    assert [lv.shape for lv in levels] == [(2512 >> k, 4512 >> k) for k in range(5)]
    assert max(levels[-1].shape) <= OVERVIEW_TOP_PX < max(levels[-2].shape)
    top = levels[0]
    assert top[0, 0] == 1 and top[5, 15] == 3  # two cells, one pixel: the last
    assert top[2500, 4500] == 4 and (top > 0).sum() == 3
    assert levels[4][2500 // 16, 4500 // 16] == 4
    assert levels[2][5000 // 8, 9000 // 8] == 4
    # a filtered-out cell leaves its pixel empty; the shapes stay
    again = grid.levels(codes, np.array([True, True, False, False]))
    assert [a.shape for a in again] == [a.shape for a in levels]
    assert again[0][5, 15] == 2 and again[0][2500, 4500] == 0


def test_codes_and_their_colour_map():
    np.testing.assert_array_equal(class_codes(np.array([0, 2, -1]), 3), [1, 3, 4])
    np.testing.assert_array_equal(value_codes(np.array([0.0, 0.5, 1.0, 2.0])), [1, 128, 255, 255])
    colors = np.array([[1, 0, 0, 1], [0, 1, 0, 1]], np.float32)
    cmap = code_colormap(colors, "histoscope test codes")
    assert cmap.colors.shape == (256, 4) and cmap.colors[0, 3] == 0
    np.testing.assert_array_equal(cmap.colors[1], colors[0])
    np.testing.assert_array_equal(cmap.colors[2], colors[1])
    # with contrast limits (0, 255) code k falls in step k
    np.testing.assert_allclose(cmap.map(np.array([1, 2]) / 255), colors)


def test_pixel_size_keeps_the_finest_level_bounded_and_the_box_test():
    assert overview_um(np.array([[0.0, 100.0]])) == 2.0  # never finer than 2 µm
    assert 25_000 / overview_um(np.array([[0.0, 25_000.0]])) <= 4096
    coords = np.array([[1.0, 1.0], [5.0, 5.0], [5.0, 11.0]])
    np.testing.assert_array_equal(in_box(coords, (0, 0, 6, 6)), [True, True, False])
