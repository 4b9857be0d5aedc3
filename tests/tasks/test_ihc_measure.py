"""Positive-cell measurement on images whose DAB is known by construction."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass

import numpy as np
import pytest

from histoscope.stains import HDAB, deconvolve, reconvolve
from histoscope.tasks.ihc_measure import IHCParams, allred, measure_region, quantity_class

MPP = 0.5
#: DAB OD of each column of cells -> expected 0 / 1+ / 2+ / 3+ with default thresholds.
LEVELS = (0.05, 0.3, 0.5, 0.8)


def cell_grid(compartment: str, rows: int = 4, levels=LEVELS) -> tuple[np.ndarray, np.ndarray]:
    """Round nuclei (r = 4 µm) with DAB in one compartment; returns RGB and expected scores."""
    pitch, r_nuc = 48, 8  # px at 0.5 µm/px: 24 µm apart, 4 µm nuclear radius
    h, w = rows * pitch, len(levels) * pitch
    conc = np.zeros((h, w, 3), np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    expected = []
    for i in range(rows):
        for j, dab in enumerate(levels):
            cy, cx = i * pitch + pitch // 2, j * pitch + pitch // 2
            d = np.hypot(yy - cy, xx - cx)
            nucleus = d <= r_nuc
            conc[..., 0][nucleus] = 0.6
            # the membrane is drawn where cells end: nuclei expanded by 5 µm (10 px)
            membrane = (d > r_nuc + 6) & (d <= r_nuc + 11)
            region = {"nuclear": nucleus, "membrane": membrane}[compartment]
            conc[..., 1][region] = dab
            expected.append(j)
    return reconvolve(conc, HDAB), np.array(expected)


def test_deconvolution_round_trip():
    rng = np.random.default_rng(0)
    conc = rng.uniform(0, 1.0, size=(32, 32, 3)).astype(np.float32)
    conc[..., 2] = 0
    back = deconvolve(reconvolve(conc, HDAB), HDAB)
    np.testing.assert_allclose(back[..., :2], conc[..., :2], atol=0.02)


@dataclass(frozen=True)
class Case:
    id: str
    compartment: str
    stain_in: str
    location: str
    detection: str


CASES = [
    Case("nuclear", "nucleus", "nuclear", "nuclear", "od_sum"),
    Case("membranous", "membrane", "membrane", "cytoplasmic/membranous", "hematoxylin"),
    Case("nuclear-classical", "nucleus", "nuclear", "nuclear", "classical"),
    Case("membranous-classical", "membrane", "membrane", "cytoplasmic/membranous", "classical"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_scores_hscore_and_location_on_known_dab(case):
    rgb, expected = cell_grid(case.stain_in)
    params = IHCParams(compartment=case.compartment, detection=case.detection)
    m = measure_region(rgb, MPP, params)
    assert m.n_cells == len(expected)
    order = np.lexsort((m.cells["y_um"], m.cells["x_um"]))  # column-major like `expected`
    np.testing.assert_array_equal(np.sort(m.cells["score"][order]), np.sort(expected))
    s = m.summary()
    assert s["h_score"] == pytest.approx(100 * (1 + 2 + 3) / 4)  # a quarter of cells at each score
    assert s["percent_positive"] == pytest.approx(75.0)
    assert s["location"] == case.location
    assert s["quantity"] == "25-75%"


def test_negative_image_has_no_positive_cells():
    rgb, _ = cell_grid("nuclear", levels=(0.0, 0.0))
    s = measure_region(rgb, MPP, IHCParams(detection="od_sum")).summary()
    assert s["n_cells"] == 8 and s["percent_positive"] == 0 and s["h_score"] == 0
    assert s["location"] == "none" and s["allred"] == 0 and s["quantity"] == "none"


def test_blank_glass_gives_empty_measurement():
    m = measure_region(np.full((128, 128, 3), 245, np.uint8), MPP)
    assert m.n_cells == 0 and m.summary()["h_score"] == 0


def test_real_ihc_image_from_scikit_image():
    from skimage import data

    m = measure_region(data.immunohistochemistry(), 0.5, IHCParams(compartment="membrane"))
    s = m.summary()
    # Tumour glands stain brown at the membrane; the stroma is blue.
    assert m.n_cells > 150
    assert 30 < s["percent_positive"] < 95
    assert s["location"] == "cytoplasmic/membranous"


@pytest.mark.parametrize(
    ("pct", "intensity", "score"),
    [(0, 0, 0), (0.5, 1, 2), (5, 2, 4), (20, 3, 6), (50, 2, 6), (90, 3, 8)],
)
def test_allred(pct, intensity, score):
    assert allred(pct, intensity) == score


def test_quantity_classes():
    assert [quantity_class(p) for p in (0, 10, 50, 80)] == ["none", "<25%", "25-75%", ">75%"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"thresholds": (0.4, 0.2, 0.6)},
        {"detection": "magic"},
        {"nucleus_min_area": -1},
        {"compartment": "golgi"},
        {"cell_expansion": -2},
    ],  # fmt: skip
    ids=["thresholds", "detection", "min-area", "compartment", "expansion"],
)
def test_bad_parameters_name_themselves(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name if name != "compartment" else "golgi"):
        IHCParams(**kwargs)


def test_slide_tiles_count_each_cell_once_and_files_open(tmp_path):
    import histoscope as hs
    from histoscope.slide import write_pyramidal_tiff
    from histoscope.tasks.ihc_measure import measure_slide

    rgb, expected = cell_grid("nuclear", rows=10)
    path = write_pyramidal_tiff(tmp_path / "ihc.tif", rgb, mpp=MPP, quality=95, min_size=128)
    slide = hs.open_slide(path)
    progress = []
    m = measure_slide(slide, IHCParams(detection="od_sum"), mpp=MPP, tile=128,
                      progress=lambda d, t: progress.append((d, t)))  # fmt: skip
    assert m.n_cells == len(expected)
    assert progress[-1][0] == progress[-1][1] > 1
    files = {p.name: p for p in m.save(tmp_path / "out")}
    with open(files["ihc_cells.csv"]) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(expected) and {"x_um", "score"} <= set(rows[0])
    doc = json.loads(files["ihc_measure.json"].read_text())
    assert doc["summary"]["n_cells"] == len(expected) and doc["provenance"]["slide"] == str(path)
    [(coords, kwargs, kind)] = m.to_layers()
    assert kind == "points" and coords.shape == (len(expected), 2)
    # centroids land on the drawn cells: 24 µm pitch, first centre at 12 µm
    np.testing.assert_allclose(np.sort(np.unique(np.round(coords[:, 1]))), [12, 36, 60, 84], atol=1)


@pytest.fixture(scope="module")
def strong_ihc(tmp_path_factory):
    """A 1024 px synthetic IHC slide, strong cytoplasmic stain on >75 % of target cells."""
    from histoscope.synthetic import generate

    return generate(tmp_path_factory.mktemp("ihc"), kind="ihc", size=(1024, 1024), seed=80010)


def _recall(truth_xy: np.ndarray, found_xy: np.ndarray, radius: float = 4.0) -> np.ndarray:
    """Per true cell: matched one-to-one to a detection within ``radius`` µm (greedy)."""
    from scipy.spatial import cKDTree

    d, idx = cKDTree(truth_xy).query(found_xy, k=3, distance_upper_bound=radius)
    pairs = sorted((d[a, b], a, idx[a, b]) for a in range(len(found_xy)) for b in range(3)
                   if np.isfinite(d[a, b]))  # fmt: skip
    hit, used = np.zeros(len(truth_xy), bool), set()
    for _, a, t in pairs:
        if a not in used and not hit[t]:
            used.add(a)
            hit[t] = True
    return hit


def test_dab_positive_cells_are_found_like_negative_ones(strong_ihc):
    """Regression (issue 16): nuclei found on haematoxylin alone missed 80 % of DAB+ cells here."""
    import histoscope as hs
    from histoscope.tasks.ihc_measure import measure_slide

    with open(strong_ihc.cells_csv) as fh:
        rows = list(csv.DictReader(fh))
    truth = np.array([[float(r["x_um"]), float(r["y_um"])] for r in rows])
    positive = np.array([float(r["dab_od"]) > 0 for r in rows])
    assert positive.sum() > 100
    m = measure_slide(hs.open_slide(strong_ihc.slide), IHCParams())
    hit = _recall(truth, np.stack([m.cells["x_um"], m.cells["y_um"]], axis=1))
    recall_pos, recall_neg = hit[positive].mean(), hit[~positive].mean()
    assert recall_pos >= 0.8 and abs(recall_pos - recall_neg) <= 0.10
    assert abs(m.summary()["percent_positive"] - 100 * positive.mean()) <= 10


def test_image_without_dab_is_flagged_not_scored(tmp_path, strong_ihc):
    from skimage import data

    import histoscope as hs
    from histoscope.ood import OutsideTrainingDataWarning
    from histoscope.synthetic import generate
    from histoscope.tasks.ihc_measure import NO_DAB_WARNING, measure_slide

    he = generate(tmp_path, kind="he", size=(1024, 1024), seed=4).slide
    with pytest.warns(OutsideTrainingDataWarning, match="he_00004.tif: outside training data"):
        m = measure_slide(hs.open_slide(he), IHCParams())  # the learned detector never saw H&E
    s = m.summary()
    assert s["outside_training_data"] is True
    assert m.n_cells > 100 and s["warning"] == NO_DAB_WARNING
    assert m.provenance.params["warning"] == NO_DAB_WARNING
    ihc = measure_slide(hs.open_slide(strong_ihc.slide), IHCParams())
    assert ihc.summary()["warning"] is None and ihc.provenance.params["warning"] is None
    real = measure_region(data.immunohistochemistry(), 0.5).summary()
    assert real["warning"] is None
    assert real["denominator"] == "all detected cells"


def test_negative_stain_has_no_dab_warning():
    rgb, _ = cell_grid("nuclear", levels=(0.0, 0.0))
    s = measure_region(rgb, MPP).summary()
    assert s["warning"] is not None and s["percent_positive"] == 0
    rgb, _ = cell_grid("nuclear")
    assert measure_region(rgb, MPP).summary()["warning"] is None


def test_learned_detection_finds_positive_and_negative_cells_alike(strong_ihc):
    """The learned centre detector (issue 16) on a tuning slide it was never trained on."""
    import histoscope as hs
    from histoscope.tasks.ihc_measure import measure_slide

    with open(strong_ihc.cells_csv) as fh:
        rows = list(csv.DictReader(fh))
    truth = np.array([[float(r["x_um"]), float(r["y_um"])] for r in rows])
    positive = np.array([float(r["dab_od"]) > 0 for r in rows])
    m = measure_slide(hs.open_slide(strong_ihc.slide), IHCParams(detection="learned"))
    found = np.stack([m.cells["x_um"], m.cells["y_um"]], axis=1)
    hit = _recall(truth, found)
    recall_pos, recall_neg = hit[positive].mean(), hit[~positive].mean()
    assert recall_pos >= 0.85 and abs(recall_pos - recall_neg) <= 0.10
    assert hit.sum() / len(found) >= 0.85  # precision
    assert abs(m.summary()["percent_positive"] - 100 * positive.mean()) <= 10
    # every nucleus has a body to measure its compartments on
    assert (m.cells["area_um2"] >= 10).all() and (m.cells["dab_nucleus"] >= 0).all()
    s = m.summary()
    assert s["outside_training_data"] is False and s["ood"]["n_items"] >= 8
    assert s["resolution_warning"] is None  # read at 0.5 µm/px, as validated
    # provenance names the weights that found the nuclei
    from histoscope.models.ihc_detector import FAMILY, load_detector

    sha = load_detector()[1].sha256
    assert len(sha) == 64 and m.provenance.checkpoint_sha256 == sha
    assert m.provenance.params["detector"] == {"family": FAMILY, "name": "ihc_detector_default"
                                               ".safetensors", "sha256": sha}  # fmt: skip


def test_learned_detection_on_a_finer_scan_is_resampled_to_its_mpp(strong_ihc):
    """A slide scanned at 0.25 µm/px: the image is resampled to the network's 0.5 and back."""
    import histoscope as hs

    with open(strong_ihc.cells_csv) as fh:
        rows = list(csv.DictReader(fh))
    truth = np.array([[float(r["x_um"]), float(r["y_um"])] for r in rows])
    rgb = np.asarray(hs.open_slide(strong_ihc.slide).read_region(0, 0, 1024, 1024, mpp=0.5))
    fine = np.repeat(np.repeat(rgb[..., :3], 2, axis=0), 2, axis=1)  # same µm, 0.25 µm/px
    m = measure_region(fine, 0.25, IHCParams())
    coarse = measure_region(rgb[..., :3], 0.5, IHCParams())
    found = np.stack([m.cells["x_um"], m.cells["y_um"]], axis=1)
    hit = _recall(truth, found)
    assert hit.mean() >= 0.85 and hit.sum() / len(found) >= 0.85  # recall and precision
    assert abs(m.n_cells - coarse.n_cells) <= 0.03 * coarse.n_cells
    # the same nuclei: centroids within 1 µm of the 0.5 µm/px ones, areas alike
    from scipy.spatial import cKDTree

    d, _ = cKDTree(np.stack([coarse.cells["x_um"], coarse.cells["y_um"]], axis=1)).query(found)
    assert np.median(d) <= 0.5 and np.mean(d <= 1.0) >= 0.95
    assert np.median(m.cells["area_um2"]) == pytest.approx(np.median(coarse.cells["area_um2"]),
                                                           rel=0.1)  # fmt: skip


def test_a_coarse_scan_warns_and_the_network_tile_stays_bounded(strong_ihc, tmp_path):
    """Validated on 0.5 µm/px scans: a scan coarser than 0.75 warns; tiles shrink as upsampled."""
    import warnings

    import histoscope as hs
    from histoscope.ood import OutsideTrainingDataWarning
    from histoscope.slide import write_pyramidal_tiff
    from histoscope.tasks.ihc_measure import LEARNED_MAX_INPUT, measure_slide

    slide = hs.open_slide(strong_ihc.slide)
    coarse = np.asarray(slide.read_region(0, 0, 1024, 1024, mpp=1.0))[..., :3]  # 512 px
    scan = hs.open_slide(write_pyramidal_tiff(tmp_path / "coarse.tif", coarse, mpp=1.0,
                                              min_size=128))  # fmt: skip
    with warnings.catch_warnings():  # so coarse it may be unlike the training data too
        warnings.simplefilter("ignore", OutsideTrainingDataWarning)
        m = measure_slide(scan, IHCParams())
        read = measure_slide(slide, IHCParams(mpp=1.0))  # a 0.5 µm/px scan read at 1.0
        m2 = measure_slide(slide, IHCParams(mpp=2.0))
    said = m.summary()["resolution_warning"]
    assert "scanned at 1 µm/px" in said and "validated on" in said
    assert measure_region(coarse, 1.0, IHCParams()).summary()["resolution_warning"] == said
    assert read.summary()["resolution_warning"] is None  # validated: 0.96-0.99 recall read so
    assert m.provenance.tile_grid["tile"] + 2 * 20 <= LEARNED_MAX_INPUT / 2  # 1.0 -> 0.5: 2x
    tile = m2.provenance.tile_grid["tile"]
    assert (tile + 2 * 10) * 4 <= LEARNED_MAX_INPUT and m2.provenance.tile_grid["tiles"] >= 1
    assert m2.n_cells > 0
    classical = measure_region(coarse, 1.0, IHCParams(detection="classical"))
    assert classical.summary()["resolution_warning"] is None  # the warning is the network's


def test_too_little_tissue_is_said_in_words(tmp_path):
    from skimage import data

    import histoscope as hs
    from histoscope.slide import write_pyramidal_tiff
    from histoscope.tasks.ihc_measure import measure_slide

    img = data.immunohistochemistry()
    small = write_pyramidal_tiff(tmp_path / "small.tif", img[:160, :160], mpp=MPP, min_size=64)
    s = measure_slide(hs.open_slide(small), IHCParams()).summary()
    assert s["outside_training_data"] is None
    assert s["ood"]["message"] == "too little tissue to judge (4 tissue windows of 32 µm, 8 needed)"
    tiny = write_pyramidal_tiff(tmp_path / "tiny.tif", img[:48, :48], mpp=MPP, min_size=16)
    s = measure_slide(hs.open_slide(tiny), IHCParams()).summary()
    assert s["outside_training_data"] is None
    assert s["ood"]["message"] == "too little tissue to judge (no 32 µm tissue window)"


def test_learned_detection_says_a_real_image_is_outside_its_training_data(tmp_path):
    """Trained on synthetic IHC only: scikit-image's real IHC image is flagged, still measured."""
    from skimage import data

    import histoscope as hs
    from histoscope.ood import OutsideTrainingDataWarning
    from histoscope.slide import write_pyramidal_tiff
    from histoscope.tasks.ihc_measure import measure_slide

    path = write_pyramidal_tiff(tmp_path / "real_ihc.tif", data.immunohistochemistry(), mpp=MPP,
                                quality=95, min_size=128)  # fmt: skip
    with pytest.warns(OutsideTrainingDataWarning, match="real_ihc.tif: outside training data"):
        m = measure_slide(hs.open_slide(path), IHCParams(detection="learned"))
    s = m.summary()
    assert s["outside_training_data"] is True and s["ood"]["score"] > s["ood"]["threshold"]
    assert m.provenance.params["ood"]["outside"] is True
    assert m.n_cells > 150 and 30 < s["percent_positive"] < 95
