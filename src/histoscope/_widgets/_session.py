"""Keep the viewer's HistoScope work in the slide's session folder, saved as it changes.

:class:`AutoSave` (one per viewer) saves every layer shown over the slide, with
its display settings, into the slide's session folder a moment after anything
changes: a result arriving, a layer added, removed, moved or edited, its
opacity, colour map, contrast or visibility changed. Reopening the folder
(``viewer.open("case.svs.histoscope")``) restores the slide and the layers
exactly, in order.

Saving never blocks the viewer: the GUI thread only takes a snapshot of the
layers (arrays are shared where napari never edits them in place, copied
where it does) and one writer thread writes it. Saves coalesce: while one is
written, newer snapshots replace each other and only the latest is written
next, so the last state always wins and two writes never overlap. Closing
the viewer (``Viewer.close()``, File > Exit, the window's close button)
writes any pending change and waits for the writer before napari removes the
layers, and the removals of a shutdown are never saved. A write that fails
(a full disk, a folder locked by another program) is shown as a napari
warning naming the folder and the reason; its snapshot is kept and written
again (up to :data:`RETRIES` times, then when the viewer closes).
"""

from __future__ import annotations

import copy
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from qtpy.QtCore import QEvent, QObject, QTimer, Signal

#: Layer events that change what a saved session would hold.
EVENTS = ("data", "opacity", "visible", "colormap", "contrast_limits", "gamma", "blending",
          "name", "scale", "translate", "features", "face_color", "border_color")  # fmt: skip
DELAY_MS = 1000
#: Seconds closing the viewer waits for the last save.
CLOSE_WAIT_S = 120.0
#: Labels larger than this are shared, not copied, in a snapshot (a later save catches up).
COPY_LABELS_BYTES = 256 << 20
#: Times a failed write is tried again by itself (closing the viewer tries once more).
RETRIES = 3
#: Milliseconds between a failed write and its next try.
RETRY_MS = 5000


#: Metadata key recording which slide a layer was made over (its session).
SLIDE_TAG = "histoscope_slide_path"


def slide_layers(viewer) -> list:
    """Layers showing slide files HistoScope opened, in viewer order."""
    from histoscope.layers import SLIDE_KEY
    from histoscope.slide import Slide

    return [ly for ly in viewer.layers
            if SLIDE_KEY in ly.metadata and isinstance(ly.metadata.get("slide"), Slide)
            and ly.metadata["slide"].path.exists()]  # fmt: skip


def owner(layer) -> str | None:
    """The slide path a layer belongs to: its provenance, else the slide it was made over."""
    prov = layer.metadata.get("histoscope")
    if isinstance(prov, dict) and prov.get("slide"):
        return str(prov["slide"])
    tag = layer.metadata.get(SLIDE_TAG)
    return str(tag) if tag else None


def _frozen(value: Any) -> Any:
    """A copy of a layer setting the viewer may change in place (arrays, tables, lists)."""
    if isinstance(value, np.ndarray):
        return value.copy()
    pd = sys.modules.get("pandas")  # never imported here: no table exists before pandas does
    if pd is not None and isinstance(value, pd.DataFrame):
        return value.copy()
    if isinstance(value, dict):
        return {k: _frozen(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_frozen(v) for v in value) if type(value) in (list, tuple) else value
    return value


def _metadata(meta: dict) -> dict:
    """Metadata for a snapshot: live objects (never saved) dropped, the rest copied."""
    from histoscope.session_store import LIVE_METADATA

    out = {}
    for k, v in (meta or {}).items():
        if k in LIVE_METADATA:
            continue
        try:
            out[k] = copy.deepcopy(v)
        except Exception:  # an object that cannot be copied: the writer decides (skips it)
            out[k] = v
    return out


def layer_snapshot(layer) -> tuple:
    """``(data, kwargs, type)`` of ``layer`` that later edits in the viewer cannot change.

    Image pixels are shared (napari never paints them); points, shapes, vectors
    and tracks are copied (moved in place by the mouse), and so are labels up to
    :data:`COPY_LABELS_BYTES` (painted in place; larger ones are shared and the
    save their painting schedules writes them again). Settings are copied.
    """
    from histoscope.session_store import SKIP_KEYS

    data, kwargs, kind = layer.as_layer_data_tuple()
    if (
        kind == "labels"
        and not isinstance(data, list)
        and getattr(data, "nbytes", 0) <= COPY_LABELS_BYTES
    ):
        data = np.array(data)
    elif kind in ("points", "vectors", "tracks"):
        data = np.array(data)
    elif kind == "shapes":
        data = [np.array(d) for d in data]
    kwargs = {k: (_metadata(v) if k == "metadata" else _frozen(v))
              for k, v in kwargs.items() if k not in SKIP_KEYS}  # fmt: skip
    return data, kwargs, kind


def viewer_state(viewer, slide_layer) -> tuple[list, dict]:
    """``(layers, slide display)``: snapshots of the layers over ``slide_layer``, in viewer order."""
    from histoscope.layers import SLIDE_KEY

    path = str(slide_layer.metadata["slide"].path)
    # (a layer flagged histoscope_transient only draws another for the view: not saved)
    layers = [layer_snapshot(ly) for ly in viewer.layers
              if SLIDE_KEY not in ly.metadata and owner(ly) == path
              and not ly.metadata.get("histoscope_transient")]  # fmt: skip
    display = {k: getattr(slide_layer, k) for k in ("opacity", "visible", "gamma", "blending")}
    display["contrast_limits"] = list(slide_layer.contrast_limits)
    display["position"] = list(viewer.layers).index(slide_layer)
    return layers, display


@dataclass
class _Save:
    """What one slide's session save writes, taken on the GUI thread."""

    name: str
    session: Any
    layers: list = field(default_factory=list)
    display: dict = field(default_factory=dict)
    note: str | None = None  # why it is not saved (a session kept in memory)


def viewer_snapshot(viewer) -> list[_Save]:
    """What :func:`write_snapshot` saves for each slide: cheap, on the GUI thread."""
    from histoscope._widgets._common import session_for

    out = []
    for slide_layer in slide_layers(viewer):
        session = session_for(slide_layer, slide_layer.metadata["slide"])
        if session.folder is None:
            reason = slide_layer.metadata.get("histoscope_session_note") or "it is kept in memory"
            out.append(_Save(slide_layer.name, session, note=f"session not saved ({reason})"))
            continue
        layers, display = viewer_state(viewer, slide_layer)
        out.append(_Save(slide_layer.name, session, layers, display))
    return out


def write_snapshot(saves: list[_Save]) -> list[str]:
    """Write each slide's snapshot into its session folder; returns notes on what was not saved.

    A session folder that already holds layers this viewer did not open from
    it is left alone (saving would replace them), and so is a session kept in
    memory (its folder cannot be written). Any thread may call it.
    """
    from histoscope.session_store import read_manifest

    notes = []
    for save in saves:
        session = save.session
        if save.note:
            notes.append(f"{save.name}: {save.note}")
            continue
        saved = read_manifest(session.folder).get("layers") or []
        if saved and not getattr(session, "layers_shown", False):
            notes.append(f"{save.name}: its session folder holds {len(saved)} saved "
                         f"layer(s) not shown here; open {session.folder} to continue it "
                         "(nothing was overwritten)")  # fmt: skip
            continue
        try:
            session.save_layers(save.layers, save.display)
        except Exception as exc:
            from histoscope.session import SessionError

            if isinstance(exc, SessionError) and str(session.folder) in str(exc):
                raise
            raise SessionError(f"{session.folder}: {type(exc).__name__}: {exc}") from exc
        session.layers_shown = True
        skipped = read_manifest(session.folder).get("not_saved") or []
        notes += [f"{name}: not saved ({why})" for name, why in skipped]
    return notes


def save_viewer_session(viewer) -> list[str]:
    """Save each slide's layers into its own session folder now and wait for it; returns notes.

    When the viewer has an :class:`AutoSave`, the save goes through its writer,
    so it cannot race a background save of an older state (the latest
    snapshot is always the one left on disk). A failed write raises.
    """
    real = getattr(viewer, "__wrapped__", viewer)
    saver = real.__dict__.get("_histoscope_autosave")
    if saver is None or saver.closed:
        return write_snapshot(viewer_snapshot(viewer))
    saves = viewer_snapshot(viewer)  # raises on a layer that cannot be read
    saver.timer.stop()
    saver.wait(None, saver._submit(saves))
    if saver.error is not None:
        raise saver.error
    return list(saver.notes)


class _CloseWatcher(QObject):
    """Calls ``on_close`` when the viewer's window is about to close; relays write failures.

    :attr:`failed` is emitted by the writer thread and delivered on the GUI
    thread (the watcher lives there).
    """

    failed = Signal(str)

    def __init__(self, on_close) -> None:
        super().__init__()
        self.on_close = on_close

    def eventFilter(self, obj, event) -> bool:  # noqa: N802 - Qt's name
        if event.type() == QEvent.Type.Close:
            self.on_close()
        return False


class AutoSave:
    """Saves the viewer's sessions shortly after each change (one per viewer), off the GUI thread.

    New layers are tagged with the slide they were made over (when one slide
    is open), so each goes to that slide's session. :attr:`error` and
    :attr:`notes` are those of the latest finished write; :attr:`failed` is the
    snapshot of a failed write, kept until it is written (or a newer one is).
    """

    def __init__(self, viewer) -> None:
        self.viewer = viewer
        self.error: Exception | None = None
        self.notes: list[str] = []
        self.writes = 0  # writes finished (coalesced snapshots count once)
        self._cond = threading.Condition()
        self._pending: list[_Save] | None = None
        self._thread: threading.Thread | None = None
        self._taken = 0  # number of the latest snapshot handed to the writer
        self._written = 0  # number of the latest snapshot written (or failed)
        self.failed: list[_Save] | None = None
        self.retries = 0  # automatic tries of the failed snapshot so far
        self.closed = False
        self.timer = QTimer()
        self.timer.setSingleShot(True)
        self.timer.setInterval(DELAY_MS)
        self.timer.timeout.connect(self._save_later)
        self.retry_timer = QTimer()
        self.retry_timer.setSingleShot(True)
        self.retry_timer.setInterval(RETRY_MS)
        self.retry_timer.timeout.connect(self._retry)
        for event in ("inserted", "removed", "moved"):
            getattr(viewer.layers.events, event).connect(self._layers_changed)
        viewer.layers.events.removing.connect(self._before_removal)
        self._watch()
        self._closer = _CloseWatcher(self.flush)
        self._closer.failed.connect(self._on_failure)
        real = getattr(viewer, "__wrapped__", viewer)  # a dock's proxy hides private names
        window = getattr(getattr(real, "window", None), "_qt_window", None)
        if window is not None:
            window.installEventFilter(self._closer)
        self._hook_close()

    def _hook_close(self) -> None:
        """Make ``Viewer.close()`` (also File > Exit's path) close this saver before the layers go.

        napari's ``Viewer.close`` removes every layer one by one before the
        window closes; each removal would otherwise be saved as an edit.
        """
        # napari hands plugin docks a PublicOnlyProxy of the viewer; patch the viewer itself
        viewer = getattr(self.viewer, "__wrapped__", self.viewer)
        napari_close = viewer.close

        def close() -> None:
            self.close()
            napari_close()

        close.__doc__ = napari_close.__doc__
        object.__setattr__(viewer, "close", close)  # the viewer model refuses unknown fields

    @classmethod
    def for_viewer(cls, viewer) -> AutoSave:
        """The viewer's AutoSave, made on first use (kept on the viewer, not on a dock's proxy)."""
        real = getattr(viewer, "__wrapped__", viewer)
        saver = real.__dict__.get("_histoscope_autosave")
        if saver is None:
            saver = cls(viewer)
            object.__setattr__(real, "_histoscope_autosave", saver)
        return saver

    def _watch(self) -> None:
        slides = slide_layers(self.viewer)
        active = self.viewer.layers.selection.active
        current = active if active in slides else (slides[0] if len(slides) == 1 else None)
        for layer in self.viewer.layers:
            if layer.metadata.get("histoscope_transient"):
                continue  # drawn for the view (e.g. the cells in view): not saved, not watched
            if layer not in slides and owner(layer) is None and current is not None:
                layer.metadata[SLIDE_TAG] = str(current.metadata["slide"].path)
            for name in EVENTS:
                emitter = getattr(layer.events, name, None)
                if emitter is not None:
                    emitter.connect(self.schedule)  # connecting twice is a no-op

    def _layers_changed(self, *_: object) -> None:
        self._watch()
        self.schedule()

    def _before_removal(self, *_: object) -> None:
        """An edit still in its quiet period is saved with the layers as they were.

        ``Viewer.close()`` removes every layer before the window closes: the
        first removal hands the pending state to the writer, and once the
        slide layer is gone nothing more is saved for it.
        """
        if self.timer.isActive() and not self.closed:
            self.save_now(wait=False)

    def schedule(self, *_: object) -> None:
        """Save after a short quiet period (edits come in bursts); nothing once closed."""
        if not self.closed:
            self.timer.start()

    def _save_later(self) -> None:
        if not self.closed:
            self.save_now(wait=False)

    def _retry(self) -> None:
        """Hand the failed snapshot to the writer again (unless a newer one superseded it)."""
        with self._cond:
            saves = self.failed
        if saves is not None:
            self._submit(saves)

    def _on_failure(self, message: str) -> None:
        """On the GUI thread: tell the user a write failed, and try it again later."""
        from napari.utils.notifications import show_warning

        again = self.retries < RETRIES and not self.closed
        when = (f"trying again in {RETRY_MS / 1000:g} s" if again
                else "it is tried again when the viewer closes")  # fmt: skip
        show_warning(f"HistoScope session not saved: {message} ({when})")
        if again:
            self.retries += 1
            self.retry_timer.start()

    def save_now(self, wait: bool = True, timeout: float | None = None) -> bool:
        """Snapshot the viewer now and hand it to the writer; errors are kept, never raised.

        Parameters
        ----------
        wait
            ``True``: return once this snapshot (or a newer one) is written;
            ``False``: return at once (the GUI thread never waits for the disk).
        timeout
            Seconds to wait at most (``None``: no limit).

        Returns
        -------
        bool
            ``wait=True``: whether the write succeeded (:attr:`error` says why
            not); ``wait=False``: whether a snapshot could be taken.
        """
        self.timer.stop()
        try:
            saves = viewer_snapshot(self.viewer)
        except Exception as exc:  # a layer that cannot be read must not take the viewer down
            self.error = exc
            return False
        ticket = self._submit(saves)
        if not wait:
            return True
        if not self.wait(timeout, ticket):
            return False
        return self.error is None

    def _submit(self, saves: list[_Save]) -> int:
        with self._cond:
            self._taken += 1
            self._pending = saves  # an older snapshot not yet written is superseded
            if self.failed is not None and saves is not self.failed:
                self.failed = None  # so is a failed one: this newer state replaces it
                self.retries = 0
            if self._thread is None:
                self._thread = threading.Thread(target=self._write_loop, name="histoscope-autosave",
                                                daemon=True)  # fmt: skip
                self._thread.start()
            return self._taken

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                if self._pending is None:
                    self._thread = None  # idle: a later snapshot starts a new writer
                    self._cond.notify_all()
                    return
                saves, ticket, self._pending = self._pending, self._taken, None
            try:
                notes, error = write_snapshot(saves), None
            except Exception as exc:  # a full disk must not take the viewer down
                notes, error = self.notes, exc
            with self._cond:
                self.notes, self.error = notes, error
                if error is None and self.failed is saves:
                    self.failed, self.retries = None, 0
                elif error is not None and self._pending is None:
                    self.failed = saves  # kept for the next try (one snapshot, the latest)
                self._written = ticket
                self.writes += 1
                self._cond.notify_all()
            if error is not None and self._pending is None:
                try:
                    self._closer.failed.emit(str(error))
                except RuntimeError:  # the Qt side is gone (interpreter shutdown)
                    pass

    @property
    def busy(self) -> bool:
        """Whether a snapshot is waiting or being written."""
        with self._cond:
            return self._written < self._taken

    def wait(self, timeout: float | None = None, ticket: int | None = None) -> bool:
        """Wait until the latest snapshot taken (or ``ticket``) is written; False on timeout."""
        with self._cond:
            want = self._taken if ticket is None else ticket
            return self._cond.wait_for(lambda: self._written >= want, timeout)

    def flush(self, timeout: float | None = CLOSE_WAIT_S) -> bool:
        """Write a change still waiting for its quiet period, or a failed one, and wait for it.

        Called when the viewer's window gets its close event (which may still
        be refused: the saver stays open). Returns whether everything taken
        so far is written.
        """
        self.retry_timer.stop()
        if self.timer.isActive():
            self.save_now(wait=False)
        elif self.failed is not None:
            self._retry()
        if not self.wait(timeout):
            return False
        with self._cond:
            return self.failed is None and self.error is None

    def close(self) -> None:
        """Flush (see :meth:`flush`), then save nothing more: the viewer is shutting down.

        Runs first in ``Viewer.close()`` (the close button, File > Exit and
        napari's ``quit_app`` all end there), so the layer removals of the
        shutdown are never saved. Calling it again does nothing.
        """
        if self.closed:
            return
        self.flush()
        self.closed = True
        self.timer.stop()
