"""OME-Zarr (NGFF) multiscales written with zarr directly."""

from __future__ import annotations

import json

import numpy as np
import pytest

import histoscope as hs
from histoscope.errors import HistoScopeWarning
from tests.slide.conftest import MPP, TILE, half, write_ome_zarr


def test_levels_are_chunked_like_the_zarr_arrays(ome_zarr, ome_zarr_cyx):
    for path in (ome_zarr, ome_zarr_cyx):
        slide = hs.open_slide(path)
        assert slide.levels[0].chunksize == (TILE, TILE, 3)
        assert slide.level_downsamples == [1.0, 2.0, 4.0]


def test_cyx_and_yxc_layouts_read_the_same(ome_zarr, ome_zarr_cyx, image0):
    a = hs.open_slide(ome_zarr).read_region(100, 50, 300, 200, mpp=2 * MPP)
    b = hs.open_slide(ome_zarr_cyx).read_region(100, 50, 300, 200, mpp=2 * MPP)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, half(image0)[25:225, 50:350])


@pytest.mark.parametrize(("unit", "scale", "mpp"), [("millimeter", 0.0005, 0.5),
                                                    ("micrometer", 0.25, 0.25),
                                                    (None, 0.3, 0.3)])  # fmt: skip
def test_mpp_from_scale_and_axis_unit(tmp_path, image0, unit, scale, mpp):
    path = write_ome_zarr(tmp_path / "u.zarr", image0[:300, :300], unit=unit or "micrometer",
                          scale=scale)  # fmt: skip
    if unit is None:  # axes without units: NGFF leaves it open; read as µm
        attrs = json.loads((path / ".zattrs").read_text())
        for ax in attrs["multiscales"][0]["axes"]:
            ax.pop("unit", None)
        (path / ".zattrs").write_text(json.dumps(attrs))
    assert hs.open_slide(path).mpp == pytest.approx(mpp)


def _write_ngff05(path, img: np.ndarray, chunk: int = 128):
    """A one-level NGFF 0.5 (zarr v3) image; returns the array."""
    import zarr

    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    arr = group.create_array("0", shape=img.shape, dtype=np.uint8, chunks=(chunk, chunk, 3))
    arr[...] = img
    axes = [{"name": "y", "type": "space", "unit": "micrometer"},
            {"name": "x", "type": "space", "unit": "micrometer"},
            {"name": "c", "type": "channel"}]  # fmt: skip
    scale = {"type": "scale", "scale": [0.5, 0.5, 1.0]}
    group.attrs["ome"] = {"version": "0.5", "multiscales": [
        {"axes": axes, "datasets": [{"path": "0", "coordinateTransformations": [scale]}]}]}  # fmt: skip
    return arr


def test_ngff_05_zarr_v3_group(tmp_path, image0):
    path = tmp_path / "v3.ome.zarr"
    _write_ngff05(path, image0[:300, :400])
    slide = hs.open_slide(path)
    assert slide.mpp == pytest.approx(0.5) and slide.levels[0].chunksize == (128, 128, 3)
    np.testing.assert_array_equal(slide.levels[0].compute(), image0[:300, :400])


def test_zarr_without_x_axis_is_refused(tmp_path, image0):
    path = write_ome_zarr(tmp_path / "bad.zarr", image0[:100, :100])
    attrs = json.loads((path / ".zattrs").read_text())
    attrs["multiscales"][0]["axes"][1]["name"] = "z"
    (path / ".zattrs").write_text(json.dumps(attrs))
    with pytest.raises(hs.SlideError, match="no y and x"):
        hs.open_slide(path)


def test_zarr_with_missing_dataset_is_refused(tmp_path, image0):
    import shutil

    path = write_ome_zarr(tmp_path / "gone.zarr", image0[:100, :100])
    shutil.rmtree(path / "1")
    with pytest.raises(hs.SlideError, match=str(path)):
        hs.open_slide(path)


@pytest.mark.parametrize("fmt", [2, 3], ids=["ngff04-zarr2", "ngff05-zarr3"])
def test_chunks_never_written_read_white(tmp_path, image0, fmt):
    import zarr

    path = tmp_path / f"sparse{fmt}.zarr"
    img = image0[:512, :768]
    if fmt == 2:
        write_ome_zarr(path, img)
        arr = zarr.open_group(str(path), mode="r")["0"]
    else:
        arr = _write_ngff05(path, img, chunk=TILE)
    (path / "0" / arr.metadata.encode_chunk_key((1, 2, 0))).unlink()
    got = hs.open_slide(path).levels[0].compute()
    assert (got[TILE:, 2 * TILE :] == 255).all()
    np.testing.assert_array_equal(got[:TILE], img[:TILE])
    np.testing.assert_array_equal(got[TILE:, : 2 * TILE], img[TILE:, : 2 * TILE])


def test_corrupt_chunk_raises_or_reads_white_once(tmp_path, image0):
    path = write_ome_zarr(tmp_path / "bad.zarr", image0[:512, :512])
    (path / "0" / "1.0.0").write_bytes(b"not a compressed chunk" * 20)
    with pytest.raises(hs.SlideError, match=str(path)):
        hs.open_slide(path).read_region(0, 0, 300, 300)
    slide = hs.open_slide(path, on_tile_error="blank")
    with pytest.warns(HistoScopeWarning, match="tile") as caught:
        got = slide.levels[0].compute()
        slide.read_region(0, 0, 300, 300)
    assert len(caught) == 1
    assert (got[TILE:, :TILE] == 255).all()
    np.testing.assert_array_equal(got[:TILE], image0[:TILE, :512])
