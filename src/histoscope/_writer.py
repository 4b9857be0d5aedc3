"""napari writer contributions: Points, Shapes and Labels as QuPath GeoJSON; Points as CSV.

npe2 hands writers ``(path, data, attributes)`` (or a list of such layer
tuples), never the layer. Coordinates leave in level-0 pixels of the slide
under them: layer data -> world (``data * scale + translate``) -> divided by
the slide's µm/px (see :func:`slide_mpp`). Rotation, shear and affine
transforms of the layer are not applied.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_RESERVED = {"id", "object_type", "name", "class", "classification", "index", "source_wkt"}


def slide_mpp(attributes: dict[str, Any]) -> float:
    """µm/px that turns this layer's world coordinates into level-0 pixels.

    In order: the slide or µm/px in the layer's metadata; for a layer in
    length units, the open viewer's slide; the layer's own scale
    (:func:`histoscope.layers.layer_mpp`); else 1 (world is already pixels).
    """
    from histoscope._reader import viewer_slide_mpp
    from histoscope.layers import SLIDE_KEY, _um_per_unit, layer_mpp
    from histoscope.slide import Slide

    meta = attributes.get("metadata") or {}
    slide = meta.get("slide")
    candidates = [
        slide.mpp if isinstance(slide, Slide) else None,
        (meta.get(SLIDE_KEY) or {}).get("mpp"),
        (meta.get("histoscope_geojson") or {}).get("mpp"),
        meta.get("slide_mpp"),
    ]
    for mpp in candidates:
        if isinstance(mpp, int | float) and np.isfinite(mpp) and mpp > 0:
            return float(mpp)
    units = attributes.get("units")
    mpp = viewer_slide_mpp()
    if mpp:  # world coordinates over an open slide are in its µm, whatever the layer's units say
        per_unit = _um_per_unit(units[-1]) if units is not None and len(units) else None
        return mpp / (per_unit or 1.0)
    return layer_mpp(attributes.get("scale"), units, meta) or 1.0


def level0_xy(coords: np.ndarray, attributes: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` level-0 pixels of layer data coordinates (last two axes are y, x)."""
    coords = np.asarray(coords, dtype=float).reshape(-1, np.shape(coords)[-1])[:, -2:]
    scale = np.asarray(attributes.get("scale", (1.0, 1.0)), dtype=float)[-2:]
    translate = np.asarray(attributes.get("translate", (0.0, 0.0)), dtype=float)[-2:]
    px = (coords * scale + translate) / slide_mpp(attributes)
    return px[:, 1], px[:, 0]


def _object_table(geoms, attributes: dict[str, Any], object_type: str, colors=None):
    """A :func:`write_geojson` table: geometry plus what the layer's features say."""
    import pandas as pd

    n = len(geoms)
    feats = attributes.get("features")
    if not isinstance(feats, pd.DataFrame) or len(feats) != n:
        feats = pd.DataFrame(index=range(n))
    feats = feats.reset_index(drop=True)
    table = pd.DataFrame({"geometry": np.asarray(geoms, dtype=object)})
    table["object_type"] = feats["object_type"] if "object_type" in feats else object_type
    for col in ("id", "name"):
        if col in feats:
            table[col] = feats[col].astype(object).where(feats[col].astype(str) != "", None)
    cls = next((c for c in ("class", "classification") if c in feats), None)
    if cls is not None:
        names = feats[cls].astype(object)
        table["classification"] = names.where(names.notna() & (names.astype(str) != ""), None)
        if colors is not None and len(colors) == n:
            rgb = np.clip(np.round(np.asarray(colors, dtype=float)[:, :3] * 255), 0, 255).astype(
                int
            )
            table["color"] = [tuple(c) for c in rgb.tolist()]
    for col in feats.columns:
        if col not in _RESERVED and pd.api.types.is_numeric_dtype(feats[col]):
            if not pd.api.types.is_bool_dtype(feats[col]):
                table[col] = feats[col].to_numpy(dtype=float)
    return table


def points_table(data, attributes: dict[str, Any]):
    """Points as point detections (level-0 px), with classes and measurements from features."""
    import shapely

    x, y = level0_xy(np.asarray(data), attributes)
    return _object_table(
        shapely.points(x, y), attributes, "detection", attributes.get("face_color")
    )


def _ellipse(verts: np.ndarray, n: int = 64) -> np.ndarray:
    """napari stores an ellipse as its 4 bounding-box corners; sample its outline."""
    centre = verts.mean(axis=0)
    a, b = (verts[1] - verts[0]) / 2, (verts[3] - verts[0]) / 2
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)[:, None]
    return centre + np.cos(t) * a + np.sin(t) * b


def shapes_table(data, attributes: dict[str, Any]):
    """Shapes as annotations: polygons, rectangles, ellipses -> Polygon; lines, paths -> LineString."""
    import shapely

    kinds = attributes.get("shape_type") or ["polygon"] * len(data)
    geoms = []
    for verts, kind in zip(data, kinds, strict=True):
        verts = np.asarray(verts, dtype=float)
        if kind == "ellipse":
            verts = _ellipse(verts[:, -2:])
        x, y = level0_xy(verts, attributes)
        if kind in ("line", "path"):
            geoms.append(shapely.LineString(np.column_stack([x, y])))
        else:
            geoms.append(shapely.Polygon(np.column_stack([x, y])))
    geoms, keep = _whole_objects(geoms, attributes.get("features"))
    attrs = dict(attributes)
    if keep is not None:
        attrs["features"] = attributes["features"].iloc[keep].reset_index(drop=True)
        if attrs.get("edge_color") is not None and len(attrs["edge_color"]) == len(data):
            attrs["edge_color"] = np.asarray(attrs["edge_color"])[keep]
    return _object_table(geoms, attrs, "annotation", attrs.get("edge_color"))


def _whole_objects(geoms: list, feats) -> tuple[list, list[int] | None]:
    """Shapes sharing an object id become that object again (one row, one id).

    When the outlines still match the object read from the file (``source_wkt``),
    the original geometry is written, holes included; otherwise the parts are
    joined into a MultiPolygon.
    """
    import pandas as pd
    import shapely

    if not isinstance(feats, pd.DataFrame) or "id" not in feats or len(feats) != len(geoms):
        return geoms, None
    ids = feats["id"].astype(str).tolist()
    src = feats["source_wkt"].astype(str).tolist() if "source_wkt" in feats else [""] * len(ids)
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(ids):
        groups.setdefault(key if key not in ("", "None", "nan") else f"#{i}", []).append(i)
    out, keep = [], []
    for members in groups.values():
        parts = [geoms[i] for i in members]
        joined = (
            parts[0]
            if len(parts) == 1
            else shapely.MultiPolygon(parts)
            if all(p.geom_type == "Polygon" for p in parts)
            else shapely.GeometryCollection(parts)
        )
        original = src[members[0]]
        if original:
            orig = shapely.from_wkt(original)
            outer = shapely.MultiPolygon(
                [shapely.Polygon(p.exterior) for p in shapely.get_parts(orig)]
            )
            mine = shapely.MultiPolygon(
                [shapely.Polygon(p.exterior) for p in shapely.get_parts(joined)]
            )
            if shapely.equals_exact(outer.normalize(), mine.normalize(), tolerance=1e-3):
                joined = orig
        out.append(joined)
        keep.append(members[0])
    return out, keep


def label_polygons(labels: np.ndarray) -> list[tuple[int, Any]]:
    """``(label, polygon)`` per label, outlines through pixel-edge midpoints (data px, x=col)."""
    import shapely
    from scipy import ndimage
    from skimage import measure

    out = []
    for value, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        mask = np.pad(labels[box] == value, 1).astype(np.uint8)
        offset = np.array([box[1].start - 1, box[0].start - 1], dtype=float)
        rings = [c[:, ::-1] + offset for c in measure.find_contours(mask, 0.5) if len(c) >= 4]
        geom = None
        for ring in rings:  # outlines and holes: even-odd
            poly = shapely.Polygon(ring).buffer(0)
            geom = poly if geom is None else geom.symmetric_difference(poly)
        if geom is not None and not geom.is_empty:
            out.append((value, geom))
    return out


def labels_table(data, attributes: dict[str, Any]):
    """Labels as one annotation per label value (measurement ``label``), level-0 px."""
    import pandas as pd
    import shapely

    level = data[0] if isinstance(data, list | tuple) else data
    level = np.asarray(level)
    level = level.reshape(level.shape[-2:]) if level.ndim > 2 else level
    polys = label_polygons(level)
    geoms = []
    for _, poly in polys:
        geoms.append(
            shapely.transform(poly, lambda c: np.column_stack(level0_xy(c[:, ::-1], attributes)))
        )
    table = pd.DataFrame({"geometry": np.asarray(geoms, dtype=object)})
    table["object_type"] = "annotation"
    table["name"] = [f"label {v}" for v, _ in polys]
    table["label"] = np.array([v for v, _ in polys], dtype=float)
    return table


_TABLES = {"points": points_table, "shapes": shapes_table, "labels": labels_table}


def write_geojson_layers(path: str, layer_data: list[tuple]) -> list[str]:
    """npe2 multi-layer writer: Points, Shapes and Labels layers into one QuPath GeoJSON."""
    import pandas as pd

    from histoscope.export.geojson import write_geojson

    tables = [_TABLES[kind](data, attrs) for data, attrs, kind in layer_data]
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame({"geometry": []})
    return [str(write_geojson(path, table))]


def write_points_csv(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """npe2 writer: Points as CSV (``x``, ``y`` in level-0 px, then class and measurements)."""
    import pandas as pd

    from histoscope.atomic import atomic_path

    table = points_table(data, attributes)
    out = pd.DataFrame(
        {"x": table["geometry"].map(lambda p: p.x), "y": table["geometry"].map(lambda p: p.y)}
    )
    for col in table.columns:
        if col not in ("geometry", "color"):
            out[col] = table[col]
    with atomic_path(path, suffix=".csv") as tmp:
        out.to_csv(tmp, index=False)
    return [str(path)]
