"""IHC measurement dock widget: positive cells, H-score and Allred on the image in view."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtWidgets import QComboBox, QDoubleSpinBox, QFormLayout, QHBoxLayout, QLabel

from histoscope._widgets._common import (
    OUTSIDE_TRAINING_TEXT,
    RGBLayerCombo,
    TaskWidget,
    show_training_data_flag,
    visible_region,
)
from histoscope.tasks.ihc_measure import Compartment, IHCParams

if TYPE_CHECKING:
    import napari

_SUMMARY = ("n_cells", "percent_positive", "h_score", "allred", "intensity", "quantity", "location")
WHOLE = "whole tissue"
#: Colour of the outline around the measured area (cyan: visible on H-DAB).
MEASURED_EDGE = "#00e5ff"
#: Metadata key of the measured-area outline layer (never a Count-inside choice).
MEASURED_TAG = "histoscope_ihc_measured_area"
#: The red line under the status for a slide unlike the learned detector's training data.
IHC_OUTSIDE_TEXT = "Outside training data: treat the cell counts as unreliable"


def score_legend(percent: dict | None = None) -> str:
    """Rich text: each score's colour as the cell rings show it, with its share of the cells.

    ``percent``: the summary's ``percent_by_score`` (``None``: the colours only, "–").
    """
    from histoscope.tasks.ihc_measure import SCORE_COLORS, SCORE_NAMES

    items = []
    for name, rgba in zip(SCORE_NAMES, SCORE_COLORS, strict=True):
        hex_ = "#" + "".join(f"{round(255 * v):02x}" for v in rgba[:3])
        v = (percent or {}).get(name)
        share = "–" if v is None else f"{v:.0f} %"
        items.append(f"<span style='color:{hex_}; font-size:large'>&#9675;</span>&nbsp;"
                     f"{name}:&nbsp;{share}")  # fmt: skip
    return " &nbsp; ".join(items)


def capture_region(layer):
    """A copy of a shapes or labels ``layer``'s region in world µm, as it is now.

    Labels: ``("mask", (mask, scale, translate))``. Shapes: ``("geometry",
    polygon)``, the union of its polygons, rectangles and ellipses (lines and
    paths enclose nothing). Taken when Run is pressed, so later edits, renames
    or removal of the layer do not change what the running measurement counts.

    Raises
    ------
    ValueError
        When a shapes layer holds no closed shape.
    """
    import numpy as np
    import shapely
    from shapely import affinity
    from shapely.geometry import Point, Polygon

    scale, translate = tuple(layer.scale[-2:]), tuple(layer.translate[-2:])
    if layer._type_string == "labels":
        return "mask", (np.array(layer.data, copy=True), scale, translate)
    parts = []
    for verts, kind in zip(layer.data, layer.shape_type, strict=True):
        yx = np.asarray(verts)[:, -2:] * scale + translate
        if kind == "ellipse":  # napari keeps an ellipse as the 4 corners of its box
            (y0, x0), (y1, x1) = yx.min(axis=0), yx.max(axis=0)
            circle = Point((x0 + x1) / 2, (y0 + y1) / 2).buffer(1.0, 64)
            parts.append(affinity.scale(circle, (x1 - x0) / 2, (y1 - y0) / 2))
        elif kind in ("polygon", "rectangle") and len(yx) >= 3:
            parts.append(Polygon(yx[:, ::-1]).buffer(0))
    if not parts:
        raise ValueError(f"Count inside: '{layer.name}' has no closed shape (polygon, rectangle "
                         "or ellipse) to count cells inside; draw one or choose whole tissue")  # fmt: skip
    return "geometry", shapely.union_all(parts)


def cells_inside(measurement, region) -> np.ndarray:
    """Per cell of ``measurement``, whether it lies in a region from :func:`capture_region`."""
    from histoscope.tasks.ihc_measure import cells_in_geometry, cells_in_mask

    kind, data = region
    if kind == "mask":
        mask, scale, translate = data
        return cells_in_mask(measurement, mask, scale, translate)
    return cells_in_geometry(measurement, data)


def region_inside(measurement, layer):
    """Per cell, whether it lies in a shapes or labels ``layer`` (placed in µm like the image)."""
    return cells_inside(measurement, capture_region(layer))


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
        self.breakdown = QLabel(score_legend())  # the legend of the cell points' colours too
        self.breakdown.setWordWrap(True)
        results.addRow("0 / 1+ / 2+ / 3+", self.breakdown)
        layout = self.body_layout()
        layout.addLayout(form)
        layout.addWidget(self.controls)
        layout.addLayout(results)
        layout.addStretch()

    def _region_choices(self, *_) -> None:
        """The count-inside choices: the whole tissue, then every shapes and labels layer.

        Each item carries its layer, so the choice follows a renamed layer.
        """
        current = self.count_inside.currentData()
        layers = [
            ly
            for ly in self.viewer.layers
            if ly._type_string in ("shapes", "labels") and not ly.metadata.get(MEASURED_TAG)
        ]  # not the measured-area outline
        self.count_inside.blockSignals(True)
        self.count_inside.clear()
        self.count_inside.addItem(WHOLE, None)
        for ly in layers:
            self.count_inside.addItem(ly.name, ly)
            if not getattr(ly, "_histoscope_ihc_watch", False):  # renames refresh the names
                ly.events.name.connect(self._region_choices)
                ly._histoscope_ihc_watch = True
        if current is not None and any(ly is current for ly in layers):
            self.count_inside.setCurrentIndex(1 + [ly is current for ly in layers].index(True))
        self.count_inside.blockSignals(False)

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
            self._inside = self._chosen_region()
        except ValueError as exc:
            self.status.setText(str(exc))
            return None
        self._in_view = visible
        w, h = session.slide.dimensions
        self._measured = (region or (0, 0, w, h), tuple(layer.scale[-2:]),
                          tuple(layer.translate[-2:]))  # fmt: skip
        self._clear_numbers()
        job = Job("ihc", session, params=params, region=region)
        return self.run_tasks([job], text=f"Measuring {layer.name}…", on_result=self._show)

    def _outline_measured(self, slide_name: str, complete: bool = True) -> None:
        """Outline the area that was measured (the view at Run, or the whole image).

        A cancelled measurement covers only its finished tiles: no outline
        (an earlier one of the same image is removed, it no longer applies).
        """
        measured = getattr(self, "_measured", None)
        if measured is None:
            return
        (x, y, w, h), (sy, sx), (ty, tx) = measured
        name = f"IHC measured region ({slide_name})"
        if not complete:
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
            return
        y0, x0, y1, x1 = ty + y * sy, tx + x * sx, ty + (y + h) * sy, tx + (x + w) * sx
        box = np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]], float)
        kwargs = {"name": name, "shape_type": "rectangle",
                  "face_color": "transparent", "edge_color": MEASURED_EDGE,
                  "edge_width": max(1.0, 0.004 * max(y1 - y0, x1 - x0)), "units": ("um", "um"),
                  "metadata": {"histoscope_task": "ihc", MEASURED_TAG: True}}  # fmt: skip
        self.replace_layer([box], kwargs, "shapes")

    def _chosen_region(self):
        """``(name, region)`` of the Count-inside choice captured now, or ``None`` (whole tissue).

        Raises ValueError when the chosen layer is gone or encloses nothing.
        """
        layer = self.count_inside.currentData()
        if layer is None:
            return None
        if not any(ly is layer for ly in self.viewer.layers):
            raise ValueError(f"Count inside: the layer '{layer.name}' is no longer in the viewer; "
                             "choose another region or whole tissue")  # fmt: skip
        return layer.name, capture_region(layer)

    def _clear_numbers(self) -> None:
        """Blank the previous numbers while a new measurement runs."""
        for label in self.numbers.values():
            label.setText("–")
        self.breakdown.setText(score_legend())

    cancel_text = "Cancelled: the cells of the finished tiles are shown."

    def _show(self, outcome) -> None:
        result = outcome.get("ihc")
        if result is None:
            return
        chosen = getattr(self, "_inside", None)
        if chosen is not None:  # the region as it was at Run
            name, region = chosen
            said = name if name.lower().endswith("region") else f"{name} region"
            result = result.within(cells_inside(result, region), said)
        self.result = result
        summary = result.summary()
        warning = summary.get("warning")
        for key, label in self.numbers.items():
            v = summary[key]
            label.setText("–" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v))
            if warning and v is not None and key in ("h_score", "allred", "percent_positive"):
                label.setText("– (no DAB)")
        self.breakdown.setText(score_legend(summary["percent_by_score"]))
        slide_name = Path(result.provenance.slide).name  # the image measured, not the box now
        self._outline_measured(slide_name, complete=not result.cancelled)  # under the cells
        self.replace_layer(*result.to_layers(name=f"IHC cells ({slide_name})")[0])
        denominator = summary["denominator"]
        if getattr(self, "_in_view", False):  # only the visible region was measured
            head, _, count = denominator.partition(" (n=")
            denominator = f"{head} in view" + (f" (n={count}" if count else "")
            denominator += " (choose whole image to count them all)"
        text = f"{summary['n_cells']} cells measured; percentages of {denominator}."
        for said in (warning, summary.get("resolution_warning")):
            if said:
                text += f" <span style='color:#e0a030'>Warning: {said}</span>"
        self.status.setText(text)
        flag = show_training_data_flag(self.controls, summary)  # learned detection only
        if flag.text() == OUTSIDE_TRAINING_TEXT:  # IHC counts cells; it makes no calls
            flag.setText(IHC_OUTSIDE_TEXT)
