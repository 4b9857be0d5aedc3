"""StarDist and Cellpose behind the classical detector's interface.

Each adapter loads a model from local weights only (nothing downloads at run
time), turns its instance labels into a :class:`~histoscope.nuclei.Nuclei`
table with the same measurements, and keeps only the area limits of the
parameters (the shape and colour filters are the classical detector's own).
Neither package is a dependency: asking for one that is not installed raises
:class:`MissingBackendError` saying what to install.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import replace
from pathlib import Path

import numpy as np

from histoscope.errors import HistoScopeError
from histoscope.nuclei._classical import detect_classical, measure, stain_channels
from histoscope.nuclei._params import NucleiParams
from histoscope.nuclei._table import Nuclei

INSTALL = {
    "stardist": "pip install stardist tensorflow (StarDist 0.9), and pass weights= a local model "
    "folder such as 2D_versatile_he (config.json + weights_best.h5)",
    "cellpose": "pip install cellpose (3.x or 4.x), and pass weights= a local model file "
    "such as nuclei or cpsam",
}


class MissingBackendError(HistoScopeError, ImportError):
    """A nucleus detector's package or weights are not available here."""


def _require(method: str, weights: str) -> Path:
    if importlib.util.find_spec(method) is None:
        raise MissingBackendError(f"nuclei.method={method!r}: the {method} package is not "
                                  f"installed; {INSTALL[method]}; or use method='classical', "
                                  "which needs no weights")  # fmt: skip
    if not weights:
        raise MissingBackendError(f"nuclei.method={method!r} needs local weights (nothing "
                                  f"downloads at run time): {INSTALL[method]}")  # fmt: skip
    path = Path(weights).expanduser()
    if not path.exists():
        raise MissingBackendError(f"nuclei.weights={weights!r}: no such file or folder")
    return path


@functools.lru_cache(maxsize=2)
def _stardist_model(path: str):
    from stardist.models import StarDist2D

    p = Path(path)
    return StarDist2D(None, name=p.name, basedir=str(p.parent))


@functools.lru_cache(maxsize=2)
def _cellpose_model(path: str):
    from cellpose import models

    return models.CellposeModel(pretrained_model=path, gpu=False)


def _stardist_labels(rgb: np.ndarray, path: str) -> np.ndarray:
    from csbdeep.utils import normalize

    img = normalize(rgb.astype(np.float32), 1, 99.8, axis=(0, 1))
    labels, _ = _stardist_model(path).predict_instances(img)
    return np.asarray(labels, np.int32)


def _cellpose_labels(rgb: np.ndarray, path: str) -> np.ndarray:
    model = _cellpose_model(path)
    try:  # Cellpose <= 3 takes channels; 4 dropped the argument
        out = model.eval(rgb, channels=[0, 0])
    except TypeError:
        out = model.eval(rgb)
    return np.asarray(out[0], np.int32)


def backend_detector(params: NucleiParams):
    """The detector function for ``params.method`` (``stardist`` or ``cellpose``).

    Raises
    ------
    MissingBackendError
        When the package is not installed or the weights are not given or found.
    """
    method = params.method
    if method not in INSTALL:
        raise ValueError(f"no adapter for method {method!r}")
    path = str(_require(method, params.weights))
    labeller = _stardist_labels if method == "stardist" else _cellpose_labels

    def detect(rgb: np.ndarray, mpp: float, p: NucleiParams) -> Nuclei:
        hema, eosin = stain_channels(rgb)
        labels = labeller(np.asarray(rgb)[..., :3], path)
        return measure(labels, hema, eosin, mpp,
                       replace(p, min_solidity=0.0, max_eosin_ratio=100.0))  # fmt: skip

    return detect


def detector(params: NucleiParams):
    """The function ``(rgb, mpp, params) -> Nuclei`` for ``params.method``.

    Raises
    ------
    MissingBackendError
        When StarDist or Cellpose is asked for but not installed, or its weights
        are not given or not found.
    """
    if params.method == "classical":
        return detect_classical
    return backend_detector(params)
