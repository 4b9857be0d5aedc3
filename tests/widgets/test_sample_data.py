"""Sample data offered in napari's File > Open Sample menu."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.mark.parametrize("key", ["synthetic-he", "synthetic-ihc"])
def test_synthetic_samples_generate_once_into_the_cache(
    make_napari_viewer, tmp_path, monkeypatch, key
):
    monkeypatch.setenv("HISTOSCOPE_CACHE", str(tmp_path))
    viewer = make_napari_viewer()
    [layer] = viewer.open_sample("napari-histoscope", key)
    assert layer.multiscale and layer.rgb
    np.testing.assert_allclose(layer.scale, (0.5, 0.5))
    made = sorted(p.name for p in tmp_path.rglob("*.tif"))
    assert len(made) == 1
    viewer.open_sample("napari-histoscope", key)  # second time: from the cache
    assert sorted(p.name for p in tmp_path.rglob("*.tif")) == made


def test_skimage_ihc_sample(make_napari_viewer):
    viewer = make_napari_viewer()
    [layer] = viewer.open_sample("napari-histoscope", "skimage-ihc")
    assert layer.data.shape == (512, 512, 3)


@pytest.fixture
def small_samples(tmp_path, monkeypatch):
    """Sample slides of 1,024 x 1,024 px in a fresh cache (the real ones take ~15 s)."""
    import functools

    import histoscope.synthetic as synthetic

    monkeypatch.setenv("HISTOSCOPE_CACHE", str(tmp_path))
    small = functools.partial(synthetic.sample_slide, size=(1024, 1024))
    monkeypatch.setattr(synthetic, "sample_slide", small)
    return tmp_path


def test_slide_panel_generates_a_sample_in_a_worker_with_progress(
    make_napari_viewer, qtbot, small_samples
):
    import time

    from qtpy.QtCore import QTimer

    from histoscope._widgets.slide import SlideWidget

    viewer = make_napari_viewer()
    widget = SlideWidget(viewer)
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(10)
    worker = widget.open_sample("ihc")
    assert widget.cancel_button.isEnabled() and not widget.sample_button.isEnabled()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=120_000)
    timer.stop()
    assert worker is not None and [ly.name for ly in viewer.layers] == ["synthetic IHC"]
    assert widget.busy.maximum() > 0 and widget.busy.value() == widget.busy.maximum()
    gaps = np.diff(ticks)
    assert len(ticks) > 10 and gaps.max() < 0.5  # the GUI kept running while it generated
    assert len(list(small_samples.rglob("*.tif"))) == 1


def test_cancelling_a_sample_leaves_nothing_half_written(make_napari_viewer, qtbot, small_samples):
    from qtpy.QtCore import Qt

    from histoscope._widgets.slide import SlideWidget

    viewer = make_napari_viewer()
    widget = SlideWidget(viewer)
    widget._relay.step.connect(lambda done, total: widget.cancel())  # cancel at the first tile
    # the worker waits for that Cancel (given on the GUI thread), so a small slide cannot be
    # finished before the click arrives
    direct = Qt.ConnectionType.DirectConnection
    widget._relay.step.connect(lambda done, total: widget._cancel.wait(30), direct)
    widget.open_sample("he")
    qtbot.waitUntil(lambda: widget._worker is None, timeout=120_000)
    assert len(viewer.layers) == 0 and widget.status.text().startswith("Cancelled")
    assert not list(small_samples.rglob("*.tif")) and widget.sample_button.isEnabled()


def test_open_sample_keeps_the_window_running_while_it_generates(
    make_napari_viewer, qtbot, small_samples, monkeypatch
):
    """File > Open Sample: napari calls it on the GUI thread; the slide is made in a thread."""
    import threading
    import time

    from qtpy.QtCore import QTimer

    import histoscope.synthetic as synthetic

    inner, threads = synthetic.sample_slide, set()

    def recorded(kind, progress=None, **kwargs):
        def on_tile(done, total):
            threads.add(threading.current_thread())
            progress(done, total)

        return inner(kind, progress=on_tile, **kwargs)

    monkeypatch.setattr(synthetic, "sample_slide", recorded)
    viewer = make_napari_viewer()
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(10)
    t0 = time.perf_counter()
    [layer] = viewer.open_sample("napari-histoscope", "synthetic-he")  # as the menu calls it
    t1 = time.perf_counter()
    timer.stop()
    assert threads and threading.main_thread() not in threads  # generated off the GUI thread
    during = [t for t in ticks if t0 < t < t1]
    assert len(during) > 5  # the event loop ran while it generated: the window repainted
    assert [ly.name for ly in viewer.layers] == ["synthetic H&E"] and layer.rgb
    assert len(list(small_samples.rglob("*.tif"))) == 1


def test_cancel_in_napari_activity_bar_stops_open_sample_and_writes_nothing(
    make_napari_viewer, qtbot, small_samples, monkeypatch, capfd
):
    """A user's Cancel is said in one info line, with no traceback and no layer left."""
    import time

    from napari.utils import progress as napari_progress
    from napari.utils.notifications import notification_manager
    from qtpy.QtCore import QTimer

    import histoscope.synthetic as synthetic
    from histoscope.progress import Cancelled

    inner = synthetic.sample_slide

    def waits_for_cancel(kind, progress=None, **kwargs):
        def on_tile(done, total):  # the first tile waits until Cancel reaches it
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                progress(done, total)  # raises once Cancel was pressed
                time.sleep(0.02)

        return inner(kind, progress=on_tile, **kwargs)

    monkeypatch.setattr(synthetic, "sample_slide", waits_for_cancel)
    viewer = make_napari_viewer()
    pressed = []

    def press_cancel():  # what the Cancel button of napari's activity bar does
        for bar in list(napari_progress._all_instances):
            if hasattr(bar, "cancel") and "synthetic IHC" in (bar.desc or ""):
                bar.cancel()
                pressed.append(bar)

    timer = QTimer()
    timer.timeout.connect(press_cancel)
    timer.start(20)
    viewer.open_sample("napari-histoscope", "synthetic-ihc")  # raises nothing: quiet
    timer.stop()
    qtbot.waitUntil(lambda: len(viewer.layers) == 0, timeout=5000)  # the placeholder goes
    assert pressed
    assert not list(small_samples.rglob("*.tif"))
    said = [n for n in notification_manager.records if "nothing was written" in n.message]
    assert [n.severity for n in said] == ["info"]
    out = capfd.readouterr()
    assert "Traceback" not in out.out + out.err and Cancelled.__name__ not in out.err
