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


def test_unknown_task_is_refused(pyramid_tiff, tmp_path):
    with pytest.raises(SystemExit, match="unknown task"):
        main(["analyze", str(pyramid_tiff), "--tasks", "magic", "--out", str(tmp_path)])


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
    from histoscope._data import sample_data_path
    from histoscope.synthetic import generate

    if sample_data_path("clam_default.safetensors") is None:
        pytest.skip("embedded CLAM default missing")
    slide = generate(tmp_path / "s", kind="he", size=(1024, 1024), seed=4).slide
    assert main(["analyze", str(slide), "--tasks", "tissue,mil", "--out", str(tmp_path / "o")]) == 0
    doc = json.loads((tmp_path / "o" / "mil.json").read_text())
    assert doc["prediction"] in doc["probability"]
    assert sum(doc["probability"].values()) == pytest.approx(1.0, abs=1e-5)
    assert doc["provenance"]["checkpoint_sha256"]


def test_analyze_ihc_writes_model_calls_beside_the_measurement(tmp_path):
    from histoscope._data import sample_data_path
    from histoscope.synthetic import generate

    if sample_data_path("isight_default.safetensors") is None:
        pytest.skip("embedded iSight default missing")
    slide = generate(tmp_path / "s", kind="ihc", size=(1024, 1024), seed=8).slide
    rc = main(["analyze", str(slide), "--tasks", "ihc", "--metadata", "Tissue: colon.",
               "--out", str(tmp_path / "o")])  # fmt: skip
    assert rc == 0
    doc = json.loads((tmp_path / "o" / "ihc.json").read_text())
    assert set(doc["calls"]) == {"intensity", "location", "quantity", "tissue", "malignancy"}
    for task in doc["calls"].values():
        assert sum(task["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert doc["measurement"]["n_cells"] > 0 and "h_score" in doc["measurement"]
    assert (tmp_path / "o" / "isight_attention.npy").exists()
