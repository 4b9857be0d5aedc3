"""Tile feature tables: the frozen encoders that make them and the CLAM/TRIDENT file layout.

A feature table is one row per tissue tile: ``features`` (N x D float32) and
``coords`` (N x 2 level-0 ``(x, y)`` top-left corners), with the patch size,
its level-0 size and µm/px as attributes, exactly as CLAM and TRIDENT write
``.h5`` files, so MIL models and report generators read features made here or
by those tools alike. A :class:`FeatureModel` is a frozen tile encoder and
what identifies it (its weights' hash), so a table is never silently reused
for other weights. A session computes each table once
(:meth:`histoscope.session.Session.iter_features`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from histoscope.errors import CheckpointError, HistoScopeError

if TYPE_CHECKING:
    import torch

    from histoscope.checkpoints import ModelCard
    from histoscope.models.backbones import InputSpec
    from histoscope.tissue import TileGrid

FEATURES_KEY = "features"
COORDS_KEY = "coords"


class FeatureFileError(HistoScopeError):
    """A feature file is missing, or not in the CLAM/TRIDENT layout."""


# -------------------------------------------------------------- the encoders
@dataclass
class FeatureModel:
    """A frozen tile encoder and what identifies it.

    Attributes
    ----------
    module
        Maps normalised ``(B, 3, T, T)`` tiles to ``(B, D)`` features.
    spec
        Tile size, µm/px and normalisation it expects.
    descriptor
        Plain data for a card (see :func:`feature_descriptor`).
    """

    module: torch.nn.Module
    spec: InputSpec
    descriptor: dict[str, Any] = field(default_factory=dict)

    @property
    def feature_dim(self) -> int:
        """Feature size ``D``."""
        return int(self.descriptor["feature_dim"])


def _resolve(name: str) -> Path | None:
    from histoscope._data import sample_data_path

    p = Path(name)
    if p.is_file():
        return p
    return sample_data_path(p.name)


def feature_descriptor(
    backbone: str,
    backbone_config: Mapping[str, Any],
    module: torch.nn.Module,
    spec: InputSpec,
    *,
    checkpoint: str | None = None,
    checkpoint_sha256: str | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """The card entry naming a feature backbone.

    Parameters
    ----------
    backbone, backbone_config
        Registry name and the keyword arguments that rebuild it.
    module
        The backbone (its weights are hashed into ``weights_sha256``).
    spec
        Its input spec.
    checkpoint, checkpoint_sha256
        The tile classifier checkpoint (file name) and its card hash, when
        the backbone came from one.
    seed
        For a registry backbone with random weights, the torch seed it was
        built under.

    Returns
    -------
    dict
        ``{"backbone", "backbone_config", "checkpoint", "checkpoint_sha256",
        "seed", "weights_sha256", "feature_dim", "input_spec"}``.
    """
    import torch

    from histoscope.checkpoints import tensor_hash

    with torch.no_grad():
        dim = int(module.eval()(torch.zeros(1, 3, spec.tile_size, spec.tile_size)).shape[1])
    return {
        "backbone": backbone,
        "backbone_config": dict(backbone_config),
        "checkpoint": checkpoint,
        "checkpoint_sha256": checkpoint_sha256,
        "seed": seed,
        "weights_sha256": tensor_hash(module.state_dict()),
        "feature_dim": dim,
        "input_spec": spec.to_dict(),
    }


def patch_classifier_features(path: str | os.PathLike) -> FeatureModel:
    """The backbone of a ``tile_classifier`` checkpoint as a frozen feature model.

    Raises
    ------
    CheckpointError
        If the file is missing, unreadable or of another family.
    """
    from histoscope.checkpoints import load_checkpoint

    model, card = load_checkpoint(path, family="tile_classifier")
    bb = model.backbone.eval()
    for p in bb.parameters():
        p.requires_grad_(False)
    desc = feature_descriptor(card.config["backbone"], card.config.get("backbone_kwargs", {}), bb,
                              model.input_spec, checkpoint=Path(path).name,
                              checkpoint_sha256=card.sha256)  # fmt: skip
    return FeatureModel(bb, model.input_spec, desc)


def registry_features(name: str, config: Mapping[str, Any], seed: int = 0) -> FeatureModel:
    """A registry backbone with the random weights torch draws under ``seed``."""
    import torch

    from histoscope.models.backbones import create_backbone

    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(config).items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        bb = create_backbone(name, **kw)
    for p in bb.module.parameters():
        p.requires_grad_(False)
    desc = feature_descriptor(name, bb.config, bb.module, bb.input_spec, seed=int(seed))
    return FeatureModel(bb.module.eval(), bb.input_spec, desc)


def feature_model_for(card: ModelCard) -> FeatureModel:
    """Rebuild the feature backbone a CLAM card names, and check its weights.

    The patch classifier checkpoint is looked up as a path, then as
    ``sample_data/<name>``; a registry backbone is rebuilt from its seed.

    Raises
    ------
    CheckpointError
        If the card names no backbone, the checkpoint cannot be found, or
        the rebuilt weights differ from the hash in the card.
    """
    from histoscope.models.backbones import InputSpec

    desc = (card.data or {}).get("features")
    if not desc:
        raise CheckpointError("the CLAM card names no feature backbone (card.data['features'])")
    if desc.get("checkpoint"):
        path = _resolve(desc["checkpoint"])
        if path is None:
            raise CheckpointError(
                f"the CLAM model expects features from {desc['checkpoint']!r} "
                f"(sha256 {str(desc.get('checkpoint_sha256'))[:12]}...), which is neither a file "
                "nor in sample_data/; pass feature_model= explicitly"
            )
        fm = patch_classifier_features(path)
    else:
        fm = registry_features(desc["backbone"], desc.get("backbone_config", {}),
                               int(desc.get("seed") or 0))  # fmt: skip
    if fm.descriptor["weights_sha256"] != desc.get("weights_sha256"):
        raise CheckpointError(
            f"feature backbone {desc.get('checkpoint') or desc['backbone']!r} rebuilt with other "
            f"weights (sha256 {fm.descriptor['weights_sha256'][:12]}..., card says "
            f"{str(desc.get('weights_sha256'))[:12]}...)"
        )
    fm.spec = InputSpec.from_dict(desc.get("input_spec") or fm.spec.to_dict())
    return fm


# ------------------------------------------------------------------ the table
@dataclass(frozen=True)
class FeatureTable:
    """Features of a slide's tiles, in the CLAM/TRIDENT layout.

    Attributes
    ----------
    features
        ``(N, D)`` float32; rows of tiles not encoded (a cancelled run) are NaN.
    coords
        ``(N, 2)`` int64 level-0 ``(x, y)`` top-left tile corners.
    attrs
        ``patch_size`` (px at ``mpp``), ``patch_size_level0``, ``mpp``,
        ``slide_mpp``, the encoder's name and weights hash, ...
    done
        ``(N,)`` bool: which rows hold features.
    """

    features: np.ndarray
    coords: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)
    done: np.ndarray | None = None

    @property
    def complete(self) -> bool:
        """Every tile was encoded."""
        return self.done is None or bool(self.done.all())

    def save(self, path: str | os.PathLike) -> Path:
        """Write the table as a CLAM/TRIDENT ``.h5`` file (encoded rows only)."""
        keep = slice(None) if self.done is None else self.done
        return write_features(path, self.features[keep], self.coords[keep], self.attrs)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureTable:
        """Read a CLAM/TRIDENT ``.h5`` file."""
        feats, xy, attrs = read_features(path)
        return cls(feats, xy, attrs)


def table_attrs(grid: TileGrid, fm: FeatureModel, **extra: Any) -> dict[str, Any]:
    """The attributes CLAM/TRIDENT readers expect, plus what identifies the encoder."""
    return {"patch_size": int(grid.tile_size), "patch_size_level0": float(grid.stride),
            "patch_level": 0, "mpp": float(grid.mpp), "slide_mpp": float(grid.slide_mpp),
            "encoder": fm.descriptor.get("backbone", ""),
            "encoder_checkpoint": fm.descriptor.get("checkpoint") or "",
            "encoder_sha256": fm.descriptor.get("weights_sha256", ""), **extra}  # fmt: skip


def write_features(path: str | os.PathLike, features: np.ndarray, coords: np.ndarray,
                   attrs: Mapping[str, Any] | None = None) -> Path:  # fmt: skip
    """Write a CLAM/TRIDENT feature file (``features`` N x D, ``coords`` N x 2) atomically.

    Parameters
    ----------
    path
        ``.h5`` file to write.
    features
        ``(N, D)`` tile features.
    coords
        ``(N, 2)`` level-0 ``(x, y)`` tile corners.
    attrs
        Stored on the ``coords`` dataset (``patch_size``, ``patch_size_level0``,
        ``mpp``, ...), as TRIDENT does, and on the file; nested values as JSON.
    """
    import h5py

    from histoscope.atomic import atomic_path

    feats = np.asarray(features, np.float32)
    xy = np.asarray(coords, np.int64)
    if feats.ndim != 2 or xy.shape != (len(feats), 2):
        raise ValueError(f"features {feats.shape} and coords {xy.shape} must be (N, D) and (N, 2)")
    path = Path(path)
    with atomic_path(path, ".h5") as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset(FEATURES_KEY, data=feats)
        ds = f.create_dataset(COORDS_KEY, data=xy)
        for k, v in (attrs or {}).items():
            value = json.dumps(v) if isinstance(v, dict | list | tuple) or v is None else v
            ds.attrs[k] = value
            f.attrs[k] = value
    return path


def read_features(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Read a CLAM/TRIDENT ``.h5`` feature file: ``features``, ``coords`` and the coords' attrs.

    Files that store features as ``(1, N, D)`` (some TRIDENT encoders) are squeezed.

    Raises
    ------
    FeatureFileError
        If the file is missing, not HDF5, or lacks a ``features`` or ``coords`` dataset.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FeatureFileError(f"feature file {path} does not exist")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in (FEATURES_KEY, COORDS_KEY) if k not in f]
            if missing:
                raise FeatureFileError(f"feature file {path} has no {' or '.join(missing)} "
                                       f"dataset (has {sorted(f)})")  # fmt: skip
            feats = np.asarray(f[FEATURES_KEY], np.float32)
            xy = np.asarray(f[COORDS_KEY]).astype(np.int64)
            attrs = {k: (v.item() if hasattr(v, "item") else v)
                     for k, v in f[COORDS_KEY].attrs.items()}  # fmt: skip
    except OSError as exc:
        raise FeatureFileError(f"feature file {path} is not readable HDF5: {exc}") from None
    if feats.ndim == 3 and feats.shape[0] == 1:
        feats = feats[0]
    if feats.ndim != 2 or len(feats) != len(xy):
        raise FeatureFileError(f"feature file {path}: features {feats.shape} do not match "
                               f"coords {xy.shape}")  # fmt: skip
    return feats, xy.reshape(-1, 2), attrs


# ------------------------------------------------------- encoders by name
def backbone_features(name: str, weights: str | os.PathLike | None = None, *, seed: int = 0,
                      **kw: Any) -> FeatureModel:  # fmt: skip
    """A registry, timm or open_clip backbone as a frozen encoder.

    With ``weights`` (a local file or folder, loaded without executing code)
    the encoder is that model; without, it is the random initialisation torch
    draws under ``seed`` (for tests and pipelines, not for real features).
    """
    if weights is None:
        return registry_features(name, kw, seed=seed)
    from histoscope.models.backbones import create_backbone

    bb = create_backbone(name, weights, **kw)
    for p in bb.module.parameters():
        p.requires_grad_(False)
    desc = feature_descriptor(name, bb.config, bb.module, bb.input_spec)
    desc["weights_file"] = Path(weights).name
    return FeatureModel(bb.module.eval(), bb.input_spec, desc)


def checkpoint_features(path: str | os.PathLike) -> FeatureModel:
    """The encoder a checkpoint gives: a tile classifier's backbone, or the one a CLAM card names.

    Raises
    ------
    CheckpointError
        If the file cannot be read, or is of a family without a tile encoder.
    """
    from histoscope.checkpoints import read_card

    card = read_card(path)
    if card.family == "tile_classifier":
        return patch_classifier_features(path)
    if card.family == "clam":
        return feature_model_for(card)
    raise CheckpointError(f"{path}: a {card.family!r} checkpoint has no tile encoder; give a "
                          "tile_classifier or clam checkpoint, or --backbone NAME")  # fmt: skip
