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
