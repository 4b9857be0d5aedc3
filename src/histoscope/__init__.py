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
    "GeoJSONError",
    "HistoScopeError",
    "HistoScopeWarning",
    "ParamError",
    "Slide",
    "SlideError",
    "__version__",
    "Session",
    "load_checkpoint",
    "open_session",
    "open_slide",
    "read_geojson",
    "save_checkpoint",
    "tasks",
    "write_geojson",
]

_LAZY = {"load_checkpoint": "histoscope.checkpoints", "save_checkpoint": "histoscope.checkpoints",
         "open_session": "histoscope.session", "Session": "histoscope.session",
         "ParamError": "histoscope.params", "GeoJSONError": "histoscope.errors",
         "read_geojson": "histoscope.export.geojson",
         "write_geojson": "histoscope.export.geojson"}  # fmt: skip


def __getattr__(name: str):
    """Import the session, task and checkpoint API on first use (``import histoscope`` stays light)."""
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name == "tasks":
        return importlib.import_module("histoscope.tasks")
    raise AttributeError(f"module 'histoscope' has no attribute {name!r}")
