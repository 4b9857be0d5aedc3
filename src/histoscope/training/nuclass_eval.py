"""NuClass evaluation: the same cells through local, global and gated; fast path vs crops.

Writes per path (``fast`` / ``crops``): ``cells_<path>.csv`` (truth, predictions,
g), ``confusion_<path>.png`` (rows normalised, gated), ``reliability_<path>.csv``
(15 bins of the fused confidence: count, mean confidence, accuracy).
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histoscope.atomic import atomic_write_bytes, atomic_write_text
from histoscope.training._recipe import RecipeError


def confusion_png(cm: np.ndarray, classes: Sequence[str], title: str, cell: int = 44) -> bytes:
    """A row-normalised confusion matrix as a PNG (PIL only), values printed in each square."""
    from PIL import Image, ImageDraw

    k = len(classes)
    left, top = 110, 40
    img = Image.new("RGB", (left + k * cell + 10, top + k * cell + 110), "white")
    d = ImageDraw.Draw(img)
    d.text((left, 8), title, fill="black")
    for i in range(k):
        d.text((4, top + i * cell + cell // 2 - 6), classes[i][:16], fill="black")
        for j in range(k):
            v = float(cm[i, j])
            shade = int(255 * (1 - v))
            d.rectangle([left + j * cell, top + i * cell, left + (j + 1) * cell - 1,
                         top + (i + 1) * cell - 1], fill=(shade, shade, 255))  # fmt: skip
            d.text((left + j * cell + 6, top + i * cell + cell // 2 - 6), f"{v:.2f}",
                   fill="white" if v > 0.5 else "black")  # fmt: skip
    for j in range(k):
        d.text(
            (left + j * cell + 2, top + k * cell + 4 + 12 * (j % 2)), classes[j][:7], fill="black"
        )
    d.text((left, top + k * cell + 40), "rows: truth, columns: prediction", fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def reliability_table(prob: np.ndarray, y: np.ndarray, n_bins: int = 15) -> list[dict[str, Any]]:
    """Per confidence bin: range, count, mean confidence and accuracy (the ECE's bins)."""
    conf = prob.max(1)
    correct = prob.argmax(1) == y
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        s = idx == b
        rows.append({"lo": b / n_bins, "hi": (b + 1) / n_bins, "n": int(s.sum()),
                     "confidence": float(conf[s].mean()) if s.any() else None,
                     "accuracy": float(correct[s].mean()) if s.any() else None})  # fmt: skip
    return rows


def write_report(
    out: Path, tag: str, res: Mapping[str, np.ndarray], classes: Sequence[str]
) -> dict:
    """Metrics of one path's outputs plus its CSV, PNG and reliability files."""
    from histoscope.training.metrics import confusion_matrix
    from histoscope.training.nuclass_data import cell_metrics

    y = res["y"]
    m = cell_metrics(res, list(classes))
    cm = confusion_matrix(y, res["prob"].argmax(1), len(classes), normalize="true")
    m["confusion"] = np.round(cm, 4).tolist()
    atomic_write_bytes(out / f"confusion_{tag}.png", confusion_png(cm, classes, f"gated, {tag}"))
    rel = reliability_table(res["prob"], y)
    buf = io.StringIO()
    wr = csv.DictWriter(buf, fieldnames=list(rel[0]), lineterminator="\n")
    wr.writeheader()
    wr.writerows(rel)
    atomic_write_text(out / f"reliability_{tag}.csv", buf.getvalue())
    m["reliability"] = rel
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(["slide", "x", "y", "truth", "gated", "local", "global", "g", "confidence"])
    for i in range(len(y)):
        wr.writerow([res["slide"][i], f"{res['x'][i]:.2f}", f"{res['yy'][i]:.2f}", classes[y[i]],
                     classes[res["prob"][i].argmax()], classes[res["p_local"][i].argmax()],
                     classes[res["p_global"][i].argmax()], f"{res['g'][i]:.4f}",
                     f"{res['prob'][i].max():.4f}"])  # fmt: skip
    atomic_write_text(out / f"cells_{tag}.csv", buf.getvalue())
    return m


PATH_KEYS = (("local", "p_local"), ("global", "p_global"), ("gated", "prob"))


def _slide_tables(res: Mapping[str, np.ndarray], key: str, n_classes: int, n_bins: int):
    """Per slide: confusion counts ``(k, C, C)`` and ECE bin sums ``(k, 3, n_bins)``.

    The bin sums are cells, summed confidence and correct cells per bin, binned as
    :func:`histoscope.training.metrics.ece` does.
    """
    _, inv = np.unique(res["slide"], return_inverse=True)
    k, y, p = int(inv.max()) + 1, res["y"], res[key]
    pred, conf = p.argmax(1), p.max(1)
    cm = np.zeros((k, n_classes, n_classes))
    np.add.at(cm, (inv, y, pred), 1)
    b = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    bins = np.zeros((k, 3, n_bins))
    for row, w in enumerate((np.ones_like(conf), conf, (pred == y).astype(np.float64))):
        np.add.at(bins[:, row], (inv, b), w)
    return cm, bins


def _pooled(cm: np.ndarray, bins: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, macro F1, per-class F1 and ECE of the cells of slides taken ``counts`` times.

    ``counts`` is ``(B, k)`` (how often each slide is drawn in each resample); a
    class absent from a resample's truth has F1 NaN and is left out of its macro F1.
    """
    c = np.tensordot(counts, cm, axes=1)  # (B, C, C)
    tp = np.diagonal(c, axis1=1, axis2=2)
    truth, called = c.sum(2), c.sum(1)
    den = truth + called
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(den > 0, 2 * tp / np.where(den > 0, den, 1), np.nan)
        macro = np.nanmean(np.where(truth > 0, f1, np.nan), 1)  # classes in the truth
    n = truth.sum(1)
    nb, sc, sk = (np.tensordot(counts, bins[:, i], axes=1) for i in range(3))
    return {"accuracy": tp.sum(1) / n, "macro_f1": macro, "per_class_f1": f1,
            "ece": np.abs(sc - sk).sum(1) / nb.sum(1)}  # fmt: skip


def _interval(draws: np.ndarray, level: float) -> list[float] | None:
    """Percentile interval of the finite draws, or ``None`` when there are none."""
    d = draws[np.isfinite(draws)]
    if not len(d):
        return None
    a = (1 - level) / 2 * 100
    return [float(np.percentile(d, a)), float(np.percentile(d, 100 - a))]


def bootstrap_over_slides(
    res: Mapping[str, np.ndarray], classes: Sequence[str], *, n_boot: int = 2000, seed: int = 0,
    level: float = 0.95, n_bins: int = 15,
) -> dict[str, Any]:  # fmt: skip
    """Percentile bootstrap over slides of local, global and gated, paired across the paths.

    Cells of one slide are not independent, so whole slides are drawn with
    replacement ``n_boot`` times (the same draws for every path, as
    :func:`histoscope.training.metrics.bootstrap_slides` draws them for the tumour
    map) and the pooled figures recomputed from per-slide confusion counts and
    calibration bins.

    Returns
    -------
    dict
        Per path (``local``, ``global``, ``gated``): ``accuracy``, ``macro_f1``,
        ``ece`` as ``[lo, hi]`` and ``per_class_f1`` ``{class: [lo, hi] | None}``;
        ``gated_minus_better`` (gated macro F1 minus the better path's, per
        resample); ``global_minus_local_f1`` per class; ``n_slides``, ``n_boot``,
        ``seed``, ``level``. ``point`` holds the same figures on all cells once.
    """
    names = np.unique(res["slide"])
    k, nc = len(names), len(classes)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, k, size=(int(n_boot), k))
    counts = np.stack([np.bincount(d, minlength=k) for d in draws]).astype(np.float64)
    once = np.ones((1, k))
    boot, point = {}, {}
    for name, key in PATH_KEYS:
        cm, bins = _slide_tables(res, key, nc, n_bins)
        boot[name], point[name] = _pooled(cm, bins, counts), _pooled(cm, bins, once)
    out: dict[str, Any] = {"n_slides": k, "n_boot": int(n_boot), "seed": int(seed),
                           "level": float(level), "over": "slides", "point": {}}  # fmt: skip
    for name, _ in PATH_KEYS:
        b = boot[name]
        out[name] = {m: _interval(b[m], level) for m in ("accuracy", "macro_f1", "ece")}
        out[name]["per_class_f1"] = {
            c: _interval(b["per_class_f1"][:, i], level) for i, c in enumerate(classes)
        }
    better = np.maximum(boot["local"]["macro_f1"], boot["global"]["macro_f1"])
    out["gated_minus_better"] = _interval(boot["gated"]["macro_f1"] - better, level)
    diff = boot["global"]["per_class_f1"] - boot["local"]["per_class_f1"]
    out["global_minus_local_f1"] = {c: _interval(diff[:, i], level) for i, c in enumerate(classes)}
    p = {n: {m: v[0] for m, v in point[n].items()} for n in point}
    out["point"]["gated_minus_better"] = float(
        p["gated"]["macro_f1"] - max(p["local"]["macro_f1"], p["global"]["macro_f1"])
    )
    gl = p["global"]["per_class_f1"] - p["local"]["per_class_f1"]
    out["point"]["global_minus_local_f1"] = {
        c: (None if np.isnan(v) else float(v)) for c, v in zip(classes, gl, strict=True)
    }
    out["point"].update({n: {m: (v.tolist() if m == "per_class_f1" else float(v))
                             for m, v in p[n].items()} for n in p})  # fmt: skip
    return out


def add_intervals(m: dict[str, Any], boot: Mapping[str, Any]) -> dict[str, Any]:
    """Put :func:`bootstrap_over_slides` intervals beside the figures of one path's metrics ``m``."""
    for name, _ in PATH_KEYS:
        for key in ("accuracy", "macro_f1", "ece", "per_class_f1"):
            m[name][f"{key}_ci95"] = boot[name][key]
    pt = boot["point"]
    m["gated_minus_better"] = pt["gated_minus_better"]
    m["gated_minus_better_ci95"] = boot["gated_minus_better"]
    m["global_minus_local_f1"] = pt["global_minus_local_f1"]
    m["global_minus_local_f1_ci95"] = boot["global_minus_local_f1"]
    m["n_slides"] = boot["n_slides"]
    m["bootstrap"] = {k: boot[k] for k in ("over", "n_slides", "n_boot", "seed", "level")}
    return m


def read_truth(csv_path: Path) -> dict[str, np.ndarray]:
    """A synthetic slide's ``*.cells.csv``: ``x``, ``y`` (level-0 px) and class names."""
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if rows and not {"x", "y", "class"} <= set(rows[0]):
        raise RecipeError(f"{csv_path}: expected columns x, y, class")
    return {"x": np.array([float(r["x"]) for r in rows]), "y": np.array([float(r["y"]) for r in rows]),
            "class": np.array([r["class"] for r in rows])}  # fmt: skip


def sample_cells(truth, classes: Sequence[str], per_class: int, seed: int) -> np.ndarray:
    """Up to ``per_class`` cells of every class, drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    idx = []
    for c in classes:
        pool = np.flatnonzero(truth["class"] == c)
        if len(pool):
            idx.append(rng.choice(pool, size=min(per_class, len(pool)), replace=False))
    return np.sort(np.concatenate(idx)) if idx else np.zeros(0, np.int64)


def type_slides(model, card, slides: Sequence[Path], paths: Sequence[str], per_class: int,
                organ: str | None = None) -> dict[str, dict[str, np.ndarray]]:  # fmt: skip
    """Outputs of each path on the same sampled cells of ``slides`` (with truth and timings)."""
    from histoscope.celltypes import classify
    from histoscope.slide import open_slide

    classes = list(card.classes)
    acc: dict[str, dict[str, list]] = {p: {} for p in paths}
    seen: set[str] = set()
    for k, tif in enumerate(slides):
        truth = read_truth(_truth_csv(tif))
        seen.update(truth["class"].tolist())
        sel = sample_cells(truth, classes, per_class, seed=k)
        keep = np.isin(truth["class"][sel], classes)
        sel = sel[keep]
        if not len(sel):
            continue
        y = np.array([classes.index(c) for c in truth["class"][sel]], np.int64)
        slide = open_slide(tif)
        try:
            for p in paths:
                t0 = time.perf_counter()
                ct = classify(
                    slide, truth["x"][sel], truth["y"][sel], model, card, path=p, organ=organ
                )
                dt = time.perf_counter() - t0
                a = acc[p]
                for key in ("prob", "p_local", "p_global", "g"):
                    a.setdefault(key, []).append(getattr(ct, key))
                a.setdefault("y", []).append(y)
                a.setdefault("x", []).append(truth["x"][sel])
                a.setdefault("yy", []).append(truth["y"][sel])
                a.setdefault("slide", []).append(np.full(len(sel), tif.name))
                a.setdefault("seconds", []).append(np.array([dt]))
        finally:
            slide.close()
    if not any(acc.values()):
        raise RecipeError(f"no cell of the checkpoint's classes {classes} in the .cells.csv of "
                          f"{len(slides)} slide(s) (classes there: {sorted(seen) or 'none'})")  # fmt: skip
    return {p: {k: np.concatenate(v) for k, v in a.items()} for p, a in acc.items()}


def compare(model, card, slides: Sequence[Path], paths: Sequence[str], per_class: int, out: Path,
            organ: str | None = None, max_f1_loss: float = 0.01) -> dict[str, Any]:  # fmt: skip
    """Metrics per path on the same cells, the fast path's F1 loss, and the default path."""
    classes = list(card.classes)
    res = type_slides(model, card, slides, paths, per_class, organ)
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {"slides": [s.name for s in slides]}
    for p, r in res.items():
        m = write_report(out, p, r, classes)
        m["cells_per_s"] = float(len(r["y"]) / r["seconds"].sum())
        metrics[p] = add_intervals(m, bootstrap_over_slides(r, classes))
    if "fast" in res and "crops" in res:
        loss = metrics["crops"]["gated"]["macro_f1"] - metrics["fast"]["gated"]["macro_f1"]
        agree = float((res["fast"]["prob"].argmax(1) == res["crops"]["prob"].argmax(1)).mean())
        metrics["fast_vs_crops"] = {"macro_f1_loss": float(loss), "agreement": agree,
                                    "max_abs_prob_diff": float(np.abs(res["fast"]["prob"] - res["crops"]["prob"]).max()),
                                    "speedup": metrics["fast"]["cells_per_s"] / metrics["crops"]["cells_per_s"]}  # fmt: skip
        metrics["default_path"] = "fast" if loss <= max_f1_loss else "crops"
    atomic_write_text(
        out / "metrics_detail.json", json.dumps(metrics, indent=1, default=float) + "\n"
    )
    return metrics


def heldout(model, card, ev: Mapping[str, Any], out: Path) -> dict[str, Any]:
    """Generate the held-out slides of ``ev["test_seeds"]`` (once) and :func:`compare` the paths."""
    from histoscope.synthetic import generate

    folder = out / "slides"
    slides = []
    size = int(ev["slide_size"])
    for s in ev["test_seeds"]:
        tif = folder / f"he_{int(s):05d}.tif"
        if not tif.exists():
            generate(folder, "he", (size, size), int(s), 0.5, workers=1)
        slides.append(tif)
    res = compare(model, card, slides, ev["paths"], int(ev["per_class"]), out,
                  max_f1_loss=float(ev["max_f1_loss"]))  # fmt: skip
    return _compact(res)


def _compact(res: Mapping[str, Any]) -> dict[str, Any]:
    """The metrics without the confusion and reliability tables (kept for the card)."""
    out: dict[str, Any] = {}
    for k, v in res.items():
        if isinstance(v, Mapping):
            out[k] = {kk: vv for kk, vv in v.items() if kk not in ("confusion", "reliability")}
        else:
            out[k] = v
    return out


def _truth_csv(tif: Path) -> Path:
    """The ``.cells.csv`` written beside a synthetic slide ``tif``."""
    return tif.with_name(tif.name.replace(".tif", ".cells.csv"))


def find_slides(data: Path) -> tuple[list[Path], list[Path]]:
    """Labelled synthetic slides under ``data`` and the ``.tif`` files without truth.

    Looks in ``data`` itself, then in ``data/slides`` (where ``histoscope synth``
    writes them), then anywhere below ``data``; the first place holding a
    ``*.tif`` with its ``*.cells.csv`` beside it wins.

    Returns
    -------
    slides, unlabelled
        Sorted ``*.tif`` with a ``*.cells.csv``, and the ``*.tif`` seen without
        one (to name in an error when no slide is labelled).
    """
    unlabelled: set[Path] = set()
    for tifs in (data.glob("*.tif"), (data / "slides").glob("*.tif"), data.rglob("*.tif")):
        found = sorted(p for p in tifs if p.is_file())
        slides = [p for p in found if _truth_csv(p).is_file()]
        if slides:
            return slides, []
        unlabelled.update(found)
    return [], sorted(unlabelled)


def split_slides(data: Path, slides: Sequence[Path], split: str) -> list[Path]:
    """The ``slides`` whose row in ``data/manifest.json`` (``histoscope synth``) has ``split``.

    Raises
    ------
    RecipeError
        If the manifest is missing or unreadable, or no slide is in ``split``.
    """
    try:
        rows = json.loads((data / "manifest.json").read_text())["slides"]
        names = {str(r["name"]) for r in rows if r.get("split") == split}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RecipeError(f"split={split!r} needs {data / 'manifest.json'} as `histoscope "
                          f"synth` writes it ({exc}); use split='all' for any folder") from exc  # fmt: skip
    keep = [s for s in slides if s.stem in names]
    if not keep:
        raise RecipeError(f"{data}: no labelled slide in split {split!r} of its manifest")
    return keep


def _is_trio(data: Path) -> bool:
    from histoscope.training.nuclass_data import TRIO

    return any(all((d / f).exists() for f in TRIO) for d in (data, data / "train", data / "test"))


def evaluate_folder(checkpoint_path, data_path, out_dir, *, path: str = "both", per_class: int = 60,
                    organ: str | None = None, split: str = "all") -> dict[str, Any]:  # fmt: skip
    """Evaluate on a folder of synthetic slides (both paths) or a NuClass trio (crops).

    Parameters
    ----------
    data_path
        Synthetic slides (``*.tif`` each with its ``*.cells.csv``) directly in
        it, in its ``slides/`` (as ``histoscope synth`` writes them) or below
        it; or, when there is none, a NuClass trio (``annotations.json`` and
        the two patch HDF5 files, here or in ``train/`` / ``test/``).
    path
        ``"both"``, ``"fast"`` or ``"crops"``; a trio holds crops only, so it
        runs ``"crops"`` for ``"both"`` and refuses ``"fast"``.
    per_class
        Cells drawn per class and slide (at least 1).
    organ
        One of the checkpoint's tissues, or ``None`` for its "unknown" token.
    split
        ``"all"``, or only the slides of this split in ``data_path``'s synth
        ``manifest.json``.

    Raises
    ------
    RecipeError
        A bad ``path`` or ``per_class``, ``path="fast"`` on a trio, no labelled
        slide and no trio in ``data_path``, or a ``split`` without a manifest
        or without slides.
    """
    from histoscope.checkpoints import load_checkpoint

    data, out = Path(data_path), Path(out_dir)
    if path not in ("both", "fast", "crops"):
        raise RecipeError(f"path must be 'both', 'fast' or 'crops', got {path!r}")
    if isinstance(per_class, bool) or not isinstance(per_class, int | np.integer) or per_class < 1:
        raise RecipeError(f"per_class (cells drawn per class and slide) must be an integer of "
                          f"at least 1, got {per_class!r}")  # fmt: skip
    if not data.is_dir():
        raise RecipeError(f"{data}: not a folder (expected synthetic slides or a NuClass trio)")
    slides, unlabelled = find_slides(data)
    if not slides and not _is_trio(data):
        from histoscope.training.nuclass_data import TRIO

        seen = (f"; found {len(unlabelled)} .tif without a .cells.csv beside it "
                f"(e.g. {unlabelled[0]})" if unlabelled else "")  # fmt: skip
        raise RecipeError(
            f"{data}: nothing to evaluate: expected synthetic slides (*.tif each with its "
            f"*.cells.csv, in the folder, its slides/ or below, as `histoscope synth` writes "
            f"them) or a NuClass trio ({', '.join(TRIO)}, here or in train/ or test/){seen}"
        )
    if not slides and path == "fast":
        raise RecipeError(f"{data}: a NuClass trio holds crops, no slide to tile: path='fast' "
                          f"cannot run on it; use path='crops' (or 'both')")  # fmt: skip
    if split != "all":
        slides = split_slides(data, slides, split)
    model, card = load_checkpoint(checkpoint_path, family="nuclass")
    tok = None if organ is None else model.tissue_index(organ)  # an unknown organ: refused now
    if slides:
        paths = ["fast", "crops"] if path == "both" else [path]
        return _compact(compare(model, card, slides, paths, int(per_class), out, organ))
    from histoscope.training.nuclass_data import TrioSource, predict_windows

    tissues = card.input_spec.get("tissues") or model.config["tissues"]
    src = TrioSource(data, card.classes, tissues, local_size=int(model.config["local"]["crop"]))
    wins = [src.window(i) for i in range(len(src))]
    res = predict_windows(model, wins, tissue=tok if tok is not None else model.unknown_tissue)
    n = len(res["y"])
    res.update({"slide": np.full(n, data.name), "x": np.zeros(n), "yy": np.zeros(n)})
    out.mkdir(parents=True, exist_ok=True)
    return _compact({"crops": write_report(out, "crops", res, card.classes)})


def _ci(value: float | None, ci: Sequence[float] | None, digits: int = 3) -> str:
    """``0.883 [0.861, 0.902]`` (or ``-`` for a missing figure)."""
    if value is None:
        return "-"
    text = f"{value:.{digits}f}"
    return text + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def markdown_table(metrics: Mapping[str, Any]) -> str:
    """The held-out tables as ``benchmarks/RESULTS.md`` shows them, with issue 13's targets.

    One row per path (macro F1 of each, gated accuracy and ECE, the gate's gain
    over the better path; 95 % intervals from the bootstrap over slides when the
    metrics carry them), then each path's per-class F1 with global minus local.
    """
    from histoscope.synthetic import CONTEXT_ONLY_PAIRS, MORPHOLOGY_ONLY_PAIRS

    context = {c for pair in CONTEXT_ONLY_PAIRS for c in pair}
    morphology = {c for pair in MORPHOLOGY_ONLY_PAIRS for c in pair}
    paths = [p for p in ("fast", "crops") if isinstance(metrics.get(p), Mapping)]
    lines = ["| path | cells (slides) | local macro F1 | global macro F1 | gated macro F1 | "
             "gated accuracy | gated ECE | gated - better path |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for p in paths:
        m = metrics[p]
        lo, gl, ga = m["local"], m["global"], m["gated"]
        lines.append(
            f"| {p} | {m['n']:,} ({m.get('n_slides', '-')}) | "
            f"{_ci(lo['macro_f1'], lo.get('macro_f1_ci95'))} | "
            f"{_ci(gl['macro_f1'], gl.get('macro_f1_ci95'))} | "
            f"{_ci(ga['macro_f1'], ga.get('macro_f1_ci95'))} | "
            f"{_ci(ga['accuracy'], ga.get('accuracy_ci95'))} | "
            f"{_ci(ga['ece'], ga.get('ece_ci95'))} | "
            f"{_ci(m.get('gated_minus_better'), m.get('gated_minus_better_ci95'))} |"
        )
    for p in paths:
        m = metrics[p]
        lines += ["", f"Per-class F1, {p} path (95 % intervals over slides):", "",
                  "| class | cells | local | global | gated | global - local | target |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        diff, diff_ci = (
            m.get("global_minus_local_f1") or {},
            m.get("global_minus_local_f1_ci95") or {},
        )
        for c, n in m["n_per_class"].items():
            f1 = [m[k]["per_class_f1"].get(c) for k in ("local", "global", "gated")]
            ci = m["gated"].get("per_class_f1_ci95", {}).get(c)
            d = diff.get(c)
            target = ("global > local" if c in context else
                      "local > global" if c in morphology else "")  # fmt: skip
            if target and d is not None:
                ok = d > 0 if c in context else d < 0
                target += " met" if ok else " **not met**"
            lines.append(f"| {c} | {n:,} | {_ci(f1[0], None, 2)} | {_ci(f1[1], None, 2)} | "
                         f"{_ci(f1[2], ci, 2)} | {_ci(d, diff_ci.get(c), 2)} | {target} |")  # fmt: skip
        gain, ece = m.get("gated_minus_better"), m["gated"]["ece"]
        if gain is not None:
            lines += ["", f"{p}: gated - better path >= 0.02 "
                      f"{'met' if gain >= 0.02 else '**not met**'} ({gain:+.3f}); "
                      f"ECE <= 0.05 {'met' if ece <= 0.05 else '**not met**'} ({ece:.3f})."]  # fmt: skip
    return "\n".join(lines)
