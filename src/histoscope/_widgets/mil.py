"""Attention MIL dock widget (CLAM): slide prediction, attention heatmap, top tiles to visit."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QFormLayout, QLabel, QListView, QListWidget

from histoscope._widgets._common import (
    CheckpointPicker,
    RGBLayerCombo,
    TaskWidget,
    show_training_data_flag,
)

if TYPE_CHECKING:
    import napari

DEFAULT_CHECKPOINT = "clam_default.safetensors"


class MILWidget(TaskWidget):
    """Whole-slide attention MIL: what the slide is, and which tiles made the call."""

    cancel_text = "Cancelled: the call shown is provisional, from the tiles encoded so far."

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(napari_viewer, "Classify slide")
        self.result = None
        self.layer_combo = RGBLayerCombo(napari_viewer)
        self.picker = CheckpointPicker(DEFAULT_CHECKPOINT, "CLAM checkpoint (.safetensors)")
        self.checkpoint = self.picker.edit
        form = QFormLayout()
        form.addRow("Slide", self.layer_combo)
        form.addRow("Checkpoint", self.picker)
        self.prediction = QLabel("–")
        self.prediction.setWordWrap(True)
        self.top_list = QListWidget()  # rows wrap in a narrow dock; no sideways scrolling
        self.top_list.setWordWrap(True)
        self.top_list.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.top_list.setResizeMode(QListView.ResizeMode.Adjust)
        self.top_list.setTextElideMode(Qt.TextElideMode.ElideNone)
        self.top_list.currentRowChanged.connect(self.go_to_tile)
        self.top_list.itemClicked.connect(lambda item: self.go_to_tile(self.top_list.row(item)))
        layout = self.body_layout()
        layout.addLayout(form)
        layout.addWidget(self.controls)
        layout.addWidget(QLabel("Slide call"))
        layout.addWidget(self.prediction)
        layout.addWidget(QLabel("Most attended tiles (select to go there)"))
        layout.addWidget(self.top_list, stretch=1)

    def run(self):
        """Classify the chosen slide in a worker; returns the worker or None."""
        from histoscope._widgets._worker import Job
        from histoscope._widgets.tumour import edited_tissue

        try:
            session, layer = self.chosen_session(self.layer_combo)
            ckpt = self.picker.path()
            if not ckpt:
                raise ValueError("Choose a CLAM checkpoint.")
            edited_tissue(self.viewer, session)  # the user's edits to the tissue layer count
        except ValueError as exc:
            self.status.setText(str(exc))
            return None
        self.result = None
        self.top_list.clear()
        self.prediction.setText("–")
        job = Job("mil", session, ckpt, near=self.view_centre(session.slide, layer), layers=True)
        return self.run_tasks([job], text="Encoding tissue tiles…", on_result=self._show)

    def _show(self, outcome) -> None:
        result = outcome.get("mil")
        if result is None:
            return
        self.result = result
        probs = ", ".join(
            f"{c}: {p:.2f}" for c, p in zip(result.classes, result.probability, strict=True)
        )
        s = result.summary()
        show_training_data_flag(self.controls, s)
        note = (f"<br><i>provisional: {s['tiles_encoded']} of {s['n_tiles']} tiles encoded</i>"
                if result.cancelled else "")  # fmt: skip
        self.prediction.setText(f"<b>{result.label}</b> ({probs}){note}")
        for data, kwargs, kind in outcome.layers("mil"):  # built in the worker
            self.replace_layer(data, kwargs, kind)
        mpp = result.attention.grid.slide_mpp
        n = max(s["tiles_encoded"], 1)
        for t in result.top_tiles:  # attention sums to 1: n x weight is "times the average"
            self.top_list.addItem(
                f"#{t['rank']} of {n} (top {100 * t['rank'] / n:.1f} %): "
                f"{n * t['attention']:.1f}x the average attention, "
                f"at {t['x'] * mpp:.0f}, {t['y'] * mpp:.0f} µm"
            )
        edge = f" {s['edge_note']}." if s.get("edge_note") else ""
        self.status.setText(f"{s['tiles_encoded']} tiles attended.{edge}")

    def go_to_tile(self, row: int) -> None:
        """Centre the view on the ``row``-th most attended tile, zoomed to see it."""
        if self.result is None or not 0 <= row < len(self.result.top_tiles):
            return
        t = self.result.top_tiles[row]
        g = self.result.attention.grid
        half = g.stride / 2
        camera = self.viewer.scene.camera if hasattr(self.viewer, "scene") else self.viewer.camera
        camera.center = ((t["y"] + half) * g.slide_mpp, (t["x"] + half) * g.slide_mpp)
        camera.zoom = min(self.viewer.canvas.size) / (4 * g.stride * g.slide_mpp)
