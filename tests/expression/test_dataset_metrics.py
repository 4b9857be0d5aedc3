"""Training patches line up with the slide and the counts; metrics match reference formulas."""

from __future__ import annotations

import numpy as np
import pytest

from histoscope.expression.dataset import load_slide_patches, patch_grid, sampler_for
from histoscope.expression.metrics import (
    block_sum,
    evaluate_patches,
    pcc_per_gene,
    ssim_per_image,
)
from histoscope.expression.spaceranger import read_binned

CONFIG = {"genes": ["G0", "G1", "G2"], "scales_um": [2, 8], "patch_bins": 4, "bin_um": 2.0,
          "image_mpp": 1.0, "margin_um": 2.0, "view_px": 16}  # fmt: skip


@pytest.fixture(scope="module")
def slide_and_bins(tmp_path_factory):
    """A 0.5 µm/px slide of 96 x 96 px and 12 x 12 bins of 2 µm with random counts."""
    import tifffile
    from tests.expression.conftest import write_spaceranger

    root = tmp_path_factory.mktemp("sr")
    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)
    tifffile.imwrite(root / "he.tif", img, resolution=(1e4 / 0.5, 1e4 / 0.5),
                     resolutionunit="CENTIMETER")  # fmt: skip
    rows, cols = np.mgrid[:12, :12]
    keep = (rows + cols) < 18  # a corner without tissue
    rows, cols = rows[keep], cols[keep]
    counts = rng.poisson(0.8, (len(rows), 3))
    write_spaceranger(root / "vis", counts, rows, cols, mpp=0.5)
    return root / "he.tif", root / "vis", img, counts, rows, cols


def test_patches_hold_the_counts_of_their_bins(slide_and_bins):
    slide, vis, img, counts, rows, cols = slide_and_bins
    ps = load_slide_patches(slide, vis, CONFIG, min_fill=1e-9)
    assert ps.counts.shape[1:] == (3, 4, 4) and ps.counts.sum() == counts.sum()
    for k, (r0, c0) in enumerate(ps.origin):
        for i, j in zip(*np.nonzero(ps.mask[k]), strict=True):
            b = np.flatnonzero((rows == r0 + i) & (cols == c0 + j))[0]
            np.testing.assert_array_equal(ps.counts[k, :, i, j], counts[b])
    assert ps.mask.sum() == len(rows)


def test_views_are_the_slide_pixels_around_each_patch(slide_and_bins):
    from histoscope.slide import open_slide

    slide_path, vis, img, *_ = slide_and_bins
    ps = load_slide_patches(slide_path, vis, CONFIG, min_fill=1e-9)
    r0, c0 = ps.origin[3]
    slide = open_slide(slide_path)
    # the 2 µm view: the patch (4 bins = 8 µm = 16 px) and a 2 µm margin, read at 1 µm/px
    x0, y0 = c0 * 4 - 4, r0 * 4 - 4
    expect = slide.read_region(int(x0), int(y0), 12, 12, mpp=1.0)
    np.testing.assert_array_equal(ps.views[0][3], expect)
    assert ps.views[1].shape[1:] == (16, 16, 3)


def test_patch_grid_and_min_fill(slide_and_bins):
    _, vis, *_ = slide_and_bins
    bins = read_binned(vis)
    every = patch_grid(bins, 4, 1e-9)
    full = patch_grid(bins, 4, 1.0)
    assert len(every) == 9 and len(full) < len(every) and (full % 4 == 0).all()
    s = sampler_for(every, CONFIG, bins.bin_px)
    np.testing.assert_allclose(s.coords[0], [8.0, 8.0])  # centre of bins 0..3 in level-0 px


def test_pcc_and_block_sums():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 3)), rng.normal(size=(50, 3))
    ref = [np.corrcoef(a[:, j], b[:, j])[0, 1] for j in range(3)]
    np.testing.assert_allclose(pcc_per_gene(a, b), ref)
    assert np.isnan(pcc_per_gene(np.ones((5, 1)), rng.normal(size=(5, 1)))[0])
    x = rng.integers(0, 5, (2, 3, 8, 8))
    s = block_sum(x, 4)
    assert s.shape == (2, 3, 2, 2) and s[1, 2, 1, 0] == x[1, 2, 4:8, 0:4].sum()


def test_ssim_matches_skimage_after_min_max():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    p, t = rng.random((2, 1, 16, 16)) * 3, rng.poisson(1.0, (2, 1, 16, 16)).astype(float)
    mask = np.ones((2, 16, 16), bool)
    mask[1, 0, 0] = False  # not fully covered: no SSIM
    s = ssim_per_image(p, t, mask)
    mm = [(v - v.min()) / np.ptp(v) for v in (p[0, 0], t[0, 0])]
    assert s[0, 0] == pytest.approx(structural_similarity(*mm, win_size=7, data_range=1.0))
    assert np.isnan(s[1, 0])


def test_a_perfect_prediction_scores_one_and_its_shuffled_control_does_not():
    rng = np.random.default_rng(0)
    truth = rng.poisson(rng.gamma(0.5, 1.0, (60, 2, 1, 1)), (60, 2, 8, 8))
    mask = np.ones((60, 8, 8), bool)
    slide = np.repeat([0, 1], 30)
    res = evaluate_patches(truth.astype(np.float32), truth, mask, slide, ["a", "b"], ssim=True)
    assert res["model"]["pcc_2um"] == pytest.approx(1.0)
    assert res["model"]["pcc_8um"] == pytest.approx(1.0) and res["model"]["mse_2um"] == 0
    assert abs(res["shuffled"]["pcc_8um"]) < 0.4 and res["shuffled"]["mse_2um"] > 0
    assert res["model"]["ssim"] == pytest.approx(1.0)
