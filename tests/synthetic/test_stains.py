"""Colour deconvolution recovers each slide's own stain vectors."""

from __future__ import annotations

import numpy as np
import pytest

from histoscope.synthetic import REFERENCE_STAINS, generate


def _angle(u: np.ndarray, v: np.ndarray) -> float:
    c = abs(np.dot(u, v)) / (np.linalg.norm(u) * np.linalg.norm(v))
    return float(np.degrees(np.arccos(np.clip(c, 0, 1))))


def _od(slide) -> tuple[np.ndarray, dict]:
    import tifffile

    label = slide.read_label()
    img = tifffile.imread(slide.slide).reshape(-1, 3).astype(float)
    od = -np.log10(np.clip(img, 1, None) / np.asarray(label["params"]["background"]))
    return od, label


def _macenko(od: np.ndarray, beta: float = 0.3, alpha: float = 1.0):
    """Macenko et al. 2009: extreme angles in the plane of the two main OD directions."""
    od = od[np.linalg.norm(od, axis=1) > beta]
    _, vecs = np.linalg.eigh(od.T @ od)
    plane = vecs[:, [2, 1]] * np.sign(vecs[0, [2, 1]])
    phi = np.arctan2(od @ plane[:, 1], od @ plane[:, 0])
    lo, hi = np.percentile(phi, [alpha, 100 - alpha])
    a = plane @ [np.cos(lo), np.sin(lo)]
    b = plane @ [np.cos(hi), np.sin(hi)]
    return vecs[:, 0], sorted([a, b], key=lambda v: -v[0] / np.linalg.norm(v))


@pytest.fixture(scope="module", params=[3, 5], ids=["seed3", "seed5"])
def he(request, tmp_path_factory):
    return generate(tmp_path_factory.mktemp("stain"), "he", (1024, 1024), seed=request.param)


def test_pixels_obey_beer_lambert(he):
    """Every tissue pixel's optical density lies in the plane of H and E."""
    od, label = _od(he)
    h, e = (np.asarray(label["stain_vectors"][k]) for k in ("hematoxylin", "eosin"))
    normal = np.cross(h, e) / np.linalg.norm(np.cross(h, e))
    od = od[np.linalg.norm(od, axis=1) > 0.3]
    resid = np.abs(od @ normal) / np.linalg.norm(od, axis=1)
    assert np.median(resid) < 0.04
    data_normal, _ = _macenko(od)
    assert _angle(data_normal, normal) < 6.0


def test_macenko_recovers_the_slide_vectors(he):
    od, label = _od(he)
    normal, (h_est, e_est) = _macenko(od)
    h, e = (np.asarray(label["stain_vectors"][k]) for k in ("hematoxylin", "eosin"))
    # nuclei always sit on some cytoplasm, which biases the haematoxylin extreme
    assert _angle(h_est, h) < 12.0
    assert _angle(e_est, e) < 6.0


def test_stains_vary_between_slides_around_the_reference(he):
    label = he.read_label()
    other = generate(he.slide.parent / "other", "he", (512, 512), seed=label["seed"] + 100)
    a = np.asarray(label["params"]["stains"])
    b = np.asarray(other.read_label()["params"]["stains"])
    assert max(_angle(a[i], b[i]) for i in range(3)) > 0.5
    for i in range(3):
        assert _angle(a[i], REFERENCE_STAINS[i]) <= 6.0 + 1e-6


def test_deconvolution_separates_nuclei_from_stroma(he):
    import csv

    import tifffile
    from skimage.color import separate_stains

    label = he.read_label()
    stains = np.asarray(label["params"]["stains"])
    img = tifffile.imread(he.slide)
    hed = separate_stains(img, np.linalg.inv(stains))
    rows = list(csv.DictReader(open(he.cells_csv)))
    y = np.array([float(r["y"]) for r in rows]).round().astype(int)
    x = np.array([float(r["x"]) for r in rows]).round().astype(int)
    at_nuclei = hed[y, x]
    tissue = np.asarray(img).sum(-1) < 660
    h_all, e_all = hed[..., 0][tissue], hed[..., 1][tissue]
    assert np.median(at_nuclei[:, 0]) > 2 * np.median(h_all)
    assert np.median(at_nuclei[:, 1]) < np.percentile(e_all, 90)
