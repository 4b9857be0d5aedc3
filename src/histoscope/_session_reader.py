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
    from histoscope.session import SessionError, open_session
    from histoscope.session_store import read_manifest

    folder = Path(path if isinstance(path, str) else path[0])
    doc = read_manifest(folder)
    slide_path = Path(doc.get("slide", ""))
    if not slide_path.exists():
        raise SessionError(f"{folder}: the slide it was saved for, {slide_path}, is not there")
    session = open_session(slide_path, folder, mpp=doc.get("mpp"))
    data, kwargs, kind = slide_layer(session.slide)
    kwargs["metadata"]["histoscope_session"] = session
    display = session.slide_display()
    position = int(display.pop("position", 0))
    kwargs.update(display)
    layers = session.layers()
    layers.insert(min(max(position, 0), len(layers)), (data, kwargs, kind))
    return layers
