"""Tumour map dock widget: tissue mask, a viewport-first heatmap, Grad-CAM on click."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from histoscope.tissue import TissueParams

if TYPE_CHECKING:
    import napari

DEFAULT_CHECKPOINT = "tumour_patch_default.safetensors"
HEATMAP_NAME = "tumour probability"


def _heatmap_work(slide, checkpoint: str, near, stain_norm: bool = False, tissue_params=None):
    """Worker generator: yields the job once (to show its live layer), then progress."""
    from histoscope.checkpoints import load_checkpoint
    from histoscope.tasks.tumour import HeatmapJob
    from histoscope.tissue import tissue_mask

    model, card = load_checkpoint(checkpoint)
    tissue = tissue_mask(slide, tissue_params)
    job = HeatmapJob(slide, model, card, tissue=tissue, stain_norm=stain_norm)
    yield job
    return (yield from job.run(near=near))


class TumourWidget(QWidget):
    """Score every tissue tile for tumour, the tiles in view first; click a tile for Grad-CAM."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        from histoscope._data import sample_data_path

        self.viewer = napari_viewer
        self.worker = None
        self.job = None
        self.layer_combo = QComboBox()
        default = sample_data_path(DEFAULT_CHECKPOINT)
        self.checkpoint = QLineEdit(str(default) if default else "")
        self.checkpoint.setPlaceholderText("tile classifier checkpoint (.safetensors)")
        browse = QPushButton("…")
        browse.clicked.connect(self._browse)
        row = QHBoxLayout()
        row.addWidget(self.checkpoint)
        row.addWidget(browse)
        self.channel = QComboBox()
        self.channel.addItems(["saturation", "grey"])
        self.blur = QDoubleSpinBox()
        self.blur.setRange(0, 200)
        self.blur.setValue(TissueParams().blur_um)
        self.blur.setSuffix(" µm")
        self.min_area = QDoubleSpinBox()
        self.min_area.setRange(0, 1e7)
        self.min_area.setDecimals(0)
        self.min_area.setValue(TissueParams().min_area_um2)
        self.min_area.setSuffix(" µm²")
        form = QFormLayout()
        form.addRow("Slide", self.layer_combo)
        form.addRow("Checkpoint", row)
        form.addRow("Tissue channel", self.channel)
        form.addRow("Tissue blur", self.blur)
        form.addRow("Smallest tissue piece", self.min_area)

        self.tissue_button = QPushButton("Tissue mask")
        self.tissue_button.clicked.connect(self.run_tissue)
        self.run_button = QPushButton("Tumour heatmap")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        buttons = QHBoxLayout()
        for b in (self.tissue_button, self.run_button, self.cancel_button):
            buttons.addWidget(b)
        self.stain_box = QCheckBox("Stain normalisation (Macenko)")
        self.stain_box.setToolTip("Map this slide's H&E colours onto a reference before scoring")
        self.gradcam_box = QCheckBox("Grad-CAM of the tile I click")
        self.gradcam_box.toggled.connect(self._toggle_click)
        self.progress = QProgressBar()
        self.status = QLabel("")
        self.status.setWordWrap(True)

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.stain_box)
        layout.addWidget(self.gradcam_box)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addStretch()
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        self._refresh_layers()

    # ----------------------------------------------------------------- helpers
    def _refresh_layers(self, *_: object) -> None:
        current = self.layer_combo.currentText()
        self.layer_combo.clear()
        self.layer_combo.addItems(
            [ly.name for ly in self.viewer.layers if getattr(ly, "rgb", False)]
        )
        self.layer_combo.setCurrentIndex(max(self.layer_combo.findText(current), 0))

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Checkpoint", "", "Checkpoints (*.safetensors)")
        if path:
            self.checkpoint.setText(path)

    def _slide(self):
        from histoscope.layers import layer_slide

        name = self.layer_combo.currentText()
        if name not in self.viewer.layers:
            raise ValueError("Open a slide first.")
        layer = self.viewer.layers[name]
        return layer_slide(layer.data, layer.metadata, layer.scale, name), layer

    def tissue_params(self) -> TissueParams:
        """Tissue detection settings from the form."""
        return TissueParams(channel=self.channel.currentText(), blur_um=self.blur.value(),
                            min_area_um2=self.min_area.value())  # fmt: skip

    def _start(self, worker, text: str):
        self.worker = worker
        for b in (self.run_button, self.tissue_button):
            b.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.status.setText(text)
        worker.start()
        return worker

    def _connect(self, **extra):
        return {"errored": self._failed, "finished": self._done, **extra}

    # --------------------------------------------------------------- actions
    def run_tissue(self):
        """Tissue mask as a labels layer (in a worker)."""
        from napari.qt.threading import create_worker

        from histoscope.tasks.tumour import find_tissue

        try:
            slide, _ = self._slide()
        except ValueError as exc:
            self.status.setText(str(exc))
            return None
        w = create_worker(find_tissue, slide, self.tissue_params(),
                          _connect=self._connect(returned=self._add_result),
                          _start_thread=False)  # fmt: skip
        return self._start(w, "Finding tissue…")

    def run(self):
        """Tumour heatmap, tiles in view first (in a worker); returns the worker or None."""
        from napari.qt.threading import create_worker

        from histoscope._widgets.ihc import visible_region

        ckpt = self.checkpoint.text().strip()
        if not ckpt:
            self.status.setText("Choose a tile-classifier checkpoint.")
            return None
        try:
            slide, layer = self._slide()
        except ValueError as exc:
            self.status.setText(str(exc))
            return None
        x, y, w, h = visible_region(self.viewer, slide, layer)
        connect = self._connect(yielded=self._yielded, returned=self._finished_heatmap)
        near = (x + w / 2, y + h / 2)
        worker = create_worker(_heatmap_work, slide, ckpt, near, self.stain_box.isChecked(),
                               self.tissue_params(),
                               _connect=connect, _start_thread=False)  # fmt: skip
        return self._start(worker, "Scoring tiles in view first…")

    def cancel(self) -> None:
        if self.worker is not None:
            self.worker.quit()
            self.status.setText("Cancelled: the tiles scored so far stay on the map.")

    def _yielded(self, value) -> None:
        if not isinstance(value, tuple):  # the job: show its live layer
            self.job = value
            data, kwargs, _ = value.layer()
            if HEATMAP_NAME in self.viewer.layers:
                self.viewer.layers.remove(HEATMAP_NAME)
            self.viewer.add_image(data, **kwargs)
            return
        done, total = value
        self.progress.setRange(0, total)
        self.progress.setValue(done)
        if HEATMAP_NAME in self.viewer.layers:
            self.viewer.layers[HEATMAP_NAME].refresh()

    def _finished_heatmap(self, heatmap) -> None:
        if HEATMAP_NAME in self.viewer.layers:
            self.viewer.layers[HEATMAP_NAME].refresh()
        scored = int(np.isfinite(heatmap.values).sum())
        self.status.setText(f"{scored} tissue tiles scored; background left transparent.")

    def _add_result(self, result) -> None:
        for data, kwargs, kind in result.to_layers():
            if kwargs["name"] in self.viewer.layers:
                self.viewer.layers.remove(kwargs["name"])
            getattr(self.viewer, f"add_{kind}")(data, **kwargs)
        self.status.setText("")

    def _failed(self, exc: Exception) -> None:
        self.status.setText(f"<span style='color:#e05050'>{exc}</span>")

    def _done(self) -> None:
        for b in (self.run_button, self.tissue_button):
            b.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.worker = None

    # --------------------------------------------------------------- Grad-CAM
    def _toggle_click(self, on: bool) -> None:
        callbacks = self.viewer.mouse_drag_callbacks
        if on and self._on_click not in callbacks:
            callbacks.append(self._on_click)
        elif not on and self._on_click in callbacks:
            callbacks.remove(self._on_click)

    def _on_click(self, _viewer, event) -> None:
        if event.type == "mouse_press":
            self.gradcam_at(*event.position[-2:])

    def gradcam_at(self, y_um: float, x_um: float):
        """Grad-CAM of the tile under world ``(y, x)`` µm, added as a layer over that tile."""
        from napari.qt.threading import create_worker

        from histoscope.tasks.tumour import tile_gradcam

        if self.job is None:
            self.status.setText("Run the tumour heatmap first, then click a tile.")
            return None
        job = self.job
        worker = create_worker(
            tile_gradcam, job.slide, job.model, job.spec, x_um, y_um, job.grid, job.target,
            _connect={"returned": self._add_cam, "errored": self._failed}, _start_thread=False,
        )  # fmt: skip
        worker.start()
        return worker

    def _add_cam(self, value) -> None:
        cam, (x0, y0) = value
        mpp, smpp = self.job.spec.mpp, self.job.slide.mpp
        off = (mpp - smpp) / 2
        if "Grad-CAM" in self.viewer.layers:
            self.viewer.layers.remove("Grad-CAM")
        self.viewer.add_image(cam, name="Grad-CAM", scale=(mpp, mpp), colormap="turbo", units=("um", "um"),
                              translate=(y0 * smpp + off, x0 * smpp + off), opacity=0.5,
                              contrast_limits=(0, 1))  # fmt: skip
