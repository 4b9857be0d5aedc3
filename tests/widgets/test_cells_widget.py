"""Cells widget: find and type cells, legend filters, recolour, outlines, explain a click, Cancel."""

from __future__ import annotations

import numpy as np
import pytest

from tests.widgets._cancel import cancel_after_first_step


@pytest.fixture(scope="module")
def he_slide(tmp_path_factory):
    from histoscope.synthetic import generate

    return generate(tmp_path_factory.mktemp("he"), kind="he", size=(1024, 1024), seed=8).slide


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    import torch

    from histoscope.checkpoints import ModelCard, save_checkpoint
    from histoscope.models.nuclass import NuClass

    torch.manual_seed(1)
    classes = ["tumour", "lymphocyte", "fibroblast", "plasma_cell"]
    model = NuClass({"classes": classes, "tissues": ["unknown"]})
    card = ModelCard(family="nuclass", config=model.config, classes=tuple(classes))
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "nc.safetensors", model, card)


@pytest.fixture
def widget(make_napari_viewer, he_slide, ckpt):
    from histoscope._widgets.cells import CellsWidget

    viewer = make_napari_viewer()
    viewer.open(str(he_slide), plugin="napari-histoscope")
    w = CellsWidget(viewer)
    w.checkpoint.setText(str(ckpt))
    w.scope.setCurrentIndex(3)  # the whole (small) slide
    return w


def test_cells_legend_filters_recolour_outlines_and_explain(widget, qtbot):
    from qtpy.QtCore import Qt

    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=180_000)
    res = widget.result
    assert res is not None and res.n_cells > 50, widget.status.text()
    layer = widget.viewer.layers["cells"]
    assert len(layer.data) == res.n_cells and f"{res.n_cells:,} cells" in widget.status.text()
    assert widget.legend.count() == len(res.classes)
    # untick the most common class: its cells are hidden, the others stay
    counts = np.bincount(res.types.pred, minlength=len(res.classes))
    k = int(np.argmax(counts))
    widget.legend.item(k).setCheckState(Qt.Unchecked)
    assert not layer.shown[res.types.pred == k].any() and layer.shown[res.types.pred != k].all()
    widget.legend.item(k).setCheckState(Qt.Checked)
    widget.disagree.setChecked(True)
    np.testing.assert_array_equal(layer.shown, res.types.local_pred != res.types.global_pred)
    widget.disagree.setChecked(False)
    widget.min_conf.setValue(0.5)
    np.testing.assert_array_equal(layer.shown, res.types.confidence >= 0.5)
    widget.min_conf.setValue(0.0)
    # colour by gate: low and high g get different colours
    widget.color_by.setCurrentIndex(1)
    lo, hi = int(np.argmin(res.types.g)), int(np.argmax(res.types.g))
    assert not np.allclose(layer.face_color[lo], layer.face_color[hi])
    widget.color_by.setCurrentIndex(0)
    np.testing.assert_allclose(
        layer.face_color[:, :3], res.palette()[res.types.pred] / 255, atol=1e-6
    )
    # outlines of the cells in view
    out = widget.show_outlines()
    assert out is not None and out.data.max() > 0
    # explain the cell nearest a point, for the class the panel shows
    i = res.n_cells // 2
    um = res.slide_mpp
    worker = widget.explain_at(res.nuclei.y[i] * um + 1, res.nuclei.x[i] * um)
    assert worker is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert f"Cell {i}:" in widget.explained.text(), widget.status.text()
    assert f"Grad-CAM for {res.classes[res.types.pred[i]]}" in widget.explained.text()
    assert widget.status.text() == f"Cell {i} explained."
    assert all(not lab.pixmap().isNull() for lab in widget.crops)
    # a hidden cell cannot be clicked: the nearest shown one is explained instead, or none
    k = int(res.types.pred[i])
    widget.legend.item(k).setCheckState(Qt.Unchecked)
    assert widget.explain_at(res.nuclei.y[i] * um, res.nuclei.x[i] * um) is None or (
        qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000) is None
        and f"Cell {i}:" not in widget.explained.text()
    )
    # a detect-only rerun shows every cell again, whatever was filtered
    widget.typing.setChecked(False)
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=180_000)
    assert widget.result.types is None and widget.layer().shown.all()


def test_bad_checkpoint_and_missing_region_are_reported(widget, qtbot, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    widget.checkpoint.setText(str(bad))
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert "bad.safetensors" in widget.status.text() and widget.result is None
    widget.scope.setCurrentIndex(2)  # the drawn region, but nothing is drawn
    assert widget.run() is None and "Draw" in widget.status.text()


def test_cancel_keeps_the_cells_found(make_napari_viewer, qtbot, tmp_path_factory, ckpt):
    from histoscope._widgets.cells import CellsWidget
    from histoscope.synthetic import generate

    big = generate(tmp_path_factory.mktemp("big"), kind="he", size=(2048, 2048), seed=9).slide
    viewer = make_napari_viewer()
    viewer.open(str(big), plugin="napari-histoscope")
    widget = CellsWidget(viewer)
    widget.checkpoint.setText(str(ckpt))
    widget.scope.setCurrentIndex(3)
    worker = widget.run()
    cancel_after_first_step(widget, worker, "cell tiles")
    qtbot.waitUntil(lambda: widget.worker is None, timeout=180_000)
    res = widget.result
    assert res is not None and res.cancelled, widget.status.text()
    grid = res.provenance.tile_grid
    assert grid["tiles_done"] < grid["tiles"] and res.n_cells > 0
    assert len(widget.viewer.layers["cells"].data) == res.n_cells
    assert "Cancelled" in widget.status.text()


def test_the_panel_scrolls_instead_of_clipping_in_a_short_dock(widget, qtbot):
    from qtpy.QtWidgets import QScrollArea

    scroll = widget.findChild(QScrollArea)
    assert scroll is not None and scroll.widget().isAncestorOf(widget.explained)
    widget.resize(600, 300)
    widget.show()
    qtbot.waitExposed(widget)
    assert scroll.verticalScrollBar().maximum() > 0  # the rest is reachable by scrolling
    assert scroll.horizontalScrollBar().maximum() == 0
