"""Slide widget and reader inside a real napari viewer."""

from __future__ import annotations

import numpy as np
import pytest

from histoscope._widgets.slide import SlideWidget
from histoscope.layers import SLIDE_KEY


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer()


def test_viewer_opens_slide_through_plugin(viewer, pyramid_tiff):
    layers = viewer.open(str(pyramid_tiff), plugin="napari-histoscope")
    [layer] = layers
    assert layer.multiscale and layer.rgb
    np.testing.assert_allclose(layer.scale, (0.5, 0.5))
    # world extent is the slide's physical size in µm
    np.testing.assert_allclose(layer.extent.world[1], (1536 * 0.5, 2304 * 0.5), rtol=0.01)


def test_widget_opens_slide_in_worker_and_shows_metadata(viewer, qtbot, pyramid_tiff):
    widget = SlideWidget(viewer)
    worker = widget.open_path(str(pyramid_tiff))
    with qtbot.waitSignal(worker.finished, timeout=20_000):
        pass
    assert len(widget.slide_layers()) == 1
    assert widget.info["mpp"].text() == "0.5 µm/px"
    assert "2304×1536" in widget.info["levels"].text()
    assert widget.open_button.isEnabled()


def test_widget_shows_error_for_corrupt_file_and_keeps_layers(
    viewer, qtbot, tmp_path, pyramid_tiff
):
    widget = SlideWidget(viewer)
    viewer.add_points([[1, 1]], name="my annotations")
    bad = tmp_path / "garbage.ndpi"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    worker = widget.open_path(str(bad))
    with qtbot.waitSignal(worker.finished, timeout=20_000):
        pass
    assert "garbage.ndpi" in widget.status.text()
    assert [ly.name for ly in viewer.layers] == ["my annotations"]
    assert widget.open_button.isEnabled()


def test_setting_mpp_rescales_layer(viewer, tmp_path):
    from PIL import Image

    from tests.conftest import make_rgb

    png = tmp_path / "field.png"
    Image.fromarray(make_rgb(300, 400)).save(png)
    [layer] = viewer.open(str(png), plugin="napari-histoscope")
    widget = SlideWidget(viewer)
    assert "unknown" in widget.info["mpp"].text()
    widget.mpp_spin.setValue(0.25)
    widget._apply_mpp()
    np.testing.assert_allclose(layer.scale, (0.25, 0.25))
    assert layer.metadata[SLIDE_KEY]["mpp"] == 0.25
    assert layer.metadata["slide"].read_region(0, 0, 50, 75, mpp=0.5).shape == (75, 50, 3)
