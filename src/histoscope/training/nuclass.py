"""Family ``nuclass``: cell types from a local crop and a wider context, fused by a gate.

Three stages, each a resumable :func:`~histoscope.training._loop.fit` run in
``<out>/<stage>/`` (SYSTEMS.md section 2):

``local``
    local trunk -> LayerNorm -> FiLM(organ) -> MLP; class-balanced cross-entropy
    (``(1-b)/(1-b^n)``, ``b = 0.9999``) with label smoothing 0.1; the organ is
    replaced by the "unknown" token with probability ``organ_dropout``.
``global``
    context trunk + the (frozen) local features -> MLP; cross-entropy weighted
    by ``(1 - p_local(y))^2`` (times the class-balanced weight of ``y``).
``gate``
    both paths frozen; BCE against the three-rule target plus the NLL of the
    fused probabilities.

After each stage its temperature is fitted on the validation cells (local,
global, then the fused output). Runs under ``torchrun --nproc_per_node N``
(DDP; gloo on the CPU, NCCL on GPUs): each rank takes its share of every batch
and only rank 0 writes the checkpoint.

Recipe sections (defaults in :data:`DEFAULTS`): ``data`` (``path``: a NuClass
trio folder, or ``synthetic``: seeds and sizes of generated regions), ``model``
(architecture, see :data:`histoscope.models.nuclass.DEFAULT_CONFIG`, plus
``stages``: per-stage ``train`` overrides and ``organ_dropout``), ``train``
(shared settings), ``eval`` (held-out synthetic slides).
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
import torch.nn.functional as F
from torch import nn

from histoscope.atomic import atomic_path
from histoscope.training._loop import TrainSettings, fit
from histoscope.training._recipe import RecipeError, check_keys, fingerprint
from histoscope.training.nuclass_data import (
    RegionSource,
    TrioSource,
    Window,
    cell_metrics,
    collate,
    macro_f1,
    predict_windows,
    regions_cached,
)

FAMILY = "nuclass"
STAGES = ("local", "global", "gate")
STAGE_KEYS = ("epochs", "lr", "batch", "samples_per_epoch", "weight_decay")
SYNTH_KEYS = ("train_seeds", "val_seeds", "per_seed", "size", "slide", "mpp")
DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {"path": None, "val_path": None, "synthetic": None, "classes": None, "cache": None,
             "window": 512, "local_size": 96},
    "model": {"local": {}, "context": {}, "film_dim": 16, "hidden": 128, "proj": 64,
              "gate_proj": 32, "gate_hidden": [64, 32], "dropout": 0.1, "organ_dropout": 0.5,
              "cb_beta": 0.9999, "label_smoothing": 0.1, "gate_k": 10.0, "stages": {}},
    "eval": {"test_seeds": [], "slide_size": 3072, "per_class": 60, "paths": ["fast", "crops"],
             "max_f1_loss": 0.01},
}  # fmt: skip
ARCH_KEYS = ("local", "context", "film_dim", "hidden", "proj", "gate_proj", "gate_hidden",
             "dropout")  # fmt: skip


def settings(recipe: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The family's sections with defaults filled in; unknown keys are refused."""
    out = {}
    for section, defaults in DEFAULTS.items():
        given = recipe.get(section) or {}
        check_keys(given, defaults, section)
        out[section] = {**defaults, **given}
    d = out["data"]
    if not d["path"] and not d["synthetic"]:
        raise RecipeError("recipe key data.path (a NuClass trio folder) or data.synthetic "
                          "(generated regions) is required")  # fmt: skip
    if d["synthetic"]:
        check_keys(d["synthetic"], SYNTH_KEYS, "data.synthetic")
    check_keys(out["model"]["stages"], STAGES, "model.stages")
    for st, sec in out["model"]["stages"].items():
        check_keys(sec, STAGE_KEYS, f"model.stages.{st}")
    return out


def _device(name: str) -> torch.device:
    """The ``train.device`` of this process (``cuda`` means this rank's GPU under torchrun)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def _dist(device: torch.device) -> tuple[int, int]:
    """``(rank, world)``; starts the process group under ``torchrun`` (NCCL on GPUs, else gloo)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world


def class_balanced_weights(counts: np.ndarray, beta: float) -> torch.Tensor:
    """Class-balanced loss weights ``(1 - b) / (1 - b^n)``, scaled to sum to the class count."""
    n = np.maximum(np.asarray(counts, np.float64), 1.0)
    w = (1 - beta) / (1 - np.power(beta, n))
    return torch.tensor(w / w.sum() * len(n), dtype=torch.float32)


# ------------------------------------------------------------------ data
class Data:
    """Training and validation windows of a recipe (trio or synthetic)."""

    def __init__(self, cfg: Mapping[str, Any], classes: list[str], tissues: list[str],
                 model_cfg: Mapping[str, Any], out: Path) -> None:  # fmt: skip
        d = cfg["data"]
        self.trio = bool(d["path"])
        if self.trio:
            self.train = TrioSource(d["path"], classes, tissues, "train" if d["val_path"] is None
                                    else None, int(d["local_size"]))  # fmt: skip
            vp = d["val_path"] or d["path"]
            self.val = TrioSource(vp, classes, tissues, "test" if d["val_path"] is None else None,
                                  int(d["local_size"]))  # fmt: skip
            self.counts = np.bincount(self.train.y, minlength=len(classes))
            self.val_windows = [self.val.window(i) for i in range(len(self.val))]
            return
        s = d["synthetic"]
        cache = Path(d["cache"] or out / "data")
        lc, cc = model_cfg["local"], model_cfg["context"]
        margin = int(np.ceil(max(cc["boxes_um"]) / 2 / cc["mpp"])) + 32
        edge = int(np.ceil(lc["box_um"] / 2 / lc["mpp"])) + 16
        args = (int(s["per_seed"]), int(s["size"]), int(s["slide"]), float(s["mpp"]), cache)
        win = int(d["window"])
        self.train = RegionSource(
            regions_cached(s["train_seeds"], *args), tissues, win, margin, edge
        )
        self.val = RegionSource(regions_cached(s["val_seeds"], *args), tissues, win, margin, edge)
        self.counts = np.bincount(np.concatenate([r.cls for r in self.train.regions]),
                                  minlength=len(classes))  # fmt: skip
        self.val_windows = self.val.grid_windows()

    def item(self, i: int, rng: np.random.Generator) -> Window:
        if self.trio:
            return self.train.window(i, tuple(int(v) for v in rng.integers(-4, 5, size=2)))
        return self.train.window(i, rng)


def augment(w: Window, rng: np.random.Generator) -> Window:
    """One of the 8 rotations / mirrors of a window, images and cell positions alike."""
    k, flip = int(rng.integers(4)), bool(rng.integers(2))
    loc, ctx, lxy, cxy = w.local, w.context, w.local_xy.copy(), w.context_xy.copy()
    if flip:
        loc, ctx = loc[:, ::-1], ctx[:, ::-1]
        lxy[:, 0] = loc.shape[1] - lxy[:, 0]
        cxy[:, 0] = ctx.shape[1] - cxy[:, 0]
    for _ in range(k):  # np.rot90: (x, y) -> (y, W - x)
        lxy = np.stack([lxy[:, 1], loc.shape[1] - lxy[:, 0]], 1)
        cxy = np.stack([cxy[:, 1], ctx.shape[1] - cxy[:, 0]], 1)
        loc, ctx = np.rot90(loc), np.rot90(ctx)
    return Window(np.ascontiguousarray(loc), np.ascontiguousarray(ctx), lxy.astype(np.float32),
                  cxy.astype(np.float32), w.y, w.tissue)  # fmt: skip


# ------------------------------------------------------------------ stages
class StageLoss(nn.Module):
    """The loss of one stage as a module (so DDP can wrap it); frozen parts stay in eval mode."""

    PARTS = {
        "local": ("local_trunk", "local_norm", "tissue_embed", "film", "local_head"),
        "global": ("context_trunk", "proj_local", "proj_context", "global_head"),
        "gate": ("gate_local", "gate_global", "gate_mlp"),
    }

    def __init__(
        self, model: nn.Module, stage: str, cb: torch.Tensor, mcfg: Mapping[str, Any]
    ) -> None:
        super().__init__()
        self.model, self.stage = model, stage
        self.register_buffer("cb", cb)
        self.smoothing = float(mcfg["label_smoothing"])
        self.organ_dropout = float(mcfg["organ_dropout"])
        self.gate_k = float(mcfg["gate_k"])
        trainable = set(self.PARTS[stage])
        for name, mod in model.named_children():
            for p in mod.parameters():
                p.requires_grad = name in trainable

    def train(self, mode: bool = True) -> StageLoss:
        super().train(mode)
        trainable = set(self.PARTS[self.stage])
        for name, mod in self.model.named_children():
            if name not in trainable:
                mod.eval()
        return self

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        m = self.model
        dev = self.cb.device
        batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
        idx, y, tissue = batch["index"], batch["y"], batch["tissue"]
        if self.stage == "local":
            if self.organ_dropout > 0:
                drop = (torch.rand(len(tissue)) < self.organ_dropout).to(dev)
                tissue = torch.where(drop, torch.full_like(tissue, m.unknown_tissue), tissue)
            raw = m.pool_local(m.local_map(m.normalise(batch["local"])), idx, batch["local_xy"])
            z, _ = m.local_logits(raw, tissue)
            return F.cross_entropy(z, y, weight=self.cb, label_smoothing=self.smoothing)
        with torch.no_grad():
            raw_l = m.pool_local(m.local_map(m.normalise(batch["local"])), idx, batch["local_xy"])
            z_l, f_l = m.local_logits(raw_l, tissue)
            p_l = torch.softmax(z_l / m.temperature[0], 1)
        if self.stage == "global":
            raw_c = m.pool_context(m.context_map(m.normalise(batch["context"])), idx,
                                   batch["context_xy"])  # fmt: skip
            z_g, _ = m.global_logits(f_l, raw_c)
            # uncertainty-guided: cells the local path is unsure of count most; the class
            # weights of the local stage keep rare classes from vanishing among lymphocytes
            w = (1 - p_l[torch.arange(len(y)), y]) ** 2 * self.cb[y]
            return (w * F.cross_entropy(z_g, y, reduction="none")).sum() / self.cb[y].sum()
        with torch.no_grad():
            raw_c = m.pool_context(m.context_map(m.normalise(batch["context"])), idx,
                                   batch["context_xy"])  # fmt: skip
            z_g, f_g = m.global_logits(f_l, raw_c)
            p_g = torch.softmax(z_g / m.temperature[1], 1)
            target = _gate_target(p_l, p_g, y, self.gate_k)
        g_logit = m.gate_logit(f_l, f_g, p_l, p_g)
        g = torch.sigmoid(g_logit)
        mix = (1 - g)[:, None] * p_l + g[:, None] * p_g
        nll = F.nll_loss(mix.clamp_min(1e-8).log(), y)
        return F.binary_cross_entropy_with_logits(g_logit, target) + nll


def _gate_target(p_l, p_g, y, k):
    from histoscope.models.nuclass import gate_target

    return gate_target(p_l, p_g, y, k)


_OUT_KEY = {"local": "p_local", "global": "p_global", "gate": "prob"}


def _run_stage(stage, model, data: Data, cfg, ts: TrainSettings, out: Path, recipe, resume,
               progress, rank, world) -> dict[str, Any]:  # fmt: skip
    over = cfg["model"]["stages"].get(stage, {})
    ts = replace(ts, **over, monitor="val_macro_f1", monitor_mode="max")
    cb = class_balanced_weights(data.counts, float(cfg["model"]["cb_beta"]))
    wrapper: nn.Module = StageLoss(model, stage, cb, cfg["model"])
    dev = model.temperature.device
    wrapper.to(dev)
    if world > 1:
        ids = [dev.index] if dev.type == "cuda" else None
        wrapper = nn.parallel.DistributedDataParallel(wrapper, device_ids=ids)
    n = len(data.train)
    spe = ts.samples_per_epoch or n
    per_step = max(ts.batch, world)
    steps = max(1, spe // per_step)

    def batches(epoch: int, gen: torch.Generator):
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        rng = np.random.default_rng(seed)
        order = rng.choice(n, size=steps * per_step, replace=spe > n)
        for s in range(steps):
            mine = order[s * per_step : (s + 1) * per_step][rank::world]
            wins = [augment(data.item(int(i), rng), rng) for i in mine]
            yield collate(wins)

    def loss_fn(m: nn.Module, batch) -> torch.Tensor:
        return m(batch)

    def validate(_m: nn.Module) -> dict[str, float]:
        res = predict_windows(model, data.val_windows)
        p = res[_OUT_KEY[stage]]
        f1, _ = macro_f1(res["y"], p.argmax(1), p.shape[1])
        nll = -np.log(np.clip(p[np.arange(len(p)), res["y"]], 1e-7, 1)).mean()
        return {"val_macro_f1": f1, "val_accuracy": float((p.argmax(1) == res["y"]).mean()),
                "val_nll": float(nll)}  # fmt: skip

    sub = out / stage if rank == 0 else out / stage / f"rank{rank}"
    if stage == "global" and not (resume and (sub / "last_state.pt").exists()):
        transfer_trunk(model.local_trunk, model.context_trunk)
    fp = fingerprint(_stage_recipe(recipe, stage) | {"_model": model.config})
    fitted = fit(wrapper, batches, loss_fn, ts, sub, steps_per_epoch=steps, validate=validate,
                 resume=resume, progress=progress, fingerprint=fp)  # fmt: skip
    return {"best_epoch": fitted.best_epoch, "best_val_macro_f1": fitted.best_value}


def _stage_recipe(recipe: Mapping[str, Any], stage: str) -> dict[str, Any]:
    """What a stage's saved state depends on: the recipe less ``eval`` and later stages."""
    doc = {k: v for k, v in recipe.items() if k not in ("eval", "export", "out", "description")}
    model = dict(doc.get("model") or {})
    stages = dict(model.get("stages") or {})
    model["stages"] = {k: v for k, v in stages.items() if STAGES.index(k) <= STAGES.index(stage)}
    return {**doc, "model": model, "_stage": stage}


def transfer_trunk(src: nn.Module, dst: nn.Module) -> int:
    """Copy conv and batch-norm weights of ``src`` into ``dst`` layer by layer where shapes match.

    The context trunk starts from the trained local trunk (H&E colours and edges), as the
    authors' context encoder starts from pretrained weights. Returns the layers copied.
    """
    kinds = (nn.Conv2d, nn.BatchNorm2d)
    a = [m for m in src.modules() if isinstance(m, kinds)]
    b = [m for m in dst.modules() if isinstance(m, kinds)]
    n = 0
    with torch.no_grad():
        for ma, mb in zip(a, b, strict=False):
            sa, sb = ma.state_dict(), mb.state_dict()
            if type(ma) is type(mb) and all(sa[k].shape == sb[k].shape for k in sb):
                mb.load_state_dict(sa)
                n += 1
    return n


def fit_temperatures(model: nn.Module, windows: list[Window], stage: str) -> float:
    """Fit the stage's temperature on validation cells (NLL), store it in the model, return it."""
    from histoscope.training.metrics import fit_temperature

    slot = STAGES.index(stage)
    model.temperature[slot] = 1.0
    res = predict_windows(model, windows)
    logits = {"local": res["z_local"], "global": res["z_global"],
              "gate": np.log(np.clip(res["mix"], 1e-12, 1))}[stage]  # fmt: skip
    t = fit_temperature(logits, res["y"])
    model.temperature[slot] = t
    return float(t)


def build_model(cfg: Mapping[str, Any], classes: list[str], tissues: list[str]) -> nn.Module:
    from histoscope.models.nuclass import NuClass

    m = cfg["model"]
    return NuClass({"classes": classes, "tissues": tissues, **{k: m[k] for k in ARCH_KEYS}})


def _classes_tissues(cfg) -> tuple[list[str], list[str]]:
    from histoscope.models.nuclass import UNKNOWN
    from histoscope.synthetic._constants import CELL_CLASSES, ORGANS

    classes = list(cfg["data"]["classes"] or CELL_CLASSES)
    if cfg["data"]["path"] and not cfg["data"]["classes"]:
        raise RecipeError("recipe key data.classes is required with a trio (data.path)")
    tissues = [o for o in ORGANS] + [UNKNOWN]
    return classes, tissues


def train(
    recipe: Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    resume: bool = True,
    progress: Callable[[int, int], Any] | None = None,
) -> dict[str, Any]:
    """Train the three stages, fit the temperatures, evaluate on held-out slides, save.

    Parameters
    ----------
    recipe
        Validated recipe (see the module docstring).
    out_dir
        Receives ``data/`` (cached regions), ``local/``, ``global/``, ``gate/``
        (each ``train_log.jsonl`` + ``last_state.pt``), ``heldout/`` and the checkpoint.
    resume
        Continue each stage from its ``last_state.pt`` when the same recipe left one.
    progress
        ``progress(step, total_steps)`` within each stage.

    Returns
    -------
    dict
        ``{"checkpoint": path, "metrics": {...}}`` (checkpoint ``None`` on ranks > 0).
    """
    from histoscope.checkpoints import save_checkpoint

    cfg = settings(recipe)
    ts = TrainSettings.from_recipe(recipe["train"])
    device = _device(ts.device)
    rank, world = _dist(device)
    out = Path(out_dir)
    classes, tissues = _classes_tissues(cfg)
    torch.manual_seed(ts.seed)
    model = build_model(cfg, classes, tissues).to(device)
    data = Data(cfg, classes, tissues, model.config, out)
    metrics: dict[str, Any] = {"stages": {}, "temperature": {}}
    for stage in STAGES:
        metrics["stages"][stage] = _run_stage(stage, model, data, cfg, ts, out, recipe, resume,
                                              progress, rank, world)  # fmt: skip
        metrics["temperature"][stage] = fit_temperatures(model, data.val_windows, stage)
    model.cpu().eval()
    res = predict_windows(model, data.val_windows)
    metrics["val"] = cell_metrics(res, classes)
    if rank != 0:
        return {"checkpoint": None, "metrics": metrics}
    ev = cfg["eval"]
    if ev["test_seeds"]:
        from histoscope.training.nuclass_eval import heldout

        metrics["heldout"] = heldout(model, _card(model, cfg, recipe, classes, tissues, {}),
                                     ev, out / "heldout")  # fmt: skip
    card = _card(model, cfg, recipe, classes, tissues, metrics)
    name = recipe.get("name") or FAMILY
    ckpt = save_checkpoint(out / f"{name}.safetensors", model, card)
    if recipe.get("export"):
        with atomic_path(recipe["export"]) as tmp:
            shutil.copyfile(ckpt, tmp)
    return {"checkpoint": str(ckpt), "metrics": metrics}


def _card(model, cfg, recipe, classes, tissues, metrics):
    from histoscope.checkpoints import ModelCard

    lc, cc = model.config["local"], model.config["context"]
    d = cfg["data"]
    return ModelCard(
        family=FAMILY, config=model.config, classes=tuple(classes),
        input_spec={"mpp": float(lc["mpp"]), "tile_size": int(lc["crop"]),
                    "context_mpp": float(cc["mpp"]), "context_size": int(cc["crop"]),
                    "context_read": int(cc["read"]), "mean": list(model.mean.flatten().tolist()),
                    "std": list(model.std.flatten().tolist()), "tissues": tissues,
                    "default_tissue": tissues[-1]},
        recipe=dict(recipe),
        data={"trained_on": "trio " + str(d["path"]) if d["path"] else
              "synthetic H&E (histoscope.synthetic regions); not validated on real tissue",
              "synthetic": d["synthetic"], "path": d["path"]},
        metrics={**metrics, "temperature_values": [float(v) for v in model.temperature]},
    )  # fmt: skip


def evaluate(
    checkpoint_path: str | os.PathLike,
    data_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    path: str = "both",
    per_class: int = 60,
    organ: str | None = None,
    split: str = "all",
    record: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Metrics of a ``nuclass`` checkpoint on labelled cells.

    ``data_path`` is a folder of synthetic slides (``*.tif`` each with its
    ``*.cells.csv``, in the folder, in its ``slides/`` as ``histoscope synth``
    writes them, or below; cells typed through
    :func:`histoscope.celltypes.iter_classify`) or a NuClass trio (crops only:
    ``path="fast"`` is refused there). ``per_class`` cells per class and slide
    (at least 1); ``organ`` one of the checkpoint's tissues or ``None``
    ("unknown"); ``split`` the slides of one split of a synth folder's
    ``manifest.json`` (``"all"``: every labelled slide). On slides, each path's
    figures carry 95 % intervals from a percentile bootstrap over slides (2000
    resamples, seed 0). Writes ``confusion_<path>.png``,
    ``reliability_<path>.csv`` and ``cells_<path>.csv``; see
    :func:`histoscope.training.nuclass_eval.evaluate_folder`.

    With ``record`` the figures also go into the checkpoint's card under
    ``metrics.<record>`` (e.g. ``final_test``) with the slides' seeds, the
    tensors unchanged (:func:`histoscope.training._claims.record`); the key, the
    synth manifest and an existing entry (replaced only with ``overwrite``) are
    checked before anything is typed, and ``metrics.json`` is written first.
    """
    from histoscope.training import _claims
    from histoscope.training.nuclass_eval import evaluate_folder

    if record:
        _claims.check_record(checkpoint_path, record, data=data_path, split=split,
                             overwrite=overwrite)  # fmt: skip
    result = evaluate_folder(checkpoint_path, data_path, out_dir, path=path, per_class=per_class,
                             organ=organ, split=split)  # fmt: skip
    if record:
        result = {"split": split, **result}
        _claims.write_metrics_first(out_dir, checkpoint_path, data_path, result)
        _claims.record(checkpoint_path, record, result, data=data_path, split=split,
                       overwrite=overwrite)  # fmt: skip
    return result


def markdown_table(metrics: Mapping[str, Any]) -> str:
    """The table ``benchmarks/RESULTS.md`` shows for these metrics (``histoscope evaluate`` prints it)."""
    from histoscope.training.nuclass_eval import markdown_table as table

    return table(metrics)
