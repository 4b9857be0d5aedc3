"""Every figure a document claims for a shipped checkpoint is the one in that checkpoint's card.

Claims are HTML comments next to the human tables in ``benchmarks/RESULTS.md`` and
``README.md`` (``<!-- claim FILE CARD/PATH = VALUE -->``, see
:mod:`histoscope.training._claims`); any family adds its own by writing them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from histoscope._data import sample_data_path
from histoscope.checkpoints import read_card
from histoscope.training._claims import (
    Claim,
    annotated_text,
    card_value,
    check_claim,
    check_shown,
    find_claims,
)

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "benchmarks" / "RESULTS.md", ROOT / "README.md"]
CLAIMS = find_claims(DOCUMENTS)
#: Defaults whose headline figures must be claimed (issue 17: one final test per claim).
MUST_CLAIM = ("tumour_patch_default.safetensors", "clam_default.safetensors")


def test_the_defaults_state_their_final_test_figures():
    named = {c.checkpoint for c in CLAIMS}
    assert set(MUST_CLAIM) <= named, f"no claims for {set(MUST_CLAIM) - named}"
    for name in MUST_CLAIM:
        paths = [c.path for c in CLAIMS if c.checkpoint == name]
        assert any(p.startswith("metrics/final_test/") for p in paths), name
        assert any(p.endswith("/seeds/0") for p in paths), f"{name}: say which slides"


@pytest.mark.parametrize("claim", CLAIMS, ids=[f"{Path(c.source).name}:{c.line}" for c in CLAIMS])
def test_claim_matches_the_card(claim):
    card = read_card(sample_data_path(claim.checkpoint)).to_dict()
    problem = check_claim(card, claim)
    assert problem is None, problem


@pytest.mark.parametrize("claim", CLAIMS, ids=[f"{Path(c.source).name}:{c.line}" for c in CLAIMS])
def test_claim_is_the_figure_shown(claim):
    """The marker's value appears, as printed, in the table or paragraph it annotates."""
    problem = check_shown(claim)
    assert problem is None, problem


def test_a_changed_visible_figure_is_caught(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(
        "Intro 0.5.\n\n| m | 0.960 | 10.96 | seeds 41000-41029 |\n| n | 0.5 |\n\n"
        "<!-- claim x.safetensors a = 0.960 -->\n<!-- claim x.safetensors b = 41000 -->\n"
        "<!-- claim x.safetensors c = 0.96 -->\n<!-- claim x.safetensors d = 0.97 -->\n"
    )
    a, b, c, d = find_claims([doc])
    assert annotated_text(doc, c.line).startswith("| m | 0.960 |")
    assert check_shown(a) is None and check_shown(b) is None
    assert "not shown" in check_shown(c)  # 0.96 is neither 0.960 nor 10.96
    assert "not shown" in check_shown(d)
    doc.write_text(doc.read_text().replace("| m | 0.960 |", "| m | 0.950 |"))
    assert "not shown" in check_shown(find_claims([doc])[0])


def test_a_wrong_or_missing_figure_is_caught(tmp_path):
    card = {"metrics": {"final_test": {"auc": 0.98765, "n": {"tumour": 50}, "seeds": [7, 8]}}}
    ok = Claim("doc.md", 3, "x.safetensors", "metrics/final_test/auc", "0.988")
    assert check_claim(card, ok) is None
    assert check_claim(card, Claim("doc.md", 4, "x", "metrics/final_test/auc", "0.987"))
    assert check_claim(card, Claim("doc.md", 5, "x", "metrics/final_test/n/tumour", "50")) is None
    assert "no 'sens'" in check_claim(card, Claim("doc.md", 6, "x", "metrics/final_test/sens", "1"))
    assert card_value(card, "metrics/final_test/seeds/1") == 8
    text = "| a | 0.988 |\n<!-- claim x.safetensors metrics/final_test/auc = 0.988 -->\n"
    (tmp_path / "doc.md").write_text(text)
    (found,) = find_claims([tmp_path / "doc.md"])
    assert (found.line, found.path, found.value) == (2, "metrics/final_test/auc", "0.988")
