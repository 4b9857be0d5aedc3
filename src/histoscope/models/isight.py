"""iSight: IHC staining assessment from tiles, with metadata, in five heads.

Tiles (336 px in the paper) -> backbone -> Linear+ReLU -> gated attention over
the tiles of one image -> (+ metadata text embedding, + optional cell-type
embedding) -> five heads: intensity, location, quantity, tissue, malignancy.

Two pooling modes, named in the checkpoint card:

- ``"tile"``: one feature per tile (pooled backbone output), softmax over
  tiles. The cheaper choice.
- ``"token"``: the authors' code: backbone token/feature-map positions are kept,
  the softmax over tiles runs separately at every token position, and the
  pooled vectors are averaged over tokens.

Two input spaces, also named in the card:

- ``"rgb"``: the backbone sees the normalised RGB tiles.
- ``"od"``: the tiles are turned into optical density first,
  ``OD = -log10(I / 255)`` per channel (Beer-Lambert: linear in the amount of
  each stain, so DAB and haematoxylin add instead of multiplying), which is what
  colour deconvolution and a QuPath-style measurement work on. The first
  convolution can then learn the deconvolution as a linear map.

Metadata text (tissue, SNOMED, antibody) is encoded by a small trained
hashed bag-of-words encoder by default, so no tokenizer or weights need
downloading, or by a frozen CLIP text tower (``meta_encoder="open_clip:..."``,
see :mod:`histoscope.models.text`). In training it is dropped with
probability ``meta_dropout`` per sample; a sample without text (``None`` or
"": all-padding tokens) adds nothing, which is how the model runs on the
image alone.

Calibration is per case (:data:`CASES`): a head's logits are divided by the
temperature fitted on validation slides *with* the clinical text when the
sample has text, and by the one fitted on the *image alone* when it has none
(``temperatures`` in the card's config). Older cards carry one set, the
``temperature`` buffer, which then serves both cases.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from histoscope.labels import INTENSITY, ISIGHT_TASKS, LOCATION, MALIGNANCY, QUANTITY
from histoscope.models.attention import GatedAttention, masked_softmax
from histoscope.models.backbones import create_backbone
from histoscope.models.text import create_text_encoder, encode_metadata

__all__ = ["CASES", "INPUT_SPACES", "TASKS", "ISight", "encode_metadata", "to_optical_density"]

TASKS = ISIGHT_TASKS

#: What the backbone is given: normalised RGB or optical density.
INPUT_SPACES = ("rgb", "od")

#: The two cases a head is calibrated for: with the clinical text, and on the image alone.
CASES = ("text", "image")


def to_optical_density(rgb: torch.Tensor) -> torch.Tensor:
    """``-log10`` of intensities in [0, 1]: 0 on white glass, 2.4 on black (1/255)."""
    return -torch.log10(rgb.clamp(1.0 / 255.0, 1.0))


class ISight(nn.Module):
    """The iSight model. See the module docstring for the architecture.

    Parameters
    ----------
    backbone
        Registry name of the tile encoder.
    tissue_classes
        Names of the tissue head's classes (58 in the paper).
    dim
        Width after the projection (``L``; 1024 in the paper).
    hidden
        Gated attention hidden size (``D``; 256).
    pooling
        ``"tile"`` or ``"token"``.
    meta_buckets
        Hash buckets of the hashed metadata encoder (0 disables metadata).
    meta_encoder
        ``"hashed"`` or ``"open_clip:<model>"`` (:mod:`histoscope.models.text`).
    meta_weights
        Local open_clip weights for that text tower (read once, at construction;
        a saved checkpoint carries the tower's tensors itself, so the card does
        not need the file).
    n_cell_types
        Size of the optional cell-type embedding (0 disables it).
    dropout, meta_dropout
        Attention dropout; probability of dropping metadata per sample in training.
    input_space
        ``"rgb"`` or ``"od"`` (optical density; see the module docstring).
    temperatures
        ``{"text": {task: T}, "image": {task: T}}``: one temperature per head
        and case (see the module docstring); ``None`` uses the ``temperature``
        buffer for both.
    """

    def __init__(
        self,
        backbone: str,
        tissue_classes: Sequence[str],
        dim: int = 256,
        hidden: int = 128,
        pooling: str = "tile",
        meta_buckets: int = 4096,
        n_cell_types: int = 0,
        dropout: float = 0.25,
        meta_dropout: float = 0.5,
        backbone_kwargs: Mapping[str, Any] | None = None,
        input_space: str = "rgb",
        meta_encoder: str = "hashed",
        meta_weights: str | None = None,
        temperatures: Mapping[str, Mapping[str, float]] | None = None,
    ) -> None:
        super().__init__()
        if pooling not in ("tile", "token"):
            raise ValueError(f"pooling must be 'tile' or 'token', not {pooling!r}")
        if input_space not in INPUT_SPACES:
            raise ValueError(f"input_space must be one of {INPUT_SPACES}, not {input_space!r}")
        if pooling == "token" and (backbone_kwargs or {}).get("pool", "avg") != "avg":
            raise ValueError("pooling='token' keeps the feature map; use the backbone's pool='avg'")
        if not tissue_classes:
            raise ValueError("tissue_classes must name at least one class")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in (backbone_kwargs or {}).items()}
        bb = create_backbone(backbone, **kw)
        self.backbone = bb.module
        self.input_spec = bb.input_spec
        self.pooling = pooling
        self.classes = {"intensity": INTENSITY, "location": LOCATION, "quantity": QUANTITY,
                        "tissue": tuple(tissue_classes), "malignancy": MALIGNANCY}  # fmt: skip
        self.config = {
            "backbone": backbone, "tissue_classes": list(tissue_classes), "dim": dim,
            "hidden": hidden, "pooling": pooling, "meta_buckets": meta_buckets,
            "n_cell_types": n_cell_types, "dropout": dropout, "meta_dropout": meta_dropout,
            "backbone_kwargs": dict(bb.config),
        }  # fmt: skip
        self.input_space = input_space
        if input_space != "rgb":  # older cards have no key and mean RGB
            self.config["input_space"] = input_space
        if meta_encoder != "hashed":  # older cards: hashed
            self.config["meta_encoder"] = meta_encoder
        spec = self.input_spec
        self.register_buffer("_mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self.proj = nn.Sequential(nn.Linear(bb.feature_dim, dim), nn.ReLU())
        self.attention = GatedAttention(dim, hidden, dropout)
        self.meta = create_text_encoder(meta_encoder, dim, buckets=meta_buckets,
                                        weights=meta_weights)  # fmt: skip
        self.cell_type = nn.Embedding(n_cell_types, dim) if n_cell_types else None
        self.meta_dropout = meta_dropout
        self.heads = nn.ModuleDict({t: nn.Linear(dim, len(c)) for t, c in self.classes.items()})
        self.register_buffer("temperature", torch.ones(len(TASKS)))
        # per-case temperatures live in the card's config, not in the tensors
        self.register_buffer("_t_text", torch.ones(len(TASKS)), persistent=False)
        self.register_buffer("_t_image", torch.ones(len(TASKS)), persistent=False)
        self.per_case = False
        if temperatures is not None:
            self.set_temperatures(temperatures)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ISight:
        """Build from a checkpoint card's ``config``."""
        return cls(**dict(config))

    def set_temperatures(self, temperatures: Mapping[str, Mapping[str, float]] | None) -> None:
        """Use one temperature per head and case from now on (``None``: the buffer for both).

        Raises
        ------
        ValueError
            A case or head missing, or a temperature that is not a positive number.
        """
        if temperatures is None:
            self.per_case = False
            self.config.pop("temperatures", None)
            return
        plain: dict[str, dict[str, float]] = {}
        for case in CASES:
            given = dict((temperatures or {}).get(case) or {})
            missing = [t for t in TASKS if t not in given]
            if missing:
                raise ValueError(f"temperatures[{case!r}] lacks head(s) {missing}")
            values = [float(given[t]) for t in TASKS]
            if not all(v > 0 and v < float("inf") for v in values):
                raise ValueError(f"temperatures[{case!r}] must be positive numbers: {given}")
            getattr(self, f"_t_{case}").copy_(torch.tensor(values))
            plain[case] = dict(zip(TASKS, values, strict=True))
        self.config["temperatures"] = plain
        self.per_case = True

    def case_temperatures(self, has_text: torch.Tensor) -> torch.Tensor:
        """``(B, n_tasks)`` temperatures for samples with (True) or without (False) text."""
        if not self.per_case:
            return self.temperature.expand(len(has_text), -1)
        return torch.where(has_text[:, None], self._t_text, self._t_image)

    def has_text(self, meta_tokens: torch.Tensor | None, batch: int) -> torch.Tensor:
        """``(batch,)`` bool: which samples carry clinical text.

        The hashed encoder pads with 0, so a row of zeros is a sample without
        text; an open_clip tower encodes "" too, so there every row counts
        as text once any sample of the batch has some.
        """
        if self.meta is None or meta_tokens is None:
            return torch.zeros(batch, dtype=torch.bool, device=self.temperature.device)
        if isinstance(self.meta, nn.EmbeddingBag):
            return (meta_tokens != 0).any(dim=1).to(self.temperature.device)
        return torch.ones(batch, dtype=torch.bool, device=self.temperature.device)

    # ------------------------------------------------------------------ parts
    def tokenize(self, texts: Sequence[str | None]) -> torch.Tensor | None:
        """Metadata token ids for this model's text encoder; ``None`` without any text."""
        if self.meta is None or not any(texts):
            return None
        return self.meta.tokenize(list(texts))

    def encode_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        """``(B, N, 3, S, S)`` normalised tiles -> ``(B, N, L)`` or ``(B, N, T, L)``."""
        b, n = tiles.shape[:2]
        flat = tiles.flatten(0, 1)
        if self.input_space == "od":
            flat = to_optical_density(flat * self._std + self._mean)
        if self.pooling == "token":
            fmap = self.backbone.forward_features(flat)
            if fmap.ndim == 4:  # CNN: (BN, C, h, w) -> (BN, hw, C)
                fmap = fmap.flatten(2).transpose(1, 2)
            feats = self.proj(fmap)
            return feats.reshape(b, n, feats.shape[1], -1)
        return self.proj(self.backbone(flat)).reshape(b, n, -1)

    def pool(self, h: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention pooling over tiles; returns ``(pooled (B, L), weights (B, N))``."""
        scores = self.attention(h).squeeze(-1)  # (B, N) or (B, N, T)
        if h.ndim == 4:
            m = None if mask is None else mask[:, :, None].expand_as(scores)
            w = masked_softmax(scores, m, dim=1)  # softmax over tiles at every token
            pooled = torch.einsum("bnt,bntl->btl", w, h).mean(dim=1)
            return pooled, w.mean(dim=2)
        w = masked_softmax(scores, mask, dim=1)
        return torch.einsum("bn,bnl->bl", w, h), w

    def forward(
        self,
        tiles: torch.Tensor,
        mask: torch.Tensor | None = None,
        meta_tokens: torch.Tensor | None = None,
        cell_type: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Logits per task (scaled by each sample's case temperature) plus ``"attention"``.

        Parameters
        ----------
        tiles
            ``(B, N, 3, S, S)`` normalised tiles; padding tiles marked False in ``mask``.
        mask
            ``(B, N)`` bool, True for real tiles.
        meta_tokens
            ``(B, T)`` from :meth:`tokenize`, one row per sample.
        cell_type
            ``(B,)`` int cell-type ids, one per sample.
        """
        return self.classify(self.encode_tiles(tiles), mask, meta_tokens, cell_type)

    def classify(
        self,
        h: torch.Tensor,
        mask: torch.Tensor | None = None,
        meta_tokens: torch.Tensor | None = None,
        cell_type: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Pool encoded tiles ``h`` (from :meth:`encode_tiles`) and apply the heads."""
        pooled, weights = self.pool(h, mask)
        extra = torch.zeros_like(pooled)
        if self.meta is not None and meta_tokens is not None:
            extra = extra + self.meta(meta_tokens.to(pooled.device))
        if self.cell_type is not None and cell_type is not None:
            extra = extra + self.cell_type(cell_type.to(pooled.device))
        if self.training and self.meta_dropout > 0:
            keep = torch.rand(pooled.shape[0], 1, device=pooled.device) >= self.meta_dropout
            extra = extra * keep
        z = pooled + extra
        temp = self.case_temperatures(self.has_text(meta_tokens, len(z))).to(z.dtype)
        out = {t: self.heads[t](z) / temp[:, i : i + 1] for i, t in enumerate(TASKS)}
        out["attention"] = weights
        return out
