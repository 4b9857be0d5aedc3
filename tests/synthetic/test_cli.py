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


def test_synth_tumour_extent_keeps_only_slides_of_that_extent(tmp_path):
    from histoscope.synthetic._params import sample_params

    out = tmp_path / "foci"
    rc = main(["synth", str(out), "--size", "384", "384", "--mpp", "1.0", "--seed", "40",
               "--count", "3", "--tumour-extent", "focus", "--quiet"])  # fmt: skip
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    seeds = manifest["seeds"]
    assert len(seeds) == 3 and seeds == sorted(seeds) and seeds[0] >= 40
    skipped = [s for s in range(40, seeds[-1]) if s not in seeds]
    assert skipped, "seeds 40.. are not all focus slides, so some must have been skipped"
    assert all(sample_params("he", s, (384, 384), 1.0).tumour_extent != "focus" for s in skipped)
    rows = manifest["slides"]
    assert [r["seed"] for r in rows] == seeds
    assert {r["tumour_extent"] for r in rows} == {"focus"}
    label = json.loads((out / rows[0]["label_json"]).read_text())
    assert label["tumour_extent"] == "focus" and 0 < label["tumour_fraction"] < 0.1
    assert sorted(sum(manifest["splits"].values(), [])) == sorted(r["name"] for r in rows)
    csv_rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert [int(r["seed"]) for r in csv_rows] == seeds
    assert all((out / r["slide"]).is_file() for r in rows)


def test_synth_benign_set_and_bad_extent(tmp_path, capsys):
    from histoscope.synthetic.cli import seeds_with_extent

    seeds = seeds_with_extent("he", "none", 0, 4, (512, 512), 1.0)
    assert len(seeds) == 4 and seeds != seeds_with_extent("he", "extensive", 0, 4, (512, 512), 1.0)
    with pytest.raises(ValueError, match="tumour extent"):
        seeds_with_extent("he", "huge", 0, 1, (512, 512), 1.0)
    assert main(["synth", str(tmp_path / "x"), "--tumour-extent", "huge"]) == 2
    assert "huge" in capsys.readouterr().err


def test_synth_extent_checks_first_shows_the_scan_and_writes_the_manifest_once(
    tmp_path, capsys, monkeypatch
):
    from histoscope.synthetic import _params, cli
    from histoscope.synthetic._dataset import write_dataset

    # size / mpp / kind are refused before a single seed is drawn
    drawn = []
    real = _params.sample_params
    monkeypatch.setattr(_params, "sample_params", lambda *a: drawn.append(a) or real(*a))
    for bad, match in ((["--size", "100", "100"], "size"), (["--mpp", "50"], "mpp")):
        assert main(["synth", str(tmp_path / "x"), "--tumour-extent", "none", *bad]) == 2
        assert match in capsys.readouterr().err
    with pytest.raises(ValueError, match="kind"):
        cli.seeds_with_extent("xyz", "none", 0, 1, (512, 512), 1.0)
    assert drawn == [] and not (tmp_path / "x").exists()
    # the scan is reported unless --quiet
    assert main(["synth", str(tmp_path / "y"), "--size", "384", "384", "--mpp", "1",
                 "--count", "2", "--tumour-extent", "none"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "[scan 1/2] seed" in err and "[scan 2/2]" in err and "[2/2] he_" in err
    # an existing folder keeps its manifest until the new set is complete; an
    # interrupted run leaves the old manifest, never one that lists part of the slides
    out = tmp_path / "z"
    write_dataset(out, "he", (384, 384), seed=0, count=2, mpp=1.0)
    old = (out / "manifest.json").read_text()
    seeds = cli.seeds_with_extent("he", "none", 100, 3, (384, 384), 1.0)

    def stop(done, total, name):
        assert (out / "manifest.json").read_text() == old
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cli.write_selected(out, "he", (384, 384), seeds, 1.0, progress=stop)
    assert (out / "manifest.json").read_text() == old
    doc = json.loads(cli.write_selected(out, "he", (384, 384), seeds, 1.0).read_text())
    assert doc["seeds"] == seeds and [r["seed"] for r in doc["slides"]] == seeds
    assert doc["first_seed"] == seeds[0] and doc["count"] == 3
