"""One task of the co-assessment panel: model bars, measurement, the pathologist's call."""

from __future__ import annotations

from collections.abc import Sequence

from qtpy.QtCore import Signal
from qtpy.QtWidgets import QComboBox, QGridLayout, QGroupBox, QLabel, QProgressBar

NO_CALL = "— no call —"


class TaskRow(QGroupBox):
    """Probability bar per class, the measurement's estimate, a disagreement flag, a call box.

    ``called(task, value)`` is emitted when the pathologist picks a class.
    """

    called = Signal(str, str)

    def __init__(self, task: str, classes: Sequence[str]) -> None:
        super().__init__(task)
        self.task = task
        self.classes = tuple(classes)
        self._model: str | None = None
        self._measurement: str | None = None
        grid = QGridLayout(self)
        grid.setColumnStretch(1, 1)
        self.bars: dict[str, QProgressBar] = {}
        for i, name in enumerate(self.classes):
            bar = QProgressBar()
            bar.setRange(0, 1000)
            bar.setValue(0)
            bar.setFormat("–")
            grid.addWidget(_name_label(name), i, 0)
            grid.addWidget(bar, i, 1)
            self.bars[name] = bar
        n = len(self.classes)
        self.measurement_label = QLabel("measurement: –")
        self.measurement_label.setWordWrap(True)
        self.flag = QLabel("")
        self.flag.setWordWrap(True)
        self.flag.setStyleSheet("color: #e0a030; font-weight: bold")
        self.call_box = QComboBox()
        self.call_box.addItems([NO_CALL, *self.classes])
        self.call_box.setEnabled(False)  # until the slide or region is assessed
        self.call_box.activated.connect(self._picked)
        grid.addWidget(self.measurement_label, n, 0, 1, 2)
        grid.addWidget(self.flag, n + 1, 0, 1, 2)
        grid.addWidget(_name_label("Final call"), n + 2, 0)
        grid.addWidget(self.call_box, n + 2, 1)

    # ------------------------------------------------------------------- input
    def set_model(self, probabilities: dict[str, float] | None) -> None:
        """Show the model's probabilities (``None`` clears them)."""
        self._model = None
        for name, bar in self.bars.items():
            p = (probabilities or {}).get(name)
            bar.setValue(0 if p is None else round(1000 * p))
            bar.setFormat("–" if p is None else f"{100 * p:.0f}%")
        if probabilities:
            self._model = max(probabilities, key=probabilities.__getitem__)
        self._update_flag()

    def set_measurement(self, value: str | None) -> None:
        """Show the measurement's estimate for this task, if it has one."""
        self._measurement = value
        self.measurement_label.setText(f"measurement: {value or 'n/a'}")
        self._update_flag()

    def reset_call(self) -> None:
        """Back to no call (new slide or region): never pre-filled with the AI's answer."""
        self.call_box.setCurrentIndex(0)

    # ------------------------------------------------------------------ output
    @property
    def model_call(self) -> str | None:
        return self._model

    @property
    def measurement(self) -> str | None:
        return self._measurement

    def model_confidence(self) -> float | None:
        if self._model is None:
            return None
        return self.bars[self._model].value() / 1000

    def model_probabilities(self) -> dict[str, float]:
        if self._model is None:
            return {}
        return {n: b.value() / 1000 for n, b in self.bars.items()}

    def _picked(self, index: int) -> None:
        if index > 0:
            self.called.emit(self.task, self.classes[index - 1])

    def _update_flag(self) -> None:
        m, s = self._model, self._measurement
        self.flag.setText(
            f"model ({m}) and measurement ({s}) disagree" if m and s and m != s else ""
        )


def _name_label(text: str) -> QLabel:
    """A first-column label, the same width in every row (so the call boxes line up).

    A long class name wraps at its slashes and plus signs instead of widening the row.
    """
    label = QLabel(text.replace("/", "/\u200b").replace("+", "+\u200b"))  # break points
    label.setWordWrap(True)
    label.setFixedWidth(label.fontMetrics().horizontalAdvance("membranous+nucl"))
    return label
