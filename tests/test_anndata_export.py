"""Tables of objects as AnnData ``.h5ad``: obs per object, obsm["spatial"] in µm, uns provenance."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from histoscope.export.anndata import as_categorical, h5_safe, write_h5ad
from histoscope.results import Provenance, TileHeatmap
from histoscope.tasks.ihc_measure import CELL_COLUMNS, SCORE_NAMES, IHCMeasurement, IHCParams
from histoscope.tasks.tumour import TumourMap
from histoscope.tissue import TileGrid


def _prov(task: str) -> Provenance:
    return Provenance(task=task, slide="synthetic.tif", params={"a": 1, "b": None},
                      mpp=0.5, software={"histoscope": "test"})  # fmt: skip


def _cells(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    cells = {k: rng.random(n) for k in CELL_COLUMNS}
    cells["x_um"], cells["y_um"] = rng.random(n) * 500, rng.random(n) * 300
    cells["score"] = np.arange(n, dtype=np.int64) % 3  # no 3+ cells
    return cells


def _measurement(n: int) -> IHCMeasurement:
    return IHCMeasurement(provenance=_prov("ihc"), cells=_cells(n), params=IHCParams(), mpp=0.5)


# ------------------------------------------------------------ write_h5ad
def test_write_h5ad_stores_obs_spatial_uns_and_x(tmp_path):
    uns = {"provenance": {"task": "t", "missing": None, "tiles": [{"x": 1}, {"x": 2}]},
           "summary": {"n": 3, "names": ["a", "b"], "mixed": [1, "a"], "ok": True}}  # fmt: skip
    path = write_h5ad(tmp_path / "t.h5ad", {"v": [1.0, 2.0, 3.0]}, [[0, 1], [2, 3], [4, 5]], uns,
                      var=["g1", "g2"], X=np.arange(6, dtype=np.float32).reshape(3, 2))  # fmt: skip
    a = ad.read_h5ad(path)
    assert (
        a.shape == (3, 2)
        and list(a.var_names) == ["g1", "g2"]
        and list(a.obs_names) == ["0", "1", "2"]
    )
    np.testing.assert_array_equal(a.obsm["spatial"], [[0, 1], [2, 3], [4, 5]])
    assert a.obsm["spatial"].dtype == np.float64
    prov = a.uns["provenance"]
    assert prov["task"] == "t" and "missing" not in prov and prov["tiles"]["1"]["x"] == 2
    assert a.uns["summary"]["n"] == 3 and list(a.uns["summary"]["names"]) == ["a", "b"]
    assert a.uns["summary"]["mixed"] == '[1, "a"]' and a.uns["summary"]["ok"]
    assert not list(tmp_path.glob(".*"))


def test_write_h5ad_takes_a_dataframe_and_checks_shapes(tmp_path):
    df = pd.DataFrame({"v": [1, 2]}, index=["cell_a", "cell_b"])
    a = ad.read_h5ad(write_h5ad(tmp_path / "d.h5ad", df, np.zeros((2, 2)), {}))
    assert list(a.obs_names) == ["cell_a", "cell_b"]
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        write_h5ad(tmp_path / "bad.h5ad", df, np.zeros((3, 2)), {})
    with pytest.raises(ValueError, match="var"):
        write_h5ad(tmp_path / "bad.h5ad", df, np.zeros((2, 2)), {}, var=["g"])
    assert not (tmp_path / "bad.h5ad").exists()


def test_h5_safe_and_categorical():
    class Version(str):  # like torch.__version__
        pass

    safe = h5_safe({"a": None, "b": (1, 2), "v": Version("2.1"), "n": np.float32(0.5)})
    assert safe["b"].tolist() == [1, 2] and "a" not in safe
    assert type(safe["v"]) is str and type(safe["n"]) is float
    cat = as_categorical([0, 2, 1], SCORE_NAMES)
    assert (
        list(cat) == ["0", "2+", "1+"] and cat.ordered and list(cat.categories) == list(SCORE_NAMES)
    )


# ------------------------------------------------------------ IHC cells
def test_ihc_save_writes_cells_h5ad(tmp_path):
    m = _measurement(10)
    files = m.save(tmp_path)
    assert [f.name for f in files] == ["ihc_cells.csv", "ihc_measure.json", "ihc_cells.h5ad"]
    a = ad.read_h5ad(tmp_path / "ihc_cells.h5ad")
    assert a.n_obs == m.n_cells and list(a.obs.columns) == [*CELL_COLUMNS, "counted", "region"]
    assert a.obs["counted"].all()  # no region chosen: every cell counts
    counts = a.obs["score"].value_counts()  # scanpy-style use
    assert counts.to_dict() == {"0": 4, "1+": 3, "2+": 3, "3+": 0}
    assert list(a.obs["score"].cat.codes) == list(m.cells["score"])
    np.testing.assert_allclose(a.obs["dab_membrane"], m.cells["dab_membrane"])
    # obsm["spatial"] is (x, y) µm: the points layer's (y, x) coordinates reversed
    [(coords, _, _)] = m.to_layers()
    np.testing.assert_array_equal(a.obsm["spatial"], coords[:, ::-1])
    assert a.uns["provenance"]["task"] == "ihc" and a.uns["provenance"]["slide"] == "synthetic.tif"
    assert a.uns["provenance"]["params"]["a"] == 1 and a.uns["mpp"] == 0.5
    assert a.uns["summary"]["n_cells"] == 10 and a.uns["summary"]["h_score"] == pytest.approx(
        m.summary()["h_score"])  # fmt: skip
    assert list(a.uns["params"]["thresholds"]) == [0.2, 0.4, 0.6]


def test_ihc_save_without_cells(tmp_path):
    m = _measurement(0)
    m.save(tmp_path)
    a = ad.read_h5ad(tmp_path / "ihc_cells.h5ad")
    assert a.n_obs == 0 and a.obsm["spatial"].shape == (0, 2)
    assert a.obs["score"].value_counts().sum() == 0


def test_ihc_task_writes_h5ad_matching_the_csv(tmp_path):
    import csv

    from histoscope.slide import open_slide
    from histoscope.synthetic import generate
    from histoscope.tasks.ihc_measure import measure_slide

    slide = open_slide(generate(tmp_path / "ihc", kind="ihc", size=(384, 384), seed=5).slide)
    m = measure_slide(slide, IHCParams(detection="od_sum"), mpp=0.5)
    files = {p.name: p for p in m.save(tmp_path / "out")}
    with open(files["ihc_cells.csv"]) as fh:
        rows = list(csv.DictReader(fh))
    a = ad.read_h5ad(files["ihc_cells.h5ad"])
    assert a.n_obs == len(rows) == m.n_cells > 0
    assert [r["score"] for r in rows] == [str(c) for c in a.obs["score"].cat.codes]
    np.testing.assert_allclose(a.obsm["spatial"][:, 0], [float(r["x_um"]) for r in rows], atol=1e-4)


# ------------------------------------------------------------ tumour tiles
class _Slide:
    shape = (768, 1024)

    def thumbnail(self, max_size: int) -> np.ndarray:
        return np.full((48, 64, 3), 230, np.uint8)


def _grid(keep) -> TileGrid:
    index = np.array(keep, np.int64)
    stride = 128 * 1.0 / 0.25
    return TileGrid(coords=(index[:, ::-1] * stride).astype(np.int64), index=index, shape=(3, 4),
                    tile_size=128, mpp=1.0, slide_mpp=0.25,
                    tissue=np.linspace(0.6, 1.0, len(index), dtype=np.float32))  # fmt: skip


def test_tumour_save_writes_tile_table_at_layer_positions(tmp_path):
    grid = _grid([(0, 1), (1, 0), (1, 3), (2, 2)])
    values = np.full(grid.shape, np.nan, np.float32)
    values[0, 1], values[1, 0], values[2, 2] = 0.1, 0.9, 0.5  # (1, 3) unscored
    heat = TumourMap(provenance=_prov("tumour"), values=values, grid=grid, slide=_Slide())
    files = heat.save(tmp_path)
    assert tmp_path / "tumour_heatmap_tiles.h5ad" in files
    a = ad.read_h5ad(tmp_path / "tumour_heatmap_tiles.h5ad")
    assert list(a.obs.columns) == ["x", "y", "row", "col", "tissue_fraction", "tumour_probability"]
    np.testing.assert_array_equal(a.obs[["x", "y"]].to_numpy(), grid.coords)
    np.testing.assert_array_equal(a.obs[["row", "col"]].to_numpy(), grid.index)
    np.testing.assert_array_equal(
        a.obs["tumour_probability"], values[grid.index[:, 0], grid.index[:, 1]]
    )
    np.testing.assert_allclose(a.obs["tissue_fraction"], grid.tissue)
    # each tile's centre in µm is where the heatmap layer draws that tile's pixel
    [(_, kwargs, _)] = heat.to_layers()
    (sy, sx), (ty, tx) = kwargs["scale"], kwargs["translate"]
    expected = np.stack([tx + grid.index[:, 1] * sx, ty + grid.index[:, 0] * sy], axis=1)
    np.testing.assert_allclose(a.obsm["spatial"], expected)
    # ... which is the centre of the tile's level-0 pixels
    np.testing.assert_allclose(a.obsm["spatial"], (grid.coords + grid.stride / 2 - 0.5) * 0.25)
    assert a.uns["provenance"]["task"] == "tumour" and a.uns["value"] == "tumour_probability"
    assert a.uns["summary"]["scored"] == 3


def test_heatmap_with_channels_puts_them_in_x(tmp_path):
    from histoscope.export.heatmap import write_tile_table

    grid = _grid([(0, 0), (2, 3)])
    vals = np.random.default_rng(0).random((3, 4, 2)).astype(np.float32)
    heat = TileHeatmap(provenance=_prov("h"), values=vals, grid=grid, channels=("a", "b"))
    a = ad.read_h5ad(write_tile_table(heat, tmp_path / "t.h5ad", "value"))
    assert list(a.var_names) == ["a", "b"] and "value" not in a.obs
    np.testing.assert_array_equal(a.X, vals[[0, 2], [0, 3]])
