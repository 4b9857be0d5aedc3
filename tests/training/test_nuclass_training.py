"""NuClass training: the authors' trio reader, the losses' parts, a tiny run, resume and DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from histoscope.training.nuclass import class_balanced_weights, macro_f1
from histoscope.training.nuclass_data import NuClassDataError, TrioSource, Window, mean2

TINY_MODEL = {
    "local": {"widths": [4, 8], "strides": [2, 2], "box_um": 8.0, "grid": 2},
    "context": {"widths": [4, 8], "strides": [2, 2], "pool_in": 2, "boxes_um": [16.0, 48.0],
                "grids": [2, 1]},
    "film_dim": 4, "hidden": 16, "proj": 8, "gate_proj": 4, "gate_hidden": [8, 4],
}  # fmt: skip


def write_trio(folder, n=16, merged=True, seed=0, context=1024):
    """A trio in the NuClass layout: class "big" has a large dark nucleus, "small" a small one."""
    import h5py

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:224, :224]
    ann, loc, ctx, keys = {}, [], [], []
    for i in range(n):
        big = i % 2 == 0
        r = (9 if big else 4) + rng.uniform(-1, 1)
        img = np.full((224, 224, 3), 225, np.uint8)
        img[(yy - 112) ** 2 + (xx - 112) ** 2 < r * r] = (70, 40, 120)
        loc.append(img)
        ctx.append(np.full((context, context, 3), rng.integers(180, 240), np.uint8))
        key = f"slide_{i}"
        keys.append(key)
        ann[key] = {"class_id": "big" if big else "small", "tissue_type": "Colon", "x": 1.0}
    ann["slide_x"] = {"class_id": "unlisted", "tissue_type": "colon"}
    (folder / "annotations.json").write_text(json.dumps(ann))
    for name, arrs in (("patches_224x224.h5", loc), ("patches_1024x1024.h5", ctx)):
        with h5py.File(folder / name, "w") as f:
            if merged:
                f.create_dataset("images", data=np.stack(arrs), compression="lzf")
                f.create_dataset("keys", data=np.array(keys, dtype="S"))
            else:
                for k, a in zip(keys, arrs, strict=True):
                    f.create_dataset(k, data=a, compression="lzf")
    return folder


@pytest.mark.parametrize("merged", [True, False], ids=["merged", "per-key"])
def test_trio_reader_reads_both_hdf5_layouts(tmp_path, merged):
    root = write_trio(tmp_path / "d" / "train", n=4, merged=merged)
    src = TrioSource(root.parent, ["big", "small"], ["colon", "unknown"], split="train",
                     local_size=64)  # fmt: skip
    assert len(src) == 4  # the unlisted class is skipped
    np.testing.assert_array_equal(src.y, [0, 1, 0, 1])
    np.testing.assert_array_equal(src.tissue, [0, 0, 0, 0])  # "Colon" normalised
    w = src.window(0)
    assert w.local.shape == (64, 64, 3) and w.context.shape == (512, 512, 3)
    np.testing.assert_allclose(w.local_xy, [[32.5, 32.5]])
    assert tuple(w.local[32, 32]) == (70, 40, 120)  # the nucleus sits where xy says
    moved = src.window(0, shift=(5, -3))
    np.testing.assert_allclose(moved.local_xy, [[27.5, 35.5]])
    other = TrioSource(root, ["big", "small"], ["lung", "unknown"])
    np.testing.assert_array_equal(other.tissue, [1, 1, 1, 1])  # unseen organ -> unknown


def test_trio_errors_name_the_file_and_reason(tmp_path):
    root = write_trio(tmp_path / "t", n=2)
    with pytest.raises(NuClassDataError, match="no NuClass trio"):
        TrioSource(tmp_path / "missing", ["big"], ["unknown"])
    (root / "annotations.json").write_text("{not json")
    with pytest.raises(NuClassDataError, match="annotations.json: not readable JSON"):
        TrioSource(root, ["big"], ["unknown"])
    (root / "annotations.json").write_text(json.dumps({"c1": {"tissue_type": "x"}}))
    with pytest.raises(NuClassDataError, match="no class_id"):
        TrioSource(root, ["big"], ["unknown"])
    (root / "annotations.json").write_text(json.dumps({"nope": {"class_id": "big"}}))
    with pytest.raises(NuClassDataError, match="no patch for cell 'nope'"):
        TrioSource(root, ["big"], ["unknown"]).window(0)
    (root / "patches_224x224.h5").write_bytes(b"garbage")
    with pytest.raises(NuClassDataError, match="not a readable HDF5"):
        TrioSource(root, ["big"], ["unknown"])


def test_class_balanced_weights_follow_the_effective_number():
    counts = np.array([10, 1000, 100000])
    w = class_balanced_weights(counts, 0.9999).numpy()
    raw = (1 - 0.9999) / (1 - 0.9999**counts)
    np.testing.assert_allclose(w, raw / raw.sum() * 3, rtol=1e-5)
    assert w[0] > w[1] > w[2]


def test_augment_moves_cells_with_their_pixels():
    from histoscope.training.nuclass import augment

    loc = np.zeros((40, 40, 3), np.uint8)
    ctx = np.zeros((30, 30, 3), np.uint8)
    loc[7, 25] = 255  # cell pixel: x = 25.5, y = 7.5
    ctx[3, 20] = 255
    w = Window(loc, ctx, np.array([[25.5, 7.5]], np.float32), np.array([[20.5, 3.5]], np.float32),
               np.array([1]), np.array([0]))  # fmt: skip
    for seed in range(12):
        a = augment(w, np.random.default_rng(seed))
        for img, xy in ((a.local, a.local_xy), (a.context, a.context_xy)):
            x, y = (int(np.floor(v)) for v in xy[0])
            assert img[y, x, 0] == 255


def test_mean2_and_macro_f1():
    img = np.arange(16, dtype=np.uint8).reshape(4, 4, 1).repeat(3, 2)
    np.testing.assert_array_equal(mean2(img)[..., 0], [[3, 5], [11, 13]])  # (0+1+4+5)/4 -> 2.5 -> 3
    f1, per = macro_f1(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), 3)
    assert per[0] == pytest.approx(2 / 3) and per[1] == pytest.approx(0.8)
    assert f1 == pytest.approx((2 / 3 + 0.8) / 2)  # class 2 absent from the truth


def _recipe(data, out, **train):
    return {
        "family": "nuclass",
        "data": {"path": str(data), "classes": ["big", "small"], "local_size": 64},
        "model": {**TINY_MODEL, "stages": {"local": {"epochs": 3}, "global": {"epochs": 1},
                                           "gate": {"epochs": 1}}},
        "train": {"batch": 4, "lr": 0.01, "seed": 0, "num_threads": 1, **train},
        "eval": {"test_seeds": []},
        "out": str(out),
    }  # fmt: skip


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    root = tmp_path_factory.mktemp("trio")
    write_trio(root / "train", n=16, seed=1, context=256)  # the reader takes any context size
    write_trio(root / "test", n=8, seed=2, context=256)
    return root


@pytest.fixture(scope="module")
def single(trio, tmp_path_factory):
    from histoscope.training import run

    out = tmp_path_factory.mktemp("single")
    return out, run(_recipe(trio, out))


def test_tiny_run_learns_resumes_and_evaluates(trio, single, tmp_path):
    from histoscope.checkpoints import load_checkpoint
    from histoscope.training import evaluate, run

    out, res = single
    m = res["metrics"]
    assert m["val"]["local"]["accuracy"] == 1.0  # a nucleus' size is all it takes
    assert set(m["temperature"]) == {"local", "global", "gate"}
    model, card = load_checkpoint(res["checkpoint"], family="nuclass")
    assert "synthetic" not in card.data["trained_on"] and card.classes == ("big", "small")
    assert card.input_spec["default_tissue"] == "unknown"
    again = run(_recipe(trio, out))  # resumes: every stage already done
    assert load_checkpoint(again["checkpoint"])[1].sha256 == card.sha256
    log = (out / "local" / "train_log.jsonl").read_text().splitlines()
    assert len(log) == 3
    ev = evaluate(res["checkpoint"], trio / "test", tmp_path / "ev")
    assert ev["crops"]["local"]["accuracy"] == 1.0
    assert (tmp_path / "ev" / "confusion_crops.png").stat().st_size > 0
    assert (tmp_path / "ev" / "reliability_crops.csv").read_text().startswith("lo,hi,n,")


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory):
    """A `histoscope synth`-style folder: one small slide in ``slides/`` with its cells.csv."""
    from histoscope.synthetic import generate

    root = tmp_path_factory.mktemp("synth")
    s = generate(root / "slides", "he", (256, 256), 3, 0.5, workers=1)
    (root / "manifest.json").write_text("{}")
    return root, s.cells_csv


def test_evaluate_finds_synth_slides_in_slides_folder(single, synth_data, tmp_path):
    import csv

    from histoscope.training import evaluate
    from histoscope.training._recipe import RecipeError

    _, res = single
    data, cells = synth_data
    with pytest.raises(RecipeError, match=r"no cell of the checkpoint's classes \['big'"):
        evaluate(res["checkpoint"], data, tmp_path / "none", per_class=2)
    rows = list(csv.DictReader(cells.open()))  # the tiny model knows "big" and "small" only
    for i, r in enumerate(rows):
        r["class"] = ("big", "small")[i % 2]
    with cells.open("w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    ev = evaluate(res["checkpoint"], data, tmp_path / "ev", per_class=2)
    assert {"fast", "crops"} <= set(ev)
    assert ev["slides"] == [cells.name.replace(".cells.csv", ".tif")]
    assert (tmp_path / "ev" / "cells_fast.csv").read_text().count("\n") == 1 + 4


def test_evaluate_refuses_what_it_cannot_run(single, trio, tmp_path):
    from histoscope.models.nuclass import UnknownOrganError
    from histoscope.training import evaluate
    from histoscope.training._recipe import RecipeError

    ckpt = single[1]["checkpoint"]
    with pytest.raises(RecipeError, match="per_class .* at least 1, got 0"):
        evaluate(ckpt, trio / "test", tmp_path / "a", per_class=0)
    with pytest.raises(RecipeError, match="trio holds crops.*path='fast'"):
        evaluate(ckpt, trio / "test", tmp_path / "b", path="fast")
    with pytest.raises(UnknownOrganError, match="'pancreas'.*'colon'"):
        evaluate(ckpt, trio / "test", tmp_path / "c", organ="pancreas")
    empty = tmp_path / "empty"
    (empty / "slides").mkdir(parents=True)
    with pytest.raises(RecipeError, match=r"nothing to evaluate: expected synthetic slides"):
        evaluate(ckpt, empty, tmp_path / "d")
    (empty / "slides" / "he_00001.tif").write_bytes(b"")
    with pytest.raises(RecipeError, match=r"1 \.tif without a \.cells\.csv .*he_00001\.tif"):
        evaluate(ckpt, empty, tmp_path / "e")


def test_two_process_ddp_matches_one_process(trio, single, tmp_path):
    script = tmp_path / "go.py"
    script.write_text(
        "import json, sys\nfrom histoscope.training import run\n"
        "r = run(json.loads(open(sys.argv[1]).read()))\n"
        "print('RESULT', json.dumps(r['metrics']['val']['local']))\n"
    )
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps(_recipe(trio, tmp_path / "ddp")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(recipe)]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [json.loads(line.split(" ", 1)[1]) for line in p.stdout.splitlines()
             if line.startswith("RESULT")]  # fmt: skip
    assert len(lines) == 2  # both ranks finished ...
    assert (tmp_path / "ddp" / "nuclass.safetensors").exists()  # ... rank 0 saved
    assert not (tmp_path / "ddp" / "local" / "rank1" / "nuclass.safetensors").exists()
    # each rank did half of every batch: same number of steps as one process
    rank1 = (tmp_path / "ddp" / "local" / "rank1" / "train_log.jsonl").read_text().splitlines()
    assert json.loads(rank1[0])["steps"] == 4
    assert lines[0] == lines[1]  # synchronised weights: identical validation on both ranks
    one = single[1]["metrics"]["val"]["local"]
    assert lines[0]["accuracy"] == pytest.approx(one["accuracy"], abs=0.13)


def test_recipe_errors_name_the_key(trio, tmp_path):
    from histoscope.training import RecipeError, run

    bad = _recipe(trio, tmp_path / "x")
    bad["model"]["stages"]["locale"] = {"epochs": 1}
    with pytest.raises(RecipeError, match="locale"):
        run(bad)
    bad = _recipe(trio, tmp_path / "x")
    del bad["data"]["classes"]
    with pytest.raises(RecipeError, match="data.classes"):
        run(bad)
    torch.set_num_threads(torch.get_num_threads())


def test_context_trunk_starts_from_the_local_trunk_and_stages_resume_independently():
    from histoscope.models.nuclass import NuClass
    from histoscope.training._recipe import fingerprint
    from histoscope.training.nuclass import _stage_recipe, transfer_trunk

    torch.manual_seed(0)
    m = NuClass({"classes": ["a", "b"], "tissues": ["unknown"], **TINY_MODEL})
    assert not torch.equal(m.local_trunk.layers[0].weight, m.context_trunk.layers[1].weight)
    assert transfer_trunk(m.local_trunk, m.context_trunk) == 4  # 2 convs + 2 batch norms
    assert torch.equal(m.local_trunk.layers[0].weight, m.context_trunk.layers[1].weight)
    r = _recipe("d", "o")
    r2 = json.loads(json.dumps(r))
    r2["model"]["stages"]["gate"]["epochs"] = 7  # a later stage changed ...
    r2["eval"]["test_seeds"] = [1]
    local = [fingerprint(_stage_recipe(x, "local")) for x in (r, r2)]
    gate = [fingerprint(_stage_recipe(x, "gate")) for x in (r, r2)]
    assert local[0] == local[1] and gate[0] != gate[1]  # ... only it starts over


def _cells(rng, slides, n=60, k=4, right=None):
    """Per-cell outputs of three paths on ``slides`` (names), ``right[s]`` = share typed right."""
    y = rng.integers(0, k, n * len(slides))
    slide = np.repeat(np.asarray(slides), n)
    res = {"y": y, "slide": slide, "g": rng.uniform(size=len(y))}
    for key in ("p_local", "p_global", "prob"):
        p = rng.dirichlet(np.ones(k), len(y))
        ok = rng.uniform(size=len(y)) < np.array([(right or {}).get(s, 0.7) for s in slide])
        p[ok, y[ok]] += 2.0  # these cells' top class is the truth
        res[key] = p / p.sum(1, keepdims=True)
    return res


def test_bootstrap_over_slides_pools_the_cell_metrics_and_resamples_whole_slides():
    from histoscope.training.nuclass_data import cell_metrics
    from histoscope.training.nuclass_eval import add_intervals, bootstrap_over_slides

    classes = ["a", "b", "c", "d"]
    rng = np.random.default_rng(0)
    res = _cells(rng, ["s1", "s2", "s3", "s4", "s5"], right={"s1": 0.2, "s2": 0.95})
    boot = bootstrap_over_slides(res, classes)
    ref = cell_metrics(res, classes)
    for path in ("local", "global", "gated"):  # all slides once = the pooled figures
        pt = boot["point"][path]
        for key in ("accuracy", "macro_f1", "ece"):
            assert pt[key] == pytest.approx(ref[path][key]), (path, key)
        np.testing.assert_allclose(pt["per_class_f1"], list(ref[path]["per_class_f1"].values()))
        lo, hi = boot[path]["accuracy"]
        assert hi - lo > 0.1  # one slide typed 20 % right, one 95 %: slides differ a lot
    assert boot["n_slides"] == 5 and boot["n_boot"] == 2000 and boot["seed"] == 0
    again = bootstrap_over_slides(res, classes)
    assert again["gated"]["macro_f1"] == boot["gated"]["macro_f1"]  # seeded
    m = add_intervals(cell_metrics(res, classes), boot)
    diff = m["gated"]["macro_f1"] - max(m["local"]["macro_f1"], m["global"]["macro_f1"])
    assert m["gated_minus_better"] == pytest.approx(diff)
    gl = m["global"]["per_class_f1"]["b"] - m["local"]["per_class_f1"]["b"]
    assert m["global_minus_local_f1"]["b"] == pytest.approx(gl)
    assert len(m["gated"]["per_class_f1_ci95"]["c"]) == 2


def test_bootstrap_resamples_slides_not_cells():
    """Identical slides: every resample is the pooled set, so a slide bootstrap has no spread."""
    from histoscope.training.nuclass_eval import bootstrap_over_slides

    one = _cells(np.random.default_rng(1), ["s1"], n=200)
    res = {k: np.concatenate([v] * 4) for k, v in one.items()}
    res["slide"] = np.repeat(["s1", "s2", "s3", "s4"], 200)
    boot = bootstrap_over_slides(res, ["a", "b", "c", "d"])
    for key in ("accuracy", "macro_f1", "ece"):
        lo, hi = boot["gated"][key]
        assert hi - lo == pytest.approx(0.0, abs=1e-12), key  # a cell bootstrap would spread


def _synth_folder(root, seed, split):
    """A one-slide synth folder with a manifest row; its cells relabelled 'big' / 'small'."""
    import csv

    from histoscope.synthetic import generate

    s = generate(root / "slides", "he", (256, 256), seed, 0.5, workers=1)
    rows = list(csv.DictReader(s.cells_csv.open()))
    for i, r in enumerate(rows):
        r["class"] = ("big", "small")[i % 2]
    with s.cells_csv.open("w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    row = {"name": s.slide.stem, "seed": seed, "split": split}
    (root / "manifest.json").write_text(json.dumps({"slides": [row]}))
    return root


def test_evaluate_records_a_final_test_into_the_card(single, tmp_path):
    import shutil

    from histoscope.checkpoints import read_card
    from histoscope.training import evaluate
    from histoscope.training._recipe import RecipeError

    ckpt = tmp_path / "ck.safetensors"
    shutil.copy(single[1]["checkpoint"], ckpt)
    before = read_card(ckpt)
    data = _synth_folder(tmp_path / "d", 5, "test")
    with pytest.raises(RecipeError, match="no labelled slide in split 'val'"):
        evaluate(ckpt, data, tmp_path / "v", per_class=2, split="val")
    ev = evaluate(ckpt, data, tmp_path / "ev", per_class=2, split="test", record="final_test")
    card = read_card(ckpt)
    assert card.sha256 == before.sha256  # the weights are untouched
    assert set(before.metrics) < set(card.metrics)  # every earlier key kept
    rec = card.metrics["final_test"]
    assert rec["seeds"] == [5] and rec["split"] == "test"
    assert rec["fast"]["gated"]["macro_f1"] == pytest.approx(ev["fast"]["gated"]["macro_f1"])
    assert rec["fast"]["bootstrap"]["n_boot"] == 2000
    assert len(rec["crops"]["gated"]["macro_f1_ci95"]) == 2
    with pytest.raises(RecipeError, match="already records metrics.final_test"):
        evaluate(ckpt, data, tmp_path / "again", per_class=2, record="final_test", split="test")
    assert not (tmp_path / "again" / "cells_fast.csv").exists()  # refused before typing


def test_markdown_table_shows_the_intervals_and_judges_the_targets():
    from histoscope.training.nuclass import markdown_table
    from histoscope.training.nuclass_data import cell_metrics
    from histoscope.training.nuclass_eval import add_intervals, bootstrap_over_slides

    classes = ["fibroblast", "lymphocyte"]
    res = _cells(np.random.default_rng(2), ["s1", "s2", "s3"], k=2)
    m = add_intervals(cell_metrics(res, classes), bootstrap_over_slides(res, classes))
    text = markdown_table({"fast": m})
    lo, hi = m["gated"]["macro_f1_ci95"]
    assert f"{m['gated']['macro_f1']:.3f} [{lo:.3f}, {hi:.3f}]" in text
    d = m["global_minus_local_f1"]["fibroblast"]
    assert ("global > local met" if d > 0 else "global > local **not met**") in text
    assert "| fast | 180 (3) |" in text
