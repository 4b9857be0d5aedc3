"""Attention MIL widget with the embedded CLAM default on a small synthetic slide."""

from __future__ import annotations

import numpy as np
import pytest

from histoscope._data import sample_data_path
from tests.widgets._cancel import cancel_after_first_step
from tests.widgets._slides import edge_slide


@pytest.fixture(scope="module")
def he_slide(tmp_path_factory):
    from histoscope.synthetic import generate

    return generate(tmp_path_factory.mktemp("he"), kind="he", size=(1536, 1536), seed=3).slide


@pytest.fixture
def widget(make_napari_viewer, he_slide):
    from histoscope._widgets.mil import MILWidget

    viewer = make_napari_viewer()
    viewer.open(str(he_slide), plugin="napari-histoscope")
    return MILWidget(viewer)


def test_slide_call_attention_and_top_tiles(widget, qtbot):
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=180_000)
    assert widget.result is not None, widget.status.text()
    assert widget.result.label in widget.prediction.text()
    att = widget.viewer.layers["MIL attention"].data
    assert np.isfinite(att).any()
    assert widget.top_list.count() == len(widget.result.top_tiles) > 0
    camera = widget.viewer.scene.camera if hasattr(widget.viewer, "scene") else widget.viewer.camera
    before = tuple(camera.center)
    widget.top_list.setCurrentRow(0)
    t = widget.result.top_tiles[0]
    g = widget.result.attention.grid
    assert tuple(camera.center) != before
    assert camera.center[-1] == pytest.approx((t["x"] + g.stride / 2) * g.slide_mpp)
    camera.center = (0.0, 0.0)  # the user pans away, then picks the same row again
    widget.top_list.itemClicked.emit(widget.top_list.item(0))
    assert camera.center[-1] == pytest.approx((t["x"] + g.stride / 2) * g.slide_mpp)
    n = widget.result.summary()["tiles_encoded"]
    assert widget.top_list.item(0).text().startswith(f"#1 of {n} (top ")
    assert "x the average attention" in widget.top_list.item(0).text()


def test_checkpoint_of_another_family_is_reported(widget, qtbot):
    widget.checkpoint.setText(str(sample_data_path("tumour_patch_default.safetensors")))
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert "clam" in widget.status.text() and widget.result is None
    assert len(widget.viewer.layers) == 1


def test_cancel_keeps_the_tiles_encoded_and_marks_the_call_provisional(
    make_napari_viewer, qtbot, tmp_path_factory
):
    from histoscope._widgets.mil import MILWidget
    from histoscope.synthetic import generate

    big = generate(tmp_path_factory.mktemp("big"), kind="he", size=(3072, 3072), seed=6).slide
    viewer = make_napari_viewer()
    viewer.open(str(big), plugin="napari-histoscope")
    widget = MILWidget(viewer)
    worker = widget.run()
    cancel_after_first_step(widget, worker, "MIL tiles")
    qtbot.waitUntil(lambda: widget.worker is None, timeout=180_000)
    res = widget.result
    assert res is not None and res.cancelled, widget.status.text()
    s = res.summary()
    assert 32 <= s["tiles_encoded"] < s["n_tiles"] and s["tiles_encoded"] % 32 == 0
    att = widget.viewer.layers["MIL attention"].data
    assert int(np.isfinite(att).sum()) == s["tiles_encoded"]
    assert "provisional" in widget.prediction.text() and "Cancelled" in widget.status.text()


def test_mil_bags_only_the_tiles_of_the_edited_tissue_mask(widget, qtbot):
    from histoscope._widgets.tumour import TumourWidget

    tumour = TumourWidget(widget.viewer)  # the tissue layer comes from the tumour panel
    assert tumour.run_tissue() is not None
    qtbot.waitUntil(lambda: tumour.worker is None, timeout=120_000)
    tissue = widget.viewer.layers["tissue"]
    detected = tissue.data.copy()
    data = tissue.data.copy()
    data[:, data.shape[1] // 2 :] = 0  # the user erases the right half
    tissue.data = data
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=180_000)
    assert widget.result is not None, widget.status.text()
    g = widget.result.attention.grid
    half_um = data.shape[1] // 2 * tissue.scale[1]
    right = (g.coords[:, 0] + g.stride) * g.slide_mpp > half_um + tissue.scale[1]
    assert not right.any()  # no tile of the erased half entered the bag
    assert len(g) > 0
    # the user undoes the erasure: MIL bags the whole tissue again, not the edit undone
    tissue.data = detected
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=180_000)
    g2 = widget.result.attention.grid
    assert ((g2.coords[:, 0] + g2.stride) * g2.slide_mpp > half_um + tissue.scale[1]).any()
    assert len(g2) > len(g)


def test_edge_tiles_left_out_of_the_bag_are_named_in_the_status(widget, qtbot, tmp_path):
    path = edge_slide(tmp_path)
    widget.viewer.open(str(path), plugin="napari-histoscope")
    widget.layer_combo.setCurrentText("edge.tif")
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=180_000)
    assert widget.result is not None, widget.status.text()
    n = widget.result.summary()["edge_tiles_not_scored"]
    assert n > 0 and f"{n} edge tiles with tissue not scored" in widget.status.text()
