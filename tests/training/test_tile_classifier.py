"""Family ``tile_classifier``: tile labels, stain changes, training, checkpoint, evaluation."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from histoscope.cli import main
from histoscope.errors import CheckpointError
from histoscope.training import RecipeError
from histoscope.training import run as run_recipe
from histoscope.training._stain_aug import RGB_FROM_HED, hed_jitter, stain_shift
from histoscope.training._tiles import load_split, tile_labels


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one torch thread avoids OpenMP waits on a busy shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """Three small H&E slides (one per split), each with tumour and normal tissue."""
    from histoscope.synthetic._dataset import write_dataset

    out = tmp_path_factory.mktemp("tumour_data")
    write_dataset(out, kind="he", size=(768, 768), seed=1016, count=3, mpp=0.5)
    return out


def _recipe(data, out, **train) -> dict:
    return {
        "family": "tile_classifier",
        "data": {"path": str(data), "mpp": 2.0, "tile_size": 32, "max_per_slide": 6},
        "model": {"backbone": "test_cnn", "dropout": 0.1},
        "augment": {"flips": True, "hed_sigma": 0.05, "hed_bias": 0.05},
        "train": {
            "epochs": 2,
            "batch": 8,
            "lr": 0.01,
            "seed": 3,
            "samples_per_epoch": 32,
            "num_threads": 1,
            **train,
        },  # fmt: skip
        "out": str(out),
    }


@pytest.fixture(scope="session")
def trained(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("tumour_run")
    export = out / "export" / "default.safetensors"
    result = run_recipe({**_recipe(dataset, out), "export": str(export)})
    return out, result, export


# ------------------------------------------------------------------- labels
@dataclass(frozen=True)
class LabelCase:
    id: str
    tile_um: float


LABEL_CASES = [LabelCase("aligned", 32.0), LabelCase("fractional", 24.0)]


@pytest.mark.parametrize("case", LABEL_CASES, ids=[c.id for c in LABEL_CASES])
def test_tile_labels_match_brute_force(case):
    rng = np.random.default_rng(0)
    tumour = rng.random((12, 12)) < 0.3
    tumour[:6, :6] = True
    tissue = tumour | (rng.random((12, 12)) < 0.7)
    mask_um = 16.0
    labels, frac = tile_labels(tumour, tissue, mask_um, (192.0, 192.0), case.tile_um)
    # brute force: upsample the masks to 1 µm pixels and average each tile
    up_t = np.kron(tumour, np.ones((16, 16)))
    up_s = np.kron(tissue, np.ones((16, 16)))
    t = int(case.tile_um)
    n = -(-192 // t)
    for r in range(n):
        for c in range(n):
            ft = up_t[r * t : (r + 1) * t, c * t : (c + 1) * t].sum() / t**2
            fs = up_s[r * t : (r + 1) * t, c * t : (c + 1) * t].sum() / t**2
            assert frac[r, c] == pytest.approx(ft, abs=1e-6)
            want = -1 if fs <= 0.5 else (1 if ft >= 0.5 else (0 if ft == 0 else -1))
            assert labels[r, c] == want, (r, c, ft, fs)
    assert (labels == 1).any() and (labels == -1).any()


def test_load_split_reads_the_tiles_it_labels(dataset):
    from histoscope.slide import open_slide

    tiles = load_split(dataset, "train", mpp=2.0, tile_size=32)
    assert tiles.counts()["normal"] > 0 and tiles.counts()["tumour"] > 0
    assert np.all(tiles.tumour_fraction[tiles.labels == 1] >= 0.5)
    assert np.all(tiles.tumour_fraction[tiles.labels == 0] == 0)
    assert tiles.stains[0] is not None and tiles.stains[0].shape == (3, 3)
    (name,) = tiles.names
    with open_slide(dataset / "slides" / f"{name}.tif") as slide:
        for i in (0, len(tiles) // 2, len(tiles) - 1):
            x, y = tiles.coords[i]
            np.testing.assert_array_equal(tiles.images[i], slide.read_region(x, y, 32, 32, mpp=2.0))
    capped = load_split(dataset, "train", mpp=2.0, tile_size=32, max_per_slide=2)
    assert capped.counts() == {"normal": 2, "tumour": 2}


def test_missing_data_and_split_are_named(tmp_path, dataset):
    with pytest.raises(RecipeError, match="data folder .*nowhere does not exist"):
        load_split(tmp_path / "nowhere", "train", mpp=2.0, tile_size=32)
    with pytest.raises(RecipeError, match="has no manifest.json"):
        load_split(tmp_path, "train", mpp=2.0, tile_size=32)
    with pytest.raises(RecipeError, match="no slides in split 'holdout'"):
        load_split(dataset, "holdout", mpp=2.0, tile_size=32)


# ------------------------------------------------------------------- stains
def test_hed_jitter_scales_and_shifts_stain_amounts():
    conc = torch.tensor([0.4, 0.2, 0.05]).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    od = torch.einsum("bdhw,dc->bchw", conc, torch.as_tensor(RGB_FROM_HED, dtype=torch.float32))
    x = 255.0 * torch.pow(10.0, -od)
    assert torch.equal(hed_jitter(x, torch.Generator().manual_seed(0), 0.0, 0.0), x)
    y = hed_jitter(x, torch.Generator().manual_seed(5), 0.2, 0.03)
    gen = torch.Generator().manual_seed(5)
    alpha = 1 + (torch.rand((2, 3, 1, 1), generator=gen) * 2 - 1) * 0.2
    beta = (torch.rand((2, 3, 1, 1), generator=gen) * 2 - 1) * 0.03
    inv = torch.linalg.inv(torch.as_tensor(RGB_FROM_HED, dtype=torch.float32))
    got = torch.einsum("bchw,cd->bdhw", -torch.log10(y / 255.0), inv)
    torch.testing.assert_close(got, conc * alpha + beta, atol=2e-4, rtol=1e-3)
    assert not torch.allclose(y[0], y[1])  # per-image draws


def test_stain_shift_changes_hue_keeps_glass_and_is_reproducible():
    rng = np.random.default_rng(1)
    conc = np.stack([rng.uniform(0, 0.8, (8, 8)), rng.uniform(0, 0.5, (8, 8)),
                     np.zeros((8, 8))], -1)  # fmt: skip
    img = np.clip(255 * 10 ** -(conc @ RGB_FROM_HED), 0, 255).round().astype(np.uint8)
    img[0, 0] = 255
    tiles = img[None]
    same = stain_shift(tiles, None, np.random.default_rng(0), degrees=0.0, amount=(1.0, 1.0))
    assert np.abs(same.astype(int) - tiles).max() <= 1
    a = stain_shift(tiles, None, np.random.default_rng(7))
    b = stain_shift(tiles, None, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    assert tuple(a[0, 0, 0]) == (255, 255, 255)
    assert np.abs(a.astype(float).mean((0, 1, 2)) - tiles.astype(float).mean((0, 1, 2))).max() > 5


# ------------------------------------------------------------------ training
def test_training_writes_a_loadable_checkpoint_with_held_out_metrics(trained):
    from histoscope.checkpoints import load_checkpoint

    out, result, export = trained
    model, card = load_checkpoint(result["checkpoint"], family="tile_classifier")
    assert card.classes == ("normal", "tumour")
    assert card.input_spec["mpp"] == 2.0 and card.input_spec["tile_size"] == 32
    assert set(card.metrics) >= {"best_epoch", "val", "test", "test_stain_shifted"}
    assert card.metrics["test"]["n"]["tumour"] > 0 and card.metrics["test"]["n"]["normal"] > 0
    assert card.recipe["family"] == "tile_classifier"
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and all("val_auc" in r for r in log)
    assert export.read_bytes() == open(result["checkpoint"], "rb").read()
    with torch.no_grad():
        logits = model(torch.zeros(3, 3, 32, 32))
    assert logits.shape == (3, 2)
    assert (out / "tiles.csv").exists() and (out / "roc.png").read_bytes()[:4] == b"\x89PNG"


def test_interrupted_training_resumes_to_the_same_checkpoint(dataset, trained, tmp_path):
    from histoscope.checkpoints import read_card

    _, result, _ = trained

    class Stop(Exception):
        pass

    def crash(step: int, total: int) -> None:
        if step == 6:  # second epoch
            raise Stop

    recipe = _recipe(dataset, tmp_path)
    with pytest.raises(Stop):
        run_recipe(recipe, progress=crash)
    resumed = run_recipe(recipe)
    assert read_card(resumed["checkpoint"]).sha256 == read_card(result["checkpoint"]).sha256
    assert resumed["metrics"]["test"] == result["metrics"]["test"]


def test_evaluate_command_reproduces_the_card_metrics(trained, dataset, tmp_path, capsys):
    _, result, _ = trained
    assert main(["evaluate", result["checkpoint"], "--data", str(dataset), "--out",
                 str(tmp_path)]) == 0  # fmt: skip
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert doc["family"] == "tile_classifier" and doc["split"] == "test"
    for key in ("test", "test_stain_shifted"):
        assert doc[key]["auc"] == pytest.approx(result["metrics"][key]["auc"])
        assert doc[key]["confusion"] == result["metrics"][key]["confusion"]
    rows = (tmp_path / "tiles.csv").read_text().splitlines()
    assert rows[0].split(",")[-2:] == ["p_tumour_test", "p_tumour_test_stain_shifted"]
    assert len(rows) - 1 == sum(doc["test"]["n"].values())
    per_slide = (tmp_path / "per_slide.csv").read_text().splitlines()
    assert per_slide[0] == "slide,set,n_normal,n_tumour,auc,accuracy"
    (test_slide,) = {r.split(",")[0] for r in rows[1:]}  # one test slide
    first = per_slide[1].split(",")
    assert first[:4] == [test_slide, "test", str(doc["test"]["n"]["normal"]),
                         str(doc["test"]["n"]["tumour"])]  # fmt: skip
    assert float(first[4]) == pytest.approx(doc["test"]["auc"], abs=1e-4)


def test_cli_train_generates_missing_data_and_takes_overrides(dataset, tmp_path, capsys):
    import yaml

    recipe = _recipe(tmp_path / "made", tmp_path / "run")
    recipe["data"]["generate"] = {"count": 3, "size": [768, 768], "seed": 1016, "mpp": 0.5}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    rc = main(["train", str(path), "-o", "train.epochs=1", "-o", "name=tiny"])
    assert rc == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["checkpoint"].endswith("tiny.safetensors")
    log = (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()
    assert len(log) == 1
    made = json.loads((tmp_path / "made" / "manifest.json").read_text())
    assert made["slides"] == json.loads((dataset / "manifest.json").read_text())["slides"]


def test_evaluate_refuses_another_family(tmp_path, dataset):
    from histoscope.checkpoints import save_checkpoint
    from histoscope.models import create_backbone
    from histoscope.training.tile_classifier import evaluate

    bb = create_backbone("test_cnn")
    ckpt = save_checkpoint(tmp_path / "bb", bb.module, {"family": "backbone", "config": {
        "name": "test_cnn", **bb.config}})  # fmt: skip
    with pytest.raises(CheckpointError, match="family 'backbone', expected 'tile_classifier'"):
        evaluate(ckpt, dataset, tmp_path / "ev")


BAD = [
    ("unknown-data-key", {"data": {"path": "x", "tile_sze": 3}}, "data.tile_sze"),
    ("unknown-augment-key", {"augment": {"hed": 0.1}}, "augment.hed"),
    ("no-data-path", {"data": {"mpp": 1.0}}, "data.path is required"),
    ("missing-folder", {"data": {"path": "/nonexistent/tumour"}}, "/nonexistent/tumour does not"),
]


@pytest.mark.parametrize(("change", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_family_recipes_name_the_problem(dataset, tmp_path, change, message):
    with pytest.raises(RecipeError, match=message):
        run_recipe({**_recipe(dataset, tmp_path), **change})


def test_trained_checkpoint_drives_the_tumour_heatmap(trained, dataset):
    """Recipe -> checkpoint -> task: layers in µm with provenance, same scores as training's."""
    import histoscope as hs
    from histoscope.checkpoints import load_checkpoint
    from histoscope.training.tile_classifier import predict

    _, result, _ = trained
    model, card = load_checkpoint(result["checkpoint"], family="tile_classifier")
    manifest = json.loads((dataset / "manifest.json").read_text())
    row = next(r for r in manifest["slides"] if r["split"] == "test")
    with hs.open_session(dataset / row["slide"], in_memory=True) as session:
        heat = hs.tasks.run("tumour", session, result["checkpoint"])
    data, kw, kind = heat.to_layers()[0]
    assert kind == "image" and kw["scale"] == (64.0, 64.0)  # 32 px at 2 µm/px
    assert kw["metadata"]["histoscope"]["checkpoint_sha256"] == card.sha256
    tiles = load_split(dataset, "test", mpp=2.0, tile_size=32)
    stride = heat.grid.stride
    rc = np.rint(tiles.coords[:, ::-1] / stride).astype(int)
    shared = np.isfinite(data[rc[:, 0], rc[:, 1]])
    assert shared.sum() >= len(tiles) // 2
    ours = predict(model, tiles.images[shared], card.input_spec)
    np.testing.assert_allclose(data[rc[shared, 0], rc[shared, 1]], ours, atol=1e-4)


def test_patch_folder_in_the_seeds_layout_trains_and_evaluates(dataset, tmp_path):
    """``<split>/<class>/*.png`` patches (benign/malignant names, another size) work end to end."""
    from PIL import Image

    from histoscope.training import evaluate

    folder = tmp_path / "patches"
    for split in ("train", "val", "test"):
        tiles = load_split(dataset, split, mpp=2.0, tile_size=40)
        for i, (img, lab) in enumerate(zip(tiles.images, tiles.labels, strict=True)):
            sub = folder / split / ("malignant" if lab else "benign")
            sub.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(sub / f"{i:03d}.png")
    (folder / "test" / "benign" / "notes.txt").write_text("not an image")
    recipe = _recipe(folder, tmp_path / "run", epochs=1)
    result = run_recipe(recipe)
    metrics = evaluate(result["checkpoint"], folder, tmp_path / "ev")
    n_benign = len(list((folder / "test" / "benign").glob("*.png")))
    n_malignant = len(list((folder / "test" / "malignant").glob("*.png")))
    assert metrics["test"]["n"] == {"normal": n_benign, "tumour": n_malignant}
    (tn, fp), (fn, tp) = metrics["test"]["confusion"]
    assert metrics["test"]["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert metrics["test"]["specificity"] == pytest.approx(tn / (tn + fp))
    assert metrics["test"] == result["metrics"]["test"]
    with pytest.raises(RecipeError, match="no images under holdout/<class>/"):
        evaluate(result["checkpoint"], folder, tmp_path / "ev2", split="holdout")


def test_evaluate_options_add_macenko_sets_and_refuse_unknown_ones(
    trained, dataset, tmp_path, capsys
):
    _, result, _ = trained
    argv = ["evaluate", result["checkpoint"], "--data", str(dataset), "--out", str(tmp_path)]
    assert main([*argv, "-O", "stain_norm=true"]) == 0
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert set(doc) >= {"test", "test_stain_shifted", "test_macenko", "test_stain_shifted_macenko"}
    assert doc["test_macenko"]["n"] == doc["test"]["n"]
    header = (tmp_path / "tiles.csv").read_text().splitlines()[0]
    assert header.endswith("p_tumour_test_macenko,p_tumour_test_stain_shifted_macenko")
    capsys.readouterr()
    assert main([*argv, "-O", "stain_nrom=true"]) == 2
    err = capsys.readouterr().err
    assert "no option(s) ['stain_nrom']" in err and "stain_norm" in err


def test_macenko_trained_model_is_evaluated_on_normalised_tiles(dataset, tmp_path):
    from histoscope.checkpoints import load_checkpoint
    from histoscope.training import evaluate
    from histoscope.training.tile_classifier import macenko, metrics_for, predict

    recipe = _recipe(dataset, tmp_path / "run", epochs=1)
    recipe["data"]["stain_norm"] = "macenko"
    result = run_recipe(recipe)
    model, card = load_checkpoint(result["checkpoint"], family="tile_classifier")
    assert card.input_spec["stain_norm"] == "macenko"
    test = load_split(dataset, "test", mpp=2.0, tile_size=32)
    want = metrics_for(test.labels, predict(model, macenko(test).images, card.input_spec))
    got = evaluate(result["checkpoint"], dataset, tmp_path / "ev")
    assert got["test"] == result["metrics"]["test"]
    assert got["test"]["auc"] == pytest.approx(want["auc"])
    assert got["test"]["confusion"] == want["confusion"]
    recipe["data"]["stain_norm"] = "vahadane"
    with pytest.raises(RecipeError, match="data.stain_norm must be null or 'macenko'"):
        run_recipe(recipe)


# -------------------------------------------------------------- calibration
def test_calibration_is_fitted_stored_in_the_head_and_used_by_the_heatmap(trained, dataset,
                                                                          tmp_path):  # fmt: skip
    """eval.calibrate.from_checkpoint: the head gains Platt scaling; other card keys are kept."""
    import histoscope as hs
    from histoscope.checkpoints import load_checkpoint, save_checkpoint
    from histoscope.training.tile_classifier import predict, predict_logits

    _, result, _ = trained
    model, card = load_checkpoint(result["checkpoint"], family="tile_classifier")
    from histoscope.checkpoints import read_card
    from histoscope.ood import assess_card, fit_reference, write_reference

    rng = np.random.default_rng(0)
    ref = fit_reference([rng.normal(size=(30, 8)) for _ in range(6)],
                        [rng.normal(size=(30, 8)) for _ in range(4)], rank=3)  # fmt: skip
    recorded = {"auc": 0.9, "split": "test", "seeds": [1, 2]}
    src = save_checkpoint(tmp_path / "src.safetensors", model,
                          {**card.to_dict(), "data": {**card.data, "other_tool": {"kept": 1}},
                           "metrics": {**card.metrics, "final_test": recorded}})  # fmt: skip
    write_reference(src, ref)  # keyed to the whole checkpoint's hash, as old cards are
    assert read_card(src).data["ood"]["encoder_sha256"] == read_card(src).sha256
    recipe = _recipe(dataset, tmp_path / "cal")
    recipe["eval"] = {"calibrate": {"from_checkpoint": str(src), "path": str(dataset)}}
    out = run_recipe(recipe)
    cal_model, cal_card = load_checkpoint(out["checkpoint"], family="tile_classifier")
    c = cal_card.metrics["calibration"]
    assert cal_card.config["calibrated"] is True and cal_card.data["other_tool"] == {"kept": 1}
    assert c["nll_after"] <= c["nll_before"] + 1e-9
    assert c["scale"][0] == pytest.approx(c["scale"][1]) and c["scale"][0] > 0
    assert sum(c["shift"]) == pytest.approx(0, abs=1e-9) and c["n"]["tumour"] > 0
    assert cal_card.metrics["uncalibrated"]["test"] == card.metrics["test"]
    # the final test measured the old weights: superseded, not left as the card's figure
    assert "final_test" not in cal_card.metrics
    assert cal_card.metrics["superseded"]["final_test"]["auc"] == 0.9
    # the reference describes the backbone, which calibration keeps: still compared
    assert cal_card.sha256 != read_card(src).sha256
    assert cal_card.data["ood"]["encoder_sha256"] == cal_card.data["backbone_sha256"]
    report = assess_card(cal_card, rng.normal(size=(20, 8)))
    assert report.outside is not None, report.message
    # recalibrating again keeps the first `uncalibrated` entry
    recipe2 = _recipe(dataset, tmp_path / "cal2")
    recipe2["eval"] = {"calibrate": {"from_checkpoint": out["checkpoint"], "path": str(dataset)}}
    card2 = read_card(run_recipe(recipe2)["checkpoint"])
    assert card2.metrics["uncalibrated"] == cal_card.metrics["uncalibrated"]
    assert card2.metrics["superseded"]["before_recalibration"]["test"] == cal_card.metrics["test"]
    assert card2.data["ood"]["encoder_sha256"] == cal_card.data["backbone_sha256"]
    assert cal_card.recipe["eval"]["calibrate"]["from_checkpoint"] == str(src)
    tiles = load_split(dataset, "test", mpp=2.0, tile_size=32)
    raw = predict_logits(cal_model, tiles.images, cal_card.input_spec, raw=True)
    np.testing.assert_allclose(raw, predict_logits(model, tiles.images, card.input_spec),
                               atol=1e-5)  # fmt: skip
    want = np.asarray(c["scale"]) * raw + np.asarray(c["shift"])
    np.testing.assert_allclose(predict_logits(cal_model, tiles.images, cal_card.input_spec),
                               want, atol=1e-4)  # fmt: skip
    row = next(r for r in json.loads((dataset / "manifest.json").read_text())["slides"]
               if r["split"] == "test")  # fmt: skip
    with hs.open_session(dataset / row["slide"], in_memory=True) as session:
        heat = hs.tasks.run("tumour", session, out["checkpoint"])
    stride = heat.grid.stride
    rc = np.rint(tiles.coords[:, ::-1] / stride).astype(int)
    seen = np.isfinite(heat.values[rc[:, 0], rc[:, 1]])
    assert seen.sum() >= len(tiles) // 2
    ours = predict(cal_model, tiles.images[seen], cal_card.input_spec)
    np.testing.assert_allclose(heat.values[rc[seen, 0], rc[seen, 1]], ours, atol=1e-4)
    plain = predict(model, tiles.images[seen], card.input_spec)
    assert np.abs(ours - plain).max() > 1e-3  # the map shows the calibrated probability


def test_calibrated_head_round_trips_and_old_checkpoints_still_load(tmp_path):
    from histoscope.checkpoints import load_checkpoint, save_checkpoint
    from histoscope.models import TileClassifier

    torch.manual_seed(0)
    m = TileClassifier("test_cnn", 2, backbone_kwargs={"tile_size": 32})
    old = save_checkpoint(tmp_path / "old", m, {"family": "tile_classifier", "config": m.config})
    loaded, _ = load_checkpoint(old)
    assert "calibrated" not in loaded.config and "head.logit_scale" not in loaded.state_dict()
    x = torch.rand(4, 3, 32, 32)
    before = m(x)
    m.set_calibration([0.5, 0.5], [-1.0, 1.0])
    np.testing.assert_allclose(m(x).detach(), before.detach() * 0.5 + torch.tensor([-1.0, 1.0]),
                               atol=1e-5)  # fmt: skip
    np.testing.assert_allclose(m.raw_logits(x).detach(), before.detach(), atol=1e-6)
    new = save_checkpoint(tmp_path / "new", m, {"family": "tile_classifier", "config": m.config})
    again, card = load_checkpoint(new)
    assert card.config["calibrated"] is True
    np.testing.assert_allclose(again(x).detach(), m(x).detach(), atol=1e-6)
    with pytest.raises(ValueError, match="positive"):
        m.set_calibration([0.0, 1.0], [0.0, 0.0])
    with pytest.raises(ValueError, match="2 scales"):
        m.set_calibration([1.0], [0.0])


def test_tile_metrics_give_intervals_ece_and_per_slide_floors():
    from histoscope.training.tile_classifier import markdown_table, metrics_for

    y = np.array([1] * 10 + [0] * 10 + [1] * 6 + [0] * 4)
    p = np.r_[np.full(9, 0.9), 0.1, np.full(10, 0.1), np.full(3, 0.8), np.full(3, 0.2),
              np.full(4, 0.3)]  # fmt: skip
    slide = np.r_[np.zeros(20, int), np.ones(10, int)]
    m = metrics_for(y, p, slide, ("a", "b"))
    assert m["sensitivity"] == pytest.approx(12 / 16)
    lo, hi = m["sensitivity_ci95"]
    assert lo < 12 / 16 < hi
    ps = m["per_slide"]
    assert ps["slides"]["a"]["sensitivity"] == pytest.approx(0.9)
    assert ps["min_sensitivity"] == pytest.approx(0.5) and ps["slides_below_0.7"] == ["b"]
    assert "specificity" not in ps["slides"]["b"]  # 4 normal tiles < MIN_SLIDE_TILES
    assert m["ece"] > 0
    table = markdown_table({"n_slides": 2, "test": m})
    assert "| test | 2 | 14 / 16 |" in table and "0.750 [" in table
    # every slide with a tumour tile counts, however few (here 2: "c" has 2, all missed)
    y2, p2 = np.r_[y, 1, 1, 0, 0, 0], np.r_[p, 0.1, 0.2, 0.1, 0.1, 0.1]
    m2 = metrics_for(y2, p2, np.r_[slide, 2, 2, 2, 2, 2], ("a", "b", "c"))
    ps2 = m2["per_slide"]
    assert ps2["n_slides_tumour"] == 3 and ps2["slides_tumour_missed"] == ["c"]
    assert ps2["min_sensitivity_any"] == 0 and ps2["min_sensitivity"] == pytest.approx(0.5)
    assert ps2["slides"]["c"]["tumour_called"] == 0 and "sensitivity" not in ps2["slides"]["c"]
    assert "| 3 slides: 0.00 / 1 |" in markdown_table({"n_slides": 3, "test": m2})
    lo, hi = m2["sensitivity_ci95_slides"]
    assert lo <= 12 / 18 <= hi


def test_bootstrap_over_slides_is_wider_than_tiles_for_clustered_errors():
    from histoscope.training.metrics import bootstrap_slides, wilson

    # 10 slides x 50 tumour tiles: 7 slides all right, 3 all wrong (errors cluster by slide)
    y = np.ones(500, int)
    pred = np.r_[np.ones(350, int), np.zeros(150, int)]
    slide = np.repeat(np.arange(10), 50)
    b = bootstrap_slides(y, pred, slide, n_boot=500, seed=1)
    lo, hi = b["sensitivity"]
    w = wilson(350, 500)
    assert lo < 0.7 < hi and (hi - lo) > 3 * (w[1] - w[0]) and b["specificity"] is None
    assert b == bootstrap_slides(y, pred, slide, n_boot=500, seed=1)  # seeded
    # errors spread evenly over slides: no slide-to-slide variation, a narrow interval
    even = bootstrap_slides(y, np.tile(np.r_[np.ones(35, int), np.zeros(15, int)], 10), slide)
    assert even["sensitivity"] == pytest.approx([0.7, 0.7])
    with pytest.raises(ValueError, match="equal"):
        bootstrap_slides(y, pred[:3], slide)


def test_rescore_recomputes_a_saved_evaluation(tmp_path):
    from histoscope.training.tile_classifier import metrics_for, rescore

    rows = ["slide,x,y,label,tumour_fraction,p_tumour_test,p_tumour_test_stain_shifted"]
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    p = np.round(np.clip(y * 0.7 + rng.random(60) * 0.4, 0, 1), 5)
    names = [f"s{k // 20}" for k in range(60)]
    rows += [f"{n},0,0,{'tumour' if t else 'normal'},0,{q:.5f},{1 - q:.5f}"
             for n, t, q in zip(names, y, p, strict=True)]  # fmt: skip
    (tmp_path / "tiles.csv").write_text("\n".join(rows) + "\n")
    got = rescore(tmp_path)
    want = metrics_for(y, p, np.repeat(np.arange(3), 20), ("s0", "s1", "s2"))
    assert got["n_slides"] == 3 and got["test"]["confusion"] == want["confusion"]
    assert got["test"]["sensitivity_ci95_slides"] == want["sensitivity_ci95_slides"]
    assert "slides" not in got["test"]["per_slide"] and "test_stain_shifted" in got
    (tmp_path / "tiles.csv").write_text("a,b\n1,2\n")
    with pytest.raises(RecipeError, match="not a tiles.csv"):
        rescore(tmp_path)


def test_record_is_checked_before_the_evaluation(tmp_path):
    """`-O record=KEY` refuses a bad key, a folder without a synth manifest, or an existing
    entry (without overwrite) before a tile is read, and leaves the card as it was."""
    import shutil

    from histoscope._data import sample_data_path
    from histoscope.checkpoints import read_card
    from histoscope.training.tile_classifier import evaluate

    ckpt = tmp_path / "t.safetensors"
    shutil.copy(sample_data_path("tumour_patch_default.safetensors"), ckpt)
    before = read_card(ckpt).to_dict()
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(RecipeError, match="plain name"):
        evaluate(ckpt, data, tmp_path / "ev", record="final test")
    with pytest.raises(RecipeError, match="manifest"):
        evaluate(ckpt, data, tmp_path / "ev", record="other")
    (data / "manifest.json").write_text(json.dumps({"slides": [{"seed": 3, "split": "test"}]}))
    with pytest.raises(RecipeError, match="overwrite=true"):
        evaluate(ckpt, data, tmp_path / "ev", record="final_test")
    with pytest.raises(RecipeError, match="no slides in split 'val'"):
        evaluate(ckpt, data, tmp_path / "ev", split="val", record="other")
    assert read_card(ckpt).to_dict() == before and not (tmp_path / "ev").exists()
