"""A viewer's work is saved into the slide's session folder and reopens exactly."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest


@pytest.fixture
def slide_path(tmp_path):
    from histoscope.slide import write_pyramidal_tiff

    rng = np.random.default_rng(3)
    img = rng.integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
    return write_pyramidal_tiff(tmp_path / "case.tif", img, mpp=0.5, min_size=256)


def _state(layer):
    out = {"name": layer.name, "type": layer._type_string, "opacity": layer.opacity,
           "visible": layer.visible, "scale": list(layer.scale),
           "translate": list(layer.translate)}  # fmt: skip
    if layer._type_string == "image" and not layer.rgb:
        out["colormap"] = layer.colormap.name
        out["contrast_limits"] = list(layer.contrast_limits)
    return out


def test_layers_reopen_exactly_from_the_session_folder(make_napari_viewer, slide_path):
    from histoscope._widgets._session import AutoSave
    from histoscope.results import fading_colormap

    viewer = make_napari_viewer()
    viewer.open(str(slide_path), plugin="napari-histoscope")
    viewer.add_image(np.random.default_rng(0).random((8, 8), np.float32), name="heat",
                     scale=(64, 64), translate=(31.75, 31.75),
                     colormap=fading_colormap("inferno"), contrast_limits=(0.2, 0.8),
                     opacity=0.7)  # fmt: skip
    feats = pd.DataFrame({"class": ["tumour", "stroma"], "area": [11.0, 14.0]})
    viewer.add_points([[10.0, 20.0], [30.0, 40.0]], name="cells", features=feats,
                      face_color="class", scale=(0.5, 0.5))  # fmt: skip
    viewer.add_shapes(
        [np.array([[0, 0], [0, 100], [100, 100]])], name="roi", opacity=0.3, shape_type="polygon"
    )
    viewer.layers["roi"].visible = False
    viewer.layers.move(3, 1)  # roi just above the slide
    saver = AutoSave.for_viewer(viewer)
    assert saver.save_now() is not None, saver.error
    before = [_state(ly) for ly in viewer.layers]

    again = make_napari_viewer()
    again.open(str(slide_path.with_name("case.tif.histoscope")), plugin="napari-histoscope")
    after = [_state(ly) for ly in again.layers]
    assert after == before
    np.testing.assert_array_equal(again.layers["heat"].data, viewer.layers["heat"].data)
    np.testing.assert_allclose(again.layers["heat"].colormap.colors,
                               viewer.layers["heat"].colormap.colors)  # fmt: skip
    pd.testing.assert_frame_equal(again.layers["cells"].features, viewer.layers["cells"].features)
    np.testing.assert_array_equal(again.layers["cells"].face_color,
                                  viewer.layers["cells"].face_color)  # fmt: skip
    np.testing.assert_array_equal(again.layers["roi"].data[0], viewer.layers["roi"].data[0])


def test_an_edit_is_saved_without_pressing_anything(make_napari_viewer, slide_path, qtbot):
    from histoscope._widgets._session import AutoSave
    from histoscope.session_store import read_manifest

    viewer = make_napari_viewer()
    viewer.open(str(slide_path), plugin="napari-histoscope")
    saver = AutoSave.for_viewer(viewer)
    viewer.add_points([[1.0, 2.0]], name="marks")
    folder = slide_path.with_name("case.tif.histoscope")
    qtbot.waitUntil(lambda: [e["name"] for e in read_manifest(folder).get("layers", [])]
                    == ["marks"], timeout=10_000)  # fmt: skip
    viewer.layers["marks"].add([[5.0, 6.0]])
    qtbot.waitUntil(lambda: len(_saved_points(folder)) == 2, timeout=10_000)
    assert saver.error is None


def _saved_points(folder):
    import histoscope as hs
    from histoscope.session_store import read_manifest

    doc = read_manifest(folder)
    if not doc.get("layers"):
        return []
    with hs.open_session(doc["slide"], folder) as s:
        return s.layers()[0][0]


def _saved_names(folder):
    from histoscope.session_store import read_manifest

    return [e["name"] for e in read_manifest(folder).get("layers", [])]


def test_a_new_viewer_never_overwrites_a_saved_session(make_napari_viewer, slide_path, qtbot):
    from histoscope._widgets._session import AutoSave
    from histoscope._widgets.tumour import TumourWidget

    folder = slide_path.with_name("case.tif.histoscope")
    first = make_napari_viewer()
    first.open(str(slide_path), plugin="napari-histoscope")
    first.add_points([[1.0, 2.0]], name="kept")
    assert AutoSave.for_viewer(first).save_now() and _saved_names(folder) == ["kept"]

    fresh = make_napari_viewer()  # the slide again, without its session, and a panel
    fresh.open(str(slide_path), plugin="napari-histoscope")
    TumourWidget(fresh)
    fresh.add_points([[3.0, 4.0]], name="new")
    saver = AutoSave.for_viewer(fresh)
    assert saver.save_now()
    assert _saved_names(folder) == ["kept"]  # nothing overwritten
    assert any("not shown here" in n for n in saver.notes)

    again = make_napari_viewer()  # reopening the folder continues it, panel or not
    again.open(str(folder), plugin="napari-histoscope")
    again.add_points([[5.0, 6.0]], name="added later")
    qtbot.waitUntil(lambda: _saved_names(folder) == ["kept", "added later"], timeout=10_000)


def test_each_slide_keeps_its_own_layers(make_napari_viewer, slide_path, tmp_path):
    from histoscope._widgets._session import AutoSave
    from histoscope.slide import write_pyramidal_tiff

    other = write_pyramidal_tiff(tmp_path / "other.tif", np.full((512, 512, 3), 90, np.uint8),
                                 mpp=0.5)  # fmt: skip
    viewer = make_napari_viewer()
    viewer.open(str(slide_path), plugin="napari-histoscope")
    saver = AutoSave.for_viewer(viewer)
    viewer.add_shapes([np.array([[0, 0], [0, 50], [50, 50]])], shape_type="polygon", name="on A")
    viewer.open(str(other), plugin="napari-histoscope")
    viewer.layers.selection.active = viewer.layers["other.tif"]
    viewer.add_points([[1.0, 1.0]], name="on B")
    assert saver.save_now()
    assert _saved_names(slide_path.with_name("case.tif.histoscope")) == ["on A"]
    assert _saved_names(tmp_path / "other.tif.histoscope") == ["on B"]


def test_a_pyramid_layer_is_saved_and_reopens(make_napari_viewer, slide_path):
    from histoscope._widgets._session import AutoSave

    viewer = make_napari_viewer()
    viewer.open(str(slide_path), plugin="napari-histoscope")
    levels = [np.random.default_rng(0).random((64, 64), np.float32)]
    levels.append(levels[0][::2, ::2].copy())
    viewer.add_image(levels, multiscale=True, scale=(8, 8), name="pyramid")
    assert AutoSave.for_viewer(viewer).save_now()
    again = make_napari_viewer()
    again.open(str(slide_path.with_name("case.tif.histoscope")), plugin="napari-histoscope")
    back = again.layers["pyramid"]
    assert back.multiscale and len(back.data) == 2
    np.testing.assert_array_equal(np.asarray(back.data[1]), levels[1])
