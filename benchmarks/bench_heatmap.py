"""Tumour heatmap benchmark: time to the first viewport, time to the whole slide, peak memory.

Run from the repository root::

    .venv/bin/python benchmarks/bench_heatmap.py                 # 50,000 x 50,000 slide
    .venv/bin/python benchmarks/bench_heatmap.py --size 20000    # a smaller one

The slide is drawn once by ``histoscope.synthetic.generate`` (H&E, 0.5 µm/px)
and cached under ``benchmarks/_data/``. The heatmap runs in a fresh process,
as the napari widget runs it: open the slide, tissue mask, tile grid, then
the embedded default tumour patch classifier over every tissue tile, tiles
nearest the centre of a 1600 x 1000 px viewport at 4 µm/px first. Reported:
seconds to open + mask + grid, seconds until every tile of the viewport is
scored, seconds to the whole slide, tiles/s, CPU seconds, and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).parent / "_data"


def _slide(size: int) -> Path:
    from histoscope.synthetic import generate

    out = DATA / f"heatmap_{size}"
    path = out / "he_00011.tif"
    if not path.exists():
        t = time.perf_counter()
        generate(out, kind="he", size=(size, size), seed=11)
        print(f"generated {path} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return path


def _peak_rss_mib() -> int:
    """This process's peak RSS (``VmHWM``). Unlike ``ru_maxrss`` it does not count the
    parent's pages a forked child shares before ``exec``."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _run(path: str, view_px: tuple[int, int], view_mpp: float) -> dict:
    import numpy as np

    import histoscope as hs
    from histoscope._data import sample_data_path
    from histoscope.tasks.tumour import iter_heatmap

    cpu0, t0 = time.process_time(), time.perf_counter()
    slide = hs.open_slide(path)
    model, card = hs.load_checkpoint(sample_data_path("tumour_patch_default.safetensors"))
    h0, w0 = slide.shape
    cx, cy = w0 / 2, h0 / 2
    gen = iter_heatmap(slide, model, card, near=(cx, cy))
    step = next(s for s in gen if s.total)  # tissue mask and grid come before the first batch
    heat = step.partial
    t_grid = time.perf_counter() - t0  # includes the first batch
    half_w, half_h = view_px[1] * view_mpp / slide.mpp / 2, view_px[0] * view_mpp / slide.mpp / 2
    grid = heat.grid
    centres = grid.coords + grid.stride / 2
    in_view = (np.abs(centres[:, 0] - cx) <= half_w) & (np.abs(centres[:, 1] - cy) <= half_h)
    rows, cols = grid.index[in_view, 0], grid.index[in_view, 1]
    t_view = None
    while True:
        try:
            next(gen)
        except StopIteration:
            break
        if t_view is None and np.isfinite(heat.values[rows, cols]).all():
            t_view = time.perf_counter() - t0
    t_all = time.perf_counter() - t0
    return {
        "slide_px": [w0, h0],
        "tiles": len(grid),
        "viewport_tiles": int(in_view.sum()),
        "open_mask_grid_s": round(t_grid, 2),
        "first_viewport_s": round(t_view if t_view is not None else t_all, 2),
        "whole_slide_s": round(t_all, 1),
        "tiles_per_s": round(len(grid) / max(t_all - t_grid, 1e-9), 1),
        "cpu_s": round(time.process_time() - cpu0, 1),
        "peak_rss_mib": _peak_rss_mib(),
        "tile": f"{model.input_spec.tile_size} px at {model.input_spec.mpp} µm/px",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=50_000)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_run(args.child, (1000, 1600), 4.0)))
        return
    path = _slide(args.size)
    out = subprocess.run([sys.executable, __file__, "--child", str(path)], capture_output=True,
                         text=True, check=True)  # fmt: skip
    res = json.loads(out.stdout.strip().splitlines()[-1])
    load = os.getloadavg()[0]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {load:.1f}")
    print(f"command: .venv/bin/python benchmarks/bench_heatmap.py --size {args.size}")
    for k, v in res.items():
        print(f"{k:>18}: {v}")


if __name__ == "__main__":
    main()
