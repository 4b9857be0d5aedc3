"""2 µm expression benchmark: mm² of tissue per minute, peak memory small vs large, stack size.

Run from the repository root::

    .venv/bin/python benchmarks/bench_expression.py                      # 2048 and 6144 px slides
    .venv/bin/python benchmarks/bench_expression.py --tiles 1 3 5        # 2048, 6144, 10240 px

A synthetic H&E slide of 2048 x 2048 px at 1 µm/px (seed 14001, the expression
recipe's kind of slide) is drawn once and cached under ``benchmarks/_data/``;
larger slides repeat it ``k x k`` times in a JPEG-tiled pyramid (the
tissue, and so the work per mm², stays the same). Each slide runs in a
fresh process as the napari widget runs it: open the slide and a session
folder, tissue mask, then the whole slide (view first from the centre)
with the embedded default checkpoint, every gene of its panel written into
the OME-Zarr stack. Reported per slide: tissue patches and mm² predicted,
seconds, mm² per minute, CPU seconds, peak RSS (VmHWM), the stack's size on
disk and per mm² of tissue, and the extrapolated size of a 50,000 x 50,000 px
slide at 0.5 µm/px with the same tissue fraction.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).parent / "_data" / "expression"
BASE = 2048


def _base() -> Path:
    from histoscope.synthetic import generate

    path = DATA / "base" / "he_14001.tif"
    if not path.exists():
        generate(DATA / "base", "he", (BASE, BASE), seed=14001, mpp=1.0)
    return path


def _tiled(k: int) -> Path:
    """The base slide repeated ``k x k`` times (JPEG-tiled pyramid, 1 µm/px)."""
    if k == 1:
        return _base()
    import numpy as np

    from histoscope.slide import open_slide
    from histoscope.slide.writer import write_pyramidal_tiff

    path = DATA / f"tiled_{k}" / "slide.tif"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    src = open_slide(_base())
    base = np.asarray(src.read_region(0, 0, BASE, BASE))

    def render(y: int, x: int, h: int, w: int) -> np.ndarray:
        yy = (np.arange(y, y + h) % BASE)[:, None]
        xx = (np.arange(x, x + w) % BASE)[None, :]
        return base[yy, xx]

    write_pyramidal_tiff(path, render, mpp=1.0, shape=(BASE * k, BASE * k))
    return path


def _peak_rss_mib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024)
    return -1


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _run(path: str, folder: str) -> dict:
    import histoscope as hs

    t0 = time.perf_counter()
    c0 = time.process_time()
    session = hs.open_session(path, folder)
    h, w = session.slide.shape
    near = (w / 2, h / 2)
    res = hs.tasks.run("expression", session, near=near)
    secs = time.perf_counter() - t0
    s = res.summary()
    size = _du(res.stack)
    mm2 = s["predicted_mm2"]
    return {"slide_px": [int(h), int(w)], "slide_mm2": round(h * w * session.slide.mpp**2 / 1e6, 2),
            "genes": s["genes"], "patches": s["patches"]["done"], "tissue_mm2": mm2,
            "seconds": round(secs, 1), "cpu_seconds": round(time.process_time() - c0, 1),
            "mm2_per_min": round(mm2 / secs * 60, 3), "peak_rss_mib": _peak_rss_mib(),
            "stack_mib": round(size / 2**20, 2),
            "stack_mib_per_mm2": round(size / 2**20 / max(mm2, 1e-9), 3)}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, nargs="+", default=[1, 3],
                    help="k: slides of k x k copies of the 2048 px base")  # fmt: skip
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_run(*args.child)))
        return 0
    rows = []
    for k in args.tiles:
        path = _tiled(k)
        folder = DATA / f"session_{k}"
        shutil.rmtree(folder, ignore_errors=True)
        out = subprocess.run([sys.executable, __file__, "--child", str(path), str(folder)],
                             check=True, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": os.environ.get(
                                 "OMP_NUM_THREADS", "1")})  # fmt: skip
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), flush=True)
    frac = rows[-1]["tissue_mm2"] / rows[-1]["slide_mm2"]
    big_mm2 = (50_000 * 0.5 / 1000) ** 2 * frac
    print(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch_threads": os.environ.get("OMP_NUM_THREADS", "1"),
        "extrapolated_50k_slide": {"tissue_mm2": round(big_mm2, 1),
                                   "stack_gib": round(big_mm2 * rows[-1]["stack_mib_per_mm2"]
                                                      / 1024, 2),
                                   "hours": round(big_mm2 / rows[-1]["mm2_per_min"] / 60, 2)},
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
