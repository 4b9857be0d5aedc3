"""Draft pathology reports (HistGen): tokenizer, data, decoding, metrics and the report store.

Nothing here imports torch at module level except :mod:`histoscope.reports.beam`, which
the model and the task import when they decode.
"""

from __future__ import annotations

from histoscope.errors import HistoScopeError

__all__ = ["ReportDataError"]


class ReportDataError(HistoScopeError, ValueError):
    """A report JSON or its feature files are missing or not in the HistGen layout.

    The message names the file and the reason.
    """
