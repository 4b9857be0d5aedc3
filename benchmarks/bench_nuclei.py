"""Classical nucleus detector: detection F1 on synthetic H&E, and speed / memory on a big slide.

Run from the repository root::

    # accuracy: defaults chosen on seeds 100-104; held out: 910-919 (fresh), 900-909 (seen)
    .venv/bin/python benchmarks/bench_nuclei.py accuracy --seeds 910-919 --size 2048
    # speed: cells/s and peak RSS on generated slides (cached under /tmp/histoscope_bench_nuclei)
    .venv/bin/python benchmarks/bench_nuclei.py speed --sizes 8000 20000

``accuracy`` generates H&E slides with ``histoscope.synthetic.write_dataset`` (0.5 µm/px), runs
``iter_detect`` over each whole slide (default :class:`NucleiParams`, tiles and overlaps as in
use) and matches detected centroids one-to-one to the true cells (``stem.cells.csv``; red blood
cells and debris are drawn but are not cells) greedily, nearest pairs first, within 4 µm.
Reported per slide and pooled: true cells, detections, matches, precision, recall, F1, and
recall per cell class. ``speed`` runs each slide size in a fresh process (so peak RSS is its
own) over the whole slide with the tissue mask, and reports tiles, nuclei, seconds, nuclei/s,
peak RSS and the bytes the returned table itself holds.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MATCH_UM = 4.0
CACHE = Path("/tmp/histoscope_bench_nuclei")


def seeds_arg(text: str) -> list[int]:
    """``"900-909"`` or ``"100,102"`` as a list of seeds."""
    out: list[int] = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return out


def match(truth: np.ndarray, found: np.ndarray, radius: float) -> tuple[np.ndarray, int]:
    """Per true cell whether a detection matched it (one-to-one, nearest pairs first)."""
    from scipy.spatial import cKDTree

    hit = np.zeros(len(truth), bool)
    if not len(truth) or not len(found):
        return hit, 0
    pairs = cKDTree(found).sparse_distance_matrix(cKDTree(truth), radius, output_type="coo_matrix")
    order = np.argsort(pairs.data, kind="stable")
    used = np.zeros(len(found), bool)
    for det, t in zip(pairs.row[order], pairs.col[order], strict=True):
        if not used[det] and not hit[t]:
            used[det] = hit[t] = True
    return hit, int(used.sum())


def truth_of(csv_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """True cell centroids ``(n, 2)`` level-0 px and class names."""
    with open(csv_path) as fh:
        rows = list(csv.DictReader(fh))
    xy = np.array([[float(r["x"]), float(r["y"])] for r in rows]).reshape(-1, 2)
    return xy, np.array([r["class"] for r in rows])


def dataset(seeds: list[int], size: int) -> list[tuple[int, Path, Path]]:
    """``(seed, slide, cells_csv)`` per seed, generated once into :data:`CACHE`."""
    from histoscope.synthetic import write_dataset

    out = []
    for seed in seeds:
        folder = CACHE / f"he_{size}_{seed}"
        if not (folder / "manifest.json").exists():
            write_dataset(folder, "he", (size, size), seed=seed, count=1)
        row = json.loads((folder / "manifest.json").read_text())["slides"][0]
        out.append((seed, folder / row["slide"], folder / row["cells_csv"]))
    return out


def accuracy(args: argparse.Namespace) -> int:
    import histoscope as hs
    from histoscope.nuclei import NucleiParams, detect_slide

    params = NucleiParams(**json.loads(args.params))
    pooled = {"truth": 0, "found": 0, "matched": 0}
    by_class: dict[str, list[int]] = {}
    lines = ["| seed | true cells | detections | matched | precision | recall | F1 | s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for seed, slide_path, cells_csv in dataset(seeds_arg(args.seeds), args.size):
        slide = hs.open_slide(slide_path)
        t0 = time.perf_counter()
        nuc = detect_slide(slide, params)
        secs = time.perf_counter() - t0
        xy, cls = truth_of(cells_csv)
        radius = MATCH_UM / float(slide.mpp)
        hit, matched = match(xy, np.stack([nuc.x, nuc.y], axis=1), radius)
        p, r = matched / max(len(nuc), 1), matched / max(len(xy), 1)
        f1 = 2 * p * r / max(p + r, 1e-12)
        lines.append(f"| {seed} | {len(xy)} | {len(nuc)} | {matched} | {p:.3f} | {r:.3f} | "
                     f"{f1:.3f} | {secs:.1f} |")  # fmt: skip
        print(lines[-1], flush=True)
        pooled["truth"] += len(xy)
        pooled["found"] += len(nuc)
        pooled["matched"] += matched
        for name in np.unique(cls):
            a = by_class.setdefault(str(name), [0, 0])
            a[0] += int(hit[cls == name].sum())
            a[1] += int((cls == name).sum())
    p = pooled["matched"] / max(pooled["found"], 1)
    r = pooled["matched"] / max(pooled["truth"], 1)
    f1 = 2 * p * r / max(p + r, 1e-12)
    lines.append(f"| pooled | {pooled['truth']} | {pooled['found']} | {pooled['matched']} | "
                 f"{p:.3f} | {r:.3f} | {f1:.3f} | |")  # fmt: skip
    print("\n".join(lines))
    print("\n| class | true cells | recall |\n| --- | --- | --- |")
    for name, (h, n) in sorted(by_class.items(), key=lambda kv: -kv[1][1]):
        print(f"| {name} | {n} | {h / max(n, 1):.3f} |")
    print(json.dumps({"params": json.loads(args.params), "machine": _machine()}))
    return 0


def _machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}"


def speed_one(args: argparse.Namespace) -> int:
    """One size, in this process: print a JSON line with the numbers."""
    import histoscope as hs
    from histoscope.nuclei import NucleiParams, iter_detect
    from histoscope.tissue import tissue_mask

    (seed, slide_path, _), = dataset([args.seed], args.one)  # fmt: skip
    slide = hs.open_slide(slide_path)
    t0 = time.perf_counter()
    mask = tissue_mask(slide)
    t_mask = time.perf_counter() - t0
    gen = iter_detect(slide, NucleiParams(), tissue=mask)
    tiles = 0
    try:
        while True:
            done, total, _ = next(gen)
            tiles = total
    except StopIteration as stop:
        nuc = stop.value
    secs = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    table_mb = (nuc.x.nbytes + nuc.y.nbytes + sum(o.nbytes + 112 for o in nuc.outlines)
                + nuc.measurements.memory_usage(deep=True).sum()) / 2**20  # fmt: skip
    print(json.dumps({"size": args.one, "seed": seed, "tiles": tiles, "nuclei": len(nuc),
                      "seconds": round(secs, 1), "mask_seconds": round(t_mask, 1),
                      "nuclei_per_s": round(len(nuc) / secs, 1), "peak_rss_mb": round(rss_mb),
                      "table_mb": round(table_mb, 1), "tissue_fraction": round(mask.fraction, 3),
                      "threads": os.environ.get("OMP_NUM_THREADS", "unset")}))  # fmt: skip
    return 0


def speed(args: argparse.Namespace) -> int:
    rows = []
    for size in args.sizes:
        dataset([args.seed], size)  # generate first, outside the measured process
        cmd = [sys.executable, __file__, "speed", "--one", str(size), "--seed", str(args.seed)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| slide (px) | tissue | tiles | nuclei | s | nuclei/s | peak RSS (MB) | table (MB) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['size']:,} x {r['size']:,} | {r['tissue_fraction']:.0%} | {r['tiles']} | "
              f"{r['nuclei']:,} | {r['seconds']} | {r['nuclei_per_s']:,.0f} | {r['peak_rss_mb']} "
              f"| {r['table_mb']} |")  # fmt: skip
    print(json.dumps({"machine": _machine()}))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("accuracy", help="F1 against the true centroids")
    a.add_argument("--seeds", default="910-919", help="e.g. 910-919 (held out) or 100-104 (tuning)")
    a.add_argument("--size", type=int, default=2048, help="slide side in px (0.5 µm/px)")
    a.add_argument(
        "--params", default="{}", help="NucleiParams as JSON, e.g. '{\"threshold\": 0.3}'"
    )
    a.set_defaults(func=accuracy)
    s = sub.add_parser("speed", help="nuclei/s and peak RSS per slide size")
    s.add_argument("--sizes", type=int, nargs="+", default=[8000, 20000])
    s.add_argument("--seed", type=int, default=7)
    s.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)
    s.set_defaults(func=lambda ns: speed_one(ns) if ns.one else speed(ns))
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
