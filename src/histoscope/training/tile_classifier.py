"""Family ``tile_classifier``: tumour vs normal patches, from synthetic slides or patch folders.

Recipe sections (defaults in :data:`DEFAULTS`):

``data``
    ``path``: a ``histoscope synth --kind he`` folder, or a patch folder in the
    seed's layout (``<split>/<class>/*.png``, classes ``normal``/``tumour`` or
    ``benign``/``malignant``; see :func:`._tiles.load_patch_folder`), ``generate`` (``{count, size, seed, mpp}``: make
    the dataset with :func:`histoscope.synthetic._dataset.write_dataset` when the
    folder is missing), ``mpp`` and ``tile_size`` (tiles read), ``min_tissue``,
    ``tumour_min``, ``normal_max`` (labelling, see :mod:`._tiles`),
    ``max_per_slide`` (cap per class and slide on the train and val splits; the
    test split is always read whole, as ``histoscope evaluate`` reads it),
    ``stain_norm`` (``null`` or ``"macenko"``: every tile is Macenko-normalised
    per slide, in training and evaluation alike; the card's ``input_spec`` says so).
``model``
    ``backbone``, ``backbone_kwargs``, ``dropout`` of
    :class:`histoscope.models.TileClassifier`.
``augment``
    ``flips`` (the 8 flips/rotations), ``hed_sigma`` and ``hed_bias`` (HED jitter).
``eval``
    ``shift_degrees``, ``shift_amount``, ``seed``: the stain-shifted copy of
    the test split (see :mod:`._stain_aug`); ``calibrate`` (``null`` or
    ``{path, generate, split, max_per_slide, from_checkpoint}``): after
    training, fit a temperature and a bias per output on the logits
    (:func:`histoscope.training.metrics.fit_logit_affine`) on the labelled
    tiles of ``split`` of the synth folder ``path`` (made with ``generate``
    when missing; default: the validation split), store it in the model's head
    (:class:`histoscope.models.tile_classifier.CalibratedLinear`) and its
    reliability and ECE in the card (``metrics.calibration``). With
    ``from_checkpoint`` nothing is trained: that checkpoint is calibrated and
    re-evaluated, and its card is kept with the calibration added.
``export``
    Optional path the checkpoint is also copied to.

Training draws a class-balanced sample each epoch (each draw picks a class
with probability 1/2, then a tile of it), keeps the epoch with the best
validation AUC, and writes the checkpoint with the test-split metrics (plain
and stain-shifted) in its card.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from histoscope.atomic import atomic_path
from histoscope.training._loop import TrainSettings, fit
from histoscope.training._recipe import RecipeError, check_keys, fingerprint
from histoscope.training._stain_aug import hed_jitter, stain_shift
from histoscope.training._tiles import (
    CLASSES,
    TileSet,
    is_patch_folder,
    load_patch_folder,
    load_split,
)

FAMILY = "tile_classifier"
DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {"path": None, "generate": None, "mpp": 1.0, "tile_size": 128, "min_tissue": 0.5,
             "tumour_min": 0.5, "normal_max": 0.0, "max_per_slide": None, "stain_norm": None},
    "model": {"backbone": "hs_cnn_small", "backbone_kwargs": {}, "dropout": 0.0},
    "augment": {"flips": True, "hed_sigma": 0.0, "hed_bias": 0.0},
    "eval": {"shift_degrees": 12.0, "shift_amount": [1.45, 1.7], "seed": 0, "calibrate": None},
}  # fmt: skip
CALIBRATE_DEFAULTS: dict[str, Any] = {"path": None, "generate": None, "split": "all",
                                      "max_per_slide": None, "from_checkpoint": None}  # fmt: skip
#: A slide counts in the per-slide sensitivity (specificity) with at least this many
#: tumour (normal) tiles.
MIN_SLIDE_TILES = 5
LABEL_KEYS = ("mpp", "tile_size", "min_tissue", "tumour_min", "normal_max")
GENERATE_KEYS = ("count", "size", "seed", "mpp")


def settings(recipe: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The family's sections with defaults filled in; unknown keys are refused.

    Raises
    ------
    RecipeError
        Naming an unknown key or a missing ``data.path``.
    """
    out = {}
    for section, defaults in DEFAULTS.items():
        given = recipe.get(section) or {}
        check_keys(given, defaults, section)
        out[section] = {**defaults, **given}
    if not out["data"]["path"]:
        raise RecipeError("recipe key data.path is required (a `histoscope synth` folder)")
    if out["data"]["stain_norm"] not in (None, "macenko"):
        raise RecipeError(f"recipe key data.stain_norm must be null or 'macenko', "
                          f"got {out['data']['stain_norm']!r}")  # fmt: skip
    gen = out["data"]["generate"]
    if gen is not None:
        check_keys(gen, GENERATE_KEYS, "data.generate")
    cal = out["eval"]["calibrate"]
    if cal is not None:
        if not isinstance(cal, Mapping):
            raise RecipeError(f"recipe key eval.calibrate must be null or a mapping, got {cal!r}")
        check_keys(cal, CALIBRATE_DEFAULTS, "eval.calibrate")
        cal = out["eval"]["calibrate"] = {**CALIBRATE_DEFAULTS, **cal}
        if cal["generate"] is not None:
            check_keys(cal["generate"], GENERATE_KEYS, "eval.calibrate.generate")
    return out


def _ensure_data(data: Mapping[str, Any]) -> Path:
    path = Path(data["path"])
    data = {**data, "generate": data.get("generate")}
    if (path / "manifest.json").is_file() or is_patch_folder(path) or data["generate"] is None:
        return path  # load_split names a missing folder or manifest
    from histoscope.synthetic._dataset import write_dataset

    g = data["generate"]
    write_dataset(path, kind="he", size=tuple(g.get("size", (4096, 4096))),
                  seed=int(g.get("seed", 0)), count=int(g.get("count", 10)),
                  mpp=float(g.get("mpp", 0.5)))  # fmt: skip
    return path


def _load(path: Path, split: str, data: Mapping[str, Any], seed: int = 0) -> TileSet:
    if is_patch_folder(path):
        return load_patch_folder(path, split, tile_size=int(data["tile_size"]))
    kw = {k: data[k] for k in LABEL_KEYS}
    return load_split(path, split, max_per_slide=data.get("max_per_slide"), seed=seed, **kw)


# ------------------------------------------------------------------ tensors
def _normalise(x: torch.Tensor, spec: Mapping[str, Any]) -> torch.Tensor:
    mean = torch.tensor(spec["mean"], dtype=x.dtype).view(1, 3, 1, 1) * 255
    std = torch.tensor(spec["std"], dtype=x.dtype).view(1, 3, 1, 1) * 255
    return (x - mean) / std


def _dihedral(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each image turned by a random multiple of 90° and maybe mirrored."""
    ops = torch.randint(0, 8, (x.shape[0],), generator=gen)
    out = x.clone()
    for op in range(1, 8):
        sel = ops == op
        if sel.any():
            y = torch.rot90(x[sel], op % 4, dims=(2, 3))
            out[sel] = torch.flip(y, dims=(3,)) if op >= 4 else y
    return out


@torch.no_grad()
def predict_logits(
    model: nn.Module, images: np.ndarray, spec: Mapping[str, Any], batch: int = 128,
    device: torch.device | str = "cpu", *, raw: bool = False,
) -> np.ndarray:  # fmt: skip
    """Logits ``(N, C)`` of ``(T, T, 3)`` uint8 tiles; ``raw`` skips the head's calibration."""
    model.eval()
    out = []
    for i in range(0, len(images), batch):
        x = _normalise(torch.from_numpy(images[i : i + batch]).permute(0, 3, 1, 2).float(), spec)
        z = model.raw_logits(x.to(device)) if raw else model(x.to(device))
        out.append(z.float().cpu().numpy())
    n_out = getattr(model, "config", {}).get("num_classes", len(CLASSES))
    return np.concatenate(out) if out else np.zeros((0, n_out), np.float32)


@torch.no_grad()
def predict(
    model: nn.Module, images: np.ndarray, spec: Mapping[str, Any], batch: int = 128,
    device: torch.device | str = "cpu",
) -> np.ndarray:  # fmt: skip
    """Tumour probability of each ``(T, T, 3)`` uint8 tile, in order (calibrated if the model is).

    Parameters
    ----------
    model
        A two-class :class:`~histoscope.models.TileClassifier`.
    images
        ``(N, T, T, 3)`` uint8.
    spec
        Input spec with ``mean`` and ``std``.
    batch, device
        Inference batch size and device.

    Returns
    -------
    numpy.ndarray
        ``(N,)`` float probabilities of class ``"tumour"``.
    """
    z = predict_logits(model, images, spec, batch, device)
    if len(z) == 0:
        return np.zeros(0, np.float32)
    return torch.softmax(torch.from_numpy(z), 1)[:, 1].numpy()


def metrics_for(
    labels: np.ndarray, prob: np.ndarray, slide: np.ndarray | None = None,
    names: tuple[str, ...] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Tile metrics at the 0.5 threshold the map shows, with 95 % intervals and per-slide floors.

    Returns patch ROC AUC; accuracy, balanced accuracy, sensitivity and
    specificity at 0.5 (with Wilson 95 % intervals over tiles); ECE (15 bins);
    confusion; counts. With ``slide`` (index per tile into ``names``) also
    ``sensitivity_ci95_slides`` / ``specificity_ci95_slides`` (percentile
    bootstrap over slides, 2000 resamples: tiles of one slide are not
    independent) and ``per_slide`` (see :func:`per_slide`).
    """
    from histoscope.training.metrics import (
        accuracy,
        balanced_accuracy,
        confusion_matrix,
        ece,
        roc_auc,
        wilson,
    )

    pred = (prob >= 0.5).astype(np.int64)
    both = len(np.unique(labels)) == 2
    pos, neg = labels == 1, labels == 0
    k_pos, k_neg = int(pred[pos].sum()), int((1 - pred[neg]).sum())
    out = {
        "auc": roc_auc(labels, prob) if both else None,
        "accuracy": accuracy(labels, pred),
        "balanced_accuracy": balanced_accuracy(labels, pred),
        "sensitivity": float(pred[pos].mean()) if pos.any() else None,
        "specificity": float(1 - pred[neg].mean()) if neg.any() else None,
        "sensitivity_ci95": list(wilson(k_pos, int(pos.sum()))) if pos.any() else None,
        "specificity_ci95": list(wilson(k_neg, int(neg.sum()))) if neg.any() else None,
        "ece": ece(np.stack([1 - prob, prob], 1), labels) if len(labels) else None,
        "confusion": np.asarray(confusion_matrix(labels, pred, n_classes=2)).tolist(),
        "n": {c: int((labels == i).sum()) for i, c in enumerate(CLASSES)},
    }
    if slide is not None:
        from histoscope.training.metrics import bootstrap_slides

        boot = bootstrap_slides(labels, pred, slide)
        out["sensitivity_ci95_slides"] = boot["sensitivity"]
        out["specificity_ci95_slides"] = boot["specificity"]
        out["per_slide"] = per_slide(labels, pred, slide, names)
    return out


def per_slide(labels: np.ndarray, pred: np.ndarray, slide: np.ndarray,
              names: tuple[str, ...] | None = None) -> dict[str, Any]:  # fmt: skip
    """Each slide's sensitivity and specificity at 0.5, their minima and the slides below 0.7.

    ``min_sensitivity`` / ``min_specificity`` and ``slides_below_0.7`` count
    slides with at least :data:`MIN_SLIDE_TILES` tiles of the class
    (``min_tiles``); every slide with any tumour tile is also counted in
    ``n_slides_tumour``, ``min_sensitivity_any`` (its share of tumour tiles
    called tumour, however few) and ``slides_tumour_missed`` (slides whose
    tumour tiles were all called normal). Each row has ``tumour_called``.
    """
    rows, sens, spec, anyt = {}, {}, {}, {}
    for k in np.unique(slide):
        sel = slide == k
        y, p = labels[sel], pred[sel]
        name = names[k] if names is not None else str(int(k))
        row = {"n_tumour": int((y == 1).sum()), "n_normal": int((y == 0).sum())}
        if row["n_tumour"]:
            row["tumour_called"] = int(p[y == 1].sum())
            anyt[name] = row["tumour_called"] / row["n_tumour"]
        if row["n_tumour"] >= MIN_SLIDE_TILES:
            row["sensitivity"] = sens[name] = float(p[y == 1].mean())
        if row["n_normal"] >= MIN_SLIDE_TILES:
            row["specificity"] = spec[name] = float(1 - p[y == 0].mean())
        rows[name] = row
    below = sorted({n for d in (sens, spec) for n, v in d.items() if v < 0.7})
    return {
        "min_sensitivity": min(sens.values()) if sens else None,
        "min_specificity": min(spec.values()) if spec else None,
        "n_slides_sensitivity": len(sens), "n_slides_specificity": len(spec),
        "slides_below_0.7": below, "min_tiles": MIN_SLIDE_TILES,
        "n_slides_tumour": len(anyt),
        "min_sensitivity_any": min(anyt.values()) if anyt else None,
        "slides_tumour_missed": sorted(n for n, v in anyt.items() if v == 0),
        "slides": rows,
    }  # fmt: skip


def calibrate_on(model: nn.Module, spec: Mapping[str, Any], tiles: TileSet) -> dict[str, Any]:
    """Fit the head's per-output temperature and bias on ``tiles`` and set it in ``model``.

    Returns
    -------
    dict
        What the card records: method, scale, shift, slides, tile counts, NLL and
        ECE before and after, the reliability table after, and the tile metrics
        at 0.5 after calibration on the same tiles.
    """
    from histoscope.training import metrics as M

    if min(tiles.counts().values()) == 0:
        raise RecipeError(f"calibration tiles have no tiles of some class ({tiles.counts()}); "
                          "calibrate on slides with tumour and normal tissue")  # fmt: skip
    z = predict_logits(model, tiles.images, spec, raw=True).astype(np.float64)
    y = tiles.labels
    scale, shift = M.fit_logit_affine(z, y)
    model.set_calibration(scale, shift)
    zc = z * scale + shift
    p0, p1 = M.softmax(z), M.softmax(zc)
    return {
        "method": "temperature and per-output bias on the logits (Platt scaling of the margin), "
                  "NLL fit",
        "scale": [float(v) for v in scale],
        "shift": [float(v) for v in shift],
        "slides": list(tiles.names),
        "n": tiles.counts(),
        "nll_before": M.nll(z, y), "nll_after": M.nll(zc, y),
        "ece_before": M.ece(p0, y), "ece_after": M.ece(p1, y),
        "reliability_after": M.reliability_table(p1, y),
        "at_0.5_before": _brief(metrics_for(y, p0[:, 1], tiles.slide, tiles.names)),
        "at_0.5_after": _brief(metrics_for(y, p1[:, 1], tiles.slide, tiles.names)),
    }  # fmt: skip


def _brief(m: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics without the per-slide rows (kept small for a card)."""
    out = dict(m)
    if "per_slide" in out:
        out["per_slide"] = {k: v for k, v in out["per_slide"].items() if k != "slides"}
    return out


def _calibration_tiles(cal: Mapping[str, Any], data: Mapping[str, Any], root: Path) -> TileSet:
    """The labelled tiles the calibration is fitted on (the val split when no folder is named)."""
    if cal["path"] is None:
        return _load(root, "val", {**data, "max_per_slide": cal["max_per_slide"]})
    path = _ensure_data({**data, "path": cal["path"], "generate": cal["generate"]})
    return _load(path, cal["split"], {**data, "max_per_slide": cal["max_per_slide"]})


def shifted(tiles: TileSet, ev: Mapping[str, Any]) -> TileSet:
    """The same tiles restained per slide outside the generator's stain range."""

    imgs = tiles.images.copy()
    for k, stains in enumerate(tiles.stains):
        sel = tiles.slide == k
        if sel.any():
            rng = np.random.default_rng([int(ev["seed"]), k, 0x57A1])
            imgs[sel] = stain_shift(tiles.images[sel], stains, rng, float(ev["shift_degrees"]),
                                    tuple(ev["shift_amount"]))  # fmt: skip
    return replace(tiles, images=imgs)


# -------------------------------------------------------------------- train
def train(
    recipe: Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    resume: bool = True,
    progress: Callable[[int, int], Any] | None = None,
) -> dict[str, Any]:
    """Train a tumour/normal tile classifier as ``recipe`` says.

    Parameters
    ----------
    recipe
        Validated recipe (see the module docstring).
    out_dir
        Receives ``train_log.jsonl``, ``last_state.pt``, the checkpoint and
        the test evaluation (``metrics.json``, ``tiles.csv``, ``roc.png``).
    resume
        Continue from ``out_dir/last_state.pt`` when the same recipe left one.
    progress
        ``progress(step, total_steps)``.

    Returns
    -------
    dict
        ``{"checkpoint": path, "metrics": {...}}``.
    """
    from histoscope.checkpoints import ModelCard, save_checkpoint
    from histoscope.engine import pick_device

    cfg = settings(recipe)
    cal = cfg["eval"]["calibrate"]
    if cal is not None and cal["from_checkpoint"]:
        return recalibrate(recipe, out_dir)
    ts = TrainSettings.from_recipe(recipe["train"])
    data, aug = cfg["data"], cfg["augment"]
    out = Path(out_dir)
    root = _ensure_data(data)
    train_set = _load(root, "train", data, ts.seed)
    val_set = _load(root, "val", data)
    counts = train_set.counts()
    if min(counts.values()) == 0:
        raise RecipeError(f"data folder {root}: the train split has no tiles of some class "
                          f"({counts}); generate more slides")  # fmt: skip
    device = pick_device(None if ts.device == "auto" else ts.device)
    model, spec = _build_model(cfg, ts.seed)
    if data["stain_norm"]:
        train_set, val_set = macenko(train_set), macenko(val_set)
    model.to(device)
    batches, steps = _balanced_batches(train_set, ts, aug, spec)

    def loss_fn(m: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(m(x.to(device)), y.to(device))

    def validate(m: nn.Module) -> dict[str, float]:
        r = metrics_for(val_set.labels, predict(m, val_set.images, spec, device=device))
        return {"val_auc": r["auc"] if r["auc"] is not None else float("nan"),
                "val_accuracy": r["accuracy"]}  # fmt: skip

    if ts.monitor is None:
        ts = replace(ts, monitor="val_auc")
    fitted = fit(model, batches, loss_fn, ts, out, steps_per_epoch=steps, validate=validate,
                 resume=resume, progress=progress, fingerprint=fingerprint(recipe))  # fmt: skip
    model.cpu().eval()
    calibration = None
    if cal is not None:
        cal_set = _calibration_tiles(cal, data, root)
        if data["stain_norm"]:
            cal_set = macenko(cal_set)
        calibration = calibrate_on(model, spec, cal_set)
    # every test tile, as `histoscope evaluate` reads them (the cap only balances training)
    test_set = _load(root, "test", {**data, "max_per_slide": None})
    test = evaluate_tiles(model, spec, test_set, cfg["eval"], out)
    val = metrics_for(val_set.labels, predict(model, val_set.images, spec))
    card_metrics = {"best_epoch": fitted.best_epoch, "val": val, **test}
    if calibration is not None:
        card_metrics["calibration"] = calibration
    card = ModelCard(
        family=FAMILY,
        config=model.config,
        classes=CLASSES,
        input_spec=spec,
        recipe=dict(recipe),
        data={
            "path": str(root),
            "split_tiles": {"train": counts, "val": val_set.counts()},
            "train_slides": list(train_set.names),
            "val_slides": list(val_set.names),
            **{k: data[k] for k in LABEL_KEYS},
        },  # fmt: skip
        metrics=card_metrics,
    )
    name = recipe.get("name") or FAMILY
    ckpt = save_checkpoint(out / f"{name}.safetensors", model, card)
    if recipe.get("export"):
        with atomic_path(recipe["export"]) as tmp:
            shutil.copyfile(ckpt, tmp)
    return {"checkpoint": str(ckpt), "metrics": card_metrics, "history": fitted.history}


def recalibrate(recipe: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, Any]:
    """Calibrate an existing checkpoint (``eval.calibrate.from_checkpoint``) without training.

    The checkpoint's weights are kept; its head gains the fitted calibration.
    Its card is kept whole (other tools' keys included) with: ``config``
    (``calibrated: true``), ``metrics.calibration``, the test-split metrics
    re-measured with the calibration (``metrics.test``, ``metrics.test_stain_shifted``,
    ``metrics.val``; the figures before it move to ``metrics.uncalibrated``, or,
    when the card has that entry already, which is kept, to
    ``metrics.superseded.before_recalibration``) and ``recipe.eval.calibrate``.
    Every recorded final test (an entry with ``seeds``, e.g. ``metrics.final_test``)
    measured the weights before, so it moves to ``metrics.superseded.<key>``.
    ``data.backbone_sha256`` is the hash of the backbone's tensors, which
    calibration leaves as they are, and a training-data reference (``data.ood``)
    keyed to the old checkpoint's hash is keyed to it, so the outside-training-data
    flag stays on. Written to ``out_dir/<name>.safetensors`` and to ``export`` when set.

    Raises
    ------
    histoscope.CheckpointError
        If the checkpoint is unreadable or not a tumour/normal tile classifier.
    """
    from histoscope.checkpoints import ModelCard, load_checkpoint, save_checkpoint

    cfg = settings(recipe)
    cal, data = cfg["eval"]["calibrate"], cfg["data"]
    src = Path(cal["from_checkpoint"])
    if not src.exists():
        from histoscope._data import sample_data_path

        src = sample_data_path(str(src))
    model, card = load_checkpoint(src, family=FAMILY)
    if tuple(card.classes) != CLASSES:
        raise RecipeError(f"{src}: classes {card.classes} are not {CLASSES}")
    spec = dict(card.input_spec)
    data = {**data, **{k: card.data[k] for k in LABEL_KEYS if k in card.data}}
    data["mpp"], data["tile_size"] = spec["mpp"], spec["tile_size"]
    data["stain_norm"] = spec.get("stain_norm")
    out = Path(out_dir)
    root = _ensure_data(data)
    cal_set = _calibration_tiles(cal, data, root)
    if data["stain_norm"]:
        cal_set = macenko(cal_set)
    calibration = calibrate_on(model, spec, cal_set)
    model.eval()
    test = evaluate_tiles(model, spec, _load(root, "test", {**data, "max_per_slide": None}),
                          cfg["eval"], out)  # fmt: skip
    val_set = _load(root, "val", data)
    metrics = _recalibrated_metrics(card.metrics, test, calibration)
    metrics["val"] = metrics_for(val_set.labels, predict(model, val_set.images, spec))
    new_recipe = dict(card.recipe)
    new_recipe["eval"] = {**(new_recipe.get("eval") or {}), "calibrate": dict(cal)}
    new_card = ModelCard.from_dict({**card.to_dict(), "config": dict(model.config),
                                    "recipe": new_recipe, "metrics": metrics,
                                    "data": _rekeyed_data(card, model)})  # fmt: skip
    name = recipe.get("name") or FAMILY
    ckpt = save_checkpoint(out / f"{name}.safetensors", model, new_card)
    if recipe.get("export"):
        with atomic_path(recipe["export"]) as tmp:
            shutil.copyfile(ckpt, tmp)
    return {"checkpoint": str(ckpt), "metrics": metrics, "history": []}


def _recalibrated_metrics(
    old: Mapping[str, Any], test: Mapping[str, Any], calibration: Mapping[str, Any]
) -> dict[str, Any]:
    """A recalibrated card's metrics (without ``val``, which the caller re-measures).

    The uncalibrated figures go to ``uncalibrated`` unless that entry exists (it is
    kept; they go to ``superseded.before_recalibration``); every recorded final
    test (an entry with ``seeds``) moves to ``superseded.<key>``.
    """
    old = dict(old)
    moved = {k: old.pop(k) for k in ("val", "test", "test_stain_shifted") if k in old}
    superseded = dict(old.pop("superseded", None) or {})
    for key in [k for k, v in old.items() if isinstance(v, Mapping) and "seeds" in v]:
        superseded[key] = {**old.pop(key), "superseded_by": "recalibration"}
    if "uncalibrated" in old:
        if moved:
            superseded["before_recalibration"] = moved
    else:
        old["uncalibrated"] = moved
    out = {**old, **test, "calibration": dict(calibration)}
    if superseded:
        out["superseded"] = superseded
    return out


def _rekeyed_data(card, model: nn.Module) -> dict[str, Any]:
    """``card.data`` with ``backbone_sha256`` and a training-data reference keyed to it.

    Calibration changes the head's buffers only, so the backbone's features (which
    the reference describes) are the same; a reference keyed to the old
    checkpoint's hash would otherwise read as made with other weights.
    """
    from histoscope.checkpoints import tensor_hash

    data = dict(card.data or {})
    backbone = tensor_hash({k: v.detach().cpu().contiguous() for k, v in
                            model.backbone.state_dict().items()})  # fmt: skip
    ref = data.get("ood")
    if isinstance(ref, Mapping) and ref.get("encoder_sha256") in (card.sha256,
                                                                  data.get("backbone_sha256")):  # fmt: skip
        data["ood"] = {**ref, "encoder_sha256": backbone}
    data["backbone_sha256"] = backbone
    return data


def _build_model(cfg: Mapping[str, Any], seed: int) -> tuple[nn.Module, dict[str, Any]]:
    """The seeded, untrained classifier and its input spec (with the stain normalisation)."""
    from histoscope.models import TileClassifier

    data = cfg["data"]
    bkw = {**cfg["model"]["backbone_kwargs"], "tile_size": int(data["tile_size"]),
           "mpp": float(data["mpp"])}  # fmt: skip
    torch.manual_seed(seed)
    model = TileClassifier(cfg["model"]["backbone"], len(CLASSES), cfg["model"]["dropout"], bkw)
    spec = model.input_spec.to_dict()
    if data["stain_norm"]:
        spec["stain_norm"] = data["stain_norm"]
    return model, spec


def _balanced_batches(train_set: TileSet, ts: TrainSettings, aug: Mapping[str, Any], spec):
    """``batches(epoch, generator)`` drawing each class equally often, and steps per epoch."""
    images = torch.from_numpy(train_set.images)  # (N, T, T, 3) uint8, shared memory
    labels = torch.from_numpy(train_set.labels)
    by_class = [torch.nonzero(labels == c).flatten() for c in range(len(CLASSES))]
    n_epoch = ts.samples_per_epoch or len(labels)

    def batches(epoch: int, gen: torch.Generator):
        cls = torch.randint(0, len(CLASSES), (n_epoch,), generator=gen)
        idx = torch.empty(n_epoch, dtype=torch.long)
        for c, pool in enumerate(by_class):
            sel = cls == c
            idx[sel] = pool[torch.randint(0, len(pool), (int(sel.sum()),), generator=gen)]
        for i in range(0, n_epoch, ts.batch):
            j = idx[i : i + ts.batch]
            x = images[j].permute(0, 3, 1, 2).float()
            if aug["flips"]:
                x = _dihedral(x, gen)
            x = hed_jitter(x, gen, float(aug["hed_sigma"]), float(aug["hed_bias"]))
            yield _normalise(x, spec), labels[j]

    return batches, -(-n_epoch // ts.batch)


# ----------------------------------------------------------------- evaluate
def macenko(tiles: TileSet) -> TileSet:
    """Tiles stain-normalised per slide (Macenko, fitted on that slide's tiles, to its reference)."""
    from histoscope.stains import MacenkoNormalizer

    imgs = tiles.images.copy()
    for k in range(len(tiles.names)):
        sel = tiles.slide == k
        if sel.any():
            try:
                norm = MacenkoNormalizer.fit(tiles.images[sel])
            except ValueError as exc:
                raise RecipeError(f"slide {tiles.names[k]}: Macenko fit failed ({exc})") from None
            imgs[sel] = norm.transform(tiles.images[sel])
    return replace(tiles, images=imgs)


def evaluate_tiles(
    model: nn.Module,
    spec: Mapping[str, Any],
    tiles: TileSet,
    ev: Mapping[str, Any],
    out: Path,
    *,
    stain_norm: bool = False,
) -> dict[str, Any]:
    """Metrics on ``tiles`` and their stain-shifted copy; writes ``tiles.csv``, ``roc.png``.

    With ``stain_norm``, both sets are also scored after Macenko normalisation
    (``*_macenko``), as the tumour heatmap's ``stain_norm`` option does at inference.
    A model whose ``spec`` says ``stain_norm: macenko`` was trained on normalised
    tiles, so every set is normalised before it is scored (after the shift).
    """
    from histoscope.training._tile_report import write_report

    sets = {"test": tiles, "test_stain_shifted": shifted(tiles, ev)}
    if spec.get("stain_norm") == "macenko":
        sets = {k: macenko(t) for k, t in sets.items()}
    elif stain_norm:
        sets.update({f"{k}_macenko": macenko(t) for k, t in list(sets.items())})
    probs = {k: predict(model, t.images, spec) for k, t in sets.items()}
    result = {k: _brief(metrics_for(tiles.labels, p, tiles.slide, tiles.names))
              for k, p in probs.items()}  # fmt: skip
    write_report(out, tiles, probs, result)
    return result


def rescore(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The metrics of a finished evaluation, recomputed from its ``tiles.csv``.

    Every ``p_tumour_<set>`` column gives ``<set>`` (:func:`metrics_for` with
    the slides, per-slide rows left out), so figures added since (e.g. the
    bootstrap over slides) are computed for an evaluation without running the
    model again. Probabilities were saved to 5 decimals: a tile within 5e-6 of
    0.5 could be called differently than in the run (compare the confusion).

    Raises
    ------
    RecipeError
        If ``tiles.csv`` is missing or not one written by :func:`evaluate`.
    """
    import csv

    path = Path(out_dir) / "tiles.csv"
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read the evaluation's tiles ({exc})") from None
    sets = [c[len("p_tumour_") :] for c in (rows[0] if rows else {}) if c.startswith("p_tumour_")]
    if not rows or not sets or not {"slide", "label"} <= set(rows[0]):
        raise RecipeError(f"{path}: not a tiles.csv of `histoscope evaluate` (no tile rows with "
                          "slide, label and p_tumour_<set> columns)")  # fmt: skip
    try:
        labels = np.array([CLASSES.index(r["label"]) for r in rows], np.int64)
        probs = {k: np.array([float(r[f"p_tumour_{k}"]) for r in rows]) for k in sets}
    except ValueError as exc:
        raise RecipeError(f"{path}: malformed tile row ({exc})") from None
    names = tuple(dict.fromkeys(r["slide"] for r in rows))
    index = {n: i for i, n in enumerate(names)}
    slide = np.array([index[r["slide"]] for r in rows], np.int64)
    out: dict[str, Any] = {"n_slides": len(names)}
    out.update({k: _brief(metrics_for(labels, p, slide, names)) for k, p in probs.items()})
    return out


def evaluate(
    checkpoint_path: str | os.PathLike,
    data_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    split: str = "test",
    stain_norm: bool = False,
    record: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Patch metrics of a checkpoint on a labelled synth folder or patch folder.

    Parameters
    ----------
    checkpoint_path
        A ``tile_classifier`` checkpoint (another family is refused).
    data_path
        Dataset folder, or several synth folders joined by ``os.pathsep``
        (``a:b``), whose slides are pooled.
    out_dir
        Receives ``tiles.csv`` (per-tile truth and probabilities) and ``roc.png``.
    split
        Which slides: ``"test"`` (default), ``"val"``, ``"train"`` or ``"all"``.
    stain_norm
        Also score every set after per-slide Macenko normalisation.
    record
        Also write the figures into the checkpoint's card under
        ``metrics.<record>`` (e.g. ``final_test``), with the slides' seeds; the
        tensors stay as they are (:func:`histoscope.training._claims.record`).
        The key, the data's synth manifest and an existing entry are checked
        before anything is evaluated; ``metrics.json`` is written before the card.
    overwrite
        With ``record``: replace an existing ``metrics.<record>`` (else refused).

    Returns
    -------
    dict
        ``{"split", "test": {...}, "test_stain_shifted": {...}}`` (and the
        ``*_macenko`` sets) with ``auc``, ``accuracy``, ``balanced_accuracy``,
        ``sensitivity``, ``specificity``, ``confusion``, ``n``.

    Raises
    ------
    histoscope.CheckpointError
        If the checkpoint is unreadable or of another family.
    RecipeError
        If the data folder, its manifest or the split is missing.
    """
    from histoscope.checkpoints import load_checkpoint
    from histoscope.training import _claims

    if record:
        _claims.check_record(checkpoint_path, record, data=data_path, split=split,
                             overwrite=overwrite)  # fmt: skip
    model, card = load_checkpoint(checkpoint_path, family=FAMILY)
    if tuple(card.classes) != CLASSES:
        raise RecipeError(f"{checkpoint_path}: classes {card.classes} are not {CLASSES}")
    data = {**DEFAULTS["data"], **{k: card.data[k] for k in LABEL_KEYS if k in card.data}}
    data["mpp"], data["tile_size"] = card.input_spec["mpp"], card.input_spec["tile_size"]
    ev = {**DEFAULTS["eval"], **(card.recipe.get("eval") or {})}
    folders = [Path(p) for p in str(data_path).split(os.pathsep)]
    tiles = _concat([_load(f, split, data) for f in folders])
    res = evaluate_tiles(model, card.input_spec, tiles, ev, Path(out_dir), stain_norm=stain_norm)
    result = {"split": split, "n_slides": len(tiles.names), **res}
    if record:
        _claims.write_metrics_first(out_dir, checkpoint_path, data_path, result)
        _claims.record(checkpoint_path, record, result, data=data_path, split=split,
                       overwrite=overwrite)  # fmt: skip
    return result


def _concat(sets: list[TileSet]) -> TileSet:
    """Several tile sets as one (slide indices renumbered)."""
    if len(sets) == 1:
        return sets[0]
    offsets = np.cumsum([0] + [len(t.names) for t in sets[:-1]])
    return TileSet(
        images=np.concatenate([t.images for t in sets]),
        labels=np.concatenate([t.labels for t in sets]),
        slide=np.concatenate([t.slide + o for t, o in zip(sets, offsets, strict=True)]),
        coords=np.concatenate([t.coords for t in sets]),
        tumour_fraction=np.concatenate([t.tumour_fraction for t in sets]),
        names=tuple(n for t in sets for n in t.names),
        stains=tuple(st for t in sets for st in t.stains),
    )


def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def markdown_table(metrics: Mapping[str, Any]) -> str:
    """The table RESULTS.md shows for an evaluation (what ``histoscope evaluate`` prints)."""
    head = ("| set | slides | tiles (normal / tumour) | AUC | sensitivity at 0.5 [95 % CI] | "
            "specificity at 0.5 [95 % CI] | sens. / spec. 95 % CI, bootstrap over slides | ECE "
            "| min slide sens. / spec. (>= 5 tiles) | slides < 0.7 | slides with tumour: "
            "lowest sens. / all tumour missed |")  # fmt: skip
    rows = [head, "|" + " --- |" * 11]
    for name, m in metrics.items():
        if not isinstance(m, Mapping) or "confusion" not in m:
            continue
        ps = m.get("per_slide") or {}
        ci = {k: m.get(f"{k}_ci95") or [None, None] for k in ("sensitivity", "specificity")}
        bs = {k: m.get(f"{k}_ci95_slides") or [None, None] for k in ("sensitivity", "specificity")}
        missed = ps.get("slides_tumour_missed")
        rows.append(
            f"| {name} | {metrics.get('n_slides', '-')} | {m['n']['normal']} / {m['n']['tumour']} "
            f"| {_fmt(m.get('auc'), 4)} "
            f"| {_fmt(m['sensitivity'])} [{_fmt(ci['sensitivity'][0])}, {_fmt(ci['sensitivity'][1])}] "
            f"| {_fmt(m['specificity'])} [{_fmt(ci['specificity'][0])}, {_fmt(ci['specificity'][1])}] "
            f"| [{_fmt(bs['sensitivity'][0])}, {_fmt(bs['sensitivity'][1])}] / "
            f"[{_fmt(bs['specificity'][0])}, {_fmt(bs['specificity'][1])}] "
            f"| {_fmt(m.get('ece'))} | {_fmt(ps.get('min_sensitivity'), 2)} / "
            f"{_fmt(ps.get('min_specificity'), 2)} | {len(ps.get('slides_below_0.7', []))} "
            f"| {ps.get('n_slides_tumour', '-')} slides: {_fmt(ps.get('min_sensitivity_any'), 2)} / "
            f"{'-' if missed is None else len(missed)} |"
        )  # fmt: skip
    return "\n".join(rows)
