"""iSight per-case calibration, the hidden-head rule and the clinical-text decision."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from histoscope.checkpoints import ModelCard, read_card
from histoscope.errors import CheckpointError
from histoscope.models.isight import CASES, TASKS, ISight
from histoscope.tasks.isight import ISightParams, head_status, run_isight, text_heads
from histoscope.training.isight_calibrate import (
    BOUNDS,
    ECE_MAX,
    calibrate_cases,
    decide_text,
    head_entry,
    mcnemar,
    wilson,
)

ROOT = Path(__file__).resolve().parents[2]


def test_wilson_and_mcnemar_match_hand_computed_values():
    lo, hi = wilson(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    assert wilson(0, 50)[0] == 0.0 and wilson(50, 50)[1] == pytest.approx(1.0)
    # 9 slides only A got right, 1 only B: two-sided exact p = 2 * (1 + 10) / 2**10
    res = mcnemar(np.r_[np.ones(9), 0, np.ones(5)], np.r_[np.zeros(9), 1, np.ones(5)])
    assert res == {"only_a": 9, "only_b": 1, "p": pytest.approx(22 / 1024)}
    assert mcnemar(np.ones(4), np.ones(4))["p"] == 1.0


def _labels_from(logits: np.ndarray, seed: int) -> np.ndarray:
    """Labels drawn from softmax(logits): those logits are calibrated by construction."""
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    rng = np.random.default_rng(seed)
    return np.array([rng.choice(len(r), p=r) for r in p])


def test_an_overconfident_head_is_cooled_a_sharp_one_kept_a_blind_one_refused():
    rng = np.random.default_rng(0)
    true = rng.normal(0, 2.0, (600, 4))
    y = _labels_from(true, 1)
    cooled = head_entry(true * 5, y, temperature=5.0, n_boot=50)  # what the fit should find
    assert cooled["acceptable"] and cooled["ece"] <= ECE_MAX
    assert not cooled["at_bound"] and not cooled["sharp_at_lower_bound"]
    # a head that is always right with a huge margin: the fit runs to the lower bound, which
    # says the head is sharp and right (the tissue head given the organ), not a failed fit
    sep = np.eye(4)[y] * 50
    entry = calibrate_cases({c: {t: sep for t in TASKS} for c in CASES},
                            np.repeat(y[:, None], len(TASKS), 1), n_boot=20)["cases"]["image"]["intensity"]  # fmt: skip
    assert entry["at_bound"] and entry["temperature"] == pytest.approx(BOUNDS[0])
    assert entry["sharp_at_lower_bound"] and entry["acceptable"] and entry["failed"] == []
    # logits that know nothing of the label: not clearly above chance
    blind = head_entry(rng.normal(0, 0.1, (600, 4)), y, temperature=1.0, n_boot=50)
    assert not blind["acceptable"] and any("chance" in w for w in blind["failed"])


def test_a_fit_at_the_lower_bound_with_errors_or_at_the_upper_bound_is_refused():
    rng = np.random.default_rng(5)
    y = rng.integers(1, 4, 400)
    sep = np.eye(4)[y] * 0.05  # right with a small margin: the fit runs to the lower bound
    # 5 % of its slides wrong by a tie with class 0 (argmax takes the first): a tie costs
    # the same at every temperature, so the fit still runs down
    wrong = rng.choice(400, 20, replace=False)
    tied = sep.copy()
    tied[wrong, 0] = 0.05
    cal = calibrate_cases({c: {t: tied for t in TASKS} for c in CASES},
                          np.repeat(y[:, None], len(TASKS), 1), n_boot=20)  # fmt: skip
    entry = cal["cases"]["text"]["tissue"]
    assert entry["at_bound"] and entry["temperature"] == pytest.approx(BOUNDS[0])
    assert entry["accuracy"] == pytest.approx(0.95)
    assert not entry["sharp_at_lower_bound"] and not entry["acceptable"]
    assert (
        "lower bound" in entry["hidden_line"] and "5% of the slides wrong" in entry["hidden_line"]
    )
    # one slide in 100 wrong is still "nearly every slide"; more is not
    for n_wrong, ok in ((4, True), (5, False)):
        z = sep.copy()
        z[wrong[:n_wrong], 0] = 0.05
        assert head_entry(z, y, temperature=BOUNDS[0], n_boot=20)["acceptable"] is ok, n_wrong
    # at the upper bound a head is never acceptable, however right its argmax
    hot = head_entry(sep, y, temperature=BOUNDS[1], n_boot=20)
    assert hot["accuracy"] == 1.0 and hot["at_bound"] and not hot["acceptable"]
    assert any("upper bound" in w for w in hot["failed"])


def test_temperatures_are_fitted_per_case():
    rng = np.random.default_rng(2)
    true = rng.normal(0, 2.0, (500, 4))
    y = np.repeat(_labels_from(true, 3)[:, None], len(TASKS), 1)
    raw = {"text": {t: true * 0.5 for t in TASKS}, "image": {t: true * 4.0 for t in TASKS}}
    cal = calibrate_cases(raw, y, n_boot=20)
    for t in TASKS:  # the fit undoes each case's own scale
        assert cal["temperatures"]["text"][t] == pytest.approx(0.5, rel=0.2)
        assert cal["temperatures"]["image"][t] == pytest.approx(4.0, rel=0.2)
        assert cal["cases"]["image"][t]["acceptable"]


def test_text_is_used_only_where_it_clearly_helps_and_its_case_is_acceptable():
    rng = np.random.default_rng(4)
    n = 300
    y = rng.integers(0, 4, (n, len(TASKS)))
    good = {t: np.eye(4)[y[:, j]] * 3 + rng.normal(0, 1, (n, 4)) for j, t in enumerate(TASKS)}
    poor = {t: np.eye(4)[y[:, j]] * 0.8 + rng.normal(0, 1, (n, 4)) for j, t in enumerate(TASKS)}
    text = {t: good[t] if t in ("intensity", "tissue") else poor[t] for t in TASKS}
    raw = {"text": text, "image": poor}
    cal = calibrate_cases(raw, y, n_boot=20)
    cal["cases"]["text"]["tissue"]["acceptable"] = False  # as when its fit sits at a bound
    dec = decide_text(raw, y, cal, n_boot=500)
    assert dec["uses_text"] == ["intensity"]
    assert dec["heads"]["intensity"]["difference_ci"][0] > 0
    assert not dec["heads"]["tissue"]["use_text"]  # helps, but not calibrated with text


# ---------------------------------------------------------------- the task
def _card(model, *, use_text: bool, tissue_ok: bool = True) -> ModelCard:
    entry = {"acceptable": True, "accuracy": 0.9, "ece": 0.03}
    cases = {c: {t: dict(entry) for t in TASKS} for c in CASES}
    cases["image"]["tissue"] = {"acceptable": tissue_ok, "accuracy": 0.43, "ece": 0.53,
                                "hidden_line": "tissue head hidden without clinical text: "
                                               "validation accuracy 0.43, ECE 0.53"}  # fmt: skip
    heads = {t: {"use_text": use_text} for t in TASKS}
    return ModelCard(family="isight", config=model.config,
                     metrics={"calibration": {"cases": cases},
                              "text_decision": {"heads": heads}})  # fmt: skip


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = ISight("test_cnn", ("breast", "colon"), dim=16, hidden=8,
               backbone_kwargs={"tile_size": 64, "mpp": 2.0}).eval()  # fmt: skip
    m.set_temperatures({"text": dict.fromkeys(TASKS, 0.5), "image": dict.fromkeys(TASKS, 3.0)})
    return m


def _spy(model, monkeypatch) -> list:
    seen = []
    real = model.classify

    def classify(h, mask=None, meta_tokens=None, cell_type=None):
        seen.append(meta_tokens)
        return real(h, mask, meta_tokens, cell_type)

    monkeypatch.setattr(model, "classify", classify)
    return seen


def test_the_default_never_gives_the_model_text_when_the_card_says_ignore(
    pyramid_tiff, model, monkeypatch
):
    import histoscope as hs

    seen = _spy(model, monkeypatch)
    slide = hs.open_slide(pyramid_tiff)
    card = _card(model, use_text=False)
    res = run_isight(slide, model, card, metadata="Tissue: breast. Antibody: HER2.", max_tiles=6)
    assert seen and all(tokens is None for tokens in seen)
    assert {h["case"] for h in res.heads.values()} == {"image"}
    assert res.summary()["text"] == {"given": True, "mode": "auto", "used_by": [], "notes": []}
    # the same slide and text with text="always": the model does get the text
    seen.clear()
    forced = run_isight(slide, model, card, metadata="Tissue: breast.", text="always", max_tiles=6)
    assert any(tokens is not None for tokens in seen)
    assert forced.heads["intensity"]["case"] == "text"
    # and the probabilities follow each case's temperature: hotter without text
    assert max(res.probabilities["location"].values()) < max(
        forced.probabilities["location"].values()
    )


def test_a_head_not_acceptable_in_its_case_is_hidden_with_the_reason(pyramid_tiff, model):
    import histoscope as hs

    slide = hs.open_slide(pyramid_tiff)
    res = run_isight(slide, model, _card(model, use_text=True, tissue_ok=False), max_tiles=6)
    want = "tissue head hidden without clinical text: validation accuracy 0.43, ECE 0.53"
    assert res.summary()["hidden"] == {"tissue": want}
    calls = res.calls()
    assert not calls["tissue"]["shown"] and calls["tissue"]["hidden"] == want
    assert calls["intensity"]["shown"] and calls["intensity"]["case"] == "image"
    # with the text, the tissue head is in the text case, which is acceptable
    told = run_isight(slide, model, _card(model, use_text=True, tissue_ok=False),
                      metadata="Tissue: colon.", max_tiles=6)  # fmt: skip
    assert told.summary()["hidden"] == {} and told.heads["tissue"]["case"] == "text"


def test_case_rules_and_bad_cards_are_named(model):
    old = ModelCard(family="isight", config=model.config)  # before issue 11 / 17
    assert text_heads(old, TASKS, given=True) == set(TASKS)
    assert head_status(old, "tissue", "image")["shown"]
    assert text_heads(_card(model, use_text=True), TASKS, given=False) == set()
    assert text_heads(_card(model, use_text=True), TASKS, given=True, mode="never") == set()
    bad = replace(old, metrics={"calibration": {"cases": {"image": {"tissue": {"ece": 0.1}}}}})
    with pytest.raises(CheckpointError, match="calibration"):
        head_status(bad, "tissue", "image")
    with pytest.raises(CheckpointError, match="text_decision"):
        text_heads(replace(old, metrics={"text_decision": {"heads": {}}}), TASKS, given=True)
    with pytest.raises(ValueError, match="text"):
        ISightParams(text="sometimes")


# ------------------------------------------------- the shipped card and its note
def _rows(md: str, header: str) -> list[list[str]]:
    """Cells of the Markdown table whose header row starts with ``header``."""
    lines = md.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(header))
    rows = []
    for ln in lines[start + 2 :]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip("|").split("|")])
    return rows


def _nums(cell: str) -> list[float]:
    return [float(v) for v in re.findall(r"[-+]?\d+\.\d+", cell)]


def test_the_default_card_and_training_note_give_the_same_calibration_and_decision():
    card = read_card(ROOT / "sample_data" / "isight_default.safetensors")
    cal, dec = card.metrics["calibration"], card.metrics["text_decision"]
    assert card.config["temperatures"] == cal["temperatures"]
    md = (ROOT / "training" / "isight.md").read_text()
    rows = _rows(md, "| head | case | temperature |")
    assert len(rows) == 2 * len(TASKS)
    for head, case, temp, acc, ece, ok in rows:
        e = cal["cases"]["text" if case == "with text" else "image"][head]
        assert _nums(temp) == [round(e["temperature"], 3)]
        assert _nums(acc) == [round(v, 3) for v in (e["accuracy"], *e["accuracy_ci"])]
        assert _nums(ece) == [round(v, 3) for v in (e["ece"], *e["ece_ci"])]
        assert ok.startswith("yes") == e["acceptable"]
    rows = _rows(md, "| head | val accuracy with text |")
    assert [r[0] for r in rows] == list(TASKS)
    for head, with_text, alone, diff, p_value, uses in rows:
        h = dec["heads"][head]
        assert _nums(with_text) == [round(h["accuracy_text"], 3)]
        assert _nums(alone) == [round(h["accuracy_image"], 3)]
        assert _nums(diff) == [round(v, 3) for v in (h["difference"], *h["difference_ci"])]
        assert p_value == f"{h['mcnemar']['p']:.3g}"
        assert uses.startswith("yes") == h["use_text"]


def test_slides_are_scored_against_the_training_tile_features(pyramid_tiff, model):
    import histoscope as hs
    from histoscope.ood import OutsideTrainingDataWarning, fit_reference
    from histoscope.tasks.isight import tile_features
    from histoscope.training.isight_data import collate, read_bag

    slide = hs.open_slide(pyramid_tiff)
    bag = read_bag(pyramid_tiff, model.input_spec, max_tiles=24)
    with torch.no_grad():
        feats = tile_features(model.encode_tiles(collate([bag], model.input_spec)[0])[0].numpy())
    rng = np.random.default_rng(0)
    near = [feats[rng.choice(len(feats), 12)] for _ in range(6)]
    card = _card(model, use_text=False)
    within = replace(card, data={"ood": fit_reference(near[:3], near[3:]).to_dict()})
    res = run_isight(slide, model, within, max_tiles=24)
    assert res.summary()["outside_training_data"] is False
    far = [f + 25.0 for f in near]  # training tiles unlike anything on this slide
    outside = replace(card, data={"ood": fit_reference(far[:3], far[3:]).to_dict()})
    with pytest.warns(OutsideTrainingDataWarning, match="pyramid.tif"):
        res = run_isight(slide, model, outside, max_tiles=24)
    assert res.summary()["outside_training_data"] is True
    assert res.provenance.params["ood"]["outside"] is True
    # a card without a reference says so instead of guessing
    assert run_isight(slide, model, card, max_tiles=4).summary()["outside_training_data"] is None


def test_results_md_gives_the_cards_fresh_held_out_figures():
    card = read_card(ROOT / "sample_data" / "isight_default.safetensors")
    held = card.metrics["heldout_per_case"]
    md = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    md = md[md.index("### Fresh held-out, per case (issue 11/17)") :]
    assert f"{held['n']} fresh slides, seeds {held['seeds'][0]}-{held['seeds'][1]}" in md
    rows = _rows(md, "| head | case | n | accuracy")
    assert len(rows) == 2 * len(TASKS)
    for head, case, n, acc, ece in rows:
        h = held["heads"][head]
        s = h[case.split()[0]]
        assert ("(default)" in case) == (case.split()[0] == h["default_case"])
        assert int(n) == s["n"] == held["n"]
        assert _nums(acc) == [round(v, 3) for v in (s["accuracy"], *s["accuracy_ci"])]
        assert _nums(ece) == [round(v, 3) for v in (s["ece"], *s["ece_ci"])]
    rows = _rows(md, "| head | text - image accuracy")
    for head, diff, only_text, only_image, p_value in rows:
        h = held["heads"][head]
        assert _nums(diff) == [round(v, 3) for v in (h["difference"], *h["difference_ci"])]
        m = h["mcnemar_text_vs_image"]
        assert (int(only_text), int(only_image), p_value) == (m["only_a"], m["only_b"],
                                                                f"{m['p']:.3g}")  # fmt: skip
    # the shipped training-data reference and its flag rate on these slides
    assert card.data["ood"]["threshold"] > 0
    ood = held["outside_training_data"]
    rate = ood["flagged"] / ood["n"]
    assert ood["n"] == held["n"] and rate <= 0.03  # about 1 % expected on training-like slides
    assert f"flags **{ood['flagged']} ({100 * rate:.1f} %" in md


def test_readme_quotes_the_cards_default_case_figures():
    held = read_card(ROOT / "sample_data" / "isight_default.safetensors").metrics[
        "heldout_per_case"
    ]
    row = next(ln for ln in (ROOT / "README.md").read_text().splitlines()
               if ln.startswith("| iSight on ") and "fresh IHC slides" in ln)  # fmt: skip
    assert f"{held['n']} fresh IHC slides (seeds {held['seeds'][0]}-{held['seeds'][1]})" in row
    for head in ("intensity", "location", "quantity"):
        h = held["heads"][head]
        s = h[h["default_case"]]
        lo, hi = s["accuracy_ci"]
        assert f"{head} {s['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]" in row


def test_every_family_fits_temperatures_in_the_wide_range_and_can_flag_a_bound():
    from histoscope.training import metrics as M

    assert BOUNDS == M.TEMPERATURE_BOUNDS == (0.01, 100.0)
    rng = np.random.default_rng(7)
    y = rng.integers(0, 3, 300)
    sharp = np.eye(3)[y] * 0.05  # always right: the NLL falls all the way to the lower end
    t = M.fit_temperature(sharp, y)  # the default range, as nuclass calls it
    assert t == pytest.approx(0.01) and M.temperature_at_bound(t)
    blind = rng.normal(0, 3.0, (300, 3))  # knows nothing: flattened to the upper end
    t = M.fit_temperature(blind, y)
    assert t == pytest.approx(100.0, rel=1e-3) and M.temperature_at_bound(t)
    assert not M.temperature_at_bound(1.0) and M.temperature_at_bound(0.05, (0.05, 20.0))
    # the shipped NuClass temperatures sit inside both the old and the new range, so the
    # wider default would fit them the same (no shipped card changes)
    temps = read_card(ROOT / "sample_data" / "nuclass_default.safetensors").metrics["temperature"]
    assert all(0.05 * 1.001 < v < 20 / 1.001 for v in temps.values()), temps
