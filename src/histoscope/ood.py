"""Outside training data: how far a slide's features are from what a model was trained on.

A checkpoint's card may carry a :class:`FeatureReference` under
``card.data["ood"]``: the statistics of the features the model consumed in
training (their mean, a low-rank PCA basis with its eigenvalues and the
variance left outside it) and a slide-score threshold calibrated on held-out,
training-like slides. A task scores the slide's own features against it with
:func:`assess` and says plainly when the slide is outside what the model saw.

Score
-----
Each item (a tile, a cell, a patch, or the one row of a slide-level feature)
gets a low-rank Mahalanobis distance to the training features: the squared
standardised coordinates in the top ``rank`` principal directions plus the
squared residual over an isotropic residual variance, divided by the feature
dimension and square-rooted (so items drawn from the training distribution
score about 1 whatever the dimension). The slide's score is the **median** of
its items' distances: a few odd tiles (pen marks, folds, glass edges) do not
move it, a slide that is foreign as a whole does.

Threshold rule
--------------
Calibration slides are held out from the fit. Their log slide scores are
treated as normal (mean ``m``, standard deviation ``s`` with one degree of
freedom removed, floored at :data:`MIN_LOG_SD` so that a handful of very
similar slides does not give a razor-thin threshold); the threshold is
``exp(m + z(level) * s)``, where ``z(level)`` is the standard normal quantile,
and never below the largest calibration score. With the default ``level``
0.99 a training-like slide is flagged about 1 % of the time in theory; the
measured rate on fresh slides is in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from histoscope.errors import CheckpointError, HistoScopeWarning

if TYPE_CHECKING:
    from histoscope.checkpoints import ModelCard

__all__ = ["CANCELLED_MESSAGE", "MIN_ITEMS", "NO_REFERENCE_MESSAGE", "OUTSIDE_MESSAGE", "WITHIN_MESSAGE", "FeatureReference",
           "FeatureTap", "OODReport", "OutsideTrainingDataWarning", "assess", "assess_card",
           "fit_reference", "item_distances", "ood_summary", "reference_from_card",
           "slide_score", "warn_if_outside", "with_ood", "write_reference"]  # fmt: skip

#: What a task says when a slide is outside the training data.
OUTSIDE_MESSAGE = "outside training data: treat calls as unreliable"
#: What a task says when the slide is within it.
WITHIN_MESSAGE = "within training data"
#: What a task says when its checkpoint has no reference (cards older than issue 11).
NO_REFERENCE_MESSAGE = "no training-data reference in this checkpoint"
#: Key of the reference in ``card.data``.
CARD_KEY = "ood"
#: Smallest standard deviation of log calibration scores the threshold rule uses.
MIN_LOG_SD = 0.05
#: Items per slide used for the fit (a random subset beyond this; slides weigh alike).
MAX_FIT_ITEMS = 2000
#: Fewest items a slide is judged on, per kind of item. A median over fewer
#: tiles or patches (or a few dozen cells) says little about the slide as a
#: whole, so below these the report is unknown ("not judged: only N tiles").
MIN_ITEMS = {"tiles": 8, "patches": 8, "cells": 50}
#: What a task says when the run was cancelled (part of the slide read).
CANCELLED_MESSAGE = "not judged: run cancelled"


class OutsideTrainingDataWarning(HistoScopeWarning):
    """A slide's features are outside what the model was trained on."""


# ------------------------------------------------------------------ reference
@dataclass(frozen=True)
class FeatureReference:
    """Statistics of a model's training features and a calibrated slide threshold.

    Attributes
    ----------
    mean
        ``(d,)`` mean of the training items' features.
    basis
        ``(d, k)`` orthonormal principal directions (columns).
    eigenvalues
        ``(k,)`` variances along ``basis``.
    residual_var
        Mean variance per dimension outside ``basis``.
    threshold
        Slide score above which the slide is outside the training data.
    level
        Quantile the threshold was calibrated at (see the module's rule).
    n_fit, n_calib
        Slides used for the fit and for the calibration.
    features
        What the features are (which encoder, at which layer, on what input).
    calib_scores
        The calibration slides' scores (kept for the record).
    encoder_sha256
        Tensor hash of the checkpoint whose weights made the features
        (:func:`write_reference` fills it in); a checkpoint with other weights
        (retrained, or random for a baseline) is not compared against it.
    """

    mean: np.ndarray
    basis: np.ndarray
    eigenvalues: np.ndarray
    residual_var: float
    threshold: float
    level: float
    n_fit: int
    n_calib: int
    features: str = ""
    calib_scores: tuple[float, ...] = field(default=())
    encoder_sha256: str = ""

    @property
    def dim(self) -> int:
        """Feature dimension."""
        return int(self.mean.shape[0])

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON form (lists of floats), as stored in ``card.data["ood"]``."""
        return {
            "method": "low-rank Mahalanobis, median over items",
            "mean": [float(v) for v in self.mean],
            "basis": [[float(v) for v in row] for row in self.basis],
            "eigenvalues": [float(v) for v in self.eigenvalues],
            "residual_var": float(self.residual_var),
            "threshold": float(self.threshold),
            "level": float(self.level),
            "n_fit": int(self.n_fit),
            "n_calib": int(self.n_calib),
            "features": self.features,
            "calib_scores": [float(v) for v in self.calib_scores],
            "encoder_sha256": self.encoder_sha256,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureReference:
        """Rebuild from :meth:`to_dict`'s form.

        Raises
        ------
        CheckpointError
            A key is missing, or the arrays do not fit together or hold NaN.
        """
        if not isinstance(d, Mapping):
            raise CheckpointError(f"ood reference: expected a JSON object, got {type(d).__name__}")
        need = ("mean", "basis", "eigenvalues", "residual_var", "threshold", "level", "n_fit",
                "n_calib")  # fmt: skip
        missing = [k for k in need if k not in d]
        if missing:
            raise CheckpointError(f"ood reference: missing key(s) {missing}")
        try:
            mean = np.asarray(d["mean"], np.float64)
            basis = np.asarray(d["basis"], np.float64)
            eig = np.asarray(d["eigenvalues"], np.float64)
            res, thr = float(d["residual_var"]), float(d["threshold"])
            level, n_fit, n_calib = float(d["level"]), int(d["n_fit"]), int(d["n_calib"])
            calib = tuple(float(v) for v in d.get("calib_scores", ()))
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"ood reference: malformed values ({exc})") from exc
        if mean.ndim != 1 or mean.size == 0:
            raise CheckpointError(f"ood reference: mean must be a non-empty vector, got "
                                  f"shape {mean.shape}")  # fmt: skip
        if basis.size == 0:
            basis = basis.reshape(mean.size, 0)
        if basis.ndim != 2 or basis.shape[0] != mean.size or eig.shape != (basis.shape[1],):
            raise CheckpointError(f"ood reference: basis {basis.shape} and eigenvalues "
                                  f"{eig.shape} do not fit a {mean.size}-d mean")  # fmt: skip
        arrays = (mean, basis, eig, np.array([res, thr, level]))
        if not all(np.isfinite(a).all() for a in arrays):
            raise CheckpointError("ood reference: values hold NaN or infinity")
        if (eig <= 0).any() or res <= 0 or thr <= 0 or not 0 < level < 1:
            raise CheckpointError("ood reference: eigenvalues, residual variance and threshold "
                                  "must be positive and level in (0, 1)")  # fmt: skip
        return cls(mean=mean, basis=basis, eigenvalues=eig, residual_var=res, threshold=thr,
                   level=level, n_fit=n_fit, n_calib=n_calib, features=str(d.get("features", "")),
                   calib_scores=calib, encoder_sha256=str(d.get("encoder_sha256", "")))  # fmt: skip


def _items(feats: np.ndarray, what: str = "features") -> np.ndarray:
    x = np.asarray(feats, np.float64)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise ValueError(f"{what}: expected (n_items, d) features, got shape {x.shape}")
    return x[np.isfinite(x).all(axis=1)]


def item_distances(reference: FeatureReference, feats: np.ndarray) -> np.ndarray:
    """Per-item low-rank Mahalanobis distance (about 1 for training-like items).

    Parameters
    ----------
    reference
        The training features' statistics.
    feats
        ``(n_items, d)`` features (rows with NaN or infinity are dropped).
    """
    x = _items(feats)
    if x.shape[1] != reference.dim:
        raise ValueError(f"features are {x.shape[1]}-d, the reference is {reference.dim}-d "
                         f"({reference.features or 'unnamed features'})")  # fmt: skip
    c = x - reference.mean
    z = c @ reference.basis
    resid = (c * c).sum(axis=1) - (z * z).sum(axis=1)
    d2 = (z * z / reference.eigenvalues).sum(axis=1)
    d2 += np.maximum(resid, 0.0) / reference.residual_var
    return np.sqrt(d2 / reference.dim)


def slide_score(reference: FeatureReference, feats: np.ndarray) -> float:
    """Median of :func:`item_distances` over a slide's items (NaN when it has none)."""
    d = item_distances(reference, feats)
    return float(np.median(d)) if d.size else float("nan")


def _norm_ppf(p: float) -> float:
    """Standard normal quantile (bisection on ``erf``; no scipy needed)."""
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def calibrate_threshold(scores: Sequence[float], level: float) -> float:
    """The module's threshold rule applied to calibration slide scores."""
    s = np.asarray([v for v in scores if np.isfinite(v) and v > 0], np.float64)
    if s.size == 0:
        raise ValueError("no calibration slide has a finite, positive score")
    logs = np.log(s)
    sd = float(logs.std(ddof=1)) if s.size > 1 else 0.0
    sd = max(sd, MIN_LOG_SD)
    return float(max(math.exp(logs.mean() + _norm_ppf(level) * sd), s.max()))


def fit_reference(
    train_feats: Sequence[np.ndarray],
    calib_feats: Sequence[np.ndarray],
    *,
    rank: int = 16,
    level: float = 0.99,
    features: str = "",
    seed: int = 0,
) -> FeatureReference:
    """Fit the training features' statistics and calibrate the slide threshold.

    Parameters
    ----------
    train_feats
        One ``(n_items, d)`` array per training slide (tiles, cells, patches,
        or one row per slide). At most :data:`MAX_FIT_ITEMS` items per slide
        are used (a seeded random subset), so slides weigh about alike.
    calib_feats
        The same for held-out, training-like slides never used in the fit;
        their slide scores set the threshold (see the module's rule).
    rank
        Principal directions kept (capped at ``d - 1`` and the items available).
    level
        Calibration quantile in (0, 1).
    features
        What the features are, stored with the reference.
    seed
        Seed of the per-slide subsampling.

    Returns
    -------
    FeatureReference

    Raises
    ------
    ValueError
        No training or calibration slides, mismatched dimensions, or ``level``
        outside (0, 1).
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if not train_feats or not calib_feats:
        raise ValueError("fit_reference needs at least one training and one calibration slide")
    rng = np.random.default_rng(seed)
    parts = []
    for i, f in enumerate(train_feats):
        x = _items(f, f"training slide {i}")
        if len(x) > MAX_FIT_ITEMS:
            x = x[rng.choice(len(x), MAX_FIT_ITEMS, replace=False)]
        parts.append(x)
    dims = {p.shape[1] for p in parts}
    if len(dims) != 1:
        raise ValueError(f"training slides have features of different dimensions {sorted(dims)}")
    x = np.concatenate(parts)
    if len(x) < 2:
        raise ValueError("fit_reference needs at least two finite training items")
    d = x.shape[1]
    mean = x.mean(axis=0)
    cov = np.cov(x - mean, rowvar=False).reshape(d, d)
    eig, vec = np.linalg.eigh(cov)
    eig, vec = eig[::-1], vec[:, ::-1]
    floor = max(float(eig.max()) * 1e-6, 1e-12)
    k = int(max(0, min(rank, d - 1, len(x) - 1, int((eig > floor).sum()))))
    rest = np.clip(eig[k:], 0.0, None)
    residual = max(float(rest.mean()) if rest.size else floor, floor)
    ref = FeatureReference(mean=mean, basis=vec[:, :k].copy(), eigenvalues=eig[:k].copy(),
                           residual_var=residual, threshold=1.0, level=level,
                           n_fit=len(train_feats), n_calib=len(calib_feats), features=features)  # fmt: skip
    scores = tuple(slide_score(ref, f) for f in calib_feats)
    thr = calibrate_threshold(scores, level)
    return replace(ref, threshold=thr, calib_scores=scores)


# --------------------------------------------------------------------- report
@dataclass(frozen=True)
class OODReport:
    """How far one slide is from a model's training features.

    Attributes
    ----------
    score
        The slide's score (NaN when it had no items, or no reference).
    threshold
        The reference's threshold (NaN without one).
    outside
        True outside the training data, False within, None when unknown
        (no reference in the checkpoint, or no items to score).
    message
        :data:`OUTSIDE_MESSAGE`, :data:`WITHIN_MESSAGE` or why it is unknown.
    features
        What was compared.
    n_items
        Items scored.
    """

    score: float
    threshold: float
    outside: bool | None
    message: str
    features: str = ""
    n_items: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (NaN becomes None)."""

        def num(v: float) -> float | None:
            return float(v) if np.isfinite(v) else None

        return {"score": num(self.score), "threshold": num(self.threshold),
                "outside": self.outside, "message": self.message, "features": self.features,
                "n_items": int(self.n_items)}  # fmt: skip

    @property
    def detail(self) -> str:
        """One line with the score against the threshold (for tooltips and logs)."""
        if not (np.isfinite(self.score) and np.isfinite(self.threshold)):
            return self.message
        return (f"training-data distance {self.score:.3g} vs threshold {self.threshold:.3g} "
                f"over {self.n_items} items ({self.features or 'features'})")  # fmt: skip


def assess(reference: FeatureReference | None, feats: np.ndarray) -> OODReport:
    """Score a slide's features against ``reference``.

    Parameters
    ----------
    reference
        From :func:`reference_from_card`; None gives an unknown report saying
        :data:`NO_REFERENCE_MESSAGE`.
    feats
        ``(n_items, d)`` features of the slide (one row for slide-level ones).

    Raises
    ------
    ValueError
        The features' dimension differs from the reference's.
    """
    nan = float("nan")
    if reference is None:
        return OODReport(nan, nan, None, NO_REFERENCE_MESSAGE)
    d = item_distances(reference, feats)
    if not d.size:
        return OODReport(nan, reference.threshold, None, "no features to compare with the "
                         "training data", reference.features)  # fmt: skip
    score = float(np.median(d))
    outside = bool(score > reference.threshold)
    return OODReport(score, reference.threshold, outside,
                     OUTSIDE_MESSAGE if outside else WITHIN_MESSAGE, reference.features,
                     int(d.size))  # fmt: skip


# ----------------------------------------------------------------- card glue
def reference_from_card(card: ModelCard | None) -> FeatureReference | None:
    """The card's reference, or None for a card without one (or no card).

    Raises
    ------
    CheckpointError
        The card has a reference that is malformed.
    """
    data = getattr(card, "data", None) or {}
    if CARD_KEY not in data:
        return None
    return FeatureReference.from_dict(data[CARD_KEY])


def assess_card(card: ModelCard | None, feats: np.ndarray | None) -> OODReport:
    """:func:`assess` with the card's reference (unknown without one or without features)."""
    ref = reference_from_card(card)
    if ref is not None and ref.encoder_sha256 and ref.encoder_sha256 not in _weights(card):
        return OODReport(float("nan"), ref.threshold, None, "training-data reference made with "
                         "other weights than this checkpoint's; not compared", ref.features)  # fmt: skip
    if ref is not None and feats is None:
        return OODReport(float("nan"), ref.threshold, None, "no features to compare with the "
                         "training data", ref.features)  # fmt: skip
    return assess(ref, np.zeros((0, 1)) if feats is None else feats)


def _weights(card) -> set[str]:
    """Tensor hashes of the weights a card's features come from.

    Its own; a named encoder's (``data.features.checkpoint_sha256``); and the
    hash of the backbone's tensors alone (``data.features.weights_sha256``, or
    ``data.backbone_sha256``), which stays when only a head changes (calibration).
    """
    data = getattr(card, "data", None) or {}
    feats = data.get("features")
    feats = feats if isinstance(feats, Mapping) else {}
    hashes = (getattr(card, "sha256", ""), feats.get("checkpoint_sha256"),
              feats.get("weights_sha256"), data.get("backbone_sha256"))  # fmt: skip
    return {h for h in hashes if isinstance(h, str) and h}


def ood_summary(report: OODReport) -> dict[str, Any]:
    """The two keys every task's ``summary()`` and provenance carry."""
    return {"outside_training_data": report.outside, "ood": report.to_dict()}


def warn_if_outside(report: OODReport, what: str) -> None:
    """Issue an :class:`OutsideTrainingDataWarning` naming ``what`` when outside."""
    if report.outside:
        warnings.warn(f"{what}: {OUTSIDE_MESSAGE} ({report.detail})", OutsideTrainingDataWarning,
                      stacklevel=2)  # fmt: skip


def write_reference(path: str | os.PathLike, reference: FeatureReference | None) -> Path:
    """Set (or with None remove) ``card.data["ood"]`` of an existing checkpoint.

    A reference without ``encoder_sha256`` gets the hash of the encoder the card
    names (``data["features"]["checkpoint_sha256"]``), else the card's own. The current card is read from the file and only its ``data["ood"]`` changes;
    the tensors are copied unchanged (so the card's ``sha256`` still holds) and
    the file is replaced atomically.

    Raises
    ------
    CheckpointError
        The file is not a HistoScope checkpoint.
    """
    from safetensors.torch import load_file, save_file

    from histoscope.atomic import atomic_path
    from histoscope.checkpoints import CARD_KEY as HEADER_KEY
    from histoscope.checkpoints import FORMAT, FORMAT_KEY, read_card, tensor_hash

    path = Path(path)
    card = read_card(path)
    state = load_file(str(path))
    if card.sha256 and tensor_hash(state) != card.sha256:
        raise CheckpointError(f"{path}: tensors do not match the card's sha256; not rewriting it")
    data = dict(card.data or {})
    if reference is None:
        data.pop(CARD_KEY, None)
    else:
        if not reference.encoder_sha256:  # the encoder named by the card, else the card's own
            feats = data.get("features")
            enc = feats.get("checkpoint_sha256") if isinstance(feats, Mapping) else None
            reference = replace(reference, encoder_sha256=enc or card.sha256)
        data[CARD_KEY] = reference.to_dict()
    d = card.to_dict()
    d["data"] = data
    text = json.dumps(d, sort_keys=True)
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(state, str(tmp), metadata={FORMAT_KEY: FORMAT, HEADER_KEY: text})
    return path


class FeatureTap:
    """Collect what a torch module receives (or returns) while a task runs.

    A forward (pre-)hook copies each batch's ``(B, ...)`` tensor to the CPU,
    averages any spatial dimensions (``(B, C, H, W)`` -> ``(B, C)``) and keeps
    at most ``max_items`` rows (a seeded uniform reservoir sample once more
    arrive, so early and late batches weigh alike), in arrival order, so a
    task scores the features its model actually consumed without a second pass.

    Parameters
    ----------
    module
        The ``torch.nn.Module`` to watch (e.g. a model's first learned layer).
    kind
        ``"input"`` (its first positional argument) or ``"output"``.
    max_items
        Rows kept.
    """

    def __init__(self, module, kind: str = "input", max_items: int = 20_000) -> None:
        if kind not in ("input", "output"):
            raise ValueError(f"kind must be 'input' or 'output', not {kind!r}")
        self.module, self.kind, self.max_items = module, kind, int(max_items)
        self._kept: np.ndarray | None = None  # (max_items, d) reservoir
        self._order: np.ndarray | None = None  # arrival index of each kept row
        self._n = 0  # rows seen
        self._handle = None
        self._rng = np.random.default_rng(0)

    def _keep(self, t) -> None:
        x = t.detach().float()
        if x.ndim > 2:
            x = x.flatten(2).mean(-1)
        rows = x.cpu().numpy().reshape(len(x), -1)
        if self._kept is None:
            self._kept = np.empty((self.max_items, rows.shape[1]), rows.dtype)
            self._order = np.empty(self.max_items, np.int64)
        # reservoir sampling (Algorithm R): every row seen so far is kept with
        # the same probability max_items / seen, whichever batch it came in
        for row in rows:
            if self._n < self.max_items:
                slot = self._n
            else:
                slot = int(self._rng.integers(0, self._n + 1))
            if slot < self.max_items:
                self._kept[slot], self._order[slot] = row, self._n
            self._n += 1

    def attach(self) -> FeatureTap:
        """Start collecting (idempotent)."""
        if self._handle is None:
            if self.kind == "input":
                self._handle = self.module.register_forward_pre_hook(
                    lambda _m, args: self._keep(args[0])
                )
            else:
                self._handle = self.module.register_forward_hook(
                    lambda _m, _args, out: self._keep(out)
                )
        return self

    def detach(self) -> None:
        """Stop collecting (idempotent)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self) -> FeatureTap:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def features(self) -> np.ndarray | None:
        """``(n, d)`` rows collected so far (None when none)."""
        if self._kept is None or self._n == 0:
            return None
        k = min(self._n, self.max_items)
        return self._kept[:k][np.argsort(self._order[:k], kind="stable")].copy()


def _card_name(card) -> str:
    sha = getattr(card, "sha256", "") or ""
    return f"the {getattr(card, 'family', '?')} checkpoint (sha256 {sha[:12] or 'unknown'})"


def with_ood(
    result, card: ModelCard | None, feats: np.ndarray | None, what: str, *,
    items: str = "tiles", missing: str | None = None,
):  # fmt: skip
    """``result`` with its slide scored against ``card``'s training-data reference.

    Sets the result's ``ood`` field (an :class:`OODReport`), records the report
    in its provenance (``params["ood"]``) and issues an
    :class:`OutsideTrainingDataWarning` naming ``what`` when the slide is outside.
    The report is unknown, saying why, for a cancelled run
    (:data:`CANCELLED_MESSAGE`), for fewer items than ``MIN_ITEMS[items]``, for
    ``feats=None`` (``missing``, when given, is the reason), and for a reference
    that cannot be used (another feature dimension, a malformed card entry,
    named): never a failed analysis.
    """
    from dataclasses import replace as _replace

    nan = float("nan")
    try:
        n = 0 if feats is None else len(_items(feats))
        ref = reference_from_card(card)
        if getattr(result.provenance, "cancelled", False) and ref is not None:
            report = OODReport(nan, ref.threshold, None, CANCELLED_MESSAGE, ref.features, n)
        elif feats is None and missing and ref is not None:
            report = OODReport(nan, ref.threshold, None, missing, ref.features)
        elif feats is not None and 0 < n < MIN_ITEMS.get(items, 1) and ref is not None:
            report = OODReport(nan, ref.threshold, None, f"not judged: only {n} {items} "
                               f"(at least {MIN_ITEMS[items]} needed)", ref.features, n)  # fmt: skip
        else:
            report = assess_card(card, feats)
    except CheckpointError as exc:
        report = OODReport(nan, nan, None, f"training-data check skipped: {_card_name(card)} "
                           f"has a malformed data.ood: {exc}")  # fmt: skip
    except ValueError as exc:
        report = OODReport(nan, nan, None, f"training-data check skipped: {exc}")
    warn_if_outside(report, what)
    prov = result.provenance
    prov = _replace(prov, params={**prov.params, "ood": report.to_dict()})
    return _replace(result, ood=report, provenance=prov)
