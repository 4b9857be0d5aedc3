"""Streaming QuPath GeoJSON writer (see :func:`histoscope.export.geojson.write_geojson`).

Each feature is formatted as one line of text from pre-built fragments: the
geometry by GEOS (``shapely.to_geojson``, vectorised, shortest round-trip
floats), the measurements by one ``%`` template per chunk, the classification
from a cache. No document is ever held in memory: chunks of rows are written
as they are formatted.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import uuid
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import shapely

from histoscope.atomic import atomic_path
from histoscope.errors import GeoJSONError

#: Columns :func:`read_geojson` gives besides the measurements (one per measurement).
BASE_COLUMNS = ("id", "object_type", "name", "classification", "color", "geometry", "nucleus",
                "x", "y", "locked")  # fmt: skip
#: The ``objectType`` values QuPath 0.4-0.6 writes.
OBJECT_TYPES = ("annotation", "detection", "cell", "tile", "tmaCore", "root")
TYPE_ALIASES = {"tma_core": "tmaCore", "PathAnnotationObject": "annotation",
                "PathDetectionObject": "detection", "PathCellObject": "cell",
                "PathTileObject": "tile", "TMACoreObject": "tmaCore", "PathRootObject": "root"}  # fmt: skip
#: QuPath's default class colours; other names get a colour from a hash of the name.
DEFAULT_COLORS = {"Tumor": (200, 0, 0), "Stroma": (150, 200, 150), "Immune cells": (160, 90, 160),
                  "Necrosis": (50, 50, 50), "Other": (255, 200, 0), "Region*": (0, 0, 180),
                  "Ignore*": (180, 180, 180), "Positive": (200, 50, 50),
                  "Negative": (112, 112, 225)}  # fmt: skip
CHUNK = 10_000
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_POLYGONAL = (3, 6)  # shapely type ids of Polygon and MultiPolygon


def repair_polygonal(geom):
    """A valid Polygon/MultiPolygon covering ``geom``'s area, or ``None`` if none is left.

    ``make_valid`` first (a bow-tie becomes two triangles), ``buffer(0)`` if that
    is still invalid; a MultiPolygon of one part comes back as a Polygon.
    """
    fixed = shapely.make_valid(geom)
    parts = [p for p in shapely.get_parts(fixed) if shapely.get_type_id(p) in _POLYGONAL]
    fixed = shapely.unary_union(parts) if parts else None
    if fixed is not None and not fixed.is_valid:
        fixed = fixed.buffer(0)
    if fixed is None or fixed.is_empty or fixed.area <= 0:
        return None
    return single_part(fixed)


def single_part(geom):
    """A MultiPolygon (or MultiPoint...) of one part as that part, anything else unchanged."""
    if shapely.get_type_id(geom) in (4, 5, 6) and shapely.get_num_geometries(geom) == 1:
        return shapely.get_geometry(geom, 0)
    return geom


def class_color(name: str) -> tuple[int, int, int]:
    """QuPath's colour for its default classes, else a stable colour from the name."""
    base = name.split(": ")[0]
    if name in DEFAULT_COLORS or base in DEFAULT_COLORS:
        return DEFAULT_COLORS.get(name, DEFAULT_COLORS.get(base))
    h = zlib.crc32(name.encode("utf-8"))
    return (64 + (h & 0xBF), 64 + ((h >> 8) & 0xBF), 64 + ((h >> 16) & 0xBF))


def _rgb_ints(color: Any) -> tuple[int, int, int] | None:
    """``(r, g, b)`` 0-255 from a sequence of 3 or 4 numbers (floats <= 1 taken as 0-1)."""
    if color is None or (isinstance(color, float) and np.isnan(color)):
        return None
    arr = np.asarray(color, dtype=float).ravel()
    if arr.size not in (3, 4) or not np.isfinite(arr).all():
        raise ValueError(f"colour {color!r} is not 3 numbers")
    if (
        arr.dtype.kind == "f"
        and arr.max() <= 1.0
        and not np.issubdtype(np.asarray(color).dtype, np.integer)
    ):
        arr = arr * 255.0
    return tuple(int(v) for v in np.clip(np.round(arr[:3]), 0, 255))


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA


class _Spec:
    """Which columns of a table hold what, decided once for the whole table."""

    def __init__(self, table: pd.DataFrame) -> None:
        if "geometry" not in table.columns:
            raise GeoJSONError("the table has no 'geometry' column")
        self.nucleus = "nucleus" in table.columns
        self.measurements = [
            c for c in table.columns
            if c not in BASE_COLUMNS and not isinstance(c, tuple)
            and (pd.api.types.is_numeric_dtype(table[c]) or pd.api.types.is_bool_dtype(table[c]))
        ]  # fmt: skip
        keys = [json.dumps(str(c)) for c in self.measurements]
        self.keys = keys
        # names like "Positive %" must not be read as format directives
        self.template = (
            '"measurements":{' + ",".join(f"{k.replace('%', '%%')}:%r" for k in keys) + "}"
        )
        self._classes: dict[tuple, str] = {}

    def classification(self, name: Any, color: Any) -> str:
        """The ``"classification":{...}`` fragment (cached per class and colour)."""
        key = (name, None if color is None else tuple(color))
        frag = self._classes.get(key)
        if frag is None:
            rgb = list(color if color is not None else class_color(name))
            parts = name.split(": ")
            head = (
                f'"names":{json.dumps(parts)}' if len(parts) > 1 else f'"name":{json.dumps(name)}'
            )
            frag = self._classes[key] = f'"classification":{{{head},"color":{json.dumps(rgb)}}}'
        return frag

    def measurement_fragments(self, chunk: pd.DataFrame) -> list[str]:
        """One ``"measurements":{...}`` fragment per row; NaN and inf left out."""
        if not self.measurements:
            return [""] * len(chunk)
        vals = chunk[self.measurements].to_numpy(dtype=np.float64, na_value=np.nan)
        finite = np.isfinite(vals)
        full = finite.all(axis=1).tolist()
        out = []
        for row, ok, fin in zip(vals.tolist(), full, finite.tolist(), strict=True):
            if ok:
                out.append(self.template % tuple(row))
            elif any(fin):
                inner = ",".join(
                    f"{k}:{v!r}" for k, v, f in zip(self.keys, row, fin, strict=True) if f
                )
                out.append('"measurements":{' + inner + "}")
            else:
                out.append("")
        return out


def _geometries(values: np.ndarray, labels, where: str, required: bool) -> np.ndarray:
    """Shapely geometries checked and repaired for QuPath; errors name the row."""
    geoms = np.asarray(values, dtype=object)
    ok = shapely.is_geometry(geoms)
    for i in np.flatnonzero(~ok):
        if required or not _is_null(geoms[i]):
            what = (
                "no geometry"
                if _is_null(geoms[i])
                else f"{type(geoms[i]).__name__} is not a geometry"
            )
            raise GeoJSONError(f"{where}: row {labels[i]!r}: {what}")
        geoms[i] = None
    geoms = shapely.force_2d(geoms)
    coords, index = shapely.get_coordinates(geoms, return_index=True)
    bad = index[~np.isfinite(coords).all(axis=1)]
    if bad.size:
        raise GeoJSONError(f"{where}: row {labels[bad[0]]!r}: coordinates are not finite numbers")
    empty = shapely.is_empty(geoms)
    if empty.any():
        raise GeoJSONError(f"{where}: row {labels[np.flatnonzero(empty)[0]]!r}: empty geometry")
    invalid = ok & ~shapely.is_valid(geoms)
    for i in np.flatnonzero(invalid):
        fixed = repair_polygonal(geoms[i]) if shapely.get_type_id(geoms[i]) in _POLYGONAL else None
        if fixed is None:
            reason = shapely.is_valid_reason(geoms[i])
            raise GeoJSONError(f"{where}: row {labels[i]!r}: invalid geometry that cannot be repaired ({reason})")  # fmt: skip
        geoms[i] = fixed
    multi = ok & (shapely.get_type_id(geoms) == 6) & (shapely.get_num_geometries(geoms) == 1)
    geoms[multi] = shapely.get_geometry(geoms[multi], 0)
    return geoms


def _ids(values) -> list[str]:
    """Valid UUIDs kept; missing ids get a random UUID, other ids a UUID derived from them."""
    out = []
    for v in values:
        if isinstance(v, str) and _UUID.fullmatch(v):
            out.append(v)
        elif _is_null(v):
            out.append(str(uuid.uuid4()))
        else:
            out.append(str(uuid.uuid5(uuid.NAMESPACE_OID, str(v))))
    return out


def _object_types(chunk: pd.DataFrame, has_nucleus: np.ndarray, where: str) -> list[str]:
    default = np.where(has_nucleus, "cell", "detection")
    if "object_type" not in chunk.columns:
        return default.tolist()
    out = []
    for label, value, d in zip(chunk.index, chunk["object_type"].tolist(), default, strict=True):
        value = d if _is_null(value) else TYPE_ALIASES.get(value, value)
        if value not in OBJECT_TYPES:
            raise GeoJSONError(f"{where}: row {label!r}: unknown object type {value!r}")
        out.append(value)
    return out


def _column(chunk: pd.DataFrame, name: str) -> list:
    return chunk[name].tolist() if name in chunk.columns else [None] * len(chunk)


def _properties(chunk: pd.DataFrame, spec: _Spec, types: list[str], where: str) -> list[str]:
    meas = spec.measurement_fragments(chunk)
    out = []
    rows = zip(chunk.index, types, _column(chunk, "name"), _column(chunk, "classification"),
               _column(chunk, "color"), _column(chunk, "locked"), meas, strict=True)  # fmt: skip
    for label, kind, name, cls, color, locked, m in rows:
        parts = [f'"objectType":"{kind}"']
        if not _is_null(name):
            parts.append(f'"name":{json.dumps(str(name))}')
        if not _is_null(cls) and str(cls):
            try:
                rgb = _rgb_ints(color)
            except (TypeError, ValueError) as exc:
                raise GeoJSONError(f"{where}: row {label!r}: {exc}") from None
            parts.append(spec.classification(str(cls), rgb))
        if not _is_null(locked) and bool(locked):
            parts.append('"isLocked":true')
        if m:
            parts.append(m)
        out.append(",".join(parts))
    return out


def _chunk_lines(chunk: pd.DataFrame, spec: _Spec, where: str) -> list[str]:
    labels = chunk.index
    geo = shapely.to_geojson(_geometries(chunk["geometry"].to_numpy(), labels, where, True))
    nuc = [None] * len(chunk)
    if spec.nucleus:
        ng = _geometries(chunk["nucleus"].to_numpy(), labels, where, False)
        present = shapely.is_geometry(ng)
        nuc = np.full(len(chunk), None, dtype=object)
        nuc[present] = shapely.to_geojson(ng[present])
    has_nucleus = np.array([n is not None for n in nuc], dtype=bool)
    types = _object_types(chunk, has_nucleus, where)
    ids = _ids(_column(chunk, "id"))
    props = _properties(chunk, spec, types, where)
    lines = []
    for fid, g, n, p in zip(ids, geo.tolist(), list(nuc), props, strict=True):
        nucleus = "" if n is None else f',"nucleusGeometry":{n}'
        lines.append(
            f'{{"type":"Feature","id":"{fid}","geometry":{g}{nucleus},"properties":{{{p}}}}}'
        )
    return lines


def write_table(path: str | os.PathLike, table: pd.DataFrame, collection: bool = True) -> Path:
    """Stream ``table`` to ``path`` as QuPath GeoJSON; see ``write_geojson``."""
    path = Path(path)
    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"write_geojson needs a pandas DataFrame, not {type(table).__name__}")
    spec = _Spec(table)
    head, tail = ('{"type":"FeatureCollection","features":[\n', "\n]}\n") if collection else ("[\n", "\n]\n")  # fmt: skip
    with atomic_path(path) as tmp:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(tmp, "wb") as fh:
            fh.write(head.encode())
            for start in range(0, len(table), CHUNK):
                lines = _chunk_lines(table.iloc[start : start + CHUNK], spec, str(path))
                sep = ",\n" if start else ""
                fh.write((sep + ",\n".join(lines)).encode("utf-8"))
            fh.write(tail.encode())
    return path
