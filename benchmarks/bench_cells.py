"""Cells end to end (nuclei found and typed by the embedded NuClass default) on whole slides.

Run from the repository root::

    .venv/bin/python benchmarks/bench_cells.py --sizes 8000 20000      # 50000 for ~1M cells
    .venv/bin/python benchmarks/bench_cells.py --sizes 8000 --compare-prefetch

Each size is a synthetic H&E slide at 0.5 µm/px (``histoscope.synthetic.generate``, cached
under ``/tmp/histoscope_bench_cells``), analysed in a fresh process (so its peak RSS is its own)
with ``hs.tasks.run("cells", slide)``: tissue mask, the classical detector tile by tile, NuClass
typing on the fast path, exactly as ``histoscope analyze --tasks cells`` runs it. Reported:
tiles, cells, seconds (without the slide generation), cells/s, the process's CPU seconds (user
+ system, all threads: steadier than the wall time on a machine shared with other work), peak
RSS, and the bytes of the returned table (centroids, outlines, measurements, probabilities),
which grows with the cell count by design. ``--compare-prefetch`` runs the same slide with the next tile's detection in a
second thread (the default) and inline, in one process, alternating.
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

CACHE = Path("/tmp/histoscope_bench_cells")


def slide_for(size: int, seed: int = 7) -> Path:
    from histoscope.synthetic import generate

    folder = CACHE / f"he_{size}_{seed}"
    found = sorted(folder.rglob("he_*.tif")) if folder.exists() else []
    if found:
        return found[0]
    return generate(folder, kind="he", size=(size, size), seed=seed).slide


def _table_bytes(res) -> int:
    n = res.nuclei
    total = n.x.nbytes + n.y.nbytes + sum(o.nbytes for o in n.outlines)
    total += int(n.measurements.memory_usage(deep=True).sum())
    t = res.types
    if t is not None:
        total += t.prob.nbytes + t.p_local.nbytes + t.p_global.nbytes + t.g.nbytes
    return total


def one(size: int) -> dict:
    """Analyse one slide in this process; the numbers as a dict."""
    import histoscope as hs

    path = slide_for(size)
    t, cpu = time.perf_counter(), time.process_time()
    res = hs.tasks.run("cells", path)
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    grid = res.provenance.tile_grid
    return {"size": size, "tiles": grid["tiles"], "cells": res.n_cells, "seconds": seconds,
            "cells_per_s": res.n_cells / seconds, "cpu_s": cpu,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "table_mib": _table_bytes(res) / 2**20,
            "tissue_mm2": res.summary()["tissue_mm2"]}  # fmt: skip


def compare_prefetch(size: int, rounds: int = 2) -> None:
    import histoscope as hs
    import histoscope.tasks.cells as cells

    path = slide_for(size)
    session = hs.open_session(path, in_memory=True)
    hs.tasks.run("cells", session, region=(0, 0, 1024, 1024))  # warm-up: model, tissue
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(rounds):
        for pre in (True, False):
            cells.PREFETCH = pre
            t = time.perf_counter()
            n = hs.tasks.run("cells", session).n_cells
            times[pre].append(time.perf_counter() - t)
    on, off = min(times[True]), min(times[False])
    print(f"{size} px slide, {n:,} cells: prefetch {on:.1f} s, inline {off:.1f} s, "
          f"speed-up {off / on:.2f}x (best of {rounds})")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[8000, 20000])
    ap.add_argument("--compare-prefetch", action="store_true")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one)))
        return
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    if args.compare_prefetch:
        for size in args.sizes:
            compare_prefetch(size)
        return
    print("| slide | tiles | tissue mm² | cells | seconds | cells/s | CPU s | peak RSS | cell table "
          "|\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |")  # fmt: skip
    for size in args.sizes:
        slide_for(size)  # generated outside the timed child
        out = subprocess.run([sys.executable, __file__, "--one", str(size)], check=True,
                             capture_output=True, text=True).stdout  # fmt: skip
        r = json.loads(out.strip().splitlines()[-1])
        print(f"| {size:,} px | {r['tiles']} | {r['tissue_mm2']:.1f} | {r['cells']:,} | "
              f"{r['seconds']:.0f} | {r['cells_per_s']:.0f} | {r['cpu_s']:.0f} | "
              f"{r['peak_rss_mib']:.0f} MiB | "
              f"{r['table_mib']:.0f} MiB |")  # fmt: skip


if __name__ == "__main__":
    main()
