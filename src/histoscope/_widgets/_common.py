"""Pieces every HistoScope dock widget shares: image picker, checkpoint picker, run controls."""

from __future__ import annotations

from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)


class RGBLayerCombo(QComboBox):
    """The viewer's RGB image layers, kept current as layers come, go and are renamed.

    The choice follows the layer itself, so renaming it keeps it chosen.
    """

    #: Emitted when the chosen layer itself changes (not when it only moves in the list).
    chosen_changed = Signal()

    def __init__(self, viewer) -> None:
        super().__init__()
        self.viewer = viewer
        self._layers: list = []
        self._last = None
        for event in (viewer.layers.events.inserted, viewer.layers.events.removed):
            event.connect(self.refresh)
        self.currentIndexChanged.connect(self._check_chosen)
        self.refresh()

    def _check_chosen(self, *_: object) -> None:
        layer = self.layer()
        if layer is not self._last:
            self._last = layer
            self.chosen_changed.emit()

    def refresh(self, *_: object) -> None:
        chosen = self.layer()
        self._layers = [ly for ly in self.viewer.layers if getattr(ly, "rgb", False)]
        self.blockSignals(True)
        self.clear()
        for ly in self._layers:
            ly.events.name.connect(self.refresh)  # connecting twice is a no-op
            self.addItem(ly.name)
        self.blockSignals(False)
        if chosen not in self._layers:  # nothing chosen yet: the active image, else the newest
            active = self.viewer.layers.selection.active
            chosen = active if active in self._layers else (self._layers or [None])[-1]
        index = next((i for i, ly in enumerate(self._layers) if ly is chosen), 0)
        self.setCurrentIndex(index if self._layers else -1)
        self._check_chosen()

    def layer(self):
        """The chosen layer, or ``None``."""
        i = self.currentIndex()
        layers = getattr(self, "_layers", [])
        if not 0 <= i < len(layers) or layers[i] not in self.viewer.layers:
            return None
        return layers[i]


class CheckpointPicker(QWidget):
    """A checkpoint path with a browse button, prefilled with an embedded default."""

    def __init__(self, default_name: str, placeholder: str) -> None:
        super().__init__()
        from histoscope._data import sample_data_path

        default = sample_data_path(default_name)
        self.edit = QLineEdit(str(default) if default else "")
        self.edit.setPlaceholderText(placeholder)
        browse = QPushButton("…")
        browse.setMaximumWidth(32)
        browse.clicked.connect(self._browse)
        self.about = QLabel("")
        self.about.setWordWrap(True)
        self.about.setStyleSheet("color: grey; font-size: small")
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.edit)
        row.addWidget(browse)
        box = QVBoxLayout(self)
        box.setContentsMargins(0, 0, 0, 0)
        box.addLayout(row)
        box.addWidget(self.about)
        self.edit.textChanged.connect(self._describe)
        self._describe()

    def _describe(self, *_: object) -> None:
        """Show what the checkpoint is (from its card); the full path as a tooltip."""
        from histoscope.checkpoints import describe_card, read_card
        from histoscope.errors import HistoScopeError

        path = self.path()
        self.edit.setToolTip(path)
        self.edit.setCursorPosition(len(path))  # the file name, not the folder, stays in view
        if not path:
            self.about.setText("")
            return
        try:
            self.about.setText(describe_card(read_card(path)))
        except (HistoScopeError, OSError, ValueError) as exc:
            self.about.setText(f"<span style='color:#e05050'>{exc}</span>")

    def path(self) -> str:
        return self.edit.text().strip()

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Checkpoint", "", "Checkpoints (*.safetensors)")
        if path:
            self.edit.setText(path)


class RunControls(QWidget):
    """Run and Cancel buttons, a progress bar and a status line for one long job."""

    def __init__(self, run_text: str, on_run, on_cancel) -> None:
        super().__init__()
        self.run_button = QPushButton(run_text)
        self.run_button.clicked.connect(on_run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(on_cancel)
        self.progress = QProgressBar()
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self._runners = [self.run_button]
        self._buttons = QHBoxLayout()
        self._buttons.addWidget(self.run_button)
        self._buttons.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(self._buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)

    def add_run_button(self, text: str, on_click) -> QPushButton:
        """Another button that starts a job (placed first; disabled while one runs)."""
        button = QPushButton(text)
        button.clicked.connect(on_click)
        self._buttons.insertWidget(0, button)
        self._runners.append(button)
        return button

    def busy(self, on: bool, text: str | None = None) -> None:
        """Disable Run / enable Cancel while a job runs (and say what it does)."""
        for button in self._runners:
            button.setEnabled(not on)
        self.cancel_button.setEnabled(on)
        if text is not None:
            self.status.setText(text)

    def error(self, exc: Exception | str) -> None:
        self.status.setText(f"<span style='color:#e05050'>{exc}</span>")

    def set_progress(self, done: int, total: int, fmt: str = "%v/%m") -> None:
        self.progress.setRange(0, total)
        self.progress.setValue(done)
        self.progress.setFormat(fmt)


def visible_region(viewer, slide, layer) -> tuple[int, int, int, int]:
    """Level-0 ``(x, y, w, h)`` of the canvas area over ``layer``, clipped to the slide."""
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    cy, cx = camera.center[-2:]
    zoom = camera.zoom
    ch, cw = viewer.canvas.size
    y0, x0, y1, x1 = cy - ch / 2 / zoom, cx - cw / 2 / zoom, cy + ch / 2 / zoom, cx + cw / 2 / zoom
    sy, sx = layer.scale[-2], layer.scale[-1]
    w, h = slide.dimensions
    px0, py0 = max(0, int(x0 / sx)), max(0, int(y0 / sy))
    px1, py1 = min(w, int(x1 / sx) + 1), min(h, int(y1 / sy) + 1)
    return px0, py0, max(px1 - px0, 1), max(py1 - py0, 1)


def session_for(layer, slide):
    """The :class:`~histoscope.session.Session` of an image layer, made once and kept on it.

    Every panel working on the layer shares it, so the tissue mask, grids and
    feature tables are computed once. It keeps large products beside the slide
    (``<slide>.histoscope/``) when that folder can be written, else in memory.
    """
    from histoscope.session import Session, SessionError, open_session

    session = layer.metadata.get("histoscope_session")
    if isinstance(session, Session) and session.slide is slide:
        return session
    try:
        session = open_session(slide)
    except SessionError as exc:  # read-only, or a folder of other pixels: say so, keep working
        session = open_session(slide, in_memory=True)
        layer.metadata["histoscope_session_note"] = str(exc)
    layer.metadata["histoscope_session"] = session
    return session


class TaskWidget(QWidget):
    """Base of the dock widgets that run registry tasks in a worker thread.

    Subclasses lay out their inputs, add :attr:`controls` to their layout and
    call :meth:`run_tasks`; progress fills the bar, Cancel asks the running
    task to stop and keeps what it finished, errors land in the status line
    (never a crash), and :attr:`worker` is ``None`` again once it has finished.
    """

    cancel_text = "Cancelled."

    def __init__(self, viewer, run_text: str) -> None:
        import threading

        super().__init__()
        from histoscope._widgets._session import AutoSave

        self.viewer = viewer
        self.worker = None
        self._cancel = threading.Event()
        self.autosave = AutoSave.for_viewer(viewer)  # results and edits kept in the session
        self.controls = RunControls(run_text, self.run, self.cancel)
        self.run_button = self.controls.run_button
        self.cancel_button = self.controls.cancel_button
        self.progress = self.controls.progress
        self.status = self.controls.status

    def run(self):  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def chosen_slide(self, combo: RGBLayerCombo):
        """``(slide, layer)`` for the combo's layer; ValueError when there is none."""
        from histoscope.layers import layer_slide

        layer = combo.layer()
        if layer is None:
            raise ValueError("Open a slide or image first.")
        slide = layer.metadata.get("slide")
        if slide is None:  # plain RGB data: wrap it once, keep it with the layer
            slide = layer_slide(layer.data, layer.metadata, layer.scale, layer.name,
                                units=getattr(layer, "units", None))  # fmt: skip
            layer.metadata["slide"] = slide
        return slide, layer

    def chosen_session(self, combo: RGBLayerCombo):
        """``(session, layer)`` for the combo's layer; ValueError when there is none."""
        slide, layer = self.chosen_slide(combo)
        return session_for(layer, slide), layer

    def view_centre(self, slide, layer) -> tuple[float, float]:
        """Level-0 ``(x, y)`` at the centre of the canvas (work there first)."""
        x, y, w, h = visible_region(self.viewer, slide, layer)
        return x + w / 2, y + h / 2

    def run_tasks(self, jobs, *, text: str, on_result, on_partial=None):
        """Run registry ``jobs`` (:class:`~histoscope._widgets._worker.Job`) in a worker.

        ``on_result(outcome)`` gets the :class:`~histoscope._widgets._worker.Outcome`
        (also after Cancel, with what was finished); ``on_partial(result)``
        gets the live result a task attaches to its progress steps.
        """
        from napari.qt.threading import create_worker

        from histoscope._widgets._worker import task_work

        self._cancel.clear()

        def step(value) -> None:
            if value.total == 0:  # a phase without a count: a busy bar that says what it is
                self.controls.set_progress(0, 0, value.what)
                self.status.setText(f"{value.what[:1].upper()}{value.what[1:]}…")
                return
            fmt = f"{value.what} %v/%m" if value.what else "%v/%m"
            self.controls.set_progress(value.done, value.total, fmt)
            if on_partial is not None and value.partial is not None:
                on_partial(value.partial)

        def returned(outcome) -> None:
            on_result(outcome)
            said = self.status.text()
            if outcome.cancelled and not said.startswith("Cancelled"):
                base = (
                    self.cancel_text
                    if outcome.results
                    else "Cancelled before anything was computed."
                )
                kept = "" if said.endswith("…") else said  # a progress line is not a result
                self.status.setText(f"{base} {kept}".strip())
            saved = self.autosave.save_now()
            problems = [f"Session NOT saved: {self.autosave.error}"] if not saved else []
            problems += self.autosave.notes
            if problems:
                note = " ".join(problems)
                self.status.setText(
                    f"{self.status.text()} <span style='color:#e0a030'>{note}</span>"
                )

        self.worker = create_worker(task_work, list(jobs), self._cancel, _start_thread=False,
                                    _connect={"yielded": step, "returned": returned,
                                              "errored": self._failed, "finished": self._done})  # fmt: skip
        self.controls.busy(True, text)
        self.worker.start()
        return self.worker

    def _toggle_click(self, on: bool) -> None:
        """Send canvas clicks to the panel's ``_on_click`` while ``on`` (a checkbox's toggle)."""
        callbacks = self.viewer.mouse_drag_callbacks
        if on and self._on_click not in callbacks:
            callbacks.append(self._on_click)
        elif not on and self._on_click in callbacks:
            callbacks.remove(self._on_click)

    def cancel(self) -> None:
        """Ask the running task to stop; it keeps what it has finished."""
        if self.worker is not None:
            self._cancel.set()
            self.status.setText("Cancelling…")

    def replace_layer(self, data, kwargs: dict, kind: str):
        """Add a layer, replacing one of the same name (a re-run)."""
        if kwargs["name"] in self.viewer.layers:
            self.viewer.layers.remove(kwargs["name"])
        layer = getattr(self.viewer, f"add_{kind}")(data, **kwargs)
        bar = layer.metadata.get("colorbar")
        if bar and hasattr(layer, "colorbar"):  # what the colours mean, beside the map
            layer.colorbar.visible = bar.get("visible", True)
        return layer

    def _failed(self, exc: Exception) -> None:
        self.controls.error(exc)

    def _done(self) -> None:
        self.controls.busy(False)
        self.worker = None


#: The panels' line for a slide outside the model's training data (issue 11).
OUTSIDE_TRAINING_TEXT = "Outside training data: treat calls as unreliable"


def show_training_data_flag(controls: RunControls, summary) -> QLabel:
    """Say under a panel's status line whether a result's slide is outside the training data.

    ``summary`` is a task result's ``summary()`` (its ``outside_training_data``
    and ``ood`` keys, see :mod:`histoscope.ood`). Outside: a red line
    :data:`OUTSIDE_TRAINING_TEXT`, with the score against the threshold in its
    tooltip; within, or unknown (a checkpoint without a reference): the line is
    hidden. The line is created under ``controls.status`` on first use.
    """
    label = getattr(controls, "training_data_flag", None)
    if label is None:
        label = QLabel("")
        label.setWordWrap(True)
        label.setStyleSheet("color: #e04040; font-weight: bold;")
        layout = controls.layout()
        layout.insertWidget(layout.indexOf(controls.status) + 1, label)
        controls.training_data_flag = label
    ood = (summary or {}).get("ood") or {}
    score, thr = ood.get("score"), ood.get("threshold")
    tip = ood.get("message", "")
    if score is not None and thr is not None:
        tip = (f"Training-data distance {score:.3g} vs threshold {thr:.3g} "
               f"({ood.get('n_items', 0)} items; {ood.get('features', '')})")  # fmt: skip
    outside = (summary or {}).get("outside_training_data") is True
    label.setText(OUTSIDE_TRAINING_TEXT if outside else "")
    label.setToolTip(tip)
    label.setVisible(outside)
    return label
