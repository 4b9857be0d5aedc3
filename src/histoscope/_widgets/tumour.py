"""Tumour map dock widget: tissue mask, a viewport-first heatmap, Grad-CAM on click."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtWidgets import QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout

from histoscope._widgets._common import (
    CheckpointPicker,
    RGBLayerCombo,
    TaskWidget,
    show_training_data_flag,
)
from histoscope.tissue import TissueParams

if TYPE_CHECKING:
    import napari

DEFAULT_CHECKPOINT = "tumour_patch_default.safetensors"
HEATMAP_NAME = "tumour probability"


def edited_tissue(viewer, session):
    """The session's tissue as the user edited it in the viewer, or ``None`` if unedited.

    Looks for the tissue labels layer HistoScope made for this slide and
    always installs the tissue it shows as the session's tissue in force:
    when its pixels differ from what was drawn (the user painted or erased),
    the edited mask, whose key is returned; when they do not (never edited,
    or an edit undone), the detection settings the layer was made with, so an
    edit the user has undone is no longer used.
    """
    from histoscope.tasks.tissue import use_edited_mask
    from histoscope.tissue import TissueParams, mask_sha256

    for layer in viewer.layers:
        meta = layer.metadata
        prov = meta.get("histoscope") or {}
        if (layer._type_string != "labels" or meta.get("histoscope_task") != "tissue"
                or prov.get("slide") != str(session.slide.path) or "mask_sha256" not in meta):  # fmt: skip
            continue
        names = TissueParams.__dataclass_fields__
        saved = prov.get("params") or {}
        base = TissueParams(**{k: v for k, v in saved.items() if k in names})
        if mask_sha256(layer.data) == meta.get("mask_sha256") and not saved.get("edit_sha256"):
            session.tissue_params = base  # as detected: an earlier edit, since undone, is not used
            return None
        return use_edited_mask(session, np.asarray(layer.data), base)
    return None


def _unwrapped(layer):
    """The layer itself: a plugin dock's viewer hands out a new proxy of it on every access."""
    return getattr(layer, "__wrapped__", layer)


class TumourWidget(TaskWidget):
    """Score every tissue tile for tumour, the tiles in view first; click a tile for Grad-CAM."""

    cancel_text = "Cancelled: the tiles scored so far stay on the map."

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(napari_viewer, "Tumour heatmap")
        self.heatmap = None
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
        layout = self.body_layout()
        layout.addLayout(form)
        layout.addWidget(self.stain_box)
        layout.addWidget(self.gradcam_box)
        layout.addWidget(self.controls)
        layout.addStretch()

    def tissue_params(self) -> TissueParams:
        """Tissue detection settings from the form."""
        return TissueParams(channel=self.channel.currentText(), blur_um=self.blur.value(),
                            min_area_um2=self.min_area.value())  # fmt: skip

    def tumour_params(self):
        """Tumour map settings from the form."""
        from histoscope.tasks.tumour import TumourParams

        return TumourParams(stain_norm="on" if self.stain_box.isChecked() else "auto")

    # ----------------------------------------------------------------- actions
    def run_tissue(self):
        """Tissue mask as a labels layer (in a worker); returns the worker or None."""
        from histoscope._widgets._worker import Job

        try:
            session, _ = self.chosen_session(self.layer_combo)
            params = self.tissue_params()
        except ValueError as exc:
            self.status.setText(str(exc))
            return None
        return self.run_tasks([Job("tissue", session, params=params)], text="Finding tissue…",
                              on_result=self._add_tissue)  # fmt: skip

    def run(self):
        """Tumour heatmap, tiles in view first (in a worker); returns the worker or None."""
        from histoscope._widgets._worker import Job

        try:
            session, layer = self.chosen_session(self.layer_combo)
            ckpt = self.picker.path()
            if not ckpt:
                raise ValueError("Choose a tile-classifier checkpoint.")
            tissue, params = self.tissue_params(), self.tumour_params()
        except ValueError as exc:
            self.status.setText(str(exc))
            return None
        try:
            edited = edited_tissue(self.viewer, session)
        except ValueError as exc:
            self.status.setText(str(exc))
            return None
        self.heatmap, self._heatmap_checkpoint, self._heatmap_session = None, ckpt, session
        centre = self.view_centre(session.slide, layer)
        self._empty_map = None
        if HEATMAP_NAME not in self.viewer.layers:  # a previous map stays until tiles replace it
            self._show_empty_map(session, layer)
        jobs = [Job("tissue", session, params=edited or tissue),
                Job("tumour", session, ckpt, params=params, near=centre, layers=True)]  # fmt: skip
        text = "Scoring tiles in view first" + (" (your edited tissue mask)…" if edited else "…")
        return self.run_tasks(jobs, text=text, on_result=self._finished_heatmap,
                              on_partial=self._live)  # fmt: skip

    def _show_empty_map(self, session, slide_layer) -> None:
        """Add the heatmap layer, empty, before the worker starts; the first tiles fill it in.

        napari's making of a layer (its visual, its controls, the colour bar) is
        the slowest thing the GUI thread does in a run: done here, it does not
        compete with the worker for the interpreter, and when tiles arrive the
        layer only takes the map's array (:meth:`_fill`). Its colour bar shows
        from then on: a run that scores no tile removes the layer, and napari
        0.9.2 can crash drawing a colour bar after a shown one's layer was removed.
        """
        from histoscope._widgets._session import SLIDE_TAG
        from histoscope.results import HEATMAP_OPACITY, fading_colormap

        h, w = session.slide.dimensions[::-1]
        (sy, sx), (ty, tx) = slide_layer.scale[-2:], slide_layer.translate[-2:]
        label = "tumour probability (0-1)"
        # one NaN pixel covering the slide's pixels exactly: the viewer's extent stays as it is
        kwargs = {"name": HEATMAP_NAME, "scale": (h * sy, w * sx),
                  "translate": (ty + (h - 1) * sy / 2, tx + (w - 1) * sx / 2), "units": ("um", "um"),
                  "colormap": fading_colormap("inferno"), "opacity": HEATMAP_OPACITY,
                  "contrast_limits": (0.0, 1.0),
                  "metadata": {SLIDE_TAG: str(session.slide.path),
                               "colorbar": {"visible": False, "label": label}}}  # fmt: skip
        layer = self.replace_layer(np.full((1, 1), np.nan, np.float32), kwargs, "image")
        self._empty_map = _unwrapped(layer)

    def _fill(self, layer, data, kwargs: dict) -> None:
        """Put the map's array, placement and provenance into the empty layer."""
        layer.metadata = {**layer.metadata, **kwargs["metadata"]}
        layer.scale, layer.translate = kwargs["scale"], kwargs["translate"]
        layer.contrast_limits = kwargs["contrast_limits"]
        layer.data = data
        layer.colorbar.visible = True

    def _drop_empty_map(self) -> None:
        """Remove the empty layer of a run that scored no tile (cancelled, failed).

        Its colour bar was never shown (see :meth:`_show_empty_map`).
        """
        layer, self._empty_map = getattr(self, "_empty_map", None), None
        if layer is not None and layer in self.viewer.layers:
            self.viewer.layers.remove(layer)

    def _live(self, heatmap, built: list | None = None) -> None:
        """Show the map as it fills in (the same array, updated in place).

        ``built``: the layer data the worker already made (at the end of a run).
        The first tiles go into the empty layer made when the run started, or
        into the previous run's map (:meth:`replace_layer` refills it in place).
        """
        layer = self.viewer.layers[HEATMAP_NAME] if HEATMAP_NAME in self.viewer.layers else None
        empty = getattr(self, "_empty_map", None)
        if layer is not None and _unwrapped(layer) is empty:
            self._empty_map = None
            self._fill(empty, *(built or heatmap.to_layers())[0][:2])
        elif layer is None or layer.data is not heatmap.values:
            self.replace_layer(*(built or heatmap.to_layers())[0])
        else:
            layer.refresh()

    def _finished_heatmap(self, outcome) -> None:
        heatmap = outcome.get("tumour")
        if heatmap is None:
            self._drop_empty_map()
            if outcome.cancelled:
                self.status.setText("Cancelled before any tile was scored.")
            return
        self._live(heatmap, outcome.layers("tumour"))
        self.heatmap = heatmap
        s = heatmap.summary()
        show_training_data_flag(self.controls, s)
        edge = f" {s['edge_note']}." if s.get("edge_note") else ""
        self.status.setText(f"{s['scored']} of {s['tiles']} tissue tiles scored; "
                            f"{s['tumour_tiles']} at p >= 0.5; background left transparent."
                            f"{edge}")  # fmt: skip

    def _done(self) -> None:
        self._drop_empty_map()  # a run that failed leaves no empty layer behind
        super()._done()

    def _add_tissue(self, outcome) -> None:
        result = outcome.get("tissue")
        if result is None:
            return
        from histoscope.tasks.tissue import outline_tissue_layer

        for layer_data in result.to_layers():
            outline_tissue_layer(self.replace_layer(*layer_data))  # an outline: H&E stays visible
        self.status.setText(f"Tissue: {100 * result.mask.fraction:.0f}% of the slide.")

    # ---------------------------------------------------------------- Grad-CAM
    def _on_click(self, _viewer, event) -> None:
        """A click explains a tile only while the heatmap is the active layer (not while annotating)."""
        active = self.viewer.layers.selection.active
        if event.type == "mouse_press" and active is not None and active.name == HEATMAP_NAME:
            self.gradcam_at(*event.position[-2:])

    def gradcam_at(self, y_um: float, x_um: float):
        """Grad-CAM of the tile under world ``(y, x)`` µm, added as a layer over that tile.

        It explains the checkpoint and the stain normalisation the heatmap used.
        """
        from histoscope._widgets._worker import Job
        from histoscope.tasks.tumour import TumourParams

        if self.heatmap is None or self.worker is not None:
            self.status.setText("Run the tumour heatmap first, then click a tile.")
            return None
        heat, session = self.heatmap, self._heatmap_session  # the slide the map was made on
        g = heat.grid
        px, py = x_um / g.slide_mpp, y_um / g.slide_mpp
        r, c = int(py // g.stride), int(px // g.stride)
        inside = 0 <= r < g.shape[0] and 0 <= c < g.shape[1]
        prob = float(heat.values[r, c]) if inside else float("nan")
        if prob != prob:  # NaN: glass, off the slide, or not scored
            self.status.setText("No scored tissue tile there: Grad-CAM explains scored tiles only.")
            return None
        self._cam_tile = (r, c, prob)
        params = heat.provenance.params
        p = TumourParams(min_tissue=params["min_tissue"], stain_norm=params["stain_norm"])
        job = Job("gradcam", session, self._heatmap_checkpoint, params=p, near=(px, py))
        return self.run_tasks([job], text="Grad-CAM…", on_result=self._add_cam)

    def _add_cam(self, outcome) -> None:
        result = outcome.get("gradcam")
        if result is not None:
            self.replace_layer(*result.to_layers()[0])
            r, c, prob = self._cam_tile
            s = result.summary()
            um = self.heatmap.grid.slide_mpp
            self.status.setText(f"Grad-CAM of tile (row {r}, col {c}) at x = {s['tile_x'] * um:.0f}"
                                f" µm, y = {s['tile_y'] * um:.0f} µm, p(tumour) = {prob:.2f}: "
                                "where the classifier found tumour evidence.")  # fmt: skip
