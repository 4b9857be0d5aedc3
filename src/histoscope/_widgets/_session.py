"""Keep the viewer's HistoScope work in the slide's session folder, saved as it changes.

:class:`AutoSave` (one per viewer) saves every layer shown over the slide, with
its display settings, into the slide's session folder a moment after anything
changes: a result arriving, a layer added, removed, moved or edited, its
opacity, colour map, contrast or visibility changed. Reopening the folder
(``viewer.open("case.svs.histoscope")``) restores the slide and the layers
exactly, in order.
"""

from __future__ import annotations

from qtpy.QtCore import QTimer

#: Layer events that change what a saved session would hold.
EVENTS = ("data", "opacity", "visible", "colormap", "contrast_limits", "gamma", "blending",
          "name", "scale", "translate", "features", "face_color", "border_color")  # fmt: skip
DELAY_MS = 1000


def slide_layer_of(viewer):
    """The first layer showing a slide file HistoScope opened, or ``None``."""
    from histoscope.layers import SLIDE_KEY
    from histoscope.slide import Slide

    for layer in viewer.layers:
        slide = layer.metadata.get("slide")
        if SLIDE_KEY in layer.metadata and isinstance(slide, Slide) and slide.path.exists():
            return layer
    return None


def viewer_state(viewer, slide_layer) -> tuple[list, dict]:
    """``(layers, slide display)``: every other layer as layer data, in viewer order."""
    from histoscope.layers import SLIDE_KEY

    layers = [ly.as_layer_data_tuple() for ly in viewer.layers
              if ly is not slide_layer and SLIDE_KEY not in ly.metadata]  # fmt: skip
    display = {k: getattr(slide_layer, k) for k in ("opacity", "visible", "gamma", "blending")}
    display["contrast_limits"] = list(slide_layer.contrast_limits)
    display["position"] = list(viewer.layers).index(slide_layer)
    return layers, display


def save_viewer_session(viewer):
    """Save the viewer's layers into its slide's session folder; returns the manifest or None."""
    from histoscope._widgets._common import session_for

    slide_layer = slide_layer_of(viewer)
    if slide_layer is None:
        return None
    session = session_for(slide_layer, slide_layer.metadata["slide"])
    if session.folder is None:
        return None
    layers, display = viewer_state(viewer, slide_layer)
    return session.save_layers(layers, display)


class AutoSave:
    """Saves the viewer's session shortly after each change (one per viewer)."""

    def __init__(self, viewer) -> None:
        self.viewer = viewer
        self.error: Exception | None = None
        self.timer = QTimer()
        self.timer.setSingleShot(True)
        self.timer.setInterval(DELAY_MS)
        self.timer.timeout.connect(self.save_now)
        for event in ("inserted", "removed", "moved"):
            getattr(viewer.layers.events, event).connect(self._layers_changed)
        self._layers_changed()

    @classmethod
    def for_viewer(cls, viewer) -> AutoSave:
        """The viewer's AutoSave, made on first use."""
        saver = getattr(viewer, "_histoscope_autosave", None)
        if saver is None:
            saver = cls(viewer)
            viewer._histoscope_autosave = saver
        return saver

    def _layers_changed(self, *_: object) -> None:
        for layer in self.viewer.layers:
            for name in EVENTS:
                emitter = getattr(layer.events, name, None)
                if emitter is not None:
                    emitter.connect(self.schedule)  # connecting twice is a no-op
        self.schedule()

    def schedule(self, *_: object) -> None:
        """Save after a short quiet period (edits come in bursts)."""
        self.timer.start()

    def save_now(self):
        """Save at once; an error is kept (and shown by the panels), never raised into Qt."""
        self.timer.stop()
        try:
            path = save_viewer_session(self.viewer)
        except Exception as exc:  # a full disk must not take the viewer down
            self.error = exc
            return None
        self.error = None
        return path
