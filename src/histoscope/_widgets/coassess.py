"""iSight co-assessment dock widget: the model's calls, the measurement, the final word."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from histoscope._widgets._common import (
    CheckpointPicker,
    RGBLayerCombo,
    TaskWidget,
    show_training_data_flag,
    visible_region,
)
from histoscope._widgets._task_row import TaskRow
from histoscope.coassess import Call, Session
from histoscope.labels import INTENSITY, LOCATION, MALIGNANCY, QUANTITY

#: Rows shown before a checkpoint names its tissue classes.
_ROWS = {"intensity": INTENSITY, "location": LOCATION, "quantity": QUANTITY,
         "tissue": (), "malignancy": MALIGNANCY}  # fmt: skip

if TYPE_CHECKING:
    import napari

DEFAULT_CHECKPOINT = "isight_default.safetensors"
SCOPES = ("whole slide", "visible region", "selected shape")


def shape_to_level0(shapes, vertices, image):
    """Level-0 ``(y, x)`` pixels of a shape's vertices over ``image``, whatever either layer's scale.

    Vertices go to world coordinates through the shapes layer's own transform,
    then into the image layer's data (level-0) coordinates through its transform.
    """
    import numpy as np

    world = np.array([shapes.data_to_world(v) for v in np.asarray(vertices)])
    return np.array([image.world_to_data(w) for w in world])[:, -2:]


def _os_user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # no user name in this environment
        return ""


class CoAssessWidget(TaskWidget):
    """Five iSight tasks: model probabilities, measurement estimates, pathologist's calls."""

    cancel_text = "Cancelled; calls made so far are saved, and what was assessed is shown."

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(napari_viewer, "Assess")
        self.session: Session | None = None
        self.region_id = "slide"
        self._checkpoint_sha = ""
        self.layer_combo = RGBLayerCombo(napari_viewer)
        self.picker = CheckpointPicker(
            DEFAULT_CHECKPOINT, "iSight checkpoint (.safetensors); empty: measurement only"
        )
        self.checkpoint = self.picker.edit
        self.metadata = QLineEdit()
        self.metadata.setPlaceholderText("e.g. Tissue: breast. Antibody: HER2. (optional)")
        self.scope = QComboBox()
        self.scope.addItems(SCOPES)
        form = QFormLayout()
        form.addRow("Slide", self.layer_combo)
        form.addRow("Checkpoint", self.picker)
        form.addRow("Clinical text", self.metadata)
        form.addRow("Assess", self.scope)

        self.rows: dict[str, TaskRow] = {}
        #: per task, the line saying why its bars are hidden (empty when shown)
        self.hidden_lines: dict[str, QLabel] = {}
        rows_box = QWidget()
        self._rows_layout = QVBoxLayout(rows_box)
        for task, classes in _ROWS.items():
            self._set_row(task, classes)
        self.comment = QLineEdit()
        self.comment.setPlaceholderText("comment saved with the next call, then cleared")
        self.user = QLineEdit(_os_user())
        self.user.setToolTip("Saved with every call")
        self.agreement = QLabel("")
        self.agreement.setWordWrap(True)
        export = QPushButton("Export calls (CSV + JSON)…")
        export.clicked.connect(self._export)

        self.layer_combo.chosen_changed.connect(self.clear)
        layout = self.body_layout()
        layout.addLayout(form)
        layout.addWidget(self.controls)
        layout.addWidget(rows_box)  # the panel scrolls as a whole
        who = QFormLayout()
        who.addRow("Pathologist", self.user)
        who.addRow("Comment", self.comment)
        layout.addLayout(who)
        layout.addWidget(self.agreement)
        layout.addWidget(export)

    def clear(self, *_: object) -> None:
        """Forget the assessment shown: another slide needs Assess before any call."""
        self.session = None
        self._checkpoint_sha = ""
        for row in self.rows.values():
            row.reset_call()
            row.set_model(None)
            row.set_measurement(None)
            row.call_box.setEnabled(False)
        for line in self.hidden_lines.values():
            line.setText("")
            line.setVisible(False)
        self.agreement.setText("")

    def _set_row(self, task: str, classes) -> TaskRow:
        """Create (or replace, when the classes change) the row of one task."""
        old = self.rows.get(task)
        if old is not None and old.classes == tuple(classes):
            return old
        row = TaskRow(task, classes)
        line = QLabel("")
        line.setWordWrap(True)
        line.setVisible(False)
        grid = row.layout()
        grid.addWidget(line, grid.rowCount(), 0, 1, 2)
        self.hidden_lines[task] = line
        row.called.connect(self.record_call)
        row.call_box.setEnabled(self.session is not None)
        if old is None:
            self._rows_layout.addWidget(row)
        else:
            self._rows_layout.replaceWidget(old, row)
            old.deleteLater()
        self.rows[task] = row
        return row

    # ------------------------------------------------------------------ inputs
    def _region(self, slide, layer):
        """Level-0 ``(x, y, w, h)`` and an id for the chosen scope (``None``: whole slide)."""
        scope = self.scope.currentIndex()
        if scope == 0:
            return None, "slide"
        if scope == 1:
            region = visible_region(self.viewer, slide, layer)
        else:
            shapes = [ly for ly in self.viewer.layers.selection if ly._type_string == "shapes"]
            if not shapes or not len(shapes[0].data):
                raise ValueError("select a shapes layer with the region drawn on it")
            pts = shape_to_level0(shapes[0], shapes[0].data[-1], layer)
            (y0, x0), (y1, x1) = pts.min(axis=0), pts.max(axis=0)
            region = (int(x0), int(y0), max(int(x1 - x0), 1), max(int(y1 - y0), 1))
        return region, "region {}:{}:{}:{}".format(*region)

    # --------------------------------------------------------------------- run
    def run(self):
        """Assess the chosen slide or region in a worker; returns the worker (or None)."""
        from histoscope._widgets._worker import Job
        from histoscope.tasks.isight import ISightParams

        try:
            session, layer = self.chosen_session(self.layer_combo)
            slide = session.slide
            region, self.region_id = self._region(slide, layer)
        except ValueError as exc:
            self.status.setText(str(exc))
            return None
        self.clear()
        self._pending = (Session.for_session(session), slide.path.name)
        jobs = []
        if self.picker.path():
            jobs.append(Job("isight", session, self.picker.path(), region=region,
                            params=ISightParams(metadata=self.metadata.text().strip())))  # fmt: skip
        jobs.append(Job("ihc", session, region=region))
        return self.run_tasks(jobs, text="Assessing…", on_result=self._show)

    def _show(self, outcome) -> None:
        calls, measurement = outcome.get("isight"), outcome.get("ihc")
        if calls is None and (measurement is None or measurement.cancelled):
            return  # nothing assessed: no calls can be made
        self.session, self._slide_name = self._pending
        self._checkpoint_sha = calls.provenance.checkpoint_sha256 if calls is not None else ""
        for row in self.rows.values():
            row.call_box.setEnabled(True)
        if measurement is None or measurement.cancelled:  # stopped before it measured all
            self._show_calls(calls)
            return
        summary = measurement.summary()
        self._show_calls(calls)
        for task, row in self.rows.items():
            row.set_measurement(
                summary.get(task) if task in ("intensity", "quantity", "location") else None
            )
        note = "" if calls is not None else " (no checkpoint: measurement only)"
        if calls is not None and calls.summary()["warning"]:
            note += f". Model: {calls.summary()['warning']}"
        for line in calls.summary()["text"].get("notes", []) if calls is not None else []:
            note += f". Model: {line}"
        self.status.setText(f"{summary['n_cells']} cells measured{note}. Make your calls below.")
        self._show_agreement()

    def _show_calls(self, calls) -> None:
        """The model's bars and attention (``None``: no model run).

        A head whose calibration was not acceptable on validation slides in the
        case it ran in (with or without clinical text) shows no bars, and a
        line says why instead. A slide outside the checkpoint's training data
        gets the panels' red line under the status.
        """
        show_training_data_flag(self.controls, calls.summary() if calls is not None else None)
        if calls is not None:
            self._set_row("tissue", tuple(calls.probabilities["tissue"]))
            self.replace_layer(*calls.to_layers()[0])
        hidden = calls.hidden() if calls is not None else {}
        for task, row in self.rows.items():
            shown = calls is not None and task not in hidden
            row.set_model(calls.probabilities.get(task) if shown else None)
            self.hidden_lines[task].setText(hidden.get(task, ""))
            self.hidden_lines[task].setVisible(task in hidden)

    # ------------------------------------------------------------------- calls
    def record_call(self, task: str, value: str) -> Call | None:
        """Save the pathologist's call at once (append-only session file)."""
        if self.session is None:
            self.status.setText("Assess a slide before making calls.")
            return None
        row = self.rows[task]
        call = Call(
            slide=self._slide_name,
            task=task, call=value, region=self.region_id, model=row.model_call,
            model_confidence=row.model_confidence(), model_probabilities=row.model_probabilities(),
            measurement=row.measurement, comment=self.comment.text().strip(),
            user=self.user.text().strip(), checkpoint_sha256=self._checkpoint_sha,
        )  # fmt: skip
        try:
            self.session.record(call)
        except OSError as exc:
            self.controls.error(f"Call NOT saved: {exc}")
            return None
        self.comment.clear()
        self.status.setText(f"Saved {task}: {value} → {self.session.path}")
        self._show_agreement()
        return call

    def _show_agreement(self) -> None:
        if self.session is None or not self.session.calls:
            self.agreement.setText("")
            return
        lines = []
        for task, row in self.session.agreement().items():
            parts = [f"{task} (n={row['n']})"]
            for other in ("model", "measurement"):
                s = row[other]
                if s["n"]:
                    k = "–" if s["kappa"] is None else f"{s['kappa']:.2f}"
                    parts.append(f"{other}: acc {s['accuracy']:.2f}, κ {k}")
            lines.append("; ".join(parts))
        n_dis = len(self.session.disagreements())
        self.agreement.setText("<br>".join(lines) + f"<br>{n_dis} disagreement(s) to revisit")

    def _export(self) -> None:
        if self.session is None:
            return
        folder = QFileDialog.getExistingDirectory(self, "Export calls to")
        if folder:
            files = self.session.export(Path(folder))
            self.status.setText("Exported " + ", ".join(str(p) for p in files.values()))
