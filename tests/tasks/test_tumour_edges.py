"""Tumour map and MIL: tissue tiles at the slide edge are counted, the mask used is recorded."""

from __future__ import annotations

import numpy as np
import pytest

from histoscope.progress import drive
from histoscope.tasks.tumour import iter_heatmap
from tests.tasks.test_mil import FEATURES, clam_checkpoint
from tests.tasks.test_tumour import RedIsTumour


def _slide(tmp_path, shape, name="edge.tif", mpp=0.5):
    import histoscope as hs
    from histoscope.slide import write_pyramidal_tiff

    rng = np.random.default_rng(0)
    img = np.full((*shape, 3), 245, np.uint8)  # glass on top, tissue to every other edge
    img[shape[0] // 4 :] = (170, 60, 120)
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    path = write_pyramidal_tiff(tmp_path / name, img, mpp=mpp, quality=95, min_size=64)
    return hs.open_slide(path)


@pytest.fixture
def session(tmp_path):
    from histoscope.session import open_session

    # 1000 x 740 px at 0.5 µm = 500 x 370 µm: the 64 µm tiles of the last column (52 µm on the
    # slide) and row (50 µm) run off it, and hold over min_tissue of tissue
    return open_session(_slide(tmp_path, (740, 1000)), in_memory=True)


def test_edge_tiles_with_tissue_are_counted_and_the_detected_mask_is_recorded(session):
    spec = RedIsTumour.input_spec
    heat = drive(iter_heatmap(session, RedIsTumour()))
    every = session.grid(spec.mpp, spec.tile_size, 0.5)
    dropped = len(every) - len(heat.grid)
    off = ((every.coords + every.stride) > (1000, 740)).any(axis=1)  # tissue tiles past an edge
    assert dropped == off.sum() >= 8  # most of the right column and the bottom row
    s = heat.summary()
    assert s["edge_tiles_not_scored"] == dropped
    assert s["edge_note"] == f"{dropped} edge tiles with tissue not scored (partly off the slide)"
    params = heat.provenance.params
    assert params["tissue_mask"] == "detected" and params["tissue_edit_sha256"] is None


def test_an_edited_mask_is_recorded_and_an_empty_one_is_named(session):
    from histoscope.tasks.tissue import use_edited_mask
    from histoscope.tissue import mask_sha256

    mask = session.tissue().mask.copy()
    mask[:, : mask.shape[1] // 2] = False
    key = use_edited_mask(session, mask)
    heat = drive(iter_heatmap(session, RedIsTumour()))
    params = heat.provenance.params
    assert params["tissue_mask"] == "edited" and params["tissue_edit_sha256"] == mask_sha256(mask)
    assert key.edit_sha256 == mask_sha256(mask)
    use_edited_mask(session, np.zeros_like(mask))
    with pytest.raises(ValueError, match="the edited tissue mask has no tissue"):
        drive(iter_heatmap(session, RedIsTumour()))


def test_an_image_smaller_than_one_tile_says_so(tmp_path):
    small = _slide(tmp_path, (100, 100))  # 50 µm, the tile is 64 µm
    with pytest.raises(ValueError, match="image smaller than one 64 µm tile"):
        drive(iter_heatmap(small, RedIsTumour()))


def test_mil_counts_edge_tiles_and_records_the_mask(tmp_path):
    from histoscope.session import open_session
    from histoscope.tasks.mil import iter_mil, registry_features

    # 740 x 740 px at 1 µm: the 128 µm tiles of the last column and row run off the slide
    session = open_session(_slide(tmp_path, (740, 740), mpp=1.0), in_memory=True)
    fm = registry_features("test_cnn", FEATURES, seed=3)
    model, card = clam_checkpoint(tmp_path, fm)
    res = drive(iter_mil(session, model, card, feature_model=fm, min_tissue=0.5))
    every = session.grid(fm.spec.mpp, fm.spec.tile_size, 0.5)
    s = res.summary()
    assert s["edge_tiles_not_scored"] == len(every) - len(res.attention.grid) > 0
    assert "edge tiles with tissue not scored" in s["edge_note"]
    assert res.provenance.params["tissue_mask"] == "detected"
    assert res.attention.provenance.params["tissue_mask"] == "detected"
