"""Heatmap layers fade to transparent at low values so the H&E stays readable (issue 11/12)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

from histoscope.results import Provenance, Result, TileHeatmap, fading_colormap
from histoscope.tasks.isight import ISightCalls
from histoscope.tasks.mil import MILResult
from histoscope.tasks.tumour import TumourMap
from histoscope.tissue import TileGrid

#: A mid-pink H&E pixel the heatmap is drawn over.
TISSUE = np.array([0.85, 0.55, 0.75])


def _grid() -> TileGrid:
    rows, cols = 3, 4
    index = np.array([(r, c) for r in range(rows) for c in range(cols)], np.int64)
    return TileGrid(coords=index[:, ::-1] * 256, index=index, shape=(rows, cols), tile_size=256,
                    mpp=0.5, slide_mpp=0.5, tissue=np.ones(len(index), np.float32))  # fmt: skip


def _values() -> np.ndarray:
    v = np.linspace(0.0, 1.0, 12, dtype=np.float32).reshape(3, 4)
    v[0, 0] = v[2, 3] = np.nan  # background
    v[1, 1], v[1, 2] = 0.0, 1.0  # the ends of the range are present
    return v


def _prov(task: str) -> Provenance:
    return Provenance(task=task, slide="synthetic.tif", software={"histoscope": "test"})


def _tumour() -> Result:
    return TumourMap(provenance=_prov("tumour"), values=_values(), grid=_grid())


def _heatmap(name: str = "heatmap") -> TileHeatmap:
    return TileHeatmap(provenance=_prov("heatmap"), values=_values(), grid=_grid(), name=name)


def _mil() -> Result:
    return MILResult(provenance=_prov("mil"), classes=("normal", "tumour"),
                     probability=np.array([0.2, 0.8]), predicted=1,
                     attention=_heatmap("MIL attention"), top_tiles=(),
                     tile_attention=np.linspace(0, 1, 12))  # fmt: skip


def _isight() -> Result:
    return ISightCalls(provenance=_prov("isight"), attention=_heatmap("iSight attention"),
                       probabilities={"her2": {"0": 0.1, "3+": 0.9}})  # fmt: skip


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[], Result]
    meaning: str


CASES = [
    Case("tile_heatmap", _heatmap, "heatmap"),
    Case("tumour", _tumour, "probability"),
    Case("mil", _mil, "attention"),
    Case("isight", _isight, "attention"),
]


def _heat_layer(case: Case):
    data, kwargs, kind = case.make().to_layers()[0]
    assert kind == "image"
    return data, kwargs


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_alpha_ramps_from_clear_to_opaque(case):
    _, kwargs = _heat_layer(case)
    cmap = kwargs["colormap"]
    alpha = np.array(cmap["colors"])[:, 3]
    assert alpha[0] == 0.0 and alpha[-1] == 1.0
    assert np.all(np.diff(alpha) >= 0)
    assert cmap["controls"][0] == 0.0 and cmap["controls"][-1] == 1.0
    assert kwargs["opacity"] >= 0.8


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_nan_background_stays_nan(case):
    data, _ = _heat_layer(case)
    assert np.isnan(data[0, 0]) and np.isnan(data[2, 3])
    assert np.isfinite(data[1]).all()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_colour_bar_is_asked_for_and_says_what_the_value_is(case):
    _, kwargs = _heat_layer(case)
    bar = kwargs["metadata"]["colorbar"]
    assert bar["visible"] is True
    assert case.meaning in bar["label"]


def test_tumour_map_keeps_probability_limits():
    _, kwargs = _heat_layer(CASES[1])
    assert kwargs["contrast_limits"] == (0.0, 1.0)
    assert "0-1" in kwargs["metadata"]["colorbar"]["label"]


def test_channel_heatmap_has_no_single_colour_bar():
    heat = TileHeatmap(provenance=_prov("x"), values=np.zeros((2, 2, 3), np.float32),
                       grid=_grid(), channels=("a", "b", "c"))  # fmt: skip
    _, kwargs, _ = heat.to_layers()[0]
    assert "colorbar" not in kwargs["metadata"] and "colormap" not in kwargs


@pytest.mark.parametrize("palette", ["inferno", "turbo"])
def test_napari_accepts_the_spec_and_low_values_are_clear(palette):
    colormaps = pytest.importorskip("napari.utils.colormaps")
    spec = fading_colormap(palette)
    cmap = colormaps.ensure_colormap(spec)
    rgba = cmap.map(np.array([0.0, 0.02, 1.0], np.float32))
    assert rgba[0, 3] == pytest.approx(0.0, abs=1e-6)
    assert rgba[1, 3] < 0.05
    assert rgba[2, 3] == pytest.approx(1.0)
    # a re-run (same spec) reuses the registered map instead of adding "name [1]", "name [2]"
    assert colormaps.ensure_colormap(fading_colormap(palette)).name == cmap.name


@pytest.mark.parametrize("case", CASES[1:], ids=lambda c: c.id)
def test_low_values_leave_the_tissue_readable(case):
    """Composite the layer as napari would: a low tile barely tints the H&E, a high one shows."""
    colormaps = pytest.importorskip("napari.utils.colormaps")
    _, kwargs = _heat_layer(case)
    cmap = colormaps.ensure_colormap(kwargs["colormap"])
    lo, hi = kwargs["contrast_limits"]

    def over_tissue(value: float) -> np.ndarray:
        rgba = cmap.map(np.array([(value - lo) / (hi - lo)], np.float32))[0]
        a = rgba[3] * kwargs["opacity"]
        return rgba[:3] * a + TISSUE * (1 - a)

    assert np.abs(over_tissue(lo + 0.05 * (hi - lo)) - TISSUE).max() < 0.05
    assert np.abs(over_tissue(hi) - TISSUE).max() > 0.3
