"""Family ``clam``: HDF5 feature files, bags with truth, training with resume, evaluation."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from histoscope.features import FeatureFileError
from histoscope.training import RecipeError
from histoscope.training.clam import attention_auc, settings
from histoscope.training.clam_data import (
    Bag,
    read_features,
    tile_tumour_fraction,
    write_features,
)

FEATURES = {"backbone": "test_cnn", "backbone_kwargs": {"tile_size": 32, "mpp": 4.0}, "seed": 0}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Six 640 x 640 slides at 1 µm/px: benign, focus and extensive tumours."""
    from histoscope.synthetic._dataset import write_dataset

    root = tmp_path_factory.mktemp("clam_data")
    write_dataset(root, size=(640, 640), seed=0, count=6, mpp=1.0)
    return root


def recipe(dataset, out, **train):
    return {
        "family": "clam",
        "data": {"path": str(dataset), "cache": str(out / "cache")},
        "model": {"hidden": 8, "attn_hidden": 4, "k_sample": 2, "features": FEATURES},
        "train": {"epochs": 2, "lr": 1e-3, "optimiser": "adam", **train},
        "out": str(out),
    }


def test_feature_files_round_trip_in_the_clam_layout(tmp_path):
    import h5py

    feats = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    xy = np.arange(10).reshape(5, 2) * 128
    path = write_features(tmp_path / "s.h5", feats, xy, {"patch_size": 128, "mpp": 1.0})
    with h5py.File(path) as f:  # what CLAM's and TRIDENT's readers open
        assert f["features"].shape == (5, 3) and f["coords"].shape == (5, 2)
        assert f["coords"].attrs["patch_size"] == 128
    f2, xy2, attrs = read_features(path)
    np.testing.assert_array_equal(f2, feats)
    np.testing.assert_array_equal(xy2, xy)
    assert attrs["mpp"] == 1.0
    # a TRIDENT-style (1, N, D) file, and a file without coords
    with h5py.File(tmp_path / "t.h5", "w") as f:
        f["features"] = feats[None]
        f["coords"] = xy
    assert read_features(tmp_path / "t.h5")[0].shape == (5, 3)
    with h5py.File(tmp_path / "u.h5", "w") as f:
        f["features"] = feats
    with pytest.raises(FeatureFileError, match="no coords"):
        read_features(tmp_path / "u.h5")
    with pytest.raises(ValueError, match="coords"):
        write_features(tmp_path / "v.h5", feats, xy[:3])


def test_tile_tumour_fraction_reads_the_mask_under_each_tile():
    mask = np.zeros((16, 16), bool)  # 16 µm/px -> 256 µm
    mask[0:8, 8:16] = True  # top-right quarter
    coords = np.array([[0, 0], [128, 0], [128, 64], [0, 128]])  # level-0 px at 1 µm/px
    frac = tile_tumour_fraction(mask, 16.0, coords, 128.0, 1.0)
    np.testing.assert_allclose(frac, [0.0, 1.0, 0.5, 0.0])


def test_attention_auc_scores_tiles_against_the_mask():
    def bag(name, label, frac):
        frac = np.asarray(frac, np.float32)
        return Bag(name, np.zeros((len(frac), 2), np.float32), np.zeros((len(frac), 2)), label,
                   frac, "x", 0.1)  # fmt: skip

    bags = [bag("a", 1, [1, 0, 0, 0.6]), bag("b", 1, [0, 1, 0, 0]), bag("c", 0, [0, 0, 0, 0])]
    atts = [np.array([[0.4, 0.1, 0.2, 0.3]]), np.array([[0.4, 0.1, 0.2, 0.3]]),
            np.array([[0.25] * 4])]  # fmt: skip
    res = attention_auc(bags, atts, tumour_min=0.5)
    assert res["n_slides"] == 2  # the benign bag has no tumour tiles to rank
    # a: tumour tiles 0 and 3 hold the two highest weights; b: its tumour tile the lowest
    assert res["per_slide"] == {"a": pytest.approx(1.0), "b": pytest.approx(0.0)}
    assert res["mean"] == pytest.approx(0.5) and res["min"] == pytest.approx(0.0)


def test_recipe_keys_are_checked(tmp_path):
    r = recipe(tmp_path, tmp_path)
    settings(r)
    with pytest.raises(RecipeError, match="model.featurs"):
        settings({**r, "model": {"featurs": {}}})
    with pytest.raises(RecipeError, match="model.features.weights"):
        settings({**r, "model": {"features": {"weights": "x"}}})
    with pytest.raises(RecipeError, match="model.variant"):
        settings({**r, "model": {"variant": "max"}})
    with pytest.raises(RecipeError, match="data.path"):
        settings({**r, "data": {}})


def test_train_caches_features_resumes_and_evaluates(tmp_path, dataset, capsys):
    from histoscope.checkpoints import load_checkpoint, read_card
    from histoscope.training import evaluate, run

    out = tmp_path / "run"
    res = run(recipe(dataset, out))
    card = read_card(res["checkpoint"])
    assert card.family == "clam" and card.classes == ("normal", "tumour")
    feats = card.data["features"]
    assert feats["backbone"] == "test_cnn" and feats["checkpoint"] is None
    assert len(feats["weights_sha256"]) == 64 and card.input_spec["tile_size"] == 32
    assert set(card.metrics) >= {"best_epoch", "val", "test", "mean_pool"}
    assert "attention_auc" in card.metrics["test"]
    assert (out / "last_state.pt").is_file() and (out / "mean_pool" / "last_state.pt").is_file()
    assert (out / "clam_mean_pool.safetensors").is_file()
    assert "auc" in card.metrics["test_stain_shifted"]
    # one CLAM/TRIDENT feature file per slide, and the restained test slide's apart
    h5 = sorted((out / "cache").glob("*_t0.5/*.h5"))
    assert len(h5) == 6 and len(list((out / "cache").glob("*_shift*/*.h5"))) == 1
    f, xy, attrs = read_features(h5[0])
    assert f.shape[1] == 16 and attrs["encoder"] == "test_cnn"
    # resuming with more epochs continues from epoch 2 instead of starting over
    mtime = h5[0].stat().st_mtime_ns
    res3 = run(recipe(dataset, out, epochs=3))
    assert [r["epoch"] for r in res3["history"]] == [1, 2, 3]
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert h5[0].stat().st_mtime_ns == mtime  # features were read from the cache
    # evaluation on the dataset, with the baseline, writes its tables
    m = evaluate(res3["checkpoint"], dataset, tmp_path / "ev", split="all",
                 baseline=out / "clam_mean_pool.safetensors", cache=out / "cache")  # fmt: skip
    assert m["n"]["normal"] + m["n"]["tumour"] == 6
    assert "mean_pool" in m and m["attention_auc"]["n_slides"] >= 1
    doc = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert doc["family"] == "clam" and doc["auc"] == m["auc"]
    rows = (tmp_path / "ev" / "slides.csv").read_text().splitlines()
    assert len(rows) == 1 + 12
    model, _ = load_checkpoint(res3["checkpoint"], family="clam")
    assert model.config["k_sample"] == 2
    # Wilson intervals; `evaluate -O record=final_test` writes the figures into the card
    lo, hi = m["sensitivity_ci95"]
    assert 0 <= lo <= m["sensitivity"] <= hi <= 1 and m["specificity_ci95"][0] <= m["specificity"]
    from histoscope.cli import main

    before = read_card(res3["checkpoint"])
    capsys.readouterr()
    assert main(["evaluate", res3["checkpoint"], "--data", str(dataset), "--split", "all",
                 "--out", str(tmp_path / "ev2"), "-O", f"cache={out / 'cache'}",
                 "-O", "record=final_test"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "| CLAM | " in printed and f"{m['auc']:.4f}" in printed
    after = read_card(res3["checkpoint"])
    assert after.sha256 == before.sha256 and after.metrics["final_test"]["auc"] == m["auc"]
    seeds = [r["seed"] for r in json.loads((dataset / "manifest.json").read_text())["slides"]]
    assert (
        after.metrics["final_test"]["seeds"] == seeds
        and after.metrics["best_epoch"] == before.metrics["best_epoch"]
    )
    # a second record under the same key is refused before anything is evaluated, a bad
    # key or a folder without a synth manifest too; overwrite=true replaces it
    args = ["evaluate", res3["checkpoint"], "--split", "all", "-O", f"cache={out / 'cache'}"]
    for data, opt, match in ((dataset, "record=final_test", "overwrite=true"),
                             (dataset, "record=final-test", "plain name"),
                             (tmp_path, "record=other", "manifest")):  # fmt: skip
        capsys.readouterr()
        assert main([*args, "--data", str(data), "--out", str(tmp_path / "ev3"), "-O", opt]) != 0
        assert match in capsys.readouterr().err
        assert not (tmp_path / "ev3" / "slides.csv").exists()
    # `:`-joined folders are pooled (each folder's features cached apart)
    capsys.readouterr()
    both = f"{dataset}{os.pathsep}{dataset}"
    assert main([*args, "--data", both, "--out", str(tmp_path / "ev4"),
                 "-O", "record=final_test", "-O", "overwrite=true"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    again = read_card(res3["checkpoint"]).metrics["final_test"]
    assert again["n"]["normal"] + again["n"]["tumour"] == 12 and again["seeds"] == seeds + seeds
    assert again["n"] == {k: 2 * v for k, v in m["n"].items()} and again["auc"] == pytest.approx(
        m["auc"]
    )
    row = next(x for x in printed.splitlines() if x.startswith("| CLAM | "))
    assert f"{again['specificity']:.3f} [" in row and f"{again['sensitivity']:.3f} [" in row
    assert json.loads((tmp_path / "ev4" / "metrics.json").read_text())["n"] == again["n"]


def test_stain_shifted_bags_restain_the_tiles_once_per_slide(tmp_path, dataset):
    from histoscope.training.clam import feature_model
    from histoscope.training.clam_data import load_bags

    fm = feature_model(FEATURES)
    ev = {"shift_degrees": 12.0, "shift_amount": [1.45, 1.7], "seed": 0}
    plain = load_bags(dataset, "val", fm, tmp_path)
    shifted = load_bags(dataset, "val", fm, tmp_path, shift=ev)
    again = load_bags(dataset, "val", fm, tmp_path / "other", shift=ev)
    for a, b, c in zip(plain, shifted, again, strict=True):
        np.testing.assert_array_equal(a.coords, b.coords)
        assert np.abs(a.features - b.features).max() > 1e-3  # the stain changed the features
        np.testing.assert_allclose(b.features, c.features, rtol=1e-5, atol=1e-6)  # same shift
    assert len({p.parent.name for p in tmp_path.glob("*/*.h5")}) == 2


def test_max_branch_adds_the_best_tile_to_the_attention_logit():
    from histoscope.models.clam import CLAM, build_mil

    torch.manual_seed(0)
    model = build_mil({"variant": "sb", "in_dim": 6, "hidden": 8, "attn_hidden": 4,
                       "k_sample": 2, "max_branch": True}).eval()  # fmt: skip
    h = torch.randn(2, 9, 6)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 5:] = False
    out = model(h, mask)
    tiles = model.tile_scorer(model.fc(h))[..., 0]
    assert torch.isinf(out["tile_scores"][1, 5:]).all()
    assert torch.allclose(
        out["max_logits"][:, 1], torch.stack([tiles[0].max(), tiles[1, :5].max()])
    )
    assert torch.equal(out["max_logits"][:, 0], torch.zeros(2))
    assert torch.allclose(out["logits"], out["attention_logits"] + out["max_logits"])
    # padding changes nothing: the short bag alone gives the same slide logits
    alone = model(h[1, :5])
    assert torch.allclose(alone["logits"][0], out["logits"][1], atol=1e-6)
    loss, parts = model.loss(h, torch.tensor([0, 1]), mask)
    assert loss.requires_grad and set(parts) == {"bag", "instance"}
    loss.backward()
    assert model.tile_scorer.weight.grad.abs().sum() > 0
    # the config round-trips; a config without the key is CLAM as before (no tile scorer)
    again = CLAM.from_config(model.config)
    assert again.max_branch and again.config == model.config
    plain = build_mil({"variant": "sb", "in_dim": 6, "hidden": 8, "attn_hidden": 4})
    assert "max_branch" not in plain.config and not hasattr(plain, "tile_scorer")
    assert "attention_logits" not in plain(h[0])
    with pytest.raises(ValueError, match="two classes"):
        build_mil({"variant": "sb", "in_dim": 6, "n_classes": 3, "max_branch": True})


def test_extra_train_folders_join_the_training_split(tmp_path, dataset):
    from histoscope.checkpoints import read_card
    from histoscope.training import run

    r = recipe(dataset, tmp_path / "run", epochs=1)
    r["data"]["extra_train"] = [str(dataset)]
    r["eval"] = {"baseline": False, "stain_shift": False}
    card = read_card(run(r)["checkpoint"])
    names = json.loads((dataset / "manifest.json").read_text())["slides"]
    own = [x["name"] for x in names if x["split"] == "train"]
    # the folder's own train split first, then every slide of the extra folder, in order
    assert card.data["slides"]["train"] == own + [x["name"] for x in names]
    assert card.data["extra_train"] == [str(dataset)]
    assert settings({"data": {"path": "x"}})["data"]["extra_train"] == []


def test_extra_train_folders_are_generated_as_synth_tumour_extent_makes_them(tmp_path):
    from histoscope.synthetic.cli import seeds_with_extent
    from histoscope.training._recipe import RecipeError
    from histoscope.training.clam_data import ensure_dataset

    gen = {"count": 2, "size": [512, 512], "seed": 48000, "mpp": 1.0, "tumour_extent": "focus"}
    r = {"data": {"path": "x", "extra_train": [{"path": str(tmp_path / "f"), "generate": gen}]}}
    entry = settings(r)["data"]["extra_train"][0]
    root = ensure_dataset(entry["path"], entry["generate"])
    manifest = json.loads((root / "manifest.json").read_text())
    want = seeds_with_extent("he", "focus", 48000, 2, (512, 512), 1.0)
    assert [x["seed"] for x in manifest["slides"]] == want
    assert all(x["tumour_extent"] == "focus" for x in manifest["slides"])
    for bad in ({"path": "y", "generate": {**gen, "colour": 1}}, {"generate": gen}, 3,
                {"path": "y", "generate": {**gen, "tumour_extent": "focal"}},
                {"path": "y", "generate": {**gen, "count": "abc"}},
                {"path": "y", "generate": "focus"}):  # fmt: skip
        with pytest.raises(RecipeError, match="extra_train"):
            settings({"data": {"path": "x", "extra_train": [bad]}})
    with pytest.raises(RecipeError, match="extra_train must be a list"):
        settings({"data": {"path": "x", "extra_train": "out/data/f"}})
