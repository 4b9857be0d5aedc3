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
    the test split (see :mod:`._stain_aug`).
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
    "eval": {"shift_degrees": 12.0, "shift_amount": [1.45, 1.7], "seed": 0},
}  # fmt: skip
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
    return out


def _ensure_data(data: Mapping[str, Any]) -> Path:
    path = Path(data["path"])
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
def predict(
    model: nn.Module, images: np.ndarray, spec: Mapping[str, Any], batch: int = 128,
    device: torch.device | str = "cpu",
) -> np.ndarray:  # fmt: skip
    """Tumour probability of each ``(T, T, 3)`` uint8 tile, in order.

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
    model.eval()
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i : i + batch]).permute(0, 3, 1, 2).float()
        logits = model(_normalise(x, spec).to(device))
        out.append(torch.softmax(logits.float(), 1)[:, 1].cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def metrics_for(labels: np.ndarray, prob: np.ndarray) -> dict[str, Any]:
    """Patch ROC AUC; accuracy, balanced accuracy, sensitivity, specificity at 0.5; confusion; counts."""
    from histoscope.training.metrics import accuracy, balanced_accuracy, confusion_matrix, roc_auc

    pred = (prob >= 0.5).astype(np.int64)
    both = len(np.unique(labels)) == 2
    pos, neg = labels == 1, labels == 0
    return {
        "auc": roc_auc(labels, prob) if both else None,
        "accuracy": accuracy(labels, pred),
        "balanced_accuracy": balanced_accuracy(labels, pred),
        "sensitivity": float(pred[pos].mean()) if pos.any() else None,
        "specificity": float(1 - pred[neg].mean()) if neg.any() else None,
        "confusion": np.asarray(confusion_matrix(labels, pred, n_classes=2)).tolist(),
        "n": {c: int((labels == i).sum()) for i, c in enumerate(CLASSES)},
    }


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
    # every test tile, as `histoscope evaluate` reads them (the cap only balances training)
    test_set = _load(root, "test", {**data, "max_per_slide": None})
    test = evaluate_tiles(model, spec, test_set, cfg["eval"], out)
    val = metrics_for(val_set.labels, predict(model, val_set.images, spec))
    card_metrics = {"best_epoch": fitted.best_epoch, "val": val, **test}
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
    result = {k: metrics_for(tiles.labels, p) for k, p in probs.items()}
    write_report(out, tiles, probs, result)
    return result


def evaluate(
    checkpoint_path: str | os.PathLike,
    data_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    split: str = "test",
    stain_norm: bool = False,
) -> dict[str, Any]:
    """Patch metrics of a checkpoint on a labelled synth folder or patch folder.

    Parameters
    ----------
    checkpoint_path
        A ``tile_classifier`` checkpoint (another family is refused).
    data_path
        Dataset folder.
    out_dir
        Receives ``tiles.csv`` (per-tile truth and probabilities) and ``roc.png``.
    split
        Which slides: ``"test"`` (default), ``"val"``, ``"train"`` or ``"all"``.
    stain_norm
        Also score every set after per-slide Macenko normalisation.

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

    model, card = load_checkpoint(checkpoint_path, family=FAMILY)
    if tuple(card.classes) != CLASSES:
        raise RecipeError(f"{checkpoint_path}: classes {card.classes} are not {CLASSES}")
    data = {**DEFAULTS["data"], **{k: card.data[k] for k in LABEL_KEYS if k in card.data}}
    data["mpp"], data["tile_size"] = card.input_spec["mpp"], card.input_spec["tile_size"]
    ev = {**DEFAULTS["eval"], **(card.recipe.get("eval") or {})}
    tiles = _load(Path(data_path), split, data)
    res = evaluate_tiles(model, card.input_spec, tiles, ev, Path(out_dir), stain_norm=stain_norm)
    return {"split": split, **res}
