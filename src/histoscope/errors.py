"""Exceptions and warnings shared across HistoScope."""

from __future__ import annotations


class HistoScopeError(Exception):
    """Base class for HistoScope errors.

    Parameters
    ----------
    *args
        The message (it names the thing and the reason).
    path : str or os.PathLike, optional
        The file the error is about, kept as :attr:`path` so that a panel can
        name it without parsing the message.
    damaged : bool
        True only where the file itself is damaged, truncated or not in a
        readable format (:attr:`damaged`); a missing file, a missing µm/px or
        a wrong kind of input is not damage.
    mpp_unknown : bool
        True where the error is that the slide's µm per pixel is unknown.
    """

    path: str | None = None
    damaged: bool = False
    mpp_unknown: bool = False

    def __init__(self, *args, path=None, damaged: bool = False, mpp_unknown: bool = False) -> None:
        super().__init__(*args)
        if path is not None:
            self.path = str(path)
        if damaged:
            self.damaged = True
        if mpp_unknown:
            self.mpp_unknown = True


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
