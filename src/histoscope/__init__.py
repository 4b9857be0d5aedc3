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
    "open_slide",
]
