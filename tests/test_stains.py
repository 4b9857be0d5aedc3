"""Colour deconvolution and Macenko normalisation on images with known stains."""

from __future__ import annotations

import numpy as np
import pytest

from histoscope.stains import (
    HE,
    MacenkoNormalizer,
    StainVectors,
    deconvolve,
    macenko_stains,
    reconvolve,
)


def he_image(stains: StainVectors, strength=(1.0, 1.0), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """Random H and E concentration fields rendered with ``stains``; returns RGB and concentrations."""
    rng = np.random.default_rng(seed)
    conc = np.zeros((96, 96, 3), np.float32)
    conc[..., 0] = rng.gamma(2.0, 0.35, (96, 96)) * strength[0]
    conc[..., 1] = rng.gamma(2.0, 0.25, (96, 96)) * strength[1]
    return reconvolve(conc, stains), conc


SHIFTED = StainVectors(("hematoxylin", "eosin"), (0.50, 0.80, 0.33), (0.05, 0.90, 0.43))


def test_macenko_recovers_stain_vectors():
    rgb, _ = he_image(HE)
    stains, _ = macenko_stains(rgb)
    ref = HE.matrix[:2]
    cos = (stains * ref).sum(axis=1)
    assert (cos > 0.98).all(), cos


def test_normalisation_removes_a_stain_shift():
    reference, conc = he_image(HE)
    shifted, _ = he_image(SHIFTED, strength=(0.7, 1.3))  # same tissue, other scanner and staining
    norm = MacenkoNormalizer.fit(shifted, target=MacenkoNormalizer.fit(reference))
    before = np.abs(shifted.astype(int) - reference).mean()
    after = np.abs(norm.transform(shifted).astype(int) - reference).mean()
    assert after < 0.35 * before, (before, after)


def test_blank_image_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="too few stained pixels"):
        macenko_stains(np.full((64, 64, 3), 250, np.uint8))


def test_od_matrix_is_identity_for_a_reference_image():
    rgb, _ = he_image(HE)
    n = MacenkoNormalizer.fit(rgb)
    same = MacenkoNormalizer(n.stains, n.max_conc, ref_stains=n.stains, ref_max=n.max_conc)
    assert np.abs(same.transform(rgb).astype(int) - rgb).mean() < 1.5


def test_deconvolution_separates_he():
    rgb, conc = he_image(HE)
    back = deconvolve(rgb, HE)
    assert np.corrcoef(back[..., 0].ravel(), conc[..., 0].ravel())[0, 1] > 0.97
