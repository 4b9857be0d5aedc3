"""napari reader contributions: whole-slide images and QuPath GeoJSON objects.

``get_reader`` and ``get_geojson_reader`` only look at the path (name, first
bytes); they never open the file fully and never raise. GeoJSON objects are
level-0 pixels: their layers take the µm/px of the open slide as ``scale``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from histoscope.slide import sniff_format


def get_reader(path: str | list[str]) -> Callable[[Any], list] | None:
    """Return :func:`read_slides` (or :func:`read_rasters` for HistoScope's own OME-Zarr
    results) if HistoScope can read ``path``, else ``None``."""
    try:
        paths = [path] if isinstance(path, str) else list(path)
        if paths and all(is_result_raster(p) for p in paths):
            return read_rasters
        if not paths or any(sniff_format(p) is None for p in paths):
            return None
    except Exception:
        return None
    return read_slides


def is_result_raster(path: str) -> bool:
    """An OME-Zarr folder HistoScope wrote for a result (its attributes say so); cheap."""
    attrs = Path(path) / ".zattrs"
    if not attrs.is_file() or attrs.stat().st_size > 1 << 20:
        return False
    text = attrs.read_text(encoding="utf-8", errors="replace")
    return '"histoscope"' in text and '"multiscales"' in text


def read_rasters(path: str | list[str]) -> list:
    """Result rasters (heatmaps, masks) placed in µm exactly where their layer was drawn."""
    import json

    from histoscope.export.omezarr import read_ome_zarr
    from histoscope.results import fading_colormap

    out = []
    for p in [path] if isinstance(path, str) else list(path):
        levels, scale, translate = read_ome_zarr(p)
        meta = json.loads((Path(p) / ".zattrs").read_text(encoding="utf-8")).get("histoscope", {})
        name = meta.get("name") or Path(p).name.removesuffix(".ome.zarr")
        kw = {"name": name, "scale": tuple(scale), "translate": tuple(translate),
              "units": ("um", "um"), "metadata": {"histoscope": meta.get("provenance", meta)}}  # fmt: skip
        data = levels if len(levels) > 1 else levels[0]
        if len(levels) > 1:
            kw["multiscale"] = True
        if np.issubdtype(levels[0].dtype, np.integer):
            out.append((data, {**kw, "opacity": 0.4}, "labels"))
        else:
            finite = levels[0][np.isfinite(levels[0])]
            hi = float(finite.max()) if finite.size else 1.0
            kw.update(colormap=fading_colormap("inferno"), opacity=0.9,
                      contrast_limits=(0.0, 1.0) if hi <= 1 else (0.0, hi))  # fmt: skip
            out.append((data, kw, "image"))
    return out


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


# ---------------------------------------------------------------- QuPath GeoJSON
#: Beyond this many polygons, annotations load as centroid points (napari shapes stall).
MAX_SHAPES = 20_000
_GEOJSON_SUFFIXES = (".geojson", ".geojson.gz")
_POINT_SIZE_PX = 12.0
_DEFAULT_RGBA = (1.0, 0.85, 0.0, 1.0)


def _sniffs_as_geojson(path: str) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(4096)
    if head[:2] == b"\x1f\x8b":
        import gzip

        with gzip.open(path, "rb") as fh:
            head = fh.read(4096)
    text = head.decode("utf-8", "ignore").lstrip()
    keys = ('"Feature', '"geometry"', '"coordinates"')
    return text[:1] in ("[", "{") and '"type"' in text and any(k in text for k in keys)


def get_geojson_reader(path: str | list[str]) -> Callable[[Any], list] | None:
    """Return :func:`read_geojson_layers` for ``.geojson(.gz)`` files, and ``.json`` that sniff as GeoJSON."""
    try:
        paths = [path] if isinstance(path, str) else list(path)
        if not paths:
            return None
        for p in paths:
            name = str(p).lower()
            if name.endswith(_GEOJSON_SUFFIXES):
                continue
            if not (
                (name.endswith(".json") or name.endswith(".json.gz")) and _sniffs_as_geojson(p)
            ):
                return None
    except Exception:
        return None
    return read_geojson_layers


def viewer_slide_mpp() -> float | None:
    """µm/px of the current viewer's active (else first) slide layer, if any states it."""
    try:
        import napari

        viewer = napari.current_viewer()
    except Exception:
        return None
    if viewer is None:
        return None
    from histoscope.layers import SLIDE_KEY, layer_mpp
    from histoscope.slide import Slide

    active = viewer.layers.selection.active
    for layer in [active, *viewer.layers] if active is not None else list(viewer.layers):
        meta = layer.metadata
        slide = meta.get("slide")
        if SLIDE_KEY not in meta and not isinstance(slide, Slide):
            continue
        mpp = slide.mpp if isinstance(slide, Slide) and slide.mpp else None
        mpp = mpp or layer_mpp(layer.scale, getattr(layer, "units", None), meta)
        if mpp:
            return float(mpp)
    return None


def _rgba(colors) -> np.ndarray:
    """RGBA rows for ``(r, g, b)`` colours (0-255); the default where there is none."""
    import pandas as pd

    colors = [tuple(c) if isinstance(c, list | np.ndarray) else c for c in colors]
    codes, uniques = pd.factorize(pd.Series(colors, dtype=object))  # a few classes
    palette = np.tile(np.asarray(_DEFAULT_RGBA), (len(uniques) + 1, 1))
    for i, c in enumerate(uniques):
        palette[i, :3] = np.asarray(c[:3], dtype=float) / 255.0
    return palette[codes]  # code -1 (no colour) takes the last row: the default


def _features(table) -> Any:
    """Layer features: id, object type, name, class, then the measurements."""
    import pandas as pd

    from histoscope.export.geojson import BASE_COLUMNS

    meas = [c for c in table.columns if c not in BASE_COLUMNS]
    feats = pd.DataFrame(
        {
            "id": table["id"].to_numpy(object),
            "object_type": table["object_type"].to_numpy(object),
            "name": table["name"].fillna("").to_numpy(object),
            "class": table["classification"].fillna("").to_numpy(object),
        }
    )
    for c in meas:
        feats[c] = table[c].to_numpy(float)
    return feats


def _shape_parts(table) -> tuple[list, list, list]:
    """(vertices (y, x) px, napari shape type, row) for each polygon part or line of ``table``."""
    import shapely

    data, kinds, rows = [], [], []
    for row, geom in enumerate(table["geometry"]):
        for part in shapely.get_parts(geom):
            if part.geom_type == "Polygon":
                xy, kind = np.asarray(part.exterior.coords)[:-1], "polygon"
            else:
                xy, kind = np.asarray(part.coords), "path"
            data.append(xy[:, ::-1].copy())
            kinds.append(kind)
            rows.append(row)
    return data, kinds, rows


def geojson_layers(
    table, name: str, mpp: float | None, max_shapes: int | None = None, path: str | None = None
) -> tuple[list, list[str]]:
    """Layer data tuples (annotations as Shapes, the rest as Points) and notes for the user.

    Coordinates stay level-0 pixels; the layer ``scale`` is ``mpp`` (µm/px)
    so the objects line up with their slide, or 1 in pixels when unknown.
    """
    import shapely

    max_shapes = MAX_SHAPES if max_shapes is None else max_shapes
    scale, units = ((mpp, mpp), ("um", "um")) if mpp else ((1.0, 1.0), ("pixel", "pixel"))
    common = {"scale": scale, "units": units}
    kinds = shapely.get_type_id(table["geometry"].to_numpy())
    outline = np.isin(kinds, (1, 3, 5, 6)) & (table["object_type"] == "annotation").to_numpy()
    notes, layers = [], []
    if outline.sum() > max_shapes:
        notes.append(f"{name}: {int(outline.sum()):,} annotation outlines are more than napari "
                     f"draws smoothly ({max_shapes:,}); they load as centroid points.")  # fmt: skip
        outline[:] = False
    if outline.any():
        shapes = table[outline].reset_index(drop=True)
        data, shape_type, rows = _shape_parts(shapes)
        feats = _features(shapes)
        # napari draws outer outlines only: keep what it cannot draw (holes, several parts),
        # so saving the layer writes the object back whole while its outline is unchanged
        geoms = shapes["geometry"].to_numpy()
        whole = (shapely.get_num_interior_rings(geoms) > 0) | (
            shapely.get_num_geometries(geoms) > 1
        )
        feats["source_wkt"] = np.where(whole, shapely.to_wkt(geoms), "")
        if whole.any():
            notes.append(f"{name}: {int(whole.sum())} annotation(s) have holes or several parts; "
                         "napari draws their outer outlines, and saving writes them back whole "
                         "while those outlines are not edited.")  # fmt: skip
        feats = feats.iloc[rows].reset_index(drop=True)
        face = _rgba(shapes["color"].tolist())[rows]
        edge, face[:, 3] = face.copy(), 0.25
        kw = {"name": f"{name} annotations", "shape_type": shape_type, "features": feats,
              "face_color": face, "edge_color": edge, "edge_width": 2.0 / scale[0], **common}  # fmt: skip
        layers.append((data, kw, "shapes"))
    if (~outline).any():
        pts = table[~outline].reset_index(drop=True)
        kw = {"name": f"{name} objects", "features": _features(pts), "size": _POINT_SIZE_PX,
              "face_color": _rgba(pts["color"].tolist()), "border_width": 0, **common}  # fmt: skip
        layers.append((np.column_stack([pts["y"], pts["x"]]), kw, "points"))
    for _, kw, _ in layers:
        kw["metadata"] = {"histoscope_geojson": {"mpp": mpp, "path": path}}
    return layers, notes


def read_geojson_layers(path: str | list[str]) -> list:
    """napari reader: QuPath GeoJSON objects placed over the open slide (µm) or in pixels."""
    from napari.utils.notifications import show_info

    from histoscope.export.geojson import read_geojson

    paths = [path] if isinstance(path, str) else list(path)
    mpp = viewer_slide_mpp()
    if mpp is None:
        show_info("GeoJSON objects are in level-0 pixels: no slide with a known µm/px is open. "
                  "Open the slide first, or set the layer's µm/px with the Slide panel's "
                  "'Set µm/px'.")  # fmt: skip
    out = []
    for p in paths:
        stem = Path(p).name.split(".")[0]
        table = read_geojson(p, geometry="centroid")  # no polygon built for cells
        layers, notes = geojson_layers(table, stem, mpp, path=str(p))
        for note in notes:
            show_info(note)
        out.extend(layers)
    return out


# ----------------------------------------------------- outlines in view, on request
#: Most outlines drawn for one view; more objects centred in it are left out, with a message.
MAX_OUTLINES = 5_000
GEOJSON_KEY = "histoscope_geojson"


def _geojson_source(viewer) -> Any:
    """The active layer if it came from a GeoJSON file, else the topmost visible one that did."""
    active = viewer.layers.selection.active
    candidates = [active] if active is not None else []
    candidates += [ly for ly in reversed(viewer.layers) if ly.visible]
    for layer in candidates:
        meta = layer.metadata.get(GEOJSON_KEY) or {}
        if meta.get("path") and type(layer).__name__ == "Points":
            return layer
    return None


def view_bbox(viewer, layer) -> tuple[float, float, float, float]:
    """``(x0, y0, x1, y1)`` of the canvas in ``layer``'s data coordinates (level-0 px)."""
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    cy, cx = camera.center[-2:]
    ch, cw = viewer.canvas.size
    zoom = camera.zoom
    corners = [(cy - ch / 2 / zoom, cx - cw / 2 / zoom), (cy + ch / 2 / zoom, cx + cw / 2 / zoom)]
    (y0, x0), (y1, x1) = (np.asarray(layer.world_to_data(c))[-2:] for c in corners)
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


def outline_layer(table, points) -> tuple:
    """A Shapes layer tuple of ``table``'s outlines placed exactly as the ``points`` layer."""
    data, shape_type, rows = _shape_parts(table)
    feats = _features(table).iloc[rows].reset_index(drop=True)
    edge = _rgba(table["color"].tolist())[rows]
    face = edge.copy()
    face[:, 3] = 0.0
    meta = dict(points.metadata.get(GEOJSON_KEY) or {})
    kw = {"name": f"{points.name} outlines", "shape_type": shape_type, "features": feats,
          "face_color": face, "edge_color": edge, "edge_width": 1.5 / float(points.scale[-1]),
          "scale": tuple(points.scale), "translate": tuple(points.translate),
          "units": tuple(str(u) for u in points.units),
          "metadata": {GEOJSON_KEY: {**meta, "outlines_of": points.name}}}  # fmt: skip
    return data, kw, "shapes"
