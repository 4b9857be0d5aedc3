"""Slide widget and reader inside a real napari viewer."""

from __future__ import annotations

import numpy as np
import pytest

from histoscope._widgets.slide import SlideWidget
from histoscope.layers import SLIDE_KEY


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer()


def test_viewer_opens_slide_through_plugin(viewer, pyramid_tiff):
    layers = viewer.open(str(pyramid_tiff), plugin="napari-histoscope")
    [layer] = layers
    assert layer.multiscale and layer.rgb
    np.testing.assert_allclose(layer.scale, (0.5, 0.5))
    # world extent is the slide's physical size in µm
    np.testing.assert_allclose(layer.extent.world[1], (1536 * 0.5, 2304 * 0.5), rtol=0.01)


def test_widget_opens_slide_in_worker_and_shows_metadata(viewer, qtbot, pyramid_tiff):
    widget = SlideWidget(viewer)
    assert widget.open_path(str(pyramid_tiff)) is not None
    qtbot.waitUntil(lambda: widget._worker is None, timeout=120_000)  # set by the finished slot
    assert len(widget.slide_layers()) == 1
    assert widget.info["mpp"].text() == "0.5 µm/px"
    assert "2304×1536" in widget.info["levels"].text()
    assert widget.open_button.isEnabled()


def test_widget_shows_error_for_corrupt_file_and_keeps_layers(
    viewer, qtbot, tmp_path, pyramid_tiff
):
    widget = SlideWidget(viewer)
    viewer.add_points([[1, 1]], name="my annotations")
    bad = tmp_path / "garbage.ndpi"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    assert widget.open_path(str(bad)) is not None
    qtbot.waitUntil(lambda: widget._worker is None, timeout=120_000)  # set by the finished slot
    assert "garbage.ndpi" in widget.status.text()
    assert [ly.name for ly in viewer.layers] == ["my annotations"]
    assert widget.open_button.isEnabled()


def test_setting_mpp_rescales_layer(viewer, tmp_path):
    from PIL import Image

    from tests.conftest import make_rgb

    png = tmp_path / "field.png"
    Image.fromarray(make_rgb(300, 400)).save(png)
    [layer] = viewer.open(str(png), plugin="napari-histoscope")
    widget = SlideWidget(viewer)
    assert "unknown" in widget.info["mpp"].text()
    widget.mpp_spin.setValue(0.25)
    widget._apply_mpp()
    np.testing.assert_allclose(layer.scale, (0.25, 0.25))
    assert layer.metadata[SLIDE_KEY]["mpp"] == 0.25
    assert layer.metadata["slide"].read_region(0, 0, 50, 75, mpp=0.5).shape == (75, 50, 3)


def test_corrupt_tile_shows_blank_with_one_warning(viewer, tmp_path, monkeypatch):
    import tifffile

    import histoscope._reader as reader_mod
    from histoscope.slide import write_pyramidal_tiff
    from tests.conftest import make_rgb

    path = write_pyramidal_tiff(tmp_path / "bad.tif", make_rgb(1024, 1024), mpp=0.5, min_size=512)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        offsets, counts = page.dataoffsets, page.databytecounts
    with open(path, "r+b") as fh:  # scramble the JPEG data of two level-0 tiles
        for i in (1, 5):
            fh.seek(offsets[i])
            fh.write(bytes(range(256)) * (counts[i] // 256) + b"\xff" * (counts[i] % 256))
    messages = []
    monkeypatch.setattr(reader_mod, "_notify_once", messages.append)
    [layer] = viewer.open(str(path), plugin="napari-histoscope")
    full = np.asarray(layer.data[0])  # what napari's renderer would fetch, tile by tile
    np.asarray(layer.data[0])  # and again: still one warning
    assert len(messages) == 1 and "bad.tif" in messages[0]
    assert (full[:256, 256:512] == 255).all()  # tile 1 is blank (white)
    assert not (full[:256, :256] == 255).all()  # its neighbour is intact


def test_plain_layer_without_mpp_says_unknown_until_set(viewer):
    import dask.array as da

    from histoscope._widgets.slide import MPP_UNKNOWN
    from histoscope.layers import layer_slide

    big = da.zeros((20_000, 20_000, 3), dtype=np.uint8, chunks=(1000, 1000, 3))
    layer = viewer.add_image(big, rgb=True, name="other reader")
    widget = SlideWidget(viewer)
    assert [ly.name for ly in widget.slide_layers()] == ["other reader"]
    assert widget.info["mpp"].text() == MPP_UNKNOWN
    assert widget.info["dimensions"].text() == "20000 × 20000 px"
    assert (
        layer_slide(layer.data, layer.metadata, layer.scale, layer.name, units=layer.units).mpp
        is None
    )
    widget.mpp_spin.setValue(0.25)
    widget._apply_mpp()
    assert widget.info["mpp"].text() == "0.25 µm/px"
    np.testing.assert_allclose(layer.scale, (0.25, 0.25))
    slide = layer_slide(layer.data, layer.metadata, layer.scale, layer.name, units=layer.units)
    assert slide.mpp == 0.25


def test_set_mpp_updates_a_slide_a_task_already_wrapped(viewer):
    from histoscope.layers import layer_slide

    layer = viewer.add_image(np.zeros((64, 64, 3), np.uint8), rgb=True, name="plain")
    layer.metadata["slide"] = layer_slide(layer.data, layer.metadata, layer.scale, layer.name)
    widget = SlideWidget(viewer)
    assert "unknown" in widget.info["mpp"].text()
    widget.mpp_spin.setValue(0.5)
    widget._apply_mpp()
    assert layer.metadata["slide"].mpp == 0.5 and widget.info["mpp"].text() == "0.5 µm/px"


def test_mpp_box_shows_the_slides_own_value_or_unknown(viewer, tmp_path):
    from histoscope._widgets.slide import MPP_UNKNOWN
    from histoscope.slide import write_pyramidal_tiff
    from tests.conftest import make_rgb

    path = write_pyramidal_tiff(tmp_path / "scan.tif", make_rgb(512, 512), mpp=0.499, min_size=256)
    viewer.open(str(path), plugin="napari-histoscope")
    viewer.add_image(np.zeros((64, 64, 3), np.uint8), rgb=True, name="no scale")
    widget = SlideWidget(viewer)
    widget.layer_combo.setCurrentText("scan")
    assert widget.mpp_spin.text() == "0.499 µm/px"  # not rounded to 0.5, no trailing zeros
    assert widget.info["mpp"].text() == "0.499 µm/px"
    assert widget.info["magnification"].text() != "None"
    assert widget.file.path() == str(path) and widget.file.toolTip() == str(path)
    widget.layer_combo.setCurrentText("no scale")
    assert widget.mpp_spin.text() == MPP_UNKNOWN == widget.info["mpp"].text()
    widget._apply_mpp()  # "unknown" is never applied as a value
    assert "Enter the µm per pixel" in widget.status.text()
    assert viewer.layers["no scale"].scale[-1] == 1.0


def test_damaged_file_is_explained_with_details_behind_a_toggle(viewer, qtbot, tmp_path):
    bad = tmp_path / "case 12.svs"
    bad.write_bytes(b"not a slide at all" * 100)
    widget = SlideWidget(viewer)
    widget.open_path(str(bad))
    qtbot.waitUntil(lambda: widget._worker is None, timeout=120_000)
    said = widget.status.text()
    assert "case 12.svs cannot be read" in said and "damaged" in said
    assert "TIFF" not in said and "Traceback" not in said  # no technical words up front
    assert not widget.details.isHidden() and widget.details.text.isHidden()
    widget.details.toggle.setChecked(True)
    assert not widget.details.text.isHidden()
    assert "SlideError" in widget.details.text.text()
    widget.open_path(str(bad))  # a new attempt starts with the details closed
    assert widget.details.isHidden()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=120_000)


def test_only_real_damage_is_called_damaged(viewer, qtbot, tmp_path):
    widget = SlideWidget(viewer)
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    for path, says in (
        (notes, "unsupported format"),
        (tmp_path / "gone" / "x.svs", "no such file"),
    ):
        widget.open_path(str(path))
        qtbot.waitUntil(lambda: widget._worker is None, timeout=120_000)
        said = widget.status.text()
        assert says in said and "damaged" not in said, said
    trunc = tmp_path / "cut.tif"  # a real slide, cut short: damaged, named by the exception
    from histoscope.slide import write_pyramidal_tiff
    from tests.conftest import make_rgb

    whole = write_pyramidal_tiff(tmp_path / "whole.tif", make_rgb(512, 512), mpp=0.5, min_size=256)
    trunc.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    widget.open_path(str(trunc))
    qtbot.waitUntil(lambda: widget._worker is None, timeout=120_000)
    assert "cut.tif cannot be read: it is damaged" in widget.status.text()


def test_a_task_on_an_image_without_mpp_says_to_set_it(viewer, qtbot, tmp_path):
    from PIL import Image

    from histoscope._widgets.tumour import TumourWidget
    from tests.conftest import make_rgb

    png = tmp_path / "photo.png"
    Image.fromarray(make_rgb(256, 256)).save(png)
    viewer.open(str(png), plugin="napari-histoscope")
    panel = TumourWidget(viewer)
    assert panel.run() is not None, panel.status.text()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=120_000)
    said = panel.status.text()
    assert "µm per pixel unknown" in said and "Slide panel" in said, said
    assert "damaged" not in said


def test_mpp_box_reads_a_decimal_point_under_a_german_locale(qtbot):
    from qtpy.QtCore import QLocale

    from histoscope._widgets.slide import MppBox

    before = QLocale()
    QLocale.setDefault(QLocale(QLocale.Language.German, QLocale.Country.Germany))
    try:
        box = MppBox()
        qtbot.addWidget(box)
        box.lineEdit().selectAll()
        qtbot.keyClicks(box.lineEdit(), "0.25")
        box.interpretText()
        assert box.value() == pytest.approx(0.25)
        box.setValue(0.499)
        assert box.text() == "0.499 µm/px"
    finally:
        QLocale.setDefault(before)


def test_cancel_is_offered_only_for_a_sample_slide(viewer, qtbot, tmp_path):
    from PIL import Image

    from tests.conftest import make_rgb

    png = tmp_path / "synthetic_case.png"  # an ordinary file, whatever its name says
    Image.fromarray(make_rgb(64, 64)).save(png)
    widget = SlideWidget(viewer)
    widget.open_path(str(png))
    assert not widget.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=120_000)


def test_a_typed_mpp_survives_other_layers_coming_and_going(viewer):
    viewer.add_image(np.zeros((64, 64, 3), np.uint8), rgb=True, name="no scale")
    widget = SlideWidget(viewer)
    widget.mpp_spin.setValue(0.3)  # typed, not yet applied
    viewer.add_points([[1, 1]], name="marks")
    viewer.layers.remove("marks")
    assert widget.mpp_spin.value() == pytest.approx(0.3)
    viewer.add_image(np.zeros((64, 64, 3), np.uint8), rgb=True, name="other")
    widget.layer_combo.setCurrentText("other")  # another slide: its own (unknown) value
    assert widget.mpp_spin.value() == 0


def test_session_folder_is_shown_once_it_appears(viewer, qtbot, tmp_path):
    from histoscope.session import default_folder
    from histoscope.slide import write_pyramidal_tiff
    from tests.conftest import make_rgb

    path = write_pyramidal_tiff(tmp_path / "scan.tif", make_rgb(256, 256), mpp=0.5, min_size=256)
    viewer.open(str(path), plugin="napari-histoscope")
    widget = SlideWidget(viewer)
    folder = default_folder(path)
    if not folder.is_dir():  # made by autosave in its own thread, or here
        assert not widget.folder.path() and "none yet" in widget.folder.text()
        folder.mkdir(parents=True)
    qtbot.waitUntil(lambda: widget.folder.path() == str(folder), timeout=5_000)
