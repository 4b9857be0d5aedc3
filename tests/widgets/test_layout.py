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


def _widest_piece(label: QLabel) -> str:
    """The widest run of a word-wrapped label's text that has no break opportunity in it."""
    import re

    from qtpy.QtCore import Qt
    from qtpy.QtGui import QTextDocument

    text = label.text()
    if label.textFormat() != Qt.TextFormat.PlainText and Qt.mightBeRichText(text):
        doc = QTextDocument()
        doc.setHtml(text)
        text = doc.toPlainText()
    pieces = re.split(r"[\s\u200b]+|(?<=-)(?=[^\d\s])", text)  # after a hyphen: UAX #14
    metrics = label.fontMetrics()
    return max(pieces, key=metrics.horizontalAdvance, default="")


def _problems(panel: QWidget) -> list[str]:
    """What does not fit in ``panel`` as laid out now (empty: everything fits)."""
    found = []
    for area in panel.findChildren(QAbstractScrollArea):
        if area.isVisible() and area.horizontalScrollBar().isVisible():
            found.append(f"horizontal scrollbar on {type(area).__name__}")
    for label in panel.findChildren(QLabel):
        if label.isVisible() and label.wordWrap():  # its longest unbreakable piece must fit
            piece = _widest_piece(label)
            width = label.fontMetrics().horizontalAdvance(piece)
            if width > label.contentsRect().width():
                found.append(f"label piece {piece!r} clipped: needs {width} px, "
                             f"has {label.contentsRect().width()}")  # fmt: skip
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


def _fill_results(docks) -> None:
    """Show results in the MIL and co-assessment panels as a finished run leaves them."""
    from types import SimpleNamespace

    _, mil = docks["Attention MIL (CLAM)"]
    tiles = [{"rank": r, "attention": 0.05 / r, "x": 123456 + r, "y": 98765 + r}
             for r in range(1, 11)]  # fmt: skip
    result = SimpleNamespace(
        classes=["benign", "tumour"], probability=[0.03, 0.97], label="tumour", cancelled=False,
        top_tiles=tiles, attention=SimpleNamespace(grid=SimpleNamespace(slide_mpp=0.25)),
        summary=lambda: {"tiles_encoded": 12345, "n_tiles": 12345},
    )  # fmt: skip
    mil._show(SimpleNamespace(get=lambda name: result, layers=lambda name: []))
    assert mil.top_list.count() == len(tiles)
    _, co = docks["IHC co-assessment (iSight)"]
    for row in co.rows.values():
        if len(row.classes) < 2:
            continue
        row.set_model({c: 1 / len(row.classes) for c in row.classes})
        row.set_measurement(row.classes[-1])  # the model's call is the first: they disagree
        row.call_box.setEnabled(True)
        row.call_box.setCurrentIndex(len(row.classes))
    co.agreement.setText("Agreement with the model: 7 of 9 calls (78 %, 95 % CI 45-94 %)")


def test_panels_with_results_fit_a_laptop_screen(make_napari_viewer, qtbot):
    docks = _open_all(make_napari_viewer(show=True), qtbot)
    _fill_results(docks)
    for name in ("Attention MIL (CLAM)", "IHC co-assessment (iSight)"):
        dock, panel = docks[name]
        dock.raise_()
        qtbot.wait(50)
        assert _problems(panel) == [], name
    rows = [r for r in docks["IHC co-assessment (iSight)"][1].rows.values() if len(r.classes) > 1]
    assert rows and all(row.flag.text() for row in rows)  # the longest lines are shown


def test_long_class_names_wrap_at_slashes_and_plus_signs(qtbot):
    from histoscope._widgets._task_row import _name_label

    label = _name_label("cytoplasmic/membranous+nuclear")
    qtbot.addWidget(label)
    label.show()
    qtbot.wait(10)
    piece = _widest_piece(label)
    assert piece in ("cytoplasmic/", "membranous+", "nuclear")
    assert label.fontMetrics().horizontalAdvance(piece) <= label.contentsRect().width()


def test_details_never_widen_the_dock(make_napari_viewer, qtbot):
    viewer = make_napari_viewer(show=True)
    docks = _open_all(viewer, qtbot)
    dock, panel = docks["Tumour map"]
    dock.raise_()
    qtbot.wait(50)
    before = dock.width()
    long_path = "/data/scans/2024/project-alpha/cohort-b/" * 6 + LONG_NAME
    try:
        raise RuntimeError(f"{long_path}: tile (3, 4) cannot be decoded ({'x' * 600})")
    except RuntimeError as exc:
        panel.controls.error(exc)
    panel.controls.details.toggle.setChecked(True)
    qtbot.wait(50)
    assert dock.width() == before
    assert _problems(panel) == []
    panel.controls.details.toggle.setChecked(False)
    qtbot.wait(50)
    assert dock.width() == before


def test_a_bar_left_busy_stops_when_the_job_ends(make_napari_viewer, qtbot):
    from histoscope._widgets.tumour import TumourWidget

    panel = TumourWidget(make_napari_viewer())
    panel.controls.busy(True, "working")
    panel.controls.set_progress(0, 0, "saving")  # a last step without a count: busy bar
    panel._done()
    bar = panel.progress
    assert (bar.minimum(), bar.maximum(), bar.value()) == (0, 1, 1)
    panel.controls.busy(True, "working")
    panel.controls.set_progress(0, 0, "reading")
    panel._failed(RuntimeError("boom"))
    panel._done()
    assert (bar.minimum(), bar.maximum(), bar.value()) == (0, 1, 0)


def test_tabs_and_title_bars_say_the_panel_without_the_plugin_name(make_napari_viewer, qtbot):
    from qtpy.QtWidgets import QTabBar

    viewer = make_napari_viewer(show=True)
    docks = _open_all(viewer, qtbot)
    window = viewer.window._qt_window
    names = set(docks)
    tabs = {bar.tabText(i) for bar in window.findChildren(QTabBar) for i in range(bar.count())}
    assert names <= tabs, tabs  # "Slide", not "Slide (HistoScope)"
    for name, (dock, _) in docks.items():
        assert dock.windowTitle() == name
        assert dock.title.title.text() == name  # napari's own title bar over the dock
    dock = docks["Slide"][0]
    dock.setFloating(True)  # napari makes a new title bar: still the short name
    qtbot.wait(50)
    assert dock.title.title.text() == "Slide"
    dock.setFloating(False)


def test_a_panel_opened_from_the_plugins_menu_has_the_short_title(make_napari_viewer, qtbot):
    from qtpy.QtWidgets import QDockWidget

    viewer = make_napari_viewer(show=True)
    window = viewer.window._qt_window
    menus = [a.menu() for a in window.menuBar().actions() if "Plugins" in a.text()]

    def actions(menu):
        for action in menu.actions():
            yield from actions(action.menu()) if action.menu() else [action]

    [slide] = [a for a in actions(menus[0]) if a.text().split(" (")[0] == "Slide"]
    slide.trigger()  # napari 0.9 titles such a dock "Slide (HistoScope)"
    qtbot.wait(100)
    [dock] = [d for d in window.findChildren(QDockWidget) if isinstance(d.widget(), Panel)]
    assert dock.windowTitle() == "Slide" == dock.title.title.text()
