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
