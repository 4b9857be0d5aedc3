"""IHC measurement dock widget: positive cells, H-score and Allred on the image in view."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qtpy.QtWidgets import QComboBox, QDoubleSpinBox, QFormLayout, QHBoxLayout, QLabel

from histoscope._widgets._common import RGBLayerCombo, TaskWidget, visible_region
from histoscope.tasks.ihc_measure import Compartment, IHCParams

if TYPE_CHECKING:
    import napari

_SUMMARY = ("n_cells", "percent_positive", "h_score", "allred", "intensity", "quantity", "location")
WHOLE = "whole tissue"


def region_inside(measurement, layer):
    """Per cell, whether it lies in a shapes or labels ``layer`` (placed in µm like the image).

    Labels: on a nonzero pixel. Shapes: inside a polygon, rectangle or ellipse
    (lines and paths enclose nothing).
    """
    import numpy as np
    import shapely
    from shapely import affinity
    from shapely.geometry import Point, Polygon

    from histoscope.tasks.ihc_measure import cells_in_geometry, cells_in_mask

    scale, translate = tuple(layer.scale[-2:]), tuple(layer.translate[-2:])
    if layer._type_string == "labels":
        return cells_in_mask(measurement, np.asarray(layer.data), scale, translate)
    parts = []
    for verts, kind in zip(layer.data, layer.shape_type, strict=True):
        yx = np.asarray(verts)[:, -2:] * scale + translate
        if kind == "ellipse":  # napari keeps an ellipse as the 4 corners of its box
            (y0, x0), (y1, x1) = yx.min(axis=0), yx.max(axis=0)
            circle = Point((x0 + x1) / 2, (y0 + y1) / 2).buffer(1.0, 64)
            parts.append(affinity.scale(circle, (x1 - x0) / 2, (y1 - y0) / 2))
        elif kind in ("polygon", "rectangle") and len(yx) >= 3:
            parts.append(Polygon(yx[:, ::-1]).buffer(0))
    return cells_in_geometry(measurement, shapely.union_all(parts) if parts else Polygon())


class IHCWidget(TaskWidget):
    """Measure DAB per cell in the visible region (or the whole image) and show the numbers."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(napari_viewer, "Measure")
        self.result = None
        self.layer_combo = RGBLayerCombo(napari_viewer)
        self.compartment = QComboBox()
        self.compartment.addItems([c.value for c in Compartment])
        self.compartment.setCurrentText(IHCParams().compartment.value)
        self.thresholds = []
        thr_row = QHBoxLayout()
        for value in IHCParams().thresholds:
            spin = QDoubleSpinBox()
            spin.setRange(0.0, 3.0)
            spin.setSingleStep(0.05)
            spin.setValue(value)
            self.thresholds.append(spin)
            thr_row.addWidget(spin)
        self.scope = QComboBox()
        self.scope.addItems(["visible region", "whole image"])
        form = QFormLayout()
        form.addRow("Image", self.layer_combo)
        form.addRow("Compartment", self.compartment)
        form.addRow("1+ / 2+ / 3+ (DAB OD)", thr_row)
        form.addRow("Measure", self.scope)
        self.count_inside = QComboBox()
        self.count_inside.setToolTip("Percentages among the cells inside a shapes or labels layer "
                                     "(e.g. the tumour region), or among all cells")  # fmt: skip
        form.addRow("Count inside", self.count_inside)
        self._region_choices()
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(self._region_choices)

        self.numbers = {k: QLabel("–") for k in _SUMMARY}
        results = QFormLayout()
        for k, label in self.numbers.items():
            results.addRow(k.replace("_", " "), label)
        self.breakdown = QLabel("–")
        results.addRow("0 / 1+ / 2+ / 3+", self.breakdown)
        layout = self.body_layout()
        layout.addLayout(form)
        layout.addWidget(self.controls)
        layout.addLayout(results)
        layout.addStretch()

    def _region_choices(self, *_) -> None:
        """The count-inside choices: the whole tissue, then every shapes and labels layer."""
        current = self.count_inside.currentText()
        names = [ly.name for ly in self.viewer.layers if ly._type_string in ("shapes", "labels")]
        self.count_inside.clear()
        self.count_inside.addItems([WHOLE, *names])
        if current in names:
            self.count_inside.setCurrentText(current)

    def params(self) -> IHCParams:
        """Parameters from the form; raises ValueError naming a bad one."""
        return IHCParams(
            compartment=self.compartment.currentText(),
            thresholds=tuple(s.value() for s in self.thresholds),
        )

    def run(self):
        """Start the measurement in a worker thread; returns the worker (or None)."""
        from histoscope._widgets._worker import Job

        try:
            params = self.params()
            session, layer = self.chosen_session(self.layer_combo)
            visible = self.scope.currentIndex() == 0
            region = visible_region(self.viewer, session.slide, layer) if visible else None
        except ValueError as exc:
            self.status.setText(str(exc))
            return None
        inside = self.count_inside.currentText()
        self._inside = None if inside in ("", WHOLE) else inside
        job = Job("ihc", session, params=params, region=region)
        return self.run_tasks([job], text=f"Measuring {layer.name}…", on_result=self._show)

    cancel_text = "Cancelled: the cells of the finished tiles are shown."

    def _show(self, outcome) -> None:
        result = outcome.get("ihc")
        if result is None:
            return
        name = getattr(self, "_inside", None)
        if name is not None and name in self.viewer.layers:
            result = result.within(
                region_inside(result, self.viewer.layers[name]), f"{name} region"
            )
        self.result = result
        summary = result.summary()
        warning = summary.get("warning")
        for key, label in self.numbers.items():
            v = summary[key]
            label.setText(f"{v:.1f}" if isinstance(v, float) else str(v))
            if warning and key in ("h_score", "allred", "percent_positive"):
                label.setText("– (no DAB)")
        pct = summary["percent_by_score"]
        self.breakdown.setText("  ".join(f"{k}: {v:.0f} %" for k, v in pct.items()))
        slide_name = Path(result.provenance.slide).name  # the image measured, not the box now
        self.replace_layer(*result.to_layers(name=f"IHC cells ({slide_name})")[0])
        text = f"{summary['n_cells']} cells measured; percentages of {summary['denominator']}."
        if warning:
            text += f" <span style='color:#e0a030'>Warning: {warning}</span>"
        self.status.setText(text)
