"""Slide-level cell typing: the fast tile path against the crop path, order, cancel, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histoscope import celltypes
from histoscope.celltypes import CellTypes, CellTypesError, classify, explain_cell, iter_classify
from histoscope.checkpoints import ModelCard, load_checkpoint, save_checkpoint
from histoscope.models.nuclass import NuClass

CLASSES = ["a", "b", "c"]
TINY = {
    "classes": CLASSES,
    "tissues": ["colon", "unknown"],
    "local": {"widths": [4, 8], "strides": [2, 2], "box_um": 8.0, "grid": 2},
    "context": {"widths": [4, 8], "strides": [2, 2], "pool_in": 2, "boxes_um": [16.0, 48.0],
                "grids": [2, 1]},
    "film_dim": 4, "hidden": 16, "proj": 8, "gate_proj": 4, "gate_hidden": [8, 4],
}  # fmt: skip


@pytest.fixture(scope="module")
def slide_and_cells(tmp_path_factory):
    from histoscope.slide import open_slide
    from histoscope.synthetic import generate
    from histoscope.training.nuclass_eval import read_truth

    folder = tmp_path_factory.mktemp("ct")
    s = generate(folder, "he", (1024, 1024), 3990, 0.5, workers=1)
    truth = read_truth(s.cells_csv)
    slide = open_slide(s.slide)
    yield slide, truth
    slide.close()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    m = NuClass(TINY)
    with torch.no_grad():  # a gate that is neither 0 nor 1 everywhere
        m.gate_mlp[-1].bias.fill_(0.3)
    path = tmp_path_factory.mktemp("ck") / "tiny.safetensors"
    save_checkpoint(path, m, ModelCard(family="nuclass", config=m.config, classes=tuple(CLASSES)))
    return load_checkpoint(path, family="nuclass")


def _pick(truth, n, seed=0):
    rng = np.random.default_rng(seed)
    i = rng.choice(len(truth["x"]), size=n, replace=False)
    return truth["x"][i], truth["y"][i]


def test_fast_path_matches_crop_path_on_the_same_cells(slide_and_cells, checkpoint, monkeypatch):
    slide, truth = slide_and_cells
    model, card = checkpoint
    monkeypatch.setattr(celltypes, "TILE", 256)  # several tiles, cells near tile borders too
    x, y = _pick(truth, 12)
    # cells whose crops start on the tiles' stride lattice (16 px here: the context trunk's
    # stride at the context µm/px) see exactly the pixels and strides the tile pass sees, so
    # even random weights must give the same answer: the two reads put each cell at one place
    x, y = np.round(x / 16) * 16 + 0.3, np.round(y / 16) * 16 - 0.2
    fast = classify(slide, x, y, model, card, path="fast")
    crops = classify(slide, x, y, model, card, path="crops", batch=7)
    assert len(fast) == len(crops) == 12
    np.testing.assert_array_equal(fast.index, np.arange(12))
    np.testing.assert_allclose(fast.p_local, crops.p_local, atol=1e-4)
    np.testing.assert_allclose(fast.p_global, crops.p_global, atol=1e-4)
    np.testing.assert_allclose(fast.prob, crops.prob, atol=1e-4)
    part = classify(slide, x[:5], y[:5], model, card, path="fast")  # other neighbours per call
    np.testing.assert_allclose(part.prob, fast.prob[:5], atol=1e-5)
    shuffled = classify(slide, x[::-1], y[::-1], model, card, path="fast")
    np.testing.assert_allclose(shuffled.prob[::-1], fast.prob, atol=1e-6)
    # a cell moved by 10 µm is another cell
    moved = classify(slide, x + 20, y, model, card, path="fast")
    assert np.abs(moved.p_local - fast.p_local).max() > 1e-3


def test_tiles_run_in_spatial_order_and_cancel_keeps_finished_cells(
    slide_and_cells, checkpoint, monkeypatch
):
    slide, truth = slide_and_cells
    model, card = checkpoint
    monkeypatch.setattr(celltypes, "TILE", 256)
    x, y = truth["x"], truth["y"]
    gen = iter_classify(slide, x, y, model, card)
    keys, seen = [], []
    for _ in range(3):
        done, total, part = next(gen)
        assert total == len(x) and done == sum(len(p) for p in seen) + len(part)
        tx, ty = np.floor(x[part.index] / 256), np.floor(y[part.index] / 256)
        assert len(set(zip(tx, ty, strict=True))) == 1  # one tile per step
        keys.append((ty[0], tx[0]))
        seen.append(part)
    assert keys == sorted(keys)
    with pytest.raises(StopIteration) as stop:
        gen.send(False)
    kept = stop.value.value
    want = np.sort(np.concatenate([p.index for p in seen]))
    np.testing.assert_array_equal(kept.index, want)
    assert 0 < len(kept) < len(x)


def test_celltypes_table_operations():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(3), size=5).astype(np.float32)
    q = rng.dirichlet(np.ones(3), size=5).astype(np.float32)
    ct = CellTypes(("a", "b", "c"), p, p, q, np.linspace(0, 1, 5, dtype=np.float32), np.arange(5))
    np.testing.assert_array_equal(ct.pred, p.argmax(1))
    np.testing.assert_array_equal(ct.global_pred, q.argmax(1))
    np.testing.assert_allclose(ct.confidence, p.max(1))
    both = CellTypes.concat(
        [ct.subset([3, 4]), ct.subset(np.array([True, True, True, False, False]))]
    )
    np.testing.assert_array_equal(both.index, [3, 4, 0, 1, 2])
    np.testing.assert_array_equal(both.sorted().g, ct.g)
    with pytest.raises(CellTypesError):
        CellTypes.concat([ct, CellTypes.empty(("x", "y", "z"))])
    plain = CellTypes(("a", "b", "c"), p, p, q, ct.g)  # no index: the rows in input order
    np.testing.assert_array_equal(plain.subset([4, 1]).index, [4, 1])


def test_bad_input_is_refused_with_a_reason(slide_and_cells, checkpoint):
    slide, _ = slide_and_cells
    model, card = checkpoint
    with pytest.raises(CellTypesError, match="same length"):
        classify(slide, [1.0, 2.0], [1.0], model, card)
    with pytest.raises(CellTypesError, match="path"):
        classify(slide, [1.0], [1.0], model, card, path="slow")
    with pytest.raises(CellTypesError, match="nuclass"):
        classify(slide, [1.0], [1.0], model, ModelCard(family="clam", config={}))
    with pytest.raises(CellTypesError, match="finite"):
        classify(slide, [np.nan], [1.0], model, card)
    assert len(classify(slide, [], [], model, card)) == 0


def test_explain_cell_gives_crops_and_heatmaps(slide_and_cells, checkpoint):
    slide, truth = slide_and_cells
    model, card = checkpoint
    x, y = _pick(truth, 1, seed=3)
    e = explain_cell(slide, float(x[0]), float(y[0]), model, card)
    assert e["local"].shape == (224, 224, 3) and e["local"].dtype == np.uint8
    assert e["context"].shape == (512, 512, 3)
    assert e["local_cam"].shape == (224, 224) and e["context_cam"].shape == (512, 512)
    for cam in (e["local_cam"], e["context_cam"]):
        assert 0.0 <= cam.min() and cam.max() <= 1.0
    ref = classify(slide, x, y, model, card, path="crops")
    np.testing.assert_allclose(e["prob"], ref.prob[0], atol=1e-6)
    assert e["pred"] == CLASSES[int(ref.pred[0])]
