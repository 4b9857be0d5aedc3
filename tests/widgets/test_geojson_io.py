"""QuPath GeoJSON in a real viewer: objects over their slide in µm, layers saved in level-0 px."""

from __future__ import annotations

import json

import napari
import numpy as np
import pandas as pd
import pytest
import shapely

import histoscope as hs
from histoscope._reader import get_geojson_reader


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer()


@pytest.fixture
def objects(tmp_path):
    """Two annotations (a square, a triangle) and three classified cells, level-0 px."""
    cells = [shapely.Point(300 + 40 * i, 200).buffer(8, quad_segs=4) for i in range(3)]
    table = pd.DataFrame({
        "object_type": ["annotation", "annotation", "cell", "cell", "cell"],
        "classification": ["Tumor", "Stroma", "Tumor", "Immune cells", "Tumor"],
        "color": [(200, 0, 0), (150, 200, 150), (200, 0, 0), (160, 90, 160), (200, 0, 0)],
        "geometry": [shapely.box(100, 50, 400, 250), shapely.Polygon([(500, 500), (900, 500), (700, 800)]), *cells],
        "nucleus": [None, None, *[c.centroid.buffer(3) for c in cells]],
        "Area": [np.nan, np.nan, 1.0, 2.0, 3.0],
    })  # fmt: skip
    return hs.write_geojson(tmp_path / "objects.geojson", table), table


def test_geojson_opens_over_slide_in_um(viewer, pyramid_tiff, objects):
    path, table = objects
    viewer.open(str(pyramid_tiff), plugin="napari-histoscope")
    layers = viewer.open(str(path), plugin="napari-histoscope")
    shapes = next(ly for ly in layers if isinstance(ly, napari.layers.Shapes))
    points = next(ly for ly in layers if isinstance(ly, napari.layers.Points))
    np.testing.assert_allclose(shapes.scale, (0.5, 0.5))
    np.testing.assert_allclose(points.scale, (0.5, 0.5))
    square = shapes.data[0]  # (y, x) data = level-0 px
    world = np.array([shapes.data_to_world(v) for v in square])
    np.testing.assert_allclose(np.sort(world[:, 1]), np.sort([100, 400, 400, 100]) * 0.5)
    np.testing.assert_allclose(np.sort(world[:, 0]), np.sort([50, 50, 250, 250]) * 0.5)
    assert points.features["class"].tolist() == ["Tumor", "Immune cells", "Tumor"]
    assert points.features["Area"].tolist() == [1.0, 2.0, 3.0]
    np.testing.assert_allclose(points.face_color[1, :3], np.array([160, 90, 160]) / 255)
    np.testing.assert_allclose(points.data[:, 1], [300, 340, 380], atol=1e-6)


def test_geojson_without_slide_is_in_pixels(viewer, objects):
    path, _ = objects
    layers = viewer.open(str(path), plugin="napari-histoscope")
    assert all(np.allclose(ly.scale, (1, 1)) for ly in layers)


def test_many_polygons_load_as_points(viewer, tmp_path, monkeypatch):
    monkeypatch.setattr("histoscope._reader.MAX_SHAPES", 10)
    table = pd.DataFrame({
        "object_type": "annotation",
        "geometry": [shapely.box(i * 20, 0, i * 20 + 10, 10) for i in range(30)],
    })  # fmt: skip
    path = hs.write_geojson(tmp_path / "many.geojson", table)
    [layer] = viewer.open(str(path), plugin="napari-histoscope")
    assert isinstance(layer, napari.layers.Points) and len(layer.data) == 30


def test_get_geojson_reader_is_cheap_and_sniffs_json(tmp_path, objects):
    path, _ = objects
    other = tmp_path / "settings.json"
    other.write_text(json.dumps({"threshold": 0.5}))
    as_json = tmp_path / "objects.json"
    as_json.write_text(path.read_text())
    assert get_geojson_reader(str(other)) is None
    assert get_geojson_reader(str(tmp_path / "missing.json")) is None
    assert get_geojson_reader(str(as_json)) is not None
    assert get_geojson_reader(str(path)) is not None


def _reread(path) -> pd.DataFrame:
    raw = json.loads(open(path).read())["features"]
    assert all("id" in f for f in raw)
    return hs.read_geojson(path)


def test_points_layer_saves_level0_pixels(viewer, tmp_path, pyramid_tiff):
    viewer.open(str(pyramid_tiff), plugin="napari-histoscope")
    feats = pd.DataFrame({"class": ["Tumor", "Stroma"], "score": [0.25, 0.75]})
    layer = viewer.add_points(
        [[100.0, 200.0], [300.0, 50.0]], scale=(0.5, 0.5), units=("um", "um"), features=feats
    )  # data = level-0 px (y, x)
    out = tmp_path / "points.geojson"
    napari.save_layers(str(out), [layer], plugin="napari-histoscope")
    df = _reread(out)
    assert df["geometry"].map(lambda p: (p.x, p.y)).tolist() == [(200.0, 100.0), (50.0, 300.0)]
    assert df["classification"].tolist() == ["Tumor", "Stroma"]
    assert df["score"].tolist() == [0.25, 0.75]
    csv = tmp_path / "points.csv"
    napari.save_layers(str(csv), [layer], plugin="napari-histoscope")
    table = pd.read_csv(csv)
    assert table[["x", "y"]].to_numpy().tolist() == [[200.0, 100.0], [50.0, 300.0]]


def test_opened_objects_save_back_equal(viewer, tmp_path, pyramid_tiff, objects):
    path, table = objects
    viewer.open(str(pyramid_tiff), plugin="napari-histoscope")
    layers = viewer.open(str(path), plugin="napari-histoscope")
    shapes = next(ly for ly in layers if isinstance(ly, napari.layers.Shapes))
    out = tmp_path / "again.geojson"
    napari.save_layers(str(out), [shapes], plugin="napari-histoscope")
    again = _reread(out)
    first = hs.read_geojson(path)
    assert again["id"].tolist() == first["id"][:2].tolist()
    assert again["classification"].tolist() == ["Tumor", "Stroma"]
    assert again["color"].tolist() == [(200, 0, 0), (150, 200, 150)]
    for a, b in zip(first["geometry"][:2], again["geometry"], strict=True):
        assert a.symmetric_difference(b).area < 1e-6


def test_labels_layer_saves_outlines_in_level0_pixels(viewer, tmp_path, pyramid_tiff):
    viewer.open(str(pyramid_tiff), plugin="napari-histoscope")
    labels = np.zeros((40, 60), dtype=np.int32)
    labels[10:20, 5:25] = 1  # 20 x 10 mask pixels
    labels[25:35, 30:50] = 2
    labels[28:32, 38:42] = 0  # a hole
    layer = viewer.add_labels(labels, scale=(8.0, 8.0), units=("um", "um"))  # 16 level-0 px each
    out = tmp_path / "labels.geojson"
    napari.save_layers(str(out), [layer], plugin="napari-histoscope")
    df = _reread(out)
    assert df["name"].tolist() == ["label 1", "label 2"]
    minx, miny, maxx, maxy = df["geometry"][0].bounds
    # outline through pixel-edge midpoints: pixels 5..24 -> x 4.5..24.5 at 16 px per mask pixel
    np.testing.assert_allclose([minx, maxx, miny, maxy], np.array([4.5, 24.5, 9.5, 19.5]) * 16)
    assert len(df["geometry"][1].interiors) == 1


def test_a_layer_without_length_units_over_a_slide_saves_in_level0_pixels(
    viewer, tmp_path, pyramid_tiff
):
    viewer.open(str(pyramid_tiff), plugin="napari-histoscope")
    labels = np.zeros((40, 60), dtype=np.int32)
    labels[10:20, 5:25] = 1
    layer = viewer.add_labels(labels, scale=(8.0, 8.0))  # no units: world is the slide's µm
    out = tmp_path / "plain.geojson"
    napari.save_layers(str(out), [layer], plugin="napari-histoscope")
    minx, miny, maxx, maxy = _reread(out)["geometry"][0].bounds
    np.testing.assert_allclose([minx, maxx, miny, maxy], np.array([4.5, 24.5, 9.5, 19.5]) * 16)


def test_holes_and_parts_survive_a_trip_through_napari(viewer, tmp_path, pyramid_tiff):
    import shapely

    viewer.open(str(pyramid_tiff), plugin="napari-histoscope")
    ring = shapely.box(100, 100, 500, 500).difference(shapely.box(200, 200, 300, 300))
    obj = shapely.MultiPolygon([ring, shapely.box(600, 100, 700, 200)])
    src = hs.write_geojson(tmp_path / "in.geojson", pd.DataFrame(
        {"geometry": [obj], "classification": ["Necrosis"], "object_type": ["annotation"]}))  # fmt: skip
    [layer] = viewer.open(str(src), plugin="napari-histoscope")
    assert len(layer.data) == 2  # napari draws the two outer outlines
    out = tmp_path / "out.geojson"
    napari.save_layers(str(out), [layer], plugin="napari-histoscope")
    back = _reread(out)
    assert len(back) == 1 and back["geometry"][0].area == pytest.approx(obj.area)
    assert back["id"][0] == hs.read_geojson(src)["id"][0]  # one object, its own id
    layer.data = [layer.data[0] + 40, layer.data[1]]  # an edited outline: parts joined, one id
    napari.save_layers(str(out), [layer], plugin="napari-histoscope")
    edited = _reread(out)
    assert len(edited) == 1 and edited["geometry"][0].geom_type == "MultiPolygon"


def test_result_rasters_reopen_where_their_layers_were(viewer, tmp_path):
    import histoscope as hs
    from histoscope.synthetic import generate

    slide = generate(tmp_path / "s", kind="he", size=(1024, 1024), seed=4).slide
    session = hs.open_session(slide, in_memory=True)
    heat, tissue = hs.tasks.run("tumour", session), hs.tasks.run("tissue", session)
    heat.save(tmp_path / "o")
    tissue.save(tmp_path / "o")
    for result, folder, kind in ((heat, "tumour_heatmap.ome.zarr", "image"),
                                 (tissue, "tissue_mask.ome.zarr", "labels")):  # fmt: skip
        [layer] = viewer.open(str(tmp_path / "o" / folder), plugin="napari-histoscope")
        data, kw, want_kind = result.to_layers()[0]
        assert layer._type_string == kind == want_kind
        np.testing.assert_allclose(layer.scale, kw["scale"])
        np.testing.assert_allclose(layer.translate, kw["translate"])
        level0 = layer.data[0] if layer.multiscale else layer.data
        np.testing.assert_array_equal(np.asarray(level0), data)


@pytest.fixture
def grid_cells(tmp_path):
    """600 cells on a 30 x 20 grid over the slide (level-0 px), each a distinct hexagon."""
    centres = [(60.0 + 70 * i, 60.0 + 70 * j) for j in range(20) for i in range(30)]
    table = pd.DataFrame({
        "object_type": "cell",
        "classification": ["Tumor" if k % 3 else "Stroma" for k in range(len(centres))],
        "color": [(200, 0, 0) if k % 3 else (0, 160, 0) for k in range(len(centres))],
        "geometry": [shapely.Point(x, y).buffer(10 + k % 7, quad_segs=2)
                     for k, (x, y) in enumerate(centres)],
        "nucleus": [shapely.Point(x, y).buffer(4) for x, y in centres],
    })  # fmt: skip
    return hs.write_geojson(tmp_path / "cells.geojson", table)


def _outlines_after(viewer, qtbot, run):
    name = "cells objects outlines"
    before = viewer.layers[name] if name in viewer.layers else None
    worker = run()
    assert worker is not None
    # not worker.finished: a small file can be read before a waitSignal would connect
    qtbot.waitUntil(lambda: name in viewer.layers and viewer.layers[name] is not before,
                    timeout=30_000)  # fmt: skip
    return viewer.layers[name]


def test_outlines_in_view_come_back_on_request_over_the_slide(
    viewer, qtbot, pyramid_tiff, grid_cells, monkeypatch
):
    from histoscope._reader import view_bbox
    from histoscope._widgets.outlines import show_outlines_in_view

    said = []
    monkeypatch.setattr("napari.utils.notifications.show_info", said.append)
    viewer.open(str(pyramid_tiff), plugin="napari-histoscope")
    [points] = viewer.open(str(grid_cells), plugin="napari-histoscope")
    viewer.scene.camera.center = (301.3, 402.7)  # µm: level-0 (602.6, 805.4), off the grid
    viewer.scene.camera.zoom = 2.0
    x0, y0, x1, y1 = view_bbox(viewer, points)
    assert 0 < x0 < x1 < 2100 and 0 < y0 < y1 < 1400  # a part of the objects, in level-0 px
    full = hs.read_geojson(grid_cells)
    inside = full[(full.x >= x0) & (full.x < x1) & (full.y >= y0) & (full.y < y1)]
    assert 4 < len(inside) < len(full)

    shapes = _outlines_after(viewer, qtbot, lambda: show_outlines_in_view(viewer))
    assert isinstance(shapes, napari.layers.Shapes)
    assert shapes.features["id"].tolist() == inside["id"].tolist()
    np.testing.assert_allclose(shapes.scale, points.scale)
    np.testing.assert_allclose(shapes.translate, points.translate)
    for verts, geom in zip(shapes.data, inside["geometry"], strict=True):  # exactly the polygons
        np.testing.assert_allclose(verts, np.asarray(geom.exterior.coords)[:-1, ::-1], atol=1e-9)
    first = shapes.data[0][0]
    np.testing.assert_allclose(shapes.data_to_world(first), first * 0.5)  # µm over the slide
    assert said and f"{len(inside)} outlines" in said[-1]

    viewer.layers.selection.active = points
    capped = _outlines_after(viewer, qtbot, lambda: show_outlines_in_view(viewer, limit=3))
    assert len(capped.data) == 3 and capped.features["id"].tolist() == inside["id"].tolist()[:3]
    assert [ly.name for ly in viewer.layers].count("cells objects outlines") == 1  # replaced
    assert f"{len(inside)} objects are centred in view, only the first 3" in said[-1]


def test_outlines_in_view_is_a_layer_menu_command(viewer, qtbot, grid_cells, monkeypatch):
    from napari._app_model import get_app_model
    from npe2 import PluginManager

    said = []
    monkeypatch.setattr("napari.utils.notifications.show_info", said.append)
    manifest = PluginManager.instance().get_manifest("napari-histoscope")
    [item] = [m for m in manifest.contributions.menus["napari/layers/context"]
              if m.command == "napari-histoscope.show_outlines_in_view"]  # fmt: skip
    assert "points" in item.when
    viewer.add_image(np.zeros((8, 8)), name="not objects")
    get_app_model().commands.execute_command("napari-histoscope.show_outlines_in_view").result()
    assert "select a Points layer opened from a QuPath GeoJSON file" in said[-1]
    [points] = viewer.open(str(grid_cells), plugin="napari-histoscope")
    viewer.layers.selection.active = points
    viewer.reset_view()
    future = get_app_model().commands.execute_command("napari-histoscope.show_outlines_in_view")
    worker = future.result()
    with qtbot.waitSignal(worker.finished, timeout=30_000):
        pass
    qtbot.waitUntil(lambda: "cells objects outlines" in viewer.layers, timeout=10_000)
    assert len(viewer.layers["cells objects outlines"].data) == 600  # all in view


def test_outlines_in_view_only_of_what_the_points_layer_holds(viewer, qtbot, tmp_path, monkeypatch):
    import json

    from histoscope._widgets.outlines import show_outlines_in_view

    said = []
    monkeypatch.setattr("napari.utils.notifications.show_info", said.append)
    cells = [shapely.Point(60.0 + 70 * i, 60.0).buffer(10, quad_segs=2) for i in range(8)]
    table = pd.DataFrame({
        "object_type": ["cell"] * 8 + ["annotation"],
        "classification": "Tumor",
        "geometry": cells + [shapely.box(0, 0, 600, 120)],
    })  # fmt: skip
    path = hs.write_geojson(tmp_path / "cells.geojson", table)
    layers = viewer.open(str(path), plugin="napari-histoscope")
    points = next(ly for ly in layers if isinstance(ly, napari.layers.Points))
    kept = points.features["id"].tolist()[3:]
    points.selected_data = {0, 1, 2}
    points.remove_selected()  # the user deletes three cells
    viewer.layers.selection.active = points
    viewer.reset_view()
    shapes = _outlines_after(viewer, qtbot, lambda: show_outlines_in_view(viewer))
    assert shapes.features["id"].tolist() == kept  # neither the deleted cells nor the annotation
    assert said[-1].startswith("5 outlines")

    doc = json.loads(path.read_text())  # the same file without ids
    for feature in doc["features"]:
        feature.pop("id", None)
    bare = tmp_path / "bare" / "cells.geojson"
    bare.parent.mkdir()
    bare.write_text(json.dumps(doc))
    viewer.layers.clear()
    layers = viewer.open(str(bare), plugin="napari-histoscope")
    points = next(ly for ly in layers if isinstance(ly, napari.layers.Points))
    points.selected_data = {0}
    points.remove_selected()
    viewer.layers.selection.active = points
    viewer.reset_view()
    shapes = _outlines_after(viewer, qtbot, lambda: show_outlines_in_view(viewer))
    assert len(shapes.data) == 8  # no ids: the deleted cell cannot be told apart
    assert "gives its objects no ids" in said[-1]
