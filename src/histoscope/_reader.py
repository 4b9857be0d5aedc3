"""napari reader contribution: whole-slide images as multiscale RGB layers.

``get_reader`` only looks at the path (name, first bytes); it never opens the
slide and never raises.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from histoscope.slide import sniff_format


def get_reader(path: str | list[str]) -> Callable[[Any], list] | None:
    """Return :func:`read_slides` if HistoScope can read ``path``, else ``None``."""
    try:
        paths = [path] if isinstance(path, str) else list(path)
        if not paths or any(sniff_format(p) is None for p in paths):
            return None
    except Exception:
        return None
    return read_slides


def _notify_once(text: str) -> None:
    from napari.utils.notifications import show_warning

    show_warning(text)


def read_slides(path: str | list[str]) -> list:
    """Open each path as a slide layer; corrupt tiles show blank with one warning."""
    from histoscope.layers import slide_layer
    from histoscope.slide import open_slide

    paths = [path] if isinstance(path, str) else list(path)
    return [
        slide_layer(open_slide(p, on_tile_error="blank", on_warning=_notify_once)) for p in paths
    ]
