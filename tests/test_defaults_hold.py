"""The embedded defaults still do what their cards claim, on slides no recipe has seen.

Each card's ``metrics`` hold held-out numbers from its recipe's own test split;
these checks regenerate a few slides from seeds far from the recipes'
(tumour_patch 1000-1019, clam 7000-7063, foci from 9000 and extra training slides from
48000, isight 5000-5959)
and score the shipped checkpoints through the same task API the GUI uses.
Each floor sits well below the card's claim yet is failed by the same
architecture with random weights, which every test checks too.

Marked ``slow`` (about half a minute) but not deselected: ``pytest`` runs it by default.
"""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import pytest
import torch

import histoscope as hs
from histoscope._data import sample_data_path
from histoscope.checkpoints import load_checkpoint, read_card, save_checkpoint
from histoscope.ood import OutsideTrainingDataWarning
from histoscope.slide import open_slide

pytestmark = pytest.mark.slow

TUMOUR_SEEDS = (71002, 71004, 71010)  # moderate, extensive, moderate tumours
BENIGN_SEEDS = (71006, 71007, 71009)
FOCUS_SEEDS = (71000,)  # one small tumour focus
IHC_SEEDS = tuple(range(72000, 72016))

# floors: the card claims (held-out test split) are in brackets
TUMOUR_AUC = 0.95  # [0.9997]
TUMOUR_BALANCED_ACCURACY = 0.8  # [0.98]
TUMOUR_LOG_LOSS = 0.35  # chance: 0.69
# at the 0.5 threshold the map shows (calibrated head; final test: 0.991 / 1.000, issue 17)
TUMOUR_SENSITIVITY = 0.9
TUMOUR_SPECIFICITY = 0.95
# CLAM (issue 17 target, the final test's figures in the card); see _calls_meet_target
CLAM_SENSITIVITY = 0.95
CLAM_SPECIFICITY = 0.95
CLAM_MAX_BENIGN_CALLED = 1  # of the 3 fresh benign slides, not called with p <= 0.1
ISIGHT_FLOORS = {"intensity": 0.55, "location": 0.8, "quantity": 0.6}  # [0.84, 0.95, 0.90]
# the iSight training-data reference flags about 1-2 % of fresh training-like slides (9 of 500,
# RESULTS.md); of these 16 at most 2 may be flagged (72007 and 72008 are: scores 2.50, 1.78
# against 1.68; a reference that flagged everything, or a threshold set too low, fails)
ISIGHT_MAX_FLAGGED = 2


@pytest.fixture(scope="module")
def he_slides(tmp_path_factory):
    """Seven fresh 2 mm H&E slides at 1 µm/px, as the tumour and CLAM recipes generate them."""
    from histoscope.synthetic import generate

    out = tmp_path_factory.mktemp("fresh_he")
    seeds = TUMOUR_SEEDS + BENIGN_SEEDS + FOCUS_SEEDS
    slides = {s: generate(out, "he", (2048, 2048), s, 1.0) for s in seeds}
    extents = {s: sl.read_label()["tumour_extent"] for s, sl in slides.items()}
    assert all(extents[s] in ("moderate", "extensive") for s in TUMOUR_SEEDS), extents
    assert all(extents[s] == "none" for s in BENIGN_SEEDS), extents
    assert all(extents[s] == "focus" for s in FOCUS_SEEDS), extents
    return slides


@pytest.fixture(scope="module")
def ihc_slides(tmp_path_factory):
    """Sixteen fresh 512 µm IHC slides at 0.5 µm/px, as the iSight recipe generates them."""
    from histoscope.synthetic import generate

    out = tmp_path_factory.mktemp("fresh_ihc")
    return [generate(out, "ihc", (1024, 1024), s, 0.5) for s in IHC_SEEDS]


def _random_weights(name: str, out) -> str:
    """The embedded checkpoint's architecture and card with freshly initialised weights."""
    model, card = load_checkpoint(sample_data_path(name))
    torch.manual_seed(0)
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return str(save_checkpoint(out / f"random_{name}", model, card))


# --------------------------------------------------------------------- tumour
def _tumour_tiles(slides, checkpoint) -> tuple[np.ndarray, np.ndarray]:
    """Truth and heatmap probability of every tumour (>= 50 %) or tumour-free tissue tile."""
    from PIL import Image

    from histoscope.training.clam_data import tile_tumour_fraction

    ys, ps = [], []
    for s in TUMOUR_SEEDS:
        sl = slides[s]
        with open_slide(sl.slide) as slide:
            heat = hs.tasks.run("tumour", slide, checkpoint)
        grid = heat.grid
        mask = np.asarray(Image.open(sl.tumour_mask)) > 0
        um = float(sl.read_label()["mask_um_per_px"])
        frac = tile_tumour_fraction(
            mask, um, grid.coords, float(grid.stride), float(grid.slide_mpp)
        )
        rc = np.rint(grid.coords[:, ::-1] / grid.stride).astype(int)
        p = heat.values[rc[:, 0], rc[:, 1]]
        keep = np.isfinite(p) & ((frac >= 0.5) | (frac == 0))  # the training labelling rule
        ys.append((frac[keep] >= 0.5).astype(int))
        ps.append(p[keep])
    return np.concatenate(ys), np.concatenate(ps)


def _tile_scores(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    from histoscope.training.metrics import roc_auc

    call = p >= 0.5
    q = np.clip(np.where(y == 1, p, 1 - p), 1e-7, 1.0)
    sens, spec = float(call[y == 1].mean()), float((~call[y == 0]).mean())
    return {"auc": roc_auc(y, p), "balanced_accuracy": (sens + spec) / 2,
            "sensitivity": sens, "specificity": spec,
            "log_loss": float(-np.log(q).mean()), "n_tumour": int(y.sum()), "n": len(y)}  # fmt: skip


def _tumour_ok(m: dict[str, float]) -> bool:
    return (m["auc"] >= TUMOUR_AUC and m["balanced_accuracy"] >= TUMOUR_BALANCED_ACCURACY
            and m["log_loss"] <= TUMOUR_LOG_LOSS and m["sensitivity"] >= TUMOUR_SENSITIVITY
            and m["specificity"] >= TUMOUR_SPECIFICITY)  # fmt: skip


def test_tumour_default_finds_tumour_tiles_on_fresh_slides(he_slides, tmp_path):
    card = read_card(sample_data_path("tumour_patch_default.safetensors"))
    claim = card.metrics["test"]
    assert claim["auc"] >= TUMOUR_AUC and claim["balanced_accuracy"] >= TUMOUR_BALANCED_ACCURACY
    final = card.metrics["final_test"]["test"]
    assert final["sensitivity"] >= TUMOUR_SENSITIVITY and final["specificity"] >= TUMOUR_SPECIFICITY
    default = _tile_scores(*_tumour_tiles(he_slides, None))
    assert default["n_tumour"] >= 50 and default["n"] - default["n_tumour"] >= 50, default
    assert _tumour_ok(default), default
    random = _tile_scores(
        *_tumour_tiles(he_slides, _random_weights("tumour_patch_default.safetensors", tmp_path))
    )
    assert not _tumour_ok(random), random


# ----------------------------------------------------------------------- clam
def _slide_calls(slides, checkpoint) -> dict[int, tuple[int, float]]:
    """Seed -> (true label, tumour probability) of the MIL task."""
    calls = {}
    for s, sl in slides.items():
        with open_slide(sl.slide) as slide:
            res = hs.tasks.run("mil", slide, checkpoint)
        calls[s] = (int(sl.read_label()["label"]), float(res.probability[1]))
    return calls


def _calls_meet_target(calls: dict[int, tuple[int, float]]) -> bool:
    """Tumour and focus slides called with p >= 0.9, all benign slides but one with p <= 0.1.

    The default's final test gives specificity 1.00 on 50 benign slides, but over every in-range
    held-out benign slide it calls 91 of 94 benign (0.97, RESULTS.md, issue 17): at that rate one
    false positive among three benign slides is expected about 9 % of the time, two about 0.3 %.
    Benign 71009 is one (p 0.92): it is allowed, and counted, not hidden. The confident margins
    (the default: tumour p > 0.9999, the other benign slides < 1e-6) are what random weights,
    whose calls all sit near 0.5, cannot reach.
    """
    tumour = [p for y, p in calls.values() if y == 1]
    benign = [p for y, p in calls.values() if y == 0]
    return all(p >= 0.9 for p in tumour) and sum(p > 0.1 for p in benign) <= CLAM_MAX_BENIGN_CALLED


def test_clam_default_calls_fresh_tumour_focus_and_benign_slides(he_slides, tmp_path):
    # the target (sensitivity on foci >= 0.95 at specificity >= 0.95) as recorded by the
    # default's one final test (50 focus + 50 benign slides, seeds 47001-47227)
    final = read_card(sample_data_path("clam_default.safetensors")).metrics["final_test"]
    assert final["n"] == {"normal": 50, "tumour": 50}, final["n"]
    assert final["sensitivity"] >= CLAM_SENSITIVITY and final["specificity"] >= CLAM_SPECIFICITY
    default = _slide_calls(he_slides, None)
    assert _calls_meet_target(default), default
    random = _slide_calls(he_slides, _random_weights("clam_default.safetensors", tmp_path))
    assert not _calls_meet_target(random), random


# --------------------------------------------------------------------- isight
def _isight_accuracy(slides, checkpoint, flags: list | None = None) -> dict[str, float]:
    """Share of slides whose intensity, location and quantity calls (image only) are right.

    An :class:`OutsideTrainingDataWarning` is caught and recorded per slide
    (``flags`` gets ``(warned, summary["outside_training_data"])``), not
    raised: the reference has a calibrated false-alarm rate on training-like
    slides. Any other HistoScope warning is still an error.
    """
    hits: dict[str, list[bool]] = {t: [] for t in ISIGHT_FLOORS}
    for sl in slides:
        truth = sl.read_label()["ihc"]
        with open_slide(sl.slide) as slide, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", OutsideTrainingDataWarning)
            summary = hs.tasks.run("isight", slide, checkpoint).summary()
        warned = any(issubclass(w.category, OutsideTrainingDataWarning) for w in caught)
        if flags is not None:
            flags.append((warned, summary["outside_training_data"]))
        for t in hits:
            hits[t].append(summary["calls"][t]["call"] == truth[t])
    return {t: float(np.mean(v)) for t, v in hits.items()}


def test_isight_default_calls_fresh_ihc_slides(ihc_slides, tmp_path):
    claim = read_card(sample_data_path("isight_default.safetensors")).metrics["test"]
    majority = {
        t: max(Counter(sl.read_label()["ihc"][t] for sl in ihc_slides).values()) / len(ihc_slides)
        for t in ISIGHT_FLOORS
    }
    for t, floor in ISIGHT_FLOORS.items():
        # each floor sits below the card's image-only claim and clearly above chance
        assert claim["model_image_only"][t]["accuracy"] >= floor + 0.05, t
        assert floor >= majority[t] + 0.1, (t, majority)
    flags: list[tuple[bool, bool | None]] = []
    default = _isight_accuracy(ihc_slides, None, flags)
    assert all(default[t] >= f for t, f in ISIGHT_FLOORS.items()), (default, majority)
    # the default carries a training-data reference and scores every slide against it; the
    # warning and the summary agree, and it flags no more than its calibrated rate allows
    assert "ood" in read_card(sample_data_path("isight_default.safetensors")).data
    assert len(flags) == len(ihc_slides)
    assert all(outside is warned for warned, outside in flags), flags
    assert sum(warned for warned, _ in flags) <= ISIGHT_MAX_FLAGGED, flags
    random = _isight_accuracy(ihc_slides, _random_weights("isight_default.safetensors", tmp_path))
    assert not any(random[t] >= f for t, f in ISIGHT_FLOORS.items()), (random, majority)
