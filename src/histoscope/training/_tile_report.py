"""Tables and a plot for a tile classifier evaluation: ``tiles.csv`` and ``roc.png``."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from histoscope.training._tiles import CLASSES, TileSet

COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189))


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order].astype(bool)
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]  # end of each tie run
    tp = np.cumsum(y)[last]
    fp = np.cumsum(~y)[last]
    tpr = np.r_[0.0, tp / max(1, y.sum())]
    fpr = np.r_[0.0, fp / max(1, (~y).sum())]
    return fpr, tpr


def roc_png(curves: Mapping[str, tuple[np.ndarray, np.ndarray, float | None]], size=360) -> bytes:
    """A small ROC plot (PIL only): one line per set, AUC in the legend."""
    from PIL import Image, ImageDraw

    pad = 40
    img = Image.new("RGB", (size + 2 * pad, size + 2 * pad), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([pad, pad, pad + size, pad + size], outline="black")
    d.line([pad, pad + size, pad + size, pad], fill=(180, 180, 180))

    def xy(fx: float, fy: float) -> tuple[float, float]:
        return pad + fx * size, pad + (1 - fy) * size

    for k, (name, (fpr, tpr, auc)) in enumerate(curves.items()):
        colour = COLOURS[k % len(COLOURS)]
        d.line([xy(a, b) for a, b in zip(fpr, tpr, strict=True)], fill=colour, width=2)
        text = f"{name}: AUC {auc:.3f}" if auc is not None else name
        d.text((pad + 8, pad + size - 16 * (len(curves) - k)), text, fill=colour)
    d.text((pad + size // 2 - 50, pad + size + 10), "false positive rate", fill="black")
    d.text((4, pad - 16), "true positive rate", fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def per_slide_table(tiles: TileSet, probs: Mapping[str, np.ndarray]) -> str:
    """CSV text: per slide and set, tile counts, AUC (empty with one class) and accuracy at 0.5."""
    from histoscope.training.metrics import roc_auc

    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(["slide", "set", "n_normal", "n_tumour", "auc", "accuracy"])
    for k, name in enumerate(tiles.names):
        sel = tiles.slide == k
        y = tiles.labels[sel]
        for set_name, p in probs.items():
            auc = f"{roc_auc(y, p[sel]):.4f}" if len(np.unique(y)) == 2 else ""
            acc = float(((p[sel] >= 0.5) == (y == 1)).mean()) if sel.any() else float("nan")
            wr.writerow(
                [name, set_name, int((y == 0).sum()), int((y == 1).sum()), auc, f"{acc:.4f}"]
            )
    return buf.getvalue()


def write_report(
    out: Path,
    tiles: TileSet,
    probs: Mapping[str, np.ndarray],
    metrics: Mapping[str, Mapping[str, Any]],
) -> list[Path]:
    """Write ``tiles.csv`` (truth and one probability column per set), ``per_slide.csv``, ``roc.png``.

    Parameters
    ----------
    out
        Output folder (created).
    tiles
        The evaluated tiles.
    probs
        Set name -> ``(N,)`` tumour probabilities.
    metrics
        Set name -> metrics with ``auc``.

    Returns
    -------
    list of pathlib.Path
        The files written.
    """
    from histoscope.atomic import atomic_write_bytes, atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(["slide", "x", "y", "label", "tumour_fraction", *[f"p_tumour_{k}" for k in probs]])
    for i in range(len(tiles)):
        wr.writerow([tiles.names[tiles.slide[i]], int(tiles.coords[i, 0]), int(tiles.coords[i, 1]),
                     CLASSES[tiles.labels[i]], f"{tiles.tumour_fraction[i]:.4f}",
                     *[f"{p[i]:.5f}" for p in probs.values()]])  # fmt: skip
    paths = [atomic_write_text(out / "tiles.csv", buf.getvalue())]
    paths.append(atomic_write_text(out / "per_slide.csv", per_slide_table(tiles, probs)))
    curves = {k: (*roc_curve(tiles.labels, p), metrics[k].get("auc")) for k, p in probs.items()}
    paths.append(atomic_write_bytes(out / "roc.png", roc_png(curves)))
    return paths
