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


def _random_cells(n: int, side_um: float = 4000.0, seed: int = 0):
    """A typed CellsResult of ``n`` random cells over a ``side_um`` square (no slide needed)."""
    import pandas as pd

    from histoscope.celltypes import CellTypes
    from histoscope.nuclei import COLUMNS, Nuclei
    from histoscope.results import Provenance
    from histoscope.tasks.cells import CellsResult

    rng = np.random.default_rng(seed)
    classes = ("tumour", "lymphocyte", "fibroblast")
    x, y = rng.uniform(0, side_um / 0.5, n), rng.uniform(0, side_um / 0.5, n)
    ring = np.array([[0, 0], [4, 0], [4, 4], [0, 4]], np.float32)
    nuclei = Nuclei(x=x, y=y, outlines=[ring + (a, b) for a, b in zip(x, y, strict=True)],
                    measurements=pd.DataFrame({c: rng.random(n) for c in COLUMNS}), mpp=0.5)  # fmt: skip

    def probs():
        p = rng.random((n, len(classes))).astype(np.float32) ** 4
        return p / p.sum(1, keepdims=True)

    types = CellTypes(classes, probs(), probs(), probs(), rng.random(n).astype(np.float32))
    return CellsResult(provenance=Provenance(task="cells", slide="random"), nuclei=nuclei,
                       types=types, slide_mpp=0.5, tissue_um2=side_um**2)  # fmt: skip


def test_filtered_cells_are_not_drawn(make_napari_viewer):
    """napari 0.9 draws a 2D layer's points whatever ``shown`` says: hidden cells go transparent."""
    from qtpy.QtCore import Qt

    from histoscope._widgets.cells import CellsWidget

    widget = CellsWidget(make_napari_viewer())
    res = _random_cells(400)
    widget._show(res)
    layer = widget.layer()
    pred = res.calls()["pred"]
    widget.legend.item(1).setCheckState(Qt.Unchecked)
    np.testing.assert_array_equal(layer.shown, pred != 1)
    np.testing.assert_array_equal(layer.face_color[:, 3], (pred != 1).astype(np.float32))
    widget.color_by.setCurrentIndex(1)  # a new colour keeps them hidden, the rim too
    np.testing.assert_array_equal(layer.face_color[:, 3], (pred != 1).astype(np.float32))
    np.testing.assert_array_equal(layer.border_color[:, 3], (pred != 1).astype(np.float32))
    widget.legend.item(1).setCheckState(Qt.Checked)
    assert (layer.face_color[:, 3] == 1).all()


def test_many_cells_draw_an_overview_far_out_and_the_cells_in_view_near(
    make_napari_viewer, monkeypatch, qtbot
):
    from napari.utils.colormaps import ensure_colormap
    from qtpy.QtCore import Qt

    import histoscope._widgets.cells as cells_mod

    monkeypatch.setattr(cells_mod, "POINTS_MAX", 300)
    viewer = make_napari_viewer()
    widget = cells_mod.CellsWidget(viewer)
    side = 4000.0
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    camera.center, camera.zoom = (side / 2, side / 2), min(viewer.canvas.size) / side
    res = _random_cells(3000, side)
    widget._show(res)
    table, ov = widget.layer(), widget.overview()
    # the cells layer holds every cell (features, for the session and export) but is not drawn
    assert len(table.data) == 3000 and len(table.features) == 3000 and not table.visible
    assert ov is not None and ov.opacity == 1 and ov.multiscale and widget._far
    assert widget.drawn() is None  # the points layer comes when there are points to draw
    # each cell paints its pixel of the finest level in its class colour (not an RGB layer:
    # the panels offer those as slides)
    grid, top = widget._grid, ov.data[0]
    assert not ov.rgb and widget.layer_combo.count() == 0
    i = 7
    code = top[grid.iy[i], grid.ix[i]]
    want = res.palette()[res.calls()["pred"][i]] / 255
    np.testing.assert_allclose(ov.colormap.colors[code, :3], want, atol=1e-6)
    assert ov.colormap.colors[0, 3] == 0 and ov.contrast_limits == [0, 255]
    assert max(ov.data[-1].shape[:2]) <= 512 and len(ov.data) > 1
    # each level is placed by napari at exactly twice the pixel of the one before
    want_f = [[2.0**k, 2.0**k] for k in range(len(ov.data))]
    np.testing.assert_allclose(ov.downsample_factors, want_f)
    # zoomed in: the kept cells in the view's window as points, with their rows of the table
    camera.zoom *= 8
    qtbot.waitUntil(lambda: not widget._far, timeout=5000)
    drawn = widget.drawn()
    idx = widget._drawn_idx
    assert 0 < len(drawn.data) == len(idx) <= 300 and ov.opacity == 0  # (hidden: see _drop_display)
    np.testing.assert_allclose(drawn.data, widget._coords[idx])
    np.testing.assert_array_equal(drawn.features["gate"], res.types.g[idx])
    # untick a class: gone from the points and the overview
    pred = res.calls()["pred"]
    widget.legend.item(0).setCheckState(Qt.Unchecked)
    assert not (pred[widget._drawn_idx] == 0).any() and len(widget._drawn_idx)
    assert not table.shown[pred == 0].any()
    kept_px = set(zip(grid.iy[pred != 0].tolist(), grid.ix[pred != 0].tolist(), strict=True))
    alone = [j for j in np.flatnonzero(pred == 0) if (grid.iy[j], grid.ix[j]) not in kept_px]
    assert len(alone) > 100 and not widget.overview().data[0][grid.iy[alone], grid.ix[alone]].any()
    # colour by gate: the drawn points and the overview follow
    widget.color_by.setCurrentIndex(1)
    want = ensure_colormap("viridis").map(res.types.g[widget._drawn_idx])
    np.testing.assert_allclose(widget.drawn().face_color, want, atol=1e-6)
    ov = widget.overview()
    j = int(np.flatnonzero(pred != 0)[0])
    got = ov.colormap.colors[ov.data[0][grid.iy[j], grid.ix[j]]]
    np.testing.assert_allclose(got, ensure_colormap("viridis").map([res.types.g[j]])[0], atol=0.01)
    # far out again: the overview
    camera.zoom /= 8
    qtbot.waitUntil(lambda: widget._far, timeout=5000)
    assert widget.overview().opacity == 1 and len(widget.drawn().data) == 0
    # a new result (a live update, a rerun) keeps the layers that draw the cells
    drawn, ov = widget.drawn(), widget.overview()
    widget._show(_random_cells(2500, side, seed=1))
    assert widget.drawn() is drawn and widget.overview() is ov and len(widget.layer().data) == 2500
    # the new table is what the overview paints (not the old one's cells)
    _assert_overview_paints(widget, widget.result)
    # removing the cells layer removes what drew its cells, and nothing follows the camera
    viewer.layers.remove(cells_mod.LAYER_NAME)
    assert widget.result is None
    qtbot.waitUntil(lambda: cells_mod.OVERVIEW_NAME not in viewer.layers, timeout=5000)
    assert cells_mod.DRAWN_NAME not in viewer.layers
    camera.zoom *= 8
    qtbot.wait(3 * cells_mod.VIEW_REST_MS)
    assert [ly.name for ly in viewer.layers] == []


def _assert_overview_paints(widget, res):
    """The overview's finest level has a pixel painted exactly where ``res``'s kept cells are."""
    from histoscope._widgets._cell_overview import OverviewGrid, overview_um

    coords = res.to_layers("cells")[0][0]
    grid = OverviewGrid(coords, overview_um(coords))
    top = widget.overview().data[0]
    keep = widget._keep
    want = np.zeros(top.shape, bool)
    want[grid.iy[keep], grid.ix[keep]] = True
    assert top.shape == grid.shape
    np.testing.assert_array_equal(top > 0, want)


def test_a_rerun_repaints_the_overview_with_the_new_cells(make_napari_viewer, monkeypatch):
    import histoscope._widgets.cells as cells_mod

    monkeypatch.setattr(cells_mod, "POINTS_MAX", 300)
    viewer = make_napari_viewer()
    widget = cells_mod.CellsWidget(viewer)
    side = 4000.0
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    camera.center, camera.zoom = (side / 2, side / 2), min(viewer.canvas.size) / side
    widget._show(_random_cells(600, side, seed=1))  # a live update: part of the cells
    ov = widget.overview()
    _assert_overview_paints(widget, widget.result)
    final = _random_cells(3000, side, seed=2)  # same extent, same shapes: the old code kept it
    widget._show(final)
    assert widget.overview() is ov
    _assert_overview_paints(widget, final)
    widget._show(_random_cells(100, side, seed=3))  # a small rerun: one points layer
    assert widget.overview() is ov and ov.opacity == 0 and len(widget.layer().data) == 100
    widget._show(final)
    _assert_overview_paints(widget, final)
    assert ov.opacity == 1


def test_a_run_that_finds_no_cells_says_so(make_napari_viewer):
    from histoscope._widgets.cells import CellsWidget

    widget = CellsWidget(make_napari_viewer())
    res = _random_cells(0)
    widget._finished({"cells": res})
    assert widget.status.text() == "No cells found."
    assert len(widget.layer().data) == 0
    widget._show(_random_cells(50))  # and a later run draws its cells
    assert len(widget.layer().data) == 50


_CRASH_SCRIPT = """
import sys, time
import numpy as np, napari
from qtpy.QtWidgets import QApplication
sys.path.insert(0, {root!r})
from tests.widgets.test_cells_widget import _random_cells
import histoscope._widgets.cells as cm

def pump(s):
    t = time.time()
    while time.time() - t < s:
        QApplication.processEvents(); time.sleep(0.01)

side = 10000.0
v = napari.Viewer()
w = cm.CellsWidget(v); v.window.add_dock_widget(w)
cam = v.camera
w._show(_random_cells(200_000, side, seed=1)); pump(0.3)
cam.center = (side / 2, side / 2); cam.zoom = min(v.canvas.size) / side * 30; pump(0.5)
w._show(_random_cells(120_000, side, seed=2)); pump(0.5)
w._show(_random_cells(1000, side, seed=3)); pump(0.5)
w._show(_random_cells(100_000, side, seed=4)); pump(0.5)
v.layers.remove(cm.LAYER_NAME); pump(0.5)
cam.center = (cam.center[0] + 100, cam.center[1]); pump(0.6)
w._show(_random_cells(100_000, side, seed=5)); pump(0.5)
cam.zoom /= 30; pump(0.5)
v.close(); pump(0.3)
print("OK")
"""


def test_rerun_and_removal_sequences_do_not_crash_the_canvas(tmp_path):
    """Reruns big-small-big and removing the cells layer zoomed in, then panning, in a fresh
    process under this Xvfb: layers removed or re-added while hidden crashed Mesa's OpenGL."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    script = tmp_path / "seq.py"
    script.write_text(_CRASH_SCRIPT.format(root=root))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=600, env=env, cwd=root)  # fmt: skip
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_the_display_of_many_cells_is_not_saved_and_the_cells_reopen_visible(
    make_napari_viewer, monkeypatch, qtbot, tmp_path
):
    """The overview and the cells in view draw the ``cells`` layer: not saved, no save per pan;
    the reopened ``cells`` layer is shown (by the panel) instead of looking empty."""
    import dataclasses

    import histoscope._widgets.cells as cells_mod
    from histoscope._widgets._session import AutoSave
    from histoscope.session_store import read_manifest
    from histoscope.slide import write_pyramidal_tiff

    img = np.random.default_rng(3).integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
    slide = write_pyramidal_tiff(tmp_path / "case.tif", img, mpp=0.5, min_size=256)
    monkeypatch.setattr(cells_mod, "POINTS_MAX", 300)
    viewer = make_napari_viewer()
    viewer.open(str(slide), plugin="napari-histoscope")
    saver = AutoSave.for_viewer(viewer)
    widget = cells_mod.CellsWidget(viewer)
    side = 500.0
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    camera.center, camera.zoom = (side / 2, side / 2), min(viewer.canvas.size) / side
    res = _random_cells(3000, side)
    prov = dataclasses.replace(res.provenance, slide=str(slide))  # found on this slide
    res = dataclasses.replace(res, provenance=prov)
    widget._show(res)
    camera.zoom *= 8
    qtbot.waitUntil(lambda: not widget._far, timeout=5000)
    assert widget.overview() is not None and len(widget.drawn().data)
    assert saver.save_now()
    folder = slide.with_name("case.tif.histoscope")
    assert [e["name"] for e in read_manifest(folder)["layers"]] == [cells_mod.LAYER_NAME]
    # a pan redraws the cells in view, and schedules no save
    drawn = widget.drawn().data.copy()
    saver.timer.stop()
    camera.center = (side / 4, side / 4)
    qtbot.waitUntil(lambda: not np.array_equal(widget.drawn().data, drawn), timeout=5000)
    assert not saver.timer.isActive()

    again = make_napari_viewer()
    again.open(str(folder), plugin="napari-histoscope")
    table = again.layers[cells_mod.LAYER_NAME]
    assert len(table.data) == 3000 and not table.visible  # as saved: the panel hid it
    panel = cells_mod.CellsWidget(again)
    assert table.visible and "3,000" in panel.status.text()
    assert [ly.name for ly in again.layers][1:] == [cells_mod.LAYER_NAME]
