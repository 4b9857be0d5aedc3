"""The multi-scale 2 µm expression model: shapes, attention, checkpoints, learning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histoscope.models.expression import ExpressionModel, views

GENES = ["A", "B", "C"]


def _inputs(model, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, v["size_px"], v["size_px"], generator=g) for v in model.views()]


def test_views_follow_the_geometry():
    m = ExpressionModel(GENES)
    assert views(m.config) == [
        {"size_px": 48, "mpp": 1.0, "field_um": 48.0},  # 32 µm patch + 8 µm margin each side
        {"size_px": 32, "mpp": 1.0, "field_um": 32.0},  # 8 µm tokens
        {"size_px": 32, "mpp": 4.0, "field_um": 128.0},  # 32 µm tokens
        {"size_px": 32, "mpp": 16.0, "field_um": 512.0},  # 128 µm tokens
    ]
    big = ExpressionModel(GENES, patch_bins=128, margin_um=0, view_px=64)  # the seed's geometry
    assert big.views()[0] == {"size_px": 256, "mpp": 1.0, "field_um": 256.0}


def test_outputs_keep_the_bin_grid():
    m = ExpressionModel(GENES).eval()
    out = m(_inputs(m))
    assert out["mu"].shape == out["pi"].shape == (2, 3, 16, 16)
    assert out["log_theta"].shape == (3,)
    e = m.expected(out)
    assert e.shape == (2, 3, 16, 16) and (e >= 0).all()
    local = ExpressionModel(GENES, scales_um=[2]).eval()
    assert local(_inputs(local)[0])["mu"].shape == (2, 3, 16, 16)


def test_context_views_change_the_prediction_only_with_context_scales():
    torch.manual_seed(0)
    m = ExpressionModel(GENES).eval()
    xs = _inputs(m)
    with torch.no_grad():
        a = m(xs)["mu"]
        b = m([xs[0], xs[1], xs[2], torch.zeros_like(xs[3])])["mu"]
    assert (a - b).abs().max() > 1e-4  # the 128 µm context reaches every bin
    with pytest.raises(ValueError, match="expected 4 views, got 1"):
        m(xs[0])


def test_cross_attention_equals_torchs_multihead_attention():
    from histoscope.models.expression import _CrossAttention

    torch.manual_seed(0)
    mine = _CrossAttention(64, 8)
    ref = torch.nn.MultiheadAttention(64, 8, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([mine.q.weight, mine.kv.weight]))
        ref.in_proj_bias.copy_(torch.cat([mine.q.bias, mine.kv.bias]))
        ref.out_proj.weight.copy_(mine.out.weight)
        ref.out_proj.bias.copy_(mine.out.bias)
    q, kv = torch.randn(2, 50, 64), torch.randn(2, 16, 64)
    torch.testing.assert_close(mine(q, kv), ref(q, kv, kv, need_weights=False)[0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scales_um": [8, 32]}, "must start at 2"),
        ({"scales_um": [2, 32, 8]}, "must start at 2 and increase"),
        ({"dim": 60}, "divisible by heads"),
        ({"image_mpp": 0.5}, "two pixels per bin"),
        ({"margin_um": 3.0}, "whole number of bins"),
        ({"loss": "huber"}, "loss must be one of"),
    ],
)
def test_bad_configs_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExpressionModel(GENES, **kwargs)


def test_checkpoint_round_trip_and_family_check(tmp_path):
    from histoscope.checkpoints import load_checkpoint, save_checkpoint
    from histoscope.errors import CheckpointError

    m = ExpressionModel(GENES, scales_um=[2, 8], loss="poisson").eval()
    path = save_checkpoint(tmp_path / "e.safetensors", m, {"family": "expression",
                                                           "config": m.config})  # fmt: skip
    back, card = load_checkpoint(path, family="expression")
    xs = _inputs(m)
    torch.testing.assert_close(back(xs)["mu"], m(xs)["mu"])
    assert back.config == m.config and card.config["loss"] == "poisson"
    with pytest.raises(CheckpointError, match="expected 'clam'"):
        load_checkpoint(path, family="clam")


def test_a_tiny_model_learns_where_a_gene_is_expressed():
    """Gene A is expressed under dark nuclei-like discs; PCC on new images beats a shuffled pairing."""
    from histoscope.expression.losses import loss
    from histoscope.expression.metrics import pcc_per_gene

    torch.manual_seed(0)
    rng = np.random.default_rng(0)

    def sample(n):
        img = np.full((n, 3, 24, 24), 1.5, np.float32)
        rate = np.zeros((n, 1, 8, 8), np.float32)
        for i in range(n):
            for _ in range(3):
                y, x = rng.integers(0, 8, 2)
                img[i, :, 4 + 2 * y : 6 + 2 * y, 4 + 2 * x : 6 + 2 * x] = -1.5
                rate[i, 0, y, x] = 3.0
        counts = rng.poisson(rate + 0.02).astype(np.float32)
        return torch.from_numpy(img), torch.from_numpy(counts), rate

    m = ExpressionModel(["A"], scales_um=[2], patch_bins=8, margin_um=4, dim=16, heads=2,
                        widths=(8, 16))  # fmt: skip
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(60):
        x, y, _ = sample(16)
        opt.zero_grad()
        loss(m(x), y, "zinb").backward()
        opt.step()
    x, _, rate = sample(32)
    with torch.no_grad():
        pred = m.eval().expected(m(x)).numpy().reshape(-1, 1)
    truth = rate.reshape(-1, 1)
    assert pcc_per_gene(pred, truth)[0] > 0.8
    assert abs(pcc_per_gene(pred, np.roll(truth, 64))[0]) < 0.2  # another image's truth
