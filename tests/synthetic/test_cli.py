"""``histoscope synth``: a dataset with splits and a manifest."""

from __future__ import annotations

import csv
import json

import pytest

from histoscope.cli import main
from histoscope.synthetic._dataset import assign_splits


def test_synth_writes_a_split_dataset(tmp_path, capsys):
    out = tmp_path / "ds"
    rc = main(["synth", str(out), "--kind", "ihc", "--size", "512", "640", "--seed", "20",
               "--count", "3", "--quiet"])  # fmt: skip
    assert rc == 0
    assert capsys.readouterr().out.strip().endswith("manifest.json")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 3
    assert sorted(sum(manifest["splits"].values(), [])) == [f"ihc_{s:05d}" for s in (20, 21, 22)]
    assert all(manifest["splits"][s] for s in ("train", "val", "test"))
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert [r["name"] for r in rows] == [r["name"] for r in manifest["slides"]]
    for r in rows:
        assert (out / r["slide"]).is_file() and (out / r["cells_geojson"]).is_file()
        assert r["quantity"] in ("none", "<25%", "25-75%", ">75%")
    hpa = list(csv.DictReader(open(out / "hpa.csv")))
    assert [h["split"] for h in hpa] == [r["split"] for r in rows]


def test_synth_rejects_a_negative_size(tmp_path, capsys):
    rc = main(["synth", str(tmp_path / "x"), "--size", "-4", "512"])
    assert rc == 2
    assert "size" in capsys.readouterr().err


def test_splits_are_deterministic_and_cover_every_slide():
    a = assign_splits(20, seed=1)
    assert a == assign_splits(20, seed=1)
    assert a != assign_splits(20, seed=2)
    assert (a.count("train"), a.count("val"), a.count("test")) == (14, 3, 3)
    with pytest.raises(ValueError, match="count"):
        assign_splits(0, seed=1)


def test_dataset_with_extras_has_reports_by_split(tmp_path):
    from histoscope.synthetic import write_dataset

    manifest = write_dataset(tmp_path, "he", (384, 384), seed=50, count=3, extras=True)
    rows = json.loads(manifest.read_text())["slides"]
    reports = json.loads((tmp_path / "reports.json").read_text())
    assert set(reports) == {"train", "val", "test"}
    for r in rows:
        (entry,) = [e for e in reports[r["split"]] if e["id"] == r["name"]]
        assert entry["image_path"] == r["slide"] and entry["report"]
        assert (tmp_path / r["visium_matrix"]).is_file()
        assert (tmp_path / r["nuclass_patches_224"]).is_file()
