"""File > Open Sample without a frozen window: the sample slide is made in a thread.

napari calls a sample-data function on its GUI thread and adds the layer data
it returns; napari 0.9 refuses an empty answer ("did not return any valid
layer data tuples"), so the function cannot hand the work to a worker and
return at once. :func:`layers_in_thread` therefore runs the generation in a
thread and, like a dialog's ``exec``, keeps the Qt event loop running until
it is done: the window repaints, the other panels work, and napari's activity
bar counts the tiles with a Cancel button. Cancel stops the generation (the
cache keeps nothing of it) and says so in a one-line napari notification:
napari prints any exception out of a sample function as a whole traceback,
so the function returns a hidden placeholder layer instead (napari refuses an
empty answer), which is removed as soon as napari has added it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

#: Milliseconds between looks at the generating thread (progress, Cancel, done).
POLL_MS = 50

#: Metadata key of the placeholder layer a cancelled sample returns.
CANCELLED_TAG = "histoscope_sample_cancelled"


@dataclass
class _Job:
    """One sample being generated; a second request for it waits for the same thread."""

    kind: str
    thread: threading.Thread | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    tiles: tuple[int, int] = (0, 0)
    layers: list | None = None
    error: BaseException | None = None


#: The samples being generated now, by kind.
_JOBS: dict[str, _Job] = {}


def _start(kind: str, label: str) -> _Job:
    from histoscope._sample_data import synthetic_layers
    from histoscope.progress import Cancelled

    job = _Job(kind)

    def on_tile(done: int, total: int) -> None:  # in the thread
        job.tiles = (done, total)
        if job.cancel.is_set():
            raise Cancelled(f"Generating the synthetic {label} sample slide was cancelled: "
                            "nothing was written.")  # fmt: skip

    def work() -> None:
        try:
            job.layers = synthetic_layers(kind, progress=on_tile)
        except BaseException as exc:  # handed to the GUI thread, raised there
            job.error = exc

    job.thread = threading.Thread(target=work, name=f"histoscope-sample-{kind}", daemon=True)
    job.thread.start()
    return job


def layers_in_thread(kind: str, label: str) -> list:
    """``synthetic_layers(kind)`` made in a thread while the Qt event loop keeps running.

    ``label`` names the slide in the progress bar. Returns the layer data;
    after Cancel, a notification and a placeholder (:func:`_cancelled`);
    raises what else the generation raised (:class:`~histoscope.progress.Cancelled`
    when the application quits meanwhile: napari can no longer add a layer).
    """
    from napari.utils import cancelable_progress
    from qtpy.QtCore import QEventLoop, QTimer

    from histoscope.progress import Cancelled

    job = _JOBS.get(kind)
    own = job is None  # the first request shows the bar; a repeated one only waits
    if own:
        job = _JOBS[kind] = _start(kind, label)
    loop = QEventLoop()
    bar = None

    def poll() -> None:
        nonlocal bar
        done, total = job.tiles
        if own and total and bar is None:
            bar = cancelable_progress(total=total, desc=f"Generating the synthetic {label} slide")
        if bar is not None:
            bar.update(done - bar.n)
            if bar.is_canceled:
                job.cancel.set()
        if not job.thread.is_alive():
            loop.quit()

    timer = QTimer()
    timer.setInterval(POLL_MS)
    timer.timeout.connect(poll)
    timer.start()
    try:
        if job.thread.is_alive():
            loop.exec()  # returns when poll sees the thread finished, or the application quits
    finally:
        timer.stop()
        if bar is not None:
            bar.close()
    quitting = job.thread.is_alive()
    if quitting:  # the application is quitting: stop, leave nothing half-written
        job.cancel.set()
        job.thread.join()
    if own:
        _JOBS.pop(kind, None)
    if isinstance(job.error, Cancelled):
        if quitting:  # a closing viewer takes no layer: raise, without the thread's frames
            raise Cancelled(str(job.error)) from None
        return _cancelled(str(job.error))
    if job.error is not None:
        raise job.error
    return list(job.layers or [])


def _cancelled(message: str) -> list:
    """Say ``message`` in one line and return a hidden placeholder, removed right after."""
    import numpy as np
    from napari.utils.notifications import show_info
    from qtpy.QtCore import QTimer

    show_info(message)
    QTimer.singleShot(0, drop_placeholders)
    kwargs = {"name": "(sample cancelled)", "visible": False, "metadata": {CANCELLED_TAG: True}}
    return [(np.zeros((1, 1), np.uint8), kwargs, "image")]


def drop_placeholders() -> None:
    """Remove the placeholder layers of cancelled samples from every napari viewer."""
    from napari import Viewer

    for viewer in list(Viewer._instances):
        for layer in [ly for ly in viewer.layers if ly.metadata.get(CANCELLED_TAG)]:
            viewer.layers.remove(layer)


def gui_running() -> bool:
    """Whether a Qt application exists and this is its (main) thread: a window would wait."""
    from qtpy.QtWidgets import QApplication

    main = threading.current_thread() is threading.main_thread()
    return main and QApplication.instance() is not None
