"""NuClass model: the paper's small checks, FiLM, the gate target, and tile pooling = crops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histoscope.errors import HistoScopeError
from histoscope.models.nuclass import (
    FiLM,
    NuClass,
    UnknownOrganError,
    fuse,
    gate_statistics,
    gate_target,
    normalised_entropy,
    temper,
)

CLASSES = ["a", "b", "c", "d"]
TINY = {
    "classes": CLASSES,
    "tissues": ["colon", "lung", "unknown"],
    "local": {"widths": [4, 8], "strides": [2, 2], "box_um": 8.0, "grid": 2},
    "context": {"widths": [4, 8], "strides": [2, 2], "pool_in": 2, "boxes_um": [16.0, 48.0],
                "grids": [2, 1]},
    "film_dim": 4, "hidden": 16, "proj": 8, "gate_proj": 4, "gate_hidden": [8, 4],
}  # fmt: skip


def tiny(seed: int = 0) -> NuClass:
    torch.manual_seed(seed)
    m = NuClass(TINY).eval()
    for mod in m.modules():  # non-trivial BN statistics, so eval mode is really exercised
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
    return m


def test_fused_probabilities_sum_to_one_for_any_gate_and_temperature():
    m = tiny()
    m.temperature[:] = torch.tensor([0.7, 1.6, 2.5])
    torch.manual_seed(1)
    with torch.no_grad():
        out = m.heads(torch.randn(5, 32), torch.randn(5, 40), torch.tensor([0, 1, 2, 2, 0]))
    for key in ("prob", "mix", "p_local", "p_global"):
        np.testing.assert_allclose(out[key].sum(1).numpy(), 1.0, atol=1e-5)
    # the fused temperature flattens: entropy grows with T > 1
    assert (normalised_entropy(out["prob"]) > normalised_entropy(out["mix"])).all()


@pytest.mark.parametrize("bias, expect", [(-1e4, "p_local"), (1e4, "p_global")])
def test_gate_at_zero_gives_local_and_at_one_global_exactly(bias, expect):
    m = tiny()
    with torch.no_grad():
        m.gate_mlp[-1].weight.zero_()
        m.gate_mlp[-1].bias.fill_(bias)
    with torch.no_grad():
        out = m.heads(torch.randn(6, 32), torch.randn(6, 40), torch.zeros(6, dtype=torch.long))
    assert torch.equal(out["prob"], temper(out[expect], 1.0)) or torch.allclose(
        out["prob"], out[expect], atol=1e-7, rtol=0
    )
    assert torch.equal(out["mix"], out[expect])
    other = "p_global" if expect == "p_local" else "p_local"
    assert not torch.allclose(out["mix"], out[other])


def test_fuse_is_the_convex_mixture():
    pl = torch.tensor([[0.7, 0.2, 0.1, 0.0]])
    pg = torch.tensor([[0.0, 0.1, 0.2, 0.7]])
    np.testing.assert_allclose(fuse(pl, pg, torch.tensor([0.25])).numpy(),
                               [[0.525, 0.175, 0.125, 0.175]], atol=1e-6)  # fmt: skip


def test_normalised_entropy_is_one_for_uniform_and_zero_for_one_hot():
    for c in (2, 5, 16):
        assert normalised_entropy(torch.full((1, c), 1 / c)).item() == pytest.approx(1.0, abs=1e-6)
        assert normalised_entropy(torch.eye(c)[:1]).item() == pytest.approx(0.0, abs=1e-6)
    mid = normalised_entropy(torch.tensor([[0.5, 0.5, 0.0, 0.0]])).item()
    assert mid == pytest.approx(0.5, abs=1e-6)  # log 2 / log 4


def test_film_with_zero_output_is_the_identity_and_not_otherwise():
    film = FiLM(3, 6)
    f, cond = torch.randn(4, 6), torch.randn(4, 3)
    assert torch.equal(film(f, cond), f)
    with torch.no_grad():
        film.out.bias[:6] = 1.0  # gamma = 1: features doubled
        film.out.bias[6:] = 0.5  # beta
    np.testing.assert_allclose(film(f, cond).detach().numpy(), (2 * f + 0.5).numpy(), atol=1e-6)


def test_gate_target_three_rules():
    y = torch.tensor([0, 0, 0, 0])
    pl = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    pg = torch.tensor([[0.2, 0.8], [0.9, 0.1], [0.8, 0.2], [0.4, 0.6]])
    t = gate_target(pl, pg, y)
    assert t[0] == 0.0  # only local right
    assert t[1] == 1.0  # only global right
    assert t[2].item() == pytest.approx(torch.sigmoid(torch.tensor(10 * 0.2)).item())  # both
    assert t[3].item() == pytest.approx(torch.sigmoid(torch.tensor(10 * 0.1)).item())  # neither


def test_gate_statistics_columns():
    pl = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    pg = torch.full((1, 4), 0.25)
    s = gate_statistics(pl, pg)[0].tolist()
    assert s == pytest.approx([1.0, 0.25, 0.0, 1.0, 1.0, 0.0, -0.75, 0.75], abs=1e-6)


def test_unknown_tissue_token_is_the_default():
    m = tiny()
    assert m.tissue_index(None) == 2
    assert m.tissue_index("Lung ") == 1
    assert m.tissue_index("Unknown") == m.tissue_index("") == 2


def test_an_organ_the_model_does_not_know_is_refused_with_the_valid_ones():
    m = tiny()
    with pytest.raises(UnknownOrganError, match=r"'pancreas'.*'colon', 'lung'") as err:
        m.tissue_index("pancreas")
    assert isinstance(err.value, ValueError) and isinstance(err.value, HistoScopeError)
    with pytest.raises(ValueError, match="unknown"):
        NuClass({**TINY, "tissues": ["colon"]})


@torch.no_grad()
def test_tile_pooling_equals_crops_when_crops_align_with_the_stride():
    """The fast path's premise: one map over a tile, pooled at a cell, = the cell's own crop."""
    m = tiny()
    torch.manual_seed(3)
    img = torch.rand(1, 3, 192, 192) * 4 - 2
    cells = torch.tensor([[96.3, 90.7], [80.5, 100.25], [110.0, 85.0]])
    idx = torch.zeros(3, dtype=torch.long)
    tile_l = m.pool_local(m.local_map(img), idx, cells)
    s = m.local_trunk.stride  # crops starting on the stride grid see the same receptive fields
    crops, xy = [], []
    for cx, cy in cells.tolist():
        x0, y0 = int(cx - 48) // s * s, int(cy - 48) // s * s
        crops.append(img[0, :, y0 : y0 + 96, x0 : x0 + 96])
        xy.append([cx - x0, cy - y0])
    crop_l = m.pool_local(m.local_map(torch.stack(crops)), torch.arange(3), torch.tensor(xy))
    np.testing.assert_allclose(crop_l.detach().numpy(), tile_l.detach().numpy(), atol=1e-5)
    # and the pooled feature does depend on where the cell is
    moved = m.pool_local(m.local_map(img), idx, cells + 12)
    assert not torch.allclose(moved, tile_l, atol=1e-3)


def test_checkpoint_round_trip(tmp_path):
    from histoscope.checkpoints import ModelCard, load_checkpoint, save_checkpoint

    m = tiny()
    m.temperature[:] = torch.tensor([1.5, 0.8, 1.1])
    card = ModelCard(family="nuclass", config=m.config, classes=tuple(CLASSES))
    save_checkpoint(tmp_path / "n.safetensors", m, card)
    m2, card2 = load_checkpoint(tmp_path / "n.safetensors", family="nuclass")
    assert card2.classes == tuple(CLASSES)
    assert torch.equal(m2.temperature, m.temperature)
    x, c = torch.randint(0, 255, (2, 224, 224, 3)), torch.randint(0, 255, (2, 512, 512, 3))
    t = torch.tensor([0, 2])
    with torch.no_grad():
        a = m(m.normalise(x), m.normalise(c), t)["prob"]
        b = m2.eval()(m2.normalise(x), m2.normalise(c), t)["prob"]
    assert torch.equal(a, b)
