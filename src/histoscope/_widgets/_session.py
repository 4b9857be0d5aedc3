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


#: Metadata key recording which slide a layer was made over (its session).
SLIDE_TAG = "histoscope_slide_path"


def slide_layers(viewer) -> list:
    """Layers showing slide files HistoScope opened, in viewer order."""
    from histoscope.layers import SLIDE_KEY
    from histoscope.slide import Slide

    return [ly for ly in viewer.layers
            if SLIDE_KEY in ly.metadata and isinstance(ly.metadata.get("slide"), Slide)
            and ly.metadata["slide"].path.exists()]  # fmt: skip


def owner(layer) -> str | None:
    """The slide path a layer belongs to: its provenance, else the slide it was made over."""
    prov = layer.metadata.get("histoscope")
    if isinstance(prov, dict) and prov.get("slide"):
        return str(prov["slide"])
    tag = layer.metadata.get(SLIDE_TAG)
    return str(tag) if tag else None


def viewer_state(viewer, slide_layer) -> tuple[list, dict]:
    """``(layers, slide display)``: the layers that belong to ``slide_layer``, in viewer order."""
    from histoscope.layers import SLIDE_KEY

    path = str(slide_layer.metadata["slide"].path)
    layers = [ly.as_layer_data_tuple() for ly in viewer.layers
              if SLIDE_KEY not in ly.metadata and owner(ly) == path]  # fmt: skip
    display = {k: getattr(slide_layer, k) for k in ("opacity", "visible", "gamma", "blending")}
    display["contrast_limits"] = list(slide_layer.contrast_limits)
    display["position"] = list(viewer.layers).index(slide_layer)
    return layers, display


def save_viewer_session(viewer) -> list[str]:
    """Save each slide's layers into its own session folder; returns notes on what was not saved.

    A session folder that already holds layers this viewer did not open from
    it is left alone (saving would replace them), and so is a session kept in
    memory (its folder cannot be written).
    """
    from histoscope._widgets._common import session_for
    from histoscope.session_store import read_manifest

    notes = []
    for slide_layer in slide_layers(viewer):
        session = session_for(slide_layer, slide_layer.metadata["slide"])
        if session.folder is None:
            reason = slide_layer.metadata.get("histoscope_session_note") or "it is kept in memory"
            notes.append(f"{slide_layer.name}: session not saved ({reason})")
            continue
        saved = read_manifest(session.folder).get("layers") or []
        if saved and not getattr(session, "layers_shown", False):
            notes.append(f"{slide_layer.name}: its session folder holds {len(saved)} saved "
                         f"layer(s) not shown here; open {session.folder} to continue it "
                         "(nothing was overwritten)")  # fmt: skip
            continue
        layers, display = viewer_state(viewer, slide_layer)
        session.save_layers(layers, display)
        session.layers_shown = True
        skipped = read_manifest(session.folder).get("not_saved") or []
        notes += [f"{name}: not saved ({why})" for name, why in skipped]
    return notes


class AutoSave:
    """Saves the viewer's sessions shortly after each change (one per viewer).

    New layers are tagged with the slide they were made over (when one slide
    is open), so each goes to that slide's session.
    """

    def __init__(self, viewer) -> None:
        self.viewer = viewer
        self.error: Exception | None = None
        self.notes: list[str] = []
        self.timer = QTimer()
        self.timer.setSingleShot(True)
        self.timer.setInterval(DELAY_MS)
        self.timer.timeout.connect(self.save_now)
        for event in ("inserted", "removed", "moved"):
            getattr(viewer.layers.events, event).connect(self._layers_changed)
        self._watch()

    @classmethod
    def for_viewer(cls, viewer) -> AutoSave:
        """The viewer's AutoSave, made on first use."""
        saver = getattr(viewer, "_histoscope_autosave", None)
        if saver is None:
            saver = cls(viewer)
            viewer._histoscope_autosave = saver
        return saver

    def _watch(self) -> None:
        slides = slide_layers(self.viewer)
        active = self.viewer.layers.selection.active
        current = active if active in slides else (slides[0] if len(slides) == 1 else None)
        for layer in self.viewer.layers:
            if layer not in slides and owner(layer) is None and current is not None:
                layer.metadata[SLIDE_TAG] = str(current.metadata["slide"].path)
            for name in EVENTS:
                emitter = getattr(layer.events, name, None)
                if emitter is not None:
                    emitter.connect(self.schedule)  # connecting twice is a no-op

    def _layers_changed(self, *_: object) -> None:
        self._watch()
        self.schedule()

    def schedule(self, *_: object) -> None:
        """Save after a short quiet period (edits come in bursts)."""
        self.timer.start()

    def save_now(self) -> bool:
        """Save at once; True when saved. Errors are kept (panels show them), never raised."""
        self.timer.stop()
        try:
            self.notes = save_viewer_session(self.viewer)
        except Exception as exc:  # a full disk must not take the viewer down
            self.error = exc
            return False
        self.error = None
        return True
