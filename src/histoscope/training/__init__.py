"""Headless training: ``run(recipe)`` trains, ``evaluate(checkpoint, data, out)`` measures.

A recipe names a family; ``histoscope.training.<family>`` provides

- ``train(recipe: dict, out_dir: Path, *, resume: bool = True, progress=None) -> dict``
  returning ``{"checkpoint": path, "metrics": {...}}``, and
- ``evaluate(checkpoint_path, data_path, out_dir) -> dict`` (metrics), writing
  ``metrics.json`` plus the family's tables and plots.

The shared epoch loop is :func:`histoscope.training._loop.fit`. This package
imports torch only when a family runs.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from histoscope.atomic import atomic_write_text
from histoscope.training._recipe import (
    RecipeError,
    apply_overrides,
    check_keys,
    fingerprint,
    load_recipe,
    validate,
)

__all__ = [
    "RecipeError",
    "apply_overrides",
    "check_keys",
    "evaluate",
    "family_module",
    "fingerprint",
    "load_recipe",
    "resolve_recipe",
    "run",
    "validate",
]

#: Card family -> training module, where the two names differ.
_MODULES: dict[str, str] = {}


def family_module(family: str) -> ModuleType:
    """Import ``histoscope.training.<family>`` and check it has ``train`` and ``evaluate``.

    Raises
    ------
    RecipeError
        If no such module exists or it lacks ``train``/``evaluate``.
    """
    name = _MODULES.get(family, family)
    if not name.isidentifier() or name.startswith("_"):
        raise RecipeError(f"family {family!r} is not a training family name")
    modname = f"{__name__}.{name}"
    try:
        mod = importlib.import_module(modname)
    except ModuleNotFoundError as exc:
        if exc.name != modname:
            raise
        raise RecipeError(
            f"no training code for family {family!r} (module {modname} not found); "
            f"available: {', '.join(available_families()) or 'none'}"
        ) from None
    missing = [f for f in ("train", "evaluate") if not callable(getattr(mod, f, None))]
    if missing:
        raise RecipeError(f"{modname} does not provide {' and '.join(missing)}()")
    return mod


def available_families() -> list[str]:
    """Training modules in this package: public modules defining ``train`` (none is imported)."""
    here = Path(__file__).parent
    return sorted(p.stem for p in here.glob("[!_]*.py") if "\ndef train(" in p.read_text())


def resolve_recipe(
    recipe: str | os.PathLike | Mapping[str, Any], overrides: Iterable[str] = ()
) -> dict[str, Any]:
    """Load a recipe, apply overrides and check the shared keys.

    Parameters
    ----------
    recipe
        YAML path or mapping.
    overrides
        ``key.sub=value`` strings.

    Returns
    -------
    dict
        The recipe to run.
    """
    doc = apply_overrides(load_recipe(recipe), overrides)
    validate(doc)
    return doc


def run(
    recipe: str | os.PathLike | Mapping[str, Any],
    overrides: Iterable[str] = (),
    *,
    resume: bool = True,
    progress: Callable[[int, int], Any] | None = None,
) -> dict[str, Any]:
    """Run a training recipe with its family's ``train``.

    Parameters
    ----------
    recipe
        YAML path or mapping with ``family``, ``data``, ``model``, ``train``, ``out``.
        Relative paths in it are taken from the current directory.
    overrides
        ``key.sub=value`` strings applied on top (as ``histoscope train -o``).
    resume
        Continue from ``out/last_state.pt`` when the same recipe left one.
    progress
        ``progress(step, total_steps)`` during training.

    Returns
    -------
    dict
        ``{"checkpoint": path, "metrics": {...}, "out": path}``.

    Raises
    ------
    RecipeError
        Missing or unknown keys, an unknown family, missing data.
    """
    import yaml

    doc = resolve_recipe(recipe, overrides)
    mod = family_module(doc["family"])
    out = Path(doc["out"])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "recipe.yaml", yaml.safe_dump(doc, sort_keys=False))
    result = dict(mod.train(doc, out, resume=resume, progress=progress))
    result.setdefault("out", str(out))
    return result


def _check_options(mod: ModuleType, options: Mapping[str, Any]) -> None:
    """Refuse options the family's ``evaluate`` does not take, naming those it does."""
    import inspect

    params = inspect.signature(mod.evaluate).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    takes = [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(takes))
    if unknown:
        raise RecipeError(f"{mod.__name__}.evaluate takes no option(s) {unknown}; "
                          f"it takes: {', '.join(takes) or 'none'}")  # fmt: skip


def evaluate(
    checkpoint: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, **options: Any
) -> dict[str, Any]:
    """Evaluate a checkpoint with its family's ``evaluate`` and write ``metrics.json``.

    Parameters
    ----------
    checkpoint
        A ``.safetensors`` checkpoint; its card names the family.
    data
        A labelled dataset folder (e.g. from ``histoscope synth``).
    out
        Output folder for ``metrics.json`` and the family's tables and plots.
    **options
        Passed to the family's ``evaluate`` (e.g. ``split="all"``).

    Returns
    -------
    dict
        The metrics.

    Raises
    ------
    histoscope.CheckpointError
        If the checkpoint cannot be read.
    RecipeError
        If no training module exists for its family or the data is missing.
    """
    from histoscope.checkpoints import read_card

    card = read_card(checkpoint)
    mod = family_module(card.family)
    _check_options(mod, options)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = dict(mod.evaluate(Path(checkpoint), Path(data), out_dir, **options))
    doc = {"checkpoint": str(checkpoint), "family": card.family, "sha256": card.sha256,
           "data": str(data), **metrics}  # fmt: skip
    atomic_write_text(out_dir / "metrics.json", json.dumps(doc, indent=2, default=float) + "\n")
    return metrics
