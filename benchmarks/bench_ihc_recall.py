"""IHC nucleus detection recall: DAB-positive vs negative cells on held-out synthetic slides.

Run from the repository root::

    .venv/bin/python benchmarks/bench_ihc_recall.py --tumour-region  # 12 slides, 2048 px
    .venv/bin/python benchmarks/bench_ihc_recall.py --n 4 --size 1024 --first-seed 80000
    .venv/bin/python benchmarks/bench_ihc_recall.py --rules classical,learned --first-seed 97000

Slides: the first ``--n`` seeds from ``--first-seed`` (default 90000, never used for tuning,
which used 80000+; the learned detector trained on 81000+; 95000+ and 97000+ are fresh sets) whose sampled IHC design is strong and >75 % positive
(``positive_fraction > 0.75`` and ``dab_intensity >= 0.5``, the generator's >75 % / strong
classes), drawn with ``histoscope.synthetic.generate(kind="ihc")`` into
``benchmarks/_data/ihc_recall/`` (gitignored, reused). Each slide is measured whole with
``measure_slide`` at 0.5 µm/px under each detection rule; detected centroids are matched
one-to-one to the generator's cell table (``stem.cells.csv``, DAB-positive when
``dab_od > 0``) greedily by distance within 4 µm. Reported per rule, pooled over slides:
recall of positive and of negative cells, their difference, precision, percent positive
measured vs true (both over all cells; mean absolute error in points) and mean H-score.

``--tumour-region``: on the slides whose generator tumour mask (``stem.tumour_mask.png``,
16 µm/px) is not empty, percent positive is also measured among the cells inside that
region (``IHCMeasurement.within``) and compared with the truth among the target cells
(tumour and epithelial cells; lymphocytes in lymph node) inside it, and with the
all-cells percentage the summary gives without a region.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
MATCH_UM = 4.0


def strong_seeds(first: int, n: int, size: int) -> list[int]:
    """The first ``n`` seeds from ``first`` whose IHC design is strong and >75 % positive."""
    from histoscope.synthetic._params import sample_params

    seeds, seed = [], first
    while len(seeds) < n:
        p = sample_params("ihc", seed, (size, size), 0.5)
        if p.positive_fraction > 0.75 and p.dab_intensity >= 0.5:
            seeds.append(seed)
        seed += 1
    return seeds


def slide_and_truth(seed: int, size: int, out: Path):
    """Generate (or reuse) a slide; returns its path and truth ``(x_um, y_um, positive)``."""
    from histoscope.synthetic import generate

    stem = f"ihc_{seed:05d}_{size}"
    slide = out / f"{stem}.tif"
    if not slide.exists():
        generate(out, kind="ihc", size=(size, size), seed=seed, name=stem)
    with open(out / f"{stem}.cells.csv") as fh:
        rows = list(csv.DictReader(fh))
    xy = np.array([[float(r["x_um"]), float(r["y_um"])] for r in rows]).reshape(-1, 2)
    positive = np.array([float(r["dab_od"]) > 0 for r in rows], bool)
    return slide, xy, positive


def tumour_truth(seed: int, size: int, out: Path):
    """The generator's tumour mask (16 µm/px, bool) and per cell whether it is a target cell."""
    from PIL import Image

    from histoscope.synthetic._cells import target_classes
    from histoscope.synthetic._params import sample_params

    stem = f"ihc_{seed:05d}_{size}"
    mask = np.asarray(Image.open(out / f"{stem}.tumour_mask.png")) > 0
    targets = set(target_classes(sample_params("ihc", seed, (size, size), 0.5)))
    with open(out / f"{stem}.cells.csv") as fh:
        target = np.array([int(r["class_id"]) in targets for r in csv.DictReader(fh)], bool)
    return mask, target


def region_row(m, xy, positive, seed: int, size: int, out: Path) -> dict | None:
    """Percent positive inside the tumour region: measured, true among target / all cells."""
    from histoscope.tasks.ihc_measure import cells_in_mask

    mask, target = tumour_truth(seed, size, out)
    if not mask.any():
        return None
    um = 16.0
    i = np.clip((xy[:, 1] // um).astype(int), 0, mask.shape[0] - 1)
    j = np.clip((xy[:, 0] // um).astype(int), 0, mask.shape[1] - 1)
    inside_true = mask[i, j]
    tgt = target & inside_true
    if not tgt.any():
        return None
    r = m.within(cells_in_mask(m, mask, (um, um), (um / 2, um / 2)), "tumour region")
    s = r.summary()
    return {"seed": seed, "measured": s["percent_positive"], "n": s["n_counted"],
            "true_target": 100 * positive[tgt].mean(), "n_target": int(tgt.sum()),
            "true_all_inside": 100 * positive[inside_true].mean(),
            "all_cells": m.summary()["percent_positive"]}  # fmt: skip


def match(truth_xy: np.ndarray, found_xy: np.ndarray, radius: float = MATCH_UM) -> np.ndarray:
    """Per true cell, whether a detection lies within ``radius`` µm (one-to-one, nearest first)."""
    from histoscope.training.ihc_detector import match as one_to_one

    return one_to_one(truth_xy, found_xy, radius)


def measure(slide_path: Path, rule: str):
    """Whole-slide measurement at the default 0.5 µm/px with ``detection=rule``."""
    import histoscope as hs
    from histoscope.tasks.ihc_measure import IHCParams, measure_slide

    t0 = time.perf_counter()
    m = measure_slide(hs.open_slide(slide_path), IHCParams(detection=rule))
    return m, time.perf_counter() - t0


def evaluate(rules: list[str], seeds: list[int], size: int, out: Path,
             region: bool = False) -> dict[str, dict]:  # fmt: skip
    """Pooled counts and per-slide percent-positive errors for each rule."""
    acc = {r: {"hit": np.zeros(2), "n": np.zeros(2), "det": 0, "matched": 0, "err": [], "h": [],
               "s": 0.0, "region": []} for r in rules}  # fmt: skip
    for seed in seeds:
        slide, xy, positive = slide_and_truth(seed, size, out)
        true_pct = 100 * positive.mean()
        for rule in rules:
            m, secs = measure(slide, rule)
            found = np.stack([m.cells["x_um"], m.cells["y_um"]], axis=1)
            hit = match(xy, found)
            a, s = acc[rule], m.summary()
            a["hit"] += [hit[positive].sum(), hit[~positive].sum()]
            a["n"] += [positive.sum(), (~positive).sum()]
            a["det"] += m.n_cells
            a["matched"] += int(hit.sum())
            a["err"].append(s["percent_positive"] - true_pct)
            a["h"].append(s["h_score"])
            a["s"] += secs
            row = region_row(m, xy, positive, seed, size, out) if region else None
            if row is not None:
                a["region"].append(row)
                print(f"    tumour region: measured {row['measured']:5.1f} (n={row['n']}), true "
                      f"target {row['true_target']:5.1f} (n={row['n_target']}), true all inside "
                      f"{row['true_all_inside']:5.1f}, all cells "
                      f"{row['all_cells']:5.1f}", flush=True)  # fmt: skip
            print(f"seed {seed} {rule:12s} cells {m.n_cells:6d}/{len(xy):6d} "
                  f"recall+ {hit[positive].mean():.3f} recall- {hit[~positive].mean():.3f} "
                  f"%pos {s['percent_positive']:5.1f} (true {true_pct:5.1f}) "
                  f"H {s['h_score']:5.1f} {secs:5.1f} s", flush=True)  # fmt: skip
    return acc


def table(acc: dict[str, dict], names: dict[str, str]) -> str:
    """Markdown table, one row per rule."""
    lines = ["| detection | recall, DAB+ cells | recall, DAB- cells | difference | precision "
             "| % positive MAE (points) | % positive bias | mean H-score | s / slide |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for rule, a in acc.items():
        rp, rn = a["hit"] / np.maximum(a["n"], 1)
        err = np.asarray(a["err"])
        lines.append(
            f"| {names.get(rule, rule)} | {rp:.3f} | {rn:.3f} | {rp - rn:+.3f} | "
            f"{a['matched'] / max(a['det'], 1):.3f} | {np.abs(err).mean():.1f} | "
            f"{err.mean():+.1f} | {np.mean(a['h']):.1f} | {a['s'] / len(err):.1f} |"
        )
    return "\n".join(lines)


def region_table(acc: dict[str, dict], names: dict[str, str]) -> str:
    """Markdown table: percent positive among target cells, with and without the tumour region."""
    lines = ["| detection | slides | inside the region vs target cells' truth: MAE (bias) | "
             "inside the region vs all cells' truth there: MAE (bias) | all cells (no region) vs "
             "target cells' truth: MAE (bias) | per slide (inside / target truth / all-cell truth "
             "inside) |", "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for rule, a in acc.items():
        rows = a["region"]
        if not rows:
            continue
        e_in = np.array([r["measured"] - r["true_target"] for r in rows])
        e_reg = np.array([r["measured"] - r["true_all_inside"] for r in rows])
        e_all = np.array([r["all_cells"] - r["true_target"] for r in rows])
        per = ", ".join(f"{r['seed']}: {r['measured']:.0f} / {r['true_target']:.0f} / "
                        f"{r['true_all_inside']:.0f}" for r in rows)  # fmt: skip
        lines.append(f"| {names.get(rule, rule)} | {len(rows)} | {np.abs(e_in).mean():.1f} "
                     f"({e_in.mean():+.1f}) | {np.abs(e_reg).mean():.1f} ({e_reg.mean():+.1f}) "
                     f"| {np.abs(e_all).mean():.1f} ({e_all.mean():+.1f}) | {per} |")  # fmt: skip
    return "\n".join(lines)


def summarise(a: dict) -> dict:
    """Pooled figures of one rule (as in :func:`table`), plain floats."""
    rp, rn = a["hit"] / np.maximum(a["n"], 1)
    err = np.asarray(a["err"])
    return {"recall_pos": round(float(rp), 4), "recall_neg": round(float(rn), 4),
            "precision": round(a["matched"] / max(a["det"], 1), 4),
            "percent_positive_mae": round(float(np.abs(err).mean()), 2),
            "percent_positive_bias": round(float(err.mean()), 2),
            "percent_positive_max_error": round(float(np.abs(err).max()), 2)}  # fmt: skip


def record(card_path: Path, seeds: list[int], acc: dict[str, dict], size: int) -> None:
    """Add this run's pooled figures to a checkpoint card's ``metrics["heldout"]`` (load-modify-save)."""
    import fcntl
    import tempfile

    with open(Path(tempfile.gettempdir()) / f"{card_path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two benchmark runs may record into one card
        _record(card_path, seeds, acc, size)


def _record(card_path: Path, seeds: list[int], acc: dict[str, dict], size: int) -> None:
    from safetensors.torch import load_file, save_file

    from histoscope.atomic import atomic_path
    from histoscope.checkpoints import CARD_KEY, FORMAT, FORMAT_KEY, read_card, tensor_hash

    card = read_card(card_path)
    state = load_file(str(card_path))
    if card.sha256 and tensor_hash(state) != card.sha256:
        raise SystemExit(f"{card_path}: tensors do not match the card's sha256; not rewriting it")
    d = card.to_dict()
    heldout = dict(d["metrics"].get("heldout", {}))
    heldout[f"{seeds[0]}-{seeds[-1]}"] = {
        "seeds": seeds, "slide_px": size, "mpp": 0.5, "match_um": MATCH_UM,
        "command": "benchmarks/bench_ihc_recall.py", **{r: summarise(a) for r, a in acc.items()}}  # fmt: skip
    d["metrics"] = {**d["metrics"], "heldout": heldout}
    with atomic_path(card_path, suffix=".safetensors") as tmp:
        save_file(
            state, str(tmp), metadata={FORMAT_KEY: FORMAT, CARD_KEY: json.dumps(d, sort_keys=True)}
        )
    print(f"recorded in {card_path}: metrics.heldout[{seeds[0]}-{seeds[-1]}]")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=12, help="number of slides")
    ap.add_argument("--size", type=int, default=2048, help="slide side in pixels (0.5 µm/px)")
    ap.add_argument("--first-seed", type=int, default=90000, help="held-out seeds start here")
    ap.add_argument("--rules", default="blobs,classical", help="detection rules")
    ap.add_argument("--out", type=Path, default=ROOT / "_data" / "ihc_recall")
    ap.add_argument("--tumour-region", action="store_true",
                    help="also percent positive inside the generator's tumour region")  # fmt: skip
    ap.add_argument("--record", type=Path, default=None,
                    help="add the pooled figures to this checkpoint's card (metrics.heldout)")  # fmt: skip
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = strong_seeds(args.first_seed, args.n, args.size)
    print(f"seeds: {seeds}")
    rules = args.rules.split(",")
    acc = evaluate(rules, seeds, args.size, args.out, region=args.tumour_region)
    names = {"hematoxylin": "hematoxylin (first default)", "classical": "classical (H&E detector)",
             "learned": "learned (centre network)"}  # fmt: skip
    print()
    print(table(acc, names))
    if args.tumour_region:
        print()
        print(region_table(acc, names))
    if args.record is not None:
        record(args.record, seeds, acc, args.size)
    print(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                      "python": sys.version.split()[0], "seeds": seeds}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
