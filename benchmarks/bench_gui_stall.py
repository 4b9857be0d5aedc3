"""How long the GUI thread stalls during a tumour-map and a MIL run in napari.

A synthetic H&E slide is opened in a shown viewer (run under Xvfb), the
Tumour map and Attention MIL panels run on their embedded defaults, and a
5 ms timer on the GUI thread records every tick: the longest gap between
ticks is the longest the window could not repaint or react. The slide's
session folder is removed first, so every product is computed afresh. The
time spent on the GUI thread in the steps that can stall it is recorded too
(each call's thread is named: ``gui`` or ``worker``).

    xvfb-run -a -s "-screen 0 1920x1200x24" env QT_QPA_PLATFORM=xcb OMP_NUM_THREADS=1 \\
        .venv/bin/python benchmarks/bench_gui_stall.py --out /tmp/stall
"""

from __future__ import annotations

import argparse
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np

PANELS = {"tumour": "Tumour map", "mil": "Attention MIL (CLAM)"}


def _timed(owner, name: str, key: str, log: dict) -> None:
    """Wrap ``owner.name`` to append each call's seconds to ``log['key [thread]']``."""
    func = getattr(owner, name)

    def wrap(*args, **kwargs):
        t = time.perf_counter()
        out = func(*args, **kwargs)
        where = "gui" if threading.current_thread() is threading.main_thread() else "worker"
        log.setdefault(f"{key} [{where}]", []).append(round(time.perf_counter() - t, 3))
        return out

    setattr(owner, name, wrap)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("out/bench_gui_stall"))
    ap.add_argument("--size", type=int, nargs=2, default=(8192, 8192), metavar=("H", "W"))
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args()

    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    import histoscope._widgets._session as session_mod
    from histoscope._widgets import _common
    from histoscope._widgets.mil import MILWidget
    from histoscope._widgets.tumour import TumourWidget
    from histoscope.synthetic import generate
    from histoscope.tasks.mil import MILResult

    folder = args.out / f"he_{args.seed:05d}_{args.size[0]}x{args.size[1]}"
    slide = folder / "he.tif"
    if not slide.exists():
        generate(folder, kind="he", size=tuple(args.size), seed=args.seed, name="he")
    shutil.rmtree(f"{slide}.histoscope", ignore_errors=True)  # compute every product afresh

    log: dict[str, list] = {}
    _timed(session_mod.AutoSave, "save_now", "session save_now", log)
    _timed(session_mod, "viewer_snapshot", "session snapshot", log)
    _timed(_common.TaskWidget, "replace_layer", "add layer", log)
    _timed(MILResult, "to_layers", "MIL layer data", log)
    _timed(TumourWidget, "_finished_heatmap", "tumour end of run", log)
    if hasattr(TumourWidget, "_fill"):  # the first tiles put into the layer made at the start
        _timed(TumourWidget, "_fill", "tumour first tiles into the layer", log)
    _timed(MILWidget, "_show", "MIL end of run", log)

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1366, 768)
    viewer.open(str(slide), plugin="napari-histoscope")
    ticks: list[float] = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(5)
    report: dict = {}
    for key, name in PANELS.items():
        _, panel = viewer.window.add_plugin_dock_widget("napari-histoscope", name)
        for _ in range(20):
            QApplication.processEvents()
            time.sleep(0.01)
        ticks.clear()
        t0 = time.perf_counter()
        panel.run()
        while panel.worker is not None:
            QApplication.processEvents()
            time.sleep(0.002)
        t1 = time.perf_counter()
        gaps = np.diff([t0, *ticks, t1])
        report[key] = {"run_s": round(t1 - t0, 2), "longest_gui_gap_s": round(float(gaps.max()), 3),
                       "gaps_over_0.3_s": [round(float(g), 2) for g in gaps[gaps > 0.3]],
                       "status": panel.status.text()[:90]}  # fmt: skip
    report["calls"] = log
    print(json.dumps(report, indent=1))
    viewer.close()


if __name__ == "__main__":
    main()
