"""The expression recipe end to end on a tiny synthetic set: card, held-out table, evaluate."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from histoscope.synthetic import write_dataset

    root = tmp_path_factory.mktemp("expr_data")
    write_dataset(root, "he", (384, 384), seed=50, count=3, mpp=1.0, extras=True)
    return root


RECIPE = {
    "family": "expression",
    "data": {"path": None, "max_patches": 24},
    "model": {"scales_um": [2, 8], "dim": 16, "heads": 8, "widths": [8, 16], "loss": "zinb"},
    "augment": {"flips": True, "hed_sigma": 0.1, "hed_bias": 0.02},
    "train": {"epochs": 1, "batch": 8, "lr": 1e-3, "num_threads": 1},
    "eval": {"ssim": False},
    "out": None,
}


def test_the_recipe_trains_and_the_card_holds_the_held_out_table(tiny_data, tmp_path):
    from histoscope.checkpoints import load_checkpoint
    from histoscope.training import evaluate, run

    recipe = {**RECIPE, "data": {**RECIPE["data"], "path": str(tiny_data)}, "out": str(tmp_path)}
    out = run(recipe)
    model, card = load_checkpoint(out["checkpoint"], family="expression")
    test = card.metrics["test"]
    assert card.data["synthetic"] and "not validated on real tissue" in card.data["note"]
    assert len(card.classes) >= 50 and model.genes == list(card.classes)
    assert card.input_spec["patch_um"] == 32 and card.input_spec["views"][1]["mpp"] == 1.0
    for part in ("model", "shuffled"):
        assert {"pcc_2um", "pcc_8um", "pcc_16um", "mse_2um"} <= set(test[part])
    assert test["n_patches"] > 0 and "all_neighbourhood_pcc_8um" in test["neighbourhood"]
    again = evaluate(out["checkpoint"], tiny_data, tmp_path / "eval", ssim=False)
    assert again["model"]["pcc_8um"] == pytest.approx(test["model"]["pcc_8um"], abs=1e-3)
    assert (tmp_path / "eval" / "metrics.json").is_file()
    blind = evaluate(out["checkpoint"], tiny_data, tmp_path / "blind", ssim=False,
                     blind_context=True)  # fmt: skip
    assert blind["blind_context"] and blind["model"]["pcc_8um"] != again["model"]["pcc_8um"]


def test_unknown_recipe_keys_and_missing_data_are_named(tmp_path):
    from histoscope.expression import ExpressionDataError
    from histoscope.training import run
    from histoscope.training._recipe import RecipeError

    bad = {**RECIPE, "data": {"path": str(tmp_path), "max_patchez": 3}, "out": str(tmp_path)}
    with pytest.raises(RecipeError, match="data.max_patchez"):
        run(bad)
    empty = {**RECIPE, "data": {"path": str(tmp_path / "none")}, "out": str(tmp_path)}
    with pytest.raises(ExpressionDataError, match="no manifest.json"):
        run(empty)
