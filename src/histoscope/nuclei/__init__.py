"""Nuclei on H&E: a classical detector that needs no weights, and StarDist / Cellpose adapters.

:func:`detect_nuclei` finds the nuclei of one image; :func:`iter_detect` runs over
a slide tile by tile (a generator that yields after each tile and can be
stopped), keeping each nucleus once at tile borders. Both return a
:class:`Nuclei` table: centroids and outlines in pixels, and QuPath-style
measurements ("Nucleus: Area µm^2", perimeter, circularity, eccentricity,
haematoxylin and eosin OD mean and std dev).
"""

from __future__ import annotations

import numpy as np

from histoscope.nuclei._adapters import MissingBackendError, detector
from histoscope.nuclei._params import METHODS, NucleiParams
from histoscope.nuclei._table import COLUMNS, Nuclei
from histoscope.nuclei._tiles import detect_slide, iter_detect

__all__ = [
    "COLUMNS",
    "METHODS",
    "MissingBackendError",
    "Nuclei",
    "NucleiParams",
    "detect_nuclei",
    "detect_slide",
    "detector",
    "iter_detect",
]


def detect_nuclei(rgb: np.ndarray, mpp: float, params: NucleiParams | None = None) -> Nuclei:
    """Nuclei of one H&E image.

    Parameters
    ----------
    rgb
        ``(H, W, 3)`` uint8 RGB.
    mpp
        µm per pixel of ``rgb`` (the image is analysed as it is, not resampled
        to ``params.mpp``).
    params
        :class:`NucleiParams`; default the classical detector.

    Returns
    -------
    Nuclei
        Coordinates in the image's pixels (``x`` right, ``y`` down), ``mpp`` the image's.
    """
    params = params or NucleiParams()
    if not (isinstance(mpp, int | float) and np.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be a positive number, got {mpp!r}")
    return detector(params)(rgb, float(mpp), params)
