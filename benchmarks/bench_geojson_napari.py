"""QuPath GeoJSON opened in napari: time to first paint, 100,000 polygons vs 10,000.

Run from the repository root (needs a display; headless: under Xvfb)::

    xvfb-run -a -s "-screen 0 1920x1200x24" env QT_QPA_PLATFORM=xcb \\
        .venv/bin/python benchmarks/bench_geojson_napari.py

Each file holds square annotation polygons (16 vertices each) in level-0
pixels, written by ``hs.write_geojson``. Timed in one process: opening the file
with the HistoScope reader (``viewer.open``) until the canvas has drawn it once
(``viewer.screenshot`` forces a paint). Beyond the reader's limit
(``histoscope._reader.MAX_SHAPES``) polygons load as centroid points, so the
large file is drawn as points with a notification. For that file the
outlines then come back on request: the view is zoomed to a 2,000 x 2,000 px
region and "Show outlines in view" (``histoscope._widgets.outlines.show_outlines_in_view``)
is timed until the outlines it reads in its worker are painted.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path


def _file(folder: Path, n: int) -> Path:
    import numpy as np
    import pandas as pd
    import shapely

    import histoscope as hs

    rng = np.random.default_rng(n)
    xy = rng.uniform(0, 40_000, (n, 2))
    polys = shapely.buffer(shapely.points(xy), 12, quad_segs=4)
    table = pd.DataFrame({"geometry": polys, "object_type": "annotation",
                          "classification": rng.choice(["Tumor", "Stroma"], n)})  # fmt: skip
    return hs.write_geojson(folder / f"polygons_{n}.geojson", table)


def _outlines_on_request(viewer, layer) -> tuple[float, str]:
    """Seconds from "Show outlines in view" over a 2,000 px view until its outlines are painted."""
    from qtpy.QtWidgets import QApplication

    from histoscope._widgets.outlines import show_outlines_in_view

    camera = viewer.scene.camera
    camera.center = (20_000.0 * layer.scale[0], 20_000.0 * layer.scale[1])
    camera.zoom = max(viewer.canvas.size) / (2_000.0 * layer.scale[0])
    viewer.screenshot(canvas_only=True)
    t = time.perf_counter()
    worker = show_outlines_in_view(viewer)
    name = f"{layer.name} outlines"
    while worker.is_running or name not in viewer.layers:
        QApplication.processEvents()
        time.sleep(0.005)
    viewer.screenshot(canvas_only=True)
    return time.perf_counter() - t, f"{len(viewer.layers[name].data):,} outlines"


def _first_paint(path: Path, outlines: bool = False) -> tuple[float, str, tuple | None]:
    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=True)
    QApplication.processEvents()
    t = time.perf_counter()
    layers = viewer.open(str(path), plugin="napari-histoscope")
    viewer.reset_view()
    viewer.screenshot(canvas_only=True)  # one full paint
    seconds = time.perf_counter() - t
    kind = f"{layers[0]._type_string} ({len(layers[0].data):,})"
    extra = _outlines_on_request(viewer, layers[0]) if outlines else None
    viewer.close()
    return seconds, kind, extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--small", type=int, default=10_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        big, small = _file(Path(tmp), args.n), _file(Path(tmp), args.small)
        _first_paint(small)  # warm-up: imports, GL context
        t_small, k_small, _ = _first_paint(small)
        t_big, k_big, request = _first_paint(big, outlines=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"{args.small:>8,} polygons: {t_small:6.2f} s to first paint, drawn as {k_small}")
    print(f"{args.n:>8,} polygons: {t_big:6.2f} s to first paint, drawn as {k_big}")
    print(f"ratio: {t_big / t_small:.2f}x for {args.n / args.small:.0f}x the objects")
    if request is not None:
        print(f"show outlines in view (2,000 px region of the {args.n:,}): {request[0]:.2f} s, "
              f"{request[1]}")  # fmt: skip


if __name__ == "__main__":
    main()
