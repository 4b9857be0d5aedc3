"""The cells task: nuclei found tile by tile, typed, one points layer, QuPath / CSV / AnnData out."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import histoscope as hs
from histoscope.params import ParamError
from histoscope.tasks.cells import CellsParams, class_palette, outline_labels


@pytest.fixture(scope="module")
def he(tmp_path_factory):
    from histoscope.synthetic import generate

    return generate(tmp_path_factory.mktemp("he"), kind="he", size=(1536, 1536), seed=21)


@pytest.fixture(scope="module")
def nuclass_ckpt(tmp_path_factory):
    """A NuClass checkpoint with random weights: typing runs, its answers mean nothing."""
    import torch

    from histoscope.checkpoints import ModelCard, save_checkpoint
    from histoscope.models.nuclass import NuClass

    torch.manual_seed(0)
    classes = ["tumour", "lymphocyte", "fibroblast"]
    model = NuClass({"classes": classes, "tissues": ["colon", "unknown"]})
    card = ModelCard(family="nuclass", config=model.config, classes=tuple(classes),
                     input_spec={"mpp": 0.5})  # fmt: skip
    path = tmp_path_factory.mktemp("ck") / "nuclass_random.safetensors"
    save_checkpoint(path, model, card)
    return path


@pytest.fixture(scope="module")
def cells(he, nuclass_ckpt):
    return hs.tasks.run("cells", he.slide, nuclass_ckpt)


def test_palette_is_fixed_and_colours_any_number_of_classes():
    names = [f"class {i}" for i in range(40)]
    pal = class_palette(names)
    assert pal.shape == (40, 3) and len({tuple(c) for c in pal}) == 40
    np.testing.assert_array_equal(class_palette(names[:5]), pal[:5])  # class i: same colour
    assert tuple(class_palette(["a", "b"], {"b": (1, 2, 3)})[1]) == (1, 2, 3)


def test_cells_are_found_typed_and_placed(he, cells):
    from scipy.spatial import cKDTree

    truth = pd.read_csv(he.cells_csv)
    n = cells.n_cells
    assert 0.6 * len(truth) < n < 1.4 * len(truth), (n, len(truth))
    # the cells sit on true nuclei: most detections within 4 µm (8 px) of one, and the reverse
    found = np.c_[cells.nuclei.x, cells.nuclei.y]
    true = truth[["x", "y"]].to_numpy()
    assert (cKDTree(true).query(found)[0] <= 8).mean() > 0.85
    assert (cKDTree(found).query(true)[0] <= 8).mean() > 0.75
    prob = cells.types.prob
    assert prob.shape == (n, len(cells.classes))
    s = cells.summary()
    assert sum(c["count"] for c in s["classes"].values()) == n
    # a card without a training-data reference: the flag is unknown, and says why
    assert s["outside_training_data"] is None
    assert s["ood"]["message"] == "no training-data reference in this checkpoint"
    # density against the generator's own count over the same tissue
    assert s["cells_per_mm2"] == pytest.approx(len(truth) / s["tissue_mm2"], rel=0.3)
    assert not cells.cancelled
    ((coords, kw, kind),) = cells.to_layers()
    assert kind == "points" and coords.shape == (n, 2)
    np.testing.assert_allclose(coords[:, 1], cells.nuclei.x * cells.slide_mpp)
    assert cells.slide_mpp == 0.5
    feats = kw["features"]
    assert {"class", "gate", "confidence", "disagree", "Nucleus: Area µm^2"} <= set(feats.columns)
    assert all(f"prob: {c}" in feats.columns for c in cells.classes)
    # the points' class and probability columns are each cell's own, in the cells' order
    for i, c in enumerate(cells.classes):
        np.testing.assert_allclose(feats[f"prob: {c}"].to_numpy(), prob[:, i], rtol=1e-5)
    assert list(feats["class"].astype(str)) == [cells.classes[k] for k in prob.argmax(axis=1)]
    # each point's colour is its class's palette colour
    pal = cells.palette() / 255.0
    np.testing.assert_allclose(kw["face_color"][:, :3], pal[cells.types.pred], atol=1e-6)


def test_saved_files_open_as_qupath_cells_csv_and_anndata(cells, tmp_path):
    import anndata

    files = {p.name: p for p in cells.save(tmp_path)}
    assert set(files) == {"cells.geojson", "cells.csv", "cells.h5ad", "cells.json"}
    table = hs.read_geojson(files["cells.geojson"])
    assert len(table) == cells.n_cells
    assert (table["object_type"] == "cell").all() and table["nucleus"].notna().all()
    assert list(table["classification"]) == [cells.classes[i] for i in cells.types.pred]
    np.testing.assert_allclose(table["Gate g"], cells.types.g, atol=1e-6)
    assert "Nucleus: Area µm^2" in table.columns
    csv = pd.read_csv(files["cells.csv"])
    assert len(csv) == cells.n_cells and list(csv["class"][:5]) == list(table["classification"][:5])
    ad = anndata.read_h5ad(files["cells.h5ad"])
    assert ad.n_obs == cells.n_cells
    np.testing.assert_allclose(ad.obsm["spatial"][:, 0], cells.nuclei.x * cells.slide_mpp)
    assert list(ad.obs["class"].cat.categories) == list(cells.classes)
    assert len(ad.uns["class_colors"]) == len(cells.classes)  # scanpy's colours for "class"
    assert ad.uns["class_colors"][0] == "#{:02x}{:02x}{:02x}".format(*cells.palette()[0])
    doc = json.loads(files["cells.json"].read_text())
    assert doc["summary"]["n_cells"] == cells.n_cells
    assert doc["provenance"]["checkpoint_sha256"]


def test_region_keeps_only_its_cells(he, nuclass_ckpt, cells):
    region = (256, 384, 700, 500)
    res = hs.tasks.run("cells", he.slide, nuclass_ckpt, region=region)
    x, y = res.nuclei.x, res.nuclei.y
    assert len(x) > 0
    assert (x >= 256).all() and (x < 956).all() and (y >= 384).all() and (y < 884).all()
    inside = ((cells.nuclei.x >= 256) & (cells.nuclei.x < 956) & (cells.nuclei.y >= 384)
              & (cells.nuclei.y < 884))  # fmt: skip
    assert abs(len(x) - inside.sum()) <= 0.05 * inside.sum() + 2


def test_cancel_keeps_the_finished_tiles(he, nuclass_ckpt):
    steps = []

    def stop_after_first(step):
        steps.append(step)
        return step.total == 0 or step.done < 1

    res = hs.tasks.run("cells", he.slide, nuclass_ckpt, progress=stop_after_first)
    assert res.cancelled
    grid = res.provenance.tile_grid
    assert grid["tiles_done"] == 1 < grid["tiles"]
    assert 0 < res.n_cells and len(res.types) == res.n_cells
    s = res.summary()  # part of the tissue was searched: no density from the whole area
    assert s["cells_per_mm2"] is None and all(c["per_mm2"] is None for c in s["classes"].values())


def test_detect_only(he, nuclass_ckpt, cells):
    res = hs.tasks.run("cells", he.slide, nuclass_ckpt, classify=False)
    assert res.types is None and res.n_cells == cells.n_cells
    ((coords, kw, _),) = res.to_layers()
    assert "class" not in kw["features"].columns
    assert "classes" not in res.summary()


def test_outline_labels_cover_the_centroids(cells):
    region = (200, 200, 600, 600)
    labels, (ty, tx), mpp = outline_labels(cells, region)
    assert labels.shape == (600, 600) and (ty, tx) == (200 * mpp, 200 * mpp)
    x, y = cells.nuclei.x, cells.nuclei.y
    inside = np.flatnonzero((x >= 210) & (x < 790) & (y >= 210) & (y < 790))
    hit = labels[(y[inside] - 200).astype(int), (x[inside] - 200).astype(int)] == inside + 1
    assert hit.mean() > 0.9


@pytest.mark.parametrize(
    "values, text",
    [({"min_area_um2": 50.0, "max_area_um2": 20.0}, "larger than min_area_um2"),
     ({"detector": "hovernet"}, "must be one of"),
     ({"batch": 0}, "batch")],
)  # fmt: skip
def test_bad_params_are_refused_by_name(values, text):
    with pytest.raises(ParamError, match=text):
        CellsParams(**values)


def test_an_organ_the_checkpoint_does_not_know_is_refused(he, nuclass_ckpt):
    with pytest.raises(ParamError, match="knows colon"):
        hs.tasks.run("cells", he.slide, nuclass_ckpt, organ="lvier", region=(0, 0, 256, 256))
    res = hs.tasks.run("cells", he.slide, nuclass_ckpt, organ="colon", region=(0, 0, 512, 512))
    assert res.provenance.params["organ"] == "colon"


def test_large_max_area_widens_the_tile_overlap():
    p = CellsParams(max_area_um2=2000.0).nuclei_params()
    assert p.overlap_um >= 2 * np.sqrt(2000.0 / np.pi)


def test_expression_after_cells_gives_each_cell_its_mean_expression(he, nuclass_ckpt, tmp_path):
    import anndata

    from histoscope.tasks.expression import cell_expression

    session = hs.open_session(he.slide, in_memory=True)
    region = (384, 384, 512, 512)
    cells = hs.tasks.run("cells", session, nuclass_ckpt, region=region)
    expr = hs.tasks.run("expression", session, region=region)
    assert expr.cells is cells and expr.cell_values.shape == (cells.n_cells, len(expr.genes))
    inner = ((cells.nuclei.x > 420) & (cells.nuclei.x < 860) & (cells.nuclei.y > 420)
             & (cells.nuclei.y < 860))  # fmt: skip
    # NaN only under patches left out (too little tissue): most cells inside have values
    assert inner.any() and np.isfinite(expr.cell_values[inner]).all(axis=1).mean() > 0.8
    again = cell_expression(expr.stack, cells.nuclei.x, cells.nuclei.y,
                            outlines=cells.nuclei.outlines)  # fmt: skip
    np.testing.assert_array_equal(again, expr.cell_values)
    files = {p.name: p for p in expr.save(tmp_path)}
    ad = anndata.read_h5ad(files["cells_expression.h5ad"])
    assert ad.shape == (cells.n_cells, len(expr.genes)) and list(ad.var_names) == list(expr.genes)
    np.testing.assert_allclose(ad.obsm["spatial"][:, 1], cells.nuclei.y * cells.slide_mpp)
    assert list(ad.obs["class"]) == [cells.classes[i] for i in cells.types.pred]
    assert expr.summary()["cells"] == cells.n_cells
