"""The report task: the session's feature table in, a report with per-sentence evidence out."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import histoscope as hs
from histoscope.checkpoints import ModelCard, save_checkpoint
from histoscope.models.histgen import HistGen
from histoscope.reports.tokenizer import Tokenizer, clean_report
from histoscope.tasks.mil import registry_features

FEATURES = {"tile_size": 32, "mpp": 4.0}
REPORT = "Specimen: colon. There is infiltrating adenocarcinoma. Necrosis is absent."


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory):
    from histoscope.synthetic import generate

    return generate(tmp_path_factory.mktemp("rep"), "he", (768, 768), seed=5, mpp=1.0).slide


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, slide_path):
    """A tiny HistGen taught to write REPORT from this slide's features."""
    from histoscope.session import open_session

    torch.set_num_threads(1)  # module fixtures run before the per-test one_thread
    fm = registry_features("test_cnn", FEATURES, seed=3)
    torch.manual_seed(0)
    tok = Tokenizer.build([REPORT], 1)
    model = HistGen(fm.feature_dim, tok.to_dict(), d_model=32, n_heads=4, n_layers=3, d_ff=64,
                    dropout=0.0, region_size=8, memory_slots=16, top_k=4, prototypes=8)  # fmt: skip
    session = open_session(slide_path, in_memory=True)
    grid = session.grid(fm.spec.mpp, fm.spec.tile_size, 0.5)
    from histoscope.progress import drive

    feats = torch.from_numpy(drive(session.iter_features(fm, grid)).features)
    target = model.encode_report(REPORT)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(60):
        loss = model.loss(feats, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    card = ModelCard(family="histgen", config=model.config, input_spec=fm.spec.to_dict(),
                     data={"features": fm.descriptor, "trained_on": "one synthetic slide",
                           "min_tissue": 0.5})  # fmt: skip
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "h.safetensors", model.eval(), card)


def test_report_runs_from_the_registry_and_saves_json_and_markdown(
    tmp_path, slide_path, checkpoint
):
    res = hs.tasks.run("report", slide_path, checkpoint=checkpoint)
    assert clean_report(res.text) == clean_report(REPORT)
    assert res.sentences == ("Specimen colon.", "There is infiltrating adenocarcinoma.",
                             "Necrosis is absent.")  # fmt: skip
    assert " ".join(res.sentences) == res.text  # the list reads as the text does
    n = len(res.grid)
    assert res.attention.shape == (3, n)
    np.testing.assert_allclose(res.attention.sum(1), 1.0, atol=1e-5)
    files = {p.name: p for p in res.save(tmp_path)}
    doc = json.loads(files["report.json"].read_text())
    assert (
        "MACHINE-GENERATED" in doc["machine_generated"]
        and doc["trained_on"] == "one synthetic slide"
    )
    assert doc["provenance"]["task"] == "report" and len(doc["attention"]) == 3
    top = doc["sentences"][1]["top_regions"][0]
    i = int(np.argmax(res.attention[1]))
    assert (top["x"], top["y"]) == tuple(int(v) for v in res.grid.coords[i])
    assert top["x_um"] == pytest.approx(top["x"] * res.grid.slide_mpp)
    md = files["report.md"].read_text()
    assert "MACHINE-GENERATED" in md and "Necrosis is absent." in md


def test_the_evidence_layer_of_a_sentence_is_placed_like_the_tile_heatmaps(slide_path, checkpoint):
    res = hs.tasks.run("report", slide_path, checkpoint=checkpoint, beam_size=1)
    (img, kw, kind), (pts, pkw, pkind) = res.to_layers(sentence=2)
    assert kind == "image" and pkind == "points"
    heat = res.heatmap(2)
    assert kw["scale"] == heat.placement()[0] and kw["translate"] == heat.placement()[1]
    r, c = res.grid.index[int(np.argmax(res.attention[2]))]
    assert img[r, c] == pytest.approx(res.attention[2].max())
    assert np.isnan(img).sum() == img.size - len(res.grid)  # background is not "attention 0"
    assert kw["metadata"]["report"]["text"] == "Necrosis is absent."
    with pytest.raises(IndexError):
        res.heatmap(3)


def test_the_report_reads_the_session_feature_table_once(slide_path, checkpoint):
    from histoscope.session import open_session

    session = open_session(slide_path, in_memory=True)
    hs.tasks.run("report", session, checkpoint=checkpoint)
    hs.tasks.run("report", session, checkpoint=checkpoint, beam_size=2)
    assert session.computed["features"] == 1


def test_a_checkpoint_of_another_family_is_refused(slide_path):
    from histoscope._data import sample_data_path
    from histoscope.errors import CheckpointError

    with pytest.raises(CheckpointError):
        hs.tasks.run("report", slide_path, checkpoint=sample_data_path("clam_default.safetensors"))


def test_bad_params_are_refused(slide_path, checkpoint):
    from histoscope.params import ParamError

    with pytest.raises(ParamError, match="beam_size"):
        hs.tasks.run("report", slide_path, checkpoint=checkpoint, beam_size=0)


def test_kept_evidence_shows_the_same_report_again(tmp_path, slide_path, checkpoint):
    from histoscope.reports.store import ReportError
    from histoscope.tasks.report import ReportResult

    res = hs.tasks.run("report", slide_path, checkpoint=checkpoint, beam_size=1)
    back = ReportResult.load_evidence(res.save_evidence(tmp_path / "e.npz"))
    assert back.text == res.text and back.sentences == res.sentences
    np.testing.assert_array_equal(back.attention, res.attention)
    np.testing.assert_array_equal(back.grid.coords, res.grid.coords)
    assert back.evidence(1) == res.evidence(1)
    (img, kw, _), _ = back.to_layers(sentence=1)
    np.testing.assert_array_equal(img, res.to_layers(sentence=1)[0][0])
    assert kw["scale"] == res.to_layers(sentence=1)[0][1]["scale"]
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ReportError, match="bad.npz"):
        ReportResult.load_evidence(tmp_path / "bad.npz")
    with pytest.raises(ReportError, match="missing"):
        ReportResult.load_evidence(tmp_path / "gone.npz")


def test_evidence_that_singles_out_nothing_is_called_not_sentence_specific(
    tmp_path, slide_path, checkpoint
):
    from dataclasses import replace

    from histoscope.reports.store import ReportStore
    from histoscope.tasks.report import NOT_SPECIFIC

    res = hs.tasks.run("report", slide_path, checkpoint=checkpoint, beam_size=1)
    n = len(res.grid)
    # the heatmap runs from attention 0, not from the map's own minimum
    (img, kw, _), _ = res.to_layers(sentence=0)
    assert kw["contrast_limits"] == (0.0, pytest.approx(float(res.attention[0].max())))
    specific = np.full((3, n), 0.1 / n, np.float32)
    specific[[0, 1, 2], [0, 1, 2]] += 0.9
    assert [replace(res, attention=specific).evidence_note(i) for i in range(3)] == [""] * 3
    uniform = np.full((3, n), 1.0 / n, np.float32)
    uniform[0, 0] *= 1.005  # max/min 1.005: still noise
    same = np.repeat(specific[:1], 3, axis=0)
    one_region = replace(res, attention=np.ones((3, 1), np.float32))
    for r, why in [(replace(res, attention=uniform), "near-uniform"),
                   (replace(res, attention=same), "same attention as sentence"),
                   (one_region, "one tissue region")]:  # fmt: skip
        assert r.evidence_note(1).startswith(NOT_SPECIFIC) and why in r.evidence_note(1)
        doc = json.loads(r.save(tmp_path / why)[0].read_text())
        assert NOT_SPECIFIC in doc["evidence_note"]
        assert doc["sentences"][1]["evidence_specific"] is False
        assert NOT_SPECIFIC in (tmp_path / why / "report.md").read_text()
        if r is not one_region:
            assert r.to_layers(sentence=1)[0][1]["metadata"]["report"]["evidence_note"]
    store = ReportStore(tmp_path / "report_edits.jsonl")
    store.add_draft(replace(res, attention=same))
    files = store.export(tmp_path / "out")
    assert NOT_SPECIFIC in files["md"].read_text()
    assert NOT_SPECIFIC in json.loads(files["json"].read_text())["evidence_note"]
