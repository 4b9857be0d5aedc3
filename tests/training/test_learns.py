"""Each training family learns: a tiny run beats chance on held-out data, label noise does not.

A held-out metric above chance alone does not show learning: on these synthetic
slides tumour tiles are darker than normal ones, so an *untrained* or
shuffled-label network often ranks them well by accident (tile AUC 0.95 with
shuffled labels was seen while writing this file). Each test therefore trains
the same tiny recipe three ways on the same slides, with only the train/val
labels changed, and scores the same untouched test labels:

- true labels: the ranking is good and the probabilities are right (log loss
  well below the ln 2 = 0.69 of a coin), and the calls beat the majority class;
- shuffled labels: the log loss / accuracy stays at chance;
- flipped labels (binary families): the ranking flips, so it came from the labels.

iSight's image-only heads did not clear chance reliably in a CPU budget of
seconds (its recipe trains 300 epochs on 672 slides); its test checks the
heads that do learn fast: tissue (read from the metadata text) and location.
"""

from __future__ import annotations

import csv
import json
from collections import Counter

import numpy as np
import pytest
import torch

from histoscope.synthetic._dataset import write_dataset
from histoscope.training import run as run_recipe
from histoscope.training.metrics import roc_auc

#: Seeds for the slides trained on here (far from the recipes' 1000/5000/7000/9000 ranges).
TILE_SEED, CLAM_SEED, ISIGHT_SEED = 70005, 70400, 70600


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one torch thread avoids OpenMP waits on a busy shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean binary cross-entropy of tumour probabilities ``p`` against labels ``y``."""
    q = np.clip(np.where(y == 1, p, 1 - p), 1e-7, 1.0)
    return float(-np.log(q).mean())


def _relabel(labels: np.ndarray, how: str, rng: np.random.Generator) -> np.ndarray:
    if how == "shuffled":
        return rng.permutation(labels)
    if how == "flipped":
        return 1 - labels
    return labels


# ------------------------------------------------------------ tile classifier
@pytest.fixture(scope="module")
def tile_sets(tmp_path_factory):
    """Tiles of four 1 mm H&E slides, each with tumour (one train pair, one val, one test)."""
    from histoscope.training._tiles import load_split

    root = tmp_path_factory.mktemp("learn_tiles")
    write_dataset(root, kind="he", size=(1024, 1024), seed=TILE_SEED, count=4, mpp=1.0,
                  fractions=(0.5, 0.25, 0.25))  # fmt: skip
    sets = {sp: load_split(root, sp, mpp=2.0, tile_size=32) for sp in ("train", "val", "test")}
    for sp, tiles in sets.items():
        assert min(tiles.counts().values()) >= 20, (sp, tiles.counts())
    return sets


def _train_tiles(sets, how: str, folder) -> np.ndarray:
    """Train on a patch folder whose train/val labels are ``how``; test tumour probabilities."""
    from PIL import Image

    from histoscope.checkpoints import load_checkpoint
    from histoscope.training.tile_classifier import predict

    rng = np.random.default_rng(0)
    for split, tiles in sets.items():
        labels = tiles.labels if split == "test" else _relabel(tiles.labels, how, rng)
        for i, (img, lab) in enumerate(zip(tiles.images, labels, strict=True)):
            sub = folder / "data" / split / ("tumour" if lab else "normal")
            sub.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(sub / f"{i:04d}.png")
    result = run_recipe({
        "family": "tile_classifier",
        "data": {"path": str(folder / "data"), "mpp": 2.0, "tile_size": 32},
        "model": {"backbone": "test_cnn", "dropout": 0.1},
        "augment": {"flips": True, "hed_sigma": 0.05, "hed_bias": 0.05},
        "train": {"epochs": 6, "batch": 16, "lr": 0.01, "seed": 3, "samples_per_epoch": 256,
                  "num_threads": 1},
        "out": str(folder / "run"),
    })  # fmt: skip
    model, card = load_checkpoint(result["checkpoint"], family="tile_classifier")
    return predict(model, sets["test"].images, card.input_spec)


def test_tile_classifier_learns_tumour_tiles(tile_sets, tmp_path):
    y = tile_sets["test"].labels
    seen = {}
    for how in ("true", "shuffled", "flipped"):
        p = _train_tiles(tile_sets, how, tmp_path / how)
        seen[how] = {"auc": roc_auc(y, p), "log_loss": _log_loss(y, p)}
    true, shuffled, flipped = seen["true"], seen["shuffled"], seen["flipped"]
    # trained: ranks and calibrates held-out tiles (chance: AUC 0.5, log loss 0.69)
    assert true["auc"] >= 0.9 and true["log_loss"] <= 0.35, seen
    # shuffled labels never reach that log loss (their AUC may: tumour tiles are darker)
    assert shuffled["log_loss"] >= 0.45, seen
    # flipped labels flip the ranking: it follows the labels, not the initial weights
    assert flipped["auc"] <= 0.1, seen


# ----------------------------------------------------------------------- clam
@pytest.fixture(scope="module")
def clam_slides(tmp_path_factory):
    """Thirty 640 µm H&E slides: 16 train, 4 val, 10 test, benign and tumour in each."""
    root = tmp_path_factory.mktemp("learn_clam")
    write_dataset(root, kind="he", size=(640, 640), seed=CLAM_SEED, count=30, mpp=1.0,
                  fractions=(0.5, 0.15, 0.35))  # fmt: skip
    manifest = json.loads((root / "manifest.json").read_text())
    for split in ("train", "val", "test"):
        assert {r["label"] for r in manifest["slides"] if r["split"] == split} == {0, 1}, split
    return root


def _relabelled_manifest(root, how: str, folder):
    """A dataset folder that reads ``root``'s slides with its train/val labels ``how``."""
    manifest = json.loads((root / "manifest.json").read_text())
    rows = [r for r in manifest["slides"] if r["split"] != "test"]
    labels = _relabel(np.array([r["label"] for r in rows]), how, np.random.default_rng(0))
    for r, lab in zip(rows, labels, strict=True):
        r["label"] = int(lab)
    for r in manifest["slides"]:  # absolute paths: the slide files are shared, not copied
        for key in ("slide", "label_json", "cells_geojson", "cells_csv", "tumour_mask"):
            r[key] = str(root / r[key])
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _train_clam(root, how: str, tmp_path, cache) -> tuple[np.ndarray, np.ndarray]:
    """Train CLAM with train/val labels ``how``; test labels and tumour probabilities."""
    data = root if how == "true" else _relabelled_manifest(root, how, tmp_path / how / "data")
    out = tmp_path / how / "run"
    run_recipe({
        "family": "clam",
        "data": {"path": str(data), "cache": str(cache)},
        # Frozen features of the embedded patch classifier, as training/clam.yaml uses: the
        # 16-d features of a random test_cnn did not let CLAM learn on 16 slides (the
        # per-slide stain spread swamps the tumour signal in random features).
        "model": {"hidden": 16, "attn_hidden": 8, "k_sample": 4,
                  "features": {"checkpoint": "tumour_patch_default.safetensors"}},
        "train": {"epochs": 20, "lr": 5e-3, "optimiser": "adam", "batch": 1, "seed": 0,
                  "num_threads": 1},
        "eval": {"baseline": False, "stain_shift": False},
        "out": str(out),
    })  # fmt: skip
    with open(out / "slides.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["model"] == "clam" and r["set"] == "test"]
    return np.array([int(r["label"]) for r in rows]), np.array([float(r["p_tumour"]) for r in rows])


def test_clam_learns_slide_labels(clam_slides, tmp_path):
    cache = tmp_path / "features"  # shared: the three runs encode the same slides once
    seen, y = {}, None
    for how in ("true", "shuffled", "flipped"):
        y, p = _train_clam(clam_slides, how, tmp_path, cache)
        seen[how] = {"accuracy": float(((p >= 0.5) == y).mean()), "auc": roc_auc(y, p),
                     "log_loss": _log_loss(y, p)}  # fmt: skip
    majority = max(y.mean(), 1 - y.mean())  # 0.6: six tumour, four benign test slides
    true, shuffled, flipped = seen["true"], seen["shuffled"], seen["flipped"]
    assert true["accuracy"] >= max(0.8, majority + 0.2), (majority, seen)
    assert true["auc"] >= 0.9 and true["log_loss"] <= 0.4, seen
    assert shuffled["accuracy"] <= majority + 0.1 and shuffled["log_loss"] >= 0.55, seen
    assert flipped["auc"] <= 0.1 and flipped["accuracy"] <= 0.3, seen


# --------------------------------------------------------------------- isight
@pytest.fixture(scope="module")
def ihc_slides(tmp_path_factory):
    """Small IHC slides (128 µm at 0.5 µm/px) with HPA-style labels in ``hpa.csv``."""
    root = tmp_path_factory.mktemp("learn_ihc")
    write_dataset(root, kind="ihc", size=(256, 256), seed=ISIGHT_SEED, count=150, mpp=0.5,
                  fractions=(0.6, 0.15, 0.25))  # fmt: skip
    return root


def _train_isight(root, how: str, out) -> dict:
    """Train iSight on ``hpa.csv`` with train/val rows' labels ``how``; test metrics."""
    from histoscope.models.isight import TASKS
    from histoscope.training.isight import train

    table = root / "hpa.csv"
    if how == "shuffled":  # each train/val row gets another row's five labels
        with open(table, newline="") as fh:
            rows = list(csv.DictReader(fh))
        idx = [i for i, r in enumerate(rows) if r["split"] != "test"]
        new = [dict(r) for r in rows]
        for i, j in zip(idx, np.random.default_rng(0).permutation(idx), strict=True):
            new[i].update({t: rows[j][t] for t in TASKS})
        table = root / "hpa_shuffled.csv"
        with open(table, "w", newline="") as fh:
            wr = csv.DictWriter(fh, fieldnames=list(rows[0]))
            wr.writeheader()
            wr.writerows(new)
    recipe = {
        "family": "isight",
        "data": {"path": str(table), "max_tiles": 16,
                 "tissue": {"channel": "grey", "background_margin": 0.08}},
        "model": {"backbone": "test_cnn", "backbone_kwargs": {"mpp": 0.5}, "input_space": "od",
                  "dim": 32, "hidden": 16, "dropout": 0.0, "meta_buckets": 64},
        "augment": {"tiles_per_bag": 8},
        "train": {"epochs": 40, "batch": 8, "lr": 0.01, "seed": 0, "num_threads": 1},
        "eval": {"measure": False},
        "out": str(out),
    }  # fmt: skip
    return train(recipe, out)["metrics"]["test"]["model"]


def test_isight_learns_from_its_labels(ihc_slides, tmp_path):
    with open(ihc_slides / "hpa.csv", newline="") as fh:
        test_rows = [r for r in csv.DictReader(fh) if r["split"] == "test"]
    majority = {t: max(Counter(r[t] for r in test_rows).values()) / len(test_rows)
                for t in ("tissue", "location")}  # fmt: skip
    seen = {}
    for how in ("true", "shuffled"):
        m = _train_isight(ihc_slides, how, tmp_path / how)
        seen[how] = {"tissue_accuracy": m["tissue"]["accuracy"],
                     "location_accuracy": m["location"]["accuracy"],
                     "location_balanced_accuracy": m["location"]["balanced_accuracy"]}  # fmt: skip
    true, shuffled = seen["true"], seen["shuffled"]
    # tissue (8 organs, from the metadata text): far above the majority organ
    assert true["tissue_accuracy"] >= majority["tissue"] + 0.4, (majority, seen)
    assert shuffled["tissue_accuracy"] <= majority["tissue"] + 0.1, (majority, seen)
    # location: above the majority call, and every class found better than chance (0.25)
    assert true["location_accuracy"] >= majority["location"] + 0.05, (majority, seen)
    assert true["location_balanced_accuracy"] >= 0.5, seen
    assert shuffled["location_balanced_accuracy"] <= 0.35, seen
