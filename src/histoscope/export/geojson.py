"""QuPath GeoJSON: read every form QuPath 0.2-0.6 writes, write what 0.4-0.6 imports.

One row of the table is one object: ``id``, ``object_type``, ``name``,
``classification`` (derived classes joined with ``": "``), ``color`` (the
classification colour, ``(r, g, b)`` or ``None``), ``geometry`` and
``nucleus`` (shapely, level-0 pixels), centroid ``x``, ``y``, ``locked`` and
one column per measurement.

Reading streams: the file is decoded one feature at a time (the C scanner of
:mod:`json`), coordinates of each chunk of features are turned into shapely
geometries in one vectorised call, so a million cells never exist as one
parsed document. Nothing here imports napari or Qt.
"""

from __future__ import annotations

import itertools
import json
import operator
import os
import re
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import shapely

from histoscope.errors import GeoJSONError, HistoScopeWarning
from histoscope.export._geojson_stream import (
    PLACE,
    _Bad,
    _chunks,
    _gc_paused,
    _items,
    _open_text,
    _Stream,
    _Stripped,
)
from histoscope.export._geojson_write import (
    BASE_COLUMNS,
    OBJECT_TYPES,
    TYPE_ALIASES,
    repair_polygonal,
    single_part,
    write_table,
)

__all__ = ["BASE_COLUMNS", "GeoJSONError", "read_geojson", "write_geojson"]

GEOMETRY_TYPES = frozenset({"Point", "MultiPoint", "LineString", "MultiLineString", "Polygon",
                            "MultiPolygon", "GeometryCollection"})  # fmt: skip
_NUMBER_TYPES = frozenset({int, float})


# ------------------------------------------------------------------ features
def _rgb(value: Any, what: str) -> tuple[int, int, int]:
    if type(value) is list and len(value) == 3 and set(map(type, value)) == {int}:
        if 0 <= min(value) and max(value) <= 255:
            return tuple(value)
    ints = isinstance(value, list) and len(value) in (3, 4)
    ints = ints and all(isinstance(v, int | float) and not isinstance(v, bool) and float(v).is_integer()
                        and 0 <= v <= 255 for v in value)  # fmt: skip
    if not ints:
        raise _Bad(f"{what} {value!r} is not 3 integers 0-255")
    return int(value[0]), int(value[1]), int(value[2])


def _packed(value: Any) -> tuple[int, int, int]:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Bad(f"classification colorRGB {value!r} is not an integer")
    return (value >> 16) & 255, (value >> 8) & 255, value & 255


def _classification(value: Any) -> tuple[str | None, tuple | None]:
    """``(name, colour)`` from a string, ``{name(s), color}`` or the old ``{name, colorRGB}``."""
    if value is None or isinstance(value, str):
        return value or None, None
    if not isinstance(value, dict):
        raise _Bad(f"classification {value!r} is neither a name nor an object")
    if value.get("names"):
        name = ": ".join(str(n) for n in value["names"])
    else:
        name = None if value.get("name") is None else str(value["name"])
    parent = value.get("parentClass")
    if isinstance(parent, dict) and name:  # before 0.4: derived classes chain their parents
        name = f"{_classification(parent)[0]}: {name}" if parent.get("name") else name
    if "color" in value and value["color"] is not None:
        return name, _rgb(value["color"], "classification colour")
    if "colorRGB" in value and value["colorRGB"] is not None:
        return name, _packed(value["colorRGB"])
    return name, None


def _measurements(value: Any) -> dict[str, float]:
    if value is None:
        return {}
    if isinstance(value, list):  # before 0.4: [{"name": ..., "value": ...}, ...]
        if not all(isinstance(m, dict) and "name" in m for m in value):
            raise _Bad("measurements list entries need a 'name' and a 'value'")
        value = {m["name"]: m.get("value") for m in value}
    if not isinstance(value, dict):
        raise _Bad(f"measurements must be an object or a list, not {type(value).__name__}")
    if set(map(type, value.values())) <= _NUMBER_TYPES:
        return value
    out = {}
    for k, v in value.items():
        if v is None:
            v = np.nan
        elif isinstance(v, bool) or not isinstance(v, int | float):
            raise _Bad(f"measurement {k!r} is {v!r}, not a number")
        out[str(k)] = v
    return out


def _feature(obj: Any) -> tuple[dict, dict, Any, Any]:
    """``(fields, measurements, geometry, nucleus)`` of one feature (or bare geometry)."""
    if not isinstance(obj, dict):
        raise _Bad(f"expected a Feature object, found {type(obj).__name__}")
    if obj.get("type") in GEOMETRY_TYPES:
        obj = {"type": "Feature", "geometry": obj}
    elif obj.get("type") == "FeatureCollection":
        raise _Bad("FeatureCollection whose 'features' is not an array")
    if obj.get("geometry") is None:
        raise _Bad("feature without geometry")
    props = obj.get("properties") or {}
    if not isinstance(props, dict):
        raise _Bad("properties is not an object")
    fid = obj.get("id")
    kind = props.get("objectType")
    if kind is None:
        kind = props.get("object_type", props.get("type"))
    if kind is None and fid in TYPE_ALIASES:  # QuPath 0.2 kept the type in "id"
        kind, fid = fid, None
    name, color = _classification(props.get("classification"))
    fields = {
        "id": None if fid is None else str(fid),
        "object_type": TYPE_ALIASES.get(kind, kind) or "annotation",
        "name": None if props.get("name") is None else str(props["name"]),
        "classification": name,
        "color": color,
        "locked": bool(props.get("isLocked", False)),
    }
    return (
        fields,
        _measurements(props.get("measurements")),
        obj["geometry"],
        obj.get("nucleusGeometry"),
    )


# ---------------------------------------------------------------- geometries
def _numbers(coords: Any, depth: int) -> Any:
    """Check a nested coordinate list has numbers at ``depth``; return it as floats."""
    if depth == 0:
        ok = isinstance(coords, list) and len(coords) in (2, 3)
        if not ok or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in coords
        ):
            raise _Bad(f"coordinates {coords!r} are not numbers")
        if not all(np.isfinite(coords)):
            raise _Bad(f"coordinates {coords!r} are not finite")
        return [float(coords[0]), float(coords[1])]
    if not isinstance(coords, list):
        raise _Bad(f"coordinates {coords!r} are not a list")
    return [_numbers(c, depth - 1) for c in coords]


def _ring(ring: list) -> list:
    if len(ring) and ring[0] != ring[-1]:
        ring = [*ring, ring[0]]  # repaired: closed
    if len({tuple(p) for p in ring}) < 3:
        raise _Bad("a polygon ring with fewer than 3 distinct points cannot be repaired")
    return ring


_DEPTH = {"Point": 0, "MultiPoint": 1, "LineString": 1, "MultiLineString": 2, "Polygon": 2, "MultiPolygon": 3}  # fmt: skip


def _one_geometry(g: Any):
    """One GeoJSON geometry, checked, unclosed rings closed, invalid polygons repaired."""
    if not isinstance(g, dict) or g.get("type") not in GEOMETRY_TYPES:
        raise _Bad(f"geometry {str(g)[:80]!r} is not a GeoJSON geometry")
    kind = g["type"]
    if kind == "GeometryCollection":
        parts = [_one_geometry(p) for p in g.get("geometries") or []]
        if not parts:
            raise _Bad("empty geometry")
        return shapely.GeometryCollection(parts)
    coords = _numbers(g.get("coordinates"), _DEPTH[kind])
    if kind == "Polygon":
        coords = [_ring(r) for r in coords]
    elif kind == "MultiPolygon":
        coords = [[_ring(r) for r in p] for p in coords]
    geom = shapely.geometry.shape({"type": kind, "coordinates": coords})
    if geom.is_empty:
        raise _Bad("empty geometry")
    if not geom.is_valid:
        if kind not in ("Polygon", "MultiPolygon"):
            raise _Bad(f"invalid {kind}: {shapely.is_valid_reason(geom)}")
        fixed = repair_polygonal(geom)
        if fixed is None:
            raise _Bad(
                f"self-intersecting ring cannot be repaired ({shapely.is_valid_reason(geom)})"
            )
        geom = fixed
    return single_part(geom)


def _fast_polygons(coords: list[list]) -> np.ndarray | None:
    """Simple closed polygons in one vectorised call, or ``None`` if any needs a closer look."""
    if not coords or not all(type(c) is list and c for c in coords):
        return None
    rings = list(itertools.chain.from_iterable(coords))
    try:
        lens = np.fromiter(map(len, rings), np.int64, len(rings))
        pairs = list(itertools.chain.from_iterable(rings))
        flat = list(itertools.chain.from_iterable(pairs))
    except TypeError:
        return None
    if set(map(len, pairs)) != {2} or not set(map(type, flat)) <= _NUMBER_TYPES or (lens < 4).any():
        return None  # 3-D or ragged positions, strings, short rings: the slow path says why
    xy = np.array(flat, dtype=float).reshape(-1, 2)
    ends = np.cumsum(lens)
    if not (np.isfinite(xy).all() and (xy[ends - lens] == xy[ends - 1]).all()):
        return None
    ring_ids = np.repeat(np.arange(len(rings)), lens)
    poly_ids = np.repeat(np.arange(len(coords)), [len(c) for c in coords])
    polys = shapely.polygons(shapely.linearrings(xy, indices=ring_ids), indices=poly_ids)
    return polys if shapely.is_valid(polys).all() else None


def _geometries(geoms: list) -> tuple[np.ndarray, dict[int, str]]:
    """Shapely geometries for a chunk; ``bad`` maps positions to reasons."""
    out = np.full(len(geoms), None, dtype=object)
    bad: dict[int, str] = {}
    polys = [i for i, g in enumerate(geoms) if type(g) is dict and g.get("type") == "Polygon"]
    fast = _fast_polygons([geoms[i].get("coordinates") for i in polys])
    if fast is not None:
        out[polys] = fast
    done = set(polys) if fast is not None else set()
    for i, g in enumerate(geoms):
        if i not in done and g is not None:
            try:
                out[i] = _one_geometry(g)
            except _Bad as exc:
                bad[i] = str(exc)
    return out, bad


# --------------------------------------------------------------------- table
class _Table:
    """Rows gathered chunk by chunk; columns built once at the end."""

    def __init__(self) -> None:
        self.fields: list[pd.DataFrame] = []
        self.meas: list[pd.DataFrame] = []
        self.geom: list[np.ndarray] = []
        self.nuc: list[np.ndarray] = []
        self.skipped: list[tuple[int, str]] = []

    def add(self, chunk: list[tuple[int, Any]], raise_: bool, where: str) -> None:
        parsed, idx = [], []
        for index, obj in chunk:
            try:
                parsed.append(_feature(obj))
                idx.append(index)
            except _Bad as exc:
                self._bad(index, str(exc), raise_, where)
        geom, bad = _geometries([p[2] for p in parsed])
        nuc, bad_n = _geometries([p[3] for p in parsed])
        for i, reason in sorted({**bad_n, **bad}.items()):
            self._bad(idx[i], reason if i in bad else f"nucleus: {reason}", raise_, where)
        keep = [i for i in range(len(parsed)) if i not in bad and i not in bad_n]
        self.fields.append(pd.DataFrame([parsed[i][0] for i in keep], columns=list(BASE_COLUMNS)))
        self.meas.append(pd.DataFrame.from_records([parsed[i][1] for i in keep], nrows=len(keep)))
        self.geom.append(geom[keep])
        self.nuc.append(nuc[keep])

    def _bad(self, index: int, reason: str, raise_: bool, where: str) -> None:
        if raise_:
            raise GeoJSONError(f"{where}: feature {index}: {reason}")
        self.skipped.append((index, reason))

    def frame(self) -> pd.DataFrame:
        base = pd.concat(self.fields, ignore_index=True) if self.fields else pd.DataFrame(columns=list(BASE_COLUMNS))  # fmt: skip
        geom = np.concatenate(self.geom) if self.geom else np.empty(0, dtype=object)
        base["geometry"] = geom
        base["nucleus"] = np.concatenate(self.nuc) if self.nuc else geom[:0]
        centres = shapely.centroid(geom) if len(geom) else geom
        base["x"], base["y"] = shapely.get_x(centres), shapely.get_y(centres)  # row by row
        base["locked"] = base["locked"].astype(bool)
        meas = pd.concat(self.meas, ignore_index=True) if self.meas else pd.DataFrame()
        meas = meas.astype(float).rename(
            columns=lambda c: f"{c} (measurement)" if c in BASE_COLUMNS else c
        )
        return pd.concat([base, meas], axis=1)


# ------------------------------------------------------------- centroid scan
_NO_BRACKETS = str.maketrans("[]", "  ")
#: Ring text numpy would parse but JSON forbids, or a vertex of one number (with the bracket
#: and comma counts this also rules out a vertex of three): ``+`` not after an exponent,
#: ``.5``, ``5.``, ``05``, ``-05``, ``[x]``. Each pattern starts with a literal, so each search
#: over a chunk's rings is a fast scan (about 0.3 CPU s per 100,000 16-vertex rings in all).
_NOT_JSON_RING = tuple(
    re.compile(p)
    for p in (r"\+(?<=[^eE]\+)", r"\.(?<=[^\d]\.)", r"\.(?!\d)", r"0\d(?<=[^\d.eE+\-]0\d)",
              r"0\d(?<=[^\d.eE+]-0\d)", r"\[[^\[\],]*\]")
)  # fmt: skip
#: Characters a ring of JSON numbers can hold (any other one: the full checks).
_RING_CHARS = str.maketrans("", "", "0123456789,.[]-+eE \n\r\t")
_NAN = float("nan")


def _restore(value: Any, stream: _Stripped) -> Any:
    """``value`` with each cut-out coordinate array parsed back as JSON."""
    if type(value) is str and value[:1] == PLACE:
        try:
            return json.loads(stream.span(value))
        except ValueError as exc:
            raise _Bad(f"coordinates are not valid JSON ({exc})") from None
    if isinstance(value, dict):
        return {k: _restore(v, stream) for k, v in value.items()}
    if isinstance(value, list):
        return [_restore(v, stream) for v in value]
    return value


def _last_ref(value: Any) -> int:
    """The highest cut-out array number a geometry refers to (-1 for none)."""
    if type(value) is not dict:
        return -1
    ref = value.get("coordinates")
    if type(ref) is str and ref[:1] == PLACE:
        return int(ref[1:])
    return max(map(_last_ref, value.get("geometries") or []), default=-1)


_PLAIN_TYPES = frozenset(OBJECT_TYPES)


def _plain_feature(obj: Any, colours: dict) -> tuple | None:
    """:func:`_feature` for the form QuPath 0.4-0.6 writes, or ``None`` for any other form.

    ``colours`` caches checked classification colours (a few per file).
    """
    if type(obj) is not dict or obj.get("type") != "Feature":
        return None
    props, geometry, fid = obj.get("properties"), obj.get("geometry"), obj.get("id")
    if type(props) is not dict or geometry is None or not (fid is None or type(fid) is str):
        return None
    kind, name = props.get("objectType"), props.get("name")
    if kind not in _PLAIN_TYPES or not (name is None or type(name) is str):
        return None
    cls, colour = props.get("classification"), None
    if cls is not None:
        if type(cls) is not dict or cls.keys() != {"name", "color"} or type(cls["name"]) is not str:
            return None
        rgb = cls["color"]
        colour = colours.get(tuple(rgb)) if type(rgb) is list else None
        if colour is None:
            return None  # checked by _feature, then cached
        cls = cls["name"]
    meas = props.get("measurements")
    if meas is None:
        meas = {}
    elif type(meas) is not dict or not set(map(type, meas.values())) <= _NUMBER_TYPES:
        return None
    locked = props.get("isLocked", False)
    fields = {"id": fid, "object_type": kind, "name": name, "classification": cls,
              "color": colour, "locked": locked if type(locked) is bool else bool(locked)}  # fmt: skip
    return fields, meas, geometry, obj.get("nucleusGeometry")


def _ring_text(g: Any, stream: _Stripped) -> tuple[str, int] | None:
    """``(coordinate text, vertices)`` of a Polygon with one ring of 2-D positions, else ``None``."""
    if type(g) is not dict or g.get("type") != "Polygon":
        return None
    ref = g.get("coordinates")
    if type(ref) is not str or ref[:1] != PLACE:
        return None
    body = stream.span(ref)
    opened = body.count("[")  # [[[x,y],...,[x,y]]]: n + 2 brackets, 2n - 1 commas
    if opened < 5 or opened != body.count("]") or 2 * opened != body.count(",") + 5:
        return None
    return body, opened - 2


def _ring_centroids(bodies: list[str], counts: list[int]) -> tuple[np.ndarray, ...] | None:
    """Area-weighted centroids of one-ring polygons given as coordinate text (``counts`` vertices).

    The shoelace sums run relative to each ring's first vertex (as GEOS does),
    so they match ``shapely.centroid`` to rounding; an unclosed ring is closed.
    ``(x, y, vertices)``: NaN where the area is 0; ``None`` if the text is not
    all finite numbers.
    """
    counts = np.asarray(counts, dtype=np.int64)
    text = ",".join(bodies)
    if text.translate(_RING_CHARS) or any(rx.search(text) for rx in _NOT_JSON_RING):
        return None  # the full checks say what is wrong (or that it is fine)
    text = text.translate(_NO_BRACKETS)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            values = np.fromstring(text, sep=",")
    except (ValueError, DeprecationWarning):
        return None
    if values.size != 2 * counts.sum() or not np.isfinite(values).all():
        return None
    xy = values.reshape(-1, 2)
    starts = np.cumsum(counts) - counts
    rel = xy - np.repeat(xy[starts], counts, axis=0)
    nxt = np.arange(1, len(xy) + 1)
    nxt[starts + counts - 1] = starts  # the last vertex joins the first
    x, y = rel[:, 0], rel[:, 1]
    xn, yn = x[nxt], y[nxt]
    cross = x * yn - xn * y
    area2 = np.add.reduceat(cross, starts)
    with np.errstate(divide="ignore", invalid="ignore"):
        cx = np.add.reduceat((x + xn) * cross, starts) / (3 * area2)
        cy = np.add.reduceat((y + yn) * cross, starts) / (3 * area2)
    flat = area2 == 0
    cx[flat], cy[flat] = np.nan, np.nan
    return xy[starts, 0] + cx, xy[starts, 1] + cy, xy


def _measurement_frame(meas: list[dict]) -> pd.DataFrame:
    """One float column per measurement name; one row per object (NaN where it lacks one)."""
    keys = list(meas[0]) if meas else []
    if keys and all(m.keys() == meas[0].keys() for m in meas):  # the usual case: same names
        values = list(map(operator.itemgetter(*keys), meas))
        table = np.array(values, dtype=float).reshape(len(meas), len(keys))
        return pd.DataFrame(table, columns=keys)
    return pd.DataFrame.from_records(meas, nrows=len(meas))


class _Scan:
    """Objects gathered chunk by chunk from a :class:`_Stripped` stream, centroids first."""

    def __init__(self, stream: _Stripped, where: str, raise_: bool, full: bool,
                 bbox: tuple[float, float, float, float] | None, limit: int | None) -> None:  # fmt: skip
        self.stream, self.where, self.raise_ = stream, where, raise_
        self.full, self.bbox, self.limit = full, bbox, limit
        self.parts: list[pd.DataFrame] = []
        self.meas: list[pd.DataFrame] = []
        self.skipped: list[tuple[int, str]] = []
        self.matched = self.kept = 0
        self.colors: dict[tuple, tuple] = {}

    def _bad(self, index: int, reason: str) -> None:
        if self.raise_:
            raise GeoJSONError(f"{self.where}: feature {index}: {reason}")
        self.skipped.append((index, reason))

    def _shape(self, value: Any):
        return _one_geometry(_restore(value, self.stream))

    def add(self, start: int, chunk: list) -> None:
        rows, colours = [], self.colors
        for index, obj in enumerate(chunk, start):
            plain = _plain_feature(obj, colours)
            if plain is not None:
                rows.append([index, *plain, None, None])
                continue
            if type(obj) is dict and type(obj.get("properties")) is dict:
                # a property named "coordinates" was cut out with the geometries' arrays
                obj = {**obj, "properties": _restore(obj["properties"], self.stream)}
            try:
                fields, meas, g, nuc = _feature(obj)
            except _Bad as exc:
                self._bad(index, str(exc))
                continue
            colour = fields["color"]
            cls = (
                ((obj.get("properties") or {}).get("classification")) if type(obj) is dict else None
            )
            if colour is not None and type(cls) is dict and type(cls.get("color")) is list:
                colours.setdefault(tuple(cls["color"]), colour)  # checked: the next one is plain
            rows.append([index, fields, meas, g, nuc, None, None])
        self._centroids(rows)
        for row in reversed(rows):  # arrays are numbered in file order: the last one seen
            last = max(_last_ref(row[3]), _last_ref(row[4]))
            if last >= 0:
                self.stream.release(f"{PLACE}{last}")
                break

    def _centroids(self, rows: list[list]) -> None:
        x, y = np.full(len(rows), np.nan), np.full(len(rows), np.nan)
        outline = np.zeros(len(rows), bool)  # annotations keep their geometry
        if not self.full:
            outline[:] = [row[1]["object_type"] == "annotation" for row in rows]
        fast = [(r, _ring_text(row[3], self.stream)) for r, row in enumerate(rows)]
        fast = [(r, *ring) for r, ring in fast if ring is not None]
        if fast:
            at, bodies, counts = zip(*fast, strict=True)
            got = _ring_centroids(list(bodies), list(counts))
            if got is not None:
                x[list(at)], y[list(at)] = got[:2]
                self._outlines(rows, np.asarray(at), np.asarray(counts), got[2], outline)
        good = np.ones(len(rows), bool)
        shaped = np.isnan(x)  # anything the fast path left out, and outlines still to build
        shaped |= outline & np.array([row[5] is None for row in rows], bool)
        for r in np.flatnonzero(shaped).tolist():
            row = rows[r]
            try:
                row[5] = self._shape(row[3])
            except _Bad as exc:
                self._bad(row[0], str(exc))
                good[r] = False
                continue
            c = row[5].centroid
            x[r], y[r] = c.x, c.y
            if not self.full and row[1]["object_type"] != "annotation":
                row[5] = None  # only its centroid was wanted
        inside = good.copy()
        if self.bbox is not None:
            x0, y0, x1, y1 = self.bbox
            inside &= (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
        self.matched += int(inside.sum())
        keep = np.flatnonzero(inside)
        if self.limit is not None:
            keep = keep[: max(self.limit - self.kept, 0)]
        if self.full:
            keep = [r for r in keep if self._full(rows[r])]
        self.kept += len(keep)
        self._gather([rows[r] for r in keep], x[keep], y[keep])

    @staticmethod
    def _outlines(rows: list[list], at: np.ndarray, counts: np.ndarray, xy: np.ndarray,
                  outline: np.ndarray) -> None:  # fmt: skip
        """Polygons for the fast-path rings of annotations in one vectorised call (valid ones)."""
        want = outline[at]
        if not want.any():
            return
        ring = np.repeat(np.arange(int(want.sum())), counts[want])
        polys = shapely.polygons(shapely.linearrings(xy[np.repeat(want, counts)], indices=ring))
        for r, poly, ok in zip(at[want].tolist(), polys, shapely.is_valid(polys), strict=True):
            if ok and rows[r][5] is None:  # an invalid one is repaired on the slow path
                rows[r][5] = poly

    def _full(self, row: list) -> bool:
        try:
            row[5] = row[5] if row[5] is not None else self._shape(row[3])
            row[6] = None if row[4] is None else self._shape(row[4])
        except _Bad as exc:
            self._bad(row[0], str(exc) if row[5] is None else f"nucleus: {exc}")
            return False
        return True

    def _gather(self, rows: list[list], x: np.ndarray, y: np.ndarray) -> None:
        fields = [row[1] for row in rows]
        cols: dict[str, Any] = {k: [f[k] for f in fields] for k in BASE_COLUMNS[:4]}
        cols["color"] = [c if (c := f["color"]) is None else self.colors.setdefault(c, c)
                         for f in fields]  # fmt: skip
        for k, at in (("geometry", 5), ("nucleus", 6)):
            cols[k] = np.empty(len(rows), dtype=object)
            cols[k][:] = [row[at] for row in rows]
        cols["x"], cols["y"], cols["locked"] = x, y, [f["locked"] for f in fields]
        self.parts.append(pd.DataFrame(cols, columns=list(BASE_COLUMNS)))
        self.meas.append(_measurement_frame([row[2] for row in rows]))

    def frame(self) -> pd.DataFrame:
        empty = pd.DataFrame(columns=list(BASE_COLUMNS))
        base = pd.concat(self.parts, ignore_index=True) if self.parts else empty
        for c in ("x", "y"):
            base[c] = base[c].astype(float)
        base["locked"] = base["locked"].astype(bool)
        meas = pd.concat(self.meas, ignore_index=True) if self.meas else pd.DataFrame()
        meas = meas.astype(float).rename(
            columns=lambda c: f"{c} (measurement)" if c in BASE_COLUMNS else c
        )
        return pd.concat([base, meas], axis=1)


def _check_bbox(bbox) -> tuple[float, float, float, float] | None:
    """``bbox`` as 4 floats with ``x0 < x1`` and ``y0 < y1``; ValueError naming the option."""
    if bbox is None:
        return None
    try:
        box = tuple(float(v) for v in bbox)
        if any(isinstance(v, str | bytes) for v in bbox):
            raise TypeError("text")
    except (TypeError, ValueError):
        raise ValueError(f"bbox must be 4 numbers (x0, y0, x1, y1), not {bbox!r}") from None
    if len(box) != 4 or not np.all(np.isfinite(box)):
        raise ValueError(f"bbox must be 4 finite numbers (x0, y0, x1, y1), not {bbox!r}")
    if not (box[0] < box[2] and box[1] < box[3]):
        raise ValueError(f"bbox (x0, y0, x1, y1) must have x0 < x1 and y0 < y1 (an empty box "
                         f"matches nothing), not {bbox!r}")  # fmt: skip
    return box  # type: ignore[return-value]


def _check_limit(limit) -> int | None:
    """``limit`` as an int >= 0; ValueError naming the option."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int | np.integer):
        raise ValueError(f"limit must be a whole number >= 0, not {limit!r}")
    if limit < 0:
        raise ValueError(f"limit must be >= 0, not {limit!r}")
    return int(limit)


def read_geojson(
    path: str | os.PathLike,
    on_error: Literal["raise", "skip"] = "raise",
    *,
    geometry: Literal["full", "centroid"] = "full",
    bbox: tuple[float, float, float, float] | None = None,
    limit: int | None = None,
) -> pd.DataFrame:
    """Read QuPath GeoJSON (any form QuPath writes or imports) into a table of objects.

    Parameters
    ----------
    path
        A ``.geojson``/``.json`` file, gzip-compressed or not (sniffed from its
        first bytes). Accepted: a FeatureCollection, a bare array of features,
        one Feature, one bare geometry; measurements as a dict or the old list
        of ``{name, value}``; classification as a string, ``{name|names, color}``
        or the old ``{name, colorRGB}``; a missing ``objectType`` is an annotation.
    on_error
        ``"raise"``: the first malformed feature raises. ``"skip"``: malformed
        features are left out, listed in ``df.attrs["skipped"]`` as
        ``(index, reason)`` and reported in one :class:`HistoScopeWarning`.
    geometry
        ``"full"``: shapely ``geometry`` and ``nucleus`` for every row.
        ``"centroid"``: a streaming scan that builds no polygon for cells and
        detections: their ``geometry`` and ``nucleus`` are ``None`` and ``x``,
        ``y`` are the area-weighted centroids computed from the coordinate
        text, equal to shapely's to 1e-6 px. A one-ring polygon is taken as
        written (QuPath writes valid ones): a self-intersecting ring with a
        non-zero signed area keeps its shoelace centroid, not that of the
        repaired polygon ``"full"`` makes; anything else (holes, several
        parts, zero area, bad numbers) goes through the full checks and
        repair; so does a ring whose text is not strict JSON numbers in
        ``[x, y]`` pairs (``+0``, ``.5``, ``05``, a vertex of 1 or 3 numbers).
        Annotations keep their ``geometry`` (napari draws them as outlines).
        ``nucleusGeometry`` is neither read nor checked (a malformed nucleus
        is not reported; ``"full"`` reports it). Made for a million cells in a Points layer: it needs a fraction
        of the time and memory of ``"full"``.
    bbox
        ``(x0, y0, x1, y1)`` in level-0 pixels: only objects whose centroid
        lies inside (``x0 <= x < x1``, ``y0 <= y < y1``) are returned; with
        ``geometry="full"`` only they get shapely geometries (the file is
        still scanned once, centroids only). ``df.attrs["matched"]`` counts them.
    limit
        At most this many objects are returned (the first in file order);
        ``df.attrs["matched"]`` still counts every match.

    Returns
    -------
    pandas.DataFrame
        One row per object; columns :data:`BASE_COLUMNS` then one float column
        per measurement (NaN where an object lacks it). Coordinates are
        level-0 pixels. Unclosed rings are closed and self-intersecting
        polygons repaired with ``make_valid``.

    Raises
    ------
    GeoJSONError
        Naming the file, the feature index and the reason: not JSON, a
        feature without geometry, coordinates that are not numbers, a ring
        that cannot be repaired, a classification colour that is not 3 ints.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    if geometry not in ("full", "centroid"):
        raise ValueError(f"geometry must be 'full' or 'centroid', not {geometry!r}")
    bbox = _check_bbox(bbox)
    limit = _check_limit(limit)
    path = Path(path)
    where, count = str(path), 0
    scan = geometry == "centroid" or bbox is not None or limit is not None
    try:
        fh = _open_text(path)
    except OSError as exc:
        raise GeoJSONError(f"{where}: cannot open ({exc})") from exc
    with fh, _gc_paused():
        if scan:
            stream = _Stripped(fh)
            table: _Scan | _Table = _Scan(stream, where, on_error == "raise",
                                          geometry == "full", bbox, limit)  # fmt: skip
            for start, chunk in _chunks(_items(stream), where):
                table.add(start, chunk)
                count = start + len(chunk)
        else:
            table = _Table()
            for start, chunk in _chunks(_items(_Stream(fh)), where):
                table.add(list(enumerate(chunk, start=start)), on_error == "raise", where)
                count = start + len(chunk)
        df = table.frame()
    if scan:
        df.attrs["matched"] = table.matched
    df.attrs["skipped"] = table.skipped
    if table.skipped:
        first = "; ".join(f"feature {i}: {r}" for i, r in table.skipped[:3])
        warnings.warn(f"{where}: skipped {len(table.skipped)} of {count} features ({first})",
                      HistoScopeWarning, stacklevel=2)  # fmt: skip
    return df


def write_geojson(path: str | os.PathLike, table: pd.DataFrame, collection: bool = True) -> Path:
    """Write a table of objects as GeoJSON that QuPath 0.4-0.6 imports.

    Parameters
    ----------
    path
        Target file; ``.gz`` at the end of its name compresses it. Written
        atomically (a reader never sees half a file).
    table
        Columns as :func:`read_geojson` gives them; only ``geometry`` is
        required (shapely, level-0 pixels). Missing ids get UUIDs (a non-UUID
        id becomes a UUID derived from it); a missing ``object_type`` is
        ``"cell"`` where a ``nucleus`` is given, else ``"detection"``; a class
        without a colour gets QuPath's default or one derived from its name.
        Numeric columns other than the standard ones are the measurements
        (NaN and inf left out); other columns are not written.
    collection
        ``True``: a FeatureCollection; ``False``: a bare array of features.

    Returns
    -------
    pathlib.Path
        The written file.

    Raises
    ------
    GeoJSONError
        Naming the row: no geometry, non-finite coordinates, an invalid
        polygon that ``make_valid``/``buffer(0)`` cannot repair, a bad colour.
    """
    return write_table(path, table, collection)
