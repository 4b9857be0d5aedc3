"""The epoch loop every family shares: seeded, logged, resumable.

Each epoch re-seeds torch and the batch generator from ``(seed, epoch)``, so an
interrupted run resumed from ``last_state.pt`` ends with exactly the weights of
an uninterrupted one (on CPU). After every epoch the loop appends one JSON line
to ``train_log.jsonl`` and then saves ``last_state.pt`` (model, optimiser,
best weights so far) with :func:`torch.save`; resuming reads it back
with ``torch.load(weights_only=True)``, so no code is ever unpickled.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from histoscope.atomic import atomic_path, atomic_write_text
from histoscope.training._recipe import TRAIN_KEYS, RecipeError

STATE_FILE = "last_state.pt"
LOG_FILE = "train_log.jsonl"
OPTIMISERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "constant")

Progress = Callable[[int, int], Any]


@dataclass(frozen=True)
class TrainSettings:
    """The ``train`` section of a recipe.

    Attributes
    ----------
    optimiser
        ``"adamw"``, ``"adam"`` or ``"sgd"`` (with ``momentum``).
    lr, weight_decay, momentum
        Optimiser settings.
    epochs
        Number of epochs.
    batch
        Samples per step.
    seed
        Seeds torch and every sampler; same seed, same weights on CPU.
    device
        ``"cpu"``, ``"cuda"``, ``"mps"`` or ``"auto"``.
    schedule
        ``"cosine"`` (per epoch, from ``lr`` towards zero) or ``"constant"``. The
        rate depends only on the epoch and ``epochs``, so a run resumed with
        more ``epochs`` follows the longer schedule from where it stands.
    samples_per_epoch
        Samples drawn per epoch by samplers that draw (``None``: the family's default).
    monitor, monitor_mode
        Validation metric that picks the best epoch, and ``"max"`` or ``"min"``;
        ``None`` keeps the last epoch.
    num_threads
        torch CPU threads (``None``: torch's default).
    """

    optimiser: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    epochs: int = 10
    batch: int = 32
    seed: int = 0
    device: str = "cpu"
    schedule: str = "cosine"
    samples_per_epoch: int | None = None
    monitor: str | None = None
    monitor_mode: str = "max"
    num_threads: int | None = None

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> RecipeError:
            return RecipeError(f"recipe key train.{key}: {why}, got {getattr(self, key)!r}")

        if self.optimiser not in OPTIMISERS:
            raise bad("optimiser", f"must be one of {OPTIMISERS}")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", f"must be one of {SCHEDULES}")
        if self.monitor_mode not in ("max", "min"):
            raise bad("monitor_mode", "must be 'max' or 'min'")
        for key in ("epochs", "batch"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(key, "must be a positive integer")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise bad("seed", "must be a non-negative integer")
        spe = self.samples_per_epoch
        if spe is not None and (not isinstance(spe, int) or spe < 1):
            raise bad("samples_per_epoch", "must be a positive integer or null")
        for key in ("lr", "weight_decay", "momentum"):
            v = getattr(self, key)
            if not isinstance(v, int | float) or isinstance(v, bool) or v < 0 or math.isnan(v):
                raise bad(key, "must be a non-negative number")
        if not self.lr > 0:
            raise bad("lr", "must be positive")

    @classmethod
    def from_recipe(cls, section: Mapping[str, Any]) -> TrainSettings:
        """Build from a recipe's ``train`` mapping (unknown keys are refused)."""
        unknown = sorted(set(section) - set(TRAIN_KEYS))
        if unknown:
            raise RecipeError(f"unknown recipe key(s) {', '.join('train.' + k for k in unknown)}")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in section.items() if k in names})


@dataclass
class FitResult:
    """What :func:`fit` did.

    Attributes
    ----------
    history
        One record per epoch (also the lines of ``train_log.jsonl``).
    best_epoch
        Epoch whose weights the model holds (1-based; the last one without a monitor).
    best_value
        Its monitored metric (``None`` without a monitor).
    resumed_from
        Epochs already done when this call started (0 for a fresh run).
    """

    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_value: float | None = None
    resumed_from: int = 0


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch: distinct per epoch, fixed by the run's seed."""
    return (int(seed) * 1_000_003 + int(epoch) * 7919) % (2**63 - 1)


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch, numpy's legacy global state and Python's ``random``; return a torch generator."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - third-party code may use the global state
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def make_optimiser(params: Iterable[nn.Parameter], s: TrainSettings) -> torch.optim.Optimizer:
    """The optimiser a :class:`TrainSettings` names."""
    params = [p for p in params if p.requires_grad]
    if s.optimiser == "adamw":
        return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    if s.optimiser == "adam":
        return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
    return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)


def lr_at(epoch: int, s: TrainSettings) -> float:
    """Learning rate of an epoch (0-based): a pure function, so resuming needs no scheduler state."""
    if s.schedule == "constant":
        return float(s.lr)
    return float(s.lr) * 0.5 * (1 + math.cos(math.pi * min(epoch, s.epochs) / s.epochs))


def _atomic_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _copy_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _read_log(path: Path, upto: int) -> list[dict[str, Any]]:
    """Log records of epochs ``<= upto`` (later lines belong to an epoch never saved)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut short by a crash
            continue
        if isinstance(rec, dict) and 1 <= rec.get("epoch", 0) <= upto:
            out.append(rec)
    return out


def _write_log(path: Path, records: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def fit(
    model: nn.Module,
    batches: Callable[[int, torch.Generator], Iterable[Any]],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    settings: TrainSettings,
    out_dir: str | os.PathLike,
    *,
    steps_per_epoch: int,
    validate: Callable[[nn.Module], Mapping[str, float]] | None = None,
    resume: bool = True,
    progress: Progress | None = None,
    fingerprint: str = "",
) -> FitResult:
    """Train ``model`` for ``settings.epochs`` epochs, resuming from ``out_dir/last_state.pt``.

    Parameters
    ----------
    model
        The module to train, on its device (``loss_fn`` moves batches there);
        on return it holds the best (or last) epoch's weights.
    batches
        ``batches(epoch, generator)`` yields one epoch's batches; draw all
        randomness (order, augmentation) from ``generator`` for determinism.
    loss_fn
        ``loss_fn(model, batch)`` -> scalar loss.
    settings
        The ``train`` section.
    out_dir
        Where ``train_log.jsonl`` and ``last_state.pt`` go.
    steps_per_epoch
        Batches per epoch (for the progress bar and ``progress``).
    validate
        ``validate(model)`` -> metrics, run in eval mode without gradients
        after every epoch and logged; ``settings.monitor`` picks one of them.
    resume
        Continue from ``last_state.pt`` if it is there (else start over).
    progress
        ``progress(step, total_steps)`` after each step.
    fingerprint
        Identifies the recipe; a saved state with another fingerprint is refused.

    Returns
    -------
    FitResult

    Raises
    ------
    RecipeError
        If the saved state belongs to another recipe, or ``monitor`` names a
        metric ``validate`` does not return.
    """

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    if settings.num_threads:
        torch.set_num_threads(int(settings.num_threads))
    try:
        return _fit(model, batches, loss_fn, settings, out, steps_per_epoch, validate, resume,
                    progress, fingerprint)  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def _fit(model, batches, loss_fn, settings, out, steps_per_epoch, validate, resume, progress,
         fingerprint) -> FitResult:  # fmt: skip
    from tqdm import tqdm

    state_path, log_path = out / STATE_FILE, out / LOG_FILE
    seed_everything(settings.seed)
    opt = make_optimiser(model.parameters(), settings)
    result = FitResult()
    best_state: dict[str, torch.Tensor] | None = None
    start = 0
    if resume and state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state.get("fingerprint", "") != fingerprint:
            raise RecipeError(
                f"{state_path} was saved by a different recipe; use another output folder "
                "or run without resuming"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimiser"])
        start = int(state["epoch"])
        best_state = state.get("best_model") or None
        result.best_epoch = int(state.get("best_epoch", start))
        result.best_value = state.get("best_value")
        result.resumed_from = start
    elif log_path.exists():
        log_path.unlink()
    result.history = _read_log(log_path, start)
    _write_log(log_path, result.history)

    total = max(0, settings.epochs - start) * steps_per_epoch
    step = 0
    bar = tqdm(total=total, desc="train", unit="step", disable=None, leave=False)
    try:
        for epoch in range(start, settings.epochs):
            t0 = time.perf_counter()
            seed = epoch_seed(settings.seed, epoch)
            torch.manual_seed(seed)
            gen = torch.Generator().manual_seed(seed)
            lr = lr_at(epoch, settings)
            for group in opt.param_groups:
                group["lr"] = lr
            model.train()
            loss_sum, n = 0.0, 0
            for batch in batches(epoch, gen):
                loss = loss_fn(model, batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += float(loss.detach())
                n += 1
                step += 1
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss_sum / n:.4f}", refresh=False)
                if progress is not None:
                    progress(step, total)
            record: dict[str, Any] = {"epoch": epoch + 1, "train_loss": loss_sum / max(n, 1),
                                      "lr": lr, "steps": n}  # fmt: skip
            if validate is not None:
                model.eval()
                with torch.no_grad():
                    record.update({k: float(v) for k, v in validate(model).items()})
            record["seconds"] = round(time.perf_counter() - t0, 3)
            improved = True
            if settings.monitor is not None:
                if settings.monitor not in record:
                    raise RecipeError(f"recipe key train.monitor: {settings.monitor!r} is not "
                                      f"a logged metric; logged: {sorted(record)}")  # fmt: skip
                value = float(record[settings.monitor])
                prev = result.best_value
                sign = 1 if settings.monitor_mode == "max" else -1
                # ties go to the later epoch: same score, more training
                improved = (prev is None or math.isnan(prev)
                            or sign * (value - prev) >= 0)  # fmt: skip
                if improved:
                    result.best_value = value
            if improved:
                result.best_epoch = epoch + 1
                best_state = _copy_state(model) if settings.monitor is not None else None
            result.history.append(record)
            with open(log_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
            _atomic_save(
                {
                    "epoch": epoch + 1,
                    "model": _copy_state(model),
                    "optimiser": opt.state_dict(),
                    "best_epoch": result.best_epoch,
                    "best_value": result.best_value,
                    "best_model": best_state or {},
                    "fingerprint": fingerprint,
                },  # fmt: skip
                state_path,
            )
    finally:
        bar.close()
    if best_state:
        model.load_state_dict(best_state)
    return result
