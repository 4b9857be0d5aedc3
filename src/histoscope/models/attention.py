"""Gated attention pooling (Ilse et al. 2018), as used by CLAM and iSight."""

from __future__ import annotations

import torch
from torch import nn


class GatedAttention(nn.Module):
    """Scores ``w . (tanh(A h) * sigmoid(B h))`` per instance, ``n_branches`` at once.

    Parameters
    ----------
    dim
        Instance feature size ``L``.
    hidden
        Attention hidden size ``D``.
    dropout
        Dropout on the two gates (training only).
    n_branches
        Independent attention branches (CLAM's multi-branch variant uses one
        per class); scores come out as ``(..., n_branches)``.
    """

    def __init__(self, dim: int, hidden: int = 256, dropout: float = 0.25, n_branches: int = 1):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Dropout(dropout))
        self.b = nn.Sequential(nn.Linear(dim, hidden), nn.Sigmoid(), nn.Dropout(dropout))
        self.w = nn.Linear(hidden, n_branches)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Raw scores ``(..., n_branches)`` for instances ``h`` of shape ``(..., L)``."""
        return self.w(self.a(h) * self.b(h))


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None, dim: int) -> torch.Tensor:
    """Softmax over ``dim`` ignoring positions where ``mask`` is False.

    A row with no valid position gets all-zero weights (never NaN).
    """
    if mask is None:
        return torch.softmax(scores, dim=dim)
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=dim)
    return torch.nan_to_num(weights, nan=0.0)


def attention_pool(
    h: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool instances ``h (B, N, L)`` with scores ``(B, N)``; returns ``(pooled, weights)``."""
    weights = masked_softmax(scores, mask, dim=1)
    return torch.einsum("bn,bnl->bl", weights, h), weights
