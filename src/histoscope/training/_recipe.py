"""Training recipes: YAML (or dict) -> validated plain dict, with ``key.sub=value`` overrides.

A recipe names its ``family`` (the module ``histoscope.training.<family>``
that trains it), its ``data``, ``model`` and ``train`` settings and the ``out``
folder. The runner checks the keys every family shares; each family checks its
own sections with :func:`check_keys`, so a misspelt key is an error that names
the key instead of a silently ignored setting.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from histoscope.errors import HistoScopeError

#: Sections every recipe must have.
REQUIRED = ("family", "data", "model", "train", "out")
#: Top-level keys a recipe may have (families add nothing at the top level).
TOP_LEVEL = (*REQUIRED, "name", "description", "augment", "eval", "export")
#: Keys of the ``train`` section shared by every family (see ``TrainSettings``).
TRAIN_KEYS = ("optimiser", "lr", "weight_decay", "momentum", "epochs", "batch", "seed", "device",
              "schedule", "samples_per_epoch", "monitor", "monitor_mode", "num_threads")  # fmt: skip
#: Keys that may change between an interrupted run and its resumption.
RESUMABLE = ("out", "export", "train.epochs", "train.device", "train.num_threads", "description")


class RecipeError(HistoScopeError, ValueError):
    """A recipe that cannot run: missing or unknown keys, bad values, missing data."""


#: YAML 1.2 floats (``1e-3`` is a float, not the string PyYAML's 1.1 rules make it).
_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                       |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                       |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                       |[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X)  # fmt: skip


def _yaml_load(text: str) -> Any:
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
    return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass


def load_recipe(recipe: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """Read a recipe from a YAML file or copy a mapping.

    Parameters
    ----------
    recipe
        Path of a YAML file, or a mapping with the recipe's sections.

    Returns
    -------
    dict
        A deep copy (the caller's mapping is never changed).

    Raises
    ------
    RecipeError
        If the file is missing, is not valid YAML or is not a mapping.
    """
    if isinstance(recipe, Mapping):
        return copy.deepcopy(dict(recipe))
    import yaml

    path = Path(recipe)
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist")
    try:
        doc = _yaml_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe file {path} is not valid YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise RecipeError(f"recipe file {path} must hold a mapping, got {type(doc).__name__}")
    return doc


def apply_overrides(recipe: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Set ``key.sub=value`` entries (values parsed as YAML scalars/lists) in place.

    Parameters
    ----------
    recipe
        Recipe to change.
    overrides
        Strings like ``"train.epochs=3"`` or ``"model.backbone_kwargs.widths=[8, 16]"``.

    Returns
    -------
    dict
        ``recipe`` itself.

    Raises
    ------
    RecipeError
        If an override has no ``=`` or crosses a key that is not a section.
    """
    import yaml

    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RecipeError(f"override {item!r} must look like key.sub=value")
        try:
            value = _yaml_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise RecipeError(f"override {item!r}: value is not valid YAML ({exc})") from exc
        node = recipe
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise RecipeError(f"override {item!r}: {where!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return recipe


def check_keys(section: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    """Refuse keys of ``section`` that are not in ``allowed``, naming them.

    Parameters
    ----------
    section
        The mapping to check.
    allowed
        Key names it may hold.
    where
        Its dotted name in the recipe (``"data"``, ``"train"``, ...).

    Raises
    ------
    RecipeError
        On an unknown key, or if ``section`` is not a mapping.
    """
    if not isinstance(section, Mapping):
        raise RecipeError(f"recipe section {where!r} must be a mapping, got {section!r}")
    allowed = tuple(allowed)
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        names = ", ".join(f"{where}.{k}" if where else k for k in unknown)
        raise RecipeError(f"unknown recipe key(s) {names}; {where or 'top level'} accepts: "
                          f"{', '.join(sorted(allowed))}")  # fmt: skip


def validate(recipe: Mapping[str, Any]) -> None:
    """Check what every family shares: required sections and known top-level/train keys.

    Raises
    ------
    RecipeError
        Naming the missing or unknown key.
    """
    missing = [k for k in REQUIRED if k not in recipe]
    if missing:
        raise RecipeError(f"recipe is missing required key(s): {', '.join(missing)}")
    check_keys(recipe, TOP_LEVEL, "")
    family = recipe["family"]
    if not isinstance(family, str) or not family.isidentifier():
        raise RecipeError(f"recipe key 'family' must be a module name, got {family!r}")
    for section in ("data", "model", "train"):
        if not isinstance(recipe[section], Mapping):
            raise RecipeError(f"recipe section {section!r} must be a mapping")
    check_keys(recipe["train"], TRAIN_KEYS, "train")
    if not isinstance(recipe["out"], str | os.PathLike) or not str(recipe["out"]):
        raise RecipeError(f"recipe key 'out' must be a folder path, got {recipe['out']!r}")


def fingerprint(recipe: Mapping[str, Any]) -> str:
    """Hash of the settings that decide the result (``RESUMABLE`` keys left out).

    A run resumes only from a state saved under the same fingerprint.
    """
    doc = copy.deepcopy(dict(recipe))
    for key in RESUMABLE:
        node: Any = doc
        *head, last = key.split(".")
        for part in head:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(last, None)
    text = json.dumps(doc, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
