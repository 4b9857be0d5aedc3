"""Batched tile engine: same numbers as a plain loop, progress, cancel, order, bounded reads."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

import histoscope as hs
from histoscope.engine import EngineParams, pick_device, run_tiles, tile_order
from histoscope.errors import SlideError
from histoscope.models import TileClassifier, create_backbone
from histoscope.results import Provenance, TileHeatmap
from histoscope.slide import open_slide, write_pyramidal_tiff
from histoscope.tissue import TissueParams, tile_grid, tissue_mask

PARAMS = EngineParams(batch_size=16, workers=2, prefetch=2, device="cpu")


class Counting:
    """A slide proxy that counts tiles read (strips of square tiles) and can fail on one."""

    def __init__(self, slide, fail_at=None, stride=128):
        self.slide, self.fail_at, self.stride = slide, fail_at, stride
        self.reads = 0
        self.lock = threading.Lock()
        self.mpp, self.shape, self.path = slide.mpp, slide.shape, slide.path

    def read_region(self, x, y, w, h, mpp=None):
        n = w // h
        with self.lock:
            self.reads += n
        if self.fail_at is not None:
            fx, fy = self.fail_at
            if fy == y and x <= fx < x + n * self.stride:
                raise SlideError(f"{self.path}: tile at ({fx}, {fy}) cannot be decoded")
        return self.slide.read_region(x, y, w, h, mpp=mpp)


@pytest.fixture(scope="module")
def slide(pyramid_tiff):
    with open_slide(pyramid_tiff) as s:
        yield s


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return create_backbone("test_cnn")


@pytest.fixture(scope="module")
def grid(slide):
    return tile_grid(slide, None, mpp=2.0, tile_size=32)  # 12 x 18 tiles


def _plain_loop(model, slide, grid, spec):
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    outs = []
    for x, y in grid.coords:
        tile = slide.read_region(int(x), int(y), 32, 32, mpp=grid.mpp)
        t = torch.from_numpy(tile).permute(2, 0, 1)[None].float() / 255
        with torch.inference_mode():
            outs.append(model((t - mean) / std).numpy())
    return np.concatenate(outs)


@pytest.mark.parametrize("mpp", [2.0, 1.9], ids=["strips", "fractional-stride"])
def test_engine_matches_a_plain_loop(slide, backbone, mpp):
    grid = tile_grid(slide, None, mpp=mpp, tile_size=32)
    seen = []
    out = run_tiles(
        backbone.module,
        slide,
        grid,
        backbone.input_spec,
        PARAMS,
        progress=lambda d, t: seen.append((d, t)),
    )
    expected = _plain_loop(backbone.module, slide, grid, backbone.input_spec)
    n = len(grid)
    assert n == (216 if mpp == 2.0 else 13 * 19)
    assert out.outputs.shape == (n, backbone.feature_dim)
    np.testing.assert_allclose(out.outputs, expected, rtol=1e-4, atol=1e-5)
    assert out.done.all() and not out.cancelled
    assert seen[-1] == (n, n)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    np.testing.assert_array_equal(out.coords, grid.coords)


def test_cancel_event_stops_early_and_reads_stay_bounded(slide, grid, backbone):
    proxy = Counting(slide)
    stop = threading.Event()
    in_flight = []

    def on_batch(idx, _):
        in_flight.append(proxy.reads - (len(in_flight) + 1) * 16)
        if len(in_flight) == 3:
            stop.set()

    out = run_tiles(
        backbone.module, proxy, grid, backbone.input_spec, PARAMS, cancel=stop, on_batch=on_batch
    )
    assert out.cancelled
    assert out.done.sum() == 48
    assert np.isnan(out.outputs[~out.done]).all()
    assert np.isfinite(out.outputs[out.done]).all()
    # never more than `prefetch` batches read ahead of the model
    assert max(in_flight) <= PARAMS.prefetch * 16
    assert proxy.reads <= 48 + PARAMS.prefetch * 16


def test_progress_returning_false_cancels(slide, grid, backbone):
    out = run_tiles(
        backbone.module, slide, grid, backbone.input_spec, PARAMS, progress=lambda d, t: d < 32
    )
    assert out.cancelled and out.done.sum() == 32


def test_viewport_first_order_changes_order_not_results(slide, grid, backbone):
    near = (2000.0, 1400.0)  # bottom-right corner, level-0 pixels
    first = []
    out = run_tiles(
        backbone.module,
        slide,
        grid,
        backbone.input_spec,
        PARAMS,
        near=near,
        on_batch=lambda idx, _: first.append(idx.copy()),
    )
    centres = grid.coords + grid.stride / 2
    dist = np.hypot(*(centres - near).T)
    assert dist[first[0]].max() <= np.sort(dist)[15] + 1e-9
    assert grid.index[first[0][0]].tolist() == [10, 15]
    raster = run_tiles(backbone.module, slide, grid, backbone.input_spec, PARAMS)
    np.testing.assert_allclose(out.outputs, raster.outputs, rtol=1e-5, atol=1e-6)
    assert tile_order(grid).tolist() == list(range(len(grid)))


def test_dict_outputs_are_kept_per_key(slide, grid, backbone):
    class Two(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            f = self.m(x)
            return {"features": f, "score": f.sum(1)}

    out = run_tiles(Two(backbone.module), slide, grid, backbone.input_spec, PARAMS)
    assert set(out.outputs) == {"features", "score"}
    np.testing.assert_allclose(out.outputs["score"], out.outputs["features"].sum(1), rtol=1e-5)


def test_read_error_propagates(slide, grid, backbone):
    proxy = Counting(slide, fail_at=tuple(int(v) for v in grid.coords[40]))
    with pytest.raises(SlideError, match="cannot be decoded"):
        run_tiles(backbone.module, proxy, grid, backbone.input_spec, PARAMS)


def test_tile_size_mismatch_is_refused(slide, backbone):
    grid = tile_grid(slide, None, mpp=2.0, tile_size=64)
    with pytest.raises(ValueError, match="64 px"):
        run_tiles(backbone.module, slide, grid, backbone.input_spec, PARAMS)


def test_pick_device():
    assert pick_device("cpu").type == "cpu"
    expected = "cuda" if torch.cuda.is_available() else None
    if expected is None and torch.backends.mps.is_available():
        expected = "mps"
    assert pick_device().type == (expected or "cpu")


@pytest.fixture(scope="module")
def half_tissue(tmp_path_factory):
    """1,024 x 1,536 at 0.5 µm/px: textured tissue on the left, glass on the right."""
    rgb = np.full((1024, 1536, 3), 245, np.uint8)
    rng = np.random.default_rng(0)
    rgb[:, :700] = np.clip(rng.normal((200, 120, 170), 20, (1024, 700, 3)), 0, 255)
    path = tmp_path_factory.mktemp("engine") / "half.tif"
    write_pyramidal_tiff(path, rgb, mpp=0.5, min_size=256)
    with open_slide(path) as s:
        yield s


def test_checkpoint_to_heatmap_layers_end_to_end(half_tissue, tmp_path):
    slide = half_tissue
    torch.manual_seed(0)
    cfg = {"backbone": "test_cnn", "num_classes": 2}
    path = hs.save_checkpoint(
        tmp_path / "tc",
        TileClassifier(**cfg),
        {"family": "tile_classifier", "config": cfg, "classes": ["normal", "tumour"]},
    )
    model, card = hs.load_checkpoint(path, family="tile_classifier")
    mask = tissue_mask(slide, TissueParams(mpp=8.0, min_area_um2=0))
    grid = tile_grid(slide, mask, mpp=2.0, tile_size=32, min_tissue=0.5)
    out = run_tiles(model, slide, grid, model.input_spec, PARAMS)
    prov = Provenance(
        task="tumour",
        slide=str(slide.path),
        checkpoint_sha256=card.sha256,
        params={"min_tissue": 0.5},
        mpp=grid.mpp,
        tile_grid=grid.to_dict(),
    )
    probs = torch.softmax(torch.from_numpy(out.outputs), 1).numpy()
    out.outputs = probs
    heat = TileHeatmap.from_outputs(out, prov, name="tumour", channel=1)
    assert heat.values.shape == grid.shape
    kept = np.zeros(grid.shape, bool)
    kept[grid.index[:, 0], grid.index[:, 1]] = True
    assert kept[:, :5].all() and not kept[:, 6:].any()
    assert np.isnan(heat.values[~kept]).all()  # background is masked, not 0
    np.testing.assert_allclose(heat.values[kept], probs[:, 1])

    [(data, kw, kind)] = heat.to_layers()
    assert kind == "image" and data is heat.values
    assert kw["scale"] == (64.0, 64.0)  # 128 level-0 px at 0.5 µm/px
    assert kw["translate"] == (31.75, 31.75)
    assert kw["metadata"]["histoscope"]["checkpoint_sha256"] == card.sha256
    assert kw["metadata"]["histoscope"]["software"]["histoscope"] == hs.__version__

    files = heat.save(tmp_path / "out")
    np.testing.assert_array_equal(np.load(files[0]), heat.values)
    saved = json.loads(files[1].read_text())
    assert saved["tile_grid"]["n_tiles"] == len(grid)
    assert saved["checkpoint_sha256"] == card.sha256


def test_generator_form_yields_progress_and_stops_on_false(slide, grid, backbone):
    from histoscope.engine import iter_tiles

    gen = iter_tiles(backbone.module, slide, grid, backbone.input_spec, PARAMS)
    assert next(gen) == (16, 216)
    assert gen.send(None) == (32, 216)
    with pytest.raises(StopIteration) as stop:
        gen.send(False)
    out = stop.value.value
    assert out.cancelled and out.done.sum() == 32


def test_closing_the_generator_releases_reader_threads(slide, grid, backbone):
    from histoscope.engine import iter_tiles

    before = {t.name for t in threading.enumerate()}
    gen = iter_tiles(backbone.module, slide, grid, backbone.input_spec, PARAMS)
    next(gen)
    assert any(t.name.startswith("histoscope-read") for t in threading.enumerate())
    gen.close()
    after = {t.name for t in threading.enumerate() if t.name.startswith("histoscope-read")}
    assert not (after - before)
