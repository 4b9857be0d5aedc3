"""iSight task on a generated slide with a tiny untrained model (mechanics, not accuracy)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from histoscope.models.isight import TASKS, ISight
from histoscope.tasks.isight import run_isight


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ISight("test_cnn", ("breast", "colon"), dim=16, hidden=8,
                  backbone_kwargs={"tile_size": 64, "mpp": 2.0}).eval()  # fmt: skip


def test_calls_probabilities_and_attention_heatmap(pyramid_tiff, model, tmp_path):
    import histoscope as hs

    slide = hs.open_slide(pyramid_tiff)
    res = run_isight(slide, model, metadata="breast HER2", max_tiles=12)
    calls = res.calls()
    assert set(calls) == set(TASKS)
    for task in TASKS:
        assert calls[task]["call"] == max(
            calls[task]["probabilities"], key=calls[task]["probabilities"].get
        )
    heat = res.attention.values
    assert np.isfinite(heat).sum() == len(res.attention.grid) <= 12
    [(data, kwargs, kind)] = res.to_layers()
    assert kind == "image" and kwargs["scale"][0] == pytest.approx(64 * 2.0)  # one pixel per tile
    files = res.save(tmp_path)
    doc = json.loads((tmp_path / "isight.json").read_text())
    assert doc["calls"]["intensity"]["call"] in ("negative", "weak", "moderate", "strong")
    assert doc["provenance"]["tile_grid"]["n_tiles"] == len(res.attention.grid)
    assert all(f.exists() for f in files)


def test_region_limits_tiles(pyramid_tiff, model):
    import histoscope as hs

    slide = hs.open_slide(pyramid_tiff)
    res = run_isight(slide, model, region=(0, 0, 300, 300), max_tiles=64)
    coords = res.attention.grid.coords
    assert len(coords) >= 1 and (coords < 300).all()


def test_metadata_uses_the_checkpoints_own_hash_buckets(pyramid_tiff):
    import histoscope as hs

    torch.manual_seed(0)
    small = ISight("test_cnn", ("breast", "colon"), dim=16, hidden=8, meta_buckets=64,
                   backbone_kwargs={"tile_size": 64, "mpp": 2.0}).eval()  # fmt: skip
    res = run_isight(hs.open_slide(pyramid_tiff), small, metadata="breast HER2", max_tiles=4)
    assert res.provenance.params["metadata"] == "breast HER2"


def test_panel_and_evaluation_paths_agree_on_an_optical_density_model(pyramid_tiff):
    import histoscope as hs
    from histoscope.training.isight import predict
    from histoscope.training.isight_data import read_bag

    torch.manual_seed(0)
    od = ISight("test_cnn", ("breast", "colon"), dim=16, hidden=8, input_space="od",
                backbone_kwargs={"tile_size": 64, "mpp": 2.0, "pool": "avgmax"}).eval()  # fmt: skip
    res = run_isight(hs.open_slide(pyramid_tiff), od, metadata="breast HER2", max_tiles=6)
    logits = predict(od, [read_bag(pyramid_tiff, od.input_spec, max_tiles=6)], ["breast HER2"])
    for task in TASKS:
        want = torch.softmax(torch.from_numpy(logits[task][0]), dim=0).numpy()
        got = np.array(list(res.probabilities[task].values()))
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_slide_without_tissue_is_flagged_not_silently_read(tmp_path, model, pyramid_tiff):
    import histoscope as hs
    from histoscope.slide import write_pyramidal_tiff

    glass = write_pyramidal_tiff(tmp_path / "glass.tif", np.full((512, 512, 3), 242, np.uint8),
                                 mpp=0.5)  # fmt: skip
    res = run_isight(hs.open_slide(glass), model, max_tiles=4)
    assert "no tissue found" in res.summary()["warning"]
    assert res.provenance.params["warning"] == res.summary()["warning"]
    assert run_isight(hs.open_slide(pyramid_tiff), model, max_tiles=4).summary()["warning"] is None


def test_tissue_head_gets_the_text_only_when_it_names_a_tissue(pyramid_tiff, model):
    import histoscope as hs
    from histoscope.tasks.isight import NO_TISSUE_NAMED, names_class

    assert names_class("Tissue: breast. Antibody: HER2.", ("breast", "colon"))
    assert not names_class("Tissue: kidney.", ("breast", "colon"))
    assert not names_class("breastfeeding", ("breast",))  # whole words only
    slide = hs.open_slide(pyramid_tiff)
    named = run_isight(slide, model, metadata="Tissue: breast. Antibody: HER2.", max_tiles=4)
    assert named.heads["tissue"]["case"] == "text" and named.summary()["text"]["notes"] == []
    for text in ("Antibody: HER2.", "Tissue: kidney."):
        res = run_isight(slide, model, metadata=text, max_tiles=4)
        summary = res.summary()
        assert res.heads["tissue"]["case"] == "image", text
        assert res.heads["intensity"]["case"] == "text", text
        assert summary["text"]["notes"] == [NO_TISSUE_NAMED]
        assert "tissue" not in summary["text"]["used_by"]
        image = run_isight(slide, model, max_tiles=4)
        assert res.probabilities["tissue"] == pytest.approx(image.probabilities["tissue"])


@pytest.mark.parametrize("text", ["乳腺", "?", "-"])
def test_text_the_encoder_cannot_read_runs_every_head_on_the_image(pyramid_tiff, model, text):
    import histoscope as hs
    from histoscope.tasks.isight import NOT_UNDERSTOOD

    slide = hs.open_slide(pyramid_tiff)
    res = run_isight(slide, model, metadata=text, max_tiles=4)
    assert {h["case"] for h in res.heads.values()} == {"image"}
    assert res.summary()["text"] == {"given": True, "mode": "auto", "used_by": [],
                                     "notes": [NOT_UNDERSTOOD]}  # fmt: skip
    image = run_isight(slide, model, max_tiles=4)
    for task, probs in image.probabilities.items():
        assert res.probabilities[task] == pytest.approx(probs)
