"""Engine benchmark: end-to-end tiles/s against forward-only, and peak RSS vs slide size.

Run from the repository root::

    .venv/bin/python benchmarks/bench_engine.py                 # throughput + RSS check
    .venv/bin/python benchmarks/bench_engine.py --tiles 256 --no-rss   # quicker

Throughput: the default model (``hs_cnn_small``, 224 px at 0.5 µm/px) runs
over the first ``--tiles`` tissue tiles of a generated 10,000 x 10,000 slide
through :func:`histoscope.engine.run_tiles` (tiles read, decoded, batched,
normalised, forward), then over the very same tiles already in memory as
normalised float tensors (forward only). The ratio says how much of the
reading is hidden behind compute.

Memory: each slide size runs in a fresh process that builds the tissue mask,
the tile grid, and runs every tissue tile through the engine with a cheap
model (``test_cnn`` at 224 px, so reading dominates); its peak RSS
(``ru_maxrss``) is reported for a 10k- and a 40k-wide square slide.

Slides are written once under ``benchmarks/_data/`` and reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "_data"
MPP = 0.5


def _texture(n: int = 1024, seed: int = 0) -> np.ndarray:
    """H&E-like texture: pink stroma with purple nuclei and noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    stroma = 0.5 + 0.25 * np.sin(xx / 23.0 + np.sin(yy / 41.0) * 3) * np.cos(yy / 31.0)
    nuclei = np.zeros((n, n), bool)
    for cy, cx, r in zip(
        rng.integers(0, n, 2500), rng.integers(0, n, 2500), rng.uniform(3, 8, 2500), strict=True
    ):
        y0, y1, x0, x1 = max(cy - 9, 0), min(cy + 10, n), max(cx - 9, 0), min(cx + 10, n)
        nuclei[y0:y1, x0:x1] |= (yy[y0:y1, x0:x1] - cy) ** 2 + (xx[y0:y1, x0:x1] - cx) ** 2 < r * r
    rgb = np.array([235, 150, 200], np.float32) * (0.75 + 0.3 * stroma[..., None])
    rgb[nuclei] = (90, 60, 150)
    return np.clip(rgb + rng.normal(0, 10, (n, n, 3)), 0, 255).astype(np.uint8)


def make_slide(size: int) -> Path:
    """A ``size`` x ``size`` slide at 0.5 µm/px: an elliptical tissue section on glass."""
    from histoscope.slide import write_pyramidal_tiff

    path = DATA / f"engine_{size}.tif"
    if path.exists():
        return path
    DATA.mkdir(parents=True, exist_ok=True)
    tex = _texture()
    n = tex.shape[0]
    c, r = size / 2, size * 0.42

    def render(y: int, x: int, h: int, w: int) -> np.ndarray:
        ty, tx = np.arange(y, y + h) % n, np.arange(x, x + w) % n
        out = tex[np.ix_(ty, tx)]
        yy, xx = np.ogrid[y : y + h, x : x + w]
        glass = (yy - c) ** 2 + (xx - c) ** 2 > r * r
        out[np.broadcast_to(glass, (h, w))] = 243
        return out

    return write_pyramidal_tiff(path, render, shape=(size, size), mpp=MPP, tile=256)


def _grid(slide, spec, limit: int | None = None):
    from histoscope.tissue import TissueParams, tile_grid, tissue_mask

    mask = tissue_mask(slide, TissueParams(mpp=8.0))
    grid = tile_grid(slide, mask, mpp=spec.mpp, tile_size=spec.tile_size, min_tissue=0.5)
    if limit is not None and limit < len(grid):
        grid = dataclasses.replace(
            grid, coords=grid.coords[:limit], index=grid.index[:limit], tissue=grid.tissue[:limit]
        )
    return grid


def _busy_seconds() -> float:
    """CPU seconds all processes have been busy (Linux ``/proc/stat``), else 0."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    ticks = [int(v) for v in fields]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _subgrid(grid, sl: slice):
    return dataclasses.replace(
        grid, coords=grid.coords[sl], index=grid.index[sl], tissue=grid.tissue[sl]
    )


def throughput(args: argparse.Namespace) -> dict:
    """End-to-end vs forward-only tiles/s on the same tiles, same model, same batch.

    The tiles are split into chunks; each chunk runs forward-only and end to
    end back to back (alternating which goes first), ``--repeats`` times. A
    shared CPU's speed drifts by 2-3x over seconds, so the figure reported is
    the median of the per-pair ratios, with the aggregate rates beside it.
    """
    import torch

    from histoscope.engine import EngineParams, run_tiles
    from histoscope.models import create_backbone
    from histoscope.slide import open_slide

    torch.manual_seed(0)
    bb = create_backbone(args.model)
    spec, model = bb.input_spec, bb.module.eval()
    params = EngineParams(batch_size=args.batch, workers=args.workers, prefetch=args.prefetch)
    slide = open_slide(make_slide(args.size))
    grid = _grid(slide, spec, args.tiles)
    t = spec.tile_size
    reads = [slide.read_region(int(x), int(y), t, t, mpp=spec.mpp) for x, y in grid.coords]
    tiles = np.stack(reads)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    x_all = (torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255 - mean) / std
    # Same memory layout as the engine's batches (uint8 NHWC permuted, i.e. channels_last),
    # which oneDNN convolutions run ~1.5x faster than NCHW on this CPU: compare like with like.
    x_all = x_all.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        model(x_all[: args.batch])  # warm-up (allocator, kernels) for both measurements

    def forward(sl: slice) -> tuple[float, np.ndarray]:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = torch.cat([model(b) for b in torch.split(x_all[sl], args.batch)])
        return time.perf_counter() - t0, out.numpy()

    def e2e(sl: slice) -> tuple[float, np.ndarray]:
        t0 = time.perf_counter()
        out = run_tiles(model, slide, _subgrid(grid, sl), spec, params)
        return time.perf_counter() - t0, out.outputs

    pairs = []
    n = len(grid)
    wall0, busy0, own0 = time.perf_counter(), _busy_seconds(), sum(os.times()[:2])
    for rep in range(args.repeats):
        for k, start in enumerate(range(0, n, args.chunk)):
            sl = slice(start, min(start + args.chunk, n))
            first_e2e = (rep + k) % 2 == 1
            if first_e2e:
                t_e2e, o_e2e = e2e(sl)
                t_fwd, o_fwd = forward(sl)
            else:
                t_fwd, o_fwd = forward(sl)
                t_e2e, o_e2e = e2e(sl)
            m = sl.stop - sl.start
            pairs.append(
                {
                    "tiles": m,
                    "forward_s": t_fwd,
                    "e2e_s": t_e2e,
                    "ratio": t_fwd / t_e2e,
                    "max_abs_diff": float(np.abs(o_e2e - o_fwd).max()),
                }
            )
    wall = time.perf_counter() - wall0
    others = _busy_seconds() - busy0 - (sum(os.times()[:2]) - own0)
    tot = sum(p["tiles"] for p in pairs)
    ratios = sorted(p["ratio"] for p in pairs)
    return {
        "model": args.model,
        "tile": f"{t} px at {spec.mpp} µm/px",
        "tiles": n,
        "chunk": args.chunk,
        "repeats": args.repeats,
        "batch": args.batch,
        "workers": args.workers,
        "forward_only_tiles_per_s": tot / sum(p["forward_s"] for p in pairs),
        "end_to_end_tiles_per_s": tot / sum(p["e2e_s"] for p in pairs),
        "ratio_median": float(np.median(ratios)),
        "ratio_min": ratios[0],
        "ratio_max": ratios[-1],
        "max_abs_diff_e2e_vs_forward": max(p["max_abs_diff"] for p in pairs),
        "other_processes_cpu_share": max(others, 0.0) / (wall * (os.cpu_count() or 1)),
        "pairs": pairs,
    }


def _peak_rss_mib() -> float:
    """This process's peak RSS (``VmHWM``; unlike ``ru_maxrss`` it is reset by exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_child(size: int, workers: int, batch: int) -> dict:
    """Whole-slide run in this (fresh) process; peak RSS in MiB."""
    import psutil
    import torch

    from histoscope.engine import EngineParams, run_tiles
    from histoscope.models import create_backbone
    from histoscope.slide import open_slide

    bb = create_backbone("test_cnn", tile_size=224, mpp=MPP)
    slide = open_slide(make_slide(size))
    with torch.inference_mode():
        bb.module(torch.zeros(batch, 3, 224, 224))
    before = psutil.Process().memory_info().rss / 2**20
    t0 = time.perf_counter()
    grid = _grid(slide, bb.input_spec)
    out = run_tiles(bb.module, slide, grid, bb.input_spec, EngineParams(batch, workers, 4))
    dt = time.perf_counter() - t0
    assert out.done.all()
    peak = _peak_rss_mib()
    return {
        "size": size,
        "tiles": len(grid),
        "seconds": dt,
        "rss_before_mib": before,
        "peak_rss_mib": peak,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="hs_cnn_small")
    ap.add_argument("--size", type=int, default=10_000, help="throughput slide edge (px)")
    ap.add_argument("--tiles", type=int, default=512, help="tissue tiles in the throughput run")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--prefetch", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=64, help="tiles per timed pair")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rss-sizes", type=int, nargs="*", default=[10_000, 40_000])
    ap.add_argument("--no-rss", action="store_true")
    ap.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        print(json.dumps(rss_child(args.rss_child, args.workers, args.batch)))
        return

    import torch

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, cuda {torch.cuda.is_available()}"
    )
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    res = throughput(args)
    print(json.dumps(res, indent=1))
    print(
        f"\nend to end {res['end_to_end_tiles_per_s']:.1f} tiles/s, forward only "
        f"{res['forward_only_tiles_per_s']:.1f} tiles/s; ratio median {res['ratio_median']:.2f}"
        f" (min {res['ratio_min']:.2f}, max {res['ratio_max']:.2f}); other processes used "
        f"{res['other_processes_cpu_share']:.0%} of the CPU meanwhile"
    )
    if args.no_rss:
        return
    rss = []
    for size in args.rss_sizes:
        make_slide(size)
        cmd = [
            sys.executable,
            __file__,
            "--rss-child",
            str(size),
            "--workers",
            str(args.workers),
            "--batch",
            str(args.batch),
        ]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rss.append(json.loads(line.strip().splitlines()[-1]))
        print(json.dumps(rss[-1]))
    if len(rss) >= 2:
        print(
            f"peak RSS {rss[-1]['size']} / {rss[0]['size']}: "
            f"{rss[-1]['peak_rss_mib'] / rss[0]['peak_rss_mib']:.2f}x"
        )


if __name__ == "__main__":
    main()
