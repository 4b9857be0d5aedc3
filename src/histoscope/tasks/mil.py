"""Attention MIL on a slide (CLAM): tile features through the engine, then one slide call.

:func:`iter_mil` finds tissue, lays the tile grid at the feature backbone's
input spec, runs the frozen backbone over every tissue tile through
:func:`histoscope.engine.iter_tiles` (yielding progress), and then runs the
CLAM model once over all the tile features. The :class:`MILResult` holds the
slide probability per class, the predicted class, the attention of the
predicted class's branch as a :class:`TileHeatmap` (NaN off tissue) and the
top-``k`` attended tiles (level-0 coordinates) to jump to.

A CLAM checkpoint's card says which feature backbone it was trained on
(``card.data["features"]``, see :func:`feature_descriptor`): the
tumour patch classifier checkpoint it came from (file name, resolved like
``sample_data/<name>``, and its tensor hash), or a registry backbone built
from a seed; :func:`feature_model_for` rebuilds exactly that backbone and
checks its weights' hash, so features never silently come from other weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from histoscope.engine import EngineParams, Provenance, Result, TileHeatmap, _atomic_write
from histoscope.errors import CheckpointError

if TYPE_CHECKING:
    import torch

    from histoscope.checkpoints import ModelCard
    from histoscope.engine import LayerDataTuple, TileOutputs
    from histoscope.models.backbones import InputSpec
    from histoscope.tissue import TileGrid, TissueMask

#: Default tissue fraction a tile needs to enter the bag.
MIN_TISSUE = 0.5


# ------------------------------------------------------------ feature model
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


# ------------------------------------------------------------------- features
def tile_grid_for(
    slide, spec: InputSpec, *, tissue: TissueMask | None = None, min_tissue: float = MIN_TISSUE
) -> TileGrid:
    """Tissue tiles of ``slide`` at the feature model's tile size and µm/px."""
    from histoscope.tissue import tile_grid, tissue_mask

    mask = tissue if tissue is not None else tissue_mask(slide)
    return tile_grid(slide, mask, spec.mpp, spec.tile_size, min_tissue)


def iter_features(
    slide,
    feature_model: FeatureModel,
    grid: TileGrid,
    params: EngineParams | None = None,
    *,
    near: tuple[float, float] | None = None,
) -> Generator[tuple[int, int], bool | None, TileOutputs]:
    """Features of every tile of ``grid`` through the engine; yields ``(done, total)``."""
    from histoscope.engine import iter_tiles

    return (yield from iter_tiles(feature_model.module, slide, grid, feature_model.spec, params,
                                  near=near))  # fmt: skip


# --------------------------------------------------------------------- result
@dataclass(frozen=True, kw_only=True)
class MILResult(Result):
    """A slide-level MIL prediction with its attention.

    Attributes
    ----------
    classes
        Class names in logit order.
    probability
        ``(C,)`` slide probabilities.
    predicted
        Index of the predicted class.
    attention
        Attention of the predicted class's branch per tile, as a heatmap
        (weights sum to 1 over tissue tiles; NaN off tissue).
    top_tiles
        ``[{"x", "y", "attention", "rank"}]``: the most attended tiles,
        level-0 top-left corners, highest first.
    tile_attention
        ``(N,)`` the same weights in grid order.
    """

    classes: tuple[str, ...]
    probability: np.ndarray
    predicted: int
    attention: TileHeatmap
    top_tiles: tuple[dict[str, Any], ...]
    tile_attention: np.ndarray

    @property
    def label(self) -> str:
        """Name of the predicted class."""
        return self.classes[self.predicted]

    def to_layers(self) -> list[LayerDataTuple]:
        """The attention heatmap (µm placement, NaN background) and the top tiles as points."""
        data, kwargs, kind = self.attention.to_layers()[0]
        finite = data[np.isfinite(data)]
        hi = float(finite.max()) if finite.size else 1.0
        kwargs.update(contrast_limits=(0.0, hi if hi > 0 else 1.0), colormap="turbo", opacity=0.5)
        kwargs["metadata"]["mil"] = self.summary()
        layers: list[LayerDataTuple] = [(data, kwargs, kind)]
        if self.top_tiles:
            g = self.attention.grid
            half = g.stride / 2
            mpp = g.slide_mpp
            pts = np.array([[(t["y"] + half - 0.5) * mpp, (t["x"] + half - 0.5) * mpp]
                            for t in self.top_tiles])  # fmt: skip
            props = {"rank": np.array([t["rank"] for t in self.top_tiles]),
                     "attention": np.array([t["attention"] for t in self.top_tiles])}  # fmt: skip
            layers.append((pts, {"name": "top attended tiles", "properties": props,
                                 "symbol": "square", "size": g.stride * mpp,
                                 "face_color": "transparent", "border_color": "cyan",
                                 "metadata": {"histoscope": self.provenance.to_dict()}},
                           "points"))  # fmt: skip
        return layers

    def summary(self) -> dict[str, Any]:
        """Prediction, probabilities and top tiles as plain data."""
        return {
            "prediction": self.label,
            "predicted_index": int(self.predicted),
            "probability": {c: float(p) for c, p in zip(self.classes, self.probability,
                                                        strict=True)},
            "top_tiles": [dict(t) for t in self.top_tiles],
            "n_tiles": int(len(self.tile_attention)),
        }  # fmt: skip

    def save(self, out_dir: str | os.PathLike) -> list[Path]:
        """Write ``mil.json`` (prediction, probabilities, top tiles, provenance) and the attention.

        Returns
        -------
        list of pathlib.Path
            ``mil.json``, ``mil_attention.npy`` (the heatmap grid),
            ``mil_tile_attention.csv`` and ``provenance.json``.
        """
        import io

        out = Path(out_dir)
        doc = {**self.summary(), "provenance": self.provenance.to_dict()}
        files = [_atomic_write(out / "mil.json", (json.dumps(doc, indent=2) + "\n").encode())]
        buf = io.BytesIO()
        np.save(buf, self.attention.values)
        files.append(_atomic_write(out / "mil_attention.npy", buf.getvalue()))
        coords = self.attention.grid.coords
        rows = ["x,y,attention"] + [f"{int(x)},{int(y)},{a:.6g}" for (x, y), a
                                    in zip(coords, self.tile_attention, strict=True)]  # fmt: skip
        files.append(
            _atomic_write(out / "mil_tile_attention.csv", ("\n".join(rows) + "\n").encode())
        )
        files.append(self._write_provenance(out))
        return files


def mil_predict(model: torch.nn.Module, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Slide probabilities ``(C,)`` and per-branch attention ``(K, N)`` for one bag.

    Raises
    ------
    ValueError
        If the bag is empty or its feature size is not the model's.
    """
    import torch

    feats = np.asarray(features, np.float32)
    if feats.ndim != 2 or len(feats) == 0:
        raise ValueError(f"a bag needs at least one tile feature row, got shape {feats.shape}")
    model.eval()
    with torch.no_grad():
        out = model(torch.from_numpy(feats))
    prob = torch.softmax(out["logits"].float(), 1)[0].numpy()
    return prob, out["attention"][0].float().numpy()


def iter_mil(
    slide,
    clam_model: torch.nn.Module,
    card: ModelCard,
    *,
    feature_model: FeatureModel | None = None,
    near: tuple[float, float] | None = None,
    params: EngineParams | None = None,
    tissue: TissueMask | None = None,
    min_tissue: float | None = None,
    top_k: int = 8,
) -> Generator[tuple[int, int], bool | None, MILResult]:
    """Attention MIL over ``slide``: yields ``(done, total)`` tiles encoded, returns :class:`MILResult`.

    Parameters
    ----------
    slide
        An open slide with known µm/px.
    clam_model
        A ``clam`` family model (from :func:`histoscope.load_checkpoint`).
    card
        Its card: classes, hash, and the feature backbone it expects.
    feature_model
        Tile encoder to use instead of the one the card names.
    near
        Level-0 ``(x, y)``: encode tiles nearest to it first.
    params
        Engine settings.
    tissue
        A precomputed tissue mask (computed here if ``None``).
    min_tissue
        Tissue fraction a tile needs (default: the card's, else 0.5).
    top_k
        How many most-attended tiles to list.

    Raises
    ------
    ValueError
        If the slide has no tissue tiles, or the features do not fit the model.
    CheckpointError
        If the card's feature backbone cannot be rebuilt.
    """
    fm = feature_model if feature_model is not None else feature_model_for(card)
    if min_tissue is None:
        min_tissue = float((card.data or {}).get("min_tissue", MIN_TISSUE))
    grid = tile_grid_for(slide, fm.spec, tissue=tissue, min_tissue=min_tissue)
    if len(grid) == 0:
        raise ValueError(f"{slide.path}: no tissue tiles for MIL (min_tissue={min_tissue})")
    want = getattr(clam_model, "in_dim", None)
    if want is not None and want != fm.feature_dim:
        raise ValueError(f"feature model gives {fm.feature_dim}-d features, the MIL model "
                         f"expects {want}")  # fmt: skip
    out = yield from iter_features(slide, fm, grid, params, near=near)
    classes = tuple(card.classes) or tuple(str(i) for i in range(clam_model.n_classes))
    done = out.done
    prob, att = mil_predict(clam_model, out.outputs[done])
    pred = int(np.argmax(prob))
    branch = att[pred if att.shape[0] > 1 else 0]
    tile_att = np.full(len(grid), np.nan, np.float32)
    tile_att[done] = branch
    prov = Provenance(
        task="mil", slide=str(slide.path), checkpoint_sha256=card.sha256 or "",
        params={"min_tissue": min_tissue, "top_k": top_k, "cancelled": bool(out.cancelled),
                "feature_backbone": {k: fm.descriptor.get(k) for k in
                                     ("backbone", "checkpoint", "checkpoint_sha256",
                                      "weights_sha256")}},
        mpp=fm.spec.mpp, tile_grid=grid.to_dict(),
    )  # fmt: skip
    from histoscope.engine import TileOutputs

    heat = TileHeatmap.from_outputs(TileOutputs(grid, tile_att[:, None], done), prov,
                                    name="MIL attention", channel=0)  # fmt: skip
    order = np.argsort(-np.nan_to_num(tile_att, nan=-1.0), kind="stable")[
        : min(top_k, int(done.sum()))
    ]
    top = tuple({"rank": r + 1, "x": int(grid.coords[i, 0]), "y": int(grid.coords[i, 1]),
                 "attention": float(tile_att[i])} for r, i in enumerate(order))  # fmt: skip
    return MILResult(provenance=prov, classes=classes, probability=prob, predicted=pred,
                     attention=heat, top_tiles=top, tile_attention=tile_att)  # fmt: skip


def run_mil(slide, clam_model, card, **kwargs: Any) -> MILResult:
    """:func:`iter_mil` run to the end (for the CLI and scripts)."""
    gen = iter_mil(slide, clam_model, card, **kwargs)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value
