"""Report widget with the embedded HistGen default on a small synthetic slide."""

from __future__ import annotations

import json

import numpy as np
import pytest

from histoscope._data import sample_data_path


@pytest.fixture(scope="module")
def he_slide(tmp_path_factory):
    from histoscope.synthetic import generate

    return generate(tmp_path_factory.mktemp("he"), kind="he", size=(1024, 1024), seed=3,
                    mpp=1.0).slide  # fmt: skip


@pytest.fixture(autouse=True)
def no_modal_question(monkeypatch):
    """Generating over kept edits asks; a test answers Yes unless it says otherwise."""
    from histoscope._widgets.report import ReportWidget

    monkeypatch.setattr(ReportWidget, "ask_replace", lambda self, n: True)


@pytest.fixture
def widget(make_napari_viewer, he_slide):
    from histoscope._widgets.report import ReportWidget

    viewer = make_napari_viewer()
    viewer.open(str(he_slide), plugin="napari-histoscope")
    return ReportWidget(viewer)


def test_generate_show_evidence_edit_and_export(widget, qtbot, tmp_path):
    assert "MACHINE-GENERATED" in widget.banner.text() and "synthetic" in widget.banner.text()
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=180_000)
    res = widget.result
    assert res is not None, widget.status.text()
    assert widget.editor.toPlainText() == res.text
    assert widget.sentences.count() == len(res.sentences) >= 1
    assert all(s[:1].isupper() and s.endswith(".") for s in res.sentences)
    # the first sentence's evidence is on the slide and the view is on its top region
    layer = widget.viewer.layers["report evidence: sentence 1"]
    assert np.nanmax(layer.data) == pytest.approx(res.attention[0].max())
    assert tuple(layer.contrast_limits) == pytest.approx((0.0, float(res.attention[0].max())))
    top = res.evidence(0)[0]
    g = res.grid
    v = widget.viewer
    camera = v.scene.camera if hasattr(v, "scene") else v.camera
    assert camera.center[-1] == pytest.approx((top["x"] + g.stride / 2) * g.slide_mpp)
    if len(res.sentences) > 1:
        widget.sentences.setCurrentRow(1)
        assert "report evidence: sentence 2" in widget.viewer.layers
        assert "report evidence: sentence 1" not in widget.viewer.layers
        again = widget.viewer.layers["report evidence: sentence 2"]
        assert again is layer  # the same layer refilled (napari 0.9.2 colour-bar crash)
        assert np.nanmax(again.data) == pytest.approx(res.attention[1].max())
    # a sentence whose map singles out nothing says so in the panel
    from dataclasses import replace

    flat = np.full_like(res.attention, 1.0 / len(res.grid))
    widget.result = replace(res, attention=flat)
    widget.show_sentence(0)
    assert "not sentence-specific" in widget.evidence_label.text()
    widget.result = res
    widget.show_sentence(0)
    assert "not sentence-specific" not in widget.evidence_label.text() or res.evidence_note(0)
    # the pathologist edits: kept at once beside the untouched draft
    widget.editor.setPlainText("Edited by the pathologist.")
    qtbot.waitUntil(lambda: "Edit saved" in widget.saved.text(), timeout=5_000)
    lines = [json.loads(x) for x in widget.store.path.read_text().splitlines()]
    assert [x["kind"] for x in lines] == ["draft", "edit"]
    assert lines[0]["text"] == res.text and lines[1]["text"] == "Edited by the pathologist."
    widget.editor.setPlainText("Edited twice.")
    assert widget.save_edit()
    assert len(widget.store.path.read_text().splitlines()) == 3
    files = widget.export(str(tmp_path))
    doc = json.loads(files["json"].read_text())
    assert doc["draft"]["text"] == res.text and doc["edited"]["text"] == "Edited twice."
    assert doc["draft"]["sentences"][0]["top_regions"][0]["x"] == top["x"]
    assert "MACHINE-GENERATED" in files["md"].read_text()


def test_checkpoint_of_another_family_is_reported(make_napari_viewer, fresh_slide, qtbot):
    widget = _report_widget(make_napari_viewer, fresh_slide)  # a slide without a kept draft
    widget.picker.edit.setText(str(sample_data_path("clam_default.safetensors")))
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert "histgen" in widget.status.text() and widget.result is None
    assert widget.save_edit() is False  # nothing to edit yet


@pytest.fixture
def fresh_slide(tmp_path):
    from histoscope.synthetic import generate

    return generate(tmp_path / "slide", kind="he", size=(768, 768), seed=4, mpp=1.0).slide


def _report_widget(make_napari_viewer, slide):
    from histoscope._widgets.report import ReportWidget

    viewer = make_napari_viewer()
    viewer.open(str(slide), plugin="napari-histoscope")
    return ReportWidget(viewer)


def _generate(widget, qtbot):
    assert widget.run() is not None, widget.status.text()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=180_000)
    assert widget.result is not None, widget.status.text()
    return widget.result


def test_a_restart_brings_back_the_edit_and_evidence_and_regenerating_asks(
    make_napari_viewer, fresh_slide, qtbot, tmp_path, monkeypatch
):
    first = _report_widget(make_napari_viewer, fresh_slide)
    res = _generate(first, qtbot)
    first.editor.setPlainText("Edited before the restart.")
    first.show()
    first.hide()  # hiding the panel keeps the typing at once (no waiting for the pause)
    assert first.store.current().text == "Edited before the restart."

    # a restart: a new viewer and panel on the same slide
    again = _report_widget(make_napari_viewer, fresh_slide)
    assert again.editor.toPlainText() == "Edited before the restart."
    assert again.sentences.count() == len(res.sentences)
    assert again.result is not None and again.result.sentences == res.sentences
    np.testing.assert_allclose(again.result.attention, res.attention, atol=1e-6)
    assert "report evidence: sentence 1" in again.viewer.layers
    again.editor.setPlainText("Typed just before closing.")
    again.close()
    assert again.store.current().text == "Typed just before closing."

    # generating again over the edit asks first; No keeps everything as it is
    asked = []
    monkeypatch.setattr(type(again), "ask_replace", lambda self, n: asked.append(n) or False)
    n_lines = len(again.store.path.read_text().splitlines())
    assert again.run() is None and asked == [2]
    assert len(again.store.path.read_text().splitlines()) == n_lines
    assert again.editor.toPlainText() == "Typed just before closing."
    doc = json.loads(again.export(str(tmp_path / "kept"))["json"].read_text())
    assert doc["edited"]["text"] == "Typed just before closing."
    # Yes: a new draft replaces the edit in the editor and the export
    monkeypatch.setattr(type(again), "ask_replace", lambda self, n: True)
    _generate(again, qtbot)
    assert again.editor.toPlainText() == again.result.text
    doc = json.loads(again.export(str(tmp_path / "new"))["json"].read_text())
    assert doc["edited"] is None and doc["n_edits"] == 0
    # closing the slide saves pending typing and clears its report from the panel
    again.editor.setPlainText("Typed, then the slide was closed.")
    slide_layer = again.layer_combo.layer()
    store = again.store
    again.viewer.layers.remove(slide_layer)
    assert store.current().text == "Typed, then the slide was closed."
    assert again.store is None and again.editor.toPlainText() == ""
    assert not [ly for ly in again.viewer.layers if ly.name.startswith("report evidence")]
