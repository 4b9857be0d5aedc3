"""Tumour map dock widget: tissue mask, a viewport-first heatmap, Grad-CAM on click."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtWidgets import QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QVBoxLayout

from histoscope._widgets._common import CheckpointPicker, RGBLayerCombo, TaskWidget
from histoscope.tissue import TissueParams

if TYPE_CHECKING:
    import napari

DEFAULT_CHECKPOINT = "tumour_patch_default.safetensors"
HEATMAP_NAME = "tumour probability"


def _heatmap_work(slide, checkpoint: str, near, stain_norm: bool | None = None, tissue_params=None):
    """Worker generator: yields the job once (to show its live layer), then progress."""
    from histoscope.checkpoints import load_checkpoint
    from histoscope.tasks.tumour import HeatmapJob
    from histoscope.tissue import tissue_mask

    model, card = load_checkpoint(checkpoint)
    tissue = tissue_mask(slide, tissue_params)
    job = HeatmapJob(slide, model, card, tissue=tissue, stain_norm=stain_norm)
    yield job
    return (yield from job.run(near=near))


class TumourWidget(TaskWidget):
    """Score every tissue tile for tumour, the tiles in view first; click a tile for Grad-CAM."""

    cancel_text = "Cancelled: the tiles scored so far stay on the map."

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(napari_viewer, "Tumour heatmap")
        self.job = None
        self.layer_combo = RGBLayerCombo(napari_viewer)
        self.picker = CheckpointPicker(
            DEFAULT_CHECKPOINT, "tile classifier checkpoint (.safetensors)"
        )
        self.checkpoint = self.picker.edit
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
        form.addRow("Checkpoint", self.picker)
        form.addRow("Tissue channel", self.channel)
        form.addRow("Tissue blur", self.blur)
        form.addRow("Smallest tissue piece", self.min_area)

        self.tissue_button = self.controls.add_run_button("Tissue mask", self.run_tissue)
        self.stain_box = QCheckBox("Force Macenko stain normalisation")
        self.stain_box.setToolTip(
            "Off: normalise only if the checkpoint was trained on normalised tiles.\n"
            "On: always map this slide's H&E colours onto Macenko's reference first\n"
            "(hurts models trained without it, such as the embedded default)."
        )
        self.gradcam_box = QCheckBox("Grad-CAM of the tile I click")
        self.gradcam_box.toggled.connect(self._toggle_click)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.stain_box)
        layout.addWidget(self.gradcam_box)
        layout.addWidget(self.controls)
        layout.addStretch()

    def tissue_params(self) -> TissueParams:
        """Tissue detection settings from the form."""
        return TissueParams(channel=self.channel.currentText(), blur_um=self.blur.value(),
                            min_area_um2=self.min_area.value())  # fmt: skip

    # ----------------------------------------------------------------- actions
    def run_tissue(self):
        """Tissue mask as a labels layer (in a worker)."""
        from histoscope.tasks.tumour import find_tissue

        try:
            slide, _ = self.chosen_slide(self.layer_combo)
        except ValueError as exc:
            self.status.setText(str(exc))
            return None
        return self.start(find_tissue, slide, self.tissue_params(), text="Finding tissue…",
                          returned=self._add_tissue)  # fmt: skip

    def run(self):
        """Tumour heatmap, tiles in view first (in a worker); returns the worker or None."""
        try:
            ckpt, slide, centre = self.model_inputs(
                self.picker, self.layer_combo, "tile-classifier"
            )
        except ValueError as exc:
            self.status.setText(str(exc))
            return None
        return self.start(
            _heatmap_work, slide, ckpt, centre, self.stain_box.isChecked() or None,
            self.tissue_params(), text="Scoring tiles in view first…", yielded=self._yielded,
            returned=self._finished_heatmap,
        )  # fmt: skip

    def _yielded(self, value) -> None:
        if not isinstance(value, tuple):  # the job: show its live layer
            self.job = value
            self.replace_layer(*value.layer())
            return
        self.controls.set_progress(*value)
        if HEATMAP_NAME in self.viewer.layers:
            self.viewer.layers[HEATMAP_NAME].refresh()

    def _finished_heatmap(self, heatmap) -> None:
        if HEATMAP_NAME in self.viewer.layers:
            self.viewer.layers[HEATMAP_NAME].refresh()
        scored = int(np.isfinite(heatmap.values).sum())
        self.status.setText(f"{scored} tissue tiles scored; background left transparent.")

    def _add_tissue(self, result) -> None:
        for layer_data in result.to_layers():
            self.replace_layer(*layer_data)
        self.status.setText(f"Tissue: {100 * result.mask.fraction:.0f}% of the slide.")

    # ---------------------------------------------------------------- Grad-CAM
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
        kwargs = {"name": "Grad-CAM", "scale": (mpp, mpp), "units": ("um", "um"), "opacity": 0.5,
                  "translate": (y0 * smpp + off, x0 * smpp + off), "colormap": "turbo",
                  "contrast_limits": (0, 1)}  # fmt: skip
        self.replace_layer(cam, kwargs, "image")
