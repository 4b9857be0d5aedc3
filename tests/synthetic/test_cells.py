"""Cell placement and morphology: balance, designed ambiguities, tile locality."""

from __future__ import annotations

import numpy as np
import pytest

from histoscope.synthetic import CELL_CLASSES, CONTEXT_ONLY_PAIRS, IMMUNE_MIX, MORPHOLOGY_ONLY_PAIRS
from histoscope.synthetic._cells import cells_in_window, make_context
from histoscope.synthetic._params import sample_params
from histoscope.synthetic._render import render_region
from histoscope.synthetic._truth import collect_cells

MORPH_COLS = ("a", "b", "amp2", "amp3", "contrast", "hdens", "nucleolus", "cf", "cf_asp", "edens",
              "ecc", "ves")  # fmt: skip


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import ks_2samp

    return float(ks_2samp(a, b).statistic)


@pytest.fixture(scope="module")
def cohort():
    """Cells (with morphology columns) of several 6 mm slides, no pixels drawn."""
    tables = []
    for seed in range(6):
        ctx = make_context(sample_params("he", seed, (12000, 12000), 0.5))
        for y in range(3000, 9000, 1500):
            for x in range(3000, 9000, 1500):
                c = cells_in_window(ctx, y, x, y + 1500, x + 1500)
                c = {k: v for k, v in c.items() if k not in ("glands", "vessels")}
                c["tissue"] = ctx.layout.type_at(c["y"], c["x"])
                tables.append(c)
    c = {k: np.concatenate([t[k] for t in tables]) for k in tables[0]}
    return {k: v[c["cls"] >= 0] for k, v in c.items()}


def test_every_class_is_present_in_a_small_cohort(cohort):
    counts = np.bincount(cohort["cls"], minlength=len(CELL_CLASSES))
    print(dict(zip(CELL_CLASSES, counts.tolist(), strict=True)))
    assert (counts >= 200).all(), dict(zip(CELL_CLASSES, counts, strict=True))
    assert counts.max() / counts.sum() < 0.6  # no class swamps the rest


def test_immune_mix_is_the_designed_one(cohort):
    names = list(IMMUNE_MIX)
    idx = [CELL_CLASSES.index(n) for n in names]
    counts = np.array([(cohort["cls"] == i).sum() for i in idx], float)
    np.testing.assert_allclose(counts / counts.sum(), list(IMMUNE_MIX.values()), atol=0.02)


@pytest.mark.parametrize("pair", CONTEXT_ONLY_PAIRS, ids="-".join)
def test_context_only_pairs_look_alike_but_live_apart(cohort, pair):
    i, j = (CELL_CLASSES.index(n) for n in pair)
    a, b = cohort["cls"] == i, cohort["cls"] == j
    for col in MORPH_COLS:
        assert _ks(cohort[col][a], cohort[col][b]) < 0.12, col
    # ... while their tissue compartments differ
    ta = np.bincount(cohort["tissue"][a], minlength=8) / a.sum()
    tb = np.bincount(cohort["tissue"][b], minlength=8) / b.sum()
    assert 0.5 * np.abs(ta - tb).sum() > 0.3


@pytest.mark.parametrize("pair", MORPHOLOGY_ONLY_PAIRS, ids="-".join)
def test_morphology_only_pairs_share_places_but_not_looks(cohort, pair):
    i, j = (CELL_CLASSES.index(n) for n in pair)
    a, b = cohort["cls"] == i, cohort["cls"] == j
    assert max(_ks(cohort[col][a], cohort[col][b]) for col in MORPH_COLS) > 0.5
    ta = np.bincount(cohort["tissue"][a], minlength=8) / a.sum()
    tb = np.bincount(cohort["tissue"][b], minlength=8) / b.sum()
    assert 0.5 * np.abs(ta - tb).sum() < 0.06


def test_windows_partition_the_cells():
    ctx = make_context(sample_params("he", 11, (3000, 3000), 0.5))
    whole = cells_in_window(ctx, 0, 0, 3000, 3000)
    parts = [cells_in_window(ctx, y, x, y + 1000, x + 1500) for y in (0, 1000, 2000)
             for x in (0, 1500)]  # fmt: skip
    uids = np.concatenate([p["uid"] for p in parts])
    assert len(uids) == len(np.unique(uids)) == len(whole["uid"])
    assert set(uids.tolist()) == set(whole["uid"].tolist())
    all_cells = collect_cells(ctx)
    assert set(all_cells["uid"].tolist()) == set(whole["uid"][whole["cls"] >= 0].tolist())


@pytest.mark.parametrize("mpp", [0.25, 0.5, 1.0])
def test_tiles_join_without_seams(mpp):
    ctx = make_context(sample_params("he", 5, (2048, 2048), mpp))
    ys, xs = np.nonzero(ctx.layout.types != 0)
    y0 = int(ys.mean() * ctx.layout.map_px) // 256 * 256
    x0 = int(xs.mean() * ctx.layout.map_px) // 256 * 256
    big = render_region(ctx, y0, x0, 512, 512).astype(int)
    tiles = np.zeros_like(big)
    for dy in (0, 256):
        for dx in (0, 256):
            tiles[dy : dy + 256, dx : dx + 256] = render_region(ctx, y0 + dy, x0 + dx, 256, 256)
    diff = np.abs(big - tiles)
    assert diff.max() <= 2 and diff.mean() < 0.05
    assert big.std() > 10
