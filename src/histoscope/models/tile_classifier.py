"""Tile classifier: a registered backbone plus a linear head (e.g. tumour vs normal)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from histoscope.models.backbones import create_backbone


class CalibratedLinear(nn.Linear):
    """A linear layer whose logits are then scaled and shifted per output.

    ``forward(x) = (x W^T + b) * logit_scale + logit_shift``. The two buffers
    hold a calibration fitted after training (per-output temperature and bias,
    :func:`histoscope.training.metrics.fit_logit_affine`); they are saved with
    the weights, so every path that applies the head (the whole model, or the
    head alone on cached backbone features) gives calibrated logits.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features)
        self.register_buffer("logit_scale", torch.ones(out_features))
        self.register_buffer("logit_shift", torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.logit_scale + self.logit_shift

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """The logits before calibration."""
        return super().forward(x)


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
    calibrated
        Give the head per-output calibration buffers (:class:`CalibratedLinear`);
        a checkpoint made before calibration existed has none and loads as before.
    """

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        dropout: float = 0.0,
        backbone_kwargs: Mapping[str, Any] | None = None,
        calibrated: bool = False,
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
        head = CalibratedLinear if calibrated else nn.Linear
        self.head = head(bb.feature_dim, num_classes)
        if calibrated:
            self.config["calibrated"] = True

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TileClassifier:
        """Rebuild from :attr:`config` (as stored in a checkpoint card)."""
        return cls(**config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.backbone(x)))

    def raw_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits before any calibration (what a calibration is fitted on)."""
        feats = self.dropout(self.backbone(x))
        return self.head.raw(feats) if isinstance(self.head, CalibratedLinear) else self.head(feats)

    def set_calibration(self, scale: Sequence[float], shift: Sequence[float]) -> None:
        """Apply ``logits * scale + shift`` per output from now on (and in saved checkpoints).

        Raises
        ------
        ValueError
            If ``scale`` or ``shift`` has the wrong length, or a scale is not positive.
        """
        k = self.config["num_classes"]
        s = torch.as_tensor(scale, dtype=torch.float32).flatten()
        b = torch.as_tensor(shift, dtype=torch.float32).flatten()
        if s.numel() != k or b.numel() != k:
            raise ValueError(f"calibration needs {k} scales and {k} shifts, "
                             f"got {s.numel()} and {b.numel()}")  # fmt: skip
        if not bool((s > 0).all()) or not bool(torch.isfinite(b).all()):
            raise ValueError(f"calibration scales must be positive and shifts finite, "
                             f"got {s.tolist()} and {b.tolist()}")  # fmt: skip
        if not isinstance(self.head, CalibratedLinear):
            old = self.head
            self.head = CalibratedLinear(old.in_features, old.out_features).to(old.weight.device)
            self.head.load_state_dict({**old.state_dict(), "logit_scale": torch.ones(k),
                                       "logit_shift": torch.zeros(k)})  # fmt: skip
            self.config["calibrated"] = True
        self.head.logit_scale.copy_(s)
        self.head.logit_shift.copy_(b)
