"""IHC measurement dock widget: positive cells, H-score and Allred on the image in view."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qtpy.QtWidgets import QComboBox, QDoubleSpinBox, QFormLayout, QHBoxLayout, QLabel, QVBoxLayout

from histoscope._widgets._common import RGBLayerCombo, TaskWidget, visible_region
from histoscope.tasks.ihc_measure import Compartment, IHCParams

if TYPE_CHECKING:
    import napari

_SUMMARY = ("n_cells", "percent_positive", "h_score", "allred", "intensity", "quantity", "location")


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

        self.numbers = {k: QLabel("–") for k in _SUMMARY}
        results = QFormLayout()
        for k, label in self.numbers.items():
            results.addRow(k.replace("_", " "), label)
        self.breakdown = QLabel("–")
        results.addRow("0 / 1+ / 2+ / 3+", self.breakdown)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.controls)
        layout.addLayout(results)
        layout.addStretch()

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
        job = Job("ihc", session, params=params, region=region)
        return self.run_tasks([job], text=f"Measuring {layer.name}…", on_result=self._show)

    cancel_text = "Cancelled: the cells of the finished tiles are shown."

    def _show(self, outcome) -> None:
        result = outcome.get("ihc")
        if result is None:
            return
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
