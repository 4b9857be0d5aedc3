"""Tumour map widget: tissue labels, live heatmap, cancel, Grad-CAM on a tile, bad checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

from tests.widgets._cancel import cancel_after_first_step
from tests.widgets._slides import edge_slide


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory):
    from histoscope.slide import write_pyramidal_tiff

    rng = np.random.default_rng(1)
    img = np.full((1024, 1024, 3), 245, np.uint8)
    img[384:, 128:900] = (180, 90, 160)
    img[384:] = np.clip(img[384:] + rng.normal(0, 10, img[384:].shape), 0, 255).astype(np.uint8)
    return write_pyramidal_tiff(tmp_path_factory.mktemp("s") / "he.tif", img, mpp=0.5, min_size=256)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import torch

    from histoscope.checkpoints import save_checkpoint
    from histoscope.models import TileClassifier

    torch.manual_seed(0)
    model = TileClassifier("test_cnn", 2, backbone_kwargs={"tile_size": 32, "mpp": 4.0})
    card = {"family": "tile_classifier", "config": model.config, "classes": ["normal", "tumour"],
            "input_spec": model.input_spec.to_dict()}  # fmt: skip
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "tiny", model, card)


@pytest.fixture
def widget(make_napari_viewer, slide_path, checkpoint):
    from histoscope._widgets.tumour import TumourWidget

    viewer = make_napari_viewer()
    viewer.open(str(slide_path), plugin="napari-histoscope")
    w = TumourWidget(viewer)
    w.checkpoint.setText(str(checkpoint))
    return w


def _wait(qtbot, widget, worker):
    assert worker is not None, widget.status.text()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)  # set by the finished slot


def test_tissue_mask_layer(widget, qtbot):
    _wait(qtbot, widget, widget.run_tissue())
    tissue = widget.viewer.layers["tissue"]
    assert tissue._type_string == "labels" and tissue.data.any() and not tissue.data.all()


def test_heatmap_fills_tissue_only_then_gradcam_on_click(widget, qtbot):
    _wait(qtbot, widget, widget.run())
    heat = widget.viewer.layers["tumour probability"]
    vals = heat.data
    assert np.isfinite(vals).any() and np.isnan(vals).any()  # glass stays transparent
    assert widget.gradcam_at(y_um=50.0, x_um=50.0) is None  # glass: no scored tile
    assert "No scored tissue tile" in widget.status.text()
    assert widget.gradcam_at(y_um=400.0, x_um=250.0) is not None  # inside the tissue
    qtbot.waitUntil(lambda: "Grad-CAM" in widget.viewer.layers, timeout=120_000)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    cam = widget.viewer.layers["Grad-CAM"]
    assert cam.data.shape == (32, 32)
    np.testing.assert_allclose(cam.scale, (4.0, 4.0))
    p = vals[int(400 // 128), int(250 // 128)]
    assert "row 3, col 1" in widget.status.text() and f"p(tumour) = {p:.2f}" in widget.status.text()


@pytest.fixture(scope="module")
def big_slide(tmp_path_factory):
    from histoscope.slide import write_pyramidal_tiff

    rng = np.random.default_rng(2)
    img = np.clip(rng.normal((180, 90, 160), 10, (3072, 3072, 3)), 0, 255).astype(np.uint8)
    return write_pyramidal_tiff(tmp_path_factory.mktemp("b") / "big.tif", img, mpp=0.5)


def test_cancel_keeps_the_tiles_scored_and_stops_the_rest(widget, qtbot, big_slide):
    widget.viewer.open(str(big_slide), plugin="napari-histoscope")
    widget.layer_combo.setCurrentText("big.tif")
    worker = widget.run()
    cancel_after_first_step(widget, worker, "tumour tiles")
    _wait(qtbot, widget, worker)
    assert widget.run_button.isEnabled() and "Cancelled" in widget.status.text()
    heat = widget.viewer.layers["tumour probability"].data
    scored = int(np.isfinite(heat).sum())
    total = 12 * 12  # 3072 px at 0.5 µm in 128 µm tiles, all tissue
    assert 32 <= scored < total and scored % 32 == 0  # whole batches kept, the rest never run
    assert widget.heatmap.cancelled and widget.heatmap.n_scored == scored


def test_checkpoint_of_another_family_is_refused(widget, qtbot):
    from histoscope._data import sample_data_path

    clam = sample_data_path("clam_default.safetensors")
    widget.checkpoint.setText(str(clam))
    _wait(qtbot, widget, widget.run())
    assert "expected 'tile_classifier'" in widget.status.text()
    assert "tumour probability" not in widget.viewer.layers


def test_wrong_checkpoint_is_reported(widget, qtbot, tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    widget.checkpoint.setText(str(bad))
    _wait(qtbot, widget, widget.run())
    assert "model.pt" in widget.status.text()
    assert len(widget.viewer.layers) == 1


def test_tissue_parameters_come_from_the_form(widget, qtbot):
    widget.channel.setCurrentText("grey")
    widget.min_area.setValue(1e6)  # larger than the whole tissue piece: nothing is kept
    _wait(qtbot, widget, widget.run_tissue())
    assert not widget.viewer.layers["tissue"].data.any()
    assert widget.tissue_params().channel == "grey"


def test_renamed_slide_layer_stays_chosen(widget):
    layer = widget.viewer.layers[0]
    assert widget.layer_combo.layer() is layer
    layer.name = "renamed slide"
    assert widget.layer_combo.currentText() == "renamed slide"
    assert widget.layer_combo.layer() is layer


def test_image_box_starts_on_the_active_image_not_the_bottom_one(make_napari_viewer, slide_path):
    from histoscope._widgets.tumour import TumourWidget

    viewer = make_napari_viewer()
    viewer.open(str(slide_path), plugin="napari-histoscope")
    newest = viewer.add_image(np.zeros((64, 64, 3), np.uint8), rgb=True, name="newest")
    viewer.layers.selection.active = viewer.layers[0]
    assert TumourWidget(viewer).layer_combo.layer() is viewer.layers[0]  # the active one
    viewer.layers.selection.clear()
    assert TumourWidget(viewer).layer_combo.layer() is newest  # else the newest


def test_checkpoint_field_says_what_the_model_is_and_was_trained_on(widget, checkpoint, tmp_path):
    assert widget.picker.about.text().startswith("tile_classifier (test_cnn): normal, tumour")
    assert widget.checkpoint.toolTip() == str(checkpoint)
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00" * 16)
    widget.checkpoint.setText(str(bad))
    assert "broken.safetensors" in widget.picker.about.text()


def test_cancel_while_loading_stops_before_any_tile(widget, qtbot):
    worker = widget.run()
    cancel_after_first_step(widget, worker, "loading")  # the checkpoint is being loaded
    _wait(qtbot, widget, worker)
    assert widget.status.text().startswith("Cancelled before any tile was scored.")
    assert "tumour probability" not in widget.viewer.layers and widget.run_button.isEnabled()


def test_tissue_mask_is_drawn_as_a_visible_outline(widget, qtbot):
    from histoscope.tasks.tissue import MASK_COLOR, MASK_CONTOUR

    _wait(qtbot, widget, widget.run_tissue())
    tissue = widget.viewer.layers["tissue"]
    assert tissue.contour == MASK_CONTOUR  # an outline: the H&E inside stays visible
    np.testing.assert_allclose(tissue.colormap.map(np.array([1]))[0], MASK_COLOR)
    assert tissue.colormap.map(np.array([0]))[0][3] == 0


def test_heatmap_scores_the_tissue_mask_as_the_user_edited_it(widget, qtbot):
    _wait(qtbot, widget, widget.run_tissue())
    tissue = widget.viewer.layers["tissue"]
    _wait(qtbot, widget, widget.run())
    before = np.isfinite(widget.viewer.layers["tumour probability"].data)
    half = tissue.data.shape[1] // 2
    assert before[:, 2:].any()  # tissue tiles on the right half were scored
    data = tissue.data.copy()
    data[:, half:] = 0  # the user erases the right half of the mask
    tissue.data = data
    _wait(qtbot, widget, widget.run())
    after = np.isfinite(widget.viewer.layers["tumour probability"].data)
    assert not after[:, 2:].any()  # 4 x 4 tiles of 128 µm: columns 2-3 lie on the erased half
    assert np.array_equal(after[:, :2], before[:, :2])
    assert not widget.viewer.layers["tissue"].data[:, half:].any()  # the edit is kept as drawn


def test_tissue_painted_with_any_label_shows_and_a_restored_session_keeps_the_outline(
    widget, qtbot, make_napari_viewer, slide_path, tmp_path
):
    import shutil

    from histoscope._widgets._session import save_viewer_session
    from histoscope.tasks.tissue import MASK_COLOR, MASK_CONTOUR

    own = shutil.copy(slide_path, tmp_path / "own.tif")  # a session folder of its own
    widget.viewer.layers.clear()
    widget.viewer.open(str(own), plugin="napari-histoscope")
    _wait(qtbot, widget, widget.run_tissue())
    tissue = widget.viewer.layers["tissue"]
    assert tissue.contour == MASK_CONTOUR
    tissue.data[:4, :4] = 3  # the user paints with label 3: it counts as tissue, so it shows
    tissue.refresh()
    np.testing.assert_allclose(tissue.colormap.map(3), MASK_COLOR, atol=1e-6)
    np.testing.assert_allclose(tissue.colormap.map(1), MASK_COLOR, atol=1e-6)
    assert tissue.colormap.map(0)[3] == 0
    assert save_viewer_session(widget.viewer) == []
    folder = widget.layer_combo.layer().metadata["histoscope_session"].folder
    other = make_napari_viewer()
    other.open(str(folder), plugin="napari-histoscope")
    restored = other.layers["tissue"]
    assert restored.contour == MASK_CONTOUR  # an outline, not a filled brown sheet
    np.testing.assert_allclose(restored.colormap.map(1), MASK_COLOR, atol=1e-6)
    np.testing.assert_allclose(restored.colormap.map(3), MASK_COLOR, atol=1e-6)
    assert (restored.data[:4, :4] == 3).all()
    assert "histoscope_contour" not in restored.metadata


def test_edge_tiles_left_unscored_are_named_in_the_status(widget, qtbot, tmp_path):
    path = edge_slide(tmp_path)
    widget.viewer.open(str(path), plugin="napari-histoscope")
    widget.layer_combo.setCurrentText("edge.tif")
    _wait(qtbot, widget, widget.run())
    n = widget.heatmap.summary()["edge_tiles_not_scored"]
    assert n > 0 and f"{n} edge tiles with tissue not scored (partly off the slide)" in (
        widget.status.text()
    )


def test_heatmap_layer_is_made_before_the_run_and_the_tiles_fill_it_in_place(
    make_napari_viewer, qtbot, slide_path, checkpoint
):
    """napari makes the layer (the slow part) before the worker runs, not when tiles arrive.

    The panel is opened as napari opens a plugin dock (its viewer a proxy that wraps
    every layer anew on each access).
    """
    from histoscope._widgets.tumour import HEATMAP_NAME

    viewer = make_napari_viewer()
    viewer.open(str(slide_path), plugin="napari-histoscope")
    _, widget = viewer.window.add_plugin_dock_widget("napari-histoscope", "Tumour map")
    widget.checkpoint.setText(str(checkpoint))
    slide = viewer.layers[0]
    extent = np.array(viewer.layers.extent.world)
    made = []
    viewer.layers.events.inserted.connect(lambda event: made.append(event.value.name))
    worker = widget.run()
    assert made == [HEATMAP_NAME]  # there at once, empty, over the slide's own extent
    layer = viewer.layers[HEATMAP_NAME]
    assert np.isnan(layer.data).all() and not layer.colorbar.visible  # shown with the tiles
    np.testing.assert_allclose(viewer.layers.extent.world, extent)
    _wait(qtbot, widget, worker)
    assert made == [HEATMAP_NAME]  # the tiles went into that layer: none was made for them
    assert viewer.layers[HEATMAP_NAME] is layer and layer.data is widget.heatmap.values
    assert np.isfinite(layer.data).any() and layer.colorbar.visible
    data, kwargs, _ = widget.heatmap.to_layers()[0]
    np.testing.assert_allclose(layer.scale, kwargs["scale"])
    np.testing.assert_allclose(layer.translate, kwargs["translate"])
    assert layer.metadata["histoscope"]["task"] == "tumour"
    assert list(viewer.layers) == [slide, layer]
    # the dock closes with the viewer: let the session writer and its status report finish
    qtbot.waitUntil(lambda: not widget.autosave.busy, timeout=60_000)
    qtbot.wait(300)


def test_a_session_snapshot_does_not_import_pandas():
    """The first save after a run used to import pandas on the GUI thread (1.4 s)."""
    import subprocess
    import sys

    code = ("import sys, numpy as np\n"
            "import histoscope._widgets._session as s\n"
            "assert 'pandas' not in sys.modules\n"
            "s._frozen({'a': np.zeros(3), 'b': [1, (2, 3)], 'c': {'d': 'e'}})\n"
            "print('pandas' in sys.modules)\n")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


_RERUN_SCRIPT = """
import sys, time
import napari
from qtpy.QtWidgets import QApplication

slide, ckpt = sys.argv[1:3]
viewer = napari.Viewer()
app = QApplication.instance()
viewer.open(slide, plugin="napari-histoscope")
_, w = viewer.window.add_plugin_dock_widget("napari-histoscope", "Tumour map")
w.checkpoint.setText(ckpt)


def spin(seconds, until=lambda: False):
    end = time.monotonic() + seconds
    while time.monotonic() < end and not until():
        app.processEvents()
        time.sleep(0.02)


def run(cancel):
    w.run()
    if cancel:
        w.cancel()
    spin(60, lambda: w.worker is None)
    assert w.worker is None
    spin(0.5)  # the canvas draws what the run left


run(cancel=True)  # cancelled at once: its empty map goes
run(cancel=False)
run(cancel=True)  # the previous map stays
run(cancel=False)  # the map is refilled
run(cancel=False)
spin(0.5, lambda: not w.autosave.busy)
print("layers", [layer.name for layer in viewer.layers], flush=True)
"""


def test_run_cancel_and_rerun_in_a_shown_viewer_does_not_crash(slide_path, checkpoint, tmp_path):
    """napari 0.9.2 segfaulted drawing a colour bar added after another's layer was removed."""
    import os
    import subprocess
    import sys

    if not os.environ.get("DISPLAY"):
        pytest.skip("needs a display (run under xvfb-run)")
    env = {**os.environ, "HISTOSCOPE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-X", "faulthandler", "-c", _RERUN_SCRIPT,
                          str(slide_path), str(checkpoint)], env=env, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "layers ['he.tif', 'tumour probability']" in out.stdout, out.stdout


def test_a_rerun_keeps_the_previous_map_until_its_first_tiles(widget, qtbot, tmp_path):
    """A re-run cancelled or failing before its first tile leaves the previous map as it was;
    one that scores tiles refills the same layer (no layer removed, none added)."""
    _wait(qtbot, widget, widget.run())
    layer = widget.viewer.layers["tumour probability"]
    before = np.array(layer.data)
    made, gone = [], []
    widget.viewer.layers.events.inserted.connect(lambda e: made.append(e.value.name))
    widget.viewer.layers.events.removed.connect(lambda e: gone.append(e.value.name))
    worker = widget.run()
    assert widget.viewer.layers["tumour probability"] is layer  # not replaced at the start
    widget.cancel()  # at once
    _wait(qtbot, widget, worker)
    assert widget.status.text().startswith("Cancelled before any tile was scored.")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"nonsense" * 10)
    good = widget.checkpoint.text()
    widget.checkpoint.setText(str(bad))
    _wait(qtbot, widget, widget.run())  # fails loading the checkpoint
    assert "bad.safetensors" in widget.status.text()
    assert widget.viewer.layers["tumour probability"] is layer
    np.testing.assert_array_equal(layer.data, before)
    assert layer.colorbar.visible and made == [] and gone == []
    widget.checkpoint.setText(good)
    _wait(qtbot, widget, widget.run())
    assert widget.viewer.layers["tumour probability"] is layer and made == [] and gone == []
    assert layer.data is widget.heatmap.values and layer.colorbar.visible
