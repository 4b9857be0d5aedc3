"""Cells dock widget: find and type nuclei (NuClass), filter and recolour them, explain one."""

from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtGui import QColor, QIcon, QImage, QPixmap
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGridLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
)

from histoscope._widgets._cell_overview import (
    POINTS_MAX,
    OverviewGrid,
    class_codes,
    code_colormap,
    in_box,
    overview_um,
    value_codes,
    view_box,
)
from histoscope._widgets._common import (
    CheckpointPicker,
    RGBLayerCombo,
    TaskWidget,
    show_training_data_flag,
)

if TYPE_CHECKING:
    import napari

DEFAULT_CHECKPOINT = "nuclass_default.safetensors"
LAYER_NAME = "cells"
#: Above POINTS_MAX cells: the cells in view as points, and as an image far out (not saved
#: with the session: the ``cells`` layer holds them all; its name says so, for an export).
DRAWN_NAME = "cells in view (display only)"
OVERVIEW_NAME = "cells overview"
#: Metadata flag of the layers that only draw the cells: not saved with the session.
TRANSIENT = "histoscope_transient"
#: White rim (µm) round points coloured by a value, so dark values stay visible on nuclei.
RIM_UM = 0.15
OUTLINES_NAME = "nucleus outlines"
#: Where to look for cells.
SCOPES = ("view first, then the whole slide", "the view only", "the drawn region",
          "the whole slide")  # fmt: skip
#: What the points' colour shows.
COLOR_BY = ("class", "gate g (0 local, 1 context)", "confidence")
#: Colour map of gate and confidence (with a white rim, so dark values stay visible on nuclei).
VALUE_CMAP = "viridis"
#: Above this many cells the layer is drawn when the run ends, not while it fills in.
LIVE_MAX_CELLS = 150_000
#: A live update may keep the GUI busy at most this fraction of the time.
LIVE_BUSY = 0.2
#: Milliseconds the camera rests before the window of drawn points follows it.
VIEW_REST_MS = 100


def _camera(viewer):
    return viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera


def _swatch(rgb) -> QIcon:
    pix = QPixmap(14, 14)
    pix.fill(QColor(*[int(v) for v in rgb]))
    return QIcon(pix)


def _pixmap(rgb: np.ndarray, size: int = 112) -> QPixmap:
    """A uint8 RGB image as a square QPixmap of ``size`` px."""
    a = np.ascontiguousarray(rgb[..., :3], dtype=np.uint8)
    h, w = a.shape[:2]
    img = QImage(a.data, w, h, 3 * w, QImage.Format_RGB888).copy()
    return QPixmap.fromImage(img).scaled(size, size, Qt.KeepAspectRatio, Qt.SmoothTransformation)


def _overlay(rgb: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """Grad-CAM ``cam`` (0-1) laid over ``rgb`` with the inferno colour map."""
    from napari.utils.colormaps import ensure_colormap

    heat = ensure_colormap("inferno").map(np.clip(cam, 0, 1).ravel())[:, :3]
    heat = heat.reshape(*cam.shape, 3) * 255
    return (0.5 * rgb[..., :3] + 0.5 * heat).astype(np.uint8)


class CellsWidget(TaskWidget):
    """Detect and type cells where you look first; a legend that filters; click a cell to explain it."""

    cancel_text = "Cancelled: the cells of the finished tiles stay on the slide."

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(napari_viewer, "Find cells")
        self.result = None
        self._session = None
        self.layer_combo = RGBLayerCombo(napari_viewer)
        self.picker = CheckpointPicker(DEFAULT_CHECKPOINT, "NuClass checkpoint (.safetensors)")
        self.checkpoint = self.picker.edit
        self.scope = QComboBox()
        self.scope.addItems(SCOPES)
        self.scope.setToolTip("The drawn region: the bounding box of the selected shape of the "
                              "active Shapes layer (else its last shape).")  # fmt: skip
        self.detector = QComboBox()
        self.detector.addItems(["classical", "stardist", "cellpose"])
        self.typing = QCheckBox("Type the cells (NuClass)")
        self.typing.setChecked(True)
        form = QFormLayout()
        form.addRow("Slide", self.layer_combo)
        form.addRow("Checkpoint", self.picker)
        form.addRow("Look in", self.scope)
        form.addRow("Nucleus detector", self.detector)
        form.addRow(self.typing)

        self.legend = QListWidget()
        self.legend.setToolTip("Untick a class to hide its cells.")
        self.legend.itemChanged.connect(lambda _item: self.apply_filters())
        self.color_by = QComboBox()
        self.color_by.addItems(COLOR_BY)
        self.color_by.currentIndexChanged.connect(lambda _i: self.recolour())
        self.disagree = QCheckBox("Only cells where local and global disagree")
        self.disagree.toggled.connect(lambda _on: self.apply_filters())
        self.min_conf = QDoubleSpinBox()
        self.min_conf.setRange(0.0, 1.0)
        self.min_conf.setSingleStep(0.05)
        self.min_conf.setToolTip("Hide cells whose fused probability is below this.")
        self.min_conf.valueChanged.connect(lambda _v: self.apply_filters())
        self.scale = QLabel("")
        self.scale.setToolTip("What the colours mean when colouring by a value")
        view = QFormLayout()
        view.addRow("Colour by", self.color_by)
        view.addRow("", self.scale)
        view.addRow("Confidence at least", self.min_conf)
        view.addRow(self.disagree)
        self.outlines_button = QPushButton("Nucleus outlines in view")
        self.outlines_button.clicked.connect(self.show_outlines)
        self.explain_box = QCheckBox("Explain the cell I click (crops and Grad-CAM)")
        self.explain_box.toggled.connect(self._toggle_click)
        self.crops = [QLabel() for _ in range(4)]
        crop_row = QGridLayout()  # two by two: fits a narrow dock
        for i, lab in enumerate(self.crops):
            lab.setFixedSize(112, 112)
            lab.setAlignment(Qt.AlignCenter)
            crop_row.addWidget(lab, i // 2, i % 2)
        self.explained = QLabel("")
        self.explained.setWordWrap(True)
        self.trained_on = QLabel("")
        self.trained_on.setWordWrap(True)

        layout = self.body_layout()  # scrolls as a whole when the dock is shorter than the panel
        layout.addLayout(form)
        layout.addWidget(self.controls)
        layout.addWidget(self.trained_on)
        layout.addWidget(QLabel("Classes (count; untick to hide)"))
        self.legend.setMinimumHeight(120)
        layout.addWidget(self.legend, stretch=1)
        layout.addLayout(view)
        layout.addWidget(self.outlines_button)
        layout.addWidget(self.explain_box)
        layout.addLayout(crop_row)
        layout.addWidget(self.explained)

        self._keep = self._coords = self._features = self._drawn_idx = None
        self._grid = None
        self._ov_stale = True
        self._rim = self._far = self._replacing = False
        # many cells: the window of drawn points follows the camera once it rests
        self._view_timer = QTimer(self)
        self._view_timer.setSingleShot(True)
        self._view_timer.setInterval(VIEW_REST_MS)
        self._view_timer.timeout.connect(self._draw)
        camera = _camera(napari_viewer)
        camera.events.zoom.connect(self._camera_moved)
        camera.events.center.connect(self._camera_moved)
        napari_viewer.layers.events.removed.connect(self._layer_removed)
        napari_viewer.layers.events.inserted.connect(lambda _e: self._restored())
        self._restored()

    # ----------------------------------------------------------------- running
    def params(self):
        """:class:`~histoscope.tasks.cells.CellsParams` from the form."""
        from histoscope.tasks.cells import CellsParams

        return CellsParams(detector=self.detector.currentText(),
                           classify=self.typing.isChecked())  # fmt: skip

    def drawn_region(self, slide, layer) -> tuple[int, int, int, int]:
        """Level-0 bounding box of the chosen shape; ValueError when none is drawn."""
        shapes = [
            lay for lay in self.viewer.layers if lay._type_string == "shapes" and len(lay.data)
        ]
        active = self.viewer.layers.selection.active
        if active in shapes:
            shapes = [active]
        if not shapes:
            raise ValueError("Draw a rectangle or polygon on a Shapes layer first.")
        lay = shapes[-1]
        picked = sorted(lay.selected_data) or [len(lay.data) - 1]
        pts = np.concatenate([np.asarray(lay.data[i])[:, -2:] for i in picked])
        pts = pts * np.asarray(lay.scale[-2:]) + np.asarray(lay.translate[-2:])  # world µm
        sy, sx = layer.scale[-2], layer.scale[-1]
        y0, x0 = pts.min(axis=0)
        y1, x1 = pts.max(axis=0)
        return int(x0 / sx), int(y0 / sy), max(1, int((x1 - x0) / sx)), max(1, int((y1 - y0) / sy))

    def run(self):
        """Find (and type) cells in a worker; returns the worker or None."""
        from histoscope._widgets._common import visible_region
        from histoscope._widgets._worker import Job

        try:
            session, layer = self.chosen_session(self.layer_combo)
            ckpt = self.picker.path()
            if self.typing.isChecked() and not ckpt:
                raise ValueError("Choose a NuClass checkpoint, or untick typing.")
            params = self.params()
            scope = self.scope.currentIndex()
            region = None
            if scope == 1:
                region = visible_region(self.viewer, session.slide, layer)
            elif scope == 2:
                region = self.drawn_region(session.slide, layer)
        except ValueError as exc:
            self.status.setText(str(exc))
            return None
        near = self.view_centre(session.slide, layer)
        self.result, self._session = None, session
        self._checkpoint = ckpt or None  # what Explain must load: the model that typed them
        self._next_live = 0.0
        jobs = [Job("cells", session, ckpt or None, params=params, region=region, near=near)]
        return self.run_tasks(jobs, text="Finding cells in view first…", on_result=self._finished,
                              on_partial=self._live)  # fmt: skip

    def _live(self, result) -> None:
        """Show the cells found so far, at most :data:`LIVE_BUSY` of the time, up to a size."""
        now = time.monotonic()
        if result.n_cells > LIVE_MAX_CELLS:
            self.status.setText(f"{result.n_cells:,} cells so far (drawn when the run ends)…")
            return
        if now < getattr(self, "_next_live", 0.0):
            return
        self._show(result)
        cost = time.monotonic() - now
        self._next_live = time.monotonic() + max(1.0, cost * (1 - LIVE_BUSY) / LIVE_BUSY)
        self.status.setText(f"{result.n_cells:,} cells so far…")

    def _finished(self, outcome) -> None:
        result = outcome.get("cells")
        if result is None:
            return
        self._show(result)
        s = result.summary()
        if not s["n_cells"]:
            self.status.setText("No cells found" + (" in the finished tiles." if result.cancelled
                                                    else "."))  # fmt: skip
            return
        show_training_data_flag(self.controls, s)
        dens = f", {s['cells_per_mm2']:,.0f} per mm² of tissue" if s["cells_per_mm2"] else ""
        part = " in the finished tiles (no density: part of the tissue)" if result.cancelled else ""
        self.status.setText(f"{s['n_cells']:,} cells{part}{dens}.")

    def _show(self, result) -> None:
        """Put ``result`` on the canvas (in place when the layer exists) and fill the legend.

        Colours, rim and filter are worked out first and go into the layer in
        one step: each change napari sees re-sends every drawn point to the
        canvas. Above :data:`POINTS_MAX` cells the ``cells`` layer holds the
        whole table but is not drawn; the panel draws the cells in view
        (:meth:`_draw`).
        """
        self.result, self._drawn_idx, self._grid = result, None, None
        self._ov_stale = True  # a new table: the overview is painted again
        data, kwargs, kind = result.to_layers(LAYER_NAME)[0]
        self._coords, self._features = data, kwargs["features"]
        self._fill_legend(result, kwargs["metadata"]["summary"])
        self._keep = self._filter_mask()
        self._rim = self.color_by.currentIndex() != 0 and result.types is not None
        self.scale.setText(self._scale_text())
        self.trained_on.setText(
            f"<i>Typing model: {result.trained_on}. Cell types on tissue unlike that are "
            "guesses.</i>" if result.trained_on else "")  # fmt: skip
        big = result.n_cells > POINTS_MAX
        layer = self.layer()
        if not big and layer is not None and len(layer.data) <= POINTS_MAX:
            layer.data = data  # a live update: the layer and its settings stay
            layer.features = kwargs["features"]
            layer.metadata.update(kwargs["metadata"])
            self._draw()
            return
        if big:  # the whole table, in class colours, not drawn (a million points take seconds)
            kwargs.update(visible=False, shown=self._keep)
        else:
            if result.n_cells:
                kwargs.update(self._looks(np.arange(result.n_cells)))
            else:  # napari refuses no colours for no points
                kwargs = {k: v for k, v in kwargs.items() if "color" not in k}
            kwargs.update(shown=self._keep)
        self._replacing = True  # what draws the cells stays: it is updated below
        try:
            self._drop(LAYER_NAME)
        finally:
            self._replacing = False
        self._draw()  # first: the cells layer goes on top, selected
        self.replace_layer(data, kwargs, kind)
        if not big:
            self._hide_display()

    def _hide_display(self) -> None:
        """Hide the overview and empty the points in view, in place.

        The panel adds them once and does not remove them while its result
        lasts: removing and re-adding them while the canvas draws crashed
        software OpenGL (Mesa under Xvfb).
        """
        self._drawn_idx = None
        self._show_overview(False)
        drawn = self.viewer.layers[DRAWN_NAME] if DRAWN_NAME in self.viewer.layers else None
        if drawn is not None and len(drawn.data):
            drawn.data = np.zeros((0, 2))

    def _fill_legend(self, result, summary) -> None:
        hidden = {self.legend.item(i).data(Qt.UserRole) for i in range(self.legend.count())
                  if self.legend.item(i).checkState() != Qt.Checked}  # fmt: skip
        self.legend.blockSignals(True)
        self.legend.clear()
        for name, rgb in zip(result.classes, result.palette(), strict=True):
            c = summary["classes"][name]
            item = QListWidgetItem(
                _swatch(rgb), f"{name}: {c['count']:,} ({100 * c['fraction']:.1f} %)"
            )
            item.setData(Qt.UserRole, name)
            item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
            item.setCheckState(Qt.Unchecked if name in hidden else Qt.Checked)
            self.legend.addItem(item)
        self.legend.blockSignals(False)

    # --------------------------------------------------------------- display
    def layer(self):
        return self.viewer.layers[LAYER_NAME] if LAYER_NAME in self.viewer.layers else None

    def overview(self):
        """The image of the cells drawn far out (above :data:`POINTS_MAX` cells), or None."""
        return self.viewer.layers[OVERVIEW_NAME] if OVERVIEW_NAME in self.viewer.layers else None

    def drawn(self):
        """The layer the cells are drawn in: ``cells`` itself, or the cells in view when many."""
        name = DRAWN_NAME if self.result is not None and self._big() else LAYER_NAME
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def _big(self) -> bool:
        return self.result.n_cells > POINTS_MAX

    def _drop(self, *names: str) -> None:
        for name in names:
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)

    def _ready(self) -> bool:
        layer, result = self.layer(), self.result
        return layer is not None and result is not None and len(layer.data) == result.n_cells

    def _colors(self, idx: np.ndarray) -> np.ndarray:
        """``(len(idx), 4)`` float32 colours of cells ``idx``: by class, gate weight or confidence.

        Only the cells drawn as points: a colour map over a million values
        alone takes about a second.
        """
        result, mode = self.result, self.color_by.currentIndex()
        if mode == 0 or result.types is None:
            from histoscope.tasks.cells import UNTYPED

            lut = np.ones((len(result.classes) + 1, 4), np.float32)
            lut[:, :3] = np.concatenate([result.palette(), [UNTYPED]]) / 255.0
            return lut[result.class_index()[idx]]  # -1 (untyped) picks the last row
        from napari.utils.colormaps import ensure_colormap

        values = result.types.g if mode == 1 else result.calls()["confidence"]
        return np.asarray(ensure_colormap(VALUE_CMAP).map(np.asarray(values[idx], np.float32)),
                          np.float32)  # fmt: skip

    def _scale_text(self) -> str:
        mode = self.color_by.currentIndex()
        if mode == 0 or self.result is None or self.result.types is None:
            return ""
        what = "g" if mode == 1 else "confidence"
        return f"{VALUE_CMAP}: dark purple = {what} 0 … green … yellow = 1"

    def _looks(self, idx: np.ndarray) -> dict:
        """Face and rim colours of cells ``idx`` as drawn: a filtered-out cell is transparent.

        (napari 0.9 draws a 2D layer's points whatever ``shown`` says, so
        ``shown`` alone would hide nothing.)
        """
        keep = self._keep[idx]
        face = self._colors(idx)
        face[~keep, 3] = 0
        rim = np.zeros((len(idx), 4), np.float32)
        if self._rim:  # a white rim: dark values stay visible
            rim[keep] = 1.0
        return {"face_color": face, "border_color": rim,
                "border_width": RIM_UM if self._rim else 0}  # fmt: skip

    def recolour(self) -> None:
        """Colour the drawn cells (and the overview) by class, gate weight or confidence."""
        if not self._ready():
            return
        self._rim = self.color_by.currentIndex() != 0 and self.result.types is not None
        self.scale.setText(self._scale_text())
        self._draw(recolour=True)

    def _filter_mask(self) -> np.ndarray:
        """The cells the filters keep: ticked classes, above the confidence floor, disagreeing."""
        result = self.result
        if result.types is None:
            return np.ones(result.n_cells, bool)
        c = result.calls()
        ticked = np.array([self.legend.item(i).checkState() == Qt.Checked
                           for i in range(self.legend.count())] or [True] * len(result.classes))  # fmt: skip
        keep = ticked[c["pred"]] if result.n_cells else np.zeros(0, bool)
        keep &= c["confidence"] >= self.min_conf.value()
        if self.disagree.isChecked():
            keep &= c["disagree"]
        return keep

    def apply_filters(self) -> None:
        """Show only the ticked classes, above the confidence floor, optionally disagreeing."""
        if not self._ready() or self.result.types is None:
            return
        keep = self._filter_mask()
        if np.array_equal(keep, self._keep):
            return
        self._keep = keep
        self.layer().shown = keep  # the table's record of the filter (not drawn when big)
        self._draw(recolour=True)

    def _window(self) -> np.ndarray | None:
        """Indices of the kept cells in the view's window; None when more than POINTS_MAX."""
        idx = np.flatnonzero(self._keep & in_box(self._coords, view_box(self.viewer)))
        return None if len(idx) > POINTS_MAX else idx

    def _draw(self, recolour: bool = False) -> None:
        """Draw the cells: all of them when few, else those in view or the overview image."""
        self._view_timer.stop()
        if self.result is None:
            return
        if not self._big():
            layer = self.layer()
            if layer is not None and len(layer.data) == self.result.n_cells > 0:
                self._paint(layer, self._looks(np.arange(self.result.n_cells)))
                if not np.array_equal(layer.shown, self._keep):
                    layer.shown = self._keep
            return
        if recolour or self._ov_stale or self.overview() is None:
            self._draw_overview()
            self._ov_stale = False
        idx = self._window()
        self._far = idx is None
        self._show_overview(self._far)
        if self._far:
            idx = np.zeros(0, np.int64)
        drawn = self.viewer.layers[DRAWN_NAME] if DRAWN_NAME in self.viewer.layers else None
        same = self._drawn_idx is not None and np.array_equal(idx, self._drawn_idx)
        if same and not recolour and (drawn is not None or not len(idx)):
            return
        self._drawn_idx = idx
        looks = self._looks(idx) if len(idx) else {}  # (napari refuses no colours for none)
        feats = self._features.iloc[idx].reset_index(drop=True)
        if drawn is None and not len(idx):
            return  # made when there are cells to draw as points
        if drawn is None:
            from histoscope.tasks.cells import POINT_UM

            self.viewer.add_points(self._coords[idx], name=DRAWN_NAME, features=feats,
                                   size=POINT_UM, units=("um", "um"), **looks,
                                   metadata={"histoscope_task": "cells in view",
                                             TRANSIENT: True})  # fmt: skip
            return
        drawn.data = self._coords[idx]
        drawn.features = feats
        if looks:
            self._paint(drawn, looks)

    def _paint(self, layer, looks: dict) -> None:
        """Set :meth:`_looks` on ``layer``; each setting re-sends its points, so only the rim
        when there is one (or was)."""
        layer.face_color = looks["face_color"]
        if self._rim or layer.border_width.any():
            layer.border_color = looks["border_color"]
            layer.border_width = looks["border_width"]

    def _camera_moved(self, _event=None) -> None:
        if self.result is not None and self._big():
            self._view_timer.start()  # once the camera rests

    def _layer_removed(self, event) -> None:
        if self._replacing:
            return
        if getattr(event, "value", None) is not None and event.value.name == LAYER_NAME:
            # the result's display goes with its table: nothing follows the camera any more,
            # and what drew its cells goes once the removal (and any paint) is over
            self.result, self._drawn_idx, self._grid = None, None, None
            self._view_timer.stop()
            QTimer.singleShot(0, self._drop_display)

    def _restored(self) -> None:
        """A ``cells`` layer of many cells reopened with its session is shown whole.

        The panel hid it while drawing its cells itself; reopened, that
        display is gone (it is not saved), so the layer would look empty.
        """
        layer = self.layer()
        if self.result is None and layer is not None and not layer.visible:
            layer.visible = True
            self.status.setText(f"The reopened cells ({len(layer.data):,}) are drawn as one "
                                "layer, slow with many; run again for the faster display.")  # fmt: skip

    def _drop_display(self) -> None:
        """Remove what drew the removed table's cells (unless a new run has drawn since).

        An Image layer removed while hidden crashes the next paint with
        software OpenGL (Mesa under Xvfb, napari 0.9), so the overview is made
        visible (and transparent), painted once, and then removed; the layers go one
        per paint (removing both at once crashed as well).
        """
        if self.result is not None:
            return
        ov = self.overview()
        if ov is not None and not ov.visible:
            ov.opacity, ov.visible = 0.0, True
            QTimer.singleShot(250, self._drop_display)  # after a paint
            return
        if DRAWN_NAME in self.viewer.layers:  # one layer per paint: both at once crashed too
            self._drop(DRAWN_NAME)
            QTimer.singleShot(250, self._drop_display)
            return
        self._drop(OVERVIEW_NAME)

    def _show_overview(self, on: bool) -> None:
        """Show or hide the overview by its opacity: it stays visible to napari (see
        :meth:`_drop_display`)."""
        ov = self.overview()
        if ov is not None:
            ov.visible, ov.opacity = True, 1.0 if on else 0.0

    def _draw_overview(self) -> None:
        """Draw the kept cells into the overview image, coloured as the points are."""
        result, mode, ov = self.result, self.color_by.currentIndex(), self.overview()
        if mode == 0 or result.types is None:
            from histoscope.tasks.cells import UNTYPED

            k = len(result.classes)
            codes = class_codes(result.class_index(), k)
            lut = np.concatenate([result.palette(), [UNTYPED]]) / 255.0
            lut = np.concatenate([lut, np.ones((k + 1, 1))], axis=1)
        else:
            from napari.utils.colormaps import ensure_colormap

            values = result.types.g if mode == 1 else result.calls()["confidence"]
            codes = value_codes(values)
            lut = ensure_colormap(VALUE_CMAP).map(np.linspace(0, 1, 255))
        name = f"histoscope cells {hashlib.sha1(np.asarray(lut, np.float32).tobytes()).hexdigest()[:8]}"
        cmap = code_colormap(lut, name)
        if self._grid is None:
            self._grid = OverviewGrid(self._coords, overview_um(self._coords))
        um = self._grid.um
        levels = self._grid.levels(codes, self._keep)
        if ov is not None:  # in place, whatever the shapes (see _hide_display)
            ov.colormap = cmap
            ov.data = levels
            ov.scale, ov.translate = (um, um), (um / 2, um / 2)
            return
        self.viewer.add_image(levels, multiscale=True, name=OVERVIEW_NAME, colormap=cmap,
                              contrast_limits=(0, 255), blending="translucent",
                              scale=(um, um), translate=(um / 2, um / 2), units=("um", "um"),
                              metadata={"histoscope_task": "cells overview",
                                        TRANSIENT: True})  # fmt: skip

    def show_outlines(self):
        """Nucleus outlines of the cells in view as a labels layer."""
        from histoscope._widgets._common import visible_region
        from histoscope.tasks.cells import outline_labels

        if self.result is None:
            self.status.setText("Find cells first; the outlines are theirs.")
            return None
        try:
            session, layer = self.chosen_session(self.layer_combo)
        except ValueError as exc:
            self.status.setText(str(exc))
            return None
        region = visible_region(self.viewer, session.slide, layer)
        if region[2] * region[3] > 16_000_000:
            self.status.setText(
                "Zoom in: outlines are drawn for at most 4,000 x 4,000 px of slide."
            )
            return None
        labels, (ty, tx), mpp = outline_labels(self.result, region)
        kwargs = {"name": OUTLINES_NAME, "scale": (mpp, mpp), "translate": (ty, tx),
                  "units": ("um", "um"), "opacity": 0.6,
                  "metadata": {"histoscope_task": "cells", "region": list(region)}}  # fmt: skip
        out = self.replace_layer(labels, kwargs, "labels")
        out.contour = 1
        self.status.setText(f"Outlines of {len(np.unique(labels)) - 1:,} nuclei in view.")
        return out

    # ---------------------------------------------------------------- explain
    def _on_click(self, _viewer, event) -> None:
        active = self.viewer.layers.selection.active
        clickable = (LAYER_NAME, DRAWN_NAME)
        if event.type == "mouse_press" and active is not None and active.name in clickable:
            self.explain_at(*event.position[-2:])

    def explain_at(self, y_um: float, x_um: float):
        """Crops and Grad-CAM of the cell nearest world ``(y, x)`` µm (in a worker)."""
        from napari.qt.threading import create_worker

        result = self.result
        if result is None or result.types is None or not result.n_cells or self._session is None:
            self.status.setText("Find and type cells first, then click one.")
            return None
        if self.worker is not None:
            self.status.setText("Busy: wait for the running job or cancel it.")
            return None
        um = result.slide_mpp
        d2 = (result.nuclei.x * um - x_um) ** 2 + (result.nuclei.y * um - y_um) ** 2
        keep = getattr(self, "_keep", None)
        if keep is not None and len(keep) == len(d2):
            d2 = np.where(keep, d2, np.inf)  # cells the filters hide cannot be clicked
        i = int(np.argmin(d2))
        if not d2[i] <= 15.0**2:
            self.status.setText("No shown cell within 15 µm of that point.")
            return None
        session, ckpt = self._session, getattr(self, "_checkpoint", None)
        x, y = float(result.nuclei.x[i]), float(result.nuclei.y[i])
        shown_class = int(result.calls()["pred"][i])
        organ = (result.provenance.params or {}).get("organ", "unknown")

        def work():
            from histoscope.celltypes import explain_cell
            from histoscope.tasks import resolve_checkpoint
            from histoscope.tasks._registry import get

            path = resolve_checkpoint(get("cells"), ckpt)
            model, card = session.model(path, "nuclass")
            return i, explain_cell(session.slide, x, y, model, card, target=shown_class,
                                   organ=None if organ == "unknown" else organ)  # fmt: skip

        self.worker = create_worker(work, _start_thread=False,
                                    _connect={"returned": self._explained,
                                              "errored": self._failed, "finished": self._done})  # fmt: skip
        self.controls.busy(True, "Explaining the cell…")
        self.worker.start()
        return self.worker

    def _explained(self, value) -> None:
        i, ex = value
        local, context = ex["local"], ex["context"]
        images = [local, _overlay(local, ex["local_cam"]), context,
                  _overlay(context, ex["context_cam"])]  # fmt: skip
        for lab, img in zip(self.crops, images, strict=True):
            lab.setPixmap(_pixmap(img))
        t, classes = self.result.types, self.result.classes
        self.explained.setText(
            f"Cell {i}: <b>{classes[int(t.pred[i])]}</b> (p = {float(t.confidence[i]):.2f}); "
            f"local says {classes[int(t.local_pred[i])]}, context says "
            f"{classes[int(t.global_pred[i])]}; gate g = {float(t.g[i]):.2f}. "
            f"Crops: nucleus, its Grad-CAM for {ex['target']}, context, its Grad-CAM "
            f"(the crop path alone calls it {ex['pred']}).")  # fmt: skip
        self.status.setText(f"Cell {i} explained.")
