"""Report dock widget (HistGen): a machine-generated draft, its evidence, the pathologist's edit.

Generate runs the ``report`` task in a worker (progress, Cancel). The draft
appears as text and as a list of sentences; selecting a sentence shows its
attention as a heatmap layer and centres the view on its most attended
region. The pathologist edits the text; each edit is appended to the slide's
``report_edits.jsonl`` beside the original draft (fsynced, never rewritten)
shortly after typing stops, at once with Save edit, and when the panel is
hidden or closed. Choosing a slide brings back its latest draft, its
sentences and evidence and the pathologist's latest text; generating again
over edited text asks first. Export writes both versions with the evidence
coordinates as Markdown and JSON.
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
    QMessageBox,
    QPlainTextEdit,
    QPushButton,
)

from histoscope._widgets._common import (
    CheckpointPicker,
    RGBLayerCombo,
    TaskWidget,
    show_training_data_flag,
)

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
        self._session = None
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
        self.evidence_label = QLabel("")
        self.evidence_label.setWordWrap(True)
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
        layout = self.body_layout()
        layout.addLayout(form)
        layout.addWidget(self.controls)
        layout.addWidget(self.banner)
        layout.addWidget(QLabel("Sentences (select one to see its evidence)"))
        layout.addWidget(self.sentences, stretch=1)
        layout.addWidget(self.evidence_label)
        layout.addWidget(QLabel("Report (edit here)"))
        layout.addWidget(self.editor, stretch=2)
        layout.addLayout(buttons)
        layout.addWidget(self.saved)
        self._loading = False
        self._describe_model()
        self.layer_combo.chosen_changed.connect(self.load_slide)
        self.load_slide()

    # ------------------------------------------------------------ the slide's kept report
    def load_slide(self, *_: object) -> None:
        """Open the chosen slide's report store and show its latest draft and text.

        Pending typing on the previous slide is saved first.
        """
        from histoscope.errors import HistoScopeError
        from histoscope.reports.store import ReportStore

        self.flush()
        self.result = self.store = self._session = None
        self._clear_evidence()
        self.evidence_label.setText("")
        self._set_text("")
        self.sentences.clear()
        self.saved.setText("")
        try:
            session, _ = self.chosen_session(self.layer_combo)
        except ValueError:  # no slide chosen
            return
        except HistoScopeError as exc:
            self.status.setText(f"The slide's kept report cannot be opened: {exc}")
            return
        self._session = session
        try:
            self.store = ReportStore.for_session(session)
        except OSError as exc:
            self.status.setText(f"The slide's kept report cannot be read: {exc}")
            return
        self._show_kept()

    def _show_kept(self) -> None:
        """Put the store's draft (its sentences, its evidence) and current text on screen."""
        from histoscope.reports.store import ReportError
        from histoscope.tasks.report import ReportResult

        draft = self.store.draft()
        if draft is None:
            return
        note = ""
        path = self.store.evidence_path(draft)
        if path is None:
            note = " Its evidence was not kept (drafted by an older version)."
        else:
            try:
                self.result = ReportResult.load_evidence(path)
            except ReportError as exc:
                note = f" Its evidence cannot be shown: {exc}"
        self._set_text(self.store.current().text)
        for s in draft.sentences:
            self.sentences.addItem(_label(s["index"], s["text"], s.get("evidence_note", "")))
        if draft.trained_on:
            self.banner.setText(f"<b>{self.machine_text}</b><br>Model trained on: "
                                f"{draft.trained_on}")  # fmt: skip
        n = len(self.store.edits())
        self.status.setText(f"Draft of {draft.time} and {n} edit(s) brought back from "
                            f"{self.store.path.name}.{note}")  # fmt: skip
        if self.result is not None and self.result.sentences:
            self.sentences.setCurrentRow(0)

    def _set_text(self, text: str) -> None:
        self._loading = True
        try:
            self.editor.setPlainText(text)
        finally:
            self._loading = False

    def _clear_evidence(self) -> None:
        for name in [ly.name for ly in self.viewer.layers if ly.name.startswith("report evidence")]:
            self.viewer.layers.remove(name)

    def flush(self) -> None:
        """Save typing not yet saved (the pause timer still running, or text not yet kept)."""
        if self.store is not None and self.store.draft() is not None:
            self.save_edit()

    def hideEvent(self, event) -> None:  # noqa: N802 - Qt's name
        self.flush()
        super().hideEvent(event)

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt's name
        self.flush()
        super().closeEvent(event)

    def ask_replace(self, n_edits: int) -> bool:
        """Ask whether a new draft may replace the edited text (Yes: generate)."""
        answer = QMessageBox.question(
            self, "Replace the edited report?",
            f"The current draft has {n_edits} edit(s) by the pathologist. A new draft "
            "replaces them in the editor and in the export (they stay kept in "
            f"{self.store.path.name}). Generate a new draft?",
            QMessageBox.Yes | QMessageBox.No, QMessageBox.No)  # fmt: skip
        return answer == QMessageBox.Yes

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
        if session is not self._session:
            self.load_slide()
        self.flush()
        n_edits = len(self.store.edits()) if self.store is not None else 0
        if n_edits and not self.ask_replace(n_edits):
            self.status.setText("Kept the edited report: no new draft was generated.")
            return None
        job = Job("report", session, ckpt, near=self.view_centre(session.slide, layer))
        return self.run_tasks([job], text="Encoding tissue tiles…",
                              on_result=lambda outcome: self._show(outcome, session))  # fmt: skip

    def _show(self, outcome, session=None) -> None:
        from histoscope.reports.store import ReportStore

        result = outcome.get("report")
        if result is None:
            return
        session = session or self._session
        if session is not self._session:  # another slide was chosen meanwhile: keep it there
            try:
                kept = ReportStore.for_session(session).add_draft(result)
                self.status.setText(f"The draft of {kept.slide} was kept with that slide.")
            except OSError as exc:
                self.status.setText(f"<span style='color:#e05050'>Draft NOT kept: {exc}</span>")
            return
        self.store = ReportStore.for_session(session)
        kept = f"kept in {self.store.path.name}"
        try:
            self.store.add_draft(result)
        except OSError as exc:  # edits cannot be kept beside a draft that is not there
            self.store = None
            kept = f"<span style='color:#e05050'>NOT kept, edits will not be saved: {exc}</span>"
        self.result = result
        show_training_data_flag(self.controls, result.summary())
        self._set_text(result.text)
        self.sentences.clear()
        for i, s in enumerate(result.sentences):
            self.sentences.addItem(_label(i, s, result.evidence_note(i)))
        self.banner.setText(f"<b>{self.machine_text}</b><br>Model trained on: {result.trained_on}")
        self.status.setText(f"Draft of {len(result.sentences)} sentences from "
                            f"{len(result.grid)} tiles; {kept}.")  # fmt: skip
        if result.sentences:
            self.sentences.setCurrentRow(0)

    # ------------------------------------------------------------ evidence
    def show_sentence(self, row: int) -> None:
        """Show one sentence's attention heatmap and centre the view on its top region."""
        if self.result is None or not 0 <= row < len(self.result.sentences):
            return
        layers = self.result.to_layers(sentence=row)
        names = {kwargs["name"] for _, kwargs, _ in layers}
        maps = [ly for ly in self.viewer.layers
                if ly.name.startswith("report evidence") and ly._type_string == "image"]  # fmt: skip
        for _, kwargs, kind in layers:  # the map shown is renamed and refilled, never removed:
            if kind == "image" and maps and kwargs["name"] not in self.viewer.layers:
                maps.pop(0).name = kwargs["name"]  # napari 0.9.2 can crash on a colour bar
        for name in [ly.name for ly in self.viewer.layers  # added after another was removed
                     if ly.name.startswith("report evidence") and ly.name not in names]:  # fmt: skip
            self.viewer.layers.remove(name)
        for data, kwargs, kind in layers:
            self.replace_layer(data, kwargs, kind)
        top = self.result.evidence(row)[0]
        g = self.result.grid
        half = g.stride / 2
        camera = self.viewer.scene.camera if hasattr(self.viewer, "scene") else self.viewer.camera
        camera.center = ((top["y"] + half) * g.slide_mpp, (top["x"] + half) * g.slide_mpp)
        camera.zoom = min(self.viewer.canvas.size) / (4 * g.stride * g.slide_mpp)
        note = self.result.evidence_note(row)
        self.evidence_label.setText(
            f"<span style='color:#e0a030'>Sentence {row + 1}: {note}; its top regions are "
            "no evidence for it.</span>" if note else f"Sentence {row + 1}: attention shown "
            "from 0 (none) to its highest tile."
        )  # fmt: skip

    # ------------------------------------------------------------ edits
    def _edited(self) -> None:
        if not self._loading and self.store is not None and self.store.draft() is not None:
            self.saved.setText("Editing… (saved when you pause)")
            self._timer.start()

    def save_edit(self) -> bool:
        """Append the editor's text as an edit of the draft (if it changed); True when saved."""
        self._timer.stop()
        if self.store is None or self.store.draft() is None:
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
        if self.store is None or self.store.draft() is None:
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


def _label(index: int, text: str, note: str) -> str:
    """A sentence as listed, flagged when its evidence is not specific to it."""
    return f"{index + 1}. {text}" + ("  [evidence not sentence-specific]" if note else "")
