"""Slide dock widget: open slides off the GUI thread and inspect their metadata."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

from qtpy.QtCore import QLocale, QObject, QTimer, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
)

from histoscope._sample_data import SYNTHETIC
from histoscope._widgets._common import (
    ErrorDetails,
    Panel,
    PathLabel,
    breakable,
    explain,
    fit_combo,
    form_layout,
)
from histoscope.layers import SLIDE_KEY, layer_slide
from histoscope.progress import Cancelled
from histoscope.slide import Slide

if TYPE_CHECKING:
    import napari

_FILTER = (
    "Slides (*.svs *.ndpi *.mrxs *.scn *.bif *.tif *.tiff *.ome.tif *.dcm *.vms *.png *.jpg"
    " *.jpeg);;All files (*)"
)
#: What the µm/px field and box say when no µm/px is known (it is never guessed).
MPP_UNKNOWN = "unknown — set it"
#: The fields shown, in words.
_FIELDS = {"vendor": "Scanner", "backend": "Read with", "dimensions": "Size (full resolution)",
           "levels": "Pyramid levels", "mpp": "µm per pixel",
           "magnification": "Magnification"}  # fmt: skip


class _Relay(QObject):
    """Carries a worker thread's progress to the GUI thread (a queued signal)."""

    step = Signal(int, int)


class MppBox(QDoubleSpinBox):
    """µm per pixel as the slide states it (0.499 stays 0.499); 0 shows "unknown — set it".

    The box shows and reads numbers with a decimal point whatever the user's
    locale, so 0.25 typed under a German locale is 0.25, not 25.
    """

    def __init__(self) -> None:
        super().__init__()
        self.setLocale(QLocale.c())  # display (textFromValue) and parsing agree
        self.setDecimals(6)
        self.setRange(0.0, 100.0)
        self.setSingleStep(0.01)
        self.setSpecialValueText(MPP_UNKNOWN)
        self.setSuffix(" µm/px")

    def textFromValue(self, value: float) -> str:  # noqa: N802 - Qt's name
        return f"{value:.6g}"


class SlideWidget(Panel):
    """Open a slide, see what the file says about it, set its µm/px if missing."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self._worker = None

        self.open_button = QPushButton("Open slide…")
        self.open_button.clicked.connect(self._choose_file)
        self.busy = QProgressBar()
        self.busy.setRange(0, 0)
        self.busy.hide()
        self.sample_kind = QComboBox()
        self.sample_kind.addItems([f"synthetic {label}" for label in SYNTHETIC.values()])
        self.sample_button = QPushButton("Open sample slide")
        self.sample_button.setToolTip("Generated once (in the background), then opened from the "
                                      "cache; the model defaults were trained on such slides")  # fmt: skip
        self.sample_button.clicked.connect(lambda: self.open_sample())
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self._cancel = threading.Event()
        self._relay = _Relay()
        self._relay.step.connect(self._sample_step)
        samples = QHBoxLayout()
        samples.addWidget(self.sample_kind, stretch=1)
        samples.addWidget(self.sample_button)
        samples.addWidget(self.cancel_button)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.details = ErrorDetails()

        self.layer_combo = fit_combo(QComboBox())
        self.layer_combo.currentIndexChanged.connect(self._show_info)
        self.file = PathLabel()
        self.folder = PathLabel(empty="none yet (made when the slide's layers are first saved)")
        self.folder.setToolTip("")
        self._mpp_layer: tuple | None = None  # the layer whose µm/px the box shows
        self._folder_timer = QTimer(self)  # the session folder appears once autosave writes
        self._folder_timer.setInterval(500)
        self._folder_timer.timeout.connect(self._look_for_folder)
        self.info = {name: QLabel("–") for name in _FIELDS}
        form = form_layout()
        form.addRow("Slide layer", self.layer_combo)
        form.addRow("File", self.file)
        form.addRow("Session folder", self.folder)
        for name, label in self.info.items():
            label.setWordWrap(True)
            form.addRow(_FIELDS[name], label)

        self.mpp_spin = MppBox()
        self.mpp_button = QPushButton("Set µm/px")
        self.mpp_button.clicked.connect(self._apply_mpp)
        row = QHBoxLayout()
        row.addWidget(self.mpp_spin, stretch=1)
        row.addWidget(self.mpp_button)

        layout = self.body_layout()
        layout.addWidget(self.open_button)
        layout.addLayout(samples)
        layout.addWidget(self.busy)
        layout.addLayout(form)
        layout.addLayout(row)
        layout.addWidget(self.status)
        layout.addWidget(self.details)
        layout.addStretch()

        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        self._refresh_layers()

    # ----------------------------------------------------------------- opening
    def _choose_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open slide", "", _FILTER)
        if path:
            self.open_path(path)

    def open_path(self, path: str):
        """Open ``path`` in a worker thread and add it as a layer; returns the worker."""
        from napari.qt.threading import create_worker

        from histoscope._reader import read_slides

        self._busy(True, f"Opening {Path(path).name}…", can_cancel=False)
        self._opening = Path(path).name
        connect = {"returned": self._add_layers, "errored": self._failed, "finished": self._done}
        worker = create_worker(read_slides, path, _connect=connect, _start_thread=False)
        self._worker = worker
        worker.start()
        return worker

    def open_sample(self, kind: str | None = None):
        """Open a synthetic sample slide, generating it in a worker the first time.

        ``kind`` is ``"he"`` or ``"ihc"`` (default: the one chosen in the panel).
        The bar counts the tiles written; Cancel stops the generation and leaves
        nothing half-written in the cache. Returns the worker.
        """
        from napari.qt.threading import create_worker

        from histoscope._sample_data import synthetic_layers

        kind = kind or list(SYNTHETIC)[self.sample_kind.currentIndex()]
        cancel, relay = self._cancel, self._relay
        cancel.clear()

        def on_tile(done: int, total: int) -> None:  # in the worker thread
            relay.step.emit(done, total)
            if cancel.is_set():
                raise Cancelled("sample slide generation cancelled")

        self._busy(True, f"Opening the synthetic {SYNTHETIC[kind]} slide (generated the first "
                         "time, about 15 s)…", can_cancel=True)  # fmt: skip
        self._opening = None
        connect = {"returned": self._add_layers, "errored": self._failed, "finished": self._done}
        worker = create_worker(synthetic_layers, kind, progress=on_tile, _connect=connect,
                               _start_thread=False)  # fmt: skip
        self._worker = worker
        worker.start()
        return worker

    def cancel(self) -> None:
        """Stop generating a sample slide (the cache keeps nothing of it)."""
        if self._worker is not None:
            self._cancel.set()
            self.status.setText("Cancelling…")

    def _sample_step(self, done: int, total: int) -> None:
        self.busy.setRange(0, total)
        self.busy.setValue(done)
        self.busy.setFormat("generating: tile %v of %m")

    def _busy(self, on: bool, text: str | None = None, *, can_cancel: bool = False) -> None:
        """Buttons while a worker runs; Cancel only where the job can stop (a sample slide)."""
        for button in (self.open_button, self.sample_button):
            button.setEnabled(not on)
        self.cancel_button.setEnabled(on and can_cancel)
        self.busy.setVisible(on)
        if on:
            self.busy.setRange(0, 0)  # busy until a count arrives
            self.details.clear()
        if text is not None:
            self.status.setText(text)

    def _add_layers(self, layer_data: list) -> None:
        for data, kwargs, layer_type in layer_data:
            getattr(self.viewer, f"add_{layer_type}")(data, **kwargs)
        self.status.setText("")

    def _failed(self, exc: Exception) -> None:
        """Say in user terms why the file did not open; the technical detail behind Details."""
        from html import escape

        if isinstance(exc, Cancelled):
            self.status.setText("Cancelled: no sample slide was written.")
            return
        user, detail = explain(exc, name=getattr(self, "_opening", None))
        user = escape(breakable(user), quote=False)
        self.status.setText(f"<span style='color:#e05050'>{user}</span>")
        self.details.set_detail(detail)

    def _done(self) -> None:
        self._busy(False)
        self._worker = None

    # -------------------------------------------------------------- inspecting
    def slide_layers(self) -> list:
        """Image layers that hold a HistoScope slide, or plain RGB data a task can read."""
        mine = {SLIDE_KEY, "slide"}
        return [
            ly
            for ly in self.viewer.layers
            if getattr(ly, "rgb", False) or mine & ly.metadata.keys()
        ]

    def _refresh_layers(self, *_: object) -> None:
        current = self.layer_combo.currentText()
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        self.layer_combo.addItems([ly.name for ly in self.slide_layers()])
        idx = self.layer_combo.findText(current)
        self.layer_combo.setCurrentIndex(max(idx, 0))
        self.layer_combo.blockSignals(False)
        self._show_info()

    def current_layer(self):
        name = self.layer_combo.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None  # noqa: SIM401

    def layer_summary(self, layer) -> tuple[dict, Slide | None]:
        """``(summary, slide)`` of a layer: its slide's, or that of its data wrapped lazily.

        Wrapping reads no pixels, and the slide is not kept: tasks wrap the
        layer again when they run, with whatever µm/px the layer has by then.
        """
        slide = layer.metadata.get("slide")
        if not isinstance(slide, Slide):
            if SLIDE_KEY in layer.metadata:
                return layer.metadata[SLIDE_KEY], None
            slide = layer_slide(
                layer.data, layer.metadata, layer.scale, layer.name, units=layer.units
            )
        return slide.metadata, slide

    def _show_info(self, *_: object) -> None:
        layer = self.current_layer()
        meta, slide = {}, None
        if layer is not None:
            try:
                meta, slide = self.layer_summary(layer)
            except ValueError as exc:
                self.status.setText(str(exc))
        for name, label in self.info.items():
            if name == "levels" and slide is not None:
                text = ", ".join(f"{w}×{h}" for h, w in (lvl.shape[:2] for lvl in slide.levels))
            elif name == "dimensions" and meta:
                text = "{} × {} px".format(*meta["dimensions"])
            elif name == "mpp" and meta:
                text = f"{meta['mpp']:.6g} µm/px" if meta.get("mpp") else MPP_UNKNOWN
            elif name == "magnification" and meta:
                mag = meta.get("magnification")
                text = f"{mag:g}x" if isinstance(mag, int | float) else "not stated in the file"
            else:
                value = meta.get(name)
                text = "–" if value is None else str(value)
            label.setText(text)
        chosen = None if layer is None else (id(layer), layer.name)
        if chosen != self._mpp_layer:  # another slide: its own value, or unknown; a typed,
            self._mpp_layer = chosen  # not yet applied value survives other layers' changes
            self.mpp_spin.setValue(float(meta.get("mpp") or 0.0))
        path = meta.get("path")
        self.file.set_path(path if path and Path(path).exists() else None)
        folder = _session_folder(layer)
        self.folder.set_path(folder)
        if folder is None and layer is not None:
            self._folder_looks = 0
            self._folder_timer.start()
        else:
            self._folder_timer.stop()

    def _look_for_folder(self) -> None:
        """Show the session folder once autosave has made it (it writes in its own thread)."""
        layer = self.current_layer()
        folder = _session_folder(layer)
        self._folder_looks += 1
        if folder is not None or layer is None or self._folder_looks > 60:  # for 30 s;
            self._folder_timer.stop()  # the next layer change looks again
            self.folder.set_path(folder)

    def _apply_mpp(self) -> None:
        layer = self.current_layer()
        if layer is None:
            self.status.setText("Open a slide first.")
            return
        mpp = float(self.mpp_spin.value())
        if mpp <= 0:
            self.status.setText("Enter the µm per pixel first (the scan's resolution).")
            return
        slide = layer.metadata.get("slide")
        if isinstance(slide, Slide):
            slide.mpp = mpp
            layer.metadata[SLIDE_KEY] = slide.metadata
        layer.scale = (mpp, mpp)
        layer.units = ("um", "um")
        self.status.setText("")
        self._mpp_layer = None  # show the value as applied
        self._show_info()


def _session_folder(layer) -> str | None:
    """The folder where the layer's session keeps its work, if it has one yet."""
    from histoscope.session import default_folder

    if layer is None:
        return None
    session = layer.metadata.get("histoscope_session")
    folder = getattr(session, "folder", None)
    if folder is not None:
        return str(folder)
    path = (layer.metadata.get(SLIDE_KEY) or {}).get("path")
    if path and default_folder(path).is_dir():
        return str(default_folder(path))
    return None
