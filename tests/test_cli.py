"""The ``histoscope`` command line, run in-process."""

from __future__ import annotations

import csv
import json

import pytest

from histoscope.cli import main


def test_info_prints_levels_and_mpp(pyramid_tiff, capsys):
    assert main(["info", str(pyramid_tiff), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["mpp"] == 0.5 and info["levels"][0] == [1536, 2304]


def test_analyze_tissue_and_ihc_on_real_ihc_image(tmp_path, capsys):
    from PIL import Image
    from skimage import data

    png = tmp_path / "ihc.png"
    Image.fromarray(data.immunohistochemistry()).save(png)
    out = tmp_path / "out"
    rc = main(["analyze", str(png), "--tasks", "tissue,ihc", "--mpp", "0.5",
               "--compartment", "membrane", "--out", str(out)])  # fmt: skip
    assert rc == 0
    with open(out / "ihc_cells.csv") as fh:
        rows = list(csv.DictReader(fh))
    summary = json.loads((out / "ihc_measure.json").read_text())["summary"]
    assert len(rows) == summary["n_cells"] > 150
    tissue = json.loads((out / "tissue.json").read_text())
    assert tissue["tissue_fraction"] > 0.3 and tissue["mask_mpp"] == 8.0
    assert (out / "tissue_mask.tif").stat().st_size > 0


def test_missing_slide_is_a_clear_error(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope.svs")]) == 2
    assert "nope.svs: no such file" in capsys.readouterr().err


def test_unknown_task_is_refused(pyramid_tiff, tmp_path, capsys):
    assert main(["analyze", str(pyramid_tiff), "--tasks", "magic", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown task(s) magic" in err and "tumour" in err and len(err.splitlines()) == 1


def test_analyze_tumour_writes_aligned_heatmap_tiles_and_overview(tmp_path, capsys):
    import numpy as np
    import tifffile
    import torch
    from PIL import Image

    from histoscope.checkpoints import save_checkpoint
    from histoscope.models import TileClassifier
    from histoscope.slide import write_pyramidal_tiff
    from tests.conftest import make_rgb

    img = np.full((1024, 1024, 3), 245, np.uint8)
    img[256:, 256:] = make_rgb(768, 768)
    slide = write_pyramidal_tiff(tmp_path / "s.tif", img, mpp=0.5, min_size=256)
    torch.manual_seed(0)
    model = TileClassifier("test_cnn", 2, backbone_kwargs={"tile_size": 32, "mpp": 4.0})
    card = {"family": "tile_classifier", "config": model.config, "classes": ["normal", "tumour"],
            "input_spec": model.input_spec.to_dict()}  # fmt: skip
    ckpt = save_checkpoint(tmp_path / "tiny", model, card)
    out = tmp_path / "out"
    rc = main(["analyze", str(slide), "--tasks", "tissue,tumour", "--tumour-checkpoint", str(ckpt),
               "--out", str(out)])  # fmt: skip
    assert rc == 0
    with tifffile.TiffFile(out / "tumour_heatmap.tif") as tif:
        heat = tif.asarray()
        xres = tif.pages[0].tags["XResolution"].value
    assert heat.shape == (4, 4)  # 512 µm / (32 px * 4 µm)
    assert 1e4 / (xres[0] / xres[1]) == pytest.approx(128.0)  # µm per heatmap pixel
    assert np.isnan(heat[0, 0]) and np.isfinite(heat[3, 3])  # glass corner vs tissue
    with open(out / "tumour_heatmap_tiles.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == int(np.isfinite(heat).sum())
    assert Image.open(out / "tumour_heatmap_overview.png").size[0] > 0
    meta = json.loads((out / "tumour_heatmap.json").read_text())
    assert meta["provenance"]["checkpoint_sha256"]


def test_analyze_mil_with_embedded_default(tmp_path):
    from histoscope.synthetic import generate

    slide = generate(tmp_path / "s", kind="he", size=(1024, 1024), seed=4).slide
    assert main(["analyze", str(slide), "--tasks", "tissue,mil", "--out", str(tmp_path / "o")]) == 0
    doc = json.loads((tmp_path / "o" / "mil.json").read_text())
    import histoscope as hs

    direct = hs.tasks.run("mil", slide).summary()  # the CLI writes what the Python path computes
    assert doc["prediction"] == direct["prediction"]
    for k, v in direct["probability"].items():
        assert doc["probability"][k] == pytest.approx(v, abs=1e-6)
    assert doc["provenance"]["checkpoint_sha256"]


def test_analyze_ihc_writes_model_calls_beside_the_measurement(tmp_path):
    from histoscope.synthetic import generate

    slide = generate(tmp_path / "s", kind="ihc", size=(1024, 1024), seed=8).slide
    rc = main(["analyze", str(slide), "--tasks", "ihc,isight", "--metadata", "Tissue: colon.",
               "--out", str(tmp_path / "o")])  # fmt: skip
    assert rc == 0
    doc = json.loads((tmp_path / "o" / "isight.json").read_text())
    assert set(doc["calls"]) == {"intensity", "location", "quantity", "tissue", "malignancy"}
    import histoscope as hs

    direct = hs.tasks.run("isight", slide, metadata="Tissue: colon.").calls()
    for task, call in doc["calls"].items():
        assert call["call"] == direct[task]["call"]
        for k, v in direct[task]["probabilities"].items():
            assert call["probabilities"][k] == pytest.approx(v, abs=1e-6)
    assert doc["provenance"]["params"]["metadata"] == "Tissue: colon."
    measured = json.loads((tmp_path / "o" / "ihc_measure.json").read_text())["summary"]
    assert measured["n_cells"] > 0 and "h_score" in measured
    assert (tmp_path / "o" / "isight_attention.npy").exists()


@pytest.fixture(scope="module")
def he_slide(tmp_path_factory):
    from histoscope.synthetic import generate

    return generate(tmp_path_factory.mktemp("he"), kind="he", size=(1024, 1024), seed=4).slide


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--tasks", "tumour", "--tumour-min-tissue", "1.5"],
         "--tumour-min-tissue '1.5': must be a number from 0.0 to 1.0"),
        (["--tasks", "ihc", "--compartment", "nuclear", "--mpp", "0.5"],
         "--ihc-compartment 'nuclear': must be one of nucleus, cytoplasm, membrane, cell, auto"),
        (["--tasks", "tissue", "--tumour-stain-norm", "on"], "task 'tumour' is not in --tasks"),
        (["--tasks", "tumour", "--tumour-colour", "red"], "unrecognized arguments: --tumour-colour"),
        (["--tasks", "ihc", "--region", "1,2,3"], "--region '1,2,3': must be 4 comma-separated"),
        (["--tasks", "mil", "--mil-checkpoint", "TUMOUR"], "family 'tile_classifier', expected 'clam'"),
        (["--tasks", "tumour", "--tumour-checkpoint", "CLAM"], "family 'clam', expected 'tile_classifier'"),
        (["--tasks", "tumour", "--tumour-checkpoint", "nope.safetensors"], "nope.safetensors"),
    ],
    ids=["range", "choices", "stray-option", "unknown-option", "region", "clam-family",
         "tumour-family", "missing-checkpoint"],
)  # fmt: skip
def test_bad_arguments_are_one_line_and_status_2(he_slide, tmp_path, capsys, argv, says):
    from histoscope._data import sample_data_path

    names = {"TUMOUR": "tumour_patch_default.safetensors", "CLAM": "clam_default.safetensors"}
    argv = [str(sample_data_path(names[a])) if a in names else a for a in argv]
    rc = main(["analyze", str(he_slide), "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and says in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_an_image_without_mpp_is_a_clear_error(tmp_path, capsys):
    from PIL import Image
    from skimage import data

    png = tmp_path / "ihc.png"
    Image.fromarray(data.immunohistochemistry()).save(png)
    rc = main(["analyze", str(png), "--tasks", "ihc", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "ihc.png" in err and "--mpp" in err and len(err.splitlines()) == 1


def test_features_file_in_clam_layout_is_what_mil_reads(he_slide, tmp_path, capsys):
    import h5py

    from histoscope._data import sample_data_path

    clam = str(sample_data_path("clam_default.safetensors"))
    h5 = tmp_path / "f.h5"
    assert main(["features", str(he_slide), "--checkpoint", clam, "--out", str(h5)]) == 0
    with h5py.File(h5) as f:
        feats, coords = f["features"][:], f["coords"][:]
        attrs = dict(f["coords"].attrs)
    assert feats.ndim == 2 and coords.shape == (len(feats), 2) and len(feats) > 0
    assert attrs["patch_size"] == 128 and attrs["patch_size_level0"] == 256.0
    assert attrs["mpp"] == 1.0
    # MIL on the file gives the same call as MIL encoding the slide itself
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    assert main(["analyze", str(he_slide), "--tasks", "mil", "--out", str(out_a)]) == 0
    assert main(["analyze", str(he_slide), "--tasks", "mil", "--mil-features", str(h5),
                 "--out", str(out_b)]) == 0  # fmt: skip
    a = json.loads((out_a / "mil.json").read_text())
    b = json.loads((out_b / "mil.json").read_text())
    assert a["prediction"] == b["prediction"]
    for k, v in a["probability"].items():
        assert b["probability"][k] == pytest.approx(v, abs=1e-5)
    assert [t["x"] for t in a["top_tiles"]] == [t["x"] for t in b["top_tiles"]]


def test_session_dir_keeps_the_feature_table_for_the_next_run(he_slide, tmp_path):
    sess = tmp_path / "sess"
    argv = ["analyze", str(he_slide), "--tasks", "mil", "--session-dir", str(sess)]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert len(list((sess / "features").glob("*.h5"))) == 1
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    doc = json.loads((tmp_path / "b" / "analyze.json").read_text())
    assert doc["computed"].get("features", 0) == 0  # read back from the session folder


def test_region_for_tasks_that_take_none_is_refused_and_mpp_override_is_said(
    he_slide, tmp_path, capsys
):
    rc = main(["analyze", str(he_slide), "--tasks", "tumour,mil", "--region", "0,0,512,512",
               "--out", str(tmp_path / "o")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "a region applies to ihc, isight" in err and len(err.splitlines()) == 1
    assert main(["analyze", str(he_slide), "--tasks", "tissue", "--mpp", "0.25",
                 "--out", str(tmp_path / "p")]) == 0  # fmt: skip
    assert "records 0.5 µm/px; using --mpp 0.25" in capsys.readouterr().err
