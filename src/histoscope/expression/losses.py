"""Losses for counts per 2 µm bin: MSE, ZINB, focal MSE and Poisson (SYSTEMS.md section 3).

A model gives per bin and gene a raw mean ``m`` (``mu = softplus(m)``) and a
zero-inflation logit ``l`` (``pi = sigmoid(l)``), and per gene a log
dispersion (``theta = exp``). The zero-inflated negative binomial is

    P(0)     = pi + (1 - pi) (theta / (theta + mu)) ** theta
    P(y > 0) = (1 - pi) NB(y; mu, theta)

evaluated in log space with ``log(pi + (1 - pi) q) = logaddexp(l, log q) -
softplus(l)``, so it stays finite for any logit. The expected count a model
predicts is ``(1 - pi) mu`` under ZINB and ``mu`` otherwise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["LOSSES", "expected_counts", "loss", "nb_log_prob", "zinb_log_prob"]

LOSSES = ("mse", "zinb", "focal_mse", "poisson")
#: Focal-R (Yang et al. 2021) settings: weight ``(2 sigmoid(beta |e|) - 1) ** gamma``.
FOCAL_BETA, FOCAL_GAMMA = 1.0, 1.0


def nb_log_prob(y: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """log NB(y; mean ``mu``, dispersion ``theta``), element-wise (broadcasting)."""
    import torch

    log_t_mu = torch.log(theta + mu)
    return (torch.lgamma(y + theta) - torch.lgamma(theta) - torch.lgamma(y + 1)
            + theta * (torch.log(theta) - log_t_mu) + y * (torch.log(mu) - log_t_mu))  # fmt: skip


def zinb_log_prob(
    y: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, pi_logit: torch.Tensor
) -> torch.Tensor:
    """log ZINB(y; ``mu``, ``theta``, ``pi = sigmoid(pi_logit)``), element-wise.

    Parameters
    ----------
    y
        Counts (float tensor).
    mu
        Means (> 0), e.g. ``softplus`` of the model output.
    theta
        Dispersions (> 0), broadcast against ``y`` (per gene).
    pi_logit
        Zero-inflation logits.
    """
    import torch
    from torch.nn.functional import softplus

    theta = theta.expand_as(mu) if theta.dim() < mu.dim() else theta
    log_nb0 = theta * (torch.log(theta) - torch.log(theta + mu))  # log (theta/(theta+mu))^theta
    sp = softplus(pi_logit)
    zero = torch.logaddexp(pi_logit, log_nb0) - sp
    nonzero = nb_log_prob(y, mu, theta) - sp  # log(1 - pi) = -softplus(l)
    return torch.where(y < 0.5, zero, nonzero)


def _gene_shape(theta: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-gene ``(G,)`` values shaped to broadcast over ``(B, G, H, W)``."""
    return theta.view(1, -1, *([1] * (like.dim() - 2)))


def expected_counts(out: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """The expected count per bin and gene the outputs of a model trained with ``kind`` give."""
    import torch
    from torch.nn.functional import softplus

    mu = softplus(out["mu"])
    return mu * torch.sigmoid(-out["pi"]) if kind == "zinb" else mu


def loss(
    out: dict[str, torch.Tensor],
    y: torch.Tensor,
    kind: str,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean loss over bins (and genes) of one batch.

    Parameters
    ----------
    out
        ``{"mu": (B, G, H, W) raw means, "pi": zero-inflation logits (same shape),
        "log_theta": (G,)}``.
    y
        ``(B, G, H, W)`` counts.
    kind
        One of :data:`LOSSES`.
    mask
        ``(B, 1, H, W)`` bins that count (bins with data); default all.

    Returns
    -------
    torch.Tensor
        Scalar: negative log-likelihood per entry for ``zinb`` / ``poisson``,
        (weighted) squared error for ``mse`` / ``focal_mse``.
    """
    import torch
    from torch.nn import functional as F  # noqa: N812 - torch's own convention

    if kind not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, not {kind!r}")
    mu = F.softplus(out["mu"]) + 1e-8
    if kind == "zinb":
        theta = _gene_shape(out["log_theta"].exp(), mu)
        per = -zinb_log_prob(y, mu, theta, out["pi"])
    elif kind == "poisson":
        per = F.poisson_nll_loss(mu, y, log_input=False, full=False, reduction="none")
    else:
        err = mu - y
        per = err**2
        if kind == "focal_mse":
            per = per * (2 * torch.sigmoid(FOCAL_BETA * err.abs().detach()) - 1) ** FOCAL_GAMMA
    if mask is None:
        return per.mean()
    w = mask.to(per.dtype).expand_as(per)
    return (per * w).sum() / w.sum().clamp_min(1.0)
