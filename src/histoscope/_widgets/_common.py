"""Pieces every HistoScope dock widget shares.

The panel frame (:class:`Panel`: vertical scrolling only, docks joined as tabs, forms and
combo boxes fitted to a narrow dock), paths shown elided in the middle (:class:`PathLabel`,
:class:`PathEdit`), failures in user terms with a Details toggle (:func:`explain`,
:class:`ErrorDetails`), the image and checkpoint pickers and the run controls.
"""

from __future__ import annotations

from pathlib import Path

from qtpy.QtCore import QEvent, QSize, Qt, QTimer, Signal
from qtpy.QtGui import QPainter
from qtpy.QtWidgets import (
    QComboBox,
    QDockWidget,
    QFileDialog,
    QFormLayout,
    QFrame,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMainWindow,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QStyle,
    QStyleOptionFrame,
    QTabBar,
    QToolButton,
    QVBoxLayout,
    QWidget,
)


# ------------------------------------------------------------------ layout
def elide_middle(text: str, n: int = 60) -> str:
    """``text`` cut to at most ``n`` characters by an ellipsis in the middle (both ends kept)."""
    if len(text) <= n:
        return text
    head = (n - 1) // 2
    return f"{text[:head]}…{text[len(text) - (n - 1 - head) :]}"


class PathLabel(QLabel):
    """A path, whole when it fits, else elided in the middle; the full path is the tooltip.

    The label asks for no more width than a short path, so a long one never
    widens its panel; the start (the drive or top folder) and the file name
    both stay in view.
    """

    def __init__(self, path: object = "", empty: str = "–") -> None:
        super().__init__()
        self._path = ""
        self._empty = empty
        self.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.set_path(path)

    def set_path(self, path: object) -> None:
        """Show ``path`` (``None`` or ``""``: the empty text)."""
        self._path = "" if path is None else str(path)
        self.setToolTip(self._path)
        self._elide()

    def path(self) -> str:
        """The full path shown (``""`` when none)."""
        return self._path

    def _elide(self) -> None:
        if not self._path:
            super().setText(self._empty)
            return
        width = max(self.contentsRect().width(), 40)
        text = self.fontMetrics().elidedText(self._path, Qt.TextElideMode.ElideMiddle, width)
        super().setText(text)

    def resizeEvent(self, event) -> None:  # noqa: N802 - Qt's name
        super().resizeEvent(event)
        self._elide()

    def sizeHint(self) -> QSize:  # noqa: N802 - Qt's name
        fm = self.fontMetrics()
        return QSize(min(fm.horizontalAdvance(self._path or self._empty) + 4, 240),
                     super().sizeHint().height())  # fmt: skip

    def minimumSizeHint(self) -> QSize:  # noqa: N802 - Qt's name
        return QSize(40, super().minimumSizeHint().height())


class PathEdit(QLineEdit):
    """A path field that, when not being edited, shows a long path elided in the middle.

    :meth:`text` is always the full path (also the tooltip); the elision is
    only drawn, so editing, copying and the widget's signals see the whole path.
    """

    def __init__(self, text: str = "") -> None:
        super().__init__(text)
        self.setToolTip(text)
        self.textChanged.connect(self.setToolTip)
        self.setMinimumWidth(80)

    def shown_text(self) -> str:
        """The text as drawn now: the full path, or its middle elided to fit."""
        text = self.text()
        if self.hasFocus() or not text:
            return text
        width = self._text_rect().width()
        return self.fontMetrics().elidedText(text, Qt.TextElideMode.ElideMiddle, width)

    def _text_rect(self):
        opt = QStyleOptionFrame()
        self.initStyleOption(opt)
        rect = self.style().subElementRect(QStyle.SubElement.SE_LineEditContents, opt, self)
        return rect.adjusted(2, 0, -2, 0)

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt's name
        shown = self.shown_text()
        if shown == self.text():
            super().paintEvent(event)
            return
        opt = QStyleOptionFrame()
        self.initStyleOption(opt)
        painter = QPainter(self)
        self.style().drawPrimitive(QStyle.PrimitiveElement.PE_PanelLineEdit, opt, painter, self)
        painter.setPen(self.palette().color(self.foregroundRole()))
        painter.drawText(self._text_rect(), Qt.AlignmentFlag.AlignVCenter, shown)
        painter.end()


def explain(exc: BaseException, name: str | None = None, *, mpp_known: bool | None = None):
    """``(what the user reads, the technical detail)`` for a failure.

    Only a file that is really damaged (an error raised with ``damaged=True``:
    truncated, undecodable, not in a format HistoScope reads) is said in user
    terms, naming the file from the exception's ``path`` (or ``name`` when the
    caller knows it). A slide whose µm per pixel is unknown (an error raised
    with ``mpp_unknown=True``, or any other slide or parameter error while
    ``mpp_known`` is False) says where to set it. Every other message
    HistoScope writes for the user (a missing file, an unsupported format, a
    wrong checkpoint family, a parameter out of range) is kept as it is. The
    detail is the exception and its traceback, for the panel's Details toggle
    and for bug reports.
    """
    import traceback

    from histoscope.errors import HistoScopeError, SlideError
    from histoscope.params import ParamError

    detail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).strip()
    message = str(exc)
    path = getattr(exc, "path", None)
    named = name or (Path(path).name if path else None)
    damaged = isinstance(exc, HistoScopeError) and bool(getattr(exc, "damaged", False))
    if damaged:
        what = named or "The file"
        user = (f"{what} cannot be read: it is damaged, incomplete or "
                "not in a format HistoScope reads. Check the file, or open another copy.")  # fmt: skip
    elif getattr(exc, "mpp_unknown", False) or (
        mpp_known is False and isinstance(exc, SlideError | ParamError)
    ):
        user = f"{MPP_UNKNOWN_TEXT} ({message})"
    elif isinstance(exc, MemoryError):
        user = "Not enough memory for this job: choose a smaller region or close other programs."
    elif isinstance(exc, OSError) and not isinstance(exc, HistoScopeError):
        name = getattr(exc, "filename", None)
        where = f"{name}" if name else "A file"
        user = f"{where} could not be read or written: {exc.strerror or message}."
    elif isinstance(exc, HistoScopeError | ValueError):
        user = message
    else:
        user = f"The job stopped on an unexpected error ({type(exc).__name__}: {message})."
    return user, detail


def breakable(text: str, run: int = 40) -> str:
    """``text`` with break opportunities (U+200B) in words longer than ``run`` characters.

    Such a word (a path, a long token) may break after a path separator, and
    at least every ``run`` characters.

    A word-wrapped label is as wide as its longest unbreakable piece; a long
    path or a long token in a message would otherwise widen the dock for good.
    """
    import re

    def split(token: re.Match) -> str:
        piece = re.sub(r"([/\\])(?=\S)", "\\1\u200b", token.group())
        return re.sub(rf"([^\u200b]{{{run}}})(?=[^\u200b])", "\\1\u200b", piece)

    return re.sub(rf"\S{{{run + 1},}}", split, text)  # short words (µm/px) stay whole


#: What a panel says when a job needs the slide's µm per pixel and it is unknown.
MPP_UNKNOWN_TEXT = "µm per pixel unknown — set it in the Slide panel"


class _DetailText(QPlainTextEdit):
    """Read-only, selectable detail text that wraps anywhere and never widens its dock."""

    def __init__(self) -> None:
        from qtpy.QtGui import QTextOption

        super().__init__()
        self.setReadOnly(True)
        self.setLineWrapMode(QPlainTextEdit.LineWrapMode.WidgetWidth)
        self.setWordWrapMode(QTextOption.WrapMode.WrapAnywhere)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.setMinimumWidth(0)
        self.setStyleSheet("font-family: monospace; font-size: small")
        self.setMaximumHeight(12 * self.fontMetrics().lineSpacing())

    def setText(self, text: str) -> None:  # noqa: N802 - as QLabel's
        self.setPlainText(text)

    def text(self) -> str:
        return self.toPlainText()


class ErrorDetails(QWidget):
    """A "Details" toggle under a status line: the technical side of the last error.

    Hidden until :meth:`set_detail` gets some; the detail text is selectable
    so it can be copied into a bug report.
    """

    def __init__(self) -> None:
        super().__init__()
        self.toggle = QToolButton()
        self.toggle.setText("Details")
        self.toggle.setCheckable(True)
        self.toggle.setArrowType(Qt.ArrowType.RightArrow)
        self.toggle.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.toggle.toggled.connect(self._open)
        self.text = _DetailText()
        self.text.hide()
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.toggle, alignment=Qt.AlignmentFlag.AlignLeft)
        layout.addWidget(self.text)
        self.hide()

    def set_detail(self, detail: str) -> None:
        """Offer ``detail`` behind the (closed) toggle; an empty one hides the toggle."""
        self.text.setText(detail)
        self.toggle.setChecked(False)
        self.setVisible(bool(detail))

    def clear(self) -> None:
        self.set_detail("")

    def _open(self, on: bool) -> None:
        self.toggle.setArrowType(Qt.ArrowType.DownArrow if on else Qt.ArrowType.RightArrow)
        self.text.setVisible(on)


def form_layout() -> QFormLayout:
    """A form whose fields move under their labels when the dock is narrow."""
    form = QFormLayout()
    form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
    form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
    return form


def fit_combo(combo: QComboBox, chars: int = 12) -> QComboBox:
    """Let a combo box be narrower than its longest item (the list still shows it whole)."""
    from qtpy.QtWidgets import QApplication

    combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(chars)
    QApplication.sendEvent(combo, QEvent(QEvent.Type.StyleChange))  # drops a cached minimum
    combo.updateGeometry()
    return combo


#: The width (px) a panel asks for; it takes less only when its content fits in less.
PANEL_WIDTH = 380


class _FitScroll(QScrollArea):
    """Scrolls vertically only, and is never narrower than its content needs."""

    def __init__(self, body: QWidget) -> None:
        super().__init__()
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setWidget(body)  # the scroll area filters the body's events from here on

    def eventFilter(self, obj, event) -> bool:  # noqa: N802 - Qt's name
        if obj is self.widget() and event.type() == QEvent.Type.LayoutRequest:
            self.updateGeometry()  # the body's needs changed: the dock may have to widen
        return super().eventFilter(obj, event)

    def minimumSizeHint(self) -> QSize:  # noqa: N802 - Qt's name
        body = self.widget()
        need = body.minimumSizeHint().width() if body is not None else 0
        bar = self.verticalScrollBar().sizeHint().width()
        return QSize(need + bar + 2 * self.frameWidth(), super().minimumSizeHint().height())

    def sizeHint(self) -> QSize:  # noqa: N802 - Qt's name
        hint = super().sizeHint()  # a modest width leaves the canvas room on a laptop screen
        return QSize(max(self.minimumSizeHint().width(), min(hint.width(), PANEL_WIDTH)),
                     hint.height())  # fmt: skip


class Panel(QWidget):
    """A HistoScope dock panel: its content scrolls vertically, never sideways.

    Subclasses lay out their content in :meth:`body_layout` (not on the panel
    itself). The dock is never narrower than the content's minimum width, so
    nothing is clipped; a short dock scrolls. When napari docks the panel in
    an area that already holds another HistoScope panel, it joins that one as
    a tab (whichever way it was opened: the Plugins menu, a script or the
    demo), and the tab titles are shown whole, with scroll arrows.
    """

    def __init__(self) -> None:
        super().__init__()
        self.body = QWidget()
        self.scroll = _FitScroll(self.body)
        self._tabs_joined = self._fitted = False

    def body_layout(self) -> QVBoxLayout:
        """The vertical layout of the scrolling content (made on first call)."""
        layout = self.body.layout()
        if isinstance(layout, QVBoxLayout):
            return layout
        outer = QVBoxLayout(self)  # the panel itself holds only the scroll area
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(self.scroll)
        return QVBoxLayout(self.body)

    def event(self, event) -> bool:
        if event.type() == QEvent.Type.ParentChange and not self._fitted:
            self._fitted = True  # put in a dock: fit before the dock first sizes itself
            fit_narrow(self.body)
        return super().event(event)

    def showEvent(self, event) -> None:  # noqa: N802 - Qt's name
        if not self._tabs_joined:
            self._tabs_joined = True
            if not self._fitted:
                self._fitted = True
                fit_narrow(self.body)
            if not join_panel_tabs(self):  # not docked yet: once napari has placed it
                QTimer.singleShot(0, self._join_tabs)
        super().showEvent(event)

    def _join_tabs(self) -> None:
        try:
            join_panel_tabs(self)
        except RuntimeError:  # closed before the event loop came back
            pass


def fit_narrow(widget: QWidget) -> None:
    """Let every form and combo box under ``widget`` fit a narrow dock.

    Form fields move under their labels when a row does not fit, and combo
    boxes may be narrower than their longest item (the open list shows it).
    """
    for form in widget.findChildren(QFormLayout):
        form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
    for combo in widget.findChildren(QComboBox):
        fit_combo(combo)


def _dock_of(widget: QWidget) -> QDockWidget | None:
    parent = widget.parentWidget()
    while parent is not None and not isinstance(parent, QDockWidget):
        parent = parent.parentWidget()
    return parent


#: What napari appends to a plugin dock's title: the plugin's name (napari < 0.9) or its
#: display name (napari 0.9). The tab says which panel; the menus keep the full name.
TITLE_SUFFIXES = (" (napari-histoscope)", " (HistoScope)")


def _short_title(dock: QDockWidget) -> None:
    """Drop napari's plugin suffix from the dock's title, its tab and its custom title bar."""
    title = dock.windowTitle()
    for suffix in TITLE_SUFFIXES:
        if title.endswith(suffix):
            title = title[: -len(suffix)]
            dock.setWindowTitle(title)
    bar = getattr(getattr(dock, "title", None), "title", None)  # napari's QtCustomTitleBar
    if isinstance(bar, QLabel):
        text = bar.text()
        for suffix in TITLE_SUFFIXES:
            if text.endswith(suffix):
                bar.setText(text[: -len(suffix)])


def join_panel_tabs(panel: QWidget) -> bool:
    """Tabify ``panel``'s dock with the other HistoScope panels docked in its area.

    Returns True when it joined (or already was in) a tab group. The tab bars
    of the main window show HistoScope's titles whole, scrolling when they
    do not fit.
    """
    dock = _dock_of(panel)
    main = dock.parentWidget() if dock is not None else None
    if dock is None or dock.isFloating() or not isinstance(main, QMainWindow):
        return False
    if main.dockWidgetArea(dock) == Qt.DockWidgetArea.NoDockWidgetArea:
        return False
    # Qt fixes a dock's minimum width from its content when first shown, before the
    # panel's combo boxes and forms were made to fit: let the content's own minimum rule
    dock.setMinimumWidth(min(dock.minimumWidth(), 50))
    joined = bool(main.tabifiedDockWidgets(dock))
    if not joined:
        area = main.dockWidgetArea(dock)
        others = [d for d in main.findChildren(QDockWidget)
                  if d is not dock and not d.isFloating() and d.isVisible()
                  and main.dockWidgetArea(d) == area and isinstance(d.widget(), Panel)]  # fmt: skip
        if others:
            main.tabifyDockWidget(others[-1], dock)
            dock.show()
            dock.raise_()
            joined = True
    _short_title(dock)
    if not getattr(dock, "_histoscope_titled", False):  # napari remakes its title bar
        dock._histoscope_titled = True  # when the dock floats or moves: shorten it again
        dock.topLevelChanged.connect(lambda *_: _short_title(dock))
        dock.dockLocationChanged.connect(lambda *_: _short_title(dock))
    titles = {
        d.windowTitle() for d in main.findChildren(QDockWidget) if isinstance(d.widget(), Panel)
    }
    for bar in main.findChildren(QTabBar):
        if any(bar.tabText(i) in titles for i in range(bar.count())):
            bar.setElideMode(Qt.TextElideMode.ElideNone)
            bar.setUsesScrollButtons(True)
    return joined


class RGBLayerCombo(QComboBox):
    """The viewer's RGB image layers, kept current as layers come, go and are renamed.

    The choice follows the layer itself, so renaming it keeps it chosen.
    """

    #: Emitted when the chosen layer itself changes (not when it only moves in the list).
    chosen_changed = Signal()

    def __init__(self, viewer) -> None:
        super().__init__()
        self.viewer = viewer
        self._layers: list = []
        self._last = None
        for event in (viewer.layers.events.inserted, viewer.layers.events.removed):
            event.connect(self.refresh)
        self.currentIndexChanged.connect(self._check_chosen)
        self.refresh()

    def _check_chosen(self, *_: object) -> None:
        layer = self.layer()
        if layer is not self._last:
            self._last = layer
            self.chosen_changed.emit()

    def refresh(self, *_: object) -> None:
        chosen = self.layer()
        self._layers = [ly for ly in self.viewer.layers if getattr(ly, "rgb", False)]
        self.blockSignals(True)
        self.clear()
        for ly in self._layers:
            ly.events.name.connect(self.refresh)  # connecting twice is a no-op
            self.addItem(ly.name)
        self.blockSignals(False)
        if chosen not in self._layers:  # nothing chosen yet: the active image, else the newest
            active = self.viewer.layers.selection.active
            chosen = active if active in self._layers else (self._layers or [None])[-1]
        index = next((i for i, ly in enumerate(self._layers) if ly is chosen), 0)
        self.setCurrentIndex(index if self._layers else -1)
        self._check_chosen()

    def layer(self):
        """The chosen layer, or ``None``."""
        i = self.currentIndex()
        layers = getattr(self, "_layers", [])
        if not 0 <= i < len(layers) or layers[i] not in self.viewer.layers:
            return None
        return layers[i]


class CheckpointPicker(QWidget):
    """A checkpoint path with a browse button, prefilled with an embedded default."""

    def __init__(self, default_name: str, placeholder: str) -> None:
        super().__init__()
        from histoscope._data import sample_data_path

        default = sample_data_path(default_name)
        self.edit = PathEdit(str(default) if default else "")
        self.edit.setPlaceholderText(placeholder)
        browse = QPushButton("…")
        browse.setMaximumWidth(32)
        browse.clicked.connect(self._browse)
        self.about = QLabel("")
        self.about.setWordWrap(True)
        self.about.setStyleSheet("color: grey; font-size: small")
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.edit)
        row.addWidget(browse)
        box = QVBoxLayout(self)
        box.setContentsMargins(0, 0, 0, 0)
        box.addLayout(row)
        box.addWidget(self.about)
        self.edit.textChanged.connect(self._describe)
        self._describe()

    def _describe(self, *_: object) -> None:
        """Show what the checkpoint is (from its card); the full path as a tooltip."""
        from histoscope.checkpoints import describe_card, read_card
        from histoscope.errors import HistoScopeError

        path = self.path()
        self.edit.setToolTip(path)
        self.edit.setCursorPosition(len(path))  # the file name, not the folder, stays in view
        if not path:
            self.about.setText("")
            return
        try:
            self.about.setText(describe_card(read_card(path)))
        except (HistoScopeError, OSError, ValueError) as exc:
            self.about.setText(f"<span style='color:#e05050'>{exc}</span>")

    def path(self) -> str:
        return self.edit.text().strip()

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Checkpoint", "", "Checkpoints (*.safetensors)")
        if path:
            self.edit.setText(path)


class RunControls(QWidget):
    """Run and Cancel buttons, a progress bar and a status line for one long job."""

    def __init__(self, run_text: str, on_run, on_cancel) -> None:
        super().__init__()
        self.run_button = QPushButton(run_text)
        self.run_button.clicked.connect(on_run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(on_cancel)
        self.progress = QProgressBar()
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.details = ErrorDetails()
        self._runners = [self.run_button]
        self._buttons = QHBoxLayout()
        self._buttons.addWidget(self.run_button)
        self._buttons.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(self._buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.details)

    def add_run_button(self, text: str, on_click) -> QPushButton:
        """Another button that starts a job (placed first; disabled while one runs)."""
        button = QPushButton(text)
        button.clicked.connect(on_click)
        self._buttons.insertWidget(0, button)
        self._runners.append(button)
        return button

    def busy(self, on: bool, text: str | None = None) -> None:
        """Disable Run / enable Cancel while a job runs (and say what it does)."""
        for button in self._runners:
            button.setEnabled(not on)
        self.cancel_button.setEnabled(on)
        if on:
            self.details.clear()
        if text is not None:
            self.status.setText(text)

    def error(self, exc: Exception | str, *, mpp_known: bool | None = None) -> None:
        """Say what failed in user terms; an exception's technical side goes behind Details.

        ``mpp_known`` False: the job's slide has no µm per pixel (see :func:`explain`).
        """
        from html import escape

        if isinstance(exc, BaseException):
            user, detail = explain(exc, mpp_known=mpp_known)
        else:
            user, detail = str(exc), ""
        user = escape(breakable(user), quote=False)
        self.status.setText(f"<span style='color:#e05050'>{user}</span>")
        self.details.set_detail(detail)

    def finish(self, ok: bool) -> None:
        """End a job: Run enabled again; a bar left busy (a step without a count) stops.

        The bar then reads 1/1 after a job that finished, 0/1 after one that failed.
        """
        self.busy(False)
        if self.progress.maximum() == 0:
            self.progress.setRange(0, 1)
            self.progress.setValue(1 if ok else 0)
            self.progress.setFormat("%v/%m")

    def set_progress(self, done: int, total: int, fmt: str = "%v/%m") -> None:
        self.progress.setRange(0, total)
        self.progress.setValue(done)
        self.progress.setFormat(fmt)


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


def session_for(layer, slide):
    """The :class:`~histoscope.session.Session` of an image layer, made once and kept on it.

    Every panel working on the layer shares it, so the tissue mask, grids and
    feature tables are computed once. It keeps large products beside the slide
    (``<slide>.histoscope/``) when that folder can be written, else in memory.
    """
    from histoscope.session import Session, SessionError, open_session

    session = layer.metadata.get("histoscope_session")
    if isinstance(session, Session) and session.slide is slide:
        return session
    try:
        session = open_session(slide)
    except SessionError as exc:  # read-only, or a folder of other pixels: say so, keep working
        session = open_session(slide, in_memory=True)
        layer.metadata["histoscope_session_note"] = str(exc)
    layer.metadata["histoscope_session"] = session
    return session


def _same_colorbar_image(old, data, kwargs: dict, kind: str) -> bool:
    """Whether ``old`` is a plain (one-scale, not RGB) image with a colour bar that
    the new image's ``data``/``kwargs`` can be put into in place."""
    from napari.layers import Image

    if kind != "image" or not isinstance(old, Image) or old.rgb or old.multiscale:
        return False
    if kwargs.get("rgb") or kwargs.get("multiscale") or isinstance(data, list | tuple):
        return False
    had_bar = "colorbar" in old.metadata or old.colorbar.visible
    return had_bar and getattr(data, "ndim", None) == old.ndim


def _refill_image(layer, data, kwargs: dict):
    """Put a new image's data and settings into ``layer`` (the layer stays, see replace_layer)."""
    rest = {k: v for k, v in kwargs.items() if k not in ("name", "rgb", "multiscale", "data")}
    layer.metadata = dict(rest.pop("metadata", {}))
    clim = rest.pop("contrast_limits", None)
    layer.data = data
    for key, value in rest.items():
        setattr(layer, key, value)
    if clim is not None:
        layer.contrast_limits = clim
    else:
        layer.reset_contrast_limits()
    bar = layer.metadata.get("colorbar")
    layer.colorbar.visible = bool(bar) and bar.get("visible", True)
    return layer


class TaskWidget(Panel):
    """Base of the dock widgets that run registry tasks in a worker thread.

    Subclasses lay out their inputs in :meth:`~Panel.body_layout` (it scrolls
    vertically), add :attr:`controls` to it and
    call :meth:`run_tasks`; progress fills the bar, Cancel asks the running
    task to stop and keeps what it finished, errors land in the status line
    (never a crash), and :attr:`worker` is ``None`` again once it has finished.
    """

    cancel_text = "Cancelled."

    def __init__(self, viewer, run_text: str) -> None:
        import threading

        super().__init__()
        from histoscope._widgets._session import AutoSave

        self.viewer = viewer
        self.worker = None
        self._cancel = threading.Event()
        self.autosave = AutoSave.for_viewer(viewer)  # results and edits kept in the session
        self.controls = RunControls(run_text, self.run, self.cancel)
        self.run_button = self.controls.run_button
        self.cancel_button = self.controls.cancel_button
        self.progress = self.controls.progress
        self.status = self.controls.status

    def run(self):  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def chosen_slide(self, combo: RGBLayerCombo):
        """``(slide, layer)`` for the combo's layer; ValueError when there is none."""
        from histoscope.layers import layer_slide

        layer = combo.layer()
        if layer is None:
            raise ValueError("Open a slide or image first.")
        slide = layer.metadata.get("slide")
        if slide is None:  # plain RGB data: wrap it once, keep it with the layer
            slide = layer_slide(layer.data, layer.metadata, layer.scale, layer.name,
                                units=getattr(layer, "units", None))  # fmt: skip
            layer.metadata["slide"] = slide
        self._job_slide = slide  # its µm per pixel explains a failure (see _failed)
        return slide, layer

    def chosen_session(self, combo: RGBLayerCombo):
        """``(session, layer)`` for the combo's layer; ValueError when there is none."""
        slide, layer = self.chosen_slide(combo)
        return session_for(layer, slide), layer

    def view_centre(self, slide, layer) -> tuple[float, float]:
        """Level-0 ``(x, y)`` at the centre of the canvas (work there first)."""
        x, y, w, h = visible_region(self.viewer, slide, layer)
        return x + w / 2, y + h / 2

    def run_tasks(self, jobs, *, text: str, on_result, on_partial=None):
        """Run registry ``jobs`` (:class:`~histoscope._widgets._worker.Job`) in a worker.

        ``on_result(outcome)`` gets the :class:`~histoscope._widgets._worker.Outcome`
        (also after Cancel, with what was finished); ``on_partial(result)``
        gets the live result a task attaches to its progress steps.
        """
        from napari.qt.threading import create_worker

        from histoscope._widgets._worker import task_work

        self._cancel.clear()

        def step(value) -> None:
            if value.total == 0:  # a phase without a count: a busy bar that says what it is
                self.controls.set_progress(0, 0, value.what)
                self.status.setText(f"{value.what[:1].upper()}{value.what[1:]}…")
                return
            fmt = f"{value.what} %v/%m" if value.what else "%v/%m"
            self.controls.set_progress(value.done, value.total, fmt)
            if on_partial is not None and value.partial is not None:
                on_partial(value.partial)

        def returned(outcome) -> None:
            on_result(outcome)
            said = self.status.text()
            if outcome.cancelled and not said.startswith("Cancelled"):
                base = (
                    self.cancel_text
                    if outcome.results
                    else "Cancelled before anything was computed."
                )
                kept = "" if said.endswith("…") else said  # a progress line is not a result
                self.status.setText(f"{base} {kept}".strip())
            if self.autosave.save_now(wait=False):  # written in its thread, not on this one
                self._report_save(self.status.text())
            else:
                self._save_problems(
                    self.status.text(), [f"Session NOT saved: {self.autosave.error}"]
                )

        self.worker = create_worker(task_work, list(jobs), self._cancel, _start_thread=False,
                                    _connect={"yielded": step, "returned": returned,
                                              "errored": self._failed, "finished": self._done})  # fmt: skip
        self.controls.busy(True, text)
        self.worker.start()
        return self.worker

    def _report_save(self, said: str) -> None:
        """Once the session writer is done, add what it could not save to the status line."""
        try:
            if self.autosave.busy:  # the GUI thread never waits for the disk: look again soon
                QTimer.singleShot(100, lambda: self._report_save(said))
                return
            problems = [f"Session NOT saved: {self.autosave.error}"] if self.autosave.error else []
            self._save_problems(said, problems + list(self.autosave.notes))
        except RuntimeError:  # the panel (its status label) was closed meanwhile
            return

    def _save_problems(self, said: str, problems: list[str]) -> None:
        if problems and self.status.text() == said:  # not if the line moved on meanwhile
            note = " ".join(problems)
            self.status.setText(f"{said} <span style='color:#e0a030'>{note}</span>")

    def _toggle_click(self, on: bool) -> None:
        """Send canvas clicks to the panel's ``_on_click`` while ``on`` (a checkbox's toggle)."""
        callbacks = self.viewer.mouse_drag_callbacks
        if on and self._on_click not in callbacks:
            callbacks.append(self._on_click)
        elif not on and self._on_click in callbacks:
            callbacks.remove(self._on_click)

    def cancel(self) -> None:
        """Ask the running task to stop; it keeps what it has finished."""
        if self.worker is not None:
            self._cancel.set()
            self.status.setText("Cancelling…")

    def replace_layer(self, data, kwargs: dict, kind: str):
        """Add a layer, replacing one of the same name (a re-run).

        An image with a colour bar is updated in place instead: napari 0.9.2
        can crash (segfault in the vispy draw, Mesa llvmpipe) drawing a colour
        bar added after another one's layer was removed.
        """
        name = kwargs["name"]
        old = self.viewer.layers[name] if name in self.viewer.layers else None
        if old is not None and _same_colorbar_image(old, data, kwargs, kind):
            return _refill_image(old, data, kwargs)
        if old is not None:
            self.viewer.layers.remove(name)
        layer = getattr(self.viewer, f"add_{kind}")(data, **kwargs)
        bar = layer.metadata.get("colorbar")
        if bar and hasattr(layer, "colorbar"):  # what the colours mean, beside the map
            layer.colorbar.visible = bar.get("visible", True)
        return layer

    def _failed(self, exc: Exception) -> None:
        slide = getattr(self, "_job_slide", None)
        self._job_failed = True
        self.controls.error(exc, mpp_known=None if slide is None else bool(slide.mpp))

    def _done(self) -> None:
        self.controls.finish(not getattr(self, "_job_failed", False))
        self._job_failed = False
        self.worker = None


#: The panels' line for a slide outside the model's training data (issue 11).
OUTSIDE_TRAINING_TEXT = "Outside training data: treat calls as unreliable"


def show_training_data_flag(controls: RunControls, summary) -> QLabel:
    """Say under a panel's status line whether a result's slide is outside the training data.

    ``summary`` is a task result's ``summary()`` (its ``outside_training_data``
    and ``ood`` keys, see :mod:`histoscope.ood`). Outside: a red line
    :data:`OUTSIDE_TRAINING_TEXT`, with the score against the threshold in its
    tooltip; unknown (a cancelled run, too few items, a checkpoint without a
    reference): a neutral grey line "Training-data check not done: <reason>";
    within, or a result without the keys: the line is hidden. The line is
    created under ``controls.status`` on first use.
    """
    label = getattr(controls, "training_data_flag", None)
    if label is None:
        label = QLabel("")
        label.setWordWrap(True)
        layout = controls.layout()
        layout.insertWidget(layout.indexOf(controls.status) + 1, label)
        controls.training_data_flag = label
    ood = (summary or {}).get("ood") or {}
    score, thr = ood.get("score"), ood.get("threshold")
    tip = ood.get("message", "")
    if score is not None and thr is not None:
        tip = (f"Training-data distance {score:.3g} vs threshold {thr:.3g} "
               f"({ood.get('n_items', 0)} items; {ood.get('features', '')})")  # fmt: skip
    outside = (summary or {}).get("outside_training_data") is True
    unknown = bool(ood) and (summary or {}).get("outside_training_data") is None
    reason = str(ood.get("message") or "no reason given").removeprefix("not judged: ")
    if outside:
        label.setText(OUTSIDE_TRAINING_TEXT)
        label.setStyleSheet("color: #e04040; font-weight: bold;")
    else:
        label.setText(f"Training-data check not done: {reason}" if unknown else "")
        label.setStyleSheet("color: #909090;")
    label.setToolTip(tip)
    label.setVisible(outside or unknown)
    return label
