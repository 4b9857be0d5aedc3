"""``analyze --tasks tissue,tumour,mil``: one shared session vs each task on its own.

Run from the repository root::

    .venv/bin/python benchmarks/bench_analyze.py               # 8192 x 8192 slide
    .venv/bin/python benchmarks/bench_analyze.py --size 4096

The slide is drawn once by ``histoscope.synthetic.generate`` (H&E, 0.5 µm/px)
and cached under ``benchmarks/_data/``. "separate" runs each task in its own
session, as every consumer did before the registry (each finds the tissue,
lays its grid and, for MIL, encodes the tiles again); "shared" is what
``histoscope analyze`` does now: one session whose tissue mask, tile grid and
checkpoints are computed once. Both write the same files; each variant runs
``--repeat`` times alternately in this one process and the best time is kept,
with the ratio separate / shared and how often the tissue mask was computed.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).parent / "_data"
TASKS = ("tissue", "tumour", "mil")


def _slide(size: int) -> Path:
    from histoscope.synthetic import generate

    out = DATA / f"analyze_{size}"
    path = out / "he_00012.tif"
    if not path.exists():
        t = time.perf_counter()
        generate(out, kind="he", size=(size, size), seed=12)
        print(f"generated {path} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return path


def separate(path: Path, out: Path) -> int:
    """Each task in its own in-memory session; returns how many tissue masks were made."""
    import histoscope as hs

    masks = 0
    for name in TASKS:
        with hs.open_session(path, in_memory=True) as session:
            hs.tasks.run(name, session).save(out)
            masks += session.computed["tissue"]
    return masks


def shared(path: Path, out: Path) -> int:
    """``analyze_slide``: one session for all tasks."""
    from histoscope.analyze import analyze_slide

    return analyze_slide(path, out, TASKS)["computed"]["tissue"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    path = _slide(args.size)
    best = {"separate": float("inf"), "shared": float("inf")}
    masks = {}
    for _ in range(args.repeat):
        for name, fn in (("separate", separate), ("shared", shared)):
            with tempfile.TemporaryDirectory() as tmp:
                t = time.perf_counter()
                masks[name] = fn(path, Path(tmp))
                best[name] = min(best[name], time.perf_counter() - t)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"command: .venv/bin/python benchmarks/bench_analyze.py --size {args.size} "
          f"--repeat {args.repeat}")  # fmt: skip
    for name in best:
        print(f"{name:>9}: {best[name]:.2f} s (best of {args.repeat}), "
              f"tissue masks computed: {masks[name]}")  # fmt: skip
    print(f"    ratio: separate / shared = {best['separate'] / best['shared']:.2f}x")


if __name__ == "__main__":
    main()
