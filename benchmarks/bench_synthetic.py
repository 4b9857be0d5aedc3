"""Synthetic slide benchmark: seconds to draw a 10,000 x 10,000 slide and write its truth.

Run from the repository root::

    .venv/bin/python benchmarks/bench_synthetic.py                  # 10k x 10k, seeds 0-2
    .venv/bin/python benchmarks/bench_synthetic.py --size 4096 --seeds 0

For each seed, in a fresh process: plan the slide (tissue map, textures),
render and write the pyramidal JPEG-tiled TIFF (all levels), then collect
every cell and write the ground truth (cells CSV + GeoJSON, masks, label).
Reported per seed: wall seconds of each stage, the process CPU seconds (so
time lost to other processes on a shared machine is visible), cell count and
peak RSS after the slide stage and at the end. The goal is plan + slide
under 30 s on 2 cores. On a shared machine, ``slide_cpu_s`` (CPU seconds of
all threads) bounds what the wall time would be on two idle cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _one(kind: str, size: int, seed: int, workers: int | None) -> dict:
    from histoscope.synthetic._cells import make_context
    from histoscope.synthetic._params import sample_params
    from histoscope.synthetic._tiles import write_slide
    from histoscope.synthetic._truth import collect_cells, write_cells, write_masks

    out = Path(tempfile.mkdtemp(prefix="bench-synth-"))
    cpu0, t0 = time.process_time(), time.perf_counter()
    params = sample_params(kind, seed, (size, size), 0.5)
    ctx = make_context(params)
    t1 = time.perf_counter()
    slide = write_slide(out / "s.tif", params, ctx, workers=workers)
    t2, cpu2 = time.perf_counter(), time.process_time()
    slide_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cells = collect_cells(ctx)
    write_cells(cells, params.mpp, out / "c.csv", out / "c.geojson")
    write_masks(ctx, out / "t.png", out / "m.png")
    t3 = time.perf_counter()
    res = {
        "seed": seed,
        "organ": params.organ,
        "tumour": params.tumour_extent,
        "plan_s": round(t1 - t0, 2),
        "slide_s": round(t2 - t1, 2),
        "plan_plus_slide_s": round(t2 - t0, 2),
        "slide_cpu_s": round(cpu2 - cpu0, 2),
        "truth_s": round(t3 - t2, 2),
        "cells": int(len(cells["uid"])),
        "tiff_mb": round(slide.stat().st_size / 2**20, 1),
        "slide_peak_rss_mib": round(slide_rss),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    for f in out.iterdir():
        f.unlink()
    out.rmdir()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", default="he", choices=("he", "ihc"))
    ap.add_argument("--size", type=int, default=10_000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--workers", type=int, default=None, help="render threads (default: CPUs)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_one(args.kind, args.size, args.seeds[0], args.workers)))
        return 0
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    print(f"load average before: {os.getloadavg()}")
    rows = []
    for seed in args.seeds:
        cmd = [sys.executable, __file__, "--child", "--kind", args.kind, "--size", str(args.size),
               "--seeds", str(seed)] + (["--workers", str(args.workers)] if args.workers else [])  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]))
    print(f"load average after: {os.getloadavg()}")
    cols = ["seed", "organ", "tumour", "plan_s", "slide_s", "slide_cpu_s", "truth_s", "cells",
            "tiff_mb", "slide_peak_rss_mib", "peak_rss_mib"]  # fmt: skip
    print("| " + " | ".join(cols) + " |")
    print("|" + " --- |" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    best = min(r["plan_plus_slide_s"] for r in rows)
    worst = max(r["plan_plus_slide_s"] for r in rows)
    print(f"plan + slide: best {best} s, worst {worst} s (goal < 30 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
