"""Colour deconvolution (Ruifrok & Johnston) into stain optical densities.

Optical density here is ``-log10(I / I0)`` per RGB channel, the unit QuPath
reports ("DAB OD mean"), so thresholds carry over between the two tools.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Background intensity used for optical density (white glass).
I0 = 255.0


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


@dataclass(frozen=True)
class StainVectors:
    """Two stain OD vectors (rows) plus a third orthogonal residual channel."""

    names: tuple[str, str]
    first: tuple[float, float, float]
    second: tuple[float, float, float]

    @property
    def matrix(self) -> np.ndarray:
        """``(3, 3)`` matrix of unit OD vectors: stain 1, stain 2, residual."""
        a, b = _unit(np.asarray(self.first)), _unit(np.asarray(self.second))
        c = np.cross(a, b)  # orthogonal to both stains: absorbs what neither explains
        if np.linalg.norm(c) < 1e-8:
            raise ValueError(f"stain vectors {self.names} are parallel")
        return np.stack([a, b, _unit(c)])


#: Ruifrok & Johnston's vectors, as in QuPath and scikit-image.
HDAB = StainVectors(("hematoxylin", "dab"), (0.650, 0.704, 0.286), (0.268, 0.570, 0.776))
HE = StainVectors(("hematoxylin", "eosin"), (0.644, 0.717, 0.267), (0.093, 0.954, 0.283))


def rgb_to_od(rgb: np.ndarray) -> np.ndarray:
    """Optical density ``-log10(I / 255)`` of a uint8 RGB image, ``float32 (..., 3)``."""
    rgb = np.asarray(rgb)
    if rgb.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (..., 3), got shape {rgb.shape}")
    return -np.log10(np.maximum(rgb.astype(np.float32), 1.0) / I0)


def deconvolve(rgb: np.ndarray, stains: StainVectors = HDAB) -> np.ndarray:
    """Stain concentrations (OD units) ``(..., 3)``: stain 1, stain 2, residual.

    Negative values (noise, other colours) are clipped to zero.
    """
    od = rgb_to_od(rgb)
    conc = od @ np.linalg.inv(stains.matrix).astype(np.float32)
    return np.maximum(conc, 0.0)


def reconvolve(conc: np.ndarray, stains: StainVectors = HDAB) -> np.ndarray:
    """RGB uint8 from stain concentrations (inverse of :func:`deconvolve`)."""
    od = np.asarray(conc, dtype=np.float32) @ stains.matrix.astype(np.float32)
    return np.clip(I0 * 10.0 ** (-od), 0, 255).round().astype(np.uint8)


# ------------------------------------------------------------------ Macenko
#: Macenko et al.'s reference H&E stain vectors (rows: H, E) and 99th-percentile
#: concentrations, as in their and most later implementations.
MACENKO_REF_STAINS = np.array([[0.5626, 0.7201, 0.4062], [0.2159, 0.8012, 0.5581]], np.float32)
MACENKO_REF_MAX = np.array([1.9705, 1.0308], np.float32)


def macenko_stains(
    rgb: np.ndarray, beta: float = 0.15, alpha: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Estimate an H&E image's two stain vectors and their 99th-percentile concentrations.

    Macenko et al. 2009: optical density of stained pixels (OD > ``beta`` in
    every channel) is projected on its two main directions; the stain
    vectors are the ``alpha`` and ``100 - alpha`` percentile angles there.

    Returns
    -------
    stains, max_conc
        ``(2, 3)`` unit OD vectors (haematoxylin first) and ``(2,)``.

    Raises
    ------
    ValueError
        When fewer than 100 stained pixels are found (blank or tiny image).
    """
    od = rgb_to_od(rgb).reshape(-1, 3)
    od = od[(od > beta).all(axis=1)]
    if len(od) < 100:
        raise ValueError(f"too few stained pixels ({len(od)}) to estimate stain vectors")
    _, vecs = np.linalg.eigh(np.cov(od, rowvar=False))
    plane = vecs[:, 1:3]  # the two largest eigenvectors
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, alpha), np.percentile(phi, 100 - alpha)
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    v1, v2 = (v1 if v1[0] >= 0 else -v1), (v2 if v2[0] >= 0 else -v2)
    stains = np.stack([v1, v2]) if v1[0] > v2[0] else np.stack([v2, v1])  # H has more red OD
    stains = stains / np.linalg.norm(stains, axis=1, keepdims=True)
    conc = np.linalg.lstsq(stains.T, od.T, rcond=None)[0]
    return stains.astype(np.float32), np.percentile(conc, 99, axis=1).astype(np.float32)


@dataclass(frozen=True)
class MacenkoNormalizer:
    """Maps an H&E image's stains onto reference stains (Macenko et al. 2009).

    Fit once per slide (e.g. on a low-resolution read of its tissue) with
    :meth:`fit`, then :meth:`transform` every tile. In optical density the
    whole mapping is one 3x3 matrix (:attr:`od_matrix`), cheap on a GPU too.
    """

    stains: np.ndarray
    max_conc: np.ndarray
    ref_stains: np.ndarray = field(default_factory=lambda: MACENKO_REF_STAINS.copy())
    ref_max: np.ndarray = field(default_factory=lambda: MACENKO_REF_MAX.copy())

    @classmethod
    def fit(
        cls, rgb: np.ndarray, target: MacenkoNormalizer | None = None, **kwargs
    ) -> MacenkoNormalizer:
        """Estimate the stains of ``rgb`` (see :func:`macenko_stains`).

        ``target``: another fitted normaliser whose stains become the
        reference (e.g. fitted on the training data); default Macenko's.
        """
        stains, max_conc = macenko_stains(rgb, **kwargs)
        if target is None:
            return cls(stains=stains, max_conc=max_conc)
        return cls(stains, max_conc, ref_stains=target.stains, ref_max=target.max_conc)

    @property
    def od_matrix(self) -> np.ndarray:
        """``(3, 3)`` matrix ``T`` with ``od_normalised = od @ T``."""
        to_conc = np.linalg.pinv(self.stains)  # (3, 2): od @ to_conc = concentrations
        scale = np.diag(self.ref_max / np.maximum(self.max_conc, 1e-6))
        return (to_conc @ scale @ self.ref_stains).astype(np.float32)

    def transform(self, rgb: np.ndarray) -> np.ndarray:
        """Normalised uint8 RGB of the same shape."""
        od = rgb_to_od(rgb) @ self.od_matrix
        return np.clip(I0 * 10.0 ** (-od), 0, 255).round().astype(np.uint8)
