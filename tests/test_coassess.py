"""Co-assessment session: append-only calls, crash safety, agreement."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from histoscope.coassess import Call, Session, agreement_stats, cohen_kappa, session_path
from histoscope.errors import HistoScopeWarning


def test_calls_are_on_disk_as_soon_as_recorded(tmp_path):
    s = Session.for_slide(tmp_path / "case.svs")
    s.record(Call("case.svs", "intensity", "moderate", model="strong", measurement="moderate"))
    lines = session_path(tmp_path / "case.svs").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["call"] == "moderate"


def test_session_survives_a_crash_mid_session(tmp_path):
    path = tmp_path / "s.jsonl"
    code = (
        "import os\n"
        "from histoscope.coassess import Call, Session\n"
        f"s = Session({str(path)!r})\n"
        "s.record(Call('a.svs', 'intensity', 'weak'))\n"
        "s.record(Call('a.svs', 'location', 'nuclear'))\n"
        'with open(s.path, \'a\') as fh: fh.write(\'{"slide": "a.svs", "task": "qua\')\n'
        "os._exit(1)  # killed: no clean shutdown, a torn last line\n"
    )
    subprocess.run([sys.executable, "-c", code], check=False)
    with pytest.warns(HistoScopeWarning, match="1 unreadable line"):
        s = Session(path)
    assert [(c.task, c.call) for c in s.calls] == [("intensity", "weak"), ("location", "nuclear")]
    s.record(Call("a.svs", "quantity", ">75%"))  # the session carries on after the crash
    with pytest.warns(HistoScopeWarning, match="1 unreadable line"):
        again = Session(path)
    assert [c.call for c in again.calls] == ["weak", "nuclear", ">75%"]


def test_last_call_wins_and_history_is_kept(tmp_path):
    s = Session(tmp_path / "s.jsonl")
    s.record(Call("a.svs", "intensity", "weak"))
    s.record(Call("a.svs", "intensity", "strong", comment="re-read at 40x"))
    assert len(s.calls) == 2
    [latest] = s.latest().values()
    assert latest.call == "strong" and latest.comment == "re-read at 40x"


def test_no_call_by_default():
    with pytest.raises(ValueError, match="no call is made by default"):
        Call("a.svs", "intensity", "")


def test_agreement_and_disagreements(tmp_path):
    s = Session(tmp_path / "s.jsonl")
    for i, (call, model, meas) in enumerate(
        [
            ("weak", "weak", "weak"),
            ("strong", "moderate", "strong"),
            ("negative", "negative", "weak"),
            ("moderate", "moderate", "moderate"),
        ]  # fmt: skip
    ):
        s.record(Call(f"s{i}.svs", "intensity", call, model=model, measurement=meas))
    ag = s.agreement()["intensity"]
    assert (
        ag["n"] == 4 and ag["model"]["accuracy"] == 0.75 and ag["measurement"]["accuracy"] == 0.75
    )
    assert {c.slide for c in s.disagreements()} == {"s1.svs", "s2.svs"}
    files = s.export(tmp_path / "out")
    assert files["csv"].read_text().count("\n") == 5
    assert json.loads(files["json"].read_text())["agreement"]["intensity"]["n"] == 4


def test_cohen_kappa_reference_values():
    # Hand-computed: po = 0.7, pe = 0.5*0.6 + 0.5*0.4 = 0.5 -> kappa = 0.4
    a = ["y"] * 5 + ["n"] * 5
    b = ["y", "y", "y", "y", "n", "y", "y", "n", "n", "n"]
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(a, a) == 1.0
    assert cohen_kappa([], []) is None
    assert agreement_stats(["x"], ["x"]) == {"n": 1, "accuracy": 1.0, "kappa": 1.0}
    with pytest.raises(ValueError, match="different numbers"):
        cohen_kappa(["a"], ["a", "b"])


def test_a_call_on_a_hidden_head_counts_against_no_model_answer(tmp_path):
    s = Session.for_slide(tmp_path / "case.svs")
    s.record(Call("case.svs", "tissue", "colon", model=None, measurement=None))  # bars hidden
    s.record(Call("case.svs", "intensity", "weak", model="strong"))
    agree = s.agreement()
    assert agree["tissue"]["n"] == 1 and agree["tissue"]["model"]["n"] == 0
    assert agree["intensity"]["model"]["n"] == 1
    assert [c.task for c in s.disagreements()] == ["intensity"]
