"""One synthetic slide end to end: files, their real readers, determinism, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from histoscope.synthetic import CELL_CLASSES, CLASS_COLORS, generate

SIZE = (1024, 1280)


@pytest.fixture(scope="module")
def he(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("he"), "he", SIZE, seed=3)


@pytest.fixture(scope="module")
def ihc(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("ihc"), "ihc", SIZE, seed=7)


def test_slide_opens_with_openslide_and_histoscope(he):
    import openslide

    import histoscope as hs

    osl = openslide.OpenSlide(str(he.slide))
    assert osl.dimensions == (SIZE[1], SIZE[0])
    assert float(osl.properties["openslide.mpp-x"]) == pytest.approx(0.5, rel=1e-3)
    region = np.asarray(osl.read_region((0, 0), 0, (256, 256)).convert("RGB"))
    osl.close()
    with hs.open_slide(he.slide) as slide:
        assert slide.mpp == pytest.approx(0.5, rel=1e-3)
        assert len(slide.levels) >= 2
        mine = slide.read_region(0, 0, 256, 256, mpp=0.5)
    # the same JPEG tiles decoded by two libraries
    assert np.abs(mine.astype(int) - region.astype(int)).mean() < 2.0


def test_pyramid_is_jpeg_tiled(he):
    import tifffile

    with tifffile.TiffFile(he.slide) as tf:
        page = tf.pages[0]
        assert page.is_tiled and page.tilewidth == 256
        assert page.compression == tifffile.COMPRESSION.JPEG
        assert page.shape[:2] == SIZE


def test_slide_is_tissue_on_glass(he):
    import tifffile

    img = tifffile.imread(he.slide)
    label = he.read_label()
    bg = np.asarray(label["params"]["background"])
    glass = np.all(np.abs(img.astype(float) - bg) < 12, axis=-1).mean()
    assert 0.05 < glass < 0.95  # some glass, some tissue
    assert img.std() > 20  # not a flat colour


def test_cells_csv_and_geojson_agree(he):
    rows = list(csv.DictReader(open(he.cells_csv)))
    gj = json.loads(Path(he.cells_geojson).read_text())
    assert gj["type"] == "FeatureCollection"
    assert len(gj["features"]) == len(rows) > 100
    f = gj["features"][0]
    assert f["geometry"]["type"] == "Polygon"
    ring = f["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] and len(ring) >= 9
    assert f["properties"]["objectType"] == "detection"
    name = f["properties"]["classification"]["name"]
    assert name in CELL_CLASSES
    assert f["properties"]["classification"]["color"] == CLASS_COLORS[name]
    # the polygon surrounds the centroid written in the CSV
    row = rows[0]
    xs, ys = np.asarray(ring)[:, 0], np.asarray(ring)[:, 1]
    assert xs.min() <= float(row["x"]) <= xs.max() and ys.min() <= float(row["y"]) <= ys.max()
    counts = {}
    for r in rows:
        counts[r["class"]] = counts.get(r["class"], 0) + 1
    assert counts == {k: v for k, v in he.read_label()["cell_counts"].items() if v}


def test_nuclei_are_dark_where_the_truth_says(he):
    """Pixels at cell centroids are darker than the tissue around them."""
    import tifffile

    img = tifffile.imread(he.slide).astype(float).sum(-1)
    rows = list(csv.DictReader(open(he.cells_csv)))
    cls = np.array([r["class"] for r in rows])
    y = np.array([float(r["y"]) for r in rows]).round().astype(int)
    x = np.array([float(r["x"]) for r in rows]).round().astype(int)
    at = img[y, x]
    beside = img[np.clip(y + 25, 0, SIZE[0] - 1), np.clip(x + 25, 0, SIZE[1] - 1)]
    dense = np.isin(cls, ["lymphocyte", "fibroblast", "smooth_muscle", "neutrophil"])
    assert np.median(at[dense]) < np.median(beside[dense]) - 60


def test_masks_carry_their_scale(he):
    from PIL import Image

    label = he.read_label()
    with Image.open(he.tumour_mask) as im:
        mask = np.asarray(im)
        dpi = im.info["dpi"][0]
    assert 25400 / dpi == pytest.approx(label["mask_um_per_px"], rel=1e-3)
    expected = (np.ceil(SIZE[0] * 0.5 / 16), np.ceil(SIZE[1] * 0.5 / 16))
    assert mask.shape == expected
    assert set(np.unique(mask)) <= {0, 255}
    tissue = np.asarray(Image.open(he.tissue_map)) > 0
    frac = (mask > 0).sum() / max(1, tissue.sum())
    assert frac == pytest.approx(label["tumour_fraction"])
    assert label["malignant"] == (label["tumour_extent"] != "none") == bool(mask.any())


def test_ihc_row_has_the_five_labels(ihc):
    from histoscope.synthetic import (
        INTENSITY_CLASSES,
        LOCATION_CLASSES,
        MALIGNANCY_CLASSES,
        ORGANS,
        QUANTITY_CLASSES,
    )

    (row,) = list(csv.DictReader(open(ihc.hpa_csv)))
    assert row["image_path"] == ihc.slide.name
    assert row["intensity"] in INTENSITY_CLASSES
    assert row["location"] in LOCATION_CLASSES
    assert row["quantity"] in QUANTITY_CLASSES
    assert row["malignancy"] in MALIGNANCY_CLASSES
    assert row["tissue"] in ORGANS
    assert row["antibody"] in row["metadata"] and row["snomed"] in row["metadata"]
    lab = ihc.read_label()["ihc"]
    assert (row["quantity"] == "none") == (row["intensity"] == "negative")
    assert (row["location"] == "none") == (row["intensity"] == "negative")
    frac = lab["positive_fraction"]
    expected = (
        "none" if frac == 0 else "<25%" if frac < 0.25 else "25-75%" if frac <= 0.75 else ">75%"
    )
    assert row["quantity"] == expected


def test_ihc_has_no_eosin(ihc):
    import tifffile
    from skimage.color import separate_stains

    img = tifffile.imread(ihc.slide)
    stains = np.asarray(ihc.read_label()["params"]["stains"])
    hed = separate_stains(img, np.linalg.inv(stains))
    tissue = img.sum(-1) < 600
    assert hed[..., 1][tissue].mean() < 0.2 * hed[..., 0][tissue].mean()


def test_same_seed_same_slide_other_seed_other_slide(he, tmp_path):
    import tifffile

    again = generate(tmp_path / "a", "he", SIZE, seed=3, workers=1)  # thread count is moot
    assert np.array_equal(tifffile.imread(again.slide), tifffile.imread(he.slide))
    assert again.cells_csv.read_bytes() == he.cells_csv.read_bytes()
    other = generate(tmp_path / "b", "he", SIZE, seed=4)
    assert other.cells_csv.read_bytes() != he.cells_csv.read_bytes()


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"kind": "pas"}, "kind"),
        ({"size": (-5, 1024)}, "size"),
        ({"size": (1024,)}, "size"),
        ({"seed": -1}, "seed"),
        ({"mpp": 0.0}, "mpp"),
    ],
    ids=["kind", "negative-size", "short-size", "seed", "mpp"],
)
def test_bad_parameters_name_themselves(tmp_path, kwargs, word):
    args = {"kind": "he", "size": (512, 512), "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=word):
        generate(tmp_path, **args)


def test_sample_slide_is_generated_once_into_the_cache(tmp_path):
    from histoscope.synthetic import sample_slide

    calls = []
    first = sample_slide("ihc", (512, 512), root=tmp_path, progress=lambda d, t: calls.append(d))
    assert calls and first.slide.is_file() and first.hpa_csv.is_file()
    mtime = first.slide.stat().st_mtime_ns
    again = sample_slide("ihc", (512, 512), root=tmp_path, progress=lambda d, t: calls.append(-1))
    assert again == first and -1 not in calls
    assert again.slide.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [first.slide.parent.name]  # no temp left
    with pytest.raises(ValueError, match="kind"):
        sample_slide("pas", root=tmp_path)
