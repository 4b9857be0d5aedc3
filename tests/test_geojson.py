"""QuPath GeoJSON: every form QuPath writes or imports, malformed files, the writer's rules."""

from __future__ import annotations

import gzip
import json
import math
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pytest
import shapely

import histoscope as hs
from histoscope.errors import GeoJSONError, HistoScopeWarning

SQUARE = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]}
UID = "6f1b1f0e-8a4c-4a5b-9c3e-0d5f2a1b3c4d"


def feature(geometry=SQUARE, **props) -> dict:
    return {"type": "Feature", "geometry": geometry, "properties": props}


def cell(i: int, cls: str = "Tumor", color=(200, 0, 0)) -> dict:
    x = 100.25 + 30 * i
    ring = [[x + 8 * math.cos(t), 50.5 + 8 * math.sin(t)] for t in np.linspace(0, 6, 12)]
    nuc = [[x + 3 * math.cos(t), 50.5 + 3 * math.sin(t)] for t in np.linspace(0, 6, 12)]
    return {
        "type": "Feature",
        "id": str(uuid.UUID(int=i + 1)),
        "geometry": {"type": "Polygon", "coordinates": [ring + ring[:1]]},
        "nucleusGeometry": {"type": "Polygon", "coordinates": [nuc + nuc[:1]]},
        "properties": {
            "objectType": "cell",
            "classification": {"name": cls, "color": list(color)},
            "measurements": {"Area µm^2": 50.0 + i, "DAB: Mean": 0.125 * i},
        },
    }


@dataclass(frozen=True)
class Form:
    id: str
    doc: Any
    want: dict = field(default_factory=dict)
    gz: bool = False


FORMS = [
    Form("feature_collection", {"type": "FeatureCollection", "features": [cell(0), cell(1)]},
         {"object_type": "cell", "classification": "Tumor", "color": (200, 0, 0), "n": 2}),
    Form("bare_array", [cell(0), cell(1), cell(2)], {"n": 3, "id": str(uuid.UUID(int=1))}),
    Form("single_feature", feature(name="A", isLocked=True), {"name": "A", "locked": True, "n": 1}),
    Form("bare_geometry", SQUARE, {"object_type": "annotation", "classification": None, "n": 1}),
    Form("gzip", [cell(0)], {"object_type": "cell", "n": 1}, gz=True),
    Form("old_measurement_list",
         feature(measurements=[{"name": "Area", "value": 100}, {"name": "Perimeter", "value": 40.5}]),
         {"Area": 100.0, "Perimeter": 40.5}),
    Form("string_classification", feature(classification="Stroma"),
         {"classification": "Stroma", "color": None}),
    Form("colorRGB_classification",
         feature(classification={"name": "Tumor", "colorRGB": -3670016}),  # 0xFFC80000
         {"classification": "Tumor", "color": (200, 0, 0)}),
    Form("missing_object_type", feature(), {"object_type": "annotation"}),
    Form("legacy_type_in_id", {**feature(), "id": "PathDetectionObject"},
         {"object_type": "detection", "id": None}),
    Form("derived_class_names",
         feature(classification={"names": ["Tumor", "Positive"], "color": [255, 0, 0]}),
         {"classification": "Tumor: Positive", "color": (255, 0, 0)}),
    Form("old_parent_class",
         feature(classification={"name": "Positive", "colorRGB": 255,
                                 "parentClass": {"name": "Tumor", "colorRGB": 0}}),
         {"classification": "Tumor: Positive", "color": (0, 0, 255)}),
    Form("multipolygon",
         feature({"type": "MultiPolygon", "coordinates": [SQUARE["coordinates"],
                  [[[20, 0], [30, 0], [30, 10], [20, 0]]]]}, objectType="annotation"),
         {"geom_type": "MultiPolygon"}),
    Form("single_part_multipolygon",
         feature({"type": "MultiPolygon", "coordinates": [SQUARE["coordinates"]]}),
         {"geom_type": "Polygon", "x": 5.0, "y": 5.0}),
    Form("point_detection",
         feature({"type": "Point", "coordinates": [12.5, 7.25]}, objectType="detection"),
         {"object_type": "detection", "geom_type": "Point", "x": 12.5, "y": 7.25}),
    Form("tma_core_alias", feature(objectType="tma_core"), {"object_type": "tmaCore"}),
    Form("unclosed_ring_closed",
         feature({"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10]]]}),
         {"geom_type": "Polygon", "area": 100.0}),
    Form("bowtie_repaired",
         feature({"type": "Polygon", "coordinates": [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]}),
         {"geom_type": "MultiPolygon", "area": 50.0}),
    Form("nan_measurement", feature(measurements={"a": float("nan"), "b": None, "c": 1}),
         {"c": 1.0}),
]  # fmt: skip


@pytest.mark.parametrize("form", FORMS, ids=[f.id for f in FORMS])
def test_reads_every_form_qupath_writes(tmp_path, form):
    path = tmp_path / ("objects.geojson.gz" if form.gz else "objects.geojson")
    text = json.dumps(form.doc, indent=2)  # QuPath pretty-prints
    path.write_bytes(gzip.compress(text.encode()) if form.gz else text.encode())
    df = hs.read_geojson(path)
    assert len(df) == form.want.get("n", 1)
    assert list(df.columns[:10]) == list(hs.export.geojson.BASE_COLUMNS)
    row = df.iloc[0]
    assert row["geometry"].is_valid
    for key, value in form.want.items():
        if key == "n":
            continue
        got = {"geom_type": row["geometry"].geom_type, "area": row["geometry"].area}.get(key)
        got = row[key] if got is None else got
        assert got == value, key
    if form.id == "feature_collection":
        assert row["nucleus"].geom_type == "Polygon"
        assert row["Area µm^2"] == 50.0 and df["DAB: Mean"].tolist() == [0.0, 0.125]
    if form.id == "nan_measurement":
        assert np.isnan(row["a"]) and np.isnan(row["b"])


@dataclass(frozen=True)
class Bad:
    id: str
    doc: Any
    reason: str
    index: int = 1


def _bad_doc(bad_feature) -> list:
    return [feature(), bad_feature, feature()]


BAD = [
    Bad("no_geometry", _bad_doc({"type": "Feature", "properties": {}}), "without geometry"),
    Bad("null_geometry", _bad_doc(feature(None)), "without geometry"),
    Bad("string_coordinates",
        _bad_doc(feature({"type": "Polygon", "coordinates": [[["a", 0], [1, 0], [1, 1], ["a", 0]]]})),
        "not numbers"),
    Bad("point_not_numbers", _bad_doc(feature({"type": "Point", "coordinates": [None, 1]})),
        "not numbers"),
    Bad("unclosed_two_points",
        _bad_doc(feature({"type": "Polygon", "coordinates": [[[0, 0], [10, 0]]]})),
        "cannot be repaired"),
    Bad("collinear_ring",
        _bad_doc(feature({"type": "Polygon", "coordinates": [[[0, 0], [5, 0], [10, 0], [0, 0]]]})),
        "cannot be repaired"),
    Bad("colour_two_ints", _bad_doc(feature(classification={"name": "T", "color": [1, 2]})),
        "not 3 integers"),
    Bad("colour_floats", _bad_doc(feature(classification={"name": "T", "color": [0.5, 0.2, 0.1]})),
        "not 3 integers"),
    Bad("measurement_string", _bad_doc(feature(measurements={"a": "high"})), "not a number"),
    Bad("not_a_feature", _bad_doc(42), "expected a Feature"),
]  # fmt: skip


@pytest.mark.parametrize("bad", BAD, ids=[b.id for b in BAD])
def test_malformed_feature_raises_naming_file_index_reason(tmp_path, bad):
    path = tmp_path / "broken.geojson"
    path.write_text(json.dumps(bad.doc))
    with pytest.raises(
        GeoJSONError, match=rf"broken\.geojson: feature {bad.index}: .*{bad.reason}"
    ):
        hs.read_geojson(path)


@pytest.mark.parametrize("bad", BAD, ids=[b.id for b in BAD])
def test_skip_mode_reads_the_rest_and_counts(tmp_path, bad):
    path = tmp_path / "broken.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": bad.doc}))
    with pytest.warns(HistoScopeWarning, match="skipped 1 of 3 features"):
        df = hs.read_geojson(path, on_error="skip")
    assert len(df) == 2
    [(index, reason)] = df.attrs["skipped"]
    assert index == bad.index and bad.reason in reason


@pytest.mark.parametrize(
    "text",
    ["this is not json", '{"type": "FeatureCollection", "features": [{"type": "Feature",', ""],
    ids=["text", "truncated", "empty"],
)
def test_not_json_raises_with_file_name(tmp_path, text):
    path = tmp_path / "notes.geojson"
    path.write_text(text)
    with pytest.raises(GeoJSONError, match=r"notes\.geojson: feature 0: not valid JSON"):
        hs.read_geojson(path)


def test_syntax_error_names_the_feature_index(tmp_path):
    path = tmp_path / "cut.geojson"
    good = json.dumps(feature())
    path.write_text(f"[{good},{good},{good[:-20]}")
    with pytest.raises(GeoJSONError, match=r"feature 2: not valid JSON"):
        hs.read_geojson(path, on_error="skip")


@pytest.mark.parametrize("name", ["round.geojson", "round.geojson.gz"])
def test_round_trip_keeps_ids_classes_colours_measurements_geometry(tmp_path, name):
    src = tmp_path / "src.geojson"
    src.write_text(
        json.dumps({"type": "FeatureCollection", "features": [cell(i) for i in range(5)]})
    )
    first = hs.read_geojson(src)
    again = hs.read_geojson(hs.write_geojson(tmp_path / name, first))
    assert again["id"].tolist() == first["id"].tolist()
    for col in ("object_type", "classification", "color", "locked", "Area µm^2", "DAB: Mean"):
        assert again[col].tolist() == first[col].tolist(), col
    for a, b in zip(first["geometry"], again["geometry"], strict=True):
        np.testing.assert_allclose(
            shapely.get_coordinates(a), shapely.get_coordinates(b), atol=1e-6
        )
    for a, b in zip(first["nucleus"], again["nucleus"], strict=True):
        np.testing.assert_allclose(
            shapely.get_coordinates(a), shapely.get_coordinates(b), atol=1e-6
        )


def test_writer_follows_every_qupath_rule(tmp_path):
    bowtie = shapely.Polygon([(0, 0), (10, 10), (10, 0), (0, 10)])
    one_part = shapely.MultiPolygon([shapely.box(0, 0, 5, 5)])
    table = pd.DataFrame({
        "id": [None, UID, "my-own-id", None, None],
        "object_type": ["cell", "annotation", "annotation", "detection", None],
        "classification": ["Tumor", "Tumor: Positive", None, "Stroma", "Immune cells"],
        "color": [(200, 0, 0), None, None, np.array([0.5, 0.5, 0.5]), None],
        "geometry": [shapely.box(0, 0, 10, 10), bowtie, one_part, shapely.Point(3, 4), shapely.box(1, 1, 2, 2)],
        "nucleus": [shapely.box(2, 2, 4, 4), None, None, None, None],
        "area": [np.float32(1.5), np.nan, np.inf, 2.0, np.int64(7)],
        "label": ["text", "is", "not", "a", "measurement"],
    })  # fmt: skip
    path = hs.write_geojson(tmp_path / "out.geojson", table)
    doc = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in output"))
    assert doc["type"] == "FeatureCollection"
    feats = doc["features"]
    assert feats[1]["id"] == UID
    assert len({f["id"] for f in feats}) == 5
    for f in feats:
        uuid.UUID(f["id"])  # every id a UUID
        geom = shapely.geometry.shape(f["geometry"])
        assert geom.is_valid
        for ring in _rings(f["geometry"]):
            assert ring[0] == ring[-1] and len(ring) >= 4
        cls = f["properties"].get("classification")
        if cls is not None:
            assert len(cls["color"]) == 3 and all(type(c) is int for c in cls["color"])
        for v in f["properties"].get("measurements", {}).values():
            assert type(v) in (int, float) and math.isfinite(v)
    assert feats[0]["properties"]["objectType"] == "cell" and "nucleusGeometry" in feats[0]
    assert "nucleusGeometry" not in feats[1]
    assert shapely.geometry.shape(feats[1]["geometry"]).area == pytest.approx(50.0)
    assert feats[1]["properties"]["classification"]["names"] == ["Tumor", "Positive"]
    assert feats[2]["geometry"]["type"] == "Polygon"  # one-part MultiPolygon
    assert feats[3]["geometry"]["type"] == "Point"
    assert feats[3]["properties"]["classification"]["color"] == [128, 128, 128]
    assert feats[4]["properties"]["objectType"] == "detection"
    assert feats[0]["properties"]["measurements"] == {"area": 1.5}
    assert (
        "measurements" not in feats[1]["properties"]
        and "measurements" not in feats[2]["properties"]
    )
    assert "label" not in json.dumps(feats[0]["properties"])


def _rings(geometry: dict) -> list:
    if geometry["type"] == "Polygon":
        return geometry["coordinates"]
    if geometry["type"] == "MultiPolygon":
        return [r for p in geometry["coordinates"] for r in p]
    return []


def test_writer_bare_array_and_gzip(tmp_path):
    table = pd.DataFrame({"geometry": [shapely.Point(1, 2), shapely.Point(3, 4)]})
    path = hs.write_geojson(tmp_path / "pts.geojson.gz", table, collection=False)
    doc = json.loads(gzip.decompress(path.read_bytes()))
    assert isinstance(doc, list) and [f["geometry"]["coordinates"] for f in doc] == [[1, 2], [3, 4]]


@pytest.mark.parametrize(
    ("geometry", "reason"),
    [
        (shapely.Polygon([(0, 0), (5, 0), (10, 0), (0, 0)]), "cannot be repaired"),
        (None, "no geometry"),
        (shapely.Point(np.nan, 1), "not finite"),
        ("POINT (1 2)", "not a geometry"),
    ],
    ids=["zero_area", "missing", "nan", "wkt_string"],
)
def test_writer_refuses_rows_it_cannot_write_naming_the_row(tmp_path, geometry, reason):
    table = pd.DataFrame({"geometry": [shapely.box(0, 0, 1, 1), geometry]}, index=["a", "b"])
    target = tmp_path / "out.geojson"
    with pytest.raises(GeoJSONError, match=rf"row 'b': .*{reason}"):
        hs.write_geojson(target, table)
    assert not target.exists()  # atomic: nothing half-written


def test_measurement_names_with_percent_signs_round_trip(tmp_path):
    import pandas as pd
    import shapely

    table = pd.DataFrame({"geometry": [shapely.box(0, 0, 10, 10)], "Positive %": [12.5],
                          "Ratio %d": [1.0]})  # fmt: skip
    back = hs.read_geojson(hs.write_geojson(tmp_path / "p.geojson", table))
    assert back["Positive %"].tolist() == [12.5] and back["Ratio %d"].tolist() == [1.0]


def test_an_empty_geometry_collection_is_reported_and_spares_the_other_centroids(tmp_path):
    import json

    good = {"type": "Feature", "properties": {},
            "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [0, 10], [10, 10], [10, 0],
                                                             [0, 0]]]}}  # fmt: skip
    empty = {"type": "Feature", "properties": {},
             "geometry": {"type": "GeometryCollection", "geometries": []}}  # fmt: skip
    path = tmp_path / "e.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [good, empty]}))
    with pytest.raises(hs.GeoJSONError, match="feature 1: empty geometry"):
        hs.read_geojson(path)
    with pytest.warns(hs.HistoScopeWarning):
        df = hs.read_geojson(path, on_error="skip")
    assert df[["x", "y"]].values.tolist() == [[5.0, 5.0]]


# ------------------------------------------------------------- centroid mode
def _assert_same_but_geometry(centroid: pd.DataFrame, full: pd.DataFrame) -> None:
    plain = [c for c in full.columns if c not in ("geometry", "nucleus", "x", "y")]
    pd.testing.assert_frame_equal(centroid[plain], full[plain])
    np.testing.assert_allclose(centroid[["x", "y"]], full[["x", "y"]], rtol=0, atol=1e-6)
    keep = (full["object_type"] == "annotation").to_numpy()
    assert all(a.equals(b) for a, b in zip(centroid["geometry"][keep], full["geometry"][keep],
                                           strict=True))  # fmt: skip
    assert centroid.loc[~keep, "geometry"].isna().all() and centroid["nucleus"].isna().all()


@pytest.mark.parametrize("form", FORMS, ids=[f.id for f in FORMS])
def test_centroid_mode_reads_every_form_as_the_full_reader_does(tmp_path, form):
    path = tmp_path / ("objects.geojson.gz" if form.gz else "objects.geojson")
    text = json.dumps(form.doc, indent=2)
    path.write_bytes(gzip.compress(text.encode()) if form.gz else text.encode())
    _assert_same_but_geometry(hs.read_geojson(path, geometry="centroid"), hs.read_geojson(path))


def _detection(coords, kind="Polygon") -> dict:
    return feature({"type": kind, "coordinates": coords}, objectType="detection")


BAD_FAST = BAD + [
    Bad("detection_string_coordinates",
        _bad_doc(_detection([[["a", 0], [1, 0], [1, 1], ["a", 0]]])), "not numbers"),
    Bad("detection_nan_coordinates",
        _bad_doc(_detection([[[float("nan"), 0], [1, 0], [1, 1], [0, 0]]])), "not finite"),
    Bad("detection_collinear", _bad_doc(_detection([[[0, 0], [5, 0], [10, 0], [0, 0]]])),
        "cannot be repaired"),
    Bad("detection_two_points", _bad_doc(_detection([[[0, 0], [10, 0]]])), "cannot be repaired"),
    Bad("detection_null_in_ring",
        _bad_doc(_detection([[[0, 0], [10, 0], None, [10, 10], [0, 0]]])), "not numbers"),
]  # fmt: skip


@pytest.mark.parametrize("bad", BAD_FAST, ids=[b.id for b in BAD_FAST])
def test_centroid_mode_raises_and_skips_like_the_full_reader(tmp_path, bad):
    path = tmp_path / "broken.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": bad.doc}, indent=1))
    with pytest.raises(GeoJSONError, match=rf"broken\.geojson: feature 1: .*{bad.reason}"):
        hs.read_geojson(path, geometry="centroid")
    with pytest.warns(HistoScopeWarning, match="skipped 1 of 3 features"):
        df = hs.read_geojson(path, on_error="skip", geometry="centroid")
    assert len(df) == 2 and df.attrs["skipped"][0][0] == 1


def _cells_table(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    geoms, nuclei = [], []
    for cx, cy in rng.uniform(0, 150_000, (n, 2)):
        k = int(rng.integers(3, 24))
        t = np.sort(rng.uniform(0, 2 * np.pi, k))
        r = rng.uniform(4, 12, k)
        ring = np.round(np.column_stack([cx + r * np.cos(t), cy + r * np.sin(t)]), 3)
        geoms.append(shapely.Polygon(ring))
        nuclei.append(shapely.Point(cx, cy).buffer(2, quad_segs=3))
    geoms = [g if g.is_valid else g.convex_hull for g in geoms]
    return pd.DataFrame({"object_type": "cell", "classification": rng.choice(["A", "B"], n),
                         "geometry": geoms, "nucleus": nuclei, "m": rng.normal(size=n)})  # fmt: skip


def test_centroid_mode_matches_shapely_centroids_and_builds_no_polygon(tmp_path, monkeypatch):
    table = _cells_table(400)
    path = hs.write_geojson(tmp_path / "cells.geojson", table)
    full = hs.read_geojson(path)
    want = shapely.centroid(table["geometry"].to_numpy())
    np.testing.assert_allclose(full["x"], shapely.get_x(want), atol=1e-6)

    def no_polygons(*args, **kwargs):
        raise AssertionError("a polygon was built")

    monkeypatch.setattr(hs.export.geojson, "_one_geometry", no_polygons)
    monkeypatch.setattr(hs.export.geojson.shapely, "polygons", no_polygons)
    got = hs.read_geojson(path, geometry="centroid")
    np.testing.assert_allclose(got["x"], shapely.get_x(want), rtol=0, atol=1e-6)
    np.testing.assert_allclose(got["y"], shapely.get_y(want), rtol=0, atol=1e-6)
    assert got["m"].tolist() == full["m"].tolist() and got["id"].tolist() == full["id"].tolist()


def test_centroid_mode_streams_across_blocks(tmp_path, monkeypatch):
    from histoscope.export import _geojson_stream

    table = _cells_table(300, seed=1)
    path = hs.write_geojson(tmp_path / "cells.geojson.gz", table)
    monkeypatch.setattr(_geojson_stream, "_CHUNK", 7)  # chunks and blocks end mid-feature
    block = _geojson_stream._Stripped.__init__.__defaults__
    monkeypatch.setattr(_geojson_stream._Stripped.__init__, "__defaults__", (301,))
    got = hs.read_geojson(path, geometry="centroid")
    monkeypatch.setattr(_geojson_stream._Stripped.__init__, "__defaults__", block)
    _assert_same_but_geometry(got, hs.read_geojson(path))


def test_bbox_and_limit_keep_objects_centred_inside_with_full_geometry(tmp_path):
    table = _cells_table(500, seed=2)
    path = hs.write_geojson(tmp_path / "cells.geojson", table)
    full = hs.read_geojson(path)
    box = (20_000.0, 30_000.0, 90_000.0, 110_000.0)
    inside = full[(full.x >= box[0]) & (full.x < box[2]) & (full.y >= box[1]) & (full.y < box[3])]
    got = hs.read_geojson(path, bbox=box)
    assert got.attrs["matched"] == len(inside) > 10
    assert got["id"].tolist() == inside["id"].tolist()
    assert all(a.equals(b) for a, b in zip(got["geometry"], inside["geometry"], strict=True))
    assert all(a.equals(b) for a, b in zip(got["nucleus"], inside["nucleus"], strict=True))
    capped = hs.read_geojson(path, bbox=box, limit=5, geometry="centroid")
    assert capped["id"].tolist() == inside["id"].tolist()[:5]
    assert capped.attrs["matched"] == len(inside) and capped["geometry"].isna().all()


@pytest.mark.parametrize(
    "kwargs, match",
    [({"geometry": "outline"}, "geometry must be"), ({"bbox": (0, 0, 1)}, "bbox must be"),
     ({"bbox": (0, 0, np.nan, 1)}, "bbox must be"), ({"limit": -1}, "limit must be"),
     ({"limit": 2.5}, "limit must be"), ({"limit": "3"}, "limit must be"),
     ({"bbox": ("a", 0, 1, 1)}, "bbox must be"), ({"bbox": ("0", 0, 1, 1)}, "bbox must be"),
     ({"bbox": (10, 10, 0, 0)}, "bbox .* must have x0 < x1"),
     ({"bbox": (0, 5, 10, 5)}, "bbox .* must have x0 < x1")],
)  # fmt: skip
def test_scan_options_out_of_range_are_refused(tmp_path, kwargs, match):
    path = hs.write_geojson(tmp_path / "c.geojson", _cells_table(2))
    with pytest.raises(ValueError, match=match):
        hs.read_geojson(path, **kwargs)


def test_centroid_mode_keeps_measurements_objects_do_not_share(tmp_path):
    doc = [_detection(SQUARE["coordinates"]) for _ in range(3)]
    doc[0]["properties"]["measurements"] = {"a": 1.5, "b": 2}
    doc[1]["properties"]["measurements"] = {"b": None}
    doc[2]["properties"]["measurements"] = {"c": -3.0, "a": 4}
    path = tmp_path / "mixed.geojson"
    path.write_text(json.dumps(doc))
    got = hs.read_geojson(path, geometry="centroid")
    _assert_same_but_geometry(got, hs.read_geojson(path))
    assert got["a"].tolist()[::2] == [1.5, 4.0] and np.isnan(got["a"][1])
    assert got["b"].tolist()[0] == 2.0 and np.isnan(got["b"][1]) and got["c"].tolist()[2] == -3.0


def test_centroid_mode_cuts_coordinates_wherever_they_stand(tmp_path):
    ring = [[0, 0], [12, 0], [12, 6], [0, 6], [0, 0]]
    first = {
        "type": "Feature",
        "geometry": {"coordinates": [ring], "type": "Polygon"},
        "properties": {"objectType": "detection", "measurements": {"coordinates": 3}},
    }
    spaced = ('{"type": "Feature", "properties": {"objectType": "cell", "name": "a \\"coordinates\\": [1]"},'
              ' "nucleusGeometry": {"coordinates" :\n [ [ [1, 1], [2, 1], [2, 2], [1, 1] ] ] ,'
              ' "type": "Polygon"}, "geometry": {"type" : "Polygon", "coordinates"\t: [[ [20, 0],'
              ' [30, 0], [30, 10], [20, 10] ]] }}')  # fmt: skip
    path = tmp_path / "odd.geojson"
    path.write_text(
        f'{{"features": [{json.dumps(first)},\n  {spaced}], "type": "FeatureCollection"}}'
    )
    got = hs.read_geojson(path, geometry="centroid")
    _assert_same_but_geometry(got, hs.read_geojson(path))
    assert got[["x", "y"]].values.tolist() == [[6.0, 3.0], [25.0, 5.0]]
    assert got["coordinates"].tolist()[0] == 3.0 and got["name"][1] == 'a "coordinates": [1]'


_GOOD = ('{"type":"Feature","geometry":{"type":"Polygon","coordinates":[[[0,0],[10,0],[10,10],'
         '[0,0]]]},"properties":{"objectType":"detection"}}')  # fmt: skip


def _one(coords: str, props: str = '"objectType":"detection"') -> str:
    geometry = '{"type":"Polygon","coordinates":' + coords + "}"
    return '{"type":"Feature","geometry":' + geometry + ',"properties":{' + props + "}}"


@pytest.mark.parametrize(
    "feature",
    [_one("[[[+0,0],[10,0],[10,10],[0,0]]]"), _one("[[[.5,0],[10,0],[10,10],[.5,0]]]"),
     _one("[[[5.,0],[10,0],[10,10],[5.,0]]]"), _one("[[[05,0],[10,0],[10,10],[05,0]]]"), _one("[[[-05,0],[10,0],[10,10],[-05,0]]]"),
     _one("[[[1e-05,0],[1E+1,0.05],[10,10],[1e-05,0]]]"),
     _one("[[[0,0,0],[1],[1,1],[0,0]]]"), _one("[[[0,0],[10,0],[10,10],[0,0]]]",
     '"objectType":"detection","coordinates":[1,"a"]'),
     _one("[[[0,0],[10,0],[10,10],[0,0]]]", '"objectType":"detection","coordinates":[[1,2]]')],
)  # fmt: skip
def test_centroid_scan_takes_only_strict_json_one_ring_polygons(tmp_path, feature):
    """Invalid numbers and odd vertices get the full reader's answer; properties are not cut."""
    path = tmp_path / "f.geojson"
    path.write_text("[" + ",".join([_GOOD, feature, _GOOD]) + "]", encoding="utf-8")
    answers = []
    for mode in ("full", "centroid"):
        try:
            df = hs.read_geojson(path, geometry=mode)
            answers.append(np.round(df[["x", "y"]].to_numpy(), 9).tolist())
        except hs.GeoJSONError as exc:
            answers.append(str(exc).split(": ")[1])  # the feature it names
    assert answers[0] == answers[1]
