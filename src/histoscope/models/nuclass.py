"""NuClass (SYSTEMS.md section 2): a cell's type from its own look and from its neighbourhood.

Three parts, trained in three stages (``histoscope.training.nuclass``):

- **local path**: a small fully convolutional trunk over the 224 px crop at
  0.5 µm/px; the feature map is pooled at the nucleus with RoIAlign
  (RoIAlign, :func:`histoscope.models._roi.roi_align`, a ``box_um`` box on a ``grid x grid``
  grid) -> LayerNorm -> FiLM tissue conditioning (``f * (1 + gamma) + beta``
  from an organ embedding; the last embedding is the "unknown" organ used by
  default on a user's slide; a name not among the tissues is refused) -> MLP head.
- **global path**: a second trunk over the context (1024 px at 0.5 µm/px
  averaged 2 x 2 to 512 px at 1 µm/px) pooled at the cell over nested boxes,
  concatenated, as in the authors' ``PathB``, with the local path's features;
  each projected, then an MLP head.
- **gate**: ``g = sigmoid(MLP([proj(local features), proj(global features),
  8 statistics]))`` and ``p = (1 - g) p_local + g p_global``. Each path's
  probabilities and the fused output have a temperature (buffers fitted on
  validation cells after each stage).

Both trunks are fully convolutional and pool at a point, so the same weights
run per cell on crops (the reference path, :meth:`NuClass.forward`) or once
per tile with every nucleus of the tile pooled from one feature map (the fast
path, :meth:`NuClass.local_map` / :meth:`NuClass.context_map` +
:meth:`NuClass.pool_local` / :meth:`NuClass.pool_context` + :meth:`NuClass.heads`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from histoscope.errors import HistoScopeError

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
UNKNOWN = "unknown"

DEFAULT_CONFIG: dict[str, Any] = {
    "classes": [],
    "tissues": [UNKNOWN],
    "local": {"widths": [16, 32, 48, 64], "strides": [2, 2, 2, 1], "box_um": 24.0, "grid": 3,
              "mpp": 0.5, "crop": 224},
    "context": {"widths": [16, 32, 48, 64], "strides": [2, 2, 2, 1], "pool_in": 2,
                "boxes_um": [32.0, 96.0, 256.0], "grids": [2, 1, 1], "mpp": 1.0, "crop": 512,
                "read": 1024},
    "film_dim": 16,
    "hidden": 128,
    "proj": 64,
    "gate_proj": 32,
    "gate_hidden": [64, 32],
    "dropout": 0.1,
}  # fmt: skip


class UnknownOrganError(HistoScopeError, ValueError):
    """An organ name that is not one of the model's tissues (the message lists them)."""


def normalised_entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy of each row of ``p`` divided by ``log(C)``: 1 for uniform, 0 for one-hot."""
    ent = -(p * p.clamp_min(1e-12).log()).sum(dim=-1)
    return ent / math.log(p.shape[-1])


def path_stats(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Max probability, normalised entropy and top-2 margin of each row."""
    top2 = p.topk(k=min(2, p.shape[1]), dim=1).values
    margin = top2[:, 0] - (top2[:, 1] if top2.shape[1] > 1 else 0.0)
    return top2[:, 0], normalised_entropy(p), margin


def gate_statistics(p_local: torch.Tensor, p_global: torch.Tensor) -> torch.Tensor:
    """The gate's 8 statistics ``(B, 8)``: per path max, entropy, margin; the max difference and |.|."""
    lm, le, lg = path_stats(p_local)
    gm, ge, gg = path_stats(p_global)
    delta = gm - lm
    return torch.stack([lm, gm, le, ge, lg, gg, delta, delta.abs()], dim=1)


def gate_target(
    p_local: torch.Tensor, p_global: torch.Tensor, y: torch.Tensor, k: float = 10.0
) -> torch.Tensor:
    """The three-rule gate target.

    1 where only the global path is right, 0 where only the local path is
    right, else ``sigmoid(k (p_global(y) - p_local(y)))``.
    """
    idx = torch.arange(len(y), device=y.device)
    right_l = p_local.argmax(1) == y
    right_g = p_global.argmax(1) == y
    soft = torch.sigmoid(k * (p_global[idx, y] - p_local[idx, y]))
    one, zero = torch.ones_like(soft), torch.zeros_like(soft)
    return torch.where(right_g & ~right_l, one, torch.where(right_l & ~right_g, zero, soft))


def fuse(p_local: torch.Tensor, p_global: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``(1 - g) p_local + g p_global`` row by row."""
    g = g[:, None]
    return (1 - g) * p_local + g * p_global


def temper(p: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """Probabilities ``p`` sharpened or flattened by temperature ``t`` (``softmax(log p / t)``)."""
    return torch.softmax(p.clamp_min(1e-12).log() / t, dim=-1)


class FiLM(nn.Module):
    """Feature-wise linear modulation ``f * (1 + gamma) + beta`` from a conditioning vector.

    The output layer starts at zero, so a fresh FiLM is the identity.
    """

    def __init__(self, cond_dim: int, feat_dim: int) -> None:
        super().__init__()
        self.out = nn.Linear(cond_dim, 2 * feat_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, f: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.out(cond).chunk(2, dim=-1)
        return f * (1 + gamma) + beta


class Trunk(nn.Module):
    """Conv-BN-ReLU layers (3 x 3, given strides); an optional average pool in front.

    Output stride is ``pool_in * prod(strides)`` input pixels per map pixel.
    """

    def __init__(self, widths: Sequence[int], strides: Sequence[int], pool_in: int = 1) -> None:
        super().__init__()
        if len(widths) != len(strides):
            raise ValueError("widths and strides must have the same length")
        layers: list[nn.Module] = [nn.AvgPool2d(pool_in)] if pool_in > 1 else []
        cin = 3
        for cout, s in zip(widths, strides, strict=True):
            layers += [nn.Conv2d(cin, cout, 3, stride=s, padding=1, bias=False),
                       nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]  # fmt: skip
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.channels = cin
        self.stride = int(pool_in * math.prod(strides))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def roi_pool(
    fmap: torch.Tensor, index: torch.Tensor, xy: torch.Tensor, box: float, grid: int, stride: int
) -> torch.Tensor:
    """Features ``(K, C * grid * grid)`` of square boxes of ``box`` input px centred at ``xy``.

    Parameters
    ----------
    fmap
        ``(B, C, h, w)`` feature map.
    index
        ``(K,)`` image of each box in the batch.
    xy
        ``(K, 2)`` box centres ``(x, y)`` in input pixels (pixel centres at ``i + 0.5``).
    box, grid, stride
        Box edge (input px), output grid and the map's stride.
    """
    from histoscope.models._roi import roi_align  # torchvision's loads Triton: see _roi

    h = box / 2
    rois = torch.cat([index[:, None].to(fmap.dtype), xy - h, xy + h], dim=1)
    out = roi_align(fmap, rois, output_size=grid, spatial_scale=1.0 / stride,
                    sampling_ratio=2)  # fmt: skip
    return out.flatten(1)


class NuClass(nn.Module):
    """Local path, global path and gate of NuClass (see the module docstring).

    Parameters
    ----------
    config
        :data:`DEFAULT_CONFIG` with ``classes`` and ``tissues`` filled in
        (``tissues`` must end with ``"unknown"``); missing keys take the defaults.
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        cfg = {**DEFAULT_CONFIG, **dict(config)}
        cfg["local"] = {**DEFAULT_CONFIG["local"], **dict(cfg["local"])}
        cfg["context"] = {**DEFAULT_CONFIG["context"], **dict(cfg["context"])}
        cfg["classes"] = [str(c) for c in cfg["classes"]]
        cfg["tissues"] = [str(t) for t in cfg["tissues"]]
        if len(cfg["classes"]) < 2:
            raise ValueError("NuClass needs at least two classes")
        if not cfg["tissues"] or cfg["tissues"][-1] != UNKNOWN:
            raise ValueError(f"tissues must end with {UNKNOWN!r}, got {cfg['tissues']}")
        self.config = cfg
        n_cls, lc, cc = len(cfg["classes"]), cfg["local"], cfg["context"]
        drop, hid = float(cfg["dropout"]), int(cfg["hidden"])
        # local path
        self.local_trunk = Trunk(lc["widths"], lc["strides"])
        d_loc = self.local_trunk.channels * int(lc["grid"]) ** 2
        self.local_norm = nn.LayerNorm(d_loc)
        self.tissue_embed = nn.Embedding(len(cfg["tissues"]), int(cfg["film_dim"]))
        self.film = FiLM(int(cfg["film_dim"]), d_loc)
        self.local_head = nn.Sequential(nn.Linear(d_loc, hid), nn.ReLU(), nn.Dropout(drop),
                                        nn.Linear(hid, n_cls))  # fmt: skip
        # global path
        self.context_trunk = Trunk(cc["widths"], cc["strides"], int(cc["pool_in"]))
        if len(cc["boxes_um"]) != len(cc["grids"]):
            raise ValueError("context boxes_um and grids must have the same length")
        d_ctx = self.context_trunk.channels * sum(int(g) ** 2 for g in cc["grids"])
        proj = int(cfg["proj"])
        self.proj_local = nn.Sequential(nn.LayerNorm(d_loc), nn.Linear(d_loc, proj))
        self.proj_context = nn.Sequential(nn.LayerNorm(d_ctx), nn.Linear(d_ctx, proj))
        self.global_head = nn.Sequential(nn.Dropout(drop), nn.Linear(2 * proj, hid), nn.ReLU(),
                                         nn.Dropout(drop), nn.Linear(hid, n_cls))  # fmt: skip
        # gate
        gp = int(cfg["gate_proj"])
        h1, h2 = (int(v) for v in cfg["gate_hidden"])
        self.gate_local = nn.Sequential(nn.LayerNorm(d_loc), nn.Linear(d_loc, gp), nn.SiLU())
        self.gate_global = nn.Sequential(nn.LayerNorm(2 * proj), nn.Linear(2 * proj, gp), nn.SiLU())
        self.gate_mlp = nn.Sequential(nn.Linear(2 * gp + 8, h1), nn.SiLU(), nn.Dropout(drop),
                                      nn.Linear(h1, h2), nn.SiLU(), nn.Linear(h2, 1))  # fmt: skip
        self.register_buffer("temperature", torch.ones(3))  # local, global, fused
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> NuClass:
        """Rebuild from :attr:`config` (as stored in a checkpoint card)."""
        return cls(config)

    # ----------------------------------------------------------- properties
    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.config["classes"])

    @property
    def unknown_tissue(self) -> int:
        """Index of the "unknown" organ token."""
        return len(self.config["tissues"]) - 1

    def tissue_index(self, organ: str | None) -> int:
        """Token of ``organ`` (case and surrounding spaces ignored).

        ``None``, a blank name and ``"unknown"`` give the "unknown" token.

        Raises
        ------
        UnknownOrganError
            ``organ`` is not one of the model's ``tissues``: a typo or an organ
            the model was not trained on must not silently lose its conditioning.
        """
        names = self.config["tissues"]
        key = "" if organ is None else str(organ).strip().lower()
        if not key:
            return self.unknown_tissue
        if key not in names:
            known = ", ".join(repr(t) for t in names[:-1]) or "none"
            raise UnknownOrganError(
                f"organ {organ!r} is not a tissue this NuClass model knows; valid organs: "
                f"{known} (or None / {UNKNOWN!r} for an organ it was not trained on)"
            )
        return names.index(key)

    # ------------------------------------------------------------ building blocks
    def normalise(self, img: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, H, W, 3)`` or ``(B, 3, H, W)`` -> normalised float ``(B, 3, H, W)``."""
        if img.shape[-1] == 3 and img.shape[1] != 3:
            img = img.permute(0, 3, 1, 2)
        x = img.float() / 255.0
        return (x - self.mean) / self.std

    def local_map(self, x: torch.Tensor) -> torch.Tensor:
        """Local trunk feature map of normalised images at the local µm/px."""
        return self.local_trunk(x)

    def context_map(self, x: torch.Tensor) -> torch.Tensor:
        """Context trunk feature map of normalised images at the context µm/px."""
        return self.context_trunk(x)

    def pool_local(self, fmap: torch.Tensor, index: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
        """Raw local features at nuclei ``xy`` (local-crop pixels)."""
        lc = self.config["local"]
        box = float(lc["box_um"]) / float(lc["mpp"])
        return roi_pool(fmap, index, xy, box, int(lc["grid"]), self.local_trunk.stride)

    def pool_context(
        self, fmap: torch.Tensor, index: torch.Tensor, xy: torch.Tensor
    ) -> torch.Tensor:
        """Raw context features at cells ``xy`` (context pixels), nested boxes concatenated."""
        cc = self.config["context"]
        s = self.context_trunk.stride
        return torch.cat([roi_pool(fmap, index, xy, float(b) / float(cc["mpp"]), int(g), s)
                          for b, g in zip(cc["boxes_um"], cc["grids"], strict=True)], dim=1)  # fmt: skip

    def local_features(self, raw: torch.Tensor, tissue: torch.Tensor) -> torch.Tensor:
        """LayerNorm + FiLM of raw local features (the pre-head features)."""
        return self.film(self.local_norm(raw), self.tissue_embed(tissue))

    def local_logits(
        self, raw: torch.Tensor, tissue: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, features)`` of the local path from raw pooled features."""
        f = self.local_features(raw, tissue)
        return self.local_head(f), f

    def global_logits(
        self, local_feat: torch.Tensor, raw_ctx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, fused features)`` of the global path (local features are not trained here)."""
        fused = torch.cat([self.proj_local(local_feat.detach()), self.proj_context(raw_ctx)], 1)
        return self.global_head(fused), fused

    def gate_logit(self, local_feat, global_feat, p_local, p_global) -> torch.Tensor:
        """Gate logit ``(B,)`` from projected features and the 8 statistics."""
        z = torch.cat([self.gate_local(local_feat), self.gate_global(global_feat),
                       gate_statistics(p_local, p_global)], dim=1)  # fmt: skip
        return self.gate_mlp(z)[:, 0]

    def heads(
        self, raw_local: torch.Tensor, raw_ctx: torch.Tensor, tissue: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Everything after pooling: both paths, the gate and the fused probabilities.

        Returns
        -------
        dict
            ``z_local``, ``z_global`` (logits), ``p_local``, ``p_global`` (tempered),
            ``g_logit``, ``g``, ``mix`` (``(1-g) p_local + g p_global``) and
            ``prob`` (``mix`` with the fused temperature).
        """
        z_l, f_l = self.local_logits(raw_local, tissue)
        z_g, f_g = self.global_logits(f_l, raw_ctx)
        t = self.temperature
        p_l = torch.softmax(z_l / t[0], 1)
        p_g = torch.softmax(z_g / t[1], 1)
        g_logit = self.gate_logit(f_l, f_g, p_l, p_g)
        g = torch.sigmoid(g_logit)
        mix = fuse(p_l, p_g, g)
        return {"z_local": z_l, "z_global": z_g, "p_local": p_l, "p_global": p_g,
                "g_logit": g_logit, "g": g, "mix": mix, "prob": temper(mix, t[2])}  # fmt: skip

    # ------------------------------------------------------------ crop path
    def crop_features(
        self, local: torch.Tensor, context: torch.Tensor,
        local_xy: torch.Tensor | None = None, context_xy: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Raw pooled features of one cell per crop (cells at the crop centres by default)."""
        b = local.shape[0]
        idx = torch.arange(b, device=local.device)
        if local_xy is None:
            local_xy = torch.tensor([[local.shape[3] / 2, local.shape[2] / 2]]).expand(b, 2)
        if context_xy is None:
            context_xy = torch.tensor([[context.shape[3] / 2, context.shape[2] / 2]]).expand(b, 2)
        raw_l = self.pool_local(self.local_map(local), idx, local_xy.to(local.dtype))
        raw_c = self.pool_context(self.context_map(context), idx, context_xy.to(context.dtype))
        return raw_l, raw_c

    def forward(
        self, local: torch.Tensor, context: torch.Tensor, tissue: torch.Tensor,
        local_xy: torch.Tensor | None = None, context_xy: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        """The reference (crop) path on normalised crops; see :meth:`heads` for the outputs.

        Parameters
        ----------
        local
            ``(B, 3, H, W)`` local crops at the local µm/px (224 px).
        context
            ``(B, 3, H', W')`` context crops at the context µm/px (512 px).
        tissue
            ``(B,)`` organ tokens.
        local_xy, context_xy
            ``(B, 2)`` cell positions ``(x, y)`` in each crop; default the centre.
        """
        raw_l, raw_c = self.crop_features(local, context, local_xy, context_xy)
        return self.heads(raw_l, raw_c, tissue)
