"""IHC measurement widget on scikit-image's real IHC image."""

from __future__ import annotations

import numpy as np
import pytest

from histoscope._widgets.ihc import IHC_OUTSIDE_TEXT, IHCWidget
from tests.widgets._cancel import cancel_after_first_step


@pytest.fixture
def viewer(make_napari_viewer):
    v = make_napari_viewer()
    v.open_sample("napari-histoscope", "skimage-ihc")
    return v


def test_measures_whole_image_into_points_and_numbers(viewer, qtbot):
    widget = IHCWidget(viewer)
    widget.compartment.setCurrentText("membrane")
    widget.scope.setCurrentIndex(1)
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)  # set by the finished slot
    points = viewer.layers["IHC cells (IHC (scikit-image))"]
    assert len(points.data) > 150
    assert set(np.unique(points.features["score"])) <= {0, 1, 2, 3}
    np.testing.assert_allclose(points.data.max(axis=0), [256, 256], rtol=0.02)  # 512 px at 0.5 µm
    assert float(widget.numbers["h_score"].text()) > 0
    assert widget.numbers["location"].text() == "cytoplasmic/membranous"
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()
    # a real image, unlike the synthetic slides the learned detector was trained on: red line
    assert widget.result.summary()["outside_training_data"] is True
    flag = widget.controls.training_data_flag
    assert flag.isVisibleTo(widget) and flag.text() == IHC_OUTSIDE_TEXT
    assert "e04040" in flag.styleSheet() and "vs threshold" in flag.toolTip()


def test_visible_region_measures_only_what_is_in_view(viewer, qtbot):
    widget = IHCWidget(viewer)
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    camera.center = (64, 64)
    camera.zoom = camera.zoom * 4
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)  # set by the finished slot
    region = widget.result.provenance.tile_grid["region"]
    assert region[2] < 512 and region[3] < 512


def test_bad_thresholds_are_reported_not_raised(viewer):
    widget = IHCWidget(viewer)
    widget.thresholds[0].setValue(0.9)  # above 2+ threshold
    assert widget.run() is None
    assert "thresholds" in widget.status.text()


def test_cancel_stops_and_keeps_layers(viewer, qtbot):
    big = np.tile(viewer.layers[0].data, (4, 4, 1))
    viewer.add_image(big, rgb=True, name="big", scale=(0.5, 0.5))
    widget = IHCWidget(viewer)
    widget.layer_combo.setCurrentText("big")
    widget.scope.setCurrentIndex(1)
    worker = widget.run()
    assert worker is not None
    cancel_after_first_step(widget, worker)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)  # set by the finished slot
    assert widget.run_button.isEnabled() and "Cancelled" in widget.status.text()
    res = widget.result
    done, total = res.provenance.tile_grid["tiles_done"], res.provenance.tile_grid["tiles"]
    assert res.cancelled and 1 <= done < total  # finished tiles kept, the rest never read
    points = viewer.layers["IHC cells (big)"]
    assert len(points.data) == res.n_cells > 0
    assert [ly.name for ly in viewer.layers] == ["IHC (scikit-image)", "big", "IHC cells (big)"]
    # a cancelled run is not judged: a grey line saying so, not the red one
    flag = widget.controls.training_data_flag
    assert flag.isVisibleTo(widget) and flag.text().startswith("Training-data check not done")
    assert "e04040" not in flag.styleSheet()


def test_an_image_without_dab_is_flagged_not_scored(make_napari_viewer, qtbot, tmp_path):
    from histoscope.synthetic import generate

    he = generate(tmp_path, kind="he", size=(1024, 1024), seed=7).slide
    viewer = make_napari_viewer()
    viewer.open(str(he), plugin="napari-histoscope")
    widget = IHCWidget(viewer)
    widget.scope.setCurrentIndex(1)
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    assert "no DAB staining found" in widget.status.text()  # seed 7: 1.1 % DAB-like pixels
    assert widget.numbers["h_score"].text() == "– (no DAB)"
    assert "0:" in widget.breakdown.text() and "3+:" in widget.breakdown.text()


def test_count_inside_a_drawn_tumour_region_names_the_denominator(viewer, qtbot):
    widget = IHCWidget(viewer)
    widget.scope.setCurrentIndex(1)
    assert widget.count_inside.currentText() == "whole tissue"
    # the user outlines the left half (x < 128 µm) as tumour, and also paints it as labels
    viewer.add_shapes([np.array([[0, 0], [0, 128], [256, 128], [256, 0]])],
                      shape_type="rectangle", name="tumour")  # fmt: skip
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 1
    viewer.add_labels(mask, scale=(4.0, 4.0), translate=(2.0, 2.0), name="painted")  # 0-256 µm
    assert [widget.count_inside.itemText(i) for i in range(widget.count_inside.count())] == [
        "whole tissue", "tumour", "painted"]  # fmt: skip
    widget.count_inside.setCurrentText("tumour")
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    res = widget.result
    left = res.cells["x_um"] < 128
    s = res.summary()
    assert 0 < left.sum() < res.n_cells and np.array_equal(res.inside, left)
    assert s["denominator"] == f"cells inside the tumour region (n={left.sum()})"
    scores = res.cells["score"][left]
    assert s["percent_positive"] == pytest.approx(100 * np.mean(scores > 0))
    assert "cells inside the tumour region" in widget.status.text()
    widget.count_inside.setCurrentText("painted")
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    painted = widget.result.inside
    assert np.array_equal(painted, left)  # the same half, painted instead of drawn


def test_count_inside_is_the_region_at_run_and_follows_renames(viewer, qtbot):
    widget = IHCWidget(viewer)
    widget.scope.setCurrentIndex(1)
    shapes = viewer.add_shapes([np.array([[0, 0], [0, 128], [256, 128], [256, 0]])],
                               shape_type="rectangle", name="tumour")  # fmt: skip
    widget.count_inside.setCurrentText("tumour")
    shapes.name = "tumour (left)"  # renamed before Run: the choice follows the layer
    assert widget.count_inside.currentText() == "tumour (left)"
    assert widget.run() is not None
    shapes.name = "renamed while running"  # renamed and emptied while it runs: counted as at Run
    shapes.data = []
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    res = widget.result
    assert res.inside is not None and np.array_equal(res.inside, res.cells["x_um"] < 128)
    assert "tumour (left) region" in res.summary()["denominator"]
    # the shapes layer now encloses nothing: said at Run, not counted as "whole tissue"
    assert widget.run() is None and "no closed shape" in widget.status.text()
    viewer.layers.remove(shapes)
    widget.count_inside.setCurrentIndex(0)
    assert widget.count_inside.currentText() == "whole tissue"


def test_a_region_without_cells_shows_no_numbers(viewer, qtbot):
    widget = IHCWidget(viewer)
    # a region far off the image (µm 1000-1100): no cell inside, so no percentage
    viewer.add_shapes([np.array([[1000, 1000], [1000, 1100], [1100, 1100], [1100, 1000]])],
                      shape_type="polygon", name="off image")  # fmt: skip
    widget.count_inside.setCurrentText("off image")
    widget.scope.setCurrentIndex(0)  # visible region: the denominator says "in view"
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    assert widget.result.summary()["percent_positive"] is None
    for key in ("percent_positive", "h_score", "allred"):
        assert widget.numbers[key].text() == "–"
    assert "no detected cell inside 'off image region'" in widget.status.text()
    assert "in view" in widget.status.text()


def test_a_removed_count_inside_layer_is_reported(viewer):
    widget = IHCWidget(viewer)
    labels = viewer.add_labels(np.ones((8, 8), np.uint8), name="painted")
    widget.count_inside.setCurrentText("painted")
    layer = widget.count_inside.currentData()
    viewer.layers.remove(labels)
    widget.count_inside.addItem("painted", layer)  # a stale entry, as a queued signal could leave
    widget.count_inside.setCurrentIndex(widget.count_inside.count() - 1)
    assert widget.run() is None and "no longer in the viewer" in widget.status.text()


def test_legend_gives_each_score_its_points_colour_and_share(viewer, qtbot):
    import re

    widget = IHCWidget(viewer)
    widget.scope.setCurrentIndex(1)
    before = widget.breakdown.text()
    assert all(f"{k}:&nbsp;–" in before for k in ("0", "1+", "2+", "3+"))  # colours before a run
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    points = viewer.layers["IHC cells (IHC (scikit-image))"]
    text = widget.breakdown.text()
    shown = re.findall(r"color:#([0-9a-f]{6}).*?&#9675;</span>&nbsp;([0-9+]+):&nbsp;(\d+) %", text)
    assert [k for _, k, _ in shown] == ["0", "1+", "2+", "3+"]
    scores = np.asarray(points.features["score"])
    for score, (hex_, _, pct) in enumerate(shown):
        rgb = np.array([int(hex_[i : i + 2], 16) for i in (0, 2, 4)]) / 255
        if (scores == score).any():  # the swatch is the colour of that score's points
            np.testing.assert_allclose(points.border_color[scores == score][0][:3], rgb, atol=0.01)
        assert abs(int(pct) - 100 * (scores == score).mean()) <= 1
    widget.run()  # a new measurement: the shares are cleared, the colours stay
    assert "%" not in widget.breakdown.text() and "&#9675;" in widget.breakdown.text()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)


def test_cells_are_hollow_rings_around_their_nuclei_and_the_measured_area_is_outlined(
    viewer, qtbot
):
    from histoscope.tasks.ihc_measure import RING_MARGIN_UM

    widget = IHCWidget(viewer)
    widget.scope.setCurrentIndex(0)  # the visible region
    image = viewer.layers["IHC (scikit-image)"]
    viewer.scene.camera.center = (100, 100)
    viewer.scene.camera.zoom = 6.0
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    points = viewer.layers["IHC cells (IHC (scikit-image))"]
    assert len(points.data) > 0
    assert (points.face_color[:, 3] == 0).all()  # hollow: the nucleus shows through
    assert (points.border_color[:, 3] > 0).all() and (points.border_width > 0).all()
    diameter = 2 * np.sqrt(np.asarray(points.features["area_um2"]) / np.pi)
    np.testing.assert_allclose(points.size, diameter + RING_MARGIN_UM, rtol=1e-5)
    box = viewer.layers["IHC measured region (IHC (scikit-image))"]
    names = [ly.name for ly in viewer.layers]
    assert names.index(box.name) < names.index(points.name)  # the rings stay on top
    assert viewer.layers.selection.active is points
    assert box.shape_type == ["rectangle"] and box.face_color[0][3] == 0
    (y0, x0), (y1, x1) = box.data[0].min(axis=0), box.data[0].max(axis=0)
    h, w = np.asarray(image.data.shape[:2]) * image.scale[-2:]
    assert 0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w and (y1 - y0) * (x1 - x0) < h * w  # the view
    inside = ((points.data[:, 0] >= y0) & (points.data[:, 0] <= y1)
              & (points.data[:, 1] >= x0) & (points.data[:, 1] <= x1))  # fmt: skip
    assert inside.all()  # every measured cell lies in the outlined area


def test_a_coarse_scan_is_measured_with_a_warning(viewer, qtbot):
    """The learned detector is validated on 0.5 µm/px scans: a 1 µm/px image is warned about."""
    image = viewer.layers["IHC (scikit-image)"].data[::2, ::2]  # the same tissue at 1 µm/px
    viewer.add_image(image, rgb=True, name="coarse", scale=(1.0, 1.0), units=("um", "um"),
                     metadata={"mpp": 1.0})  # fmt: skip
    widget = IHCWidget(viewer)
    widget.layer_combo.setCurrentText("coarse")
    widget.scope.setCurrentIndex(1)
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    assert widget.result is not None, widget.status.text()
    assert widget.result.summary()["resolution_warning"] is not None
    assert "scanned at 1 µm/px" in widget.status.text()
    assert widget.numbers["h_score"].text() not in ("–", "– (no DAB)")  # still measured


def test_the_outline_follows_a_translated_image_and_is_no_count_inside_choice(viewer, qtbot):
    """The outline sits on the image where napari draws it (scale and translate) and, a
    HistoScope layer, is not offered as a region to count inside; a region named '... region'
    is not called '... region region'."""
    widget = IHCWidget(viewer)
    widget.scope.setCurrentIndex(1)  # the whole image
    image = viewer.layers["IHC (scikit-image)"]
    image.translate = (30.0, 50.0)
    viewer.add_shapes([np.array([[30, 50], [30, 178], [286, 178], [286, 50]])],
                      shape_type="rectangle", name="my region")  # fmt: skip
    widget.count_inside.setCurrentText("my region")
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    box = viewer.layers["IHC measured region (IHC (scikit-image))"]
    h, w = np.asarray(image.data.shape[:2]) * image.scale[-2:]
    np.testing.assert_allclose(box.data[0].min(axis=0), (30.0, 50.0))
    np.testing.assert_allclose(box.data[0].max(axis=0), (30.0 + h, 50.0 + w))
    choices = [widget.count_inside.itemText(i) for i in range(widget.count_inside.count())]
    assert choices == ["whole tissue", "my region"]
    assert "cells inside the my region (n=" in widget.status.text()
    assert "region region" not in widget.status.text()
