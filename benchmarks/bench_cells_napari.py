"""A million typed cells in napari: layer creation, recolouring, filtering, a pan/zoom redraw.

Run from the repository root (needs a display; headless: under Xvfb)::

    xvfb-run -a -s "-screen 0 1920x1200x24" env QT_QPA_PLATFORM=xcb \\
        .venv/bin/python benchmarks/bench_cells_napari.py

A :class:`histoscope.tasks.cells.CellsResult` of ``--n`` cells (random
positions over a 50,000 px slide at 0.5 µm/px, nine classes, random
probabilities, gate and nucleus measurements: the same table the cells task
makes) is shown through the Cells panel's own code, timed in one process
against a ``--small`` one:

- **create**: ``CellsWidget._show`` with the whole slide in view (points layer
  with its features and class colours, legend filled; above the panel's
  ``POINTS_MAX`` cells the overview image instead of the points) until the
  canvas has drawn it once;
- **recolour**: colour by gate weight, then the paint;
- **filter**: untick the most common class, then the paint;
- **redraw**: zoom in by 2x and pan, then the paint;
- **zoom in**: zoom in 8x from the whole slide (about 1/64 of the cells in
  view: points again), then the paint;
- **pan near**: pan by half a view at that zoom, then the paint.

Each step is timed twice: the update (napari and the panel, until Qt's event
queue is empty and the panel's wait for the camera to rest, 0.1 s, has run
out) and then one full paint, forced with
``viewer.screenshot(canvas_only=True)``. Under Xvfb the paint is Mesa's
software OpenGL on the CPU; with a GPU it is a small part of this.
"""

from __future__ import annotations

import argparse
import os
import platform
import time


def _result(n: int, seed: int = 0):
    import numpy as np
    import pandas as pd

    from histoscope.celltypes import CellTypes
    from histoscope.nuclei import COLUMNS, Nuclei
    from histoscope.results import Provenance
    from histoscope.tasks.cells import CellsResult

    rng = np.random.default_rng(seed)
    classes = ("tumour", "epithelial", "lymphocyte", "plasma_cell", "neutrophil", "macrophage",
               "fibroblast", "smooth_muscle", "endothelial")  # fmt: skip
    x, y = rng.uniform(0, 50_000, n), rng.uniform(0, 50_000, n)
    ring = np.stack([np.cos(np.linspace(0, 2 * np.pi, 12, endpoint=False)),
                     np.sin(np.linspace(0, 2 * np.pi, 12, endpoint=False))], 1) * 8  # fmt: skip
    outlines = [(ring + (a, b)).astype(np.float32) for a, b in zip(x[:1000], y[:1000], strict=True)]
    outlines += [outlines[0]] * (n - len(outlines))  # outlines are not drawn by the layer
    meas = pd.DataFrame({c: rng.random(n).astype(np.float32) for c in COLUMNS})
    nuclei = Nuclei(x=x, y=y, outlines=outlines, measurements=meas, mpp=0.5)

    def probs():
        p = rng.random((n, len(classes))).astype(np.float32) ** 4
        return p / p.sum(1, keepdims=True)

    types = CellTypes(classes, probs(), probs(), probs(), rng.random(n).astype(np.float32),
                      np.arange(n))  # fmt: skip
    return CellsResult(provenance=Provenance(task="cells", slide="bench"), nuclei=nuclei,
                       types=types, slide_mpp=0.5, tissue_um2=625e6)  # fmt: skip


def _measure(result) -> dict[str, float]:
    import napari
    import numpy as np
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QApplication

    from histoscope._widgets.cells import CellsWidget

    viewer = napari.Viewer(show=True)
    widget = CellsWidget(viewer)
    QApplication.processEvents()
    times: dict[str, tuple[float, float]] = {}
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera

    def settle() -> None:
        QApplication.processEvents()
        timer = getattr(widget, "_view_timer", None)  # (absent from older panels)
        while timer is not None and timer.isActive():  # the panel follows the resting camera
            time.sleep(0.005)
            QApplication.processEvents()
        QApplication.processEvents()

    def timed(key, action) -> None:
        t0 = time.perf_counter()
        action()
        settle()
        t1 = time.perf_counter()
        viewer.screenshot(canvas_only=True)  # one full paint
        times[key] = (t1 - t0, time.perf_counter() - t1)

    side = 50_000 * result.slide_mpp  # the slide's extent (µm)

    def whole_slide(zoom: float = 1.0) -> None:
        camera.center = (side / 2, side / 2)
        camera.zoom = zoom * min(viewer.canvas.size) / side

    def pan_zoom() -> None:
        camera.zoom *= 2
        cy, cx = camera.center[-2:]
        camera.center = (cy + 2000, cx + 2000)

    def pan_near() -> None:
        cy, cx = camera.center[-2:]
        camera.center = (cy, cx + viewer.canvas.size[1] / 2 / camera.zoom)

    whole_slide()
    settle()
    k = int(np.argmax(np.bincount(result.types.pred)))
    timed("create", lambda: widget._show(result))
    timed("recolour", lambda: widget.color_by.setCurrentIndex(1))
    timed("filter", lambda: widget.legend.item(k).setCheckState(Qt.Unchecked))
    timed("redraw", pan_zoom)
    timed("zoom in", lambda: whole_slide(8.0))
    timed("pan near", pan_near)
    drawn = getattr(widget, "drawn", widget.layer)()
    print(f"{result.n_cells:,} cells: {len(drawn.data):,} points in layer {drawn.name!r} at the "
          f"end, overview {'shown' if getattr(widget, '_far', False) else 'not shown'}")  # fmt: skip
    viewer.close()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--small", type=int, default=10_000)
    args = ap.parse_args()
    small, big = _result(args.small), _result(args.n)
    _measure(small)  # warm-up: imports, GL context
    t_small, t_big = _measure(small), _measure(big)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"{'':>10} {args.small:>7,} cells: update + paint   {args.n:>9,} cells: update + paint"
          "   ratio (update)")  # fmt: skip
    for key in t_small:
        (us, ps), (ub, pb) = t_small[key], t_big[key]
        print(f"{key:>10} {us:>10.2f} s + {ps:6.2f} s {ub:>18.2f} s + {pb:6.2f} s "
              f"{ub / max(us, 1e-3):>12.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
