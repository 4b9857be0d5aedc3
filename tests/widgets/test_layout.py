"""Every HistoScope dock at once on a laptop screen (1366 x 768): tabs, vertical scrolling only.

The docks are opened the way napari's Plugins menu opens them (no ``tabify``),
over a slide with a long name, and each tab is raised in turn: no panel may
need a horizontal scrollbar, clip a label, or reach past its dock's viewport.
"""

from __future__ import annotations

import numpy as np
from qtpy.QtWidgets import QAbstractScrollArea, QLabel, QWidget

from histoscope._widgets._common import Panel, PathEdit, PathLabel
from histoscope._widgets.demo import widget_names

LAPTOP = (1366, 768)
LONG_NAME = "2024-03-18 breast core biopsy HER2 block A3 level 2 (rescanned at 40x).svs"


def _open_all(viewer, qtbot) -> dict:
    """Every HistoScope dock, opened over an RGB slide with a long name in a 1366 x 768 window."""
    viewer.window._qt_window.resize(*LAPTOP)
    rgb = np.zeros((64, 64, 3), np.uint8)
    viewer.add_image(rgb, rgb=True, name=LONG_NAME, scale=(0.5, 0.5), units=("um", "um"))
    docks = {}
    for name in widget_names():
        docks[name] = viewer.window.add_plugin_dock_widget("napari-histoscope", name)
        qtbot.wait(10)
    qtbot.wait(100)
    return docks


def _problems(panel: QWidget) -> list[str]:
    """What does not fit in ``panel`` as laid out now (empty: everything fits)."""
    found = []
    for area in panel.findChildren(QAbstractScrollArea):
        if area.isVisible() and area.horizontalScrollBar().isVisible():
            found.append(f"horizontal scrollbar on {type(area).__name__}")
    for label in panel.findChildren(QLabel):
        if not label.isVisible() or label.wordWrap() or isinstance(label, PathLabel):
            continue  # a path label elides on purpose (its tooltip holds the whole path)
        if label.sizeHint().width() > label.width():
            found.append(f"label {label.text()!r} clipped: needs {label.sizeHint().width()} px, "
                         f"has {label.width()}")  # fmt: skip
    viewport = panel.scroll.viewport() if isinstance(panel, Panel) else panel
    for child in panel.findChildren(QWidget):
        if child.isVisible() and viewport.isAncestorOf(child):
            right = child.mapTo(viewport, child.rect().topRight()).x()
            if right >= viewport.width():
                found.append(f"{type(child).__name__} reaches x={right} past the viewport "
                             f"({viewport.width()} px)")  # fmt: skip
    return found


def test_all_docks_fit_a_laptop_screen_as_tabs(make_napari_viewer, qtbot):
    viewer = make_napari_viewer(show=True)
    window = viewer.window._qt_window
    docks = _open_all(viewer, qtbot)
    assert len(docks) >= 8
    for name, (dock, panel) in docks.items():
        dock.raise_()
        qtbot.wait(30)
        assert isinstance(panel, Panel), name  # the shared scrolling mechanism
        assert dock.isVisible() and dock.width() > 0, name
        assert dock.width() <= 0.4 * LAPTOP[0], name  # the slide keeps most of the screen
        assert _problems(panel) == [], name
        others = window.tabifiedDockWidgets(dock)  # one tab group, however they were opened
        assert len(others) == len(docks) - 1, name
    assert (window.width(), window.height()) == LAPTOP  # no dock forced the window to grow


def test_final_call_boxes_line_up(make_napari_viewer, qtbot):
    docks = _open_all(make_napari_viewer(show=True), qtbot)
    dock, panel = docks["IHC co-assessment (iSight)"]
    dock.raise_()
    qtbot.wait(30)
    lefts = {row.call_box.mapTo(panel.body, row.call_box.rect().topLeft()).x()
             for row in panel.rows.values()}  # fmt: skip
    assert len(lefts) == 1
    clinical = panel.metadata  # its hint is a greyed placeholder, never text sent to the model
    assert clinical.text() == "" and clinical.placeholderText().startswith("e.g. ")


def test_long_paths_elide_in_the_middle_with_the_whole_path_as_tooltip(qtbot):
    path = "/data/scans/2024/project-alpha/cohort-b/" + LONG_NAME
    label = PathLabel(path)
    qtbot.addWidget(label)
    label.resize(200, 20)
    label.show()
    qtbot.wait(10)
    shown = label.text()
    assert "…" in shown and shown.startswith("/data") and shown.endswith("40x).svs")
    assert label.toolTip() == path == label.path()
    assert label.fontMetrics().horizontalAdvance(shown) <= label.contentsRect().width()

    edit = PathEdit(path)
    qtbot.addWidget(edit)
    edit.resize(200, 28)
    edit.show()
    qtbot.wait(10)
    assert edit.text() == path and edit.toolTip() == path  # the value is never cut
    drawn = edit.shown_text()
    assert "…" in drawn and drawn.startswith("/data") and drawn.endswith(".svs")
    edit.hasFocus = lambda: True  # being edited (Xvfb gives a bare widget no focus)
    assert edit.shown_text() == path  # editing shows the whole path


def test_layer_data_is_built_in_the_worker_thread():
    import threading

    from histoscope._widgets._worker import Job, task_work

    made_in = []

    class Result:
        cancelled = False

        def to_layers(self):
            made_in.append(threading.current_thread())
            return [(np.zeros((2, 2)), {"name": "map"}, "image")]

    def fake_run(name, target, checkpoint, **_):
        yield from ()
        return Result()

    import histoscope.tasks as tasks

    original, tasks.iter_run = tasks.iter_run, fake_run
    try:
        out = {}

        def work():
            gen = task_work([Job("tumour", None, layers=True), Job("tissue", None)],
                            threading.Event())  # fmt: skip
            try:
                while True:
                    next(gen)
            except StopIteration as stop:
                out["outcome"] = stop.value

        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
    finally:
        tasks.iter_run = original
    outcome = out["outcome"]
    assert made_in == [thread]  # only the job that asked, and not on this thread
    assert outcome.layers("tumour")[0][1]["name"] == "map" and made_in == [thread]
    assert outcome.layers("tissue")[0][1]["name"] == "map"  # built on demand when not asked
    assert made_in[-1] is threading.current_thread()
