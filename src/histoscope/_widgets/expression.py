"""Gene expression dock widget: pick genes, predict at 2 µm, see them as layers over the slide."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFormLayout,
    QLabel,
    QLineEdit,
    QListWidget,
)

from histoscope._widgets._common import (
    CheckpointPicker,
    RGBLayerCombo,
    TaskWidget,
    show_training_data_flag,
    visible_region,
)

if TYPE_CHECKING:
    import napari

DEFAULT_CHECKPOINT = "expression_default.safetensors"
#: Layer metadata key: the contrast limits HistoScope last set (a user's change differs).
AUTO_CONTRAST = "histoscope_auto_contrast"
SCOPES = ("Whole slide (view first)", "Visible region", "Drawn region (last shape)")


class ExpressionWidget(TaskWidget):
    """2 µm expression: a gene picker with search, Run with progress and Cancel, gene layers."""

    cancel_text = "Cancelled: the patches predicted so far are kept; Run again fills in the rest."

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        from histoscope.tasks.expression import MAX_SHOWN

        super().__init__(napari_viewer, "Predict expression")
        self.max_genes = MAX_SHOWN
        self.result = None
        self._problem: str | None = None  # why the checkpoint cannot be used, if it cannot
        self.layer_combo = RGBLayerCombo(napari_viewer)
        self.picker = CheckpointPicker(DEFAULT_CHECKPOINT, "expression checkpoint (.safetensors)")
        self.checkpoint = self.picker.edit
        self.scope = QComboBox()
        self.scope.addItems(SCOPES)
        self.search = QLineEdit()
        self.search.setPlaceholderText("search genes…")
        self.genes = QListWidget()
        self.genes.setSelectionMode(QAbstractItemView.SelectionMode.MultiSelection)
        self.search.textChanged.connect(self._filter)
        self.checkpoint.textChanged.connect(self._load_genes)
        form = QFormLayout()
        form.addRow("Slide", self.layer_combo)
        form.addRow("Checkpoint", self.picker)
        form.addRow("Predict", self.scope)
        layout = self.body_layout()
        layout.addLayout(form)
        layout.addWidget(QLabel(f"Genes to show (up to {MAX_SHOWN})"))
        layout.addWidget(self.search)
        layout.addWidget(self.genes, stretch=1)
        layout.addWidget(self.controls)
        self._load_genes()

    # --------------------------------------------------------------- genes
    def _load_genes(self, *_: object) -> None:
        """Fill the list from the checkpoint's card (its gene names), first two chosen.

        A checkpoint of another family fills nothing and says so in the status
        line at once (Run refuses it too).
        """
        from histoscope.checkpoints import read_card
        from histoscope.errors import HistoScopeError

        self.genes.clear()
        was, self._problem = self._problem, None
        path = self.picker.path()
        try:
            card = read_card(path) if path else None
        except (HistoScopeError, OSError, ValueError):
            card = None  # the picker's own line says why
        if card is not None and card.family != "expression":
            self._problem = (f"{Path(path).name} is a {card.family!r} checkpoint, not an "
                             "expression one: choose an expression checkpoint.")  # fmt: skip
            self.status.setText(self._problem)
            return
        if was is not None and self.status.text() == was:
            self.status.setText("")
        if card is None:
            return
        names = list((card.config or {}).get("genes") or card.classes)
        self.genes.addItems(names)
        for i in range(min(2, len(names))):
            self.genes.item(i).setSelected(True)
        self._filter(self.search.text())

    def _filter(self, text: str) -> None:
        """Show only genes containing ``text`` (case-insensitive); chosen ones stay chosen."""
        t = text.strip().lower()
        for i in range(self.genes.count()):
            item = self.genes.item(i)
            item.setHidden(bool(t) and t not in item.text().lower())

    def chosen_genes(self) -> list[str]:
        """The selected genes, in list order."""
        return [self.genes.item(i).text() for i in range(self.genes.count())
                if self.genes.item(i).isSelected()]  # fmt: skip

    def select_genes(self, names: list[str]) -> None:
        """Select exactly ``names`` (for scripts and tests)."""
        for i in range(self.genes.count()):
            item = self.genes.item(i)
            item.setSelected(item.text() in names)

    # ----------------------------------------------------------------- run
    def _region(self, session, layer):
        """Level-0 ``(x, y, w, h)`` of the chosen scope, or ``None`` for the whole slide."""
        scope = self.scope.currentText()
        if scope == SCOPES[1]:
            return visible_region(self.viewer, session.slide, layer)
        if scope == SCOPES[2]:
            shapes = [lyr for lyr in self.viewer.layers if lyr._type_string == "shapes"
                      and len(lyr.data)]  # fmt: skip
            if not shapes:
                raise ValueError("Draw a rectangle or polygon in a Shapes layer first.")
            pts = shapes[-1].data[-1][:, -2:] * shapes[-1].scale[-2:] / layer.scale[-2:]
            (y0, x0), (y1, x1) = pts.min(0), pts.max(0)
            return int(x0), int(y0), max(int(x1 - x0), 1), max(int(y1 - y0), 1)
        return None

    def run(self):
        """Predict the chosen scope in a worker; returns the worker or None."""
        from histoscope._widgets._worker import Job

        try:
            session, layer = self.chosen_session(self.layer_combo)
            ckpt = self.picker.path()
            if not ckpt:
                raise ValueError("Choose an expression checkpoint.")
            if self._problem is not None:
                raise ValueError(self._problem)
            genes = self.chosen_genes()
            if len(genes) > self.max_genes:
                raise ValueError(f"Choose at most {self.max_genes} genes (chosen: {len(genes)}).")
            region = self._region(session, layer)
        except ValueError as exc:
            self.status.setText(str(exc))
            return None
        self.result = None
        job = Job("expression", session, ckpt, region=region,
                  near=self.view_centre(session.slide, layer),
                  options={"genes": ",".join(genes)})  # fmt: skip
        return self.run_tasks([job], text="Predicting expression…", on_result=self._show,
                              on_partial=self._live)  # fmt: skip

    def _live(self, result) -> None:
        """Show the stack while it fills: the gene layers placed or updated at each step."""
        self.result = result
        self._put_layers(result)

    def _put_layers(self, result) -> None:
        """Add the shown genes' layers, or update those already there in place.

        An existing layer keeps its colour map, opacity and visibility; its
        contrast follows the task's (measured in the worker) only while the
        user has not changed it since HistoScope last set it.
        """
        import numpy as np

        for data, kwargs, kind in result.to_layers():
            name, lim = kwargs["name"], tuple(float(v) for v in kwargs["contrast_limits"])
            if name not in self.viewer.layers:
                layer = self.replace_layer(data, kwargs, kind)
                layer.metadata = {**layer.metadata, AUTO_CONTRAST: lim}
                continue
            layer = self.viewer.layers[name]
            auto = layer.metadata.get(AUTO_CONTRAST)
            if layer.metadata.get("stack") != kwargs["metadata"]["stack"]:
                layer.data = data  # another stack (checkpoint or slide) under the same name
            else:
                layer.refresh()
            untouched = auto is not None and np.allclose(layer.contrast_limits, auto,
                                                         rtol=1e-6, atol=1e-12)  # fmt: skip
            layer.metadata = {**kwargs["metadata"], AUTO_CONTRAST: lim if untouched else auto}
            if untouched and lim != tuple(auto):
                lo, hi = layer.contrast_limits_range
                layer.contrast_limits_range = (min(lo, lim[0]), max(hi, lim[1]))
                layer.contrast_limits = lim

    def _show(self, outcome) -> None:
        result = outcome.get("expression")
        if result is None:
            return
        self.result = result
        self._put_layers(result)  # final contrast from the whole stack, where the user left it
        s = result.summary()
        show_training_data_flag(self.controls, s)
        p = s["patches"]
        self.status.setText(f"{p['done']} of {p['total']} patches predicted "
                            f"({s['predicted_mm2']:.2f} mm² in the stack); genes shown: "
                            f"{', '.join(s['shown'])}.")  # fmt: skip
        self._add_to_cells(result)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

    def _add_to_cells(self, result) -> None:
        """Each cell's mean expression as features of the cell points (colour or filter by a gene)."""
        from histoscope._widgets.cells import LAYER_NAME

        if result.cell_values is None or LAYER_NAME not in self.viewer.layers:
            return
        layer = self.viewer.layers[LAYER_NAME]
        if len(layer.data) != len(result.cell_values):
            return  # the cells were found again since: their rows no longer match
        feats = layer.features.copy()
        for j, gene in enumerate(result.genes):
            feats[f"expr: {gene}"] = result.cell_values[:, j]
        layer.features = feats
        self.status.setText(f"{self.status.text()} Mean expression under each of "
                            f"{len(result.cell_values):,} nuclei added to the cell points.")  # fmt: skip
