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


class HistoScopeWarning(UserWarning):
    """Warnings issued by HistoScope itself."""
