"""Raster results as OME-Zarr (NGFF 0.4): pyramids placed in µm, read by ome-zarr and by us."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from histoscope.export.omezarr import (
    atomic_dir,
    level_transforms,
    pyramid,
    read_ome_zarr,
    write_ome_zarr,
)
from histoscope.results import Provenance, TileHeatmap
from histoscope.tasks.mil import MILResult
from histoscope.tasks.tissue import TissueResult
from histoscope.tasks.tumour import TumourMap
from histoscope.tissue import TileGrid, TissueMask


def _grid(rows: int = 3, cols: int = 4, tile: int = 256, mpp: float = 0.5,
          slide_mpp: float = 0.25) -> TileGrid:  # fmt: skip
    index = np.array([(r, c) for r in range(rows) for c in range(cols)], np.int64)
    stride = tile * mpp / slide_mpp
    return TileGrid(coords=(index[:, ::-1] * stride).astype(np.int64), index=index,
                    shape=(rows, cols), tile_size=tile, mpp=mpp, slide_mpp=slide_mpp,
                    tissue=np.linspace(0.5, 1.0, len(index), dtype=np.float32))  # fmt: skip


def _values(rows: int = 3, cols: int = 4, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).random((rows, cols)).astype(np.float32)
    v[0, 0] = v[-1, -1] = np.nan  # background
    return v


def _prov(task: str) -> Provenance:
    return Provenance(task=task, slide="synthetic.tif", software={"histoscope": "test"})


class _Slide:
    """Just what the PNG overview needs."""

    shape = (1536, 2048)

    def thumbnail(self, max_size: int) -> np.ndarray:
        return np.full((96, 128, 3), 230, np.uint8)


def _ome_node(path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    nodes = list(Reader(parse_url(str(path)))())
    assert nodes, f"ome-zarr found no image in {path}"
    return nodes[0]


def _transforms(node, level: int = 0) -> tuple[list[float], list[float]]:
    ct = {t["type"]: t for t in node.metadata["coordinateTransformations"][level]}
    return ct["scale"]["scale"], ct["translation"]["translation"]


# ------------------------------------------------------------------ pyramid
@dataclass(frozen=True)
class PyramidCase:
    id: str
    image: np.ndarray
    method: str | None
    level1: np.ndarray  # expected top-left 2 x 2 of level 1


_F = np.array([[1.0, 3.0, 5.0], [np.nan, 2.0, np.nan], [7.0, 9.0, 4.0]], np.float32)
_M = np.array([[0, 0, 1], [0, 1, 0], [0, 0, 0]], np.uint8)
PYRAMID_CASES = [
    PyramidCase("nan-aware-mean", _F, None, np.array([[2.0, 5.0], [8.0, 4.0]], np.float32)),
    PyramidCase("mask-max", _M, "max", np.array([[1, 1], [0, 0]], np.uint8)),
    PyramidCase("labels-nearest", _M, None, np.array([[0, 1], [0, 0]], np.uint8)),
]


@pytest.mark.parametrize("case", PYRAMID_CASES, ids=lambda c: c.id)
def test_pyramid_halves_with_the_right_reduction(case):
    levels = pyramid(case.image, case.method, max_top=2)
    assert [lv.shape for lv in levels] == [(3, 3), (2, 2)]
    assert levels[1].dtype == case.image.dtype
    np.testing.assert_array_equal(levels[1], case.level1)


def test_pyramid_stops_once_the_top_fits_and_keeps_all_nan_blocks_nan():
    img = np.full((1000, 600), np.nan, np.float32)
    img[:2, :2] = 1.0
    levels = pyramid(img)
    assert [lv.shape for lv in levels] == [(1000, 600), (500, 300), (250, 150)]
    assert levels[2][0, 0] == 1.0 and np.isnan(levels[2][1:, 1:]).all()
    with pytest.raises(ValueError, match="float"):
        pyramid(np.zeros((4, 4), np.uint8), "mean")


def test_level_pixels_are_centred_on_the_level0_pixels_they_cover():
    s, t = (2.0, 3.0), (0.5, -1.0)
    for k in range(4):
        scale, trans = level_transforms(s, t, k)
        # level-k pixel 0 covers level-0 pixels 0 .. 2^k - 1: its centre is their mean
        centres = [t[a] + np.arange(2**k) * s[a] for a in range(2)]
        assert trans == pytest.approx([c.mean() for c in centres])
        assert scale == pytest.approx([2**k * v for v in s])


# ------------------------------------------------------------- write / read
def test_ome_zarr_reads_the_pyramid_and_its_um_placement(tmp_path):
    img = np.random.default_rng(1).random((600, 300)).astype(np.float32)
    img[img < 0.2] = np.nan
    path = write_ome_zarr(tmp_path / "h.ome.zarr", img, (64.0, 64.0), (31.75, 31.75), name="h",
                          attrs={"histoscope": {"task": "x"}})  # fmt: skip
    node = _ome_node(path)
    assert [d.shape for d in node.data] == [(600, 300), (300, 150), (150, 75)]
    assert node.metadata["axes"] == [{"name": "y", "type": "space", "unit": "micrometer"},
                                     {"name": "x", "type": "space", "unit": "micrometer"}]  # fmt: skip
    assert _transforms(node, 0) == ([64.0, 64.0], [31.75, 31.75])
    assert _transforms(node, 1) == ([128.0, 128.0], [63.75, 63.75])
    assert _transforms(node, 2) == ([256.0, 256.0], [127.75, 127.75])
    np.testing.assert_array_equal(np.asarray(node.data[0]), img)  # NaN where NaN
    assert not list(tmp_path.glob(".*"))  # no temporary folder left


def test_read_ome_zarr_round_trips_values_and_placement(tmp_path):
    img = np.random.default_rng(2).random((20, 30, 3)).astype(np.float32)
    img[3, 4] = np.nan
    write_ome_zarr(tmp_path / "c.ome.zarr", img, (2.5, 2.0), (1.0, 0.75))
    levels, scale, translate = read_ome_zarr(tmp_path / "c.ome.zarr")
    np.testing.assert_array_equal(levels[0], img)
    assert levels[0].dtype == np.float32 and (scale, translate) == ((2.5, 2.0), (1.0, 0.75))
    node = _ome_node(tmp_path / "c.ome.zarr")  # stored channel-first, as NGFF orders axes
    assert node.data[0].shape == (3, 20, 30) and node.metadata["axes"][0]["type"] == "channel"


def test_atomic_dir_replaces_a_folder_and_leaves_it_alone_on_error(tmp_path):
    target = tmp_path / "r.ome.zarr"
    write_ome_zarr(target, np.zeros((4, 4), np.float32), (1.0, 1.0))
    write_ome_zarr(target, np.ones((5, 5), np.float32), (2.0, 2.0))
    levels, scale, _ = read_ome_zarr(target)
    assert levels[0].shape == (5, 5) and scale == (2.0, 2.0)
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "junk").write_text("half")
        raise RuntimeError("crash")
    assert read_ome_zarr(target).levels[0].shape == (5, 5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.ome.zarr"]


# ------------------------------------------------------------- the results
def _layer_world(kwargs, shape) -> tuple[np.ndarray, np.ndarray]:
    """World (y, x) µm of every pixel centre of a napari layer."""
    (sy, sx), (ty, tx) = kwargs["scale"], kwargs["translate"]
    return ty + np.arange(shape[0]) * sy, tx + np.arange(shape[1]) * sx


def _assert_placed_as_layer(path, data, kwargs):
    levels, scale, translate = read_ome_zarr(path)
    np.testing.assert_array_equal(levels[0], np.asarray(data))
    assert scale == pytest.approx(kwargs["scale"]) and translate == pytest.approx(
        kwargs["translate"]
    )
    node = _ome_node(path)
    s, t = _transforms(node, 0)
    ys, xs = _layer_world(kwargs, levels[0].shape)
    assert t[0] + s[0] * np.arange(len(ys)) == pytest.approx(ys)
    assert t[1] + s[1] * np.arange(len(xs)) == pytest.approx(xs)


def test_tile_heatmap_save_adds_its_ome_zarr(tmp_path):
    heat = TileHeatmap(provenance=_prov("heatmap"), values=_values(), grid=_grid(), name="My map")
    files = heat.save(tmp_path)
    assert [f.name for f in files] == ["my_map.npy", "my_map.provenance.json", "my_map.ome.zarr"]
    [(data, kwargs, _)] = heat.to_layers()
    _assert_placed_as_layer(tmp_path / "my_map.ome.zarr", data, kwargs)
    attrs = dict(_ome_node(tmp_path / "my_map.ome.zarr").zarr.root_attrs)
    assert attrs["histoscope"]["provenance"]["task"] == "heatmap"


def test_tumour_map_save_adds_ome_zarr_placed_like_its_layer(tmp_path):
    heat = TumourMap(provenance=_prov("tumour"), values=_values(6, 8), grid=_grid(6, 8),
                     slide=_Slide())  # fmt: skip
    files = heat.save(tmp_path)
    assert (
        tmp_path / "tumour_heatmap.ome.zarr" in files and (tmp_path / "tumour_heatmap.tif") in files
    )
    [(data, kwargs, _)] = heat.to_layers()
    assert kwargs["scale"] == (128.0, 128.0) and kwargs["translate"] == (63.875, 63.875)
    _assert_placed_as_layer(tmp_path / "tumour_heatmap.ome.zarr", data, kwargs)


def test_mil_save_adds_attention_ome_zarr(tmp_path):
    att = TileHeatmap(provenance=_prov("mil"), values=_values(), grid=_grid(), name="MIL attention")
    res = MILResult(provenance=_prov("mil"), classes=("normal", "tumour"),
                    probability=np.array([0.3, 0.7]), predicted=1, attention=att, top_tiles=(),
                    tile_attention=att.values[att.grid.index[:, 0], att.grid.index[:, 1]])  # fmt: skip
    files = res.save(tmp_path)
    assert tmp_path / "mil_attention.ome.zarr" in files
    data, kwargs, _ = res.to_layers()[0]
    _assert_placed_as_layer(tmp_path / "mil_attention.ome.zarr", data, kwargs)


def test_tissue_mask_ome_zarr_is_a_max_pyramid_placed_like_the_labels_layer(tmp_path):
    mask = np.zeros((700, 300), bool)
    mask[100:400, 50:60] = True
    mask[601, 201] = True  # a single pixel survives downsampling (max)
    res = TissueResult(provenance=_prov("tissue"), slide_mpp=0.25,
                       mask=TissueMask(mask=mask, mpp=8.0, threshold=0.1))  # fmt: skip
    files = res.save(tmp_path)
    assert tmp_path / "tissue_mask.ome.zarr" in files and (tmp_path / "tissue_mask.tif") in files
    [(data, kwargs, kind)] = res.to_layers()
    assert kind == "labels" and kwargs["translate"] == (3.875, 3.875)
    _assert_placed_as_layer(tmp_path / "tissue_mask.ome.zarr", data, kwargs)
    levels, _, _ = read_ome_zarr(tmp_path / "tissue_mask.ome.zarr")
    assert [lv.shape for lv in levels] == [(700, 300), (350, 150), (175, 75)]
    assert levels[2].dtype == np.uint8 and levels[2][601 // 4, 201 // 4] == 1
    assert levels[1].sum() == (mask[::2, ::2] | mask[1::2, 1::2] | mask[::2, 1::2]
                               | mask[1::2, ::2]).sum()  # fmt: skip


def test_tissue_task_on_a_slide_round_trips(tmp_path):
    from histoscope.synthetic import generate
    from histoscope.tasks.tissue import find_tissue

    slide = generate(tmp_path / "he", kind="he", size=(512, 512), seed=1).slide
    res = find_tissue(slide)
    res.save(tmp_path / "out")
    levels, scale, translate = read_ome_zarr(tmp_path / "out" / "tissue_mask.ome.zarr")
    np.testing.assert_array_equal(levels[0] > 0, res.mask.mask)
    off = (res.mask.mpp - res.slide_mpp) / 2
    assert scale == pytest.approx((res.mask.mpp,) * 2) and translate == pytest.approx((off, off))
