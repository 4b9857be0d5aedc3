"""napari reader contribution: a session folder (``<slide>.histoscope/``) reopens its work.

``get_session_reader`` only checks for the folder's manifest; it never raises.
The slide is opened from the path the manifest records, its content is
checked against the saved fingerprint, and every saved layer is returned in
the order it was shown, with its display settings.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def get_session_reader(path: str | list[str]) -> Callable[[Any], list] | None:
    """Return :func:`read_session` for a session folder, else ``None``."""
    try:
        p = Path(path if isinstance(path, str) else path[0])
        if isinstance(path, list) and len(path) != 1:
            return None
        return read_session if (p / "session.json").is_file() else None
    except Exception:
        return None


def read_session(path: str | list[str]) -> list:
    """The slide layer (with its saved display) and every saved layer, in order.

    Raises
    ------
    SessionError
        If the slide the manifest names is missing or its pixels differ.
    """
    from histoscope.layers import slide_layer
    from histoscope.session import FOLDER_SUFFIX, SessionError, open_session
    from histoscope.session_store import read_manifest

    folder = Path(path if isinstance(path, str) else path[0])
    doc = read_manifest(folder)
    slide_path = Path(doc.get("slide", ""))
    beside = folder.with_name(folder.name.removesuffix(FOLDER_SUFFIX))
    if not slide_path.exists() and beside.exists():
        slide_path = beside  # folder and slide moved together; the fingerprint still decides
    if not slide_path.exists():
        raise SessionError(f"{folder}: the slide it was saved for, {slide_path}, is not there "
                           f"(nor beside the folder)")  # fmt: skip
    session = open_session(slide_path, folder, mpp=doc.get("mpp"))
    session.layers_shown = True  # this viewer continues the session: later saves replace it
    data, kwargs, kind = slide_layer(session.slide)
    kwargs["metadata"]["histoscope_session"] = session
    display = session.slide_display()
    position = int(display.pop("position", 0))
    kwargs.update(display)
    from histoscope.session_store import load_layers

    saved, layers = load_layers(folder)
    layers = [_tissue_display(layer) for layer in layers]
    layers.insert(min(max(position, 0), len(layers)), (data, kwargs, kind))
    _keep_saving(saved.get("unreadable") or [])
    return layers


def _tissue_display(layer: tuple) -> tuple:
    """A saved tissue mask drawn as when it was made (its colours and outline are not saved)."""
    data, kwargs, kind = layer
    if kind != "labels" or (kwargs.get("metadata") or {}).get("histoscope_task") != "tissue":
        return layer
    from histoscope.tasks.tissue import tissue_display

    return data, tissue_display(kwargs), kind


def _outline_inserted(event) -> None:
    """A tissue layer asking for its outline gets it once it is in the viewer."""
    from histoscope.tasks.tissue import outline_tissue_layer

    outline_tissue_layer(event.value)


def _keep_saving(unreadable: list[str]) -> None:
    """Edits in the reopened viewer are saved as in any other; unreadable layers are named."""
    try:
        import napari

        viewer = napari.current_viewer()
    except Exception:  # no napari viewer (a script): nothing to keep saving
        return
    if viewer is None:
        return
    viewer.layers.events.inserted.connect(_outline_inserted)  # the same callback connects once
    from histoscope._widgets._session import AutoSave

    AutoSave.for_viewer(viewer)
    if unreadable:
        from napari.utils.notifications import show_warning

        show_warning("Some saved layers could not be read: " + "; ".join(unreadable))
