"""Attention MIL task: features through the engine, slide prediction, attention heatmap."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from histoscope.checkpoints import ModelCard, load_checkpoint, save_checkpoint
from histoscope.errors import CheckpointError
from histoscope.models.clam import build_mil
from histoscope.tasks.mil import (
    feature_model_for,
    iter_mil,
    mil_predict,
    patch_classifier_features,
    registry_features,
    run_mil,
    tile_grid_for,
)

FEATURES = {"tile_size": 32, "mpp": 4.0}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory):
    """A 768 x 768 synthetic H&E slide at 1 µm/px with a tumour (seed 5: extensive)."""
    from histoscope.synthetic import generate

    s = generate(tmp_path_factory.mktemp("mil"), "he", (768, 768), seed=5, mpp=1.0)
    assert s.read_label()["label"] == 1
    return s.slide


@pytest.fixture
def slide(slide_path):
    from histoscope.slide import open_slide

    with open_slide(slide_path) as s:
        yield s


def clam_checkpoint(tmp_path, fm, variant="sb", n_classes=2):
    torch.manual_seed(1)
    model = build_mil({"variant": variant, "in_dim": fm.feature_dim, "n_classes": n_classes,
                       "hidden": 8, "attn_hidden": 4, "dropout": 0.0})  # fmt: skip
    classes = ("normal", "tumour", "other")[:n_classes]
    card = ModelCard(family="clam", config=model.config, classes=classes,
                     input_spec=fm.spec.to_dict(), data={"features": fm.descriptor})  # fmt: skip
    return load_checkpoint(save_checkpoint(tmp_path / f"clam_{variant}", model, card))


def drain(gen):
    steps = []
    while True:
        try:
            steps.append(next(gen))
        except StopIteration as stop:
            return steps, stop.value


def test_mil_result_matches_the_model_on_the_engine_features(tmp_path, slide):
    fm = registry_features("test_cnn", FEATURES, seed=3)
    model, card = clam_checkpoint(tmp_path, fm)
    steps, res = drain(iter_mil(slide, model, card, top_k=5))
    grid = res.attention.grid
    assert steps[-1][:2] == (len(grid), len(grid)) and len(grid) > 10
    # the same numbers as the model on features computed outside the task
    from histoscope.engine import run_tiles

    feats = run_tiles(fm.module, slide, grid, fm.spec).outputs
    prob, att = mil_predict(model, feats)
    np.testing.assert_allclose(res.probability, prob, rtol=1e-5)
    np.testing.assert_allclose(res.tile_attention, att[0], rtol=1e-5)
    assert res.predicted == int(np.argmax(prob)) and res.label == card.classes[res.predicted]
    # heatmap: tiles hold their weights (summing to 1), background is NaN
    vals = res.attention.values
    assert np.isfinite(vals).sum() == len(grid)
    assert np.isfinite(vals).sum() == np.isfinite(res.tile_attention).sum()
    r, c = grid.index[0]
    assert vals[r, c] == pytest.approx(res.tile_attention[0])
    # top-k tiles: highest attention first, on grid corners
    top = res.top_tiles
    assert [t["rank"] for t in top] == [1, 2, 3, 4, 5]
    assert [t["attention"] for t in top] == sorted(res.tile_attention, reverse=True)[:5]
    corners = {tuple(xy) for xy in grid.coords.tolist()}
    assert all((t["x"], t["y"]) in corners for t in top)


def test_layers_are_placed_in_micrometres_with_transparent_background(tmp_path, slide):
    fm = registry_features("test_cnn", FEATURES, seed=3)
    model, card = clam_checkpoint(tmp_path, fm)
    res = run_mil(slide, model, card, top_k=3)
    (heat, hkw, hkind), (pts, pkw, pkind) = res.to_layers()
    g = res.attention.grid
    step = g.stride * g.slide_mpp  # 128 µm tiles
    assert hkind == "image" and pkind == "points" and step == pytest.approx(128.0)
    assert hkw["scale"] == (step, step)
    assert hkw["translate"] == pytest.approx(((g.stride / 2 - 0.5) * g.slide_mpp,) * 2)
    assert np.isnan(heat).any() and hkw["metadata"]["mil"]["prediction"] == res.label
    # the first point is the centre of the most attended tile, in µm (y, x)
    t = res.top_tiles[0]
    want = [
        (t["y"] + g.stride / 2 - 0.5) * g.slide_mpp,
        (t["x"] + g.stride / 2 - 0.5) * g.slide_mpp,
    ]
    np.testing.assert_allclose(pts[0], want)
    # that point lands on the heatmap pixel holding the top attention
    i, j = np.round((pts[0] - np.array(hkw["translate"])) / step).astype(int)
    assert heat[i, j] == pytest.approx(t["attention"])


def test_save_writes_mil_json_and_attention(tmp_path, slide):
    fm = registry_features("test_cnn", FEATURES, seed=3)
    model, card = clam_checkpoint(tmp_path, fm, variant="mb", n_classes=3)
    res = run_mil(slide, model, card, top_k=4)
    files = res.save(tmp_path / "out")
    names = {f.name for f in files}
    assert {"mil.json", "mil_attention.npy", "mil.provenance.json"} <= names
    doc = json.loads((tmp_path / "out" / "mil.json").read_text())
    assert doc["prediction"] in ("normal", "tumour", "other")
    assert doc["probability"] == res.summary()["probability"]
    assert len(doc["top_tiles"]) == 4 and doc["provenance"]["task"] == "mil"
    assert doc["provenance"]["checkpoint_sha256"] == card.sha256
    assert (
        doc["provenance"]["params"]["feature_backbone"]["weights_sha256"]
        == (fm.descriptor["weights_sha256"])
    )
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "mil_attention.npy"),
                                  res.attention.values)  # fmt: skip
    # multi-branch: the heatmap shows the predicted class's branch
    _, att = mil_predict(model, _features(fm, slide, res.attention.grid))
    np.testing.assert_allclose(res.tile_attention, att[res.predicted], rtol=1e-5)


def _features(fm, slide, grid):
    from histoscope.engine import run_tiles

    return run_tiles(fm.module, slide, grid, fm.spec).outputs


def test_card_names_the_feature_backbone_and_wrong_weights_are_refused(tmp_path, slide):
    fm = registry_features("test_cnn", FEATURES, seed=3)
    _, card = clam_checkpoint(tmp_path, fm)
    again = feature_model_for(card)
    assert again.descriptor["weights_sha256"] == fm.descriptor["weights_sha256"]
    bad = dict(card.data["features"], seed=4)
    with pytest.raises(CheckpointError, match="other weights"):
        feature_model_for(replace(card, data={"features": bad}))
    gone = dict(card.data["features"], checkpoint="no_such_patch_model.safetensors")
    with pytest.raises(CheckpointError, match="no_such_patch_model"):
        feature_model_for(replace(card, data={"features": gone}))
    with pytest.raises(CheckpointError, match="feature backbone"):
        feature_model_for(replace(card, data={}))


def test_features_from_a_patch_classifier_checkpoint(tmp_path, slide):
    from histoscope.models import TileClassifier

    torch.manual_seed(0)
    clf = TileClassifier("test_cnn", 2, backbone_kwargs=FEATURES)
    path = save_checkpoint(tmp_path / "patch", clf, {"family": "tile_classifier",
                           "config": clf.config, "classes": ["normal", "tumour"],
                           "input_spec": clf.input_spec.to_dict()})  # fmt: skip
    fm = patch_classifier_features(path)
    assert fm.descriptor["checkpoint"] == "patch.safetensors"
    assert fm.descriptor["checkpoint_sha256"] and fm.feature_dim == 16
    model, card = clam_checkpoint(tmp_path, fm)
    card = replace(card, data={"features": dict(card.data["features"], checkpoint=str(path))})
    res = run_mil(slide, model, card)
    assert res.provenance.params["feature_backbone"]["checkpoint"] == "patch.safetensors"
    # a feature model of the wrong size is refused before any tile is read
    other = registry_features("test_cnn", {**FEATURES, "widths": [4, 8]}, seed=0)
    with pytest.raises(ValueError, match="8-d features"):
        run_mil(slide, model, card, feature_model=other)


def test_no_tissue_is_a_clear_error(tmp_path, slide):
    fm = registry_features("test_cnn", FEATURES, seed=3)
    model, card = clam_checkpoint(tmp_path, fm)
    assert len(tile_grid_for(slide, fm.spec, min_tissue=1.0)) == 0
    with pytest.raises(ValueError, match="no tissue tiles"):
        run_mil(slide, model, card, min_tissue=1.0)


@pytest.mark.parametrize(
    ("seed", "label"), [(20, "tumour"), (24, "normal")], ids=["tumour", "benign"]
)
def test_default_checkpoint_on_a_generated_slide(tmp_path, seed, label):
    """The committed CLAM default rebuilds its feature backbone and finds the tumour."""
    from PIL import Image

    from histoscope._data import sample_data_path
    from histoscope.slide import open_slide
    from histoscope.synthetic import generate

    model, card = load_checkpoint(sample_data_path("clam_default.safetensors"), family="clam")
    assert card.data["features"]["checkpoint"] == "tumour_patch_default.safetensors"
    s = generate(tmp_path, "he", (1024, 1024), seed=seed, mpp=1.0)  # 20: moderate, 24: none
    with open_slide(s.slide) as slide:
        res = run_mil(slide, model, card, top_k=3)
    assert res.label == label and res.probability.max() > 0.9
    if label == "tumour":
        mask = np.asarray(Image.open(s.tumour_mask)) > 0
        um = s.read_label()["mask_um_per_px"]
        half = res.attention.grid.stride / 2
        for t in res.top_tiles:  # the most attended tiles are centred on tumour
            assert mask[int((t["y"] + half) / um), int((t["x"] + half) / um)]


def test_cancelling_keeps_the_tiles_encoded_so_far(tmp_path, slide):
    from histoscope.engine import EngineParams

    fm = registry_features("test_cnn", FEATURES, seed=3)
    model, card = clam_checkpoint(tmp_path, fm)
    gen = iter_mil(slide, model, card, params=EngineParams(batch_size=8, workers=1))
    done, total, *_ = next(s for s in gen if s.total)  # past the phases without a count
    assert (done, total) == (8, total) and total > 8
    try:
        gen.send(False)
    except StopIteration as stop:
        res = stop.value
    assert res.cancelled and res.summary()["cancelled"] and res.provenance.cancelled
    assert np.isfinite(res.tile_attention).sum() == 8
    assert np.isfinite(res.attention.values).sum() == 8
