"""Outside-training-data reference: fit, threshold, report, card round trip."""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch

import histoscope as hs
from histoscope.checkpoints import ModelCard, read_card
from histoscope.errors import CheckpointError
from histoscope.models import TileClassifier
from histoscope.ood import (
    NO_REFERENCE_MESSAGE,
    OUTSIDE_MESSAGE,
    FeatureReference,
    OutsideTrainingDataWarning,
    assess,
    assess_card,
    calibrate_threshold,
    fit_reference,
    item_distances,
    ood_summary,
    reference_from_card,
    warn_if_outside,
    with_ood,
    write_reference,
)
from histoscope.results import Provenance

D = 24


def _mixing(rng) -> np.ndarray:
    """A fixed linear map giving correlated features with a few strong directions."""
    scales = np.r_[np.full(4, 5.0), np.full(D - 4, 0.5)]
    q, _ = np.linalg.qr(rng.normal(size=(D, D)))
    return q * scales


def _slides(rng, mix, n, shift=None, items=(40, 200)) -> list[np.ndarray]:
    out = []
    for _ in range(n):
        m = int(rng.integers(*items))
        x = rng.normal(size=(m, D)) @ mix.T + 3.0
        out.append(x if shift is None else x + shift)
    return out


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(0)
    mix = _mixing(rng)
    ref = fit_reference(_slides(rng, mix, 30), _slides(rng, mix, 20), rank=6, level=0.99,
                        features="gaussian test features")  # fmt: skip
    return ref, mix


def test_training_like_slides_are_within_at_the_expected_rate(fitted):
    ref, mix = fitted
    rng = np.random.default_rng(1)
    flags = [assess(ref, x).outside for x in _slides(rng, mix, 300)]
    assert np.mean(flags) <= 0.05
    d = item_distances(ref, _slides(rng, mix, 1, items=(5000, 5001))[0])
    assert 0.8 < np.median(d) < 1.2  # about 1 for training-like items


def test_shift_along_a_weak_direction_is_flagged(fitted):
    ref, mix = fitted
    rng = np.random.default_rng(2)
    # 6 sd along a low-variance direction: small to a plain Euclidean radius
    weak = mix[:, -1] / np.linalg.norm(mix[:, -1]) * 0.5 * 6
    for x in _slides(rng, mix, 20, shift=weak):
        r = assess(ref, x)
        assert r.outside is True and r.message == OUTSIDE_MESSAGE
        assert r.score > r.threshold
    # the same Euclidean length along a strong direction stays within
    strong = mix[:, 0] / np.linalg.norm(mix[:, 0]) * 0.5 * 6
    assert np.mean([assess(ref, x).outside for x in _slides(rng, mix, 50, shift=strong)]) <= 0.1


def test_a_few_odd_items_do_not_flag_a_slide(fitted):
    ref, mix = fitted
    rng = np.random.default_rng(3)
    x = _slides(rng, mix, 1, items=(200, 201))[0]
    x[:20] += 50.0  # 10 % of the tiles are pen marks
    assert assess(ref, x).outside is False


def test_threshold_rule_and_its_floor():
    scores = [1.0, 1.1, 0.9, 1.05]
    logs = np.log(scores)
    z = 2.3263478740408408
    want = np.exp(logs.mean() + z * logs.std(ddof=1))
    assert calibrate_threshold(scores, 0.99) == pytest.approx(want, rel=1e-6)
    # identical scores: the floor keeps a margin, and the threshold is never below the max
    assert calibrate_threshold([2.0, 2.0], 0.99) == pytest.approx(2.0 * np.exp(z * 0.05))
    assert calibrate_threshold([1.0, 5.0], 0.5) == 5.0
    with pytest.raises(ValueError, match="no calibration slide"):
        calibrate_threshold([float("nan")], 0.99)


def test_slide_level_features_one_row_each():
    rng = np.random.default_rng(4)
    train = [rng.normal(size=(1, 8)) for _ in range(60)]
    calib = [rng.normal(size=(1, 8)) for _ in range(40)]
    ref = fit_reference(train, calib, rank=3, level=0.95)
    assert ref.n_fit == 60 and ref.n_calib == 40
    assert assess(ref, rng.normal(size=8) + 6.0).outside is True
    assert assess(ref, np.zeros(8)).outside is False


def test_bad_inputs_are_named(fitted):
    ref, _ = fitted
    with pytest.raises(ValueError, match="12-d, the reference is 24-d"):
        assess(ref, np.zeros((3, 12)))
    with pytest.raises(ValueError, match="level must be in"):
        fit_reference([np.zeros((3, 2))], [np.zeros((3, 2))], level=1.0)
    with pytest.raises(ValueError, match="different dimensions"):
        fit_reference([np.ones((3, 2)), np.ones((3, 4))], [np.ones((3, 2))])
    nan_rows = np.full((5, D), np.nan)
    r = assess(ref, nan_rows)
    assert r.outside is None and "no features" in r.message


def test_dict_round_trip_and_malformed(fitted):
    ref, mix = fitted
    back = FeatureReference.from_dict(json.loads(json.dumps(ref.to_dict())))
    x = np.random.default_rng(5).normal(size=(50, D)) @ mix.T
    assert np.allclose(item_distances(back, x), item_distances(ref, x))
    assert back.threshold == ref.threshold and back.features == ref.features
    bad = ref.to_dict()
    del bad["basis"]
    with pytest.raises(CheckpointError, match=r"missing key\(s\) \['basis'\]"):
        FeatureReference.from_dict(bad)
    bad = ref.to_dict() | {"eigenvalues": [1.0]}
    with pytest.raises(CheckpointError, match="do not fit"):
        FeatureReference.from_dict(bad)
    with pytest.raises(CheckpointError, match="positive"):
        FeatureReference.from_dict(ref.to_dict() | {"threshold": -1.0})
    with pytest.raises(CheckpointError, match="JSON object"):
        FeatureReference.from_dict([1, 2])


def test_card_without_reference_says_so():
    card = ModelCard(family="tile_classifier", config={}, data={"trained_on": "x"})
    assert reference_from_card(card) is None
    r = assess_card(card, np.zeros((3, 4)))
    assert r.outside is None and r.message == NO_REFERENCE_MESSAGE
    assert ood_summary(r)["outside_training_data"] is None
    json.dumps(ood_summary(r))


def test_write_reference_keeps_tensors_and_other_keys(tmp_path, fitted):
    ref, _ = fitted
    cfg = {"backbone": "test_cnn", "num_classes": 2, "dropout": 0.0, "backbone_kwargs": {}}
    model = TileClassifier.from_config(cfg)
    path = hs.save_checkpoint(tmp_path / "m.safetensors", model,
                              {"family": "tile_classifier", "config": cfg,
                               "data": {"calibration": {"t": 1.5}},
                               "metrics": {"auc": 0.9}})  # fmt: skip
    before = read_card(path)
    write_reference(path, ref)
    loaded, card = hs.load_checkpoint(path, family="tile_classifier")  # hash still verified
    assert card.sha256 == before.sha256 and card.metrics == {"auc": 0.9}
    assert card.data["calibration"] == {"t": 1.5}
    got = reference_from_card(card)
    assert got is not None and got.threshold == ref.threshold
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model.eval()(x))
    assert got.encoder_sha256 == card.sha256  # filled in: the weights the features came from
    # the same card over other weights (a retrained or random-weights copy): not compared
    other = TileClassifier.from_config(cfg)
    copy = hs.save_checkpoint(tmp_path / "other.safetensors", other, card.to_dict())
    r = assess_card(read_card(copy), np.zeros((4, ref.dim)))
    assert r.outside is None and "other weights" in r.message
    write_reference(path, None)
    assert reference_from_card(read_card(path)) is None
    assert read_card(path).data == {"calibration": {"t": 1.5}}


def test_warning_only_when_outside(fitted):
    ref, mix = fitted
    far = assess(ref, np.full((10, D), 100.0))
    with pytest.warns(OutsideTrainingDataWarning, match="slide.svs: outside training data"):
        warn_if_outside(far, "slide.svs")
    near = assess(ref, np.random.default_rng(6).normal(size=(100, D)) @ mix.T + 3.0)
    assert near.outside is False
    warn_if_outside(near, "slide.svs")  # warnings are errors in tests: none may be issued
    assert "vs threshold" in far.detail


# --------------------------------------------------------- tasks on real slides
@pytest.fixture(scope="module")
def astronaut_png(tmp_path_factory):
    from PIL import Image
    from skimage import data

    png = tmp_path_factory.mktemp("foreign") / "astronaut.png"
    Image.fromarray(data.astronaut()).save(png)
    return png


def test_tumour_flags_a_foreign_image(astronaut_png):
    """A photograph declared as a 2 µm/px slide is outside the tumour classifier's training data.

    (At 1 µm/px it has only 6 tissue tiles: too few to judge, see the next test.)
    """
    session = hs.open_session(astronaut_png, mpp=2.0, in_memory=True)
    with pytest.warns(OutsideTrainingDataWarning, match="astronaut.png: outside training data"):
        tumour = hs.tasks.run("tumour", session)
    s = tumour.summary()
    assert s["outside_training_data"] is True and s["ood"]["message"] == OUTSIDE_MESSAGE
    assert s["ood"]["score"] > s["ood"]["threshold"] and s["ood"]["n_items"] == s["scored"]
    assert tumour.provenance.params["ood"]["outside"] is True
    json.dumps(s)


def test_tumour_on_too_few_tiles_or_cancelled_is_not_judged(astronaut_png):
    session = hs.open_session(astronaut_png, mpp=1.0, in_memory=True)
    s = hs.tasks.run("tumour", session).summary()  # 6 tissue tiles: no warning either
    assert s["outside_training_data"] is None and s["scored"] == 6
    assert s["ood"]["message"] == "not judged: only 6 tiles (at least 8 needed)"
    session = hs.open_session(astronaut_png, mpp=2.0, in_memory=True)
    from histoscope.engine import EngineParams

    res = hs.tasks.run("tumour", session, engine=EngineParams(batch_size=4, workers=0),
                       progress=lambda step: not (step.total and step.done >= 4))  # fmt: skip
    s = res.summary()
    assert res.provenance.cancelled and s["outside_training_data"] is None
    assert s["ood"]["message"] == "not judged: run cancelled"


def test_tumour_with_stain_normalisation_says_it_was_not_judged(astronaut_png):
    session = hs.open_session(astronaut_png, mpp=2.0, in_memory=True)
    s = hs.tasks.run("tumour", session, stain_norm="on").summary()
    assert s["outside_training_data"] is None
    assert s["ood"]["message"] == "not judged: stain normalisation on"


def test_tumour_on_a_training_like_slide_is_within(tmp_path):
    from histoscope.synthetic import generate

    # a seed no reference saw, at 0.5 µm/px (the tiles are read at the model's 1 µm/px)
    slide = generate(tmp_path, "he", (2048, 2048), 61_002, 0.5).slide
    res = hs.tasks.run("tumour", slide)  # a warning would fail this test
    s = res.summary()
    assert s["outside_training_data"] is False and s["ood"]["score"] < s["ood"]["threshold"]


def test_analyze_prints_the_flag(astronaut_png, tmp_path, capsys):
    from histoscope.cli import main

    with warnings.catch_warnings(record=True) as seen:  # the CLI prints the flag itself
        warnings.simplefilter("always")
        rc = main(["analyze", str(astronaut_png), "--tasks", "tumour", "--mpp", "2.0",
                   "--out", str(tmp_path / "o")])  # fmt: skip
    assert not [w for w in seen if issubclass(w.category, OutsideTrainingDataWarning)]
    out = capsys.readouterr().out
    assert rc == 0
    assert "tumour: OUTSIDE TRAINING DATA: treat calls as unreliable (distance" in out
    doc = json.loads((tmp_path / "o" / "analyze.json").read_text())
    assert doc["tasks"]["tumour"]["outside_training_data"] is True


def test_mil_flags_real_ihc_tissue_as_outside(tmp_path):
    """Real tissue, but DAB-stained: outside the H&E slides CLAM's features came from."""
    from PIL import Image
    from skimage import data

    png = tmp_path / "ihc.png"
    Image.fromarray(data.immunohistochemistry()).save(png)
    with pytest.warns(OutsideTrainingDataWarning, match="ihc.png"):
        mil = hs.tasks.run("mil", hs.open_session(png, mpp=1.0, in_memory=True))
    s = mil.summary()
    assert s["outside_training_data"] is True and s["ood"]["n_items"] == s["tiles_encoded"]
    assert s["ood"]["score"] > s["ood"]["threshold"]
    json.dumps(s)


def test_a_cancelled_mil_run_is_not_judged(tmp_path):
    from PIL import Image
    from skimage import data

    from histoscope.engine import EngineParams

    png = tmp_path / "ihc.png"
    Image.fromarray(data.immunohistochemistry()).save(png)
    mil = hs.tasks.run("mil", hs.open_session(png, mpp=1.0, in_memory=True),
                       engine=EngineParams(batch_size=4, workers=0),
                       progress=lambda step: not (step.total and step.done >= 4))  # fmt: skip
    s = mil.summary()
    assert mil.provenance.cancelled and s["outside_training_data"] is None
    assert s["ood"]["message"] == "not judged: run cancelled"


def test_reference_keyed_to_the_backbone_hash_survives_a_new_head(fitted):
    """A reference keyed to the backbone's tensors (``data.backbone_sha256``, or a feature
    card's ``features.weights_sha256``) is compared whatever the whole-checkpoint hash;
    one keyed to neither is not (old cards: the whole-checkpoint hash still counts)."""
    ref, _ = fitted
    feats = np.zeros((4, ref.dim))
    keyed = ref.to_dict() | {"encoder_sha256": "b" * 64}
    for data in ({"backbone_sha256": "b" * 64}, {"features": {"weights_sha256": "b" * 64}}):
        card = ModelCard(family="tile_classifier", config={}, data={"ood": keyed, **data},
                         sha256="c" * 64)  # fmt: skip
        assert assess_card(card, feats).outside is not None
    old = ModelCard(family="tile_classifier", config={}, sha256="c" * 64,
                    data={"ood": ref.to_dict() | {"encoder_sha256": "c" * 64}})  # fmt: skip
    assert assess_card(old, feats).outside is not None
    other = ModelCard(family="tile_classifier", config={}, sha256="c" * 64,
                      data={"ood": keyed, "backbone_sha256": "d" * 64})  # fmt: skip
    r = assess_card(other, feats)
    assert r.outside is None and "other weights" in r.message


# ------------------------------------------------- with_ood: when not to judge
@dataclasses.dataclass(frozen=True)
class _Res:
    provenance: Provenance
    ood: object = None


def _card(ref):
    return ModelCard(family="tile_classifier", config={}, data={"ood": ref.to_dict()})


def _with(card, feats, cancelled=False, **kw):
    prov = Provenance(task="t", slide="s.svs", cancelled=cancelled)
    return with_ood(_Res(provenance=prov), card, feats, "s.svs", **kw).ood


def test_too_few_items_or_a_cancelled_run_are_not_judged(fitted):
    from histoscope.ood import CANCELLED_MESSAGE, MIN_ITEMS

    ref, mix = fitted
    card = _card(ref)
    far = np.full((MIN_ITEMS["tiles"] - 1, D), 100.0)  # clearly foreign, but too few
    rep = _with(card, far)
    assert rep.outside is None and rep.message.startswith(f"not judged: only {len(far)} tiles")
    with pytest.warns(OutsideTrainingDataWarning):  # enough tiles, foreign
        assert _with(card, np.full((MIN_ITEMS["tiles"], D), 100.0)).outside is True
    few_cells = np.full((MIN_ITEMS["cells"] - 1, D), 100.0)
    assert "only 49 cells" in _with(card, few_cells, items="cells").message
    with pytest.warns(OutsideTrainingDataWarning):  # enough cells, foreign
        assert _with(card, np.full((MIN_ITEMS["cells"], D), 100.0), items="cells").outside
    rep = _with(card, np.full((40, D), 100.0), cancelled=True)
    assert rep.outside is None and rep.message == CANCELLED_MESSAGE
    assert _with(card, None, missing="not judged: stain normalisation on").message == (
        "not judged: stain normalisation on"
    )


def test_a_malformed_card_reference_gives_an_unknown_report_naming_the_card(fitted):
    ref, _ = fitted
    bad = ModelCard(family="tile_classifier", config={}, sha256="ab" * 32,
                    data={"ood": {"mean": [1.0]}})  # fmt: skip
    rep = _with(bad, np.zeros((20, D)))
    assert rep.outside is None
    assert "tile_classifier checkpoint (sha256 abababababab)" in rep.message
    assert "missing key" in rep.message


def test_feature_tap_samples_a_stream_of_batches_uniformly():
    from histoscope.ood import FeatureTap

    tap = FeatureTap(torch.nn.Identity(), max_items=500)
    with tap:
        for b in range(40):  # 40 batches of 100 rows: row value = arrival index
            tap.module(torch.arange(b * 100, (b + 1) * 100, dtype=torch.float32)[:, None])
    kept = tap.features()[:, 0]
    assert len(kept) == 500 and len(np.unique(kept)) == 500
    assert (np.diff(kept) > 0).all()  # arrival order
    first = (kept < 2000).mean()
    assert abs(first - 0.5) < 0.08, first  # halves of the stream weigh alike
    quarters = np.histogram(kept, bins=4, range=(0, 4000))[0] / 500
    assert np.abs(quarters - 0.25).max() < 0.07, quarters
