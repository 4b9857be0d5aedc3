"""Family ``isight``: the five IHC staining heads, trained on an HPA-style table.

Recipe sections (defaults in :data:`DEFAULTS`; unknown keys are refused):

``data``
    ``path``: the HPA-style table or the dataset folder holding ``hpa.csv``
    (see :mod:`histoscope.training.isight_data`); ``generate``
    (``{count, size, seed, mpp}``): make a ``histoscope synth --kind ihc``
    dataset there when it is missing; ``max_tiles``: tissue tiles kept per image;
    ``tissue``: :class:`~histoscope.tissue.TissueParams` fields of the tissue
    detection (``null``: Otsu on inverted grey), recorded in the card so the
    panel and ``evaluate`` tile slides the same way.
``model``
    Keyword arguments of :class:`histoscope.models.isight.ISight`
    (``tissue_classes: null`` takes the tissue names of the train and val rows),
    plus ``loss_weights`` (``task -> weight`` of its cross-entropy, default 1).
``augment``
    ``tiles_per_bag`` (random tiles per image and step; every tile in
    evaluation) and ``flips`` (random rotation / flip of the tiles).
``train``
    The shared settings of :class:`histoscope.training._loop.TrainSettings`;
    ``monitor`` may be ``val_score``, the mean validation accuracy over
    intensity, location and quantity, or any ``val_<task>_<metric>``.
``eval``
    ``split`` (held-out split evaluated after training, whose metrics go into
    the card; ``null`` skips it), ``measure`` (also score the classical
    measurement).
``name``, ``export``
    Checkpoint file name, and an optional path it is also copied to.

Training runs the shared loop (:func:`histoscope.training._loop.fit`: seeded
per epoch, resumable from ``out_dir/last_state.pt``, best validation epoch
kept). Metadata dropout is the model's own (``meta_dropout`` in training
mode). Afterwards one temperature per task and case (with the clinical text,
and on the image alone) is fitted on the validation logits
(:mod:`histoscope.training.isight_calibrate`): the card's config carries both
sets, its metrics the validation figures of every head in both cases, whether
each is acceptable, and per head whether the text is used. Only then is the
held-out split evaluated; its metrics are recorded, never used to choose
anything.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from histoscope.atomic import atomic_path
from histoscope.models.isight import TASKS
from histoscope.tissue import TissueParams
from histoscope.training._recipe import RecipeError, check_keys, fingerprint
from histoscope.training.isight_data import (
    MISSING,
    BagCache,
    collate,
    encode_labels,
    read_table,
    tissue_classes,
)
from histoscope.training.isight_report import evaluate, meta_tokens, predict, task_metrics

__all__ = ["DEFAULTS", "FAMILY", "evaluate", "meta_tokens", "predict", "settings", "train"]

FAMILY = "isight"
MODEL_KEYS = ("backbone", "backbone_kwargs", "tissue_classes", "dim", "hidden", "pooling",
              "meta_buckets", "n_cell_types", "dropout", "meta_dropout", "loss_weights",
              "input_space", "meta_encoder", "meta_weights")  # fmt: skip
DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {"path": None, "generate": None, "max_tiles": 64, "tissue": None},
    "model": {"backbone": "hs_cnn_small",
              "backbone_kwargs": {"tile_size": 64, "mpp": 2.0, "blocks": 1,
                                  "widths": [16, 32, 64, 128]},
              "tissue_classes": None, "dim": 128, "hidden": 64, "pooling": "tile",
              "meta_buckets": 4096, "dropout": 0.25, "meta_dropout": 0.5,
              "loss_weights": {"tissue": 0.5, "malignancy": 0.5}},
    "augment": {"tiles_per_bag": 6, "flips": True},
    "eval": {"split": "test", "measure": True},
}  # fmt: skip
GENERATE_KEYS = ("count", "size", "seed", "mpp")
#: Validation accuracies averaged into ``val_score``.
SCORE_TASKS = ("intensity", "location", "quantity")


def settings(recipe: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The family's sections with defaults filled in; unknown keys are refused.

    Raises
    ------
    RecipeError
        Naming an unknown key or a missing ``data.path``.
    """
    out = {}
    for section, defaults in DEFAULTS.items():
        given = recipe.get(section) or {}
        check_keys(given, MODEL_KEYS if section == "model" else defaults, section)
        out[section] = {**defaults, **given}
    if not out["data"]["path"]:
        raise RecipeError("recipe key data.path is required (an HPA-style table or its folder)")
    if out["data"]["generate"] is not None:
        check_keys(out["data"]["generate"], GENERATE_KEYS, "data.generate")
    if out["data"]["tissue"] is not None:
        check_keys(out["data"]["tissue"], TissueParams.__dataclass_fields__, "data.tissue")
        try:
            TissueParams(**out["data"]["tissue"])
        except ValueError as exc:
            raise RecipeError(f"data.tissue: {exc}") from exc
    return out


def _ensure_data(data: Mapping[str, Any]) -> Path:
    path = Path(data["path"])
    if path.exists() or data["generate"] is None:
        return path
    from histoscope.synthetic._dataset import write_dataset

    g = data["generate"]
    root = path.parent if path.suffix == ".csv" else path
    write_dataset(root, kind="ihc", size=tuple(g.get("size", (1024, 1024))),
                  seed=int(g.get("seed", 0)), count=int(g.get("count", 10)),
                  mpp=float(g.get("mpp", 0.5)))  # fmt: skip
    return path


def _flat_metrics(logits: Mapping[str, np.ndarray], y: np.ndarray) -> dict[str, float]:
    rec: dict[str, float] = {}
    for j, t in enumerate(TASKS):
        for k, v in task_metrics(y[:, j], logits[t]).items():
            if k != "n":
                rec[f"val_{t}_{k}"] = float(v)
    rec["val_score"] = float(np.mean([rec[f"val_{t}_accuracy"] for t in SCORE_TASKS
                                      if f"val_{t}_accuracy" in rec] or [0.0]))  # fmt: skip
    return rec


def train(
    recipe: Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    resume: bool = True,
    progress: Callable[[int, int], Any] | None = None,
) -> dict[str, Any]:
    """Train iSight as ``recipe`` says; write the checkpoint into ``out_dir``.

    Parameters
    ----------
    recipe
        See the module docstring.
    out_dir
        Output folder: ``last_state.pt`` and ``train_log.jsonl`` (the shared
        loop's), ``cache/`` (tile bags), the checkpoint and ``eval/``.
    resume
        Continue from ``out_dir/last_state.pt`` when the same recipe left one.
    progress
        ``progress(step, total_steps)`` after each training step.

    Returns
    -------
    dict
        ``checkpoint`` (path), ``metrics`` (what the card records: validation
        metrics after calibration, temperatures, best epoch, held-out
        metrics), ``history`` (per-epoch log).
    """
    import torch

    from histoscope.checkpoints import ModelCard
    from histoscope.models.isight import ISight
    from histoscope.training._loop import TrainSettings, fit

    cfg = settings(recipe)
    data, aug = cfg["data"], cfg["augment"]
    mcfg = dict(cfg["model"])
    given_weights = mcfg.pop("loss_weights") or {}
    loss_weights = {t: float(given_weights.get(t, 1.0)) for t in TASKS}
    ts = TrainSettings.from_recipe(recipe.get("train") or {})
    if ts.num_threads:
        torch.set_num_threads(int(ts.num_threads))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table, train_s, val_s = _splits(data)
    if not mcfg.get("tissue_classes"):
        mcfg["tissue_classes"] = tissue_classes(train_s + val_s)

    torch.manual_seed(ts.seed)
    model = ISight(**mcfg)
    spec = model.input_spec
    y_train = torch.from_numpy(encode_labels(train_s, model.classes))
    y_val = encode_labels(val_s, model.classes)
    tissue = TissueParams(**data["tissue"]) if data["tissue"] else None
    cache = BagCache(spec, int(data["max_tiles"]), out / "cache", tissue=tissue)
    cache.fill(train_s + val_s)
    train_bags = [cache.get(s) for s in train_s]
    val_bags = [cache.get(s) for s in val_s]
    val_meta = [s.metadata for s in val_s]
    n_tiles = int(aug["tiles_per_bag"]) if aug["tiles_per_bag"] else None

    def batches(epoch: int, gen: torch.Generator):
        order = torch.randperm(len(train_s), generator=gen).tolist()
        for i in range(0, len(order), ts.batch):
            idx = order[i : i + ts.batch]
            x, mask = collate([train_bags[k] for k in idx], spec, n_tiles=n_tiles,
                              generator=gen, flips=bool(aug["flips"]))  # fmt: skip
            yield x, mask, meta_tokens(model, [train_s[k].metadata for k in idx]), y_train[idx]

    def loss_fn(m, batch) -> torch.Tensor:
        x, mask, tokens, y = batch
        res = m(x, mask, tokens)
        terms = [loss_weights[t] * torch.nn.functional.cross_entropy(res[t], y[:, j],
                                                                    ignore_index=MISSING)
                 for j, t in enumerate(TASKS) if (y[:, j] != MISSING).any()]  # fmt: skip
        return torch.stack(terms).sum()

    settings_ = ts if ts.monitor else _with_monitor(ts, "val_score")
    fitted = fit(
        model, batches, loss_fn, settings_, out,
        steps_per_epoch=-(-len(train_s) // ts.batch),
        validate=lambda m: _flat_metrics(predict(m, val_bags, val_meta), y_val),
        resume=resume, progress=progress, fingerprint=fingerprint(recipe),
    )  # fmt: skip

    calibrated = _calibrate(model, val_bags, val_meta, y_val)
    card = ModelCard(
        family=FAMILY,
        config=model.config,
        classes=tuple(f"{t}:{c}" for t, cs in model.classes.items() for c in cs),
        input_spec=spec.to_dict(),
        recipe=json.loads(json.dumps(dict(recipe), default=str)),
        data=_describe_data(table, data, train_s, val_s),
        metrics={"best_epoch": fitted.best_epoch, **calibrated},
    )
    ckpt, card = _save(model, card, out / f"{recipe.get('name') or FAMILY}.safetensors", table, cfg)
    if recipe.get("export"):
        with atomic_path(recipe["export"]) as tmp:
            shutil.copyfile(ckpt, tmp)
    return {"checkpoint": str(ckpt), "metrics": card.metrics, "history": fitted.history}


def _splits(data: Mapping[str, Any]) -> tuple[Path, list, list]:
    """The table (generated if asked and missing) and its train and val rows."""
    table = _ensure_data(data)
    samples = read_table(table)
    train_s = [s for s in samples if s.split == "train"]
    val_s = [s for s in samples if s.split == "val"]
    if not train_s or not val_s:
        raise RecipeError(f"{table}: need rows in both the train and the val split")
    return table, train_s, val_s


def _calibrate(model, val_bags, val_meta, y_val: np.ndarray) -> dict[str, Any]:
    """Fit one temperature per task and case on the validation split; set them on the model.

    Cases are the validation slides with their clinical text and the same
    slides on the image alone (:mod:`histoscope.training.isight_calibrate`).
    Returns the card metrics: ``temperature`` and ``val`` (the with-text case,
    as older cards had them), ``val_before_temperature``, ``calibration``
    (both cases: temperatures, figures with intervals, ``acceptable``) and
    ``text_decision`` (per head, whether the clinical text is used).
    """
    import torch

    from histoscope.training.isight_calibrate import calibrate_cases, case_logits, decide_text

    raw = case_logits(model, val_bags, val_meta)
    cal = calibrate_cases(raw, y_val)
    model.set_temperatures(cal["temperatures"])
    temps = [cal["temperatures"]["text"][t] for t in TASKS]
    model.temperature.copy_(torch.tensor(temps, dtype=model.temperature.dtype))
    return {
        "temperature": dict(zip(TASKS, temps, strict=True)),
        "val": {t: task_metrics(y_val[:, j], raw["text"][t] / temps[j])
                for j, t in enumerate(TASKS)},
        "val_before_temperature": {
            t: task_metrics(y_val[:, j], raw["text"][t]) for j, t in enumerate(TASKS)
        },
        "calibration": cal,
        "text_decision": decide_text(raw, y_val, cal),
    }  # fmt: skip


def _save(model, card, path: Path, table: Path, cfg: Mapping[str, Any]) -> tuple[Path, Any]:
    """Save the checkpoint; with ``eval.split``, evaluate it and save it again with those metrics.

    Returns the checkpoint path and the card it holds.
    """
    from histoscope.checkpoints import save_checkpoint

    ckpt = save_checkpoint(path, model, card)
    ev, metrics = cfg["eval"], dict(card.metrics)
    if ev.get("split"):
        held = evaluate(ckpt, table, path.parent / "eval", split=ev["split"],
                        measure=bool(ev["measure"]))  # fmt: skip
        metrics[ev["split"]] = {
            k: held[k] for k in ("n_samples", "model", "model_image_only", "model_default")
        }
        if "measurement" in held:
            metrics[f"{ev['split']}_measurement"] = held["measurement"]
        # same tensors, card now with the held-out metrics
        card = replace(card, metrics=metrics)
        ckpt = save_checkpoint(ckpt, model, card)
    return ckpt, card


def _with_monitor(ts, monitor: str):
    return replace(ts, monitor=monitor, monitor_mode="max")


def _describe_data(table: Path, data: Mapping[str, Any], train_s, val_s) -> dict[str, Any]:
    root = table if table.is_dir() else table.parent
    desc: dict[str, Any] = {"path": str(table), "max_tiles": int(data["max_tiles"]),
                            "n_train": len(train_s), "n_val": len(val_s)}  # fmt: skip
    if data.get("generate"):
        desc["generate"] = dict(data["generate"])
    if data.get("tissue"):
        desc["tissue"] = asdict(TissueParams(**data["tissue"]))
    if (root / "manifest.json").exists():
        m = json.loads((root / "manifest.json").read_text())
        desc["manifest"] = {
            k: m[k] for k in ("kind", "size", "mpp", "first_seed", "count") if k in m
        }
    return json.loads(json.dumps(desc, default=str))
