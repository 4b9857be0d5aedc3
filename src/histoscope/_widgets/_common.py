"""Pieces every HistoScope dock widget shares: image picker, checkpoint picker, run controls."""

from __future__ import annotations

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
    """The viewer's RGB image layers, kept current as layers come and go."""

    def __init__(self, viewer) -> None:
        super().__init__()
        self.viewer = viewer
        for event in (viewer.layers.events.inserted, viewer.layers.events.removed):
            event.connect(self.refresh)
        self.refresh()

    def refresh(self, *_: object) -> None:
        current = self.currentText()
        self.blockSignals(True)
        self.clear()
        self.addItems([ly.name for ly in self.viewer.layers if getattr(ly, "rgb", False)])
        self.blockSignals(False)
        self.setCurrentIndex(max(self.findText(current), 0))

    def layer(self):
        """The chosen layer, or ``None``."""
        name = self.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None


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
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.edit)
        row.addWidget(browse)

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


class TaskWidget(QWidget):
    """Base of the dock widgets that run one task in a worker thread.

    Subclasses lay out their inputs, add :attr:`controls` to their layout and
    call :meth:`start`; the worker's errors land in the status line, never in
    a crash, and :attr:`worker` is ``None`` again once it has finished.
    """

    def __init__(self, viewer, run_text: str) -> None:
        super().__init__()
        self.viewer = viewer
        self.worker = None
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
        return layer_slide(layer.data, layer.metadata, layer.scale, layer.name), layer

    def model_inputs(self, picker: CheckpointPicker, combo: RGBLayerCombo, what: str):
        """``(checkpoint, slide, view centre)`` for a model run; ValueError names what is missing.

        The view centre is the level-0 ``(x, y)`` the run should start from.
        """
        ckpt = picker.path()
        if not ckpt:
            raise ValueError(f"Choose a {what} checkpoint.")
        slide, layer = self.chosen_slide(combo)
        x, y, w, h = visible_region(self.viewer, slide, layer)
        return ckpt, slide, (x + w / 2, y + h / 2)

    def start(self, fn, *args, text: str, yielded=None, returned=None, **kwargs):
        """Run ``fn(*args, **kwargs)`` (a function or generator) in a worker; return it."""
        from napari.qt.threading import create_worker

        connect = {"errored": self._failed, "finished": self._done}
        if yielded is not None:
            connect["yielded"] = yielded
        if returned is not None:
            connect["returned"] = returned
        self.worker = create_worker(fn, *args, _connect=connect, _start_thread=False, **kwargs)
        self.controls.busy(True, text)
        self.worker.start()
        return self.worker

    def cancel(self) -> None:
        if self.worker is not None:
            self.worker.quit()
            self.status.setText(self.cancel_text)

    cancel_text = "Cancelled."

    def replace_layer(self, data, kwargs: dict, kind: str):
        """Add a layer, replacing one of the same name (a re-run)."""
        if kwargs["name"] in self.viewer.layers:
            self.viewer.layers.remove(kwargs["name"])
        return getattr(self.viewer, f"add_{kind}")(data, **kwargs)

    def _failed(self, exc: Exception) -> None:
        self.controls.error(exc)

    def _done(self) -> None:
        self.controls.busy(False)
        self.worker = None
