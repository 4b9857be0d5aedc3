"""napari command: outlines of the QuPath GeoJSON objects in the current view.

Contributed in the layer context menu of Points layers opened from a GeoJSON
file (``histoscope._reader`` puts the file's path in the layer's metadata).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from histoscope._reader import GEOJSON_KEY, MAX_OUTLINES, _geojson_source, outline_layer, view_bbox

if TYPE_CHECKING:  # napari resolves the name when it runs the menu command
    from napari.viewer import Viewer

__all__ = ["show_outlines_in_view"]


def show_outlines_in_view(viewer: Viewer, limit: int | None = None):
    """napari command: outlines of the GeoJSON objects centred in the current view.

    Reads the file recorded on the active (else topmost visible) GeoJSON Points
    layer in a worker thread (a centroid scan of the whole file; polygons built
    only for objects whose centroid is in view, at most ``limit`` of them,
    :data:`MAX_OUTLINES` by default) and adds, or replaces, the Shapes layer
    ``"<points layer> outlines"`` with the same scale and translation, so the
    outlines lie exactly over the slide. Only objects the Points layer still
    holds are drawn: their ``id`` is in the layer's ``id`` feature (points the
    user deleted are left out) and their ``object_type`` is one the layer
    holds (annotations, which the reader puts in a Shapes layer, are not
    drawn again). When the file gives no ids every object of those types
    centred in view is drawn, and the message says so. Returns the worker
    (``None`` when there is nothing to read).
    """
    from napari.qt.threading import create_worker
    from napari.utils.notifications import show_info, show_warning

    from histoscope.export.geojson import read_geojson

    points = _geojson_source(viewer)
    if points is None:
        show_info("Show outlines in view: select a Points layer opened from a QuPath GeoJSON file.")
        return None
    path = points.metadata[GEOJSON_KEY]["path"]
    if not Path(path).is_file():
        show_warning(f"Show outlines in view: {path}, the file {points.name!r} was read from, "
                     "is not there any more.")  # fmt: skip
        return None
    limit = MAX_OUTLINES if limit is None else int(limit)
    box = view_bbox(viewer, points)
    ids, kinds = _held(points)

    def done(table) -> None:
        matched = int(table.attrs.get("matched", len(table)))
        kind = table["object_type"]
        keep = table["geometry"].notna() & (kind.isin(kinds) if kinds else kind.ne("annotation"))
        if ids is not None:
            keep &= table["id"].isin(ids)
        table = table[keep].reset_index(drop=True)
        name = f"{points.name} outlines"
        if name in viewer.layers:
            viewer.layers.remove(name)
        if len(table):
            data, kw, _ = outline_layer(table, points)
            viewer.add_shapes(data, **kw)
        note = f"{len(table):,} outlines from {Path(path).name} in view"
        if ids is None:
            note += (f" ({Path(path).name} gives its objects no ids: objects deleted from "
                     f"{points.name!r} are drawn too)")  # fmt: skip
        if matched > len(table):
            note += (f"; {matched:,} objects are centred in view, only the first {limit:,} are "
                     "drawn: zoom in and ask again for the rest")  # fmt: skip
        show_info(note + ".")

    def failed(exc) -> None:
        show_warning(f"Show outlines in view: {exc}")

    worker = create_worker(read_geojson, path, on_error="skip", bbox=box, limit=limit,
                           _connect={"returned": done, "errored": failed},
                           _start_thread=False)  # fmt: skip
    worker.start()
    return worker


def _held(points) -> tuple[set | None, set]:
    """``(ids, object types)`` the Points layer holds.

    ids are ``None`` when the file gave its objects none; no object types
    (a layer without that feature) means any type but annotations.
    """
    feats = points.features
    if len(feats) == 0:
        return set(), set()  # every point deleted: nothing to draw
    kinds = set(feats["object_type"].dropna()) if "object_type" in feats else set()
    held = {i for i in feats["id"] if isinstance(i, str) and i} if "id" in feats else set()
    return held or None, kinds
