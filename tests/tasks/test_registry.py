"""The task registry: every task runs through hs.tasks.run, saves what it computed, and refuses bad input."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass

import numpy as np
import pytest
import tifffile

import histoscope as hs
from histoscope._data import sample_data_path
from histoscope.errors import CheckpointError
from histoscope.params import ParamError


@pytest.fixture(scope="module")
def he(tmp_path_factory):
    from histoscope.synthetic import generate

    return generate(tmp_path_factory.mktemp("he"), kind="he", size=(1024, 1024), seed=4).slide


@pytest.fixture(scope="module")
def ihc(tmp_path_factory):
    from histoscope.synthetic import generate

    return generate(tmp_path_factory.mktemp("ihc"), kind="ihc", size=(1024, 1024), seed=5).slide


def _tissue(res, files):
    doc = json.loads(files["tissue.json"].read_text())
    assert doc["tissue_fraction"] == pytest.approx(res.summary()["tissue_fraction"])
    np.testing.assert_array_equal(tifffile.imread(files["tissue_mask.tif"]) > 0, res.mask.mask)


def _tumour(res, files):
    np.testing.assert_array_equal(tifffile.imread(files["tumour_heatmap.tif"]), res.values)
    with open(files["tumour_heatmap_tiles.csv"]) as fh:
        assert len(list(csv.DictReader(fh))) == len(res.grid)


def _gradcam(res, files):
    np.testing.assert_array_equal(np.load(files["gradcam.npy"]), res.cam)


def _mil(res, files):
    doc = json.loads(files["mil.json"].read_text())
    assert doc["prediction"] == res.label and doc["probability"] == res.summary()["probability"]
    np.testing.assert_array_equal(np.load(files["mil_attention.npy"]), res.attention.values)


def _ihc(res, files):
    with open(files["ihc_cells.csv"]) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == res.n_cells > 0
    assert json.loads(files["ihc_measure.json"].read_text())["summary"] == res.summary()


def _isight(res, files):
    assert json.loads(files["isight.json"].read_text())["calls"] == res.calls()
    np.testing.assert_array_equal(np.load(files["isight_attention.npy"]), res.attention.values)


def _report(res, files):
    doc = json.loads(files["report.json"].read_text())
    assert doc["text"] == res.text and len(doc["sentences"]) == len(res.sentences)
    assert "MACHINE-GENERATED" in files["report.md"].read_text()


def _cells(res, files):
    table = hs.read_geojson(files["cells.geojson"])
    assert len(table) == res.n_cells > 0 and (table["object_type"] == "cell").all()
    assert json.loads(files["cells.json"].read_text())["summary"] == res.summary()


def _expression(res, files):
    import anndata as ad

    a16 = ad.read_h5ad(files["expression_bins_016um.h5ad"])
    assert a16.n_obs > 0 and list(a16.var_names) == list(res.genes)
    assert json.loads(files["expression.json"].read_text())["summary"] == res.summary()


@dataclass(frozen=True)
class Case:
    task: str
    slide: str
    check: object
    kwargs: tuple = ()


CASES = [
    Case("tissue", "he", _tissue),
    Case("tumour", "he", _tumour),
    Case("gradcam", "he", _gradcam, (("near", (600.0, 600.0)),)),
    Case("mil", "he", _mil),
    Case("ihc", "ihc", _ihc, (("region", (256, 256, 512, 512)),)),
    Case("isight", "ihc", _isight, (("metadata", "Tissue: colon."),)),
    Case("cells", "he", _cells, (("region", (256, 256, 512, 512)),)),
    Case("report", "he", _report),
    Case("expression", "he", _expression, (("region", (256, 256, 512, 512)),)),
]


def test_every_registered_task_has_a_case():
    assert {c.task for c in CASES} == set(hs.tasks.available())


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.task)
def test_task_runs_through_the_registry_and_round_trips_through_save(case, request, tmp_path):
    slide = request.getfixturevalue(case.slide)
    steps = []
    res = hs.tasks.run(case.task, slide, progress=steps.append, **dict(case.kwargs))
    assert res.provenance.task == case.task and not res.cancelled
    assert steps and steps[-1].done == steps[-1].total
    json.dumps(res.summary())  # plain data
    assert res.to_layers() and all(kind in ("image", "labels", "points") for *_, kind in
                                   res.to_layers())  # fmt: skip
    files = res.save(tmp_path)
    assert files and all(p.exists() and p.parent == tmp_path for p in files)
    assert not list(tmp_path.glob(".*.part*"))
    case.check(res, {p.name: p for p in files})


def test_tissue_mask_is_computed_once_for_tissue_tumour_and_mil(he, tmp_path):
    from histoscope.analyze import analyze_slide

    doc = analyze_slide(he, tmp_path, ["tissue", "tumour", "mil"])
    assert doc["computed"]["tissue"] == 1
    assert json.loads((tmp_path / "analyze.json").read_text())["computed"]["tissue"] == 1
    # and the products really are shared: the session hands back the same objects
    session = hs.open_session(he, in_memory=True)
    hs.tasks.run("tumour", session)
    hs.tasks.run("mil", session)
    assert session.computed["tissue"] == 1 and session.computed["grid"] == 1


def test_the_family_is_checked_in_python(he):
    with pytest.raises(CheckpointError, match="clam"):
        hs.tasks.run("mil", he, sample_data_path("tumour_patch_default.safetensors"))
    with pytest.raises(CheckpointError, match="tile_classifier"):
        hs.tasks.run("tumour", he, sample_data_path("clam_default.safetensors"))


def test_a_cached_model_is_still_family_checked(he):
    session = hs.open_session(he, in_memory=True)
    clam = sample_data_path("clam_default.safetensors")
    hs.tasks.run("mil", session, clam)
    with pytest.raises(CheckpointError, match="tile_classifier"):
        hs.tasks.run("tumour", session, clam)


@pytest.mark.parametrize(
    ("task", "values", "match"),
    [
        ("tumour", {"min_tissue": 1.5}, r"tumour.min_tissue=1.5: must be a number from 0.0 to 1.0"),
        ("tumour", {"stain_norm": "maybe"}, "one of auto, on, off"),
        ("ihc", {"compartment": "nuclear"}, "one of nucleus, cytoplasm, membrane, cell, auto"),
        ("mil", {"top_k": 2.5}, "must be an integer"),
        ("tissue", {"colour": "red"}, "unknown parameter.*colour.*known: background_margin"),
        ("nope", {}, "unknown task 'nope'; choose from tissue"),
    ],
)
def test_bad_parameters_are_refused_by_name(he, task, values, match):
    with pytest.raises(ParamError, match=match):
        hs.tasks.run(task, he, **values)


def test_region_and_point_are_checked(he):
    with pytest.raises(ParamError, match="takes no region"):
        hs.tasks.run("mil", he, region=(0, 0, 10, 10))
    with pytest.raises(ParamError, match="needs a point"):
        hs.tasks.run("gradcam", he)


def test_cancel_returns_the_tiles_finished(he):
    import threading

    from histoscope.engine import EngineParams

    stop = threading.Event()

    def progress(step):
        if step.total:  # cancel after the first batch
            stop.set()

    res = hs.tasks.run("tumour", he, progress=progress, cancel=stop,
                       engine=EngineParams(batch_size=2, workers=1, prefetch=1))  # fmt: skip
    assert res.cancelled and res.n_scored == 2 < len(res.grid)


def test_regions_and_points_off_the_slide_are_refused(he, ihc):
    with pytest.raises(ParamError, match="lies outside the slide"):
        hs.tasks.run("ihc", ihc, region=(5000, 5000, 512, 512))
    with pytest.raises(ParamError, match="outside the slide"):
        hs.tasks.run("gradcam", he, near=(99999.0, 99999.0))
    res = hs.tasks.run("ihc", ihc, region=(768, 768, 99999, 99999))  # clipped to the slide
    assert res.provenance.tile_grid["region"] == [768, 768, 256, 256]


def test_a_feature_file_of_another_slide_is_refused(he, ihc, tmp_path):
    from histoscope.features import FeatureFileError

    session = hs.open_session(he, tmp_path / "sess")
    hs.tasks.run("mil", session)
    [h5] = (tmp_path / "sess" / "features").glob("*.h5")
    with pytest.raises(FeatureFileError, match="not of"):
        hs.tasks.run("mil", ihc, features=str(h5))


def test_mil_reuses_the_tiles_the_tumour_map_encoded_and_the_map_is_unchanged(he):
    from histoscope.engine import run_tiles
    from histoscope.tasks.tumour import _prob_model, tumour_index

    session = hs.open_session(he, in_memory=True)
    heat = hs.tasks.run("tumour", session)
    call = hs.tasks.run("mil", session)
    assert session.computed["features"] == 1  # the classifier's backbone ran once for both
    model, card = session.model(hs.tasks.get("tumour").default_checkpoint_path(), None)
    direct = run_tiles(_prob_model(model, model.input_spec, None, tumour_index(card.classes)),
                       session.slide, heat.grid, model.input_spec).outputs  # fmt: skip
    g = heat.grid
    np.testing.assert_allclose(heat.values[g.index[:, 0], g.index[:, 1]], direct, atol=1e-6)
    alone = hs.tasks.run("mil", he)
    np.testing.assert_allclose(call.probability, alone.probability, atol=1e-6)


def test_cancel_while_loading_stops_before_any_work(he):
    import threading

    from histoscope.progress import Cancelled

    stop = threading.Event()
    session = hs.open_session(he, in_memory=True)
    with pytest.raises(Cancelled):
        hs.tasks.run("tumour", session, progress=lambda step: stop.set(), cancel=stop)
    assert session.computed["grid"] == 0 and session.computed["model"] == 0
