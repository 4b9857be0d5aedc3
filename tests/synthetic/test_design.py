"""Slide-level design: tumour extents, tissue types, IHC label coverage and edge cases."""

from __future__ import annotations

import numpy as np
import pytest

from histoscope.synthetic import INTENSITY_CLASSES, QUANTITY_CLASSES, TISSUE_TYPES
from histoscope.synthetic._constants import INTENSITY_EDGES
from histoscope.synthetic._layout import build_layout
from histoscope.synthetic._params import EXTENT_RANGES, sample_params


@pytest.fixture(scope="module")
def plans():
    out = []
    for seed in range(24):
        p = sample_params("he", seed, (4000, 4000), 0.5)
        out.append((p, build_layout(p)))
    return out


def test_tumour_extent_matches_its_class(plans):
    seen = set()
    for p, lay in plans:
        frac = lay.tissue_fraction_tumour
        seen.add(p.tumour_extent)
        if p.tumour_extent == "none":
            assert frac == 0
            continue
        lo, hi = EXTENT_RANGES[p.tumour_extent]
        assert lo * 0.8 <= frac <= hi * 1.1, (p.seed, p.tumour_extent, frac)
        if p.tumour_extent == "focus":
            assert frac < 0.05
    assert seen == {"none", "focus", "moderate", "extensive"}


def test_at_least_six_tissue_types_besides_glass(plans):
    present = set()
    for _, lay in plans:
        present |= set(np.unique(lay.types).tolist())
        glass = (lay.types == 0).mean()
        assert 0.1 < glass < 0.9  # every slide has tissue and glass
    assert {TISSUE_TYPES[i] for i in present} == set(TISSUE_TYPES)
    assert len(present - {0}) >= 6


def test_ihc_design_covers_every_label_and_the_edges():
    params = [sample_params("ihc", seed, (2048, 2048), 0.5) for seed in range(300)]
    inten, quant = set(), set()
    near = 0
    for p in params:
        f, d = p.positive_fraction, p.dab_intensity
        q = 0 if f == 0 else 1 if f < 0.25 else 2 if f <= 0.75 else 3
        i = 0 if f == 0 else 1 + int(np.searchsorted(INTENSITY_EDGES, d, side="right"))
        quant.add(QUANTITY_CLASSES[q])
        inten.add(INTENSITY_CLASSES[i])
        if p.near_boundary:
            near += 1
            assert min(abs(f - 0.25), abs(f - 0.75)) <= 0.04 + 1e-9
    assert inten == set(INTENSITY_CLASSES) and quant == set(QUANTITY_CLASSES)
    assert 0.15 < near / len(params) < 0.4


def test_measured_ihc_labels_follow_the_design():
    from histoscope.synthetic._cells import make_context
    from histoscope.synthetic._truth import collect_cells, ihc_labels

    checked = 0
    for seed in range(30):
        p = sample_params("ihc", seed, (3000, 3000), 0.5)
        if p.positive_fraction == 0:
            continue
        ctx = make_context(p)
        lab = ihc_labels(ctx, collect_cells(ctx))
        if lab["n_target_cells"] < 300:
            continue
        checked += 1
        assert abs(lab["positive_fraction"] - p.positive_fraction) < 0.06
        assert abs(lab["mean_dab_od"] - p.dab_intensity) < 0.08 * p.dab_intensity + 0.01
        if checked == 4:
            break
    assert checked == 4


@pytest.mark.parametrize("shape", [(512, 50_000), (50_000, 768), (2048, 2048)], ids=str)
def test_any_aspect_ratio_holds_tissue_and_glass(shape):
    lay = build_layout(sample_params("he", 7, shape, 0.5))
    assert 0.1 < (lay.types != 0).mean() < 0.9
