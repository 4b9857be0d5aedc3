"""Tile classifier: a registered backbone plus a linear head (e.g. tumour vs normal)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from histoscope.models.backbones import create_backbone


class TileClassifier(nn.Module):
    """Backbone features -> dropout -> linear logits, one row per tile.

    Parameters
    ----------
    backbone
        Registry name (see :func:`histoscope.models.create_backbone`).
    num_classes
        Number of output logits.
    dropout
        Dropout before the head (training only).
    backbone_kwargs
        Extra options for the backbone factory (``tile_size``, ``mpp``, ...).
    """

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        dropout: float = 0.0,
        backbone_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in (backbone_kwargs or {}).items()}
        bb = create_backbone(backbone, **kw)
        self.backbone = bb.module
        self.input_spec = bb.input_spec
        self.config = {
            "backbone": backbone,
            "num_classes": int(num_classes),
            "dropout": float(dropout),
            "backbone_kwargs": dict(bb.config),
        }
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(bb.feature_dim, num_classes)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TileClassifier:
        """Rebuild from :attr:`config` (as stored in a checkpoint card)."""
        return cls(**config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.backbone(x)))
