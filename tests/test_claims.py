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
from histoscope.training._claims import Claim, card_value, check_claim, find_claims

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
