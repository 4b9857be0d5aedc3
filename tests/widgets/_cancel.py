"""Press Cancel at a known point of a run, whatever the machine's speed."""

from __future__ import annotations


def cancel_after_first_step(widget, worker, what: str | None = None) -> None:
    """Stop ``worker`` right after its first step (whose ``what`` starts with ``what``, if given).

    The worker thread raises the widget's cancel flag itself the moment the
    step is emitted (a direct connection), so the run cannot race ahead of the
    GUI; the Cancel button is then clicked on the GUI thread as a user would.
    """
    from qtpy.QtCore import Qt

    def direct(step) -> None:
        if what is None or step.what.startswith(what):
            widget._cancel.set()

    def click(step) -> None:
        if (what is None or step.what.startswith(what)) and widget.cancel_button.isEnabled():
            widget.cancel_button.click()

    worker.yielded.connect(direct, Qt.ConnectionType.DirectConnection)
    worker.yielded.connect(click)
