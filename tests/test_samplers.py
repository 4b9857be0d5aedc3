"""Point sampler: crops equal read_region pixel for pixel, order, cancel, model inputs."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from histoscope import samplers
from histoscope.engine import EngineParams, iter_samples, run_samples
from histoscope.models.backbones import InputSpec
from histoscope.samplers import GridSampler, PointSampler, View, hilbert_index, resize_crop
from histoscope.slide import open_slide, write_pyramidal_tiff
from histoscope.tissue import tile_grid
from tests.conftest import make_rgb

PARAMS = EngineParams(batch_size=16, workers=2, prefetch=2, device="cpu")
SPEC = InputSpec(tile_size=32, mpp=0.5, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


class Counting:
    """A slide proxy that counts ``read_region`` calls."""

    def __init__(self, slide):
        self.slide, self.calls = slide, 0
        self.lock = threading.Lock()
        self.mpp, self.path = slide.mpp, slide.path
        self.level_downsamples, self.best_level = slide.level_downsamples, slide.best_level

    def read_region(self, *args, **kwargs):
        with self.lock:
            self.calls += 1
        return self.slide.read_region(*args, **kwargs)


@pytest.fixture(scope="module")
def slide(pyramid_tiff):
    """1,536 x 2,304 at 0.5 µm/px, levels 1, 2, 4."""
    with open_slide(pyramid_tiff) as s:
        yield s


@pytest.fixture(scope="module")
def odd_slide(tmp_path_factory):
    """601 x 803 at 0.5 µm/px: level downsamples are not whole (803 / 401)."""
    path = tmp_path_factory.mktemp("odd") / "odd.tif"
    write_pyramidal_tiff(path, make_rgb(601, 803, seed=1), mpp=0.5, tile=128, min_size=200)
    with open_slide(path) as s:
        assert s.level_downsamples[1] != 2.0
        yield s


def _points(slide, n=60, seed=0):
    """Clusters of points (like cells) inside the slide plus points on and beyond its borders."""
    h, w = slide.shape
    rng = np.random.default_rng(seed)
    hubs = rng.uniform((200, 200), (w - 200, h - 200), (4, 2))
    centre = hubs[rng.integers(0, 4, n)] + rng.uniform(-50, 50, (n, 2))
    border = np.array([[0, 0], [-7.5, 30], [w - 1, h - 1], [w + 20, h / 2], [w / 2, -40.2]])
    return np.concatenate([centre, border, centre[:5] + 0.5])


def _expected(slide, points, view, q):
    """Each crop with its own read_region, origins by the documented rule."""
    f = view.mpp / slide.mpp
    crops = []
    for x, y in points:
        ox, oy = (q * round((v - view.size * f / 2) / q) for v in (x, y))
        crop = slide.read_region(int(ox), int(oy), view.size, view.size, mpp=view.mpp)
        crops.append(resize_crop(crop, view.out_size))
    return np.stack(crops)


@dataclass(frozen=True)
class Case:
    view: View
    q: int  # the lattice origins snap to, level-0 px
    odd: bool = False


CASES = {
    "native": Case(View(64, 0.5), 1),
    "level-2x": Case(View(48, 1.0), 2),
    "box-1.5x": Case(View(40, 0.75), 1),
    "upsample": Case(View(40, 0.25), 1),
    "reduce-shared": Case(View(64, 0.5, out_size=32), 2),
    "reduce-2x-level": Case(View(48, 1.0, out_size=16), 6),
    "resize-odd": Case(View(60, 0.5, out_size=45), 1),
    "enlarge": Case(View(30, 0.5, out_size=40), 1),
    "box-2x-odd": Case(View(40, 1.0), 2, odd=True),
    "fractional-level": Case(View(40, 0.5 * 803 / 401), 1, odd=True),
    "fractional-reduce": Case(View(40, 1.0, out_size=20), 4, odd=True),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_crops_equal_read_region_pixel_for_pixel(request, case):
    slide = request.getfixturevalue("odd_slide" if case.odd else "slide")
    pts = _points(slide)
    sampler = PointSampler(pts, case.view)
    assert case.view.step(slide.mpp) == case.q
    expected = _expected(slide, pts, case.view, case.q)
    proxy = Counting(slide)
    order = sampler.order()
    got = np.empty_like(expected)
    for i in range(0, len(pts), 16):
        idx = order[i : i + 16]
        got[idx] = sampler.read(proxy, idx).numpy()
    assert got.shape == (len(pts), case.view.out, case.view.out, 3)
    np.testing.assert_array_equal(got, expected)
    assert proxy.calls < len(pts) / 2  # neighbourhoods were read once, not crop by crop


def test_crops_stay_centred_on_their_points(slide):
    view = View(64, 1.0, out_size=32)  # q = 4 level-0 px: one output pixel
    pts = _points(slide)
    origins = PointSampler(pts, view).origins(view, slide.mpp)
    centre = origins + view.size * 2 / 2
    assert (origins % 4 == 0).all()
    assert np.abs(centre - pts).max() <= 2.0  # half an output pixel


def test_split_reads_and_the_crop_by_crop_fallback_give_the_same_crops(slide, monkeypatch):
    view = View(64, 0.5, out_size=32)
    pts = _points(slide)
    expected = _expected(slide, pts, view, 2)
    proxy = Counting(slide)
    small = PointSampler(pts, view, max_read_pixels=150 * 150)
    np.testing.assert_array_equal(small.read(proxy, np.arange(len(pts))).numpy(), expected)
    assert proxy.calls > 5
    monkeypatch.setattr(samplers, "_level0", lambda v, ds: None)
    proxy.calls = 0
    np.testing.assert_array_equal(small.read(proxy, np.arange(len(pts))).numpy(), expected)
    assert proxy.calls == len(pts)


def test_one_batch_of_neighbours_is_one_read_per_view(slide):
    rng = np.random.default_rng(3)
    pts = rng.uniform(900, 1100, (32, 2))
    views = (View(32, 0.5), View(128, 0.5, out_size=64))
    proxy = Counting(slide)
    local, context = PointSampler(pts, views).read(proxy, np.arange(32))
    assert proxy.calls == 2
    assert local.shape == (32, 32, 32, 3) and context.shape == (32, 64, 64, 3)


class Recorder(torch.nn.Module):
    """Records what it is given; returns each view's per-channel mean."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, x):
        views = x if isinstance(x, tuple) else (x,)
        self.inputs.append(tuple((type(x).__name__, tuple(v.shape)) for v in views))
        return torch.cat([v.mean(dim=(2, 3)) for v in views], dim=1)


def _norm_mean(crops):
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255
    return ((x - 0.5) / 0.25).mean(dim=(2, 3)).numpy()


def test_one_view_gives_a_tensor_and_several_a_tuple(slide):
    pts = _points(slide)[:40]
    one = Recorder()
    out = run_samples(one, slide, PointSampler(pts, View(32, 0.5)), SPEC, PARAMS)
    assert {i[0] for i in one.inputs} == {("Tensor", (16, 3, 32, 32)), ("Tensor", (8, 3, 32, 32))}
    np.testing.assert_allclose(out.outputs, _norm_mean(_expected(slide, pts, View(32, 0.5), 1)),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    np.testing.assert_array_equal(out.coords, pts)

    views = (View(32, 0.5), View(96, 1.0, out_size=48))
    two = Recorder()
    out = run_samples(two, slide, PointSampler(pts, views), SPEC, PARAMS)
    first = two.inputs[0]
    assert [kind for kind, _ in first] == ["tuple", "tuple"]
    assert [shape for _, shape in first] == [(16, 3, 32, 32), (16, 3, 48, 48)]
    expected = np.concatenate(
        [_norm_mean(_expected(slide, pts, views[0], 1)),
         _norm_mean(_expected(slide, pts, views[1], 4))], axis=1,
    )  # fmt: skip
    np.testing.assert_allclose(out.outputs, expected, rtol=1e-5, atol=1e-5)
    assert out.done.all() and not out.cancelled


def test_per_view_specs_normalise_each_view(slide):
    pts = _points(slide)[:16]
    views = (View(32, 0.5), View(32, 1.0))
    plain = InputSpec(tile_size=32, mpp=0.5, mean=(0, 0, 0), std=(1, 1, 1))
    out = run_samples(Recorder(), slide, PointSampler(pts, views), [SPEC, plain], PARAMS)
    raw = torch.from_numpy(_expected(slide, pts, views[1], 2)).float() / 255
    np.testing.assert_allclose(out.outputs[:, 3:], raw.mean(dim=(1, 2)).numpy(), rtol=1e-5)


def test_cancel_keeps_exactly_the_processed_points(slide):
    pts = _points(slide)
    stop = threading.Event()
    seen = []

    def on_batch(idx, _):
        seen.append(idx.copy())
        if len(seen) == 2:
            stop.set()

    out = run_samples(
        Recorder(), slide, PointSampler(pts, View(32, 0.5)), SPEC, PARAMS,
        cancel=stop, on_batch=on_batch,
    )  # fmt: skip
    assert out.cancelled
    expected = np.zeros(len(pts), bool)
    expected[np.concatenate(seen)] = True
    np.testing.assert_array_equal(out.done, expected)
    assert out.done.sum() == 32
    assert np.isfinite(out.outputs[out.done]).all() and np.isnan(out.outputs[~out.done]).all()


def test_generator_stops_on_false_with_partial_outputs(slide):
    pts = _points(slide)
    gen = iter_samples(Recorder(), slide, PointSampler(pts, View(32, 0.5)), SPEC, PARAMS)
    assert next(gen) == (16, len(pts))
    with pytest.raises(StopIteration) as stop:
        gen.send(False)
    out = stop.value.value
    assert out.cancelled and out.done.sum() == 16


def test_near_order_runs_the_nearest_cells_first(slide):
    pts = _points(slide)
    near = (1500.0, 1000.0)
    sampler = PointSampler(pts, View(32, 0.5), cell=256)
    order = sampler.order(near)
    assert sorted(order.tolist()) == list(range(len(pts)))
    centres = (np.floor(pts / 256) + 0.5) * 256
    dist = np.hypot(*(centres - near).T)
    assert (np.diff(dist[order]) >= 0).all()
    first = []
    out = run_samples(Recorder(), slide, sampler, SPEC, PARAMS, near=near,
                      on_batch=lambda idx, _: first.append(idx.copy()))  # fmt: skip
    assert dist[first[0]].max() <= np.sort(dist)[15]
    raster = run_samples(Recorder(), slide, sampler, SPEC, PARAMS)
    np.testing.assert_allclose(out.outputs, raster.outputs, rtol=1e-6)


def test_hilbert_order_visits_neighbouring_cells():
    yy, xx = np.mgrid[0:16, 0:16]
    d = hilbert_index(xx.ravel(), yy.ravel())
    assert sorted(d.tolist()) == list(range(256))
    path = np.stack([xx.ravel(), yy.ravel()], 1)[np.argsort(d)]
    assert (np.abs(np.diff(path, axis=0)).sum(axis=1) == 1).all()


def test_grid_sampler_reads_the_grid_tiles(slide):
    grid = tile_grid(slide, None, mpp=2.0, tile_size=32)
    sampler = GridSampler(grid)
    idx = np.array([0, 1, 2, 40, 41])
    got = sampler.read(slide, idx).numpy()
    for k, i in enumerate(idx):
        x, y = grid.coords[i]
        np.testing.assert_array_equal(got[k], slide.read_region(int(x), int(y), 32, 32, mpp=2.0))
    assert len(sampler) == len(grid) and sampler.coords is grid.coords


@pytest.mark.parametrize(
    "bad",
    [lambda: View(0, 0.5), lambda: View(32, 0), lambda: View(32, 0.5, out_size=0),
     lambda: PointSampler(np.zeros((3, 3)), View(32, 0.5)),
     lambda: PointSampler([[np.nan, 1.0]], View(32, 0.5)),
     lambda: PointSampler(np.zeros((3, 2)), ())],
    ids=["size", "mpp", "out-size", "shape", "nan", "no-views"],
)  # fmt: skip
def test_bad_views_and_points_are_refused(bad):
    with pytest.raises(ValueError):
        bad()


def test_no_points_gives_empty_outputs(slide):
    out = run_samples(Recorder(), slide, PointSampler(np.zeros((0, 2)), View(32, 0.5)), SPEC,
                      PARAMS)  # fmt: skip
    assert out.done.shape == (0,) and not out.cancelled
