"""Losses for 2 µm counts, checked against scipy's distributions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from histoscope.expression.losses import expected_counts, loss, nb_log_prob, zinb_log_prob


def _values(seed=0, n=4000):
    rng = np.random.default_rng(seed)
    y = rng.negative_binomial(1.0, 0.6, n).astype(float)
    y[rng.random(n) < 0.5] = 0  # many zeros, as at 2 µm
    mu = rng.uniform(0.001, 8.0, n)
    theta = rng.uniform(0.05, 20.0, n)
    logit = rng.normal(0, 3, n)
    return y, mu, theta, logit


def test_zinb_log_likelihood_equals_scipys_nbinom_mixture():
    y, mu, theta, logit = _values()
    pi = 1 / (1 + np.exp(-logit))
    nb = stats.nbinom(theta, theta / (theta + mu))
    ref = np.where(y == 0, np.log(pi + (1 - pi) * nb.pmf(0)), np.log(1 - pi) + nb.logpmf(y))
    t = [torch.tensor(v, dtype=torch.float64) for v in (y, mu, theta, logit)]
    got = zinb_log_prob(*t).numpy()
    assert (y == 0).sum() > 1000 and (y > 0).sum() > 500
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(nb_log_prob(*t[:3]).numpy(), nb.logpmf(y), atol=1e-5)


def test_zinb_is_finite_at_extreme_logits_and_its_gradient_too():
    y = torch.tensor([0.0, 0.0, 3.0, 5.0], dtype=torch.float64)
    logit = torch.tensor([60.0, -60.0, 60.0, -60.0], dtype=torch.float64, requires_grad=True)
    mu = torch.full((4,), 0.5, dtype=torch.float64)
    lp = zinb_log_prob(y, mu, torch.ones(4, dtype=torch.float64), logit)
    assert torch.isfinite(lp).all()
    assert float(lp[0].detach()) == pytest.approx(0.0, abs=1e-12)  # pi = 1: a zero is certain
    lp.sum().backward()
    assert torch.isfinite(logit.grad).all()


def _out(shape=(2, 3, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"mu": torch.randn(shape, generator=g), "pi": torch.randn(shape, generator=g),
            "log_theta": torch.randn(shape[1], generator=g)}  # fmt: skip


def test_each_loss_is_the_mean_of_its_per_bin_terms():
    out = _out()
    y = torch.poisson(torch.full((2, 3, 4, 4), 0.7))
    mu = torch.nn.functional.softplus(out["mu"]) + 1e-8
    theta = out["log_theta"].exp().view(1, 3, 1, 1).expand_as(mu)
    zinb = -zinb_log_prob(y, mu, theta, out["pi"]).mean()
    assert loss(out, y, "zinb") == pytest.approx(float(zinb), rel=1e-6)
    pois = -stats.poisson.logpmf(y.numpy(), mu.numpy()) - torch.lgamma(y + 1).numpy()
    assert loss(out, y, "poisson") == pytest.approx(float(pois.mean()), rel=1e-5)
    assert loss(out, y, "mse") == pytest.approx(float(((mu - y) ** 2).mean()), rel=1e-6)
    focal = loss(out, y, "focal_mse")
    assert 0 < focal < loss(out, y, "mse")  # down-weights the easy (small-error) bins


def test_the_mask_leaves_out_bins_without_data():
    out = _out()
    y = torch.poisson(torch.full((2, 3, 4, 4), 0.7))
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, :2] = 1
    sub = {k: (v[..., :2, :] if v.dim() == 4 else v) for k, v in out.items()}
    assert loss(out, y, "zinb", mask) == pytest.approx(float(loss(sub, y[..., :2, :], "zinb")))
    with pytest.raises(ValueError, match="loss must be one of"):
        loss(out, y, "huber")


def test_expected_counts():
    out = _out()
    mu = torch.nn.functional.softplus(out["mu"])
    torch.testing.assert_close(expected_counts(out, "poisson"), mu)
    torch.testing.assert_close(expected_counts(out, "zinb"), mu * (1 - torch.sigmoid(out["pi"])))
