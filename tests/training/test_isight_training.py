"""iSight training on a handful of tiny synthetic IHC slides: train, resume, load, evaluate."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

import histoscope
from histoscope.models.backbones import InputSpec
from histoscope.models.isight import TASKS
from histoscope.synthetic._dataset import write_dataset
from histoscope.training import isight_data
from histoscope.training.isight import meta_tokens, train
from histoscope.training.isight_data import (
    MISSING,
    BagCache,
    collate,
    encode_labels,
    read_table,
)
from histoscope.training.isight_report import evaluate

SPEC = InputSpec(tile_size=32, mpp=2.0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("ihc")
    write_dataset(out, kind="ihc", size=(256, 256), seed=11, count=7)
    return out


def _recipe(dataset, epochs=2):
    return {
        "family": "isight",
        "data": {"path": str(dataset / "hpa.csv"), "max_tiles": 8},
        "model": {
            "backbone": "test_cnn",
            "backbone_kwargs": {},
            "dim": 16,
            "hidden": 8,
            "meta_buckets": 64,
        },  # fmt: skip
        "augment": {"tiles_per_bag": 3},
        "train": {"epochs": epochs, "batch": 2, "seed": 3},
        "out": "unused",
    }


def _write_table(path, rows):
    fields = ["image_path", "metadata", *TASKS, "split"]
    with open(path, "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=fields)
        wr.writeheader()
        for r in rows:
            wr.writerow({**dict.fromkeys(fields, ""), **r})


def test_read_table_resolves_paths_and_labels(dataset):
    samples = read_table(dataset)
    assert len(samples) == 7
    assert all(s.image.is_file() for s in samples)
    assert {s.split for s in samples} == {"train", "val", "test"}
    assert all(s.metadata.startswith("Tissue:") for s in samples)
    test = read_table(dataset / "hpa.csv", split="test")
    assert test and all(s.split == "test" for s in test)


def test_labels_accept_aliases_and_missing_values(tmp_path):
    good = {"image_path": "a.tif", "intensity": "Strong", "location": "nuclear",
            "quantity": "25%-75%", "tissue": "colon", "malignancy": "tumour"}  # fmt: skip
    _write_table(tmp_path / "t.csv", [good, {**good, "quantity": ""}])
    samples = read_table(tmp_path / "t.csv")
    assert samples[0].image == tmp_path / "a.tif"
    classes = {"intensity": ("negative", "weak", "moderate", "strong"),
               "location": ("none", "cytoplasmic/membranous", "nuclear", "x"),
               "quantity": ("none", "<25%", "25-75%", ">75%"), "tissue": ("colon", "skin"),
               "malignancy": ("normal", "cancer")}  # fmt: skip
    y = encode_labels(samples, classes)
    np.testing.assert_array_equal(y[0], [3, 2, 2, 0, 1])
    assert y[1, TASKS.index("quantity")] == MISSING


def test_unknown_label_names_the_row(tmp_path):
    ok = {"image_path": "a.tif", "intensity": "weak", "location": "nuclear", "quantity": "none",
          "tissue": "colon", "malignancy": "normal"}  # fmt: skip
    _write_table(
        tmp_path / "t.csv", [ok, {**ok, "image_path": "b.tif", "intensity": "very strong"}]
    )
    classes = {t: ("weak", "nuclear", "none", "colon", "normal") for t in TASKS}
    with pytest.raises(ValueError, match=r"row 2 \(b.tif\): intensity 'very strong'"):
        encode_labels(read_table(tmp_path / "t.csv"), classes)
    with pytest.raises(ValueError, match="no split column"):
        (tmp_path / "u.csv").write_text("image_path," + ",".join(TASKS) + "\na.tif,,,,,\n")
        read_table(tmp_path / "u.csv", split="test")
    (tmp_path / "v.csv").write_text("image_path,intensity\na.tif,weak\n")
    with pytest.raises(ValueError, match="missing column"):
        read_table(tmp_path / "v.csv")


def test_bags_are_cached_on_disk(dataset, tmp_path, monkeypatch):
    sample = read_table(dataset)[0]
    bag = BagCache(SPEC, max_tiles=8, cache_dir=tmp_path).get(sample)
    assert bag.dtype == np.uint8 and bag.shape[1:] == (32, 32, 3) and 1 <= len(bag) <= 8

    def no_reads(*args, **kwargs):
        raise AssertionError("slide read again")

    monkeypatch.setattr(isight_data, "read_bag", no_reads)
    np.testing.assert_array_equal(BagCache(SPEC, 8, cache_dir=tmp_path).get(sample), bag)
    with pytest.raises(AssertionError, match="read again"):  # another spec is another bag
        BagCache(InputSpec(tile_size=16, mpp=2.0), 8, cache_dir=tmp_path).get(sample)


def test_recipe_keys_are_checked(dataset, tmp_path):
    from histoscope.training import RecipeError

    bad = _recipe(dataset)
    bad["augment"]["tile_per_bag"] = 2
    with pytest.raises(RecipeError, match="augment.tile_per_bag"):
        train(bad, tmp_path)
    bad = _recipe(dataset)
    bad["model"]["loss_weight"] = {}
    with pytest.raises(RecipeError, match="model.loss_weight"):
        train(bad, tmp_path)
    bad = _recipe(dataset)
    bad["data"]["tissue"] = {"chanel": "grey"}
    with pytest.raises(RecipeError, match="data.tissue.chanel"):
        train(bad, tmp_path)
    bad["data"]["tissue"] = {"background_margin": 2.0}
    with pytest.raises(RecipeError, match="background_margin"):
        train(bad, tmp_path)


def test_tissue_detection_is_recorded_and_reused(dataset, tmp_path):
    from histoscope.tasks.isight import LEGACY_TISSUE, card_tissue, run_isight
    from histoscope.tissue import TissueParams

    recipe = _recipe(dataset, epochs=1)
    recipe["data"]["tissue"] = {"channel": "grey", "background_margin": 0.08}
    recipe["eval"] = {"split": None}
    res = train(recipe, tmp_path / "t")
    model, card = histoscope.load_checkpoint(res["checkpoint"])
    assert card_tissue(card) == TissueParams(channel="grey", background_margin=0.08)
    assert card_tissue(None) == LEGACY_TISSUE
    slide = histoscope.open_slide(read_table(dataset)[0].image)
    calls = run_isight(slide, model, card)
    assert calls.provenance.params["tissue"]["background_margin"] == 0.08
    with pytest.raises(histoscope.CheckpointError, match="data.tissue"):
        card_tissue(replace(card, data={**card.data, "tissue": {"channel": "hue"}}))


def test_collate_pads_masks_and_normalises():
    bags = [np.full((3, 4, 4, 3), 255, np.uint8), np.zeros((1, 4, 4, 3), np.uint8)]
    spec = InputSpec(tile_size=4, mpp=1.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x, mask = collate(bags, spec)
    assert x.shape == (2, 3, 3, 4, 4)
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    assert torch.all(x[0] == 1.0) and torch.all(x[1, 0] == -1.0) and torch.all(x[1, 1:] == 0)
    x, mask = collate(bags, spec, n_tiles=2, generator=torch.Generator().manual_seed(0))
    assert x.shape[1] == 2 and mask.all()  # the 1-tile bag is drawn twice, not padded
    assert torch.all(x[0] == 1.0) and torch.all(x[1] == -1.0)


def test_meta_tokens_fit_the_model_buckets():
    from histoscope.models.isight import ISight

    model = ISight("test_cnn", ["a"], dim=8, hidden=4, meta_buckets=16)
    tokens = meta_tokens(model, ["Tissue: colon. Antibody: Ki-67.", None])
    assert int(tokens.max()) < 16 and int(tokens[1].max()) == 0
    assert meta_tokens(model, [None, ""]) is None


def test_train_resume_load_and_evaluate(dataset, tmp_path):
    whole = train(_recipe(dataset), tmp_path / "whole")

    class Stop(Exception):
        pass

    steps_per_epoch = -(-len(read_table(dataset, split="train")) // 2)

    def stop_after_first_epoch(step, total):
        if step > steps_per_epoch:  # epoch 1 was saved; stop during epoch 2
            raise Stop

    with pytest.raises(Stop):
        train(_recipe(dataset), tmp_path / "cut", progress=stop_after_first_epoch)
    assert not (tmp_path / "cut" / "isight.safetensors").exists()
    seen = []
    resumed = train(_recipe(dataset), tmp_path / "cut", progress=lambda *a: seen.append(a))
    assert seen[-1] == (steps_per_epoch, steps_per_epoch)  # only the second epoch ran
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]

    model, card = histoscope.load_checkpoint(resumed["checkpoint"])
    ref, _ = histoscope.load_checkpoint(whole["checkpoint"])
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    assert card.family == "isight"
    assert card.data["n_train"] == len(read_table(dataset, split="train"))
    assert set(card.metrics["temperature"]) == set(TASKS)
    np.testing.assert_allclose(
        model.temperature.numpy(), [card.metrics["temperature"][t] for t in TASKS], rtol=1e-6
    )
    # both cases calibrated on the validation split, and the model uses them
    cal = card.metrics["calibration"]
    assert model.per_case and card.config["temperatures"] == cal["temperatures"]
    assert cal["temperatures"]["text"] == card.metrics["temperature"]
    n_val = len(read_table(dataset, split="val"))
    assert {e["n"] for c in cal["cases"].values() for e in c.values()} == {n_val}
    assert set(card.metrics["text_decision"]["heads"]) == set(TASKS)
    # the held-out split was evaluated after training and recorded in the card
    assert card.metrics["test"]["n_samples"] == len(read_table(dataset, split="test"))
    assert set(card.metrics["test_measurement"]) == {"intensity", "location", "quantity"}
    assert (tmp_path / "cut" / "eval" / "metrics.json").exists()

    res = evaluate(resumed["checkpoint"], dataset, tmp_path / "eval")
    n_test = len(read_table(dataset, split="test"))
    files = {p.name for p in (tmp_path / "eval").iterdir()}
    assert {"predictions.csv", "metrics.csv", "metrics.json"} <= files
    for t in TASKS:
        assert {f"confusion_{t}.png", f"confusion_{t}_normalised.png"} <= files
        assert np.sum(res["confusion"][t]["counts"]) == n_test
        assert {"accuracy", "balanced_accuracy", "weighted_f1", "ece"} <= set(res["model"][t])
    assert set(res["measurement"]) == {"intensity", "location", "quantity"}
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n_samples"] == n_test
    with open(tmp_path / "eval" / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == n_test
    assert "quantity_logit[>75%]" in rows[0] and rows[0]["intensity_true"]
    with open(tmp_path / "eval" / "metrics.csv", newline="") as fh:
        sources = {r["source"] for r in csv.DictReader(fh)}
    assert sources == {"model", "model_image_only", "model_default", "measurement"}
    every = evaluate(resumed["checkpoint"], dataset, tmp_path / "all", split="all", measure=False)
    assert every["n_samples"] == 7 and "measurement" not in every
