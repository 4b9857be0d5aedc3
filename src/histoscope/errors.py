"""Exceptions and warnings shared across HistoScope."""

from __future__ import annotations


class HistoScopeError(Exception):
    """Base class for HistoScope errors."""


class SlideError(HistoScopeError):
    """A slide cannot be opened or one of its tiles cannot be read.

    The message always names the file and the reason.
    """


class CheckpointError(HistoScopeError):
    """A checkpoint cannot be loaded (wrong family, missing tensor, bad file...)."""


class GeoJSONError(HistoScopeError):
    """A GeoJSON file or object table cannot be read or written.

    The message names the file, the feature index (or table row) and the reason.
    """


class HistoScopeWarning(UserWarning):
    """Warnings issued by HistoScope itself."""
