"""Cell typing benchmark: cells/s of the fast tile path and the reference crop path, one run.

Run from the repository root::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_celltypes.py            # 8192 x 8192
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_celltypes.py --size 20000 --crops 400

A synthetic H&E slide (seed ``--seed``, 0.5 µm/px) is written once under
``benchmarks/_data/`` and its true nucleus centroids are typed with the
embedded default (``sample_data/nuclass_default.safetensors``): every cell by
the fast path (one trunk pass per tile, RoIAlign at each nucleus), and the
first ``--crops`` cells of a random sample by both paths, so the ratio is
measured on the same cells in one process. Peak RSS is sampled during the
fast pass (``/proc/self/statm``) and reported above the RSS before it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "_data"
ROOT = Path(__file__).resolve().parents[1]


class PeakRSS:
    """Samples this process's resident memory every 50 ms in a thread."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = self.now()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.now())

    def __enter__(self) -> PeakRSS:
        self.start = self.now()
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=8192, help="slide edge, px at 0.5 µm/px")
    ap.add_argument("--seed", type=int, default=3970)
    ap.add_argument("--crops", type=int, default=300, help="cells typed by both paths")
    ap.add_argument("--checkpoint", default=str(ROOT / "sample_data/nuclass_default.safetensors"))
    args = ap.parse_args()

    import torch

    from histoscope.celltypes import classify
    from histoscope.checkpoints import load_checkpoint
    from histoscope.slide import open_slide
    from histoscope.synthetic import generate
    from histoscope.training.nuclass_eval import read_truth

    folder = DATA / f"celltypes_{args.size}"
    tif = folder / f"he_{args.seed:05d}.tif"
    if not tif.exists():
        t0 = time.perf_counter()
        generate(folder, "he", (args.size, args.size), args.seed, 0.5)
        print(f"slide written in {time.perf_counter() - t0:.0f} s")
    truth = read_truth(folder / f"he_{args.seed:05d}.cells.csv")
    model, card = load_checkpoint(args.checkpoint, family="nuclass")
    slide = open_slide(tif)
    x, y = truth["x"], truth["y"]
    rng = np.random.default_rng(0)
    sub = np.sort(rng.choice(len(x), size=min(args.crops, len(x)), replace=False))

    classify(slide, x[sub[:8]], y[sub[:8]], model, card, path="fast")  # warm-up
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        fast_all = classify(slide, x, y, model, card, path="fast")
        t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast_sub = classify(slide, x[sub], y[sub], model, card, path="fast")
    t_fast_sub = time.perf_counter() - t0
    t0 = time.perf_counter()
    crops_sub = classify(slide, x[sub], y[sub], model, card, path="crops")
    t_crops = time.perf_counter() - t0
    slide.close()

    res = {
        "slide": f"{args.size} x {args.size} px at 0.5 µm/px, seed {args.seed}",
        "cells": int(len(x)),
        "fast_all_seconds": round(t_fast, 2),
        "fast_cells_per_s": round(len(x) / t_fast, 1),
        "fast_peak_rss_above_start_mb": round((mem.peak - mem.start) / 2**20, 1),
        "subset_cells": int(len(sub)),
        "fast_subset_cells_per_s": round(len(sub) / t_fast_sub, 1),
        "crops_subset_cells_per_s": round(len(sub) / t_crops, 2),
        "ratio_fast_all_vs_crops": round((len(x) / t_fast) / (len(sub) / t_crops), 1),
        "subset_agreement": float((fast_sub.pred == crops_sub.pred).mean()),
        # the same cells typed in one call with all their neighbours or in a call of their own
        "fast_all_vs_subset_max_prob_diff": float(np.abs(fast_all.prob[sub] - fast_sub.prob).max()),
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
    }
    print(json.dumps(res, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
