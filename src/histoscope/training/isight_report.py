"""Run an iSight model over bags (:func:`predict`) and evaluate a checkpoint on a table.

:func:`predict` and :func:`task_metrics` are shared with training
(:mod:`histoscope.training.isight`), which imports this module, never the
other way round.

:func:`evaluate` writes into ``out_dir``:

``predictions.csv``
    One row per sample: image, and per task the ground truth, the prediction
    and one logit column per class (the model's calibrated logits), plus the
    classical measurement's intensity / quantity / location and H-score.
``metrics.csv`` and ``metrics.json``
    Accuracy, balanced accuracy, weighted F1 and 15-bin ECE per task for the
    model with metadata on every head, the model on the image alone, the model
    as the task runs it by default (each head with the text only where the
    card's ``text_decision`` says so), and the measurement (no probabilities,
    so no ECE); ``metrics.json`` also holds the confusion matrices and the
    temperatures (per case where the card has them).
``confusion_<task>.png`` and ``confusion_<task>_normalised.png``
    Counts and row-normalised confusion matrices of the model (with metadata).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histoscope.atomic import atomic_path, atomic_write_text
from histoscope.models.isight import TASKS
from histoscope.training import metrics as M
from histoscope.training.isight_data import MISSING, BagCache, collate, encode_labels, read_table

#: Tasks the classical measurement gives an estimate for.
MEASURED = ("intensity", "location", "quantity")


def task_metrics(y: np.ndarray, logits: np.ndarray | None, pred: np.ndarray | None = None) -> dict:
    """Metrics of one task over the labelled samples (``y != MISSING``).

    Parameters
    ----------
    y
        ``(n,)`` class indices, :data:`MISSING` where unlabelled.
    logits
        ``(n, k)`` logits, or ``None`` when only hard predictions exist.
    pred
        ``(n,)`` predictions; default ``argmax(logits)``.

    Returns
    -------
    dict
        ``n``, ``accuracy``, ``balanced_accuracy``, ``weighted_f1``, and with
        logits also ``ece`` and ``nll``.
    """
    keep = y != MISSING
    if pred is None:
        pred = np.asarray(logits).argmax(axis=1)
    if not keep.any():
        return {"n": 0}
    t, p = y[keep], np.asarray(pred)[keep]
    out = {
        "n": int(keep.sum()),
        "accuracy": M.accuracy(t, p),
        "balanced_accuracy": M.balanced_accuracy(t, p),
        "weighted_f1": M.weighted_f1(t, p),
    }
    if logits is not None:
        z = np.asarray(logits, dtype=np.float64)[keep]
        out["ece"] = M.ece(M.softmax(z), t)
        out["nll"] = M.nll(z, t)
    return out


def meta_tokens(model, texts: Sequence[str | None]):
    """Metadata token ids for ``model``'s own text encoder; ``None`` without any text."""
    return model.tokenize(list(texts))


def predict(
    model, bags: Sequence[np.ndarray], metadata: Sequence[str | None], *, batch_size: int = 8
) -> dict[str, np.ndarray]:
    """Logits per task for whole bags (every tile), in eval mode.

    Parameters
    ----------
    model
        An :class:`~histoscope.models.isight.ISight`.
    bags
        uint8 tile arrays, one per sample.
    metadata
        Clinical text per sample (``None`` or "" for none).
    batch_size
        Bags per forward pass.

    Returns
    -------
    dict
        ``task -> (n_samples, n_classes)`` float64 logits: the model's output,
        so already divided by its temperature.
    """
    import torch

    was_training = model.training
    model.eval()
    out: dict[str, list] = {t: [] for t in TASKS}
    with torch.no_grad():
        for i in range(0, len(bags), batch_size):
            x, mask = collate(bags[i : i + batch_size], model.input_spec)
            res = model(x, mask, meta_tokens(model, metadata[i : i + batch_size]))
            for t in TASKS:
                out[t].append(res[t].double().numpy())
    model.train(was_training)
    return {t: np.concatenate(v) for t, v in out.items()}


def _measure(samples, mpp: float, progress) -> list[dict[str, Any]]:
    from histoscope.slide import open_slide
    from histoscope.tasks.ihc_measure import measure_slide

    out = []
    for k, s in enumerate(samples, start=1):
        slide = open_slide(s.image)
        try:
            out.append(measure_slide(slide, mpp=mpp).summary())
        finally:
            close = getattr(slide, "close", None)
            if close is not None:
                close()
        if progress is not None:
            progress(k, len(samples), f"measure {s.name}")
    return out


def evaluate(
    checkpoint_path: str | os.PathLike,
    data_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    split: str | None = "test",
    measure: bool = True,
    measure_mpp: float = 0.5,
    max_tiles: int | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, Any]:
    """Run a checkpoint over a labelled table and write the reference tool's outputs.

    Parameters
    ----------
    checkpoint_path
        An iSight ``.safetensors`` checkpoint.
    data_path
        HPA-style table (or the dataset folder holding ``hpa.csv``).
    out_dir
        Output folder (see the module docstring for the files).
    split
        Rows of this split; ``None`` or ``"all"`` (or a table without a split
        column) uses every row.
    measure
        Also run :func:`histoscope.tasks.ihc_measure.measure_slide` on each
        image and score its intensity / quantity / location estimates.
    measure_mpp
        µm/px the measurement runs at.
    max_tiles
        Tiles per image; default the value the checkpoint was trained with.
    progress
        ``progress(done, total, message)``.

    Returns
    -------
    dict
        What ``metrics.json`` holds.
    """
    from histoscope.checkpoints import load_checkpoint

    model, card = load_checkpoint(checkpoint_path, family="isight")
    split = None if split == "all" else split
    try:
        samples = read_table(data_path, split=split)
    except ValueError as exc:
        if split is None or "no split column" not in str(exc):
            raise
        samples = read_table(data_path)
    y = encode_labels(samples, model.classes)
    if max_tiles is None:
        max_tiles = int(card.data.get("max_tiles", 64))
    from histoscope.tasks.isight import card_tissue

    cache = BagCache(model.input_spec, max_tiles, tissue=card_tissue(card))
    cache.fill(samples, progress)
    bags = [cache.get(s) for s in samples]

    with_meta = predict(model, bags, [s.metadata for s in samples])
    image_only = predict(model, bags, [None] * len(samples))
    from histoscope.tasks.isight import text_heads

    uses = text_heads(card, TASKS, given=True)
    default = {t: with_meta[t] if t in uses else image_only[t] for t in TASKS}
    results: dict[str, Any] = {
        "checkpoint": str(checkpoint_path),
        "checkpoint_sha256": card.sha256,
        "data": str(data_path),
        "split": split,
        "n_samples": len(samples),
        "temperature": model.config.get("temperatures")
        or dict(zip(TASKS, model.temperature.tolist(), strict=True)),
        "model": {t: task_metrics(y[:, j], with_meta[t]) for j, t in enumerate(TASKS)},
        "model_image_only": {t: task_metrics(y[:, j], image_only[t]) for j, t in enumerate(TASKS)},
        "model_default": {t: task_metrics(y[:, j], default[t]) for j, t in enumerate(TASKS)},
        "text_used_by": sorted(uses),
        "confusion": {},
    }
    for j, t in enumerate(TASKS):
        keep = y[:, j] != MISSING
        if keep.any():
            k = len(model.classes[t])
            pred = with_meta[t].argmax(axis=1)
            results["confusion"][t] = {
                "classes": list(model.classes[t]),
                "counts": M.confusion_matrix(y[keep, j], pred[keep], k).tolist(),
                "normalised": M.confusion_matrix(y[keep, j], pred[keep], k, normalize="true")
                .round(4)
                .tolist(),
            }
    summaries = _measure(samples, measure_mpp, progress) if measure else None
    if summaries is not None:
        results["measurement"] = {}
        for t in MEASURED:
            j = TASKS.index(t)
            lookup = {c: i for i, c in enumerate(model.classes[t])}
            pred = np.array([lookup.get(m[t], MISSING) for m in summaries])
            results["measurement"][t] = task_metrics(y[:, j], None, pred)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_predictions(out / "predictions.csv", samples, y, with_meta, model.classes, summaries)
    _write_metrics_csv(out / "metrics.csv", results)
    atomic_write_text(out / "metrics.json", json.dumps(results, indent=1) + "\n")
    for t, cm in results["confusion"].items():
        slug = t.replace("/", "_")
        draw_confusion(np.array(cm["counts"]), cm["classes"], out / f"confusion_{slug}.png",
                       title=f"{t} (counts)")  # fmt: skip
        draw_confusion(np.array(cm["normalised"]), cm["classes"],
                       out / f"confusion_{slug}_normalised.png", title=f"{t} (row-normalised)")  # fmt: skip
    return results


def _write_predictions(path: Path, samples, y, logits, classes, summaries) -> None:
    header = ["image", "split"]
    for t in TASKS:
        header += [f"{t}_true", f"{t}_pred"] + [f"{t}_logit[{c}]" for c in classes[t]]
    if summaries is not None:
        header += [f"measured_{t}" for t in MEASURED] + [
            "measured_h_score",
            "measured_percent_positive",
        ]
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        wr = csv.writer(fh)
        wr.writerow(header)
        for i, s in enumerate(samples):
            row: list[Any] = [s.image.name, s.split]
            for j, t in enumerate(TASKS):
                truth = classes[t][y[i, j]] if y[i, j] != MISSING else ""
                row += [truth, classes[t][int(logits[t][i].argmax())]]
                row += [f"{v:.5f}" for v in logits[t][i]]
            if summaries is not None:
                m = summaries[i]
                row += [m[t] for t in MEASURED]
                row += [f"{m['h_score']:.2f}", f"{m['percent_positive']:.2f}"]
            wr.writerow(row)


def _write_metrics_csv(path: Path, results: Mapping[str, Any]) -> None:
    cols = ["source", "task", "n", "accuracy", "balanced_accuracy", "weighted_f1", "ece", "nll"]
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        wr = csv.writer(fh)
        wr.writerow(cols)
        for source in ("model", "model_image_only", "model_default", "measurement"):
            for task, m in results.get(source, {}).items():
                vals = [m.get(c, "") for c in cols[2:]]
                wr.writerow([source, task, *[f"{v:.4f}" if isinstance(v, float) else v
                                             for v in vals]])  # fmt: skip


def draw_confusion(
    matrix: np.ndarray, classes: Sequence[str], path: str | os.PathLike, *, title: str = ""
) -> Path:
    """Draw a confusion matrix (rows: truth, columns: prediction) as a PNG with PIL.

    Cells are shaded by their share of the row; an integer matrix prints as
    counts, a float one with two decimals. Columns are labelled by index, and
    the row labels give the index of each class name.
    """
    from PIL import Image, ImageDraw, ImageFont

    is_counts = np.issubdtype(np.asarray(matrix).dtype, np.integer)
    m = np.asarray(matrix, dtype=np.float64)
    k = len(classes)
    font = ImageFont.load_default()
    cell = 44
    names = [f"{i}: {c}" for i, c in enumerate(classes)]
    left = 12 + 7 * max(len(n) for n in names)
    top = 52
    img = Image.new("RGB", (left + cell * k + 16, top + cell * k + 30), "white")
    d = ImageDraw.Draw(img)
    d.text((8, 6), title, fill="black", font=font)
    d.text((left, 24), "predicted ->", fill="black", font=font)
    d.text((8, top + cell * k + 10), "rows: ground truth", fill="black", font=font)
    rows = m.sum(axis=1, keepdims=True)
    share = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    for j in range(k):
        d.text((left + j * cell + cell // 2 - 3, top - 14), str(j), fill="black", font=font)
    for i in range(k):
        d.text((8, top + i * cell + cell // 2 - 6), names[i], fill="black", font=font)
        for j in range(k):
            v = share[i, j]
            shade = (int(255 * (1 - 0.85 * v)), int(255 * (1 - 0.55 * v)), 255)
            x0, y0 = left + j * cell, top + i * cell
            d.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=shade, outline="grey")
            text = f"{int(round(m[i, j]))}" if is_counts else f"{m[i, j]:.2f}"
            d.text((x0 + 6, y0 + cell // 2 - 6), text, fill="white" if v > 0.6 else "black",
                   font=font)  # fmt: skip
    path = Path(path)
    with atomic_path(path, ".png") as tmp:
        img.save(tmp, format="PNG")
    return path
