"""The GUI thread while a sample slide is generated: the Slide panel's worker vs File > Open Sample.

Both sample slides are generated from an empty cache (4096 x 4096 px), the IHC one
by the Slide panel's *Open sample slide* (a napari worker) and the H&E one by napari's
File > Open Sample (which napari calls on the GUI thread; in a window HistoScope makes
the slide in a thread and keeps the event loop running until it is done); a 5 ms timer
on the GUI thread records its ticks: the longest gap is the longest the window could
not react, and the gaps over 0.1 s add up to the time it was (nearly) frozen.

    xvfb-run -a -s "-screen 0 1920x1200x24" env QT_QPA_PLATFORM=xcb OMP_NUM_THREADS=1 \\
        .venv/bin/python benchmarks/bench_sample_gui.py
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import numpy as np


def _gap(t0: float, ticks: list[float], t1: float) -> dict:
    """Wall time, the longest gap between ticks, and the time spent in gaps over 0.1 s."""
    gaps = np.diff([t0, *ticks, t1])
    return {"s": round(t1 - t0, 1), "longest_gui_gap_s": round(float(gaps.max()), 3),
            "blocked_s": round(float(gaps[gaps > 0.1].sum()), 1)}  # fmt: skip


def main() -> None:
    cache = tempfile.mkdtemp()
    os.environ["HISTOSCOPE_CACHE"] = cache
    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from histoscope._widgets.slide import SlideWidget

    viewer = napari.Viewer(show=True)
    ticks: list[float] = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(5)
    out = {}
    panel = SlideWidget(viewer)
    for _ in range(10):
        QApplication.processEvents()
    ticks.clear()
    t0 = time.perf_counter()
    panel.open_sample("ihc")
    while panel._worker is not None:
        QApplication.processEvents()
        time.sleep(0.002)
    out["Slide panel, Open sample slide (worker)"] = _gap(t0, ticks, time.perf_counter())
    ticks.clear()
    t0 = time.perf_counter()
    QTimer.singleShot(0, lambda: viewer.open_sample("napari-histoscope", "synthetic-he"))
    while "synthetic H&E" not in viewer.layers:
        QApplication.processEvents()
        time.sleep(0.002)
    out["File > Open Sample (called on the GUI thread)"] = _gap(t0, ticks, time.perf_counter())
    print(json.dumps(out, indent=1))
    viewer.close()
    shutil.rmtree(cache)


if __name__ == "__main__":
    main()
