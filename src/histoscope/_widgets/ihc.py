"""IHC measurement dock widget: positive cells, H-score and Allred on the image in view."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from histoscope.tasks.ihc_measure import Compartment, IHCParams

if TYPE_CHECKING:
    import napari

_SUMMARY = ("n_cells", "percent_positive", "h_score", "allred", "intensity", "quantity", "location")


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


class IHCWidget(QWidget):
    """Measure DAB per cell in the visible region (or the whole image) and show the numbers."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.worker = None
        self.result = None

        self.layer_combo = QComboBox()
        self.compartment = QComboBox()
        self.compartment.addItems([c.value for c in Compartment])
        self.compartment.setCurrentText(IHCParams().compartment.value)
        self.thresholds = []
        for value in IHCParams().thresholds:
            spin = QDoubleSpinBox()
            spin.setRange(0.0, 3.0)
            spin.setSingleStep(0.05)
            spin.setValue(value)
            self.thresholds.append(spin)
        thr_row = QHBoxLayout()
        for spin in self.thresholds:
            thr_row.addWidget(spin)
        self.scope = QComboBox()
        self.scope.addItems(["visible region", "whole image"])

        form = QFormLayout()
        form.addRow("Image", self.layer_combo)
        form.addRow("Compartment", self.compartment)
        form.addRow("1+ / 2+ / 3+ (DAB OD)", thr_row)
        form.addRow("Measure", self.scope)

        self.run_button = QPushButton("Measure")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        self.progress = QProgressBar()
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.numbers = {k: QLabel("–") for k in _SUMMARY}
        results = QFormLayout()
        for k, label in self.numbers.items():
            results.addRow(k.replace("_", " "), label)

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addLayout(results)
        layout.addWidget(self.status)
        layout.addStretch()
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        self._refresh_layers()

    def _refresh_layers(self, *_: object) -> None:
        current = self.layer_combo.currentText()
        names = [ly.name for ly in self.viewer.layers if getattr(ly, "rgb", False)]
        self.layer_combo.clear()
        self.layer_combo.addItems(names)
        self.layer_combo.setCurrentIndex(max(self.layer_combo.findText(current), 0))

    def params(self) -> IHCParams:
        """Parameters from the form; raises ValueError naming a bad one."""
        return IHCParams(
            compartment=self.compartment.currentText(),
            thresholds=tuple(s.value() for s in self.thresholds),
        )

    def run(self):
        """Start the measurement in a worker thread; returns the worker (or None)."""
        from napari.qt.threading import create_worker

        from histoscope.layers import layer_slide
        from histoscope.tasks.ihc_measure import iter_measure_slide

        name = self.layer_combo.currentText()
        if name not in self.viewer.layers:
            self.status.setText("Open an IHC image first.")
            return None
        layer = self.viewer.layers[name]
        try:
            params = self.params()
            slide = layer_slide(layer.data, layer.metadata, layer.scale, name)
            region = (
                visible_region(self.viewer, slide, layer)
                if self.scope.currentIndex() == 0
                else None
            )
        except ValueError as exc:
            self.status.setText(str(exc))
            return None
        mpp = max(slide.mpp or 0.5, 0.5)
        connect = {"yielded": self._progress, "returned": self._show, "errored": self._failed,
                   "finished": self._done}  # fmt: skip
        self.worker = create_worker(
            iter_measure_slide, slide, params, mpp=mpp, region=region,
            _connect=connect, _start_thread=False,
        )  # fmt: skip
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.status.setText(f"Measuring {name}…")
        self.worker.start()
        return self.worker

    def cancel(self) -> None:
        if self.worker is not None:
            self.worker.quit()
            self.status.setText("Cancelled.")

    def _progress(self, value: tuple[int, int]) -> None:
        done, total = value
        self.progress.setRange(0, total)
        self.progress.setValue(done)

    def _show(self, result) -> None:
        self.result = result
        summary = result.summary()
        for key, label in self.numbers.items():
            v = summary[key]
            label.setText(f"{v:.1f}" if isinstance(v, float) else str(v))
        data, kwargs, _ = result.to_layers(name=f"IHC cells ({self.layer_combo.currentText()})")[0]
        if kwargs["name"] in self.viewer.layers:
            self.viewer.layers.remove(kwargs["name"])
        self.viewer.add_points(data, **kwargs)
        self.status.setText(f"{summary['n_cells']} cells measured.")

    def _failed(self, exc: Exception) -> None:
        self.status.setText(f"<span style='color:#e05050'>{exc}</span>")

    def _done(self) -> None:
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.worker = None
