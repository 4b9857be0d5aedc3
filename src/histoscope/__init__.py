"""HistoScope: interactive whole-slide pathology for napari.

The package top level holds the headless API only; nothing here imports Qt,
torch or a napari viewer.
"""

from __future__ import annotations

__version__ = "0.1.0"

from histoscope.errors import CheckpointError, HistoScopeError, HistoScopeWarning, SlideError
from histoscope.slide import Slide, open_slide

__all__ = [
    "CheckpointError",
    "HistoScopeError",
    "HistoScopeWarning",
    "Slide",
    "SlideError",
    "__version__",
    "load_checkpoint",
    "open_slide",
    "save_checkpoint",
]

_LAZY = {"load_checkpoint": "histoscope.checkpoints", "save_checkpoint": "histoscope.checkpoints"}


def __getattr__(name: str):
    """Import the checkpoint API on first use, so ``import histoscope`` stays light."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'histoscope' has no attribute {name!r}")
