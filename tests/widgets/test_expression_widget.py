"""Expression widget: gene search, Run with progress, Cancel keeping patches, layers over the slide."""

from __future__ import annotations

import numpy as np
import pytest

from tests.widgets._cancel import cancel_after_first_step

GENES = ["EPCAM", "KRT8", "PTPRC", "CD3E", "VIM", "ACTB", "GAPDH"]


@pytest.fixture(scope="module")
def he_slide(tmp_path_factory):
    from histoscope.synthetic import generate

    return generate(tmp_path_factory.mktemp("he"), "he", (512, 512), seed=11, mpp=0.5).slide


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    import torch

    from histoscope.checkpoints import save_checkpoint
    from histoscope.models.expression import ExpressionModel

    torch.manual_seed(0)
    m = ExpressionModel(GENES, scales_um=[2, 8], dim=16, heads=8, widths=(8, 16)).eval()
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "e.safetensors", m,
                           {"family": "expression", "config": m.config})  # fmt: skip


@pytest.fixture
def widget(make_napari_viewer, he_slide, ckpt):
    from histoscope._widgets.expression import ExpressionWidget

    viewer = make_napari_viewer()
    viewer.open(str(he_slide), plugin="napari-histoscope")
    w = ExpressionWidget(viewer)
    w.checkpoint.setText(str(ckpt))
    return w


def test_search_filters_the_genes_and_keeps_the_choice(widget):
    assert widget.genes.count() == len(GENES) and widget.chosen_genes() == ["EPCAM", "KRT8"]
    widget.search.setText("cd")
    shown = [widget.genes.item(i).text() for i in range(widget.genes.count())
             if not widget.genes.item(i).isHidden()]  # fmt: skip
    assert shown == ["CD3E"]
    assert widget.chosen_genes() == ["EPCAM", "KRT8"]  # hidden, still chosen


def test_run_shows_the_chosen_genes_as_layers_on_the_slide(widget, qtbot):
    widget.select_genes(["PTPRC", "VIM", "GAPDH"])
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=180_000)
    assert widget.result is not None, widget.status.text()
    names = ["PTPRC (2 µm)", "VIM (2 µm)", "GAPDH (2 µm)"]
    layers = [widget.viewer.layers[n] for n in names]
    assert all(lyr.multiscale and lyr.blending == "additive" for lyr in layers)
    assert len({lyr.colormap.name for lyr in layers}) == 3
    assert all(tuple(lyr.scale) == (2.0, 2.0) for lyr in layers)
    vim = np.asarray(layers[1].data[0])
    assert np.isfinite(vim).any() and np.isnan(vim).any()  # tissue predicted, background not
    assert "patches predicted" in widget.status.text()


def test_too_many_genes_are_refused_in_the_panel(widget):
    widget.select_genes(GENES)
    assert widget.run() is None and "at most 6 genes" in widget.status.text()


def test_cancel_keeps_the_patches_predicted(make_napari_viewer, he_slide, ckpt, qtbot, tmp_path):
    import shutil

    from histoscope._widgets.expression import ExpressionWidget

    fresh = shutil.copy(he_slide, tmp_path / "fresh.tif")  # its own session folder, no stack yet
    viewer = make_napari_viewer()
    viewer.open(str(fresh), plugin="napari-histoscope")
    widget = ExpressionWidget(viewer)
    widget.checkpoint.setText(str(ckpt))
    worker = widget.run()
    cancel_after_first_step(widget, worker, "expression patches")
    qtbot.waitUntil(lambda: widget.worker is None, timeout=180_000)
    res = widget.result
    assert res is not None and res.cancelled, widget.status.text()
    assert 0 < res.patches["done"] < res.patches["total"]
    assert widget.status.text().startswith("Cancelled")
    assert "EPCAM (2 µm)" in widget.viewer.layers


def test_a_checkpoint_of_another_family_is_refused_at_once(widget, ckpt):
    from histoscope.tasks import get

    other = get("tumour").default_checkpoint_path()
    widget.checkpoint.setText(str(other))
    assert widget.genes.count() == 0
    assert "not an expression one" in widget.status.text()
    assert widget.run() is None and "not an expression one" in widget.status.text()
    widget.checkpoint.setText(str(ckpt))
    assert widget.genes.count() == len(GENES) and widget.status.text() == ""


def test_new_results_update_the_gene_layers_in_place_and_keep_the_users_contrast(
    widget, qtbot, monkeypatch
):
    from dataclasses import replace

    from histoscope.tasks.expression import ExpressionResult

    widget.select_genes(["EPCAM", "KRT8"])
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=180_000)
    res = widget.result
    assert res is not None and set(res.limits) == {"EPCAM", "KRT8"}, widget.status.text()
    mine, auto = widget.viewer.layers["EPCAM (2 µm)"], widget.viewer.layers["KRT8 (2 µm)"]
    assert tuple(auto.contrast_limits) == pytest.approx(res.limits["KRT8"])
    mine.colormap, mine.contrast_limits = "gray", (0.0, 1e-3)  # the user's own
    auto.opacity = 0.5

    def read_on_gui_thread(*_):
        raise AssertionError("contrast measured on the GUI thread")

    monkeypatch.setattr(ExpressionResult, "_measure", read_on_gui_thread)
    limits = {"EPCAM": (0.25, 0.5), "KRT8": (0.125, 0.75)}
    widget._show({"expression": replace(res, limits=limits)})
    assert (
        widget.viewer.layers["EPCAM (2 µm)"] is mine and widget.viewer.layers["KRT8 (2 µm)"] is auto
    )
    assert mine.colormap.name == "gray" and tuple(mine.contrast_limits) == pytest.approx((0, 1e-3))
    assert tuple(auto.contrast_limits) == pytest.approx((0.125, 0.75)) and auto.opacity == 0.5
