"""Co-assessment panel: model bars, measurement, calls saved as they are made."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.widgets._cancel import cancel_after_first_step


@pytest.fixture(scope="module")
def ihc_slide(tmp_path_factory):
    from histoscope.synthetic import generate

    return generate(tmp_path_factory.mktemp("ihc"), kind="ihc", size=(1024, 1024), seed=5).slide


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import torch

    from histoscope.checkpoints import save_checkpoint
    from histoscope.models.isight import ISight

    torch.manual_seed(0)
    model = ISight("test_cnn", ("breast", "colon", "stomach"), dim=16, hidden=8,
                   backbone_kwargs={"tile_size": 64, "mpp": 2.0})  # fmt: skip
    card = {"family": "isight", "config": model.config, "input_spec": model.input_spec.to_dict()}
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "tiny", model, card)


@pytest.fixture
def widget(make_napari_viewer, ihc_slide, checkpoint):
    from histoscope._widgets.coassess import CoAssessWidget

    viewer = make_napari_viewer()
    viewer.open(str(ihc_slide), plugin="napari-histoscope")
    w = CoAssessWidget(viewer)
    w.checkpoint.setText(str(checkpoint))
    return w


def _assess(widget, qtbot):
    worker = widget.run()
    assert worker is not None, widget.status.text()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)  # set by the finished slot


def test_assess_shows_probabilities_measurement_and_attention(widget, qtbot):
    _assess(widget, qtbot)
    rows = widget.rows
    assert rows["tissue"].classes == ("breast", "colon", "stomach")
    total = sum(bar.value() for bar in rows["intensity"].bars.values())
    assert abs(total - 1000) <= 4  # probabilities sum to 1 (per-mille bars, rounded)
    assert rows["intensity"].measurement in ("negative", "weak", "moderate", "strong")
    assert rows["tissue"].measurement is None  # the measurement has no tissue estimate
    assert all(r.call_box.currentIndex() == 0 for r in rows.values())  # never pre-filled
    assert "iSight attention" in widget.viewer.layers


def test_calls_are_saved_as_made_and_agreement_shown(widget, qtbot, ihc_slide):

    _assess(widget, qtbot)
    row = widget.rows["intensity"]
    widget.comment.setText("DAB faint at the edge")
    row.call_box.setCurrentIndex(2)
    row.call_box.activated.emit(2)
    calls = ihc_slide.with_name(ihc_slide.name + ".histoscope") / "calls.jsonl"
    lines = calls.read_text().splitlines()
    saved = json.loads(lines[-1])
    assert saved["task"] == "intensity" and saved["call"] == row.classes[1]
    assert saved["slide"] == ihc_slide.name
    assert saved["model"] == row.model_call and saved["comment"] == "DAB faint at the edge"
    assert "intensity (n=1)" in widget.agreement.text()


def test_wrong_checkpoint_is_reported_and_nothing_is_lost(widget, qtbot, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    widget.checkpoint.setText(str(bad))
    _assess(widget, qtbot)
    assert "bad.safetensors" in widget.status.text()
    assert widget.run_button.isEnabled()
    assert len(widget.viewer.layers) == 1  # the slide is still there


def test_measurement_only_without_checkpoint(widget, qtbot):
    widget.checkpoint.setText("")
    widget.scope.setCurrentIndex(1)  # visible region
    _assess(widget, qtbot)
    assert "measurement only" in widget.status.text()
    assert widget.rows["location"].measurement is not None


def test_cancel_shows_no_phantom_calls_and_keeps_the_panel_usable(widget, qtbot):
    worker = widget.run()
    cancel_after_first_step(widget, worker)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    assert widget.run_button.isEnabled() and "Cancelled" in widget.status.text()
    # the measurement after the model never ran: no estimate is shown for it
    assert all(row.measurement is None for row in widget.rows.values())
    # the model's calls are shown only if all its tiles were read (never from part of them)
    shown = [row.model_call is not None for row in widget.rows.values()]
    assert all(shown) == ("iSight attention" in widget.viewer.layers) and len(set(shown)) == 1


@pytest.mark.parametrize("scaled", [True, False], ids=["shapes-with-slide-scale", "shapes-in-um"])
def test_drawn_shape_is_read_in_slide_pixels_whatever_its_scale(widget, scaled):
    import numpy as np

    image = widget.viewer.layers[0]
    mpp = float(image.scale[-1])
    box_um = np.array([[100.0, 100.0], [100.0, 200.0], [200.0, 200.0], [200.0, 100.0]])
    if scaled:  # drawn while the slide was active: data in level-0 px, scale in µm
        shapes = widget.viewer.add_shapes([box_um / mpp], scale=image.scale, name="roi")
    else:  # a shapes layer of its own: data already in µm
        shapes = widget.viewer.add_shapes([box_um], name="roi")
    widget.viewer.layers.selection.active = shapes
    widget.scope.setCurrentIndex(2)
    slide, layer = widget.chosen_slide(widget.layer_combo)
    region, region_id = widget._region(slide, layer)
    px = round(100 / mpp)
    assert region == (px, px, px, px) and region_id == f"region {px}:{px}:{px}:{px}"


def test_calls_of_images_without_a_file_never_land_in_the_working_directory(tmp_path, monkeypatch):
    import numpy as np

    import histoscope as hs
    from histoscope.coassess import calls_path
    from histoscope.layers import layer_slide

    monkeypatch.setenv("HISTOSCOPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    a = layer_slide(rng.integers(0, 255, (64, 64, 3), np.uint8), {}, (0.5, 0.5), "img")
    b = layer_slide(rng.integers(0, 255, (64, 64, 3), np.uint8), {}, (0.5, 0.5), "img")
    pa = calls_path(hs.open_session(a, in_memory=True))
    pb = calls_path(hs.open_session(b, in_memory=True))
    assert pa != pb  # same name, other pixels: separate records
    assert tmp_path / "cache" in pa.parents and tmp_path / "cache" in pb.parents


def test_no_call_before_assess_and_another_slide_clears_the_panel(widget, qtbot, ihc_slide):
    import getpass

    from histoscope.slide import write_pyramidal_tiff

    assert not any(r.call_box.isEnabled() for r in widget.rows.values())  # nothing assessed yet
    _assess(widget, qtbot)
    row = widget.rows["quantity"]
    assert row.call_box.isEnabled()
    widget.comment.setText("mostly membranous")
    row.call_box.setCurrentIndex(1)
    row.call_box.activated.emit(1)
    saved = widget.session.calls[-1]
    assert saved.comment == "mostly membranous" and widget.comment.text() == ""  # cleared
    assert saved.user == getpass.getuser() and saved.time
    assert len(saved.checkpoint_sha256) == 64
    assert str(widget.session.path) in widget.status.text()  # the full path of the calls file
    # another image in the Slide box: the panel forgets the assessment until Assess
    import numpy as np

    other = write_pyramidal_tiff(ihc_slide.with_name("other.tif"),
                                 np.full((256, 256, 3), 200, np.uint8), mpp=0.5)  # fmt: skip
    widget.viewer.open(str(other), plugin="napari-histoscope")
    widget.layer_combo.setCurrentText("other.tif")
    assert widget.session is None
    assert not any(r.call_box.isEnabled() for r in widget.rows.values())
    assert all(r.model_call is None and r.measurement is None for r in widget.rows.values())


@pytest.fixture(scope="module")
def calibrated_checkpoint(tmp_path_factory):
    """A tiny model whose card hides the tissue head without text and ignores the text."""
    import torch

    from histoscope.checkpoints import save_checkpoint
    from histoscope.models.isight import CASES, TASKS, ISight
    from histoscope.training.isight_calibrate import hidden_line

    torch.manual_seed(0)
    model = ISight("test_cnn", ("breast", "colon", "stomach"), dim=16, hidden=8,
                   backbone_kwargs={"tile_size": 64, "mpp": 2.0})  # fmt: skip
    model.set_temperatures({c: dict.fromkeys(TASKS, 1.0) for c in CASES})
    ok = {"acceptable": True, "accuracy": 0.9, "ece": 0.03}
    cases = {c: {t: dict(ok) for t in TASKS} for c in CASES}
    bad = {"acceptable": False, "accuracy": 0.43, "ece": 0.53, "failed": ["ECE above 0.1"]}
    cases["image"]["tissue"] = {**bad, "hidden_line": hidden_line("tissue", "image", bad)}
    card = {"family": "isight", "config": model.config, "input_spec": model.input_spec.to_dict(),
            "metrics": {"calibration": {"cases": cases},
                        "text_decision": {"heads": {t: {"use_text": False} for t in TASKS}}}}  # fmt: skip
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "calibrated", model, card)


def test_a_head_not_calibrated_for_its_case_shows_why_instead_of_bars(
    widget, qtbot, calibrated_checkpoint, checkpoint
):
    widget.checkpoint.setText(str(calibrated_checkpoint))
    for text in ("", "Tissue: breast. Antibody: HER2."):  # the card ignores the text
        widget.metadata.setText(text)
        _assess(widget, qtbot)
        tissue, line = widget.rows["tissue"], widget.hidden_lines["tissue"]
        assert tissue.model_call is None and all(b.value() == 0 for b in tissue.bars.values())
        assert {b.format() for b in tissue.bars.values()} == {"–"}
        assert line.text() == ("tissue head hidden without clinical text: validation accuracy "
                               "0.43, ECE 0.53 (ECE above 0.1)")  # fmt: skip
        assert not line.isHidden()
        shown = widget.rows["intensity"]
        assert abs(sum(b.value() for b in shown.bars.values()) - 1000) <= 4
        assert widget.hidden_lines["intensity"].isHidden()
    # a call on the hidden head records no model answer beside it
    tissue.call_box.setCurrentIndex(1)
    tissue.call_box.activated.emit(1)
    saved = widget.session.calls[-1]
    assert saved.task == "tissue" and saved.model is None and saved.model_probabilities == {}
    # a checkpoint older than the per-case calibration shows every head
    widget.checkpoint.setText(str(checkpoint))
    _assess(widget, qtbot)
    assert abs(sum(b.value() for b in widget.rows["tissue"].bars.values()) - 1000) <= 4
    assert widget.hidden_lines["tissue"].isHidden()


def _tiny_case_checkpoint(out, *, sharp: bool):
    """The same tiny weights; ``sharp``: the tissue head uses the text at T 0.01 (acceptable,
    a fit at the lower bound on slides all right) and is hidden without it (image T 3.0);
    otherwise every temperature is 1 and every head shown."""
    import torch

    from histoscope.checkpoints import save_checkpoint
    from histoscope.models.isight import CASES, TASKS, ISight
    from histoscope.training.isight_calibrate import hidden_line

    torch.manual_seed(0)
    model = ISight("test_cnn", ("breast", "colon", "stomach"), dim=16, hidden=8,
                   backbone_kwargs={"tile_size": 64, "mpp": 2.0})  # fmt: skip
    temps = {c: dict.fromkeys(TASKS, 1.0) for c in CASES}
    ok = {"acceptable": True, "accuracy": 0.9, "ece": 0.03}
    cases = {c: {t: dict(ok) for t in TASKS} for c in CASES}
    if sharp:
        temps["text"]["tissue"], temps["image"]["tissue"] = 0.01, 3.0
        cases["text"]["tissue"] = {"acceptable": True, "accuracy": 1.0, "ece": 0.0,
                                   "temperature": 0.01, "at_bound": True,
                                   "sharp_at_lower_bound": True}  # fmt: skip
        bad = {"acceptable": False, "accuracy": 0.43, "ece": 0.53, "failed": ["ECE above 0.1"]}
        cases["image"]["tissue"] = {**bad, "hidden_line": hidden_line("tissue", "image", bad)}
    model.set_temperatures(temps)
    heads = {t: {"use_text": t == "tissue"} for t in TASKS}
    card = {
        "family": "isight",
        "config": model.config,
        "input_spec": model.input_spec.to_dict(),
        "metrics": {"calibration": {"cases": cases}, "text_decision": {"heads": heads}},
    }
    return save_checkpoint(out / ("sharp" if sharp else "plain"), model, card)


def _tissue(widget) -> tuple[dict, dict]:
    """The tissue head's entry in the attention layer's calls, and its bars (per mille)."""
    (layer,) = [lay for lay in widget.viewer.layers if "calls" in lay.metadata]
    return layer.metadata["calls"]["tissue"], {
        c: b.value() for c, b in widget.rows["tissue"].bars.items()
    }


def test_the_tissue_head_uses_the_text_naming_the_organ_at_its_with_text_temperature(
    widget, qtbot, tmp_path
):
    sharp, plain = (_tiny_case_checkpoint(tmp_path, sharp=s) for s in (True, False))
    runs = {}
    for name, ck in (("sharp", sharp), ("plain", plain)):
        for text in ("Tissue: colon. Antibody: HER2.", ""):
            widget.checkpoint.setText(str(ck))
            widget.metadata.setText(text)
            _assess(widget, qtbot)
            runs[name, bool(text)] = (*_tissue(widget), widget.hidden_lines["tissue"].isHidden())
    # with text naming the organ: the tissue bars are shown, from the with-text case
    entry, bars, line_hidden = runs["sharp", True]
    assert entry["case"] == "text" and entry["shown"] and line_hidden
    assert abs(sum(bars.values()) - 1000) <= 4
    assert bars == {c: round(1000 * p) for c, p in entry["probabilities"].items()}
    # ... divided by the with-text temperature (0.01): softmax(log p(T=1) / 0.01)
    ref = runs["plain", True][0]
    assert ref["case"] == "text"
    logp = np.log(np.array(list(ref["probabilities"].values()), np.float64))
    want = np.exp((logp - logp.max()) / 0.01)
    got = np.array(list(entry["probabilities"].values()))
    assert np.allclose(got, want / want.sum(), atol=2e-3), (got, want / want.sum())
    # without text: the image-only head, hidden here by its rule, shown where acceptable
    entry, bars, line_hidden = runs["sharp", False]
    assert entry["case"] == "image" and not entry["shown"] and not line_hidden
    assert set(bars.values()) == {0}
    entry, bars, line_hidden = runs["plain", False]
    assert entry["case"] == "image" and entry["shown"] and line_hidden
    assert abs(sum(bars.values()) - 1000) <= 4


def test_a_slide_outside_the_training_data_gets_the_red_line(widget, qtbot, ihc_slide, checkpoint):
    from dataclasses import replace

    import histoscope as hs
    from histoscope._widgets._common import OUTSIDE_TRAINING_TEXT
    from histoscope.checkpoints import load_checkpoint
    from histoscope.ood import OutsideTrainingDataWarning, fit_reference
    from histoscope.tasks.isight import run_isight

    _assess(widget, qtbot)  # the tiny checkpoint has no reference: a grey line says so
    flag = widget.controls.training_data_flag
    assert not flag.isHidden() and flag.text().startswith("Training-data check not done: no ")
    assert "e04040" not in flag.styleSheet()
    model, card = load_checkpoint(checkpoint, family="isight")
    rng = np.random.default_rng(0)
    far = [rng.normal(25.0, 1.0, (12, 16)) for _ in range(6)]  # training tiles unlike these
    card = replace(
        card, data={**(card.data or {}), "ood": fit_reference(far[:3], far[3:]).to_dict()}
    )
    with pytest.warns(OutsideTrainingDataWarning):
        calls = run_isight(hs.open_slide(ihc_slide), model, card, max_tiles=8)
    widget._show_calls(calls)
    assert not flag.isHidden() and flag.text() == OUTSIDE_TRAINING_TEXT
    assert "threshold" in flag.toolTip()
