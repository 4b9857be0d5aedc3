"""Percent positive among the cells of a region (the tumour region), with the denominator named."""

from __future__ import annotations

import json

import numpy as np
import pytest

from histoscope.tasks.ihc_measure import (
    IHCParams,
    cells_in_geometry,
    cells_in_mask,
    measure_region,
)
from tests.tasks.test_ihc_measure import MPP, cell_grid

#: 4 columns of cells, 24 µm apart: 0, 1+, 2+, 3+ from left to right (x centres 12-84 µm).
PARAMS = IHCParams(compartment="nucleus", detection="od_sum")


@pytest.fixture(scope="module")
def grid():
    rgb, _ = cell_grid("nuclear", rows=5)
    return rgb, measure_region(rgb, MPP, PARAMS)


def test_percentages_count_only_the_cells_inside_the_region(grid):
    _, m = grid
    assert m.n_cells == 20 and m.summary()["percent_positive"] == pytest.approx(75.0)
    # a labels layer at 4 µm/px marking the left half (columns 0 and 1: 0 and 1+) as tumour
    mask = np.zeros((30, 24), np.uint8)
    mask[:, :12] = 1
    left = m.within(cells_in_mask(m, mask, scale=(4.0, 4.0), translate=(2.0, 2.0)),
                    "tumour region")  # fmt: skip
    s = left.summary()
    assert s["percent_positive"] == pytest.approx(50.0)
    assert s["h_score"] == pytest.approx(50.0)  # half 0, half 1+
    assert s["denominator"] == "cells inside the tumour region (n=10)"
    assert s["n_cells"] == 20 and s["n_counted"] == 10
    [(_, kwargs, _)] = left.to_layers()
    assert kwargs["features"]["counted"].sum() == 10  # every cell is drawn; the counted ones say so
    assert m.summary()["denominator"] == "all detected cells"


def test_a_drawn_polygon_region_counts_the_cells_inside_it(grid):
    from shapely.geometry import box

    _, m = grid
    right = m.within(cells_in_geometry(m, box(60, 0, 96, 120)), "drawn region")  # x, y in µm
    s = right.summary()
    assert s["percent_positive"] == pytest.approx(100.0) and s["h_score"] == pytest.approx(250)
    assert s["denominator"] == "cells inside the drawn region (n=10)"
    empty = m.within(np.zeros(m.n_cells, bool), "tumour region").summary()
    # no cell to count: no number, not a confident "0 % positive, H-score 0, Allred 0"
    assert empty["percent_positive"] is None and empty["h_score"] is None
    assert empty["allred"] is None and empty["denominator"].endswith("(n=0)")
    assert "no detected cell inside 'tumour region'" in empty["warning"]
    with pytest.raises(ValueError, match="one value per cell"):
        m.within(np.ones(3, bool))
    with pytest.raises(ValueError, match="2-D"):
        cells_in_mask(m, np.ones((2, 2, 2)), scale=(1.0, 1.0))


def _annotations(path, polygons, classification="Tumor", object_type="annotation"):
    feats = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [p]},
              "properties": {"objectType": object_type,
                             "classification": {"name": classification, "color": [200, 0, 0]}}}
             for p in polygons]  # fmt: skip
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return path


def test_the_task_counts_inside_a_qupath_annotation_file(tmp_path, grid):
    import histoscope as hs
    from histoscope.errors import GeoJSONError
    from histoscope.slide import write_pyramidal_tiff

    rgb, _ = grid
    slide = write_pyramidal_tiff(tmp_path / "ihc.tif", rgb, mpp=MPP, quality=95, min_size=64)
    # level-0 px: columns 2 and 3 (x 48-96 µm = 96-192 px), the whole height
    region = _annotations(tmp_path / "tumour.geojson",
                          [[[96, 0], [192, 0], [192, 240], [96, 240], [96, 0]]])  # fmt: skip
    res = hs.tasks.run("ihc", slide, count_inside=str(region), detection="od_sum",
                       compartment="nucleus")  # fmt: skip
    s = res.summary()
    assert s["denominator"] == "cells inside the tumor region (n=10)"
    assert s["percent_positive"] == pytest.approx(100.0) and s["n_cells"] == 20
    doc = json.loads((res.save(tmp_path / "out")[1]).read_text())
    assert doc["summary"]["denominator"] == s["denominator"]
    assert doc["params"]["count_inside"] == str(region)
    cells_only = _annotations(tmp_path / "cells.geojson",
                              [[[0, 0], [9, 0], [9, 9], [0, 0]]], object_type="detection")  # fmt: skip
    with pytest.raises(GeoJSONError, match="no polygon annotation"):
        hs.tasks.run("ihc", slide, count_inside=str(cells_only))
    broken = tmp_path / "broken.geojson"
    broken.write_text("{not json")
    with pytest.raises(GeoJSONError, match="broken.geojson"):
        hs.tasks.run("ihc", slide, count_inside=str(broken))


def test_exported_cells_say_whether_they_were_counted_and_in_which_region(tmp_path, grid):
    import anndata
    import pandas as pd
    from shapely.geometry import box

    _, m = grid
    right = m.within(cells_in_geometry(m, box(60, 0, 96, 120)), "drawn, region")
    cells_csv, _, h5ad = right.save(tmp_path)
    table = pd.read_csv(cells_csv)
    assert table["counted"].sum() == 10 and len(table) == 20
    assert set(table["region"]) == {"drawn, region"}
    assert list(table.loc[table["counted"] == 1, "x_um"] > 60) == [True] * 10
    obs = anndata.read_h5ad(h5ad).obs
    assert obs["counted"].sum() == 10 and set(obs["region"]) == {"drawn, region"}
    whole = pd.read_csv(m.save(tmp_path / "all")[0])
    assert whole["counted"].all()


def test_count_inside_without_um_per_px_is_the_unknown_mpp_error(tmp_path, grid, capsys):
    from PIL import Image

    from histoscope.cli import main

    png = tmp_path / "ihc.png"
    Image.fromarray(grid[0]).save(png)
    region = _annotations(tmp_path / "r.geojson", [[[0, 0], [50, 0], [50, 50], [0, 0]]])
    args = ["analyze", str(png), "--tasks", "ihc", "--out", str(tmp_path / "o")]
    assert main([*args, "--ihc-count-inside", str(region)]) == 2
    with_region = capsys.readouterr().err
    assert main(args) == 2
    assert "µm/px is unknown" in with_region and "TypeError" not in with_region
    assert with_region == capsys.readouterr().err  # the same error as without the option


def test_a_parameter_the_chosen_detection_does_not_use_is_refused(monkeypatch):
    from histoscope.params import ParamError
    from histoscope.tasks.ihc_measure import _classical_nuclei

    with pytest.raises(ParamError, match=r"smooth_sigma=2.0: not used by detection='learned'"):
        IHCParams(smooth_sigma=2.0)
    with pytest.raises(ParamError, match=r"nucleus_threshold=0.2: not used by detection='learned'"):
        IHCParams(nucleus_threshold=0.2)
    with pytest.raises(ParamError, match=r"smooth_sigma=2.0: not used by detection='classical'"):
        IHCParams(detection="classical", smooth_sigma=2.0)
    with pytest.raises(ParamError, match="background_radius.*only by hematoxylin / od_sum"):
        IHCParams(background_radius=4.0)
    IHCParams(detection="od_sum", smooth_sigma=2.0, background_radius=4.0)  # used there
    # nucleus_max_area reaches the classical detector (its hole filling and size limit)
    import histoscope.nuclei._classical as classical

    seen = []
    real = classical.segment
    monkeypatch.setattr(classical, "segment", lambda h, mpp, p: seen.append(p) or real(h, mpp, p))
    _classical_nuclei(np.zeros((64, 64), np.float32), 0.5, IHCParams(nucleus_max_area=900.0))
    assert seen[0].max_area_um2 == 900.0
