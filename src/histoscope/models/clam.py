"""CLAM attention MIL (Lu et al. 2021) and a mean-pooling baseline over tile features.

A slide is a bag of tile feature vectors ``(N, D)``. CLAM maps each one
through ``Linear(D, hidden) + ReLU + Dropout``, scores it with gated
attention (``hidden -> attn_hidden``), pools the tiles with the softmax of
the scores and classifies the pooled vector. The single-branch variant
(CLAM-SB) has one attention branch and one linear classifier; the
multi-branch variant (CLAM-MB) has one attention branch and one
``Linear(hidden, 1)`` classifier per class. Instance classifiers (one per
class) are trained on the ``k`` most and least attended tiles of each bag as
pseudo-labelled positives and negatives; the training loss is
``bag_weight * bag CE + (1 - bag_weight) * instance loss``.

With ``max_branch`` (off by default; CLAM has no such branch) a linear tile
scorer reads every projected tile and its highest score over the bag is added
to the tumour-vs-normal logit of the attention head, so one strongly tumour-like
tile can carry the slide without the softmax diluting it among a hundred others
(max-instance MIL). The bag loss then averages the cross-entropies of the
combined logits, of the attention head alone and of the max branch alone, so
each branch is trained to decide by itself too.

:class:`MeanPoolMIL` has the same interface with uniform weights instead of
attention, for comparison. Both return a dict with ``logits (B, C)``,
``attention (B, K, N)`` (weights summing to 1 over the valid tiles of each
branch, 0 on padding; ``K`` = 1 for single-branch and mean pooling, ``C``
for multi-branch) and ``scores`` (raw attention logits, ``-inf`` on padding).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from histoscope.models.attention import GatedAttention, masked_softmax

VARIANTS = ("sb", "mb", "mean")
INSTANCE_LOSSES = ("svm", "ce")


def smooth_svm_loss(
    logits: torch.Tensor, target: torch.Tensor, alpha: float = 1.0, tau: float = 1.0
) -> torch.Tensor:
    """Smooth top-1 multiclass SVM loss (Berrada et al. 2018), as CLAM's default.

    ``tau * log sum_j exp((alpha [j != y] + s_j - s_y) / tau)``, averaged over rows.

    Parameters
    ----------
    logits
        ``(M, C)`` scores.
    target
        ``(M,)`` class indices.
    alpha
        Margin.
    tau
        Smoothing temperature (the hinge is recovered as ``tau -> 0``).

    Returns
    -------
    torch.Tensor
        Scalar loss.
    """
    margin = alpha * (1.0 - F.one_hot(target, logits.shape[1]).to(logits.dtype))
    true = logits.gather(1, target[:, None])
    return (tau * torch.logsumexp((logits + margin - true) / tau, dim=1)).mean()


def _as_batch(
    h: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if h.ndim == 2:
        h = h[None]
        mask = None if mask is None else mask.reshape(1, -1)
    if h.ndim != 3:
        raise ValueError(f"tile features must be (N, D) or (B, N, D), got shape {tuple(h.shape)}")
    if mask is not None:
        mask = mask.to(torch.bool)
        if mask.shape != h.shape[:2]:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match tiles {h.shape[:2]}")
    return h, mask


class _MILBase(nn.Module):
    """What CLAM and mean pooling share: the tile projection and the config."""

    variant = "sb"

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 2,
        hidden: int = 512,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        if int(in_dim) < 1 or int(n_classes) < 2 or int(hidden) < 1:
            raise ValueError(
                f"in_dim and hidden must be >= 1 and n_classes >= 2, got in_dim={in_dim}, "
                f"hidden={hidden}, n_classes={n_classes}"
            )
        self.in_dim, self.n_classes, self.hidden = int(in_dim), int(n_classes), int(hidden)
        self.fc = nn.Sequential(nn.Linear(self.in_dim, self.hidden), nn.ReLU(), nn.Dropout(dropout))
        self.dropout = float(dropout)

    def _check_dim(self, h: torch.Tensor) -> None:
        if h.shape[-1] != self.in_dim:
            raise ValueError(
                f"tile features have {h.shape[-1]} dimensions, the model expects {self.in_dim}"
            )

    def loss(
        self, h: torch.Tensor, label: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Bag cross-entropy (subclasses add their own terms).

        Parameters
        ----------
        h
            ``(N, D)`` or ``(B, N, D)`` tile features.
        label
            Bag class indices, ``()`` or ``(B,)``.
        mask
            Optional ``(B, N)`` validity mask (False on padding).

        Returns
        -------
        loss, parts
            The scalar training loss and its parts as floats.
        """
        out = self(h, mask)
        bag = F.cross_entropy(out["logits"], label.reshape(-1).long())
        return bag, {"bag": float(bag.detach())}


class CLAM(_MILBase):
    """CLAM-SB or CLAM-MB over precomputed tile features.

    Parameters
    ----------
    in_dim
        Tile feature size ``D``.
    n_classes
        Slide classes.
    hidden
        Size after the first linear layer (512 in CLAM).
    attn_hidden
        Gated attention hidden size (256 in CLAM).
    dropout
        Dropout after the first layer and on the attention gates.
    multi_branch
        CLAM-MB (one attention branch and classifier per class) instead of CLAM-SB.
    k_sample
        Tiles taken from each end of the attention ranking for the instance loss.
    instance_loss
        ``"svm"`` (smooth top-1 SVM, CLAM's default) or ``"ce"``.
    bag_weight
        Weight of the bag loss; the instance loss gets ``1 - bag_weight``.
    subtyping
        Also push the top-``k`` tiles of the other classes' branches to
        "negative" (CLAM's subtyping mode for mutually exclusive classes).
    max_branch
        Add the max-instance branch (two classes only): the slide's last-class
        logit gains the highest tile score of a ``Linear(hidden, 1)`` scorer.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 2,
        hidden: int = 512,
        attn_hidden: int = 256,
        dropout: float = 0.25,
        multi_branch: bool = False,
        k_sample: int = 8,
        instance_loss: str = "svm",
        bag_weight: float = 0.7,
        subtyping: bool = False,
        max_branch: bool = False,
    ) -> None:
        super().__init__(in_dim, n_classes, hidden, dropout)
        if max_branch and self.n_classes != 2:
            raise ValueError(f"max_branch needs two classes, got n_classes={n_classes}")
        if instance_loss not in INSTANCE_LOSSES:
            raise ValueError(
                f"instance_loss must be one of {INSTANCE_LOSSES}, got {instance_loss!r}"
            )
        if not 0.0 <= float(bag_weight) <= 1.0:
            raise ValueError(f"bag_weight must be in [0, 1], got {bag_weight}")
        if int(k_sample) < 1:
            raise ValueError(f"k_sample must be at least 1, got {k_sample}")
        self.multi_branch = bool(multi_branch)
        self.variant = "mb" if self.multi_branch else "sb"
        self.n_branches = self.n_classes if self.multi_branch else 1
        self.attention = GatedAttention(self.hidden, int(attn_hidden), dropout, self.n_branches)
        if self.multi_branch:
            self.classifiers = nn.ModuleList(nn.Linear(self.hidden, 1) for _ in range(n_classes))
        else:
            self.classifiers = nn.ModuleList([nn.Linear(self.hidden, self.n_classes)])
        self.instance_classifiers = nn.ModuleList(
            nn.Linear(self.hidden, 2) for _ in range(self.n_classes)
        )
        self.k_sample, self.instance_loss_name = int(k_sample), instance_loss
        self.bag_weight, self.subtyping = float(bag_weight), bool(subtyping)
        self.max_branch = bool(max_branch)
        if self.max_branch:
            self.tile_scorer = nn.Linear(self.hidden, 1)
        self.config = {
            "variant": self.variant,
            "in_dim": self.in_dim,
            "n_classes": self.n_classes,
            "hidden": self.hidden,
            "attn_hidden": int(attn_hidden),
            "dropout": self.dropout,
            "k_sample": self.k_sample,
            "instance_loss": instance_loss,
            "bag_weight": self.bag_weight,
            "subtyping": self.subtyping,
        }
        if self.max_branch:  # only then, so older cards and readers see the config they know
            self.config["max_branch"] = True

    def embed(
        self, h: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Projected tiles ``(B, N, hidden)``, raw scores ``(B, K, N)`` and the mask."""
        h, mask = _as_batch(h, mask)
        self._check_dim(h)
        z = self.fc(h)
        scores = self.attention(z).transpose(1, 2)  # (B, K, N)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        return z, scores, mask

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Slide logits and attention for tile features ``(N, D)`` or ``(B, N, D)``.

        Parameters
        ----------
        h
            Tile features.
        mask
            Optional ``(B, N)`` bool, False on padding tiles.

        Returns
        -------
        dict
            ``logits (B, C)``, ``attention (B, K, N)``, ``scores (B, K, N)``,
            ``pooled (B, K, hidden)``; with ``max_branch`` also
            ``attention_logits`` and ``max_logits`` ``(B, C)`` (the two
            branches alone; ``logits`` is their sum) and ``tile_scores (B, N)``
            (``-inf`` on padding).
        """
        z, scores, mask = self.embed(h, mask)
        return self._head(z, scores, mask)

    def _head(
        self, z: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        weights = masked_softmax(scores, None if mask is None else mask[:, None, :], dim=2)
        pooled = torch.einsum("bkn,bnh->bkh", weights, z)
        if self.multi_branch:
            logits = torch.cat([c(pooled[:, i]) for i, c in enumerate(self.classifiers)], dim=1)
        else:
            logits = self.classifiers[0](pooled[:, 0])
        out = {"logits": logits, "attention": weights, "scores": scores, "pooled": pooled}
        if self.max_branch:
            tile = self.tile_scorer(z)[..., 0]  # (B, N)
            if mask is not None:
                tile = tile.masked_fill(~mask, float("-inf"))
            top = tile.max(dim=1).values
            max_logits = torch.stack([torch.zeros_like(top), top], dim=1)
            out.update(logits=logits + max_logits, attention_logits=logits,
                       max_logits=max_logits, tile_scores=tile)  # fmt: skip
        return out

    def instance_targets(
        self, scores: torch.Tensor, n_valid: int, positive: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices and pseudo-labels CLAM trains an instance classifier on.

        Parameters
        ----------
        scores
            ``(N,)`` attention scores of one branch (``-inf`` on padding).
        n_valid
            Number of valid tiles.
        positive
            In-class branch: top-``k`` -> 1 and bottom-``k`` -> 0. Out-of-class:
            top-``k`` -> 0 only.

        Returns
        -------
        index, target
            Tile indices and 0/1 targets (empty when the bag has < 2 tiles).
        """
        k = min(self.k_sample, n_valid // 2)
        if k == 0:
            return scores.new_zeros(0, dtype=torch.long), scores.new_zeros(0, dtype=torch.long)
        top = torch.topk(scores, k).indices
        if not positive:
            return top, torch.zeros(k, dtype=torch.long, device=scores.device)
        finite = torch.where(torch.isfinite(scores), scores, torch.full_like(scores, float("inf")))
        bottom = torch.topk(-finite, k).indices
        target = torch.cat([torch.ones(k), torch.zeros(k)]).long().to(scores.device)
        return torch.cat([top, bottom]), target

    def instance_loss(
        self,
        z: torch.Tensor,
        scores: torch.Tensor,
        label: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """CLAM's instance loss on the top/bottom-``k`` attended tiles, averaged over bags."""
        fn = smooth_svm_loss if self.instance_loss_name == "svm" else F.cross_entropy
        label = label.reshape(-1)
        total = z.new_zeros(())
        for b in range(z.shape[0]):
            n_valid = int(mask[b].sum()) if mask is not None else z.shape[1]
            terms = []
            for c, clf in enumerate(self.instance_classifiers):
                in_class = c == int(label[b])
                if not in_class and not self.subtyping:
                    continue
                branch = scores[b, c if self.multi_branch else 0]
                idx, target = self.instance_targets(branch, n_valid, in_class)
                if len(idx):
                    terms.append(fn(clf(z[b, idx]), target))
            if terms:
                total = total + torch.stack(terms).mean()
        return total / z.shape[0]

    def loss(
        self, h: torch.Tensor, label: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """``bag_weight * CE(slide) + (1 - bag_weight) * instance loss``.

        Parameters
        ----------
        h
            ``(N, D)`` or ``(B, N, D)`` tile features.
        label
            Bag class indices, ``()`` or ``(B,)``.
        mask
            Optional ``(B, N)`` validity mask.

        Returns
        -------
        loss, parts
            Scalar loss and ``{"bag", "instance"}`` as floats.
        """
        z, scores, mask = self.embed(h, mask)
        out = self._head(z, scores, mask)
        label = label.reshape(-1).long()
        bag = F.cross_entropy(out["logits"], label)
        if self.max_branch:
            bag = (bag + F.cross_entropy(out["attention_logits"], label)
                   + F.cross_entropy(out["max_logits"], label)) / 3.0  # fmt: skip
        inst = self.instance_loss(z, scores, label, mask)
        total = self.bag_weight * bag + (1.0 - self.bag_weight) * inst
        return total, {"bag": float(bag.detach()), "instance": float(inst.detach())}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> CLAM:
        """Rebuild from :attr:`config`."""
        cfg = dict(config)
        variant = cfg.pop("variant", "sb")
        if variant not in ("sb", "mb"):
            raise ValueError(f"CLAM variant must be 'sb' or 'mb', got {variant!r}")
        return cls(multi_branch=variant == "mb", **cfg)


class MeanPoolMIL(_MILBase):
    """Baseline: the same tile projection, averaged over tiles, then a linear classifier.

    Parameters
    ----------
    in_dim, n_classes, hidden, dropout
        As for :class:`CLAM`.
    """

    variant = "mean"

    def __init__(
        self, in_dim: int, n_classes: int = 2, hidden: int = 512, dropout: float = 0.25
    ) -> None:
        super().__init__(in_dim, n_classes, hidden, dropout)
        self.classifier = nn.Linear(self.hidden, self.n_classes)
        self.config = {"variant": "mean", "in_dim": self.in_dim, "n_classes": self.n_classes,
                       "hidden": self.hidden, "dropout": self.dropout}  # fmt: skip

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Slide logits and the uniform weights ``(B, 1, N)`` (1/n on valid tiles)."""
        h, mask = _as_batch(h, mask)
        self._check_dim(h)
        z = self.fc(h)
        scores = z.new_zeros(z.shape[0], 1, z.shape[1])
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        weights = masked_softmax(scores, None if mask is None else mask[:, None, :], dim=2)
        pooled = torch.einsum("bkn,bnh->bkh", weights, z)
        logits = self.classifier(pooled[:, 0])
        return {"logits": logits, "attention": weights, "scores": scores, "pooled": pooled}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> MeanPoolMIL:
        """Rebuild from :attr:`config`."""
        cfg = dict(config)
        cfg.pop("variant", None)
        return cls(**cfg)


def build_mil(config: Mapping[str, Any]) -> CLAM | MeanPoolMIL:
    """Checkpoint family builder: :class:`CLAM` (``variant`` sb/mb) or :class:`MeanPoolMIL`.

    Raises
    ------
    ValueError
        On an unknown ``variant``.
    """
    variant = config.get("variant", "sb")
    if variant not in VARIANTS:
        raise ValueError(f"MIL variant must be one of {VARIANTS}, got {variant!r}")
    return (MeanPoolMIL if variant == "mean" else CLAM).from_config(config)
