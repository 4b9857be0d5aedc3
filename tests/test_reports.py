"""Report data, factual parsing, word-overlap metrics, baselines and the edit store."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass

import numpy as np
import pytest

from histoscope.errors import HistoScopeWarning
from histoscope.features import FeatureFileError, write_features
from histoscope.reports import ReportDataError
from histoscope.reports.baselines import Retrieval, TemplateClassifier, fill_template
from histoscope.reports.data import ReportSample, load_split, read_report_json
from histoscope.reports.facts import factual_accuracy, parse_findings, score_findings
from histoscope.reports.metrics import nlg_metrics
from histoscope.reports.store import Entry, ReportStore


def _findings(seed: int) -> dict:
    """Findings as the synthetic generator records them (drawn, not measured)."""
    from histoscope.synthetic._report import DIAGNOSIS

    rng = np.random.default_rng(seed)
    organ = str(rng.choice(list(DIAGNOSIS)))
    mal = bool(rng.random() < 0.7)
    f = {"organ": organ, "malignant": mal, "diagnosis": DIAGNOSIS[organ] if mal else "no malignancy",
         "tumour_percent": round(float(rng.uniform(1, 80)), 1) if mal else 0.0,
         "necrosis": bool(rng.random() < 0.4), "fat": bool(rng.random() < 0.5),
         "muscle": bool(rng.random() < 0.5), "lymphoid_aggregates": bool(rng.random() < 0.5)}  # fmt: skip
    if mal:
        mm = round(float(rng.uniform(0, 0.6)), 2)
        f.update(tumour_size_mm=round(float(rng.uniform(0.1, 3.0)), 1),
                 pattern=str(rng.choice(["solid", "nested"])),
                 immune_infiltration=str(rng.choice(["brisk", "moderate", "sparse"])),
                 margin_mm=mm, margin="involved" if mm < 0.1 else "clear")  # fmt: skip
    return f


# ------------------------------------------------------------------ the factual parser
def test_parser_reads_every_phrasing_the_generator_writes():
    from histoscope.synthetic._report import write_report

    truths = [_findings(s) for s in range(300)]
    texts = [write_report(f, s) for s, f in enumerate(truths)]
    res = factual_accuracy(texts, truths, texts)
    assert res["overall"] == 1.0
    assert res["per_finding"]["margin"]["n"] == sum(f["malignant"] for f in truths)


def test_a_missing_or_wrong_finding_is_wrong_and_tolerances_hold():
    truth = next(f for f in map(_findings, range(100)) if f["malignant"])
    from histoscope.synthetic._report import write_report

    ref = write_report(truth, 0)
    stated = parse_findings(ref)
    assert all(score_findings(stated, truth, ref).values())
    short = {**stated, "necrosis": None, "tumour_percent": truth["tumour_percent"] + 9.5,
             "tumour_size_mm": truth["tumour_size_mm"] + 0.6}  # fmt: skip
    got = score_findings(short, truth, ref)
    assert got["necrosis"] is False and got["tumour_size_mm"] is False
    assert got.get("tumour_percent", True) is True
    wrong_organ = {**stated, "organ": "skin" if truth["organ"] != "skin" else "lung"}
    assert score_findings(wrong_organ, truth, ref)["organ"] is False


def test_parse_findings_of_a_benign_report():
    f = parse_findings("Specimen: colon. Negative for malignancy. The tissue includes fat.")
    assert (f["organ"], f["diagnosis"], f["malignant"], f["tumour_percent"]) == (
        "colon", "no malignancy", False, 0.0)  # fmt: skip
    assert f["necrosis"] is None and f["margin"] is None


# ------------------------------------------------------------------ word-overlap metrics
def test_nlg_metrics_are_one_on_copies_and_fall_on_other_text():
    refs = ["Specimen: colon. Necrosis is absent. The margin is involved by tumour.",
            "Lung, biopsy: Diagnosis: non-small cell carcinoma. Tumour necrosis is present."]  # fmt: skip
    same = nlg_metrics(refs, refs)
    assert all(v == pytest.approx(1.0, abs=1e-3) for v in same.values())
    other = nlg_metrics(refs[::-1], refs)
    assert other["bleu_4"] < 0.2 and other["rouge_l"] < 0.6 and other["meteor"] < 0.6
    with pytest.raises(ValueError):
        nlg_metrics(refs, refs[:1])


def test_bleu_matches_a_hand_count():
    # one hypothesis, unigram precision 3/4 after cleaning ("a b c ." vs "a b d ."), no brevity penalty
    got = nlg_metrics(["a b c."], ["a b d."])
    assert got["bleu_1"] == pytest.approx(0.75)
    assert got["bleu_2"] == pytest.approx((0.75 * (1 / 3)) ** 0.5)


# ------------------------------------------------------------------ data layout
def test_a_malformed_report_json_names_the_file(tmp_path):
    p = tmp_path / "reports.json"
    p.write_text("{not json")
    with pytest.raises(ReportDataError, match="reports.json is not readable JSON"):
        read_report_json(p)
    p.write_text(json.dumps({"train": [{"id": "a"}]}))
    with pytest.raises(ReportDataError, match=r"reports.json: train\[0\] has no 'report'"):
        read_report_json(p)
    p.write_text(json.dumps([1, 2]))
    with pytest.raises(ReportDataError, match="train'/'val'/'test"):
        read_report_json(p)
    with pytest.raises(ReportDataError, match="does not exist"):
        read_report_json(tmp_path / "missing.json")


def test_a_feature_file_without_features_or_coords_names_the_file(tmp_path):
    import h5py

    (tmp_path / "f").mkdir()
    (tmp_path / "reports.json").write_text(json.dumps({"train": [{"id": "s1", "report": "x."}]}))
    with h5py.File(tmp_path / "f" / "s1.h5", "w") as f:
        f["coords"] = np.zeros((3, 2), np.int64)
    with pytest.raises(FeatureFileError, match=r"s1.h5 has no features"):
        load_split(tmp_path / "reports.json", tmp_path / "f", "train")
    with h5py.File(tmp_path / "f" / "s1.h5", "w") as f:
        f["features"] = np.zeros((3, 4), np.float32)
    with pytest.raises(FeatureFileError, match=r"s1.h5 has no coords"):
        load_split(tmp_path / "reports.json", tmp_path / "f", "train")
    write_features(tmp_path / "f" / "s1.h5", np.ones((3, 4)), np.zeros((3, 2)))
    (s,) = load_split(tmp_path / "reports.json", tmp_path / "f", "train")
    assert s.features.shape == (3, 4) and s.report == "x."


# ------------------------------------------------------------------ baselines
def _samples(n: int, seed: int) -> list[ReportSample]:
    from histoscope.synthetic._report import write_report

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        f = _findings(seed * 1000 + i)
        centre = np.zeros(8)
        centre[0] = 3.0 if f["malignant"] else -3.0
        centre[1] = 3.0 if f.get("necrosis") else -3.0
        feats = centre + rng.normal(0, 0.3, (20, 8))
        out.append(ReportSample(f"s{i}", write_report(f, i), feats, np.zeros((20, 2)), f))
    return out


def test_retrieval_returns_the_nearest_training_report():
    train = _samples(12, 1)
    r = Retrieval(train)
    for s in train:
        assert r(s.features + 0.01) == s.report


def test_template_classifier_learns_separable_findings():
    train, test = _samples(80, 2), _samples(30, 3)
    t = TemplateClassifier(train)
    pred = [t.predict(s.features) for s in test]
    assert (
        np.mean(
            [p["malignant"] == s.findings["malignant"] for p, s in zip(pred, test, strict=True)]
        )
        > 0.9
    )
    text = fill_template({**pred[0], "organ": "lung", "malignant": True})
    assert parse_findings(text)["diagnosis"] == "non small cell carcinoma"


# ------------------------------------------------------------------ the edit store
@dataclass(frozen=True)
class _Prov:
    slide: str = "/data/case.tif"
    checkpoint_sha256: str = "abc"


@dataclass(frozen=True)
class _Res:
    text: str = "Colon. Necrosis is absent."
    trained_on: str = "synthetic slides"
    provenance: _Prov = _Prov()

    def summary(self):
        region = {"rank": 1, "attention": 0.5, "x": 10, "y": 20, "width": 128.0, "height": 128.0,
                  "x_um": 5.0, "y_um": 10.0, "width_um": 64.0, "height_um": 64.0}  # fmt: skip
        return {"sentences": [{"index": 0, "text": "colon", "top_regions": [region]},
                              {"index": 1, "text": "necrosis is absent", "top_regions": [region]}]}  # fmt: skip


def test_edits_are_appended_beside_the_draft_and_survive_a_torn_line(tmp_path):
    path = tmp_path / "report_edits.jsonl"
    store = ReportStore(path)
    with pytest.raises(ValueError, match="no draft"):
        store.add_edit("x")
    store.add_draft(_Res())
    store.add_edit("Colon. Necrosis is present.", user="dr a")
    store.add_edit("Colon. Focal necrosis is present.", user="dr a")
    with open(path, "a") as fh:
        fh.write('{"kind": "edit", "text": "torn')  # a crash mid-write
    with pytest.warns(HistoScopeWarning, match="skipped 1"):
        again = ReportStore(path)
    assert again.draft().text == "Colon. Necrosis is absent."
    assert [e.text for e in again.edits()] == ["Colon. Necrosis is present.",
                                                "Colon. Focal necrosis is present."]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again.add_edit("Final text.")  # starts on a fresh line after the torn one
    with pytest.warns(HistoScopeWarning):
        assert ReportStore(path).current().text == "Final text."
    files = again.export(tmp_path / "out")
    doc = json.loads(files["json"].read_text())
    assert (
        doc["draft"]["text"] == "Colon. Necrosis is absent."
        and doc["edited"]["text"] == "Final text."
    )
    assert doc["draft"]["sentences"][0]["top_regions"][0]["x_um"] == 5.0
    md = files["md"].read_text()
    assert "MACHINE-GENERATED" in md and "Final text." in md and "x=10 y=20" in md


def test_an_unknown_entry_kind_is_refused():
    with pytest.raises(ValueError, match="draft"):
        Entry(kind="note", text="x")


def test_two_drafts_in_the_same_second_keep_their_own_edits(tmp_path, monkeypatch):
    from histoscope.reports import store as store_mod

    monkeypatch.setattr(store_mod, "_now", lambda: "2026-01-01T00:00:00+00:00")
    path = tmp_path / "report_edits.jsonl"
    store = ReportStore(path)
    first = store.add_draft(_Res())
    store.add_edit("Edit of the first draft.")
    second = store.add_draft(_Res(text="Colon. Necrosis is present."))
    assert first.draft_id and second.draft_id and first.draft_id != second.draft_id
    for s in (store, ReportStore(path)):
        assert s.edits() == [] and s.current().text == "Colon. Necrosis is present."
    store.add_edit("Edit of the second draft.")
    again = ReportStore(path)
    assert [e.text for e in again.edits()] == ["Edit of the second draft."]
    assert again.edits()[0].draft_id == second.draft_id


def test_a_file_from_before_draft_ids_is_read_by_position(tmp_path):
    t = "2026-01-01T00:00:00+00:00"
    old = [{"kind": "draft", "text": "First.", "time": t},
           {"kind": "edit", "text": "First, edited.", "draft_time": t, "time": t},
           {"kind": "draft", "text": "Second.", "time": t},
           {"kind": "edit", "text": "Second, edited.", "draft_time": t, "time": t}]  # fmt: skip
    path = tmp_path / "report_edits.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in old))
    store = ReportStore(path)
    assert store.draft().text == "Second."
    assert [e.text for e in store.edits()] == ["Second, edited."]
    store.add_edit("Second, edited again.")
    assert [e.text for e in ReportStore(path).edits()] == ["Second, edited.",
                                                           "Second, edited again."]  # fmt: skip


def test_editing_without_a_draft_is_a_report_error(tmp_path):
    from histoscope.errors import HistoScopeError

    with pytest.raises(HistoScopeError, match="no draft"):
        ReportStore(tmp_path / "r.jsonl").add_edit("x")
