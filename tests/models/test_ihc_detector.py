"""The learned IHC nucleus-centre detector: maps to nuclei, and the shipped checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

from histoscope.models import ihc_detector as D


def _two_nuclei(shape=(64, 64), centres=((20, 20), (20, 34))):
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    heat = np.zeros(shape, np.float32)
    fg = np.zeros(shape, np.float32)
    for cy, cx in centres:
        d2 = (yy - cy) ** 2 + (xx - cx) ** 2
        heat = np.maximum(heat, np.exp(-d2 / (2 * 4.0**2)))
        fg[d2 <= 7**2] = 1.0
    return heat, fg


def test_each_peak_grows_one_nucleus_inside_the_foreground():
    heat, fg = _two_nuclei()
    peaks = D.find_peaks(heat, 0.5)
    assert sorted(map(tuple, peaks)) == [(20, 20), (20, 34)]
    labels = D.nuclei_from_maps(heat, fg, peaks)
    assert labels.max() == 2
    assert labels[20, 20] != labels[20, 34] and labels[20, 20] and labels[20, 34]
    assert not labels[fg == 0].any()  # the foreground bounds them (discs lie inside it here)
    # touching nuclei are split between their centres
    assert labels[20, 26] == labels[20, 20] and labels[20, 28] == labels[20, 34]
    # a weaker peak under the threshold is not a nucleus
    assert len(D.find_peaks(0.4 * heat, 0.5)) == 0


def test_a_peak_without_foreground_still_gets_a_small_body():
    heat, _ = _two_nuclei(centres=((30, 30),))
    labels = D.nuclei_from_maps(heat, np.zeros_like(heat), D.find_peaks(heat, 0.5))
    area = (labels == 1).sum() * D.MPP**2
    assert labels.max() == 1 and 10 < area < 16  # the 2 µm disc: 12.6 µm²


def test_network_keeps_the_input_size_for_any_tile():
    import torch

    model = D.IHCCentreNet().eval()
    rgb = np.random.default_rng(0).integers(0, 255, (37, 50, 3), dtype=np.uint8)
    heat, fg, feats = D.predict_maps(model, rgb)
    assert heat.shape == fg.shape == (37, 50)
    assert 0 <= heat.min() and heat.max() <= 1
    assert feats.shape == (0, model.config["widths"][-1])  # smaller than one 32 µm window
    tissue = np.full((136, 136, 3), 90, np.uint8)  # 2 x 2 windows of tissue-dark pixels
    assert D.predict_maps(model, tissue)[2].shape == (4, model.config["widths"][-1])
    assert D.predict_maps(model, np.full((136, 136, 3), 245, np.uint8))[2].shape[0] == 0
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 2, 64, 64)


def test_shipped_checkpoint_says_what_it_was_trained_on():
    from histoscope.ood import reference_from_card

    model, card = D.load_detector()
    assert card.family == D.FAMILY and card.input_spec["mpp"] == D.MPP
    assert (
        "synthetic" in card.data["trained_on"] and "never a real slide" in card.data["trained_on"]
    )
    train = set(card.data["train_seeds_strong"]) | set(card.data["train_seeds_other"])
    held_out = {s for block in card.metrics["heldout"].values() for s in block["seeds"]}
    assert train.isdisjoint(held_out) and train.isdisjoint(card.data["threshold_chosen_on"])
    assert 0 < card.config["threshold"] < 1
    ref = reference_from_card(card)
    assert ref is not None and ref.dim == model.config["widths"][-1]


def test_a_missing_checkpoint_is_a_checkpoint_error(tmp_path):
    from histoscope.errors import CheckpointError

    with pytest.raises(CheckpointError):
        D.load_detector(str(tmp_path / "missing.safetensors"))


def test_a_large_image_runs_in_chunks_with_the_same_maps_and_windows():
    """Memory stays that of one chunk; the result is that of one pass (within float error)."""
    from skimage import data

    model, _ = D.load_detector()
    rgb = data.immunohistochemistry()  # 512 px: four 192 px chunks and partial ones
    heat, fg, feats = D.predict_maps(model, rgb, chunk=4096)  # one pass
    for chunk, overlap in ((192, 64), (128, 128)):
        h2, f2, w2 = D.predict_maps(model, rgb, chunk=chunk, overlap=overlap)
        np.testing.assert_allclose(h2, heat, atol=1e-4)
        np.testing.assert_allclose(f2, fg, atol=1e-4)
        assert w2.shape == feats.shape and len(feats) > 20
        np.testing.assert_allclose(w2, feats, atol=1e-4)
    with pytest.raises(ValueError, match="multiples"):
        D.predict_maps(model, rgb, chunk=100)


def _card_variant(tmp_path, change):
    """The shipped checkpoint with its card changed by ``change(card_dict)`` (tensors kept)."""
    import json

    from safetensors.torch import load_file, save_file

    from histoscope._data import sample_data_path
    from histoscope.checkpoints import CARD_KEY, FORMAT, FORMAT_KEY, read_card

    src = sample_data_path(D.DEFAULT_CHECKPOINT)
    d = read_card(src).to_dict()
    change(d)
    out = tmp_path / f"variant_{len(list(tmp_path.iterdir()))}.safetensors"
    save_file(load_file(str(src)), str(out),
              metadata={FORMAT_KEY: FORMAT, CARD_KEY: json.dumps(d)})  # fmt: skip
    return str(out)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda d: d["config"].pop("threshold"), "config.threshold"),
        (lambda d: d["config"].update(threshold=5), "config.threshold"),
        (lambda d: d["input_spec"].pop("mpp"), "input_spec.mpp"),
        (lambda d: d["input_spec"].update(mpp=0.0), "input_spec.mpp"),
    ],
    ids=["no-threshold", "threshold-5", "no-mpp", "mpp-0"],
)
def test_a_card_without_a_usable_threshold_or_mpp_is_refused_on_load(tmp_path, change, match):
    from histoscope.errors import CheckpointError

    with pytest.raises(CheckpointError, match=match):
        D.load_detector(_card_variant(tmp_path, change))
    model, card = D.load_detector(_card_variant(tmp_path, lambda d: None))  # unchanged: loads
    assert 0 < card.config["threshold"] < 1


def test_training_data_check_keeps_held_out_and_the_sample_within_and_flags_others():
    """The reference's threshold, calibrated on 20+ tuning slides, as scored by its recipe."""
    from histoscope.ood import reference_from_card

    _, card = D.load_detector()
    ref = reference_from_card(card)
    check = card.metrics["ood_check"]
    assert ref.n_calib >= 20 and check["threshold"] == pytest.approx(ref.threshold, abs=1e-4)
    tuned = set(card.data["threshold_chosen_on"])
    assert tuned.isdisjoint(int(s) for s in check["heldout_scores"])
    assert check["heldout_judged"] >= 30 and check["heldout_false_alarm_rate"] <= 0.05
    assert check["sample_ihc_seed41"] < ref.threshold  # File > Open Sample is within
    assert check["skimage_ihc_real"] > ref.threshold  # a real scan and an H&E are outside
    assert check["synthetic_he_seed7"] > ref.threshold
