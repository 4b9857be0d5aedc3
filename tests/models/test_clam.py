"""CLAM attention MIL and the mean-pooling baseline."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from histoscope.models.clam import CLAM, MeanPoolMIL, build_mil, smooth_svm_loss


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (no oversubscription on a shared CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass(frozen=True)
class Case:
    id: str
    variant: str
    n_classes: int


CASES = [Case("sb-2", "sb", 2), Case("mb-2", "mb", 2), Case("mb-3", "mb", 3),
         Case("mean-3", "mean", 3)]  # fmt: skip


def make(case: Case, in_dim: int = 12, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = {"variant": case.variant, "in_dim": in_dim, "n_classes": case.n_classes,
           "hidden": 16, "dropout": 0.0}  # fmt: skip
    if case.variant != "mean":
        cfg.update(attn_hidden=8, k_sample=3, **kw)
    return build_mil(cfg).eval()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_head_shapes_and_attention_sums_to_one(case):
    model = make(case)
    out = model(torch.randn(2, 9, 12))
    k = case.n_classes if case.variant == "mb" else 1
    assert out["logits"].shape == (2, case.n_classes)
    assert out["attention"].shape == (2, k, 9)
    assert out["pooled"].shape == (2, k, 16)
    torch.testing.assert_close(out["attention"].sum(-1), torch.ones(2, k))
    assert model(torch.randn(9, 12))["logits"].shape == (1, case.n_classes)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_padding_gets_zero_attention_and_does_not_change_the_logits(case):
    model = make(case)
    h = torch.randn(1, 7, 12)
    padded = torch.cat([h, 50 * torch.randn(1, 4, 12)], dim=1)
    mask = torch.tensor([[True] * 7 + [False] * 4])
    out = model(padded, mask)
    assert torch.all(out["attention"][..., 7:] == 0)
    torch.testing.assert_close(out["attention"].sum(-1), torch.ones(1, out["attention"].shape[1]))
    torch.testing.assert_close(out["logits"], model(h)["logits"])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_tile_order_does_not_change_the_slide_logit(case):
    model = make(case)
    h = torch.randn(1, 15, 12)
    perm = torch.randperm(15, generator=torch.Generator().manual_seed(3))
    a, b = model(h), model(h[:, perm])
    torch.testing.assert_close(a["logits"], b["logits"])
    torch.testing.assert_close(a["attention"][..., perm], b["attention"])


def test_mean_pooling_weights_are_uniform():
    out = make(Case("m", "mean", 2))(torch.randn(1, 5, 12))
    torch.testing.assert_close(out["attention"], torch.full((1, 1, 5), 0.2))


def test_instance_targets_pick_top_and_bottom_k():
    model = make(Case("sb", "sb", 2))
    scores = torch.tensor([0.1, 5.0, -3.0, 2.0, 0.0, -1.0, 4.0, float("-inf")])
    idx, target = model.instance_targets(scores, n_valid=7, positive=True)
    assert idx[:3].tolist() == [1, 6, 3] and set(idx[3:].tolist()) == {2, 5, 4}
    assert target.tolist() == [1, 1, 1, 0, 0, 0]
    idx, target = model.instance_targets(scores, n_valid=7, positive=False)
    assert idx.tolist() == [1, 6, 3] and target.tolist() == [0, 0, 0]
    # a bag of 4 valid tiles gives k = 2 from each end, never a padding tile
    idx, _ = model.instance_targets(scores[[0, 1, 2, 7]], n_valid=3, positive=True)
    assert idx.tolist() == [1, 2]


def test_instance_loss_trains_only_the_selected_tiles():
    model = make(Case("sb", "sb", 2), instance_loss="ce")
    h = torch.randn(1, 10, 12, requires_grad=True)
    z, scores, mask = model.embed(h)
    loss = model.instance_loss(z, scores, torch.tensor([1]), mask)
    (grad,) = torch.autograd.grad(loss, h, retain_graph=True)
    idx, _ = model.instance_targets(scores[0, 0].detach(), 10, positive=True)
    touched = grad[0].abs().sum(-1) > 0
    # the ranking itself has no gradient: only the chosen tiles' features get one
    assert set(torch.nonzero(touched).flatten().tolist()) == set(idx.tolist())
    # the negative class's instance classifier is untouched without subtyping
    loss.backward()
    assert model.instance_classifiers[0].weight.grad is None
    assert model.instance_classifiers[1].weight.grad.abs().sum() > 0


def test_total_loss_weights_bag_and_instance_terms():
    model = make(Case("sb", "sb", 2), bag_weight=0.7)
    h, y = torch.randn(1, 10, 12), torch.tensor([1])
    total, parts = model.loss(h, y)
    assert float(total.detach()) == pytest.approx(
        0.7 * parts["bag"] + 0.3 * parts["instance"], rel=1e-5
    )


def test_smooth_svm_loss_matches_its_definition():
    s = torch.tensor([[2.0, -1.0], [0.5, 0.7]])
    y = torch.tensor([0, 0])
    want = torch.stack([torch.logsumexp(torch.tensor([0.0, 1 - 3.0]), 0),
                        torch.logsumexp(torch.tensor([0.0, 1 + 0.2]), 0)]).mean()  # fmt: skip
    torch.testing.assert_close(smooth_svm_loss(s, y), want)


@pytest.mark.parametrize("case", CASES[:2], ids=lambda c: c.id)
def test_a_tiny_bag_problem_is_learnt(case):
    """Bags of 30 noise tiles; positive bags hide 2 "tumour" tiles among them."""
    gen = torch.Generator().manual_seed(0)
    signal = torch.zeros(12)
    signal[:3] = 5.0

    def bags(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.randn(n, 30, 12, generator=gen)
        y = torch.arange(n) % 2
        h[y == 1, :2] += signal
        return h, y

    h, y = bags(40)
    model = make(case).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        loss, _ = model.loss(h, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    h, y = bags(20)
    with torch.no_grad():
        out = model(h)
    pred = out["logits"].argmax(1)
    assert torch.equal(pred, y)
    # attention of the positive bags (tumour-class branch) lands on the two signal tiles
    branch = 1 if case.variant == "mb" else 0
    top = out["attention"][y == 1, branch].topk(2).indices.sort(1).values
    assert torch.equal(top, torch.tensor([[0, 1]]).expand_as(top))


def test_bad_input_is_named():
    model = make(Case("sb", "sb", 2))
    with pytest.raises(ValueError, match="12"):
        model(torch.randn(5, 7))
    with pytest.raises(ValueError, match="mask shape"):
        model(torch.randn(1, 5, 12), torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="variant"):
        build_mil({"variant": "max", "in_dim": 4})
    with pytest.raises(ValueError, match="instance_loss"):
        CLAM(4, instance_loss="hinge")


def test_config_round_trip_through_a_checkpoint(tmp_path):
    from histoscope.checkpoints import load_checkpoint, save_checkpoint

    for model in (make(Case("mb", "mb", 3)), MeanPoolMIL(12, 2, 16)):
        path = save_checkpoint(tmp_path / f"{model.variant}", model,
                               {"family": "clam", "config": model.config})  # fmt: skip
        loaded, card = load_checkpoint(path, family="clam")
        assert type(loaded) is type(model) and card.config == model.config
        h = torch.randn(6, 12)
        torch.testing.assert_close(loaded(h)["logits"], model.eval()(h)["logits"])
