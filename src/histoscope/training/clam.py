"""Family ``clam``: attention MIL over frozen tile features of synthetic H&E slides.

Recipe sections (defaults in :data:`DEFAULTS`):

``data``
    ``path`` (a ``histoscope synth --kind he`` folder) and ``generate``
    (``{count, size, seed, mpp, fractions}``: made when the folder is
    missing); ``foci_path`` / ``foci_generate`` (``{count, size, seed, mpp}``):
    a held-out set of benign and small-focus slides
    (:func:`~histoscope.training.clam_data.write_foci_dataset`), or ``null``;
    ``extra_train``: a list of further synth folders (e.g. ``histoscope synth
    --tumour-extent focus`` / ``none``) whose slides, every split, join the
    training split;
    ``cache`` (feature files, default ``<out>/features``); ``min_tissue``.
``model``
    ``variant`` (``sb`` or ``mb``), ``hidden``, ``attn_hidden``, ``dropout``,
    ``k_sample``, ``instance_loss``, ``bag_weight``, ``subtyping``, ``max_branch`` of
    :class:`histoscope.models.clam.CLAM`, and ``features``: the frozen tile
    encoder, ``{checkpoint, backbone, backbone_kwargs, seed}``. When
    ``checkpoint`` (a tumour patch classifier, path or ``sample_data/`` name)
    exists its backbone is used, else the registry ``backbone`` with the
    random weights of ``seed``.
``eval``
    ``baseline`` (also train :class:`~histoscope.models.clam.MeanPoolMIL` with
    the same settings and compare), ``tumour_min`` (a tile "lies in the
    tumour mask" when at least this fraction of it does), ``stain_shift``
    with ``shift_degrees``, ``shift_amount`` and ``seed``: also evaluate on
    the test slides restained outside the generator's stain range (as the
    ``tile_classifier`` family does), features re-extracted from the
    restained tiles.

Bags are one slide each (``train.batch`` bags per step, padded and masked);
the epoch with the lowest validation bag loss is kept. Held-out metrics:
slide ROC AUC, accuracy and balanced accuracy on the test split, on its
stain-shifted copy and on the foci set, the per-slide ROC AUC of tile attention against the tumour mask,
and the same slide metrics for the mean-pooling baseline.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from histoscope.atomic import atomic_path, atomic_write_text
from histoscope.training._loop import TrainSettings, fit
from histoscope.training._recipe import RecipeError, check_keys, fingerprint
from histoscope.training.clam_data import Bag, ensure_dataset, load_bags

FAMILY = "clam"
CLASSES = ("normal", "tumour")
DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {"path": None, "generate": None, "foci_path": None, "foci_generate": None,
             "extra_train": [], "cache": None, "min_tissue": 0.5},
    "model": {"variant": "sb", "hidden": 512, "attn_hidden": 256, "dropout": 0.25,
              "k_sample": 8, "instance_loss": "svm", "bag_weight": 0.7, "subtyping": False,
              "max_branch": False, "features": {}},
    "eval": {"baseline": True, "tumour_min": 0.5, "stain_shift": True, "shift_degrees": 12.0,
             "shift_amount": [1.45, 1.7], "seed": 0},
}  # fmt: skip
FEATURE_KEYS = ("checkpoint", "backbone", "backbone_kwargs", "seed")
GENERATE_KEYS = ("count", "size", "seed", "mpp", "fractions", "tumour_extent")


def _check_generate(gen: Any, where: str) -> None:
    """Refuse a malformed ``generate`` block before any slide is made (one line naming the key)."""
    from histoscope.synthetic.cli import EXTENT_CHOICES

    if not isinstance(gen, Mapping):
        raise RecipeError(f"recipe key {where} must be a mapping of {', '.join(GENERATE_KEYS)}, "
                          f"got {gen!r}")  # fmt: skip
    check_keys(gen, GENERATE_KEYS, where)
    try:
        for key in ("count", "seed"):
            if key in gen:
                int(gen[key])
        if "mpp" in gen and not float(gen["mpp"]) > 0:
            raise ValueError
        if "size" in gen and len([int(v) for v in gen["size"]]) != 2:
            raise ValueError
    except (TypeError, ValueError):
        raise RecipeError(f"recipe key {where}: count and seed must be integers, mpp a positive "
                          f"number and size [H, W], got {dict(gen)!r}") from None  # fmt: skip
    if gen.get("tumour_extent", "any") not in EXTENT_CHOICES:
        raise RecipeError(f"recipe key {where}.tumour_extent must be one of {EXTENT_CHOICES}, "
                          f"got {gen['tumour_extent']!r}")  # fmt: skip


def settings(recipe: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The family's sections with defaults filled in; unknown keys are refused.

    Raises
    ------
    RecipeError
        Naming an unknown key, a missing ``data.path`` or a bad ``model.variant``.
    """
    out = {}
    for section, defaults in DEFAULTS.items():
        given = recipe.get(section) or {}
        check_keys(given, defaults, section)
        out[section] = {**defaults, **given}
    if not out["data"]["path"]:
        raise RecipeError(
            "recipe key data.path is required (a `histoscope synth --kind he` folder)"
        )
    for key in ("generate", "foci_generate"):
        if out["data"][key] is not None:
            check_keys(out["data"][key], GENERATE_KEYS, f"data.{key}")
    extra = out["data"]["extra_train"] or []
    if not isinstance(extra, list | tuple):
        raise RecipeError(f"recipe key data.extra_train must be a list of folders or "
                          f"{{path, generate}}, got {extra!r}")  # fmt: skip
    for i, entry in enumerate(extra):
        if isinstance(entry, Mapping):
            check_keys(entry, ("path", "generate"), f"data.extra_train[{i}]")
            if not entry.get("path"):
                raise RecipeError(f"recipe key data.extra_train[{i}].path is required")
            if entry.get("generate") is not None:
                _check_generate(entry["generate"], f"data.extra_train[{i}].generate")
        elif not isinstance(entry, str | os.PathLike):
            raise RecipeError(f"recipe key data.extra_train[{i}] must be a folder or "
                              f"{{path, generate}}, got {entry!r}")  # fmt: skip
    check_keys(out["model"]["features"], FEATURE_KEYS, "model.features")
    if out["model"]["variant"] not in ("sb", "mb"):
        raise RecipeError(f"recipe key model.variant must be 'sb' or 'mb', "
                          f"got {out['model']['variant']!r}")  # fmt: skip
    return out


def feature_model(features: Mapping[str, Any]):
    """The frozen tile encoder a recipe's ``model.features`` names.

    Returns
    -------
    histoscope.tasks.mil.FeatureModel

    Raises
    ------
    RecipeError
        If neither an existing ``checkpoint`` nor a ``backbone`` is given.
    """
    from histoscope.tasks.mil import _resolve, patch_classifier_features, registry_features

    ckpt = features.get("checkpoint")
    path = _resolve(ckpt) if ckpt else None
    if path is not None:
        return patch_classifier_features(path)
    if not features.get("backbone"):
        raise RecipeError(f"recipe key model.features: checkpoint {ckpt!r} not found and no "
                          "backbone named to fall back on")  # fmt: skip
    return registry_features(features["backbone"], features.get("backbone_kwargs") or {},
                             int(features.get("seed") or 0))  # fmt: skip


# ---------------------------------------------------------------- batching
def collate(bags: Sequence[Bag]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad bags to ``(B, N_max, D)`` with a validity mask; returns ``(h, mask, labels)``."""
    n = max(len(b.features) for b in bags)
    d = bags[0].features.shape[1]
    h = torch.zeros(len(bags), n, d)
    mask = torch.zeros(len(bags), n, dtype=torch.bool)
    for i, b in enumerate(bags):
        h[i, : len(b.features)] = torch.from_numpy(b.features)
        mask[i, : len(b.features)] = True
    return h, mask, torch.tensor([b.label for b in bags], dtype=torch.long)


@torch.no_grad()
def predict(model: nn.Module, bags: Sequence[Bag]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Slide probabilities ``(S, C)`` and each bag's attention ``(K, N)``, one bag at a time."""
    model.eval()
    probs, atts = [], []
    for b in bags:
        out = model(torch.from_numpy(b.features))
        probs.append(torch.softmax(out["logits"].float(), 1)[0].numpy())
        atts.append(out["attention"][0].numpy())
    return np.stack(probs), atts


# ----------------------------------------------------------------- metrics
def slide_metrics(bags: Sequence[Bag], prob: np.ndarray) -> dict[str, Any]:
    """Slide ROC AUC of the tumour probability; accuracy, balanced accuracy, sensitivity and
    specificity at argmax (p >= 0.5), the last two with Wilson 95 % intervals over slides."""
    from histoscope.training.metrics import accuracy, balanced_accuracy, roc_auc, wilson

    y = np.array([b.label for b in bags])
    pred = prob.argmax(1)
    both = len(np.unique(y)) == 2
    pos, neg = y == 1, y == 0
    k_pos, k_neg = int((pred[pos] == 1).sum()), int((pred[neg] == 0).sum())
    return {
        "auc": roc_auc(y, prob[:, 1]) if both else None,
        "accuracy": accuracy(y, pred),
        "balanced_accuracy": balanced_accuracy(y, pred) if both else None,
        "sensitivity": k_pos / int(pos.sum()) if pos.any() else None,
        "sensitivity_ci95": list(wilson(k_pos, int(pos.sum()))) if pos.any() else None,
        "specificity": k_neg / int(neg.sum()) if neg.any() else None,
        "specificity_ci95": list(wilson(k_neg, int(neg.sum()))) if neg.any() else None,
        "n": {c: int((y == i).sum()) for i, c in enumerate(CLASSES)},
    }


def attention_auc(bags: Sequence[Bag], atts: Sequence[np.ndarray], tumour_min: float,
                  branch: int = 0) -> dict[str, Any]:  # fmt: skip
    """Per tumour slide, ROC AUC of tile attention vs "tile lies in the tumour mask".

    Only slides with tiles of both kinds count. ``branch`` picks the
    attention branch (the tumour class's for CLAM-MB).

    Returns
    -------
    dict
        ``{"mean", "median", "min", "n_slides", "per_slide": {name: auc}}``.
    """
    from histoscope.training.metrics import roc_auc

    per = {}
    for b, a in zip(bags, atts, strict=True):
        inside = b.tumour_fraction >= tumour_min
        if b.label == 1 and 0 < inside.sum() < len(inside):
            per[b.name] = roc_auc(inside.astype(int), a[min(branch, len(a) - 1)])
    vals = np.array(list(per.values()))
    stats = {"mean": float(vals.mean()), "median": float(np.median(vals)),
             "min": float(vals.min())} if len(vals) else {"mean": None, "median": None, "min": None}  # fmt: skip
    return {**stats, "n_slides": len(per), "per_slide": per}


def by_extent(bags: Sequence[Bag], prob: np.ndarray) -> dict[str, dict[str, Any]]:
    """Per tumour extent: slide count, mean and minimum tumour probability, share called tumour."""
    out = {}
    for extent in sorted({b.extent for b in bags}):
        p = np.array([q[1] for b, q in zip(bags, prob, strict=True) if b.extent == extent])
        out[extent] = {"n": len(p), "mean_p_tumour": float(p.mean()), "min_p_tumour": float(p.min()),
                       "called_tumour": float((p >= 0.5).mean())}  # fmt: skip
    return out


def evaluate_bags(model: nn.Module, bags: Sequence[Bag], tumour_min: float) -> dict[str, Any]:
    """Slide metrics, attention-vs-mask AUC and per-slide rows for one model on ``bags``."""
    prob, atts = predict(model, bags)
    branch = 1 if getattr(model, "multi_branch", False) else 0
    res = slide_metrics(bags, prob)
    res["by_extent"] = by_extent(bags, prob)
    if getattr(model, "variant", "") != "mean":
        res["attention_auc"] = attention_auc(bags, atts, tumour_min, branch)
    res["slides"] = [{"name": b.name, "label": b.label, "extent": b.extent,
                      "tumour_fraction": round(b.slide_tumour_fraction, 5), "n_tiles": len(b.features),
                      "p_tumour": round(float(p[1]), 5)} for b, p in zip(bags, prob, strict=True)]  # fmt: skip
    return res


# -------------------------------------------------------------------- train
def _fit_one(model: nn.Module, train_bags: list[Bag], val_bags: list[Bag], ts: TrainSettings,
             out: Path, recipe: Mapping[str, Any], resume: bool, progress) -> dict[str, Any]:  # fmt: skip
    n = len(train_bags)
    steps = -(-n // ts.batch)

    def batches(epoch: int, gen: torch.Generator):
        order = torch.randperm(n, generator=gen).tolist()
        for i in range(0, n, ts.batch):
            yield collate([train_bags[j] for j in order[i : i + ts.batch]])

    def loss_fn(m: nn.Module, batch) -> torch.Tensor:
        h, mask, y = batch
        return m.loss(h, y, mask)[0]

    def validate(m: nn.Module) -> dict[str, float]:
        prob, _ = predict(m, val_bags)
        y = np.array([b.label for b in val_bags])
        nll = -np.log(np.clip(prob[np.arange(len(y)), y], 1e-7, 1)).mean()
        r = slide_metrics(val_bags, prob)
        return {"val_loss": float(nll), "val_accuracy": r["accuracy"],
                "val_auc": r["auc"] if r["auc"] is not None else float("nan")}  # fmt: skip

    if ts.monitor is None:
        ts = replace(ts, monitor="val_loss", monitor_mode="min")
    fp = fingerprint({**recipe, "_model": model.config})
    fitted = fit(model, batches, loss_fn, ts, out, steps_per_epoch=steps, validate=validate,
                 resume=resume, progress=progress, fingerprint=fp)  # fmt: skip
    return {"best_epoch": fitted.best_epoch, "history": fitted.history}


def _build(cfg: Mapping[str, Any], in_dim: int, variant: str, seed: int) -> nn.Module:
    from histoscope.models.clam import build_mil

    m = cfg["model"]
    keys = ("hidden", "dropout") if variant == "mean" else (
        "hidden", "attn_hidden", "dropout", "k_sample", "instance_loss", "bag_weight", "subtyping",
        "max_branch")  # fmt: skip
    torch.manual_seed(seed)
    return build_mil({"variant": variant, "in_dim": in_dim, "n_classes": len(CLASSES),
                      **{k: m[k] for k in keys}})  # fmt: skip


def _summary(res: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in res.items() if k != "slides"}


def train(
    recipe: Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    resume: bool = True,
    progress: Callable[[int, int], Any] | None = None,
) -> dict[str, Any]:
    """Train CLAM (and the mean-pooling baseline) on cached tile features.

    Parameters
    ----------
    recipe
        Validated recipe (see the module docstring).
    out_dir
        Receives ``features/`` (unless ``data.cache`` says otherwise),
        ``train_log.jsonl`` and ``last_state.pt`` (CLAM; the baseline's under
        ``mean_pool/``), the checkpoint, ``metrics.json`` and ``slides.csv``.
    resume
        Continue from ``last_state.pt`` when the same recipe left one.
    progress
        ``progress(step, total_steps)``.

    Returns
    -------
    dict
        ``{"checkpoint": path, "metrics": {...}}``.
    """
    from histoscope.checkpoints import ModelCard, save_checkpoint

    cfg = settings(recipe)
    ts = TrainSettings.from_recipe(recipe["train"])
    data, ev = cfg["data"], cfg["eval"]
    out = Path(out_dir)
    root = ensure_dataset(data["path"], data["generate"])
    foci = None
    if data["foci_path"]:
        foci = ensure_dataset(data["foci_path"], data["foci_generate"], foci=True)
    fm = feature_model(cfg["model"]["features"])
    cache = Path(data["cache"] or out / "features")
    mt = float(data["min_tissue"])
    splits = {s: load_bags(root, s, fm, cache, min_tissue=mt) for s in ("train", "val", "test")}
    extra = [ensure_dataset(e["path"], e.get("generate")) if isinstance(e, Mapping) else Path(e)
             for e in data["extra_train"] or []]  # fmt: skip
    for folder in extra:
        splits["train"] += load_bags(folder, "all", fm, cache, min_tissue=mt)
    if ev["stain_shift"]:
        splits["test_stain_shifted"] = load_bags(root, "test", fm, cache, min_tissue=mt, shift=ev)
    if foci is not None:
        splits["foci"] = load_bags(foci, "test", fm, cache, min_tissue=mt)
    if len({b.label for b in splits["train"]}) < 2:
        raise RecipeError(f"data folder {root}: the train split needs benign and tumour slides")

    models = {"clam": _build(cfg, fm.feature_dim, cfg["model"]["variant"], ts.seed)}
    if ev["baseline"]:
        models["mean_pool"] = _build(cfg, fm.feature_dim, "mean", ts.seed)
    fits, results = {}, {}
    for name, model in models.items():
        sub = out if name == "clam" else out / name
        fits[name] = _fit_one(model, splits["train"], splits["val"], ts, sub, recipe, resume,
                              progress)  # fmt: skip
        model.eval()
        results[name] = {s: evaluate_bags(model, splits[s], float(ev["tumour_min"]))
                         for s in splits if s != "train"}  # fmt: skip
    metrics = {
        "best_epoch": fits["clam"]["best_epoch"],
        **{s: _summary(r) for s, r in results["clam"].items()},
    }
    if "mean_pool" in results:
        metrics["mean_pool"] = {s: _summary(r) for s, r in results["mean_pool"].items()}
        metrics["mean_pool"]["best_epoch"] = fits["mean_pool"]["best_epoch"]
    _write_report(out, results)
    clam = models["clam"]
    card = ModelCard(
        family=FAMILY, config=clam.config, classes=CLASSES, input_spec=fm.spec.to_dict(),
        recipe=dict(recipe),
        data={"path": str(root), "foci_path": str(foci) if foci else None, "min_tissue": mt,
              "extra_train": [str(p) for p in extra],
              "features": fm.descriptor,
              "slides": {s: [b.name for b in bags] for s, bags in splits.items()}},
        metrics=_strip_per_slide(metrics),
    )  # fmt: skip
    name = recipe.get("name") or FAMILY
    ckpt = save_checkpoint(out / f"{name}.safetensors", clam, card)
    if "mean_pool" in models:
        base_card = replace(card, config=models["mean_pool"].config, metrics={})
        save_checkpoint(out / f"{name}_mean_pool.safetensors", models["mean_pool"], base_card)
    if recipe.get("export"):
        with atomic_path(recipe["export"]) as tmp:
            shutil.copyfile(ckpt, tmp)
    return {"checkpoint": str(ckpt), "metrics": metrics, "history": fits["clam"]["history"]}


def _strip_per_slide(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The metrics without per-slide attention AUCs (kept small for the card)."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, Mapping):
            v = {kk: vv for kk, vv in v.items() if kk != "per_slide"}
            out[k] = _strip_per_slide(v)
        else:
            out[k] = v
    return out


def _write_report(out: Path, results: Mapping[str, Mapping[str, Any]]) -> None:
    """``metrics.json`` (everything) and ``slides.csv`` (one row per model, set and slide)."""
    rows = ["model,set,name,label,extent,tumour_fraction,n_tiles,p_tumour"]
    for model, sets in results.items():
        for s, r in sets.items():
            rows += [f"{model},{s},{x['name']},{x['label']},{x['extent']},{x['tumour_fraction']},"
                     f"{x['n_tiles']},{x['p_tumour']}" for x in r["slides"]]  # fmt: skip
    atomic_write_text(out / "slides.csv", "\n".join(rows) + "\n")
    atomic_write_text(out / "metrics.json", json.dumps(results, indent=2, default=float) + "\n")


# ----------------------------------------------------------------- evaluate
def evaluate(
    checkpoint_path: str | os.PathLike,
    data_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    split: str = "test",
    baseline: str | os.PathLike | None = None,
    cache: str | os.PathLike | None = None,
    record: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Slide and attention metrics of a ``clam`` checkpoint on a labelled H&E folder.

    Parameters
    ----------
    checkpoint_path
        A ``clam`` checkpoint (another family is refused); its card names the
        feature backbone, which must be available (see
        :func:`histoscope.tasks.mil.feature_model_for`).
    data_path
        Dataset folder (``histoscope synth --kind he`` or a foci set).
    out_dir
        Receives ``features/`` (unless ``cache``), ``slides.csv`` and the
        full results in ``metrics_detail.json``.
    split
        ``"test"`` (default), ``"val"``, ``"train"`` or ``"all"``.
    baseline
        A mean-pooling ``clam`` checkpoint to compare on the same slides.
    cache
        Feature cache folder.
    record
        Also write the figures into the checkpoint's card under
        ``metrics.<record>`` (e.g. ``final_test``), with the slides' seeds; the
        tensors stay as they are (:func:`histoscope.training._claims.record`).
        The key, the data's synth manifest and an existing entry are checked
        before anything is evaluated; ``metrics.json`` is written before the card.
    overwrite
        With ``record``: replace an existing ``metrics.<record>`` (else refused).

    Returns
    -------
    dict
        ``{"split", "auc", "accuracy", "balanced_accuracy", "n",
        "attention_auc", "mean_pool"?}``.

    Raises
    ------
    histoscope.CheckpointError
        If the checkpoint is unreadable, of another family, or its feature
        backbone cannot be rebuilt.
    RecipeError
        If the data folder, its manifest or the split is missing.
    """
    from histoscope.checkpoints import load_checkpoint
    from histoscope.tasks.mil import feature_model_for
    from histoscope.training import _claims

    if record:
        _claims.check_record(checkpoint_path, record, data=data_path, split=split,
                             overwrite=overwrite)  # fmt: skip
    model, card = load_checkpoint(checkpoint_path, family=FAMILY)
    fm = feature_model_for(card)
    out = Path(out_dir)
    tumour_min = float((card.recipe.get("eval") or {}).get("tumour_min", 0.5))
    bags = load_bags(data_path, split, fm, Path(cache or out / "features"),
                     min_tissue=float(card.data.get("min_tissue", 0.5)))  # fmt: skip
    results = {"clam": {split: evaluate_bags(model, bags, tumour_min)}}
    if baseline is not None:
        base, _ = load_checkpoint(baseline, family=FAMILY)
        results["mean_pool"] = {split: evaluate_bags(base, bags, tumour_min)}
    rows = ["model,set,name,label,extent,tumour_fraction,n_tiles,p_tumour"]
    for m, sets in results.items():
        rows += [f"{m},{split},{x['name']},{x['label']},{x['extent']},{x['tumour_fraction']},"
                 f"{x['n_tiles']},{x['p_tumour']}" for x in sets[split]["slides"]]  # fmt: skip
    atomic_write_text(out / "slides.csv", "\n".join(rows) + "\n")
    atomic_write_text(out / "metrics_detail.json", json.dumps(results, indent=2) + "\n")
    metrics = {"split": split, **_strip_per_slide(_summary(results["clam"][split]))}
    if "mean_pool" in results:
        metrics["mean_pool"] = _strip_per_slide(_summary(results["mean_pool"][split]))
    if record:
        _claims.write_metrics_first(out, checkpoint_path, data_path, metrics)
        _claims.record(checkpoint_path, record, metrics, data=data_path, split=split,
                       overwrite=overwrite)  # fmt: skip
    return metrics


def markdown_table(metrics: Mapping[str, Any]) -> str:
    """The table RESULTS.md shows for an evaluation (what ``histoscope evaluate`` prints).

    One row per model (CLAM, and mean pooling when a baseline was given):
    slides, slide AUC, sensitivity and specificity at p >= 0.5 with Wilson
    95 % intervals, and the share of small-focus slides called tumour.
    """

    def f(v: Any, d: int = 3) -> str:
        return "-" if v is None else f"{v:.{d}f}"

    rows = ["| model | slides (benign / tumour) | slide AUC | sensitivity [95 % CI] | "
            "specificity [95 % CI] | foci called tumour |", "|" + " --- |" * 6]  # fmt: skip
    for name, m in (("CLAM", metrics), ("mean pooling", metrics.get("mean_pool"))):
        if not m:
            continue
        se, sp = (
            m.get("sensitivity_ci95") or [None, None],
            m.get("specificity_ci95") or [None, None],
        )
        foc = (m.get("by_extent") or {}).get("focus")
        foci = f"{round(foc['called_tumour'] * foc['n'])} of {foc['n']}" if foc else "-"
        rows.append(f"| {name} | {m['n']['normal']} / {m['n']['tumour']} | {f(m.get('auc'), 4)} "
                    f"| {f(m.get('sensitivity'))} [{f(se[0])}, {f(se[1])}] "
                    f"| {f(m.get('specificity'))} [{f(sp[0])}, {f(sp[1])}] | {foci} |")  # fmt: skip
    return "\n".join(rows)
