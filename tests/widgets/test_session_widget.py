"""A viewer's work is saved into the slide's session folder and reopens exactly."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest


@pytest.fixture
def slide_path(tmp_path):
    from histoscope.slide import write_pyramidal_tiff

    rng = np.random.default_rng(3)
    img = rng.integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
    return write_pyramidal_tiff(tmp_path / "case.tif", img, mpp=0.5, min_size=256)


def _state(layer):
    out = {"name": layer.name, "type": layer._type_string, "opacity": layer.opacity,
           "visible": layer.visible, "scale": list(layer.scale),
           "translate": list(layer.translate)}  # fmt: skip
    if layer._type_string == "image" and not layer.rgb:
        out["colormap"] = layer.colormap.name
        out["contrast_limits"] = list(layer.contrast_limits)
    return out


def test_layers_reopen_exactly_from_the_session_folder(make_napari_viewer, slide_path):
    from histoscope._widgets._session import AutoSave
    from histoscope.results import fading_colormap

    viewer = make_napari_viewer()
    viewer.open(str(slide_path), plugin="napari-histoscope")
    viewer.add_image(np.random.default_rng(0).random((8, 8), np.float32), name="heat",
                     scale=(64, 64), translate=(31.75, 31.75),
                     colormap=fading_colormap("inferno"), contrast_limits=(0.2, 0.8),
                     opacity=0.7)  # fmt: skip
    feats = pd.DataFrame({"class": ["tumour", "stroma"], "area": [11.0, 14.0]})
    viewer.add_points([[10.0, 20.0], [30.0, 40.0]], name="cells", features=feats,
                      face_color="class", scale=(0.5, 0.5))  # fmt: skip
    viewer.add_shapes(
        [np.array([[0, 0], [0, 100], [100, 100]])], name="roi", opacity=0.3, shape_type="polygon"
    )
    viewer.layers["roi"].visible = False
    viewer.layers.move(3, 1)  # roi just above the slide
    saver = AutoSave.for_viewer(viewer)
    assert saver.save_now() is not None, saver.error
    before = [_state(ly) for ly in viewer.layers]

    again = make_napari_viewer()
    again.open(str(slide_path.with_name("case.tif.histoscope")), plugin="napari-histoscope")
    after = [_state(ly) for ly in again.layers]
    assert after == before
    np.testing.assert_array_equal(again.layers["heat"].data, viewer.layers["heat"].data)
    np.testing.assert_allclose(again.layers["heat"].colormap.colors,
                               viewer.layers["heat"].colormap.colors)  # fmt: skip
    pd.testing.assert_frame_equal(again.layers["cells"].features, viewer.layers["cells"].features)
    np.testing.assert_array_equal(again.layers["cells"].face_color,
                                  viewer.layers["cells"].face_color)  # fmt: skip
    np.testing.assert_array_equal(again.layers["roi"].data[0], viewer.layers["roi"].data[0])


def test_an_edit_is_saved_without_pressing_anything(make_napari_viewer, slide_path, qtbot):
    from histoscope._widgets._session import AutoSave
    from histoscope.session_store import read_manifest

    viewer = make_napari_viewer()
    viewer.open(str(slide_path), plugin="napari-histoscope")
    saver = AutoSave.for_viewer(viewer)
    viewer.add_points([[1.0, 2.0]], name="marks")
    folder = slide_path.with_name("case.tif.histoscope")
    qtbot.waitUntil(lambda: [e["name"] for e in read_manifest(folder).get("layers", [])]
                    == ["marks"], timeout=10_000)  # fmt: skip
    viewer.layers["marks"].add([[5.0, 6.0]])
    qtbot.waitUntil(lambda: len(_saved_points(folder)) == 2, timeout=10_000)
    assert saver.error is None


def _saved_points(folder):
    import histoscope as hs
    from histoscope.session_store import folder_lock, read_manifest

    with folder_lock(folder):  # not while the writer thread replaces the layers
        doc = read_manifest(folder)
        if not doc.get("layers"):
            return []
        with hs.open_session(doc["slide"], folder) as s:
            return s.layers()[0][0]


def _saved_names(folder):
    from histoscope.session_store import read_manifest

    return [e["name"] for e in read_manifest(folder).get("layers", [])]


def test_a_new_viewer_never_overwrites_a_saved_session(make_napari_viewer, slide_path, qtbot):
    from histoscope._widgets._session import AutoSave
    from histoscope._widgets.tumour import TumourWidget

    folder = slide_path.with_name("case.tif.histoscope")
    first = make_napari_viewer()
    first.open(str(slide_path), plugin="napari-histoscope")
    first.add_points([[1.0, 2.0]], name="kept")
    assert AutoSave.for_viewer(first).save_now() and _saved_names(folder) == ["kept"]

    fresh = make_napari_viewer()  # the slide again, without its session, and a panel
    fresh.open(str(slide_path), plugin="napari-histoscope")
    TumourWidget(fresh)
    fresh.add_points([[3.0, 4.0]], name="new")
    saver = AutoSave.for_viewer(fresh)
    assert saver.save_now()
    assert _saved_names(folder) == ["kept"]  # nothing overwritten
    assert any("not shown here" in n for n in saver.notes)

    again = make_napari_viewer()  # reopening the folder continues it, panel or not
    again.open(str(folder), plugin="napari-histoscope")
    again.add_points([[5.0, 6.0]], name="added later")
    qtbot.waitUntil(lambda: _saved_names(folder) == ["kept", "added later"], timeout=10_000)


def test_each_slide_keeps_its_own_layers(make_napari_viewer, slide_path, tmp_path):
    from histoscope._widgets._session import AutoSave
    from histoscope.slide import write_pyramidal_tiff

    other = write_pyramidal_tiff(tmp_path / "other.tif", np.full((512, 512, 3), 90, np.uint8),
                                 mpp=0.5)  # fmt: skip
    viewer = make_napari_viewer()
    viewer.open(str(slide_path), plugin="napari-histoscope")
    saver = AutoSave.for_viewer(viewer)
    viewer.add_shapes([np.array([[0, 0], [0, 50], [50, 50]])], shape_type="polygon", name="on A")
    viewer.open(str(other), plugin="napari-histoscope")
    viewer.layers.selection.active = viewer.layers["other.tif"]
    viewer.add_points([[1.0, 1.0]], name="on B")
    assert saver.save_now()
    assert _saved_names(slide_path.with_name("case.tif.histoscope")) == ["on A"]
    assert _saved_names(tmp_path / "other.tif.histoscope") == ["on B"]


def test_a_pyramid_layer_is_saved_and_reopens(make_napari_viewer, slide_path):
    from histoscope._widgets._session import AutoSave

    viewer = make_napari_viewer()
    viewer.open(str(slide_path), plugin="napari-histoscope")
    levels = [np.random.default_rng(0).random((64, 64), np.float32)]
    levels.append(levels[0][::2, ::2].copy())
    viewer.add_image(levels, multiscale=True, scale=(8, 8), name="pyramid")
    assert AutoSave.for_viewer(viewer).save_now()
    again = make_napari_viewer()
    again.open(str(slide_path.with_name("case.tif.histoscope")), plugin="napari-histoscope")
    back = again.layers["pyramid"]
    assert back.multiscale and len(back.data) == 2
    np.testing.assert_array_equal(np.asarray(back.data[1]), levels[1])


@pytest.fixture
def slow_writes(monkeypatch):
    """Every session write takes 1.5 s; records how many ran and the most at once."""
    import threading
    import time

    from histoscope import session_store

    real = session_store.save_layers
    log = {"calls": 0, "now": 0, "most": 0, "names": []}
    lock = threading.Lock()

    def slow(folder, layers, manifest, slide_display=None):
        with lock:
            log["calls"] += 1
            log["now"] += 1
            log["most"] = max(log["most"], log["now"])
        try:
            time.sleep(1.5)
            log["names"].append([k.get("name") for _, k, _ in layers])
            return real(folder, layers, manifest, slide_display)
        finally:
            with lock:
                log["now"] -= 1

    monkeypatch.setattr(session_store, "save_layers", slow)
    return log


def test_a_slow_write_never_blocks_the_viewer_and_the_last_edit_wins(
    make_napari_viewer, slide_path, qtbot, slow_writes, monkeypatch
):
    import time

    from qtpy.QtCore import QTimer

    from histoscope._widgets import _session
    from histoscope._widgets._session import AutoSave

    monkeypatch.setattr(_session, "DELAY_MS", 50)
    viewer = make_napari_viewer()
    viewer.open(str(slide_path), plugin="napari-histoscope")
    saver = AutoSave.for_viewer(viewer)
    ticks = []
    clock = QTimer()
    clock.timeout.connect(lambda: ticks.append(time.monotonic()))
    clock.start(20)
    viewer.add_points([[1.0, 2.0]], name="marks")
    t0 = time.monotonic()
    assert saver.save_now(wait=False)  # returns at once: the write runs in its thread
    assert time.monotonic() - t0 < 1.0 and saver.busy
    for i in range(4):  # edits while the first write is still on its way
        qtbot.wait(150)
        viewer.layers["marks"].add([[10.0 + i, 20.0]])
    qtbot.waitUntil(lambda: not saver.timer.isActive(), timeout=5_000)  # last snapshot taken
    viewer.layers["marks"].data[0] = [7.0, 8.0]  # moved in place (no event) after it
    qtbot.waitUntil(lambda: not saver.busy, timeout=30_000)
    clock.stop()
    gaps = np.diff(ticks)
    assert len(ticks) > 20 and gaps.max() < 1.0, gaps.max()  # the event loop kept running
    assert slow_writes["most"] == 1  # never two writes at once
    assert 2 <= slow_writes["calls"] < 6  # snapshots taken while writing were coalesced
    assert saver.error is None
    folder = slide_path.with_name("case.tif.histoscope")
    saved = _saved_points(folder)
    np.testing.assert_array_equal(saved, [[1.0, 2.0], [10, 20], [11, 20], [12, 20], [13, 20]])
    assert saver.save_now()  # wait=True: the in-place move is on disk when it returns
    np.testing.assert_array_equal(_saved_points(folder)[0], [7.0, 8.0])


def test_closing_the_viewer_writes_the_pending_edit(make_napari_viewer, slide_path, slow_writes):
    from histoscope._widgets._session import AutoSave

    viewer = make_napari_viewer()
    viewer.open(str(slide_path), plugin="napari-histoscope")
    saver = AutoSave.for_viewer(viewer)
    viewer.add_points([[1.0, 2.0], [3.0, 4.0]], name="late")
    assert saver.timer.isActive() and slow_writes["calls"] == 0
    viewer.close()  # before the quiet period ends: written, and waited for
    assert slow_writes["calls"] == 1 and not saver.busy
    assert _saved_names(slide_path.with_name("case.tif.histoscope")) == ["late"]


def test_an_explicit_save_is_never_overwritten_by_an_older_background_write(
    make_napari_viewer, slide_path, monkeypatch
):
    import threading
    import time

    from histoscope._widgets import _session
    from histoscope._widgets._session import AutoSave, save_viewer_session

    real = _session.write_snapshot

    def late(saves):  # the writer thread reaches the folder late, holding an older state
        if threading.current_thread().name == "histoscope-autosave" and not late.done:
            late.done = True
            time.sleep(1.5)
        return real(saves)

    late.done = False
    monkeypatch.setattr(_session, "write_snapshot", late)
    viewer = make_napari_viewer()
    viewer.open(str(slide_path), plugin="napari-histoscope")
    saver = AutoSave.for_viewer(viewer)
    viewer.add_points([[1.0, 2.0]], name="marks")
    assert saver.save_now(wait=False) and saver.busy  # an older state on its way to disk
    viewer.layers["marks"].data[0] = [7.0, 8.0]  # edited in place while it is on its way
    assert save_viewer_session(viewer) == []
    saver.wait(10)
    np.testing.assert_array_equal(_saved_points(slide_path.with_name("case.tif.histoscope")),
                                  [[7.0, 8.0]])  # fmt: skip


def test_a_snapshot_does_not_change_with_later_edits(make_napari_viewer, slide_path):
    from histoscope._widgets._session import layer_snapshot

    viewer = make_napari_viewer()
    pts = viewer.add_points([[1.0, 2.0]], features=pd.DataFrame({"n": [1.0]}), name="p")
    labels = viewer.add_labels(np.zeros((8, 8), np.int32), name="l")
    image = viewer.add_image(np.ones((8, 8)), name="i")
    shots = [layer_snapshot(ly) for ly in (pts, labels, image)]
    pts.data[0] = [5.0, 5.0]
    pts.features.loc[0, "n"] = 9.0
    labels.data[0, 0] = 3
    assert shots[0][0].tolist() == [[1.0, 2.0]] and shots[0][1]["features"]["n"].tolist() == [1.0]
    assert shots[1][0][0, 0] == 0
    assert shots[2][0] is image.data  # pixels napari never edits are shared, not copied


def _three_layers(viewer):
    viewer.add_points([[1.0, 2.0]], name="a")
    viewer.add_points([[3.0, 4.0]], name="b")
    viewer.add_shapes([np.array([[0, 0], [0, 100], [100, 100]])], name="c", shape_type="polygon")


@pytest.mark.parametrize("how", ["viewer_close", "file_exit", "quit_app"])
def test_closing_or_quitting_keeps_every_layer(
    make_napari_viewer, slide_path, qtbot, monkeypatch, how
):
    from napari._qt import qt_event_loop

    from histoscope._widgets._session import AutoSave

    # quit_app runs in full but leaves the test's QApplication running (as under IPython)
    monkeypatch.setattr(qt_event_loop, "_ipython_has_eventloop", lambda: True)
    viewer = make_napari_viewer()
    viewer.open(str(slide_path), plugin="napari-histoscope")
    saver = AutoSave.for_viewer(viewer)
    _three_layers(viewer)
    assert saver.save_now()
    viewer.layers["a"].add([[9.0, 9.0]])  # an edit still in its quiet period
    assert saver.timer.isActive()
    if how == "viewer_close":
        viewer.close()
    elif how == "file_exit":  # what File > Exit (Ctrl+Q) does
        viewer.window._qt_window.close(quit_app=True, confirm_need=False)
    else:
        from napari._qt.qt_event_loop import quit_app

        quit_app()
    qtbot.wait(DELAY_WAIT_MS)  # any save the layer removals would have scheduled
    assert saver.wait(30) and saver.closed and saver.error is None
    folder = slide_path.with_name("case.tif.histoscope")
    assert _saved_names(folder) == ["a", "b", "c"]
    np.testing.assert_array_equal(_saved_points(folder), [[1.0, 2.0], [9.0, 9.0]])
    again = make_napari_viewer()
    again.open(str(folder), plugin="napari-histoscope")
    assert [ly.name for ly in again.layers] == ["case.tif", "a", "b", "c"]


#: Longer than the quiet period: time for a save the shutdown must not make.
DELAY_WAIT_MS = 1500


def test_deleting_every_layer_is_saved(make_napari_viewer, slide_path, qtbot):
    from histoscope._widgets._session import AutoSave

    viewer = make_napari_viewer()
    viewer.open(str(slide_path), plugin="napari-histoscope")
    saver = AutoSave.for_viewer(viewer)
    _three_layers(viewer)
    assert saver.save_now()
    folder = slide_path.with_name("case.tif.histoscope")
    for name in ("a", "b", "c"):  # the user deletes each overlay and keeps working
        viewer.layers.remove(name)
    qtbot.waitUntil(lambda: _saved_names(folder) == [], timeout=10_000)
    viewer.add_points([[5.0, 5.0]], name="d")
    viewer.add_points([[6.0, 6.0]], name="e")
    qtbot.waitUntil(lambda: _saved_names(folder) == ["d", "e"], timeout=10_000)
    viewer.layers.selection = {viewer.layers["d"], viewer.layers["e"]}
    viewer.layers.remove_selected()  # several at once
    qtbot.wait(DELAY_WAIT_MS)
    assert saver.wait(30) and not saver.closed and saver.error is None
    assert _saved_names(folder) == []
    viewer.add_points([[7.0, 7.0]], name="f")  # and it goes on being saved
    qtbot.waitUntil(lambda: _saved_names(folder) == ["f"], timeout=10_000)


@pytest.fixture
def failing_writes(monkeypatch):
    """The first ``log["fail"]`` session writes fail like a full disk; warnings are recorded."""
    import napari.utils.notifications

    from histoscope import session_store

    real = session_store.save_layers
    log = {"fail": 1, "calls": 0, "warnings": []}

    def flaky(folder, layers, manifest, slide_display=None):
        log["calls"] += 1
        if log["calls"] <= log["fail"]:
            raise OSError(28, "No space left on device")
        return real(folder, layers, manifest, slide_display)

    monkeypatch.setattr(session_store, "save_layers", flaky)
    monkeypatch.setattr(napari.utils.notifications, "show_warning", log["warnings"].append)
    return log


def test_a_failed_write_is_shown_and_tried_again(
    make_napari_viewer, slide_path, qtbot, failing_writes, monkeypatch
):
    from histoscope._widgets import _session
    from histoscope._widgets._session import AutoSave

    monkeypatch.setattr(_session, "RETRY_MS", 50)
    viewer = make_napari_viewer()
    viewer.open(str(slide_path), plugin="napari-histoscope")
    saver = AutoSave.for_viewer(viewer)
    viewer.add_points([[1.0, 2.0]], name="marks")
    assert not saver.save_now() and saver.failed is not None
    folder = slide_path.with_name("case.tif.histoscope")
    qtbot.waitUntil(lambda: _saved_names(folder) == ["marks"], timeout=10_000)
    assert saver.wait(10)
    assert failing_writes["calls"] == 2 and saver.failed is None and saver.error is None
    [warning] = failing_writes["warnings"]
    assert str(folder) in warning and "No space left on device" in warning


def test_closing_writes_a_failed_edit(
    make_napari_viewer, slide_path, qtbot, failing_writes, monkeypatch
):
    from histoscope._widgets import _session
    from histoscope._widgets._session import AutoSave

    monkeypatch.setattr(_session, "RETRIES", 0)  # no try by itself: only closing writes it
    failing_writes["fail"] = 1
    viewer = make_napari_viewer()
    viewer.open(str(slide_path), plugin="napari-histoscope")
    saver = AutoSave.for_viewer(viewer)
    _three_layers(viewer)
    assert not saver.save_now()
    qtbot.waitUntil(lambda: len(failing_writes["warnings"]) == 1, timeout=5_000)
    assert "tried again when the viewer closes" in failing_writes["warnings"][0]
    folder = slide_path.with_name("case.tif.histoscope")
    assert _saved_names(folder) == [] and not saver.timer.isActive()
    viewer.close()
    assert failing_writes["calls"] == 2 and saver.error is None
    assert _saved_names(folder) == ["a", "b", "c"]


def test_a_save_report_after_its_panel_is_closed_is_dropped(make_napari_viewer, slide_path, qtbot):
    from PyQt6 import sip

    from histoscope._widgets.tumour import TumourWidget

    viewer = make_napari_viewer()
    viewer.open(str(slide_path), plugin="napari-histoscope")
    widget = TumourWidget(viewer)
    widget.autosave.error = OSError("disk full")  # a problem to report
    sip.delete(widget.status)  # the panel's label is gone (its dock closed)
    widget._report_save("done")  # must not raise from a timer callback
