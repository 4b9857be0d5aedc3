"""Point sampler benchmark: one read per batch neighbourhood against one read per crop.

Run from the repository root::

    .venv/bin/python benchmarks/bench_points.py                     # 20,000 cells
    .venv/bin/python benchmarks/bench_points.py --points 4000       # quicker

The first run draws an 8,192 x 8,192 H&E slide at 0.5 µm/px with
``histoscope.synthetic.generate(kind="he", seed=3)`` under ``benchmarks/_data/``
(about 20 s) and reuses it afterwards; ``--points`` cell centroids are drawn
from its ground-truth cell table.

For each view set (NuClass's local view, 224 px at 0.5 µm/px, and the
local + context pair, 1024 px at 0.5 µm/px resized to 512) the same points run
through :func:`histoscope.engine.run_samples` twice, with the same threads,
prefetch, batch and model (one that returns each view's mean, so reading
dominates): once with :class:`~histoscope.samplers.PointSampler` (each batch's
neighbourhood read once, crops cut from it) and once with a sampler that calls
``read_region`` for every crop (the same crops, in the same order). Each path
has its own slide handle, so neither inherits the other's decoded-tile cache.
The points are split into chunks run back to back in alternating order; the
figure reported is the median of the per-chunk time ratios (a shared CPU's
speed drifts over seconds), with the aggregate rates beside it. Outputs of
the two paths are compared (they must be identical).
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

DATA = Path(__file__).parent / "_data"
SIZE = 8192
SEED = 3


def cell_centroids(n: int, seed: int = 0) -> tuple[Path, np.ndarray]:
    """The benchmark slide and ``n`` of its ground-truth cell centroids (level-0 px)."""
    from histoscope.synthetic import generate

    folder = DATA / "points"
    slide = folder / f"he_{SEED:05d}.tif"
    table = folder / f"he_{SEED:05d}.cells.csv"
    if not (slide.exists() and table.exists()):
        generate(folder, kind="he", size=(SIZE, SIZE), seed=SEED)
    with open(table) as fh:
        xy = np.array([(float(r["x"]), float(r["y"])) for r in csv.DictReader(fh)])
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(xy), size=min(n, len(xy)), replace=False)
    return slide, xy[pick]


def _samplers():
    """``PointSampler`` and a subclass reading every crop with its own ``read_region``."""
    import torch

    from histoscope.samplers import PointSampler, resize_crop

    class PerCrop(PointSampler):
        def read(self, slide, idx, pin=False):
            out = []
            for view in self.views:
                buf = torch.empty((len(idx), view.out, view.out, 3), dtype=torch.uint8)
                arr = buf.numpy()
                for k, (x, y) in enumerate(self.origins(view, slide.mpp, idx)):
                    crop = slide.read_region(int(x), int(y), view.size, view.size, mpp=view.mpp)
                    arr[k] = resize_crop(crop, view.out_size)
                out.append(buf)
            return out[0] if len(out) == 1 else tuple(out)

    return PointSampler, PerCrop


def _mean_model():
    import torch

    class Mean(torch.nn.Module):
        def forward(self, x):
            views = x if isinstance(x, tuple) else (x,)
            return torch.cat([v.mean(dim=(2, 3)) for v in views], dim=1)

    return Mean()


def _read_all(sampler, slide, batches, workers: int) -> float:
    """Seconds to read every batch with ``workers`` threads (as the engine's readers do)."""
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(lambda idx: sampler.read(slide, idx), batches):
            pass
    return time.perf_counter() - t0


def _time_path(sampler, path: Path, args, model, spec) -> tuple[dict, np.ndarray]:
    """Cold read, warm read and end-to-end seconds of one sampler on a fresh slide handle."""
    from histoscope.engine import EngineParams, run_samples
    from histoscope.slide import open_slide

    params = EngineParams(args.batch, args.workers, args.prefetch, device="cpu")
    order = sampler.order()
    batches = [order[i : i + args.batch] for i in range(0, len(order), args.batch)]
    with open_slide(path) as slide:  # its own decoded-tile cache, empty
        cold = _read_all(sampler, slide, batches, args.workers)
        warm = _read_all(sampler, slide, batches, args.workers)
        t0 = time.perf_counter()
        out = run_samples(model, slide, sampler, spec, params)
        e2e = time.perf_counter() - t0
    return {"read_cold_s": cold, "read_warm_s": warm, "end_to_end_s": e2e}, out.outputs


def compare(name: str, views: tuple, path: Path, points: np.ndarray, args) -> dict:
    """Batched vs per-crop reading of the same crops, chunk by chunk."""
    from histoscope.models.backbones import InputSpec

    batched_cls, per_crop_cls = _samplers()
    classes = {"batched": batched_cls, "per_crop": per_crop_cls}
    spec = InputSpec(tile_size=224, mpp=0.5)
    model = _mean_model()
    order = batched_cls(points, views).order()  # chunks of neighbours, as a whole run has
    pairs, diff = [], 0.0
    for k, start in enumerate(range(0, len(points), args.chunk)):
        chunk = points[order[start : start + args.chunk]]
        times, outs = {}, {}
        for which in ("batched", "per_crop") if k % 2 == 0 else ("per_crop", "batched"):
            times[which], outs[which] = _time_path(classes[which](chunk, views), path, args,
                                                   model, spec)  # fmt: skip
        diff = max(diff, float(np.abs(outs["batched"] - outs["per_crop"]).max()))
        pair = {"points": len(chunk)}
        for key in times["batched"]:
            pair[key] = times["per_crop"][key] / times["batched"][key]
        pairs.append({**pair, "seconds": times})
        print(f"  {name} chunk {k}: " + ", ".join(f"{kk} {v:.2f}x" for kk, v in pair.items()
                                                   if kk != "points"), flush=True)  # fmt: skip
    n = sum(p["points"] for p in pairs)
    res: dict = {
        "views": [
            f"{v.size} px @ {v.mpp} µm/px" + (f" -> {v.out_size}" if v.out_size else "")
            for v in views
        ],  # fmt: skip
        "points": n,
        "max_abs_diff_outputs": diff,
    }
    for key in ("read_cold_s", "read_warm_s", "end_to_end_s"):
        what = key[:-2]
        for which in ("batched", "per_crop"):
            total = sum(p["seconds"][which][key] for p in pairs)
            res[f"{what}_{which}_points_per_s"] = n / total
        res[f"{what}_ratio_median"] = float(np.median([p[key] for p in pairs]))
    res["pairs"] = pairs
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", type=int, default=20_000, help="cell centroids")
    ap.add_argument("--chunk", type=int, default=2_000, help="points per timed pair")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--prefetch", type=int, default=4)
    ap.add_argument("--only", choices=["local", "two-view"], help="run one view set")
    args = ap.parse_args()

    import torch

    from histoscope.samplers import View

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, cuda {torch.cuda.is_available()}"
    )
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    path, points = cell_centroids(args.points)
    from bench_engine import _busy_seconds  # benchmarks/ is on sys.path when run as a script

    wall0, busy0, own0 = time.perf_counter(), _busy_seconds(), sum(os.times()[:2])
    cases = {
        "local": (View(224, 0.5),),
        "two-view": (View(224, 0.5), View(1024, 0.5, out_size=512)),
    }
    results = {}
    for name, views in cases.items():
        if args.only in (None, name):
            results[name] = compare(name, views, path, points, args)
    wall = time.perf_counter() - wall0
    others = _busy_seconds() - busy0 - (sum(os.times()[:2]) - own0)
    share = max(others, 0.0) / (wall * (os.cpu_count() or 1))
    print(f"wall {wall:.0f} s; other processes used {share:.0%} of the CPU meanwhile")
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "pairs"}
                      for k, v in results.items()}, indent=1))  # fmt: skip
    for name, r in results.items():
        for what in ("read_cold", "read_warm", "end_to_end"):
            print(
                f"{name} {what}: batched {r[f'{what}_batched_points_per_s']:.0f} points/s, "
                f"one read per crop {r[f'{what}_per_crop_points_per_s']:.0f} points/s, "
                f"ratio median {r[f'{what}_ratio_median']:.2f}"
            )
        print(f"{name}: outputs of the two paths differ by at most {r['max_abs_diff_outputs']:g}")


if __name__ == "__main__":
    main()
