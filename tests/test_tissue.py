"""Tissue mask and tile grid on a drawn slide whose tissue is known exactly."""

from __future__ import annotations

from dataclasses import FrozenInstanceError

import numpy as np
import pytest

from histoscope.slide import open_slide, write_pyramidal_tiff
from histoscope.tissue import TissueMask, TissueParams, mask_from_rgb, tile_grid, tissue_mask

H, W, MPP = 2048, 3072, 0.5
PINK = np.array([200, 120, 170], np.uint8)


def _truth(yy: np.ndarray, xx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tissue after cleaning, drawn pixels) at level-0 coordinates."""
    blob = (yy - 1000) ** 2 + (xx - 900) ** 2 < 600**2
    hole = (yy - 1000) ** 2 + (xx - 900) ** 2 < 100**2
    rect = (yy >= 400) & (yy < 1600) & (xx >= 2000) & (xx < 2800)
    speck = (yy - 200) ** 2 + (xx - 2400) ** 2 < 40**2
    return blob | rect, (blob & ~hole) | rect | speck


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    def render(y, x, h, w):
        yy, xx = np.mgrid[y : y + h, x : x + w]
        _, drawn = _truth(yy, xx)
        out = np.full((h, w, 3), 245, np.uint8)
        out[drawn] = PINK
        return out

    path = tmp_path_factory.mktemp("tissue") / "drawn.tif"
    write_pyramidal_tiff(path, render, shape=(H, W), mpp=MPP, min_size=256)
    with open_slide(path) as s:
        yield s


def test_mask_matches_drawn_tissue_with_hole_filled_and_speck_removed(slide):
    tm = tissue_mask(slide, TissueParams(mpp=8.0))
    assert tm.mpp == 8.0
    assert tm.mask.shape == (H // 16, W // 16)
    yy, xx = np.mgrid[0:H:16, 0:W:16] + 8
    expected, _ = _truth(yy, xx)
    iou = (tm.mask & expected).sum() / (tm.mask | expected).sum()
    assert iou > 0.93
    assert tm.mask[1000 // 16, 900 // 16]  # the hole is filled
    assert not tm.mask[200 // 16, 2400 // 16]  # the speck is gone
    assert 0 < tm.fraction < 1


def test_grey_channel_also_finds_tissue(slide):
    tm = tissue_mask(slide, TissueParams(mpp=8.0, channel="grey"))
    assert tm.mask[1000 // 16, 2400 // 16]
    assert not tm.mask[1900 // 16, 100 // 16]


def test_blank_image_gives_empty_mask():
    tm = mask_from_rgb(np.full((64, 64, 3), 240, np.uint8), 8.0)
    assert not tm.mask.any()


def test_params_are_frozen_and_checked():
    with pytest.raises(FrozenInstanceError):
        TissueParams().mpp = 1.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="channel"):
        TissueParams(channel="hue")  # type: ignore[arg-type]


def test_tile_grid_keeps_tissue_tiles_in_level0_coordinates(slide):
    tm = tissue_mask(slide, TissueParams(mpp=8.0))
    grid = tile_grid(slide, tm, mpp=2.0, tile_size=64, min_tissue=0.5)
    assert grid.stride == 256
    assert grid.shape == (8, 12)
    assert np.all(grid.coords % 256 == 0)
    assert np.array_equal(grid.coords, grid.index[:, ::-1] * 256)
    yy, xx = np.mgrid[0:H:8, 0:W:8] + 4
    truth, _ = _truth(yy, xx)
    tiles = truth.reshape(8, 32, 12, 32).mean(axis=(1, 3))
    kept = np.zeros((8, 12), bool)
    kept[grid.index[:, 0], grid.index[:, 1]] = True
    clear = np.abs(tiles - 0.5) > 0.1  # away from the threshold the answer is certain
    assert np.array_equal(kept[clear], tiles[clear] > 0.5)
    assert np.abs(grid.tissue - tiles[kept]).max() < 0.1
    assert grid.to_dict()["n_tiles"] == len(grid) > 0


def test_tile_grid_without_mask_covers_the_slide(slide):
    grid = tile_grid(slide, None, mpp=0.5, tile_size=500)
    assert grid.shape == (5, 7)
    assert len(grid) == 35
    assert grid.coords.max(axis=0).tolist() == [3000, 2000]


def test_coverage_is_exact_for_fractional_tiles():
    rng = np.random.default_rng(0)
    m = rng.random((10, 10)) > 0.5

    class _S:  # a slide needs only shape, mpp and path for the grid
        shape, mpp, path = (10, 10), 1.0, "mem"

    # 5 px tiles at 0.5 µm/px span 2.5 mask pixels
    grid = tile_grid(_S(), TissueMask(m, 1.0, 0.5), mpp=0.5, tile_size=5, min_tissue=-1)
    assert grid.shape == (4, 4)
    fine = m.repeat(2, 0).repeat(2, 1).astype(float)  # 0.5 px cells: tiles are 5 cells
    brute = fine.reshape(4, 5, 4, 5).mean(axis=(1, 3))
    frac = np.zeros((4, 4))
    frac[grid.index[:, 0], grid.index[:, 1]] = grid.tissue
    np.testing.assert_allclose(frac, brute, atol=1e-6)


def test_background_margin_keeps_pale_tissue_when_glass_is_scarce():
    # 4 % glass, then pale (counterstain-only) and dense tissue: Otsu splits the two tissues
    rgb = np.full((100, 100, 3), 246, np.uint8)
    rgb[:, 4:50] = (222, 216, 230)
    rgb[:, 50:] = (120, 90, 140)
    otsu = mask_from_rgb(rgb, 8.0, TissueParams(channel="grey", blur_um=0, min_area_um2=0))
    capped = mask_from_rgb(
        rgb, 8.0, TissueParams(channel="grey", blur_um=0, min_area_um2=0, background_margin=0.08)
    )
    assert not otsu.mask[:, 4:50].any() and otsu.mask[:, 50:].all()
    assert capped.mask[:, 4:].all() and not capped.mask[:, :4].any()
    assert capped.threshold < otsu.threshold
    with pytest.raises(ValueError, match="background_margin"):
        TissueParams(background_margin=1.5)


def test_inside_slide_drops_only_the_tiles_that_cross_the_slide_edge(slide):
    from histoscope.tissue import inside_slide

    grid = tile_grid(slide, None, mpp=0.5, tile_size=500)  # 3072 x 2048: last column/row cross
    inner = inside_slide(grid, slide)
    assert inner.shape == grid.shape == (5, 7)
    end = inner.coords + inner.stride
    assert (end[:, 0] <= W).all() and (end[:, 1] <= H).all()
    assert len(inner) == 4 * 6  # every whole tile stays
    exact = tile_grid(slide, None, mpp=0.5, tile_size=512)  # 2048 x 3072: nothing crosses
    assert inside_slide(exact, slide) is exact


def test_an_edited_mask_becomes_the_sessions_tissue_and_keys_its_grids(slide):
    from histoscope.errors import HistoScopeError
    from histoscope.session import open_session
    from histoscope.tasks.tissue import use_edited_mask
    from histoscope.tissue import EditedTissue, mask_sha256

    session = open_session(slide, in_memory=True)
    computed = session.tissue()
    before = session.grid(2.0, 64, 0.5)
    edited = computed.mask.copy()
    edited[:, edited.shape[1] // 2 :] = False  # the user erases the right half
    key = use_edited_mask(session, edited.astype(np.uint8))
    assert isinstance(key, EditedTissue) and session.tissue_params is key
    assert key.edit_sha256 == mask_sha256(edited)
    assert np.array_equal(session.tissue().mask, edited)
    after = session.grid(2.0, 64, 0.5)
    assert len(after) < len(before)
    assert (after.coords[:, 0] + after.stride <= W / 2 + 1).all()  # nothing on the erased half
    # the tissue task shows the edit again and says it is one
    from histoscope.tasks._registry import run

    res = run("tissue", session, params=key)
    assert res.summary()["edited"] and res.summary()["threshold"] is None
    with pytest.raises(ValueError, match="must be 128 x 192 pixels"):
        use_edited_mask(session, edited[:, :-1])
    with pytest.raises(ValueError, match="not in this session"):
        tissue_mask(slide, key)  # the pixels of an edit live in the session only
    with pytest.raises(HistoScopeError, match="edit_sha256"):
        EditedTissue(edit_sha256="abc")


def test_tissue_layer_is_an_outline_in_a_colour_that_stands_out_on_he(slide):
    from histoscope.tasks.tissue import MASK_COLOR, find_tissue
    from histoscope.tissue import mask_sha256

    [(data, kwargs, kind)] = find_tissue(slide).to_layers()
    assert kind == "labels" and kwargs["colormap"][1] == MASK_COLOR
    assert kwargs["colormap"][0][3] == 0  # glass stays transparent
    r, g, b, _ = MASK_COLOR
    assert g > 0.8 and r < 0.2  # green: neither haematoxylin blue nor eosin pink
    assert kwargs["metadata"]["mask_sha256"] == mask_sha256(data)
