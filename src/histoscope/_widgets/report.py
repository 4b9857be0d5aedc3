"""Report dock widget (HistGen): a machine-generated draft, its evidence, the pathologist's edit.

Generate runs the ``report`` task in a worker (progress, Cancel). The draft
appears as text and as a list of sentences; selecting a sentence shows its
attention as a heatmap layer and centres the view on its most attended
region. The pathologist edits the text; each edit is appended to the slide's
``report_edits.jsonl`` beside the original draft (fsynced, never rewritten)
shortly after typing stops, or at once with Save edit. Export writes both
versions with the evidence coordinates as Markdown and JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QPlainTextEdit,
    QPushButton,
    QVBoxLayout,
)

from histoscope._widgets._common import CheckpointPicker, RGBLayerCombo, TaskWidget

if TYPE_CHECKING:
    import napari

DEFAULT_CHECKPOINT = "histgen_default.safetensors"
#: Milliseconds of no typing after which an edit is saved.
EDIT_DELAY_MS = 700


class ReportWidget(TaskWidget):
    """Draft a report for the slide, show each sentence's evidence, keep the pathologist's edit."""

    cancel_text = "Cancelled: no report was written."

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        from histoscope.reports.store import MACHINE_GENERATED

        super().__init__(napari_viewer, "Generate report")
        self.result = None
        self.store = None
        self.layer_combo = RGBLayerCombo(napari_viewer)
        self.picker = CheckpointPicker(DEFAULT_CHECKPOINT, "HistGen checkpoint (.safetensors)")
        self.picker.edit.textChanged.connect(self._describe_model)
        form = QFormLayout()
        form.addRow("Slide", self.layer_combo)
        form.addRow("Checkpoint", self.picker)
        self.banner = QLabel()
        self.banner.setWordWrap(True)
        self.banner.setStyleSheet("color: #e0a030")
        self.machine_text = MACHINE_GENERATED
        self.sentences = QListWidget()
        self.sentences.currentRowChanged.connect(self.show_sentence)
        self.editor = QPlainTextEdit()
        self.editor.setPlaceholderText("The draft appears here; edit it to make it yours.")
        self.editor.textChanged.connect(self._edited)
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(EDIT_DELAY_MS)
        self._timer.timeout.connect(self.save_edit)
        self.save_button = QPushButton("Save edit")
        self.save_button.clicked.connect(self.save_edit)
        self.export_button = QPushButton("Export…")
        self.export_button.clicked.connect(lambda: self.export())
        self.saved = QLabel("")
        buttons = QHBoxLayout()
        buttons.addWidget(self.save_button)
        buttons.addWidget(self.export_button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.controls)
        layout.addWidget(self.banner)
        layout.addWidget(QLabel("Sentences (select one to see its evidence)"))
        layout.addWidget(self.sentences, stretch=1)
        layout.addWidget(QLabel("Report (edit here)"))
        layout.addWidget(self.editor, stretch=2)
        layout.addLayout(buttons)
        layout.addWidget(self.saved)
        self._loading = False
        self._describe_model()

    # ------------------------------------------------------------ model card
    def _describe_model(self, *_: object) -> None:
        """State that the text is machine-generated and what the model was trained on."""
        from histoscope.checkpoints import read_card
        from histoscope.errors import CheckpointError

        trained = "unknown (choose a checkpoint)"
        path = self.picker.path()
        if path:
            try:
                trained = read_card(path).data.get("trained_on") or "not stated in its card"
            except (CheckpointError, OSError):
                trained = "unreadable checkpoint"
        self.banner.setText(f"<b>{self.machine_text}</b><br>Model trained on: {trained}")

    # ------------------------------------------------------------ generate
    def run(self):
        """Generate the report of the chosen slide in a worker; returns the worker or None."""
        from histoscope._widgets._worker import Job

        try:
            session, layer = self.chosen_session(self.layer_combo)
            ckpt = self.picker.path()
            if not ckpt:
                raise ValueError("Choose a HistGen checkpoint.")
        except ValueError as exc:
            self.status.setText(str(exc))
            return None
        self._session = session
        job = Job("report", session, ckpt, near=self.view_centre(session.slide, layer))
        return self.run_tasks([job], text="Encoding tissue tiles…", on_result=self._show)

    def _show(self, outcome) -> None:
        from histoscope.reports.store import ReportStore

        result = outcome.get("report")
        if result is None:
            return
        self.result = result
        self.store = ReportStore.for_session(self._session)
        self.store.add_draft(result)
        self._loading = True
        self.editor.setPlainText(result.text)
        self._loading = False
        self.sentences.clear()
        for i, s in enumerate(result.sentences):
            self.sentences.addItem(f"{i + 1}. {s}")
        self.banner.setText(f"<b>{self.machine_text}</b><br>Model trained on: {result.trained_on}")
        self.status.setText(f"Draft of {len(result.sentences)} sentences from "
                            f"{len(result.grid)} tiles; kept in {self.store.path.name}.")  # fmt: skip
        if result.sentences:
            self.sentences.setCurrentRow(0)

    # ------------------------------------------------------------ evidence
    def show_sentence(self, row: int) -> None:
        """Show one sentence's attention heatmap and centre the view on its top region."""
        if self.result is None or not 0 <= row < len(self.result.sentences):
            return
        for name in [ly.name for ly in self.viewer.layers if ly.name.startswith("report evidence")]:
            self.viewer.layers.remove(name)
        for data, kwargs, kind in self.result.to_layers(sentence=row):
            self.replace_layer(data, kwargs, kind)
        top = self.result.evidence(row)[0]
        g = self.result.grid
        half = g.stride / 2
        camera = self.viewer.scene.camera if hasattr(self.viewer, "scene") else self.viewer.camera
        camera.center = ((top["y"] + half) * g.slide_mpp, (top["x"] + half) * g.slide_mpp)
        camera.zoom = min(self.viewer.canvas.size) / (4 * g.stride * g.slide_mpp)

    # ------------------------------------------------------------ edits
    def _edited(self) -> None:
        if not self._loading and self.store is not None:
            self.saved.setText("Editing… (saved when you pause)")
            self._timer.start()

    def save_edit(self) -> bool:
        """Append the editor's text as an edit of the draft (if it changed); True when saved."""
        self._timer.stop()
        if self.store is None:
            self.saved.setText("Generate a draft first.")
            return False
        text = self.editor.toPlainText()
        current = self.store.current()
        if current is not None and current.text == text:
            return False
        try:
            entry = self.store.add_edit(text)
        except OSError as exc:
            self.saved.setText(f"<span style='color:#e05050'>Edit NOT saved: {exc}</span>")
            return False
        self.saved.setText(f"Edit saved {entry.time} beside the draft ({len(self.store.edits())} "
                           "edits kept).")  # fmt: skip
        return True

    def export(self, out_dir: str | None = None) -> dict[str, Path] | None:
        """Write both versions with evidence as Markdown and JSON (asks for a folder if none)."""
        if self.store is None:
            self.status.setText("Generate a draft first.")
            return None
        self.save_edit()
        if out_dir is None:
            out_dir = QFileDialog.getExistingDirectory(self, "Export report to")
            if not out_dir:
                return None
        files = self.store.export(out_dir)
        self.status.setText(f"Exported {files['md'].name} and {files['json'].name} to {out_dir}.")
        return files
