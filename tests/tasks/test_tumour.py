"""Tumour heatmap: placement, background masking, viewport-first order, Grad-CAM of a tile."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from histoscope.models.backbones import InputSpec
from histoscope.progress import drive
from histoscope.tasks.tumour import (
    TumourParams,
    find_tissue,
    iter_heatmap,
    tile_gradcam,
    tumour_index,
)

MPP = 0.5


class RedIsTumour(nn.Module):
    """Logits (normal, tumour) = (0, 20 * (mean red - mean blue)); has a conv block for Grad-CAM."""

    input_spec = InputSpec(tile_size=32, mpp=2.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 1, 1), nn.Identity())
        with torch.no_grad():
            self.features[0].weight.copy_(torch.tensor([1.0, 0, -1])[None, :, None, None])
            self.features[0].bias.zero_()

    def forward(self, x):
        t = 20 * self.features(x).mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(t), t], dim=1)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    import histoscope as hs
    from histoscope.slide import write_pyramidal_tiff

    rng = np.random.default_rng(0)
    img = np.full((1024, 1536, 3), 245, np.uint8)  # glass
    img[256:, :768] = (110, 80, 170)  # "normal" tissue: bluish, left
    img[256:, 768:] = (170, 60, 120)  # "tumour" tissue: reddish, right
    img[256:] = np.clip(img[256:] + rng.normal(0, 8, img[256:].shape), 0, 255).astype(np.uint8)
    path = write_pyramidal_tiff(tmp_path_factory.mktemp("t") / "t.tif", img, mpp=MPP, quality=95)
    return hs.open_slide(path)


def test_heatmap_values_land_on_their_tiles_and_background_is_nan(slide):
    heat = drive(iter_heatmap(slide, RedIsTumour()))
    values = heat.values
    s = heat.grid.stride * MPP  # tile edge in µm: 32 px at 2 µm = 64 µm
    assert s == pytest.approx(64)
    rows_glass = int(256 * MPP // s)  # the glass strip is 128 µm high: 2 tile rows
    assert np.isnan(values[:rows_glass]).all()
    left, right = (
        values[rows_glass + 1 :, : int(768 * MPP // s) - 1],
        values[rows_glass + 1 :, int(768 * MPP // s) + 1 :],
    )
    assert np.nanmax(left) < 0.1 and np.nanmin(right) > 0.9
    [(data, kwargs, kind)] = heat.to_layers()
    assert kind == "image" and kwargs["contrast_limits"] == (0.0, 1.0)
    assert kwargs["scale"] == (pytest.approx(s), pytest.approx(s))


def test_viewport_first_scores_tiles_near_the_view_first(slide):
    from histoscope.engine import EngineParams

    near = (1500.0, 1000.0)  # level-0 px, bottom right
    gen = iter_heatmap(slide, RedIsTumour(), near=near,
                       engine=EngineParams(batch_size=4, workers=1, prefetch=1))  # fmt: skip
    first = next(gen)
    assert first.total == 0 and first.what == "finding tissue"  # the wait is named
    step = next(s for s in gen if s.total)
    live = step.partial  # the map the layer shows, filling in place
    with pytest.raises(StopIteration) as stop:
        gen.send(False)  # cancel after the first batch
    heat = stop.value.value
    assert heat.cancelled and heat.summary()["cancelled"]
    done = np.argwhere(np.isfinite(heat.values))
    assert 1 <= len(done) <= 8
    assert np.array_equal(np.isfinite(live.values), np.isfinite(heat.values))
    rows, cols = heat.grid.shape
    assert (done[:, 0] >= rows - 2).all() and (done[:, 1] >= cols - 3).all()


def test_tissue_layer_aligns_with_slide(slide):
    res = find_tissue(slide)
    [(mask, kwargs, kind)] = res.to_layers()
    assert kind == "labels" and mask.dtype == np.uint8
    # glass rows (top 128 µm) are background, tissue below
    px = kwargs["scale"][0]
    assert mask[: int(100 / px)].sum() == 0 and mask[int(200 / px) :].mean() > 0.9


def test_gradcam_of_clicked_tile_lands_on_the_tile(slide):
    heat = drive(iter_heatmap(slide, RedIsTumour()))
    model = RedIsTumour()
    cam, (x0, y0) = tile_gradcam(slide, model, model.input_spec, x_um=700.0, y_um=400.0,
                                 grid=heat.grid)  # fmt: skip
    stride = heat.grid.stride
    assert cam.shape == (32, 32)
    assert x0 % stride == 0 and y0 % stride == 0
    assert x0 * MPP <= 700 < (x0 + stride) * MPP and y0 * MPP <= 400 < (y0 + stride) * MPP
    assert cam.max() == pytest.approx(1.0)  # red tile: evidence everywhere


def test_gradcam_explains_the_stain_normalised_input_the_map_used(slide):
    from histoscope.stains import MacenkoNormalizer

    model = RedIsTumour()
    spec = model.input_spec
    norm = MacenkoNormalizer.fit(slide.read_region(0, 512, 1536, 512, mpp=1.0))
    plain_cam, _ = tile_gradcam(slide, model, spec, 700.0, 400.0)
    normed_cam, _ = tile_gradcam(slide, model, spec, 700.0, 400.0, normalizer=norm)
    # the wrapper changes what the model sees, so the explanation of that input differs
    assert not np.allclose(plain_cam, normed_cam)


def test_tumour_index_from_card_classes():
    assert tumour_index(("normal", "tumour")) == 1
    assert tumour_index(("Tumor", "stroma", "fat")) == 0
    assert tumour_index(()) == 1
    with pytest.raises(ValueError, match="no tumour class"):
        tumour_index(("a", "b", "c"))


def test_stain_normalised_model_sees_normalised_tiles(slide):
    from histoscope.stains import MacenkoNormalizer
    from histoscope.tasks.tumour import StainNormalized

    rgb = slide.read_region(0, 600, 64, 64, mpp=1.0)
    norm = MacenkoNormalizer.fit(slide.read_region(0, 512, 512, 256, mpp=1.0))
    model = RedIsTumour()
    spec = model.input_spec

    def tensor(a):
        return torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255

    direct = model(tensor(norm.transform(rgb)))
    wrapped = StainNormalized(model, spec, norm)(tensor(rgb))
    torch.testing.assert_close(wrapped, direct, atol=0.05, rtol=0.02)


def test_heatmap_with_stain_normalisation_runs_and_records_it(slide):
    heat = drive(iter_heatmap(slide, RedIsTumour(), params=TumourParams(stain_norm="on")))
    assert heat.n_scored == len(heat.grid)
    assert heat.provenance.params["stain_norm_applied"] == "macenko"


def test_stain_normalisation_follows_the_checkpoint_card():
    from types import SimpleNamespace

    trained_normalised = SimpleNamespace(input_spec={"stain_norm": "macenko"})
    plain = SimpleNamespace(input_spec={})
    assert TumourParams().normalise(trained_normalised)
    assert not TumourParams().normalise(plain)
    assert TumourParams(stain_norm="on").normalise(plain)
    assert not TumourParams(stain_norm="off").normalise(trained_normalised)


@pytest.fixture(scope="module")
def edge_slide(tmp_path_factory):
    """Red ("tumour") tissue up to the right edge; the last tile column is half off the slide."""
    import histoscope as hs
    from histoscope.slide import write_pyramidal_tiff

    rng = np.random.default_rng(2)
    img = np.full((768, 1088, 3), 245, np.uint8)  # 1088 px = 8.5 tiles of 128 level-0 px
    img[256:] = (170, 60, 120)
    img[256:] = np.clip(img[256:] + rng.normal(0, 8, img[256:].shape), 0, 255).astype(np.uint8)
    path = write_pyramidal_tiff(tmp_path_factory.mktemp("e") / "edge.tif", img, mpp=MPP)
    return hs.open_slide(path)


def test_a_tile_half_off_the_slide_is_not_scored(edge_slide):
    # min_tissue 0.3 lets the half-off column (tissue fraction ~0.5) into the tissue grid;
    # read with glass padding, RedIsTumour would score it 0.88: it must stay unscored
    heat = drive(iter_heatmap(edge_slide, RedIsTumour(), params=TumourParams(min_tissue=0.3)))
    g = heat.grid
    assert g.shape[1] == 9 and g.stride == 128
    assert np.isnan(heat.values[:, 8]).all()
    assert np.isfinite(heat.values[3:, 7]).all() and np.nanmin(heat.values[3:, :8]) > 0.9
    assert ((g.coords + g.stride) <= np.array([1088, 768])).all()


def test_the_map_scores_the_edited_tissue_mask(slide):
    from histoscope.session import open_session
    from histoscope.tasks.tissue import use_edited_mask

    session = open_session(slide, in_memory=True)
    mask = session.tissue().mask.copy()
    mask[:, : mask.shape[1] // 2] = False  # the user erases the left half (the "normal" tissue)
    use_edited_mask(session, mask)
    heat = drive(iter_heatmap(session, RedIsTumour()))
    cols = heat.values.shape[1]
    assert np.isnan(heat.values[:, : cols // 2]).all()
    assert np.isfinite(heat.values[3:, cols // 2 + 1 :]).all()
