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
from collections.abc import Generator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from histoscope.atomic import atomic_write_text
from histoscope.errors import CheckpointError
from histoscope.features import (  # the encoders live in histoscope.features
    FeatureModel,
    _resolve,
    feature_model_for,
    patch_classifier_features,
    registry_features,
)
from histoscope.params import check, param
from histoscope.progress import Cancelled, Step, tagged
from histoscope.results import Provenance, Result, TileHeatmap, write_npy
from histoscope.tasks._registry import TaskSpec, register
from histoscope.tissue import edge_summary

if TYPE_CHECKING:
    import torch

    from histoscope.checkpoints import ModelCard
    from histoscope.engine import EngineParams, TileOutputs
    from histoscope.models.backbones import InputSpec
    from histoscope.results import LayerDataTuple
    from histoscope.tissue import TileGrid, TissueMask

__all__ = ["FeatureModel", "MILParams", "MILResult", "_resolve", "feature_model_for",
           "iter_features", "iter_mil", "mil_predict", "patch_classifier_features",
           "registry_features", "run_mil", "tile_grid_for"]  # fmt: skip

#: Default tissue fraction a tile needs to enter the bag.
MIN_TISSUE = 0.5


@dataclass(frozen=True)
class MILParams:
    """Settings of attention MIL."""

    min_tissue: float | None = param(None, "tissue fraction a tile needs to enter the bag "
                                     "(none: the checkpoint's own)", min=0.0, max=1.0)  # fmt: skip
    top_k: int = param(8, "how many most-attended tiles to list", min=1, max=10_000)
    features: str = param("", "a CLAM/TRIDENT .h5 feature file of this slide to classify "
                          "(default: encode the slide, or reuse the session's table)")  # fmt: skip

    def __post_init__(self) -> None:
        check(self, "mil")


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
    ood: Any = None  # OODReport: is the slide outside the training data?

    @property
    def label(self) -> str:
        """Name of the predicted class."""
        return self.classes[self.predicted]

    def to_layers(self) -> list[LayerDataTuple]:
        """The attention heatmap (µm placement, NaN background) and the top tiles as points."""
        from histoscope.results import HEATMAP_OPACITY, fading_colormap

        data, kwargs, kind = self.attention.to_layers()[0]
        finite = data[np.isfinite(data)]
        hi = float(finite.max()) if finite.size else 1.0
        kwargs.update(contrast_limits=(0.0, hi if hi > 0 else 1.0), opacity=HEATMAP_OPACITY,
                      colormap=fading_colormap("turbo"))  # fmt: skip
        label = f"MIL attention for {self.label} (0 - slide max)"
        kwargs["metadata"]["colorbar"] = {"visible": True, "label": label}
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
                                 "symbol": "square", "size": g.stride * mpp, "units": ("um", "um"),
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
            "tiles_encoded": int(np.isfinite(self.tile_attention).sum()),
            "cancelled": self.cancelled,
        } | edge_summary(self.provenance) | (_ood_keys(self.ood) if self.ood is not None else {})  # fmt: skip

    def save(self, out_dir: str | os.PathLike) -> list[Path]:
        """Write ``mil.json`` (prediction, probabilities, top tiles, provenance) and the attention.

        Returns
        -------
        list of pathlib.Path
            ``mil.json``, ``mil_attention.npy`` (the heatmap grid),
            ``mil_tile_attention.csv``, ``mil.provenance.json`` and
            ``mil_attention.ome.zarr`` (a folder: the attention pyramid placed
            in µm as its layer).
        """
        from histoscope.export.heatmap import write_heatmap_ome_zarr

        out = Path(out_dir)
        doc = {**self.summary(), "provenance": self.provenance.to_dict()}
        files = [atomic_write_text(out / "mil.json", json.dumps(doc, indent=2) + "\n")]
        files.append(write_npy(out / "mil_attention.npy", self.attention.values))
        coords = self.attention.grid.coords
        rows = ["x,y,attention"] + [f"{int(x)},{int(y)},{a:.6g}" for (x, y), a
                                    in zip(coords, self.tile_attention, strict=True)]  # fmt: skip
        files.append(atomic_write_text(out / "mil_tile_attention.csv", "\n".join(rows) + "\n"))
        files.append(self._write_provenance(out, "mil.provenance.json"))
        files.append(write_heatmap_ome_zarr(self.attention, out / "mil_attention.ome.zarr"))
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
    target,
    clam_model: torch.nn.Module,
    card: ModelCard,
    *,
    feature_model: FeatureModel | None = None,
    near: tuple[float, float] | None = None,
    params: EngineParams | None = None,
    mil: MILParams | None = None,
    tissue: TissueMask | None = None,
    min_tissue: float | None = None,
    top_k: int | None = None,
) -> Generator[Step, bool | None, MILResult]:
    """Attention MIL over a slide or session: yields progress, returns :class:`MILResult`.

    Parameters
    ----------
    target
        An open slide with known µm/px, or a :class:`~histoscope.session.Session`
        (whose tissue mask and feature table are reused and kept).
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
    mil
        :class:`MILParams` (``min_tissue``/``top_k`` override it).
    tissue
        A precomputed tissue mask (default: the session's).
    min_tissue, top_k
        Shortcuts for the :class:`MILParams` fields.

    Raises
    ------
    ValueError
        If the slide has no tissue tiles, or the features do not fit the model.
    CheckpointError
        If the card's feature backbone cannot be rebuilt.
    Cancelled
        If stopped before any tile was encoded.
    """
    from histoscope.session import open_session
    from histoscope.tissue import inside_slide, no_tiles_error

    m = mil or MILParams()
    min_t = min_tissue if min_tissue is not None else m.min_tissue
    k = top_k if top_k is not None else m.top_k
    session = open_session(target, in_memory=True)
    slide = session.slide
    if m.features:
        yield Step(0, 1, "MIL features file")
        return _mil_from_file(slide, clam_model, card, m.features, k)
    yield Step(0, 0, "finding tissue and the feature encoder")
    fm = feature_model if feature_model is not None else session.product(
        "feature_model", card.sha256, lambda: feature_model_for(card))  # fmt: skip
    if min_t is None:
        min_t = float((card.data or {}).get("min_tissue", MIN_TISSUE))
    if tissue is not None:
        grid = tile_grid_for(slide, fm.spec, tissue=tissue, min_tissue=min_t)
    else:
        grid = session.grid(fm.spec.mpp, fm.spec.tile_size, min_t)
    full = grid
    grid = inside_slide(grid, slide)  # a tile half off the slide is half glass padding
    edge = len(full) - len(grid)
    if len(grid) == 0:
        raise no_tiles_error(session, fm.spec.mpp * fm.spec.tile_size, min_t, "MIL", edge)
    want = getattr(clam_model, "in_dim", None)
    if want is not None and want != fm.feature_dim:
        raise ValueError(f"feature model gives {fm.feature_dim}-d features, the MIL model "
                         f"expects {want}")  # fmt: skip
    table = yield from tagged(session.iter_features(fm, grid, params, near=near), "MIL tiles")
    done = table.done if table.done is not None else np.ones(len(grid), bool)
    if not done.any():
        raise Cancelled("MIL stopped before any tile was encoded")
    res = _mil_result(slide, clam_model, card, fm, grid, table.features, done, min_t, k)
    return _with_tissue_record(res, session.tissue_params if tissue is None else None, edge)


def _mil_from_file(slide, clam_model, card, path: str, top_k: int) -> MILResult:
    """MIL on a feature file's rows, placed on the slide by its coordinates and patch size."""
    from histoscope.features import FeatureFileError, FeatureModel, FeatureTable
    from histoscope.models.backbones import InputSpec
    from histoscope.tissue import TileGrid

    table = FeatureTable.load(path)
    a = table.attrs
    h0, w0 = slide.shape
    name = a.get("name")
    if name and str(name) != slide.path.name:
        raise FeatureFileError(f"{path}: features of {name}, not of {slide.path.name}")
    if len(table.coords) == 0:
        raise FeatureFileError(f"{path}: no tiles in the feature file")
    xy = table.coords
    if (xy < 0).any() or (xy[:, 0] >= w0).any() or (xy[:, 1] >= h0).any():
        raise FeatureFileError(f"{path}: tile coordinates fall outside {slide.path.name} "
                               f"({w0} x {h0} px)")  # fmt: skip
    if not np.isfinite(table.features).all():
        raise FeatureFileError(f"{path}: features hold NaN or infinite values")
    want = (card.data or {}).get("features", {})
    if (
        a.get("encoder_sha256")
        and want.get("weights_sha256")
        and (a["encoder_sha256"] != want["weights_sha256"])
    ):
        raise CheckpointError(f"{path}: features from encoder {str(a['encoder_sha256'])[:12]}..., "
                              f"the CLAM model expects {want['weights_sha256'][:12]}...")  # fmt: skip
    in_dim = getattr(clam_model, "in_dim", None)
    if in_dim is not None and table.features.shape[1] != in_dim:
        raise ValueError(f"{path}: {table.features.shape[1]}-d features, the MIL model expects "
                         f"{in_dim}")  # fmt: skip
    spec = InputSpec.from_dict(want.get("input_spec") or {"tile_size": int(a.get("patch_size", 256)),
                                                          "mpp": float(a.get("mpp", 0.5))})  # fmt: skip
    size = int(a.get("patch_size", spec.tile_size))
    mpp = float(a.get("mpp") or (float(a["patch_size_level0"]) * slide.mpp / size
                                 if "patch_size_level0" in a else spec.mpp))  # fmt: skip
    stride = size * mpp / slide.mpp
    index = np.floor(table.coords[:, ::-1] / stride + 1e-6).astype(np.int64)
    grid = TileGrid(coords=table.coords, index=index,
                    shape=(max(1, int(np.ceil(h0 / stride))), max(1, int(np.ceil(w0 / stride)))),
                    tile_size=size, mpp=mpp, slide_mpp=float(slide.mpp),
                    tissue=np.ones(len(table.coords), np.float32))  # fmt: skip
    fm = FeatureModel(None, spec, {"backbone": a.get("encoder", ""), "checkpoint": str(path),
                                   "weights_sha256": a.get("encoder_sha256", "")})  # fmt: skip
    done = np.ones(len(grid), bool)
    return _mil_result(slide, clam_model, card, fm, grid, table.features, done, None, top_k)


def _mil_result(slide, clam_model, card, fm, grid, features, done, min_tissue, top_k):
    """The slide call and attention from the encoded tiles (``done``) of ``grid``."""
    from histoscope.engine import TileOutputs

    classes = tuple(card.classes) or tuple(str(i) for i in range(clam_model.n_classes))
    prob, att = mil_predict(clam_model, features[done])
    pred = int(np.argmax(prob))
    branch = att[pred if att.shape[0] > 1 else 0]
    tile_att = np.full(len(grid), np.nan, np.float32)
    tile_att[done] = branch
    cancelled = not bool(done.all())
    prov = Provenance(
        task="mil", slide=str(slide.path), checkpoint_sha256=card.sha256 or "",
        params={"min_tissue": min_tissue, "top_k": top_k, "tiles_encoded": int(done.sum()),
                "feature_backbone": {k: fm.descriptor.get(k) for k in
                                     ("backbone", "checkpoint", "checkpoint_sha256",
                                      "weights_sha256")}},
        mpp=fm.spec.mpp, tile_grid=grid.to_dict(), cancelled=cancelled,
    )  # fmt: skip
    heat = TileHeatmap.from_outputs(TileOutputs(grid, tile_att[:, None], done), prov,
                                    name="MIL attention", channel=0)  # fmt: skip
    order = np.argsort(-np.nan_to_num(tile_att, nan=-1.0), kind="stable")[
        : min(top_k, int(done.sum()))
    ]
    top = tuple({"rank": r + 1, "x": int(grid.coords[i, 0]), "y": int(grid.coords[i, 1]),
                 "attention": float(tile_att[i])} for r, i in enumerate(order))  # fmt: skip
    res = MILResult(provenance=prov, classes=classes, probability=prob, predicted=pred,
                    attention=heat, top_tiles=top, tile_attention=tile_att)  # fmt: skip
    # outside training data (issue 11): the bag's tile features against the card's reference
    from histoscope.ood import with_ood

    return with_ood(res, card, features[done], slide.path.name)


def _with_tissue_record(res: MILResult, tissue_params, edge: int) -> MILResult:
    """``res`` whose provenance names the tissue mask used and the edge tiles left out.

    ``tissue_params``: the session's tissue in force (``None``: a mask given by the caller).
    """
    from histoscope.tissue import tissue_source

    p = res.provenance
    source = (tissue_source(tissue_params) if tissue_params is not None
              else {"tissue_mask": "given", "tissue_edit_sha256": None})  # fmt: skip
    prov = replace(p, params={**p.params, **source},
                   tile_grid={**(p.tile_grid or {}), "edge_tiles_not_scored": edge})  # fmt: skip
    return replace(res, provenance=prov, attention=replace(res.attention, provenance=prov))


def _ood_keys(report) -> dict[str, Any]:
    from histoscope.ood import ood_summary

    return ood_summary(report)


def run_mil(slide, clam_model, card, **kwargs: Any) -> MILResult:
    """:func:`iter_mil` run to the end (for scripts)."""
    from histoscope.progress import drive

    return drive(iter_mil(slide, clam_model, card, **kwargs))


def _run(session, checkpoint, params: MILParams, *, region=None, near=None, engine=None):
    model, card = checkpoint
    return (yield from iter_mil(session, model, card, near=near, params=engine, mil=params))


SPEC = register(TaskSpec(name="mil", title="Attention MIL (CLAM)", params=MILParams, run=_run,
                         family="clam", default_checkpoint="clam_default.safetensors",
                         needs=("tissue", "features")))  # fmt: skip
