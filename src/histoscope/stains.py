"""Colour deconvolution (Ruifrok & Johnston) into stain optical densities.

Optical density here is ``-log10(I / I0)`` per RGB channel, the unit QuPath
reports ("DAB OD mean"), so thresholds carry over between the two tools.
"""

from __future__ import annotations

from dataclasses import dataclass

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
