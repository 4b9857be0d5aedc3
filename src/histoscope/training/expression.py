"""Family ``expression``: counts per 2 µm bin from H&E, trained on Space Ranger binned outputs.

Recipe sections (defaults in :data:`DEFAULTS`):

``data``
    ``path``: a ``histoscope synth --extras`` folder (slides with their
    ``<stem>_visium/square_002um`` outputs; a real Visium HD cohort laid out
    with the same manifest trains unchanged), ``generate`` (``{count, size,
    seed, mpp}``: made when the folder is missing), ``max_patches`` (random
    patches per training/validation slide), ``min_fill`` (a training patch
    needs this fraction of its bins in the matrix).
``model``
    :class:`histoscope.models.expression.ExpressionModel` arguments:
    ``scales_um``, ``patch_bins``, ``margin_um``, ``view_px``, ``dim``,
    ``heads``, ``widths``, ``loss`` (``zinb``, ``mse``, ``focal_mse``,
    ``poisson``).
``augment``
    ``flips`` (the 8 flips/rotations of every view and the targets alike),
    ``hed_sigma`` / ``hed_bias`` (one stain jitter per patch, all views).
``eval``
    ``seed`` (the shuffled-label control's permutation), ``ssim``.

Splits come from the manifest: train, val (the epoch with the best mean PCC
at 8 µm on val is kept) and test (held-out slides, every patch holding a
bin; its metrics go into the card).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from histoscope.atomic import atomic_path
from histoscope.training._loop import TrainSettings, fit
from histoscope.training._recipe import RecipeError, check_keys, fingerprint

FAMILY = "expression"
DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {"path": None, "generate": None, "max_patches": 300, "min_fill": 0.5},
    "model": {"scales_um": [2, 8, 32, 128], "patch_bins": 16, "margin_um": 8.0, "view_px": 32,
              "dim": 64, "heads": 8, "widths": [16, 32], "loss": "zinb"},
    "augment": {"flips": True, "hed_sigma": 0.0, "hed_bias": 0.0},
    "eval": {"seed": 0, "ssim": True},
}  # fmt: skip
GENERATE_KEYS = ("count", "size", "seed", "mpp")
#: ImageNet statistics (0-1 RGB); the card's input_spec records them.
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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
        raise RecipeError("recipe key data.path is required (a `histoscope synth --extras` folder)")
    if out["data"]["generate"] is not None:
        check_keys(out["data"]["generate"], GENERATE_KEYS, "data.generate")
    return out


def _ensure_data(data: Mapping[str, Any]) -> Path:
    path = Path(data["path"])
    if (path / "manifest.json").is_file() or data["generate"] is None:
        return path
    from histoscope.synthetic._dataset import write_dataset

    g = data["generate"]
    write_dataset(path, kind="he", size=tuple(g.get("size", (2048, 2048))),
                  seed=int(g.get("seed", 0)), count=int(g.get("count", 12)),
                  mpp=float(g.get("mpp", 1.0)), extras=True)  # fmt: skip
    return path


def _genes(root: Path) -> list[str]:
    from histoscope.expression.dataset import slide_pairs
    from histoscope.expression.spaceranger import read_binned

    _, _, vis = slide_pairs(root, "all")[0]
    return list(read_binned(vis).genes)


def load_split(root: Path, split: str, config: Mapping[str, Any], *, max_patches=None,
               min_fill: float = 0.5, seed: int = 0):  # fmt: skip
    """Every slide of ``split`` as one :class:`~histoscope.expression.dataset.PatchSet`."""
    from histoscope.expression.dataset import concat, load_slide_patches, slide_pairs

    sets = [load_slide_patches(slide, vis, config, max_patches=max_patches, seed=seed + k,
                               min_fill=min_fill, name=name)
            for k, (name, slide, vis) in enumerate(slide_pairs(root, split))]  # fmt: skip
    return concat(sets)


# ------------------------------------------------------------------ tensors
def normalise(x: torch.Tensor) -> torch.Tensor:
    """``(B, S, S, 3)`` uint8 -> normalised ``(B, 3, S, S)`` float."""
    x = x.permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _dihedral(ts: list[torch.Tensor], ops: torch.Tensor) -> list[torch.Tensor]:
    """Each item of every ``(B, C, H, W)`` tensor turned by the same one of 8 flips/rotations."""
    out = [t.clone() for t in ts]
    for op in range(1, 8):
        sel = ops == op
        if sel.any():
            for t, o in zip(ts, out, strict=True):
                y = torch.rot90(t[sel], op % 4, dims=(2, 3))
                o[sel] = torch.flip(y, dims=(3,)) if op >= 4 else y
    return out


def _inputs(views: list[torch.Tensor]) -> torch.Tensor | tuple[torch.Tensor, ...]:
    return views[0] if len(views) == 1 else tuple(views)


@torch.no_grad()
def predict(model: nn.Module, patches, batch: int = 64, device: str = "cpu") -> np.ndarray:
    """Expected counts ``(N, G, P, P)`` float32 of every patch of a PatchSet."""
    model.eval()
    out = []
    for i in range(0, len(patches), batch):
        xs = [normalise(torch.from_numpy(v[i : i + batch])).to(device) for v in patches.views]
        out.append(model.expected(model(_inputs(xs))).float().cpu().numpy())
    if not out:
        return np.zeros((0, len(patches.genes), *patches.mask.shape[1:]), np.float32)
    return np.concatenate(out)


def _batches(train_set, ts: TrainSettings, aug: Mapping[str, Any]):
    """``batches(epoch, generator)`` over a random permutation of the training patches."""
    from histoscope.training._stain_aug import hed_jitter

    views = [torch.from_numpy(v) for v in train_set.views]
    counts = torch.from_numpy(train_set.counts)
    mask = torch.from_numpy(train_set.mask)
    n_epoch = ts.samples_per_epoch or len(counts)

    def batches(epoch: int, gen: torch.Generator):
        idx = torch.randint(0, len(counts), (n_epoch,), generator=gen)
        for i in range(0, n_epoch, ts.batch):
            j = idx[i : i + ts.batch]
            xs = [v[j].permute(0, 3, 1, 2).float() for v in views]
            y, m = counts[j].float(), mask[j][:, None].float()
            if aug["hed_sigma"] or aug["hed_bias"]:
                seed = int(torch.randint(0, 2**62, (1,), generator=gen))
                xs = [hed_jitter(x, torch.Generator().manual_seed(seed), float(aug["hed_sigma"]),
                                 float(aug["hed_bias"])) for x in xs]  # fmt: skip
            if aug["flips"]:
                ops = torch.randint(0, 8, (len(j),), generator=gen)
                *xs, y, m = _dihedral([*xs, y, m], ops)
            xs = [normalise(x.permute(0, 2, 3, 1)) for x in xs]
            yield _inputs(xs), y, m

    return batches, -(-n_epoch // ts.batch)


# -------------------------------------------------------------------- train
def build_model(cfg: Mapping[str, Any], genes: list[str], seed: int) -> nn.Module:
    """The seeded, untrained model of a recipe's ``model`` section."""
    from histoscope.models.expression import ExpressionModel

    torch.manual_seed(seed)
    return ExpressionModel(genes, **cfg)


def input_spec(model: nn.Module) -> dict[str, Any]:
    """What the model reads, for the card: views, bin size, normalisation."""
    c = model.config
    return {"views": model.views(), "bin_um": c["bin_um"], "patch_bins": c["patch_bins"],
            "patch_um": c["patch_bins"] * c["bin_um"], "mpp": c["image_mpp"],
            "tile_size": model.views()[0]["size_px"], "mean": list(MEAN), "std": list(STD)}  # fmt: skip


def train(
    recipe: Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    resume: bool = True,
    progress: Callable[[int, int], Any] | None = None,
) -> dict[str, Any]:
    """Train an expression model as ``recipe`` says; test metrics go into the card.

    Returns
    -------
    dict
        ``{"checkpoint": path, "metrics": {...}, "history": [...]}``.
    """
    from dataclasses import replace

    from histoscope.checkpoints import ModelCard, save_checkpoint
    from histoscope.expression.metrics import evaluate_patches

    cfg = settings(recipe)
    ts = TrainSettings.from_recipe(recipe["train"])
    data, aug, ev = cfg["data"], cfg["augment"], cfg["eval"]
    out = Path(out_dir)
    root = _ensure_data(data)
    genes = _genes(root)
    model = build_model(cfg["model"], genes, ts.seed)
    mcfg = model.config
    kw = {"max_patches": data["max_patches"], "min_fill": float(data["min_fill"])}
    train_set = load_split(root, "train", mcfg, seed=ts.seed, **kw)
    val_set = load_split(root, "val", mcfg, seed=ts.seed + 1000, **kw)
    if len(train_set) == 0:
        raise RecipeError(f"data folder {root}: no training patches")
    kind = mcfg["loss"]
    batches, steps = _batches(train_set, ts, aug)

    def loss_fn(m: nn.Module, batch) -> torch.Tensor:
        from histoscope.expression.losses import loss

        x, y, mask = batch
        return loss(m(x), y, kind, mask)

    def validate(m: nn.Module) -> dict[str, float]:
        r = evaluate_patches(predict(m, val_set), val_set.counts, val_set.mask, val_set.slide,
                             genes, ssim=False)["model"]  # fmt: skip
        return {"val_pcc_8um": r["pcc_8um"] or 0.0, "val_pcc_2um": r["pcc_2um"] or 0.0}

    if ts.monitor is None:
        ts = replace(ts, monitor="val_pcc_8um")
    fitted = fit(model, batches, loss_fn, ts, out, steps_per_epoch=steps, validate=validate,
                 resume=resume, progress=progress, fingerprint=fingerprint(recipe))  # fmt: skip
    model.cpu().eval()
    n_train = len(train_set)
    del train_set
    test = evaluate_split(model, root, "test", ev)
    metrics = {"best_epoch": fitted.best_epoch, "test": test}
    card = ModelCard(
        family=FAMILY,
        config=model.config,
        classes=tuple(genes),
        input_spec=input_spec(model),
        recipe=dict(recipe),
        data={
            "path": str(root),
            "synthetic": True,
            "note": "trained on synthetic H&E with simulated Visium HD 2 µm counts; "
            "not validated on real tissue",
            "train_slides": list(load_names(root, "train")),
            "val_slides": list(val_set.names),
            "test_slides": test["slides"],
            "train_patches": n_train,
            "val_patches": len(val_set),
        },  # fmt: skip
        metrics=metrics,
    )
    name = recipe.get("name") or FAMILY
    ckpt = save_checkpoint(out / f"{name}.safetensors", model, card)
    if recipe.get("export"):
        with atomic_path(recipe["export"]) as tmp:
            shutil.copyfile(ckpt, tmp)
    return {"checkpoint": str(ckpt), "metrics": metrics, "history": fitted.history}


def load_names(root: Path, split: str) -> list[str]:
    """Slide names of a split."""
    from histoscope.expression.dataset import slide_pairs

    return [n for n, _, _ in slide_pairs(root, split)]


# ----------------------------------------------------------------- evaluate
def evaluate_split(model: nn.Module, root: Path, split: str, ev: Mapping[str, Any]) -> dict:
    """Metrics of ``model`` on every patch holding a bin of the split's slides.

    Slides are predicted one at a time; the metrics pool all their patches.
    """
    from dataclasses import replace

    from histoscope.expression.dataset import concat
    from histoscope.expression.metrics import evaluate_patches

    cfg = model.config
    sets, preds = [], []
    for name in load_names(root, split):
        s = load_split_one(root, split, name, cfg)
        preds.append(predict(model, s).astype(np.float16))
        sets.append(replace(s, views=()))  # the images are no longer needed
    full = concat(sets)
    pred = np.concatenate(preds).astype(np.float32)
    res = evaluate_patches(pred, full.counts, full.mask, full.slide, cfg["genes"],
                           seed=int(ev.get("seed", 0)), ssim=bool(ev.get("ssim", True)))  # fmt: skip
    res["slides"] = list(full.names)
    res["neighbourhood"] = neighbourhood_summary(res, cfg["genes"])
    return res


def load_split_one(root: Path, split: str, name: str, cfg: Mapping[str, Any]):
    """All patches holding any bin of one slide."""
    from histoscope.expression.dataset import load_slide_patches, slide_pairs

    for n, slide, vis in slide_pairs(root, split):
        if n == name:
            return load_slide_patches(slide, vis, cfg, min_fill=1e-9, name=n)
    raise RecipeError(f"{root}: no slide {name!r} in split {split!r}")


def neighbourhood_summary(res: Mapping[str, Any], genes: list[str]) -> dict[str, Any]:
    """Mean PCC (model and control) per neighbourhood programme and marker/other genes."""
    from histoscope.synthetic._expression import NEIGHBOURHOOD

    out: dict[str, Any] = {}
    groups = {k: list(v) for k, v in NEIGHBOURHOOD.items()}
    groups["all_neighbourhood"] = [g for v in NEIGHBOURHOOD.values() for g in v]
    for scale in ("2um", "8um", "16um"):
        for grp, names in groups.items():
            idx = [genes.index(g) for g in names if g in genes]
            vals = [res["model"][f"pcc_{scale}_per_gene"][i] for i in idx]
            vals = [v for v in vals if v is not None]
            out[f"{grp}_pcc_{scale}"] = float(np.mean(vals)) if vals else None
    return out


def _blind(forward):
    """``forward`` with every view after the first replaced by normalised white."""

    def run(x):
        if isinstance(x, torch.Tensor):
            return forward(x)
        xs = list(x)
        white = [normalise(torch.full((t.shape[0], t.shape[2], t.shape[3], 3), 255,
                                      dtype=torch.uint8)) for t in xs[1:]]  # fmt: skip
        return forward([xs[0], *white])

    return run


def evaluate(
    checkpoint_path: str | os.PathLike,
    data_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    split: str = "test",
    ssim: bool = True,
    blind_context: bool = False,
) -> dict[str, Any]:
    """Held-out metrics of an ``expression`` checkpoint on a ``histoscope synth --extras`` folder.

    With ``blind_context`` every context view (8, 32, 128 µm) is replaced by
    white glass: the ablation that shows how much of the score the context gives.

    Returns
    -------
    dict
        ``{"split", "model": {...}, "shuffled": {...}, "neighbourhood": {...}, ...}``
        (see :func:`histoscope.expression.metrics.evaluate_patches`).
    """
    from histoscope.checkpoints import load_checkpoint

    model, card = load_checkpoint(checkpoint_path, family=FAMILY)
    if blind_context:
        model.forward = _blind(model.forward)
    seed = int(((card.recipe or {}).get("eval") or {}).get("seed", 0))
    res = evaluate_split(model, Path(data_path), split, {"seed": seed, "ssim": ssim})
    return {"split": split, "blind_context": blind_context, **res}
