"""QuPath GeoJSON benchmark: ``hs.write_geojson`` / ``hs.read_geojson`` against stdlib ``json``.

Run from the repository root::

    .venv/bin/python benchmarks/bench_geojson.py               # 100,000 cells
    .venv/bin/python benchmarks/bench_geojson.py --n 1000000   # the goal's size

Each side reports wall time and the CPU time of its process (``time.process_time``:
on a machine shared with other work, the wall time grows with the load, the CPU
time does not). Each cell has a cell and a nucleus polygon of ``--vertices`` vertices (closed,
coordinates rounded to 0.01 px as detection outlines usually are), a class
and 5 measurements. Every side runs in its own subprocess that first builds
the same table (same seed); its time excludes building the table, its peak
memory (``VmHWM``) includes it:

* write, ours: ``hs.write_geojson`` (streamed, one feature per line);
* write, baseline: the FeatureCollection built as Python dicts
  (``shapely.geometry.mapping``) and ``json.dump``-ed, as peers do;
* read, ours: ``hs.read_geojson`` into the table (shapely geometries);
* read, baseline: ``json.load`` alone (no geometries built: a lower bound);
* read-centroid: ``hs.read_geojson(geometry="centroid")``, the streaming
  centroid scan (no polygon built);
* points: what the napari reader does: the centroid scan plus the Points
  layer data made from it (centroids in (y, x), features, face colours).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "_data" / "geojson"
CLASSES = ["Tumor", "Stroma", "Immune cells", "Necrosis"]
SIDES = ("write-ours", "write-json", "read-ours", "read-json", "read-centroid", "points")
MEASUREMENTS = ("Area", "Perimeter", "Circularity", "DAB mean", "Hematoxylin mean")


def make_table(n: int, vertices: int, seed: int = 0):
    """``n`` cells: cell and nucleus polygons, a class, a colour and 5 measurements."""
    import pandas as pd
    import shapely

    rng = np.random.default_rng(seed)
    centre = rng.uniform(0, 100_000, (n, 1, 2))
    t = np.linspace(0, 2 * np.pi, vertices, endpoint=False)
    unit = np.stack([np.cos(t), np.sin(t)], axis=-1)

    def rings(r0: float, r1: float) -> np.ndarray:
        ring = np.round(centre + unit * rng.uniform(r0, r1, (n, 1, 1)), 2)
        return np.concatenate([ring, ring[:, :1]], axis=1)

    cls = rng.choice(CLASSES, n)
    colors = {"Tumor": (200, 0, 0), "Stroma": (150, 200, 150), "Immune cells": (160, 90, 160),
              "Necrosis": (50, 50, 50)}  # fmt: skip
    table = pd.DataFrame({"object_type": "cell", "classification": cls,
                          "color": [colors[c] for c in cls],
                          "geometry": shapely.polygons(rings(6, 9)),
                          "nucleus": shapely.polygons(rings(3, 4))})  # fmt: skip
    for j, name in enumerate(MEASUREMENTS):
        table[name] = rng.normal(10 * (j + 1), 2, n)
    return table


def baseline_write(table, path: Path) -> None:
    import uuid

    from shapely.geometry import mapping

    names = list(MEASUREMENTS)
    rows = zip(table["geometry"], table["nucleus"], table["classification"], table["color"],
               table[names].to_numpy().tolist(), strict=True)  # fmt: skip
    features = [
        {"type": "Feature", "id": str(uuid.uuid4()), "geometry": mapping(g),
         "nucleusGeometry": mapping(nuc),
         "properties": {"objectType": "cell", "classification": {"name": c, "color": list(rgb)},
                        "measurements": dict(zip(names, m, strict=True))}}
        for g, nuc, c, rgb, m in rows
    ]  # fmt: skip
    with open(path, "w") as fh:
        json.dump({"type": "FeatureCollection", "features": features}, fh)


def points_data(path: Path):
    import histoscope as hs
    from histoscope._reader import geojson_layers

    layers, _ = geojson_layers(hs.read_geojson(path, geometry="centroid"), "cells", 0.5)
    return layers


def vm_hwm_mib(key: str = "VmHWM") -> float:
    with open("/proc/self/status") as fh:
        line = next(ln for ln in fh if ln.startswith(f"{key}:"))
    return int(line.split()[1]) / 1024


def reset_peak() -> None:
    """Start ``VmHWM`` again from the current RSS (Linux >= 4.0), so a write's own peak shows."""
    import gc

    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def child(side: str, n: int, vertices: int) -> dict:
    """Run one side in this process; return its time and peak memory."""
    import histoscope as hs

    ours, base = DATA / f"ours_{n}.geojson", DATA / f"json_{n}.geojson"
    table = make_table(n, vertices) if side.startswith("write") else None
    build_peak, table_rss = vm_hwm_mib(), vm_hwm_mib("VmRSS")
    reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    if side == "write-ours":
        hs.write_geojson(ours, table)
    elif side == "write-json":
        baseline_write(table, base)
    elif side == "read-ours":
        assert len(hs.read_geojson(ours)) == n
    elif side == "read-centroid":
        assert len(hs.read_geojson(ours, geometry="centroid")) == n
    elif side == "read-json":
        with open(base) as fh:
            assert len(json.load(fh)["features"]) == n
    elif side == "points":
        [(data, kwargs, kind)] = points_data(ours)
        assert kind == "points" and data.shape == (n, 2) and len(kwargs["features"]) == n
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = vm_hwm_mib()
    return {"side": side, "seconds": seconds, "cpu_s": cpu, "peak_mib": max(peak, build_peak),
            "own_peak_mib": peak, "start_rss_mib": table_rss}  # fmt: skip


def run_side(side: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", side, "--n", str(args.n), "--vertices", str(args.vertices)]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {side:<13} {result['seconds']:8.2f} s ({result['cpu_s']:7.2f} CPU s)   process peak {result['peak_mib']:6.0f} MiB, "
          f"RSS at start {result['start_rss_mib']:6.0f} MiB, peak while timed "
          f"{result['own_peak_mib']:6.0f} MiB", flush=True)  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="cells (default 100,000)")
    parser.add_argument("--vertices", type=int, default=16, help="vertices per polygon")
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.n, args.vertices)))
        return
    DATA.mkdir(parents=True, exist_ok=True)
    print(f"{args.n:,} cells, {args.vertices}-vertex cell + nucleus polygons; "
          f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")  # fmt: skip
    res = {s: run_side(s, args) for s in args.sides}
    if set(args.sides) != set(SIDES):
        return
    sizes = {k: (DATA / f"{k}_{args.n}.geojson").stat().st_size / 2**20 for k in ("ours", "json")}
    print(f"file size: ours {sizes['ours']:.0f} MiB, baseline {sizes['json']:.0f} MiB")
    w = res["write-json"]["seconds"] / res["write-ours"]["seconds"]
    r = res["read-json"]["seconds"] / res["read-ours"]["seconds"]
    print(f"write: {w:.2f}x faster than json.dump (goal >= 3)")
    print(f"read:  {r:.2f}x the speed of json.load alone (ours also builds the geometries)")
    peak = max(res[s]["peak_mib"] for s in ("write-ours", "read-centroid", "points"))
    print(f"peak memory, ours (write, centroid read, points): {peak / 1024:.2f} GiB (goal <= 1.5)")
    print(f"read into Points layer data: {res['points']['seconds']:.1f} s (goal <= 30)")
    for k in ("ours", "json"):
        (DATA / f"{k}_{args.n}.geojson").unlink()


if __name__ == "__main__":
    main()
