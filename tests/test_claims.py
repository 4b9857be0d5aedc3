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
    check_current,
    check_shown,
    find_claims,
    heading_of,
)

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "benchmarks" / "RESULTS.md", ROOT / "README.md"]
CLAIMS = find_claims(DOCUMENTS)
#: Defaults whose headline figures must be claimed (issue 17: one final test per claim).
MUST_CLAIM = (
    "tumour_patch_default.safetensors",
    "clam_default.safetensors",
    "nuclass_default.safetensors",
)
#: Headline figures the README quotes for the other defaults; each is claimed in README.md and in
#: the current RESULTS.md section, so the two documents and the card cannot disagree.
HEADLINE = {
    "nuclass_default.safetensors": (
        "metrics/final_test/fast/n",
        "metrics/final_test/fast/gated/macro_f1",
        "metrics/final_test/fast/local/macro_f1",
        "metrics/final_test/fast/gated/ece",
        "metrics/final_test/fast/gated/macro_f1_ci95/0",
        "metrics/final_test/seeds/0",
    ),
    "expression_default.safetensors": (
        "metrics/test/model/pcc_8um",
        "metrics/baselines_same_recipe/mse_loss/pcc_8um",
        "metrics/test/shuffled/pcc_8um",
    ),
    "histgen_default.safetensors": (
        "metrics/n_test",
        "metrics/table/histgen/bleu_4",
        "metrics/table/histgen/factual_accuracy",
        "metrics/table/retrieval/factual_accuracy",
    ),
    "isight_default.safetensors": (
        "metrics/heldout_per_case/n",
        "metrics/heldout_per_case/heads/intensity/text/accuracy",
        "metrics/heldout_per_case/heads/location/image/accuracy",
        "metrics/heldout_per_case/heads/quantity/image/accuracy",
    ),
    "ihc_detector_default.safetensors": (
        "metrics/heldout/90002-90162/learned/recall_pos",
        "metrics/heldout/90002-90162/learned/recall_neg",
        "metrics/heldout/95013-95084/learned/recall_pos",
        "metrics/heldout/97004-97161/learned/recall_pos",
        "metrics/heldout/97004-97161/learned/recall_neg",
        "metrics/heldout/97004-97161/classical/recall_neg",
    ),
}


def test_the_defaults_state_their_final_test_figures():
    named = {c.checkpoint for c in CLAIMS}
    assert set(MUST_CLAIM) <= named, f"no claims for {set(MUST_CLAIM) - named}"
    for name in MUST_CLAIM:
        paths = [c.path for c in CLAIMS if c.checkpoint == name]
        assert any(p.startswith("metrics/final_test/") for p in paths), name
        assert any(p.endswith("/seeds/0") for p in paths), f"{name}: say which slides"


@pytest.mark.parametrize("name", sorted(HEADLINE))
def test_readme_and_results_claim_the_headline_figures(name):
    for doc in DOCUMENTS:
        paths = {c.path for c in CLAIMS if c.checkpoint == name and c.source == str(doc)}
        missing = set(HEADLINE[name]) - paths
        assert not missing, f"{doc.name} does not claim {name} {sorted(missing)}"


def test_readme_quotes_only_figures_claimed_in_results():
    """A README claim is also claimed, with the same printed value, in RESULTS.md."""
    in_results = {(c.checkpoint, c.path, c.value) for c in CLAIMS if c.source == str(DOCUMENTS[0])}
    for c in CLAIMS:
        if c.source == str(DOCUMENTS[1]):
            assert (c.checkpoint, c.path, c.value) in in_results, f"README.md:{c.line} {c.path}"


@pytest.mark.parametrize("claim", CLAIMS, ids=[f"{Path(c.source).name}:{c.line}" for c in CLAIMS])
def test_claim_is_in_a_current_section(claim):
    problem = check_current(claim)
    assert problem is None, problem


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
    grouped = "| cells | 1,663 | 11,663 | 21,6630 |\n\n"
    (tmp_path / "n.md").write_text(grouped + "<!-- claim x.safetensors n = 1663 -->\n")
    assert check_shown(find_claims([tmp_path / "n.md"])[0]) is None
    for text in ("| cells | 11,663 |", "| cells | 1,6630 |", "| cells | 1663.5 |"):
        (tmp_path / "n.md").write_text(text + "\n<!-- claim x.safetensors n = 1663 -->\n")
        assert "not shown" in check_shown(find_claims([tmp_path / "n.md"])[0]), text


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


def test_a_claim_in_a_superseded_section_is_caught(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(
        '## Old table (superseded by "New" below)\n\n| a | 0.9 |\n\n'
        "<!-- claim x.safetensors a = 0.9 -->\n\n```\n# a shell comment, not a heading\n```\n"
        "<!-- claim x.safetensors b = 0.9 -->\n\n### New (supersedes the old table)\n\n"
        "| a | 0.8 |\n\n<!-- claim x.safetensors a = 0.8 -->\n"
    )
    old, fenced, new = find_claims([doc])
    assert heading_of(doc, fenced.line).startswith("## Old table")
    assert "superseded section" in check_current(old)
    assert "superseded section" in check_current(fenced)
    assert check_current(new) is None
    assert heading_of(doc, 1) == ""


def test_a_row_claim_must_be_shown_on_its_row(tmp_path):
    from histoscope.training._claims import check_shown, find_claims

    doc = tmp_path / "doc.md"
    table = "| model | sens |\n| --- | --- |\n| CLAM | 0.940 |\n| mean pooling | 0.900 |\n\n"
    doc.write_text(table + '<!-- claim x.safetensors a/b = 0.900 in "CLAM" -->\n'
                   '<!-- claim x.safetensors a/c = 0.900 in "mean pooling" -->\n'
                   '<!-- claim x.safetensors a/d = 0.900 in "HistGen" -->\n')  # fmt: skip
    wrong_row, right_row, no_row = find_claims([doc])
    assert right_row.row == "mean pooling" and check_shown(right_row) is None
    assert "not shown" in check_shown(wrong_row)  # 0.900 is in the table, not on CLAM's row
    assert "no row holding 'HistGen'" in check_shown(no_row)
