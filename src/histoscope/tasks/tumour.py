"""Tumour probability heatmaps (HistoHelper): tissue mask, tiles, a patch classifier.

The heatmap is computed viewport-first: tiles nearest a point (the centre of
the user's view) are scored first and the array fills in as batches finish,
so a napari layer showing the map updates live. Background (no tissue) stays
NaN and is drawn transparent, never as probability 0. Grad-CAM of a clicked
tile (task ``gradcam``) explains the same model on the same, equally
normalised, input.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from histoscope.params import check, param
from histoscope.progress import Cancelled, Step, tagged
from histoscope.results import Provenance, Result, TileHeatmap, plain
from histoscope.tasks._registry import TaskSpec, register
from histoscope.tasks.tissue import TissueResult, find_tissue
from histoscope.tissue import edge_summary

if TYPE_CHECKING:
    from histoscope.engine import EngineParams
    from histoscope.tissue import TissueMask

__all__ = ["TissueResult", "TumourMap", "TumourParams", "find_tissue", "iter_heatmap"]

#: Class names that count as "tumour" in a patch classifier's card.
TUMOUR_NAMES = ("tumour", "tumor", "cancer", "malignant")


def tumour_index(classes) -> int:
    """Index of the tumour class among ``classes`` (1 for an unnamed binary model)."""
    for i, c in enumerate(classes or ()):
        if str(c).lower() in TUMOUR_NAMES:
            return i
    if classes and len(classes) != 2:
        raise ValueError(f"no tumour class among {list(classes)}; name one of {TUMOUR_NAMES}")
    return 1


@dataclass(frozen=True)
class TumourParams:
    """Settings of the tumour map."""

    min_tissue: float = param(0.5, "tiles with at most this tissue fraction stay unscored",
                              min=0.0, max=1.0)  # fmt: skip
    stain_norm: str = param("auto", "Macenko stain normalisation: as the checkpoint was trained "
                            "(auto), always (on) or never (off)", choices=("auto", "on", "off"))  # fmt: skip

    def __post_init__(self) -> None:
        check(self, "tumour")

    def normalise(self, card) -> bool:
        """Whether to stain-normalise for a checkpoint with ``card``."""
        if self.stain_norm != "auto":
            return self.stain_norm == "on"
        trained_on = (getattr(card, "input_spec", None) or {}).get("stain_norm")
        return trained_on == "macenko"


@dataclass(frozen=True, kw_only=True)
class TumourMap(TileHeatmap):
    """Tumour probability per tissue tile (0-1; NaN on background and unscored tiles)."""

    name: str = "tumour probability"
    slide: Any = field(default=None, repr=False, compare=False)
    ood: Any = field(default=None, compare=False)  # OODReport: outside the training data?

    def to_layers(self) -> list:
        """The probability map over the slide: fades to transparent at 0, solid at 1."""
        from histoscope.results import HEATMAP_OPACITY, fading_colormap

        data, kwargs, kind = super().to_layers()[0]
        kwargs.update(contrast_limits=(0.0, 1.0), colormap=fading_colormap("inferno"),
                      opacity=HEATMAP_OPACITY)  # fmt: skip
        kwargs["metadata"]["colorbar"] = {"visible": True, "label": "tumour probability (0-1)"}
        return [(data, kwargs, kind)]

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        v = self.values[np.isfinite(self.values)]
        out["tumour_tiles"] = int((v >= 0.5).sum())
        out["tumour_fraction"] = float((v >= 0.5).mean()) if v.size else None
        out.update(edge_summary(self.provenance))
        if self.ood is not None:
            from histoscope.ood import ood_summary

            out.update(ood_summary(self.ood))
        return out

    def save(self, out_dir) -> list[Path]:
        """Write the map in every exchange format; return the paths.

        ``tumour_heatmap.tif`` / ``_tiles.csv`` / ``.json`` / ``_overview.png``,
        ``tumour_heatmap.ome.zarr`` (a folder: the pyramid placed in µm) and
        ``tumour_heatmap_tiles.h5ad`` (one row per tile, centres in µm).
        """
        from histoscope.export.heatmap import write_heatmap_outputs

        return write_heatmap_outputs(self, self.slide, out_dir, stem="tumour_heatmap",
                                     value="tumour_probability")  # fmt: skip


def _normalizer(session, params: TumourParams, card):
    if not params.normalise(card):
        return None
    tp = session.tissue_params
    return session.product("stain_fit", tp, lambda: fit_slide_stains(session.slide,
                                                                       session.tissue(tp)))  # fmt: skip


def _prob_model(model, spec, normalizer, target: int):
    """``model`` (stain-normalised when asked) returning the tumour class's probability."""
    import torch

    net = model if normalizer is None else StainNormalized(model, spec, normalizer)

    class _Prob(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x):
            return torch.softmax(self.net(x).float(), dim=1)[:, target]

    return _Prob()


def iter_heatmap(
    target, model, card=None, params: TumourParams | None = None, *,
    near: tuple[float, float] | None = None, engine: EngineParams | None = None,
) -> Generator[Step, bool | None, TumourMap]:  # fmt: skip
    """Score every tissue tile of a slide or session (nearest ``near`` first).

    Yields :class:`~histoscope.progress.Step` s whose ``partial`` is the map so
    far (its array fills in place, so a layer showing it updates live); send
    ``False`` to stop: the map keeps the tiles scored so far.
    """
    from histoscope.engine import iter_tiles
    from histoscope.session import open_session
    from histoscope.tissue import inside_slide, no_tiles_error, tissue_source

    p = params or TumourParams()
    session = open_session(target, in_memory=True)
    slide, spec = session.slide, model.input_spec
    if (yield Step(0, 0, "finding tissue")) is False:
        raise Cancelled("tumour map stopped before any tile was scored")
    full = session.grid(spec.mpp, spec.tile_size, p.min_tissue)
    grid = inside_slide(full, slide)  # tiles partly off the slide are not scored; counted
    edge = len(full) - len(grid)
    if len(grid) == 0:
        raise no_tiles_error(session, spec.mpp * spec.tile_size, p.min_tissue, "the tumour map",
                             edge)  # fmt: skip
    if p.normalise(card) and (yield Step(0, 0, "fitting stain normalisation")) is False:
        raise Cancelled("tumour map stopped before any tile was scored")
    normalizer = _normalizer(session, p, card)
    target_class = tumour_index(getattr(card, "classes", ()))
    prov = Provenance(
        task="tumour", slide=str(slide.path), checkpoint_sha256=getattr(card, "sha256", "") or "",
        params={**plain(p), "target_class": target_class,
                "stain_norm_applied": "macenko" if normalizer is not None else None,
                **tissue_source(session.tissue_params)},
        mpp=spec.mpp, tile_grid={**grid.to_dict(), "edge_tiles_not_scored": edge},
    )  # fmt: skip
    values = np.full(grid.shape, np.nan, np.float32)
    heat = TumourMap(provenance=prov, values=values, grid=grid, slide=slide)

    def on_batch(idx: np.ndarray, probs) -> None:
        values[grid.index[idx, 0], grid.index[idx, 1]] = np.asarray(probs, np.float32)

    if normalizer is None and _splits_into_backbone_and_head(model) and card is not None:
        # the session's feature table: MIL on the same backbone then reuses these tiles
        gen = session.iter_features(_backbone_features(session, model, card), grid, engine,
                                    near=near, on_batch=_head_probs(model, target_class, on_batch))  # fmt: skip
        table = yield from tagged(gen, "tumour tiles", lambda: heat)
        done = table.done if table.done is not None else np.ones(len(grid), bool)
        idx = np.flatnonzero(done)  # every tile, also when the table was read back whole
        _head_probs(model, target_class, on_batch)(idx, table.features[done])
        cancelled = not table.complete
        feats = table.features[done]  # scored against the training data below
    else:
        feats = None  # stain-normalised tiles: no feature table to compare
        net = _prob_model(model, spec, normalizer, target_class)
        out = yield from tagged(iter_tiles(net, slide, grid, spec, engine, near=near,
                                           on_batch=on_batch), "tumour tiles", lambda: heat)  # fmt: skip
        cancelled = out.cancelled
    # outside training data (issue 11): the tile features against the card's reference
    # (a cancelled map gets an unknown report saying so)
    from histoscope.ood import with_ood

    if cancelled:
        heat = replace(heat, provenance=replace(prov, cancelled=True))
    return with_ood(heat, card, feats, slide.path.name,
                    missing="not judged: stain normalisation on")  # fmt: skip


def _splits_into_backbone_and_head(model) -> bool:
    """A tile classifier whose logits are ``head(backbone(x))`` (dropout aside)."""
    return hasattr(model, "backbone") and hasattr(model, "head")


def _backbone_features(session, model, card):
    """The classifier's backbone as the session's feature model (the one MIL names, too)."""
    from histoscope.features import FeatureModel, feature_descriptor

    def make() -> FeatureModel:
        cfg = card.config or {}
        desc = feature_descriptor(cfg.get("backbone", ""), cfg.get("backbone_kwargs", {}),
                                  model.backbone, model.input_spec,
                                  checkpoint_sha256=card.sha256)  # fmt: skip
        return FeatureModel(model.backbone, model.input_spec, desc)

    return session.product("classifier_backbone", card.sha256, make)


def _head_probs(model, target: int, sink=None):
    """``(idx, features) -> probabilities`` of ``target`` from the classifier's head (on the CPU)."""
    import copy

    import torch

    head = copy.deepcopy(model.head).cpu().eval()

    def probs(idx: np.ndarray, feats) -> np.ndarray:
        with torch.inference_mode():
            logits = head(torch.as_tensor(np.asarray(feats, np.float32)))
            p = torch.softmax(logits.float(), dim=1)[:, target].numpy()
        if sink is not None:
            sink(idx, p)
        return p

    return probs


def _run(session, checkpoint, params: TumourParams, *, region=None, near=None, engine=None):
    model, card = checkpoint
    return (yield from iter_heatmap(session, model, card, params, near=near, engine=engine))


SPEC = register(TaskSpec(name="tumour", title="Tumour map", params=TumourParams, run=_run,
                         family="tile_classifier",
                         default_checkpoint="tumour_patch_default.safetensors",
                         needs=("tissue",)))  # fmt: skip


def fit_slide_stains(slide, tissue: TissueMask, mpp: float = 4.0):
    """Macenko normaliser fitted on a low-resolution read of the slide's tissue."""
    from histoscope.stains import MacenkoNormalizer

    h0, w0 = slide.shape
    f = mpp / slide.mpp
    rgb = slide.read_region(0, 0, max(1, int(w0 / f)), max(1, int(h0 / f)), mpp=mpp)
    from PIL import Image

    mask = np.asarray(
        Image.fromarray(tissue.mask).resize(rgb.shape[1::-1], Image.Resampling.NEAREST)
    )
    pixels = rgb[mask] if mask.any() else rgb.reshape(-1, 3)
    try:
        return MacenkoNormalizer.fit(pixels[None])
    except ValueError as exc:
        raise ValueError(f"{slide.path}: stain normalisation failed: {exc}") from exc


def StainNormalized(model, spec, normalizer):  # noqa: N802 - a module factory
    """Wrap ``model`` so normalised input tiles are stain-normalised first (on any device)."""
    import torch

    class _Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1))
            self.register_buffer("od", torch.from_numpy(normalizer.od_matrix))

        def forward(self, x):
            rgb = (x * self.std + self.mean).clamp(1 / 255, 1.0)
            od = -torch.log10(rgb)
            rgb = torch.pow(10.0, -torch.einsum("bchw,cd->bdhw", od, self.od)).clamp(0, 1)
            return self.model((rgb - self.mean) / self.std)

    return _Wrapped()


def tile_gradcam(slide, model, spec, x_um: float, y_um: float, grid=None, target: int = 1,
                 normalizer=None):  # fmt: skip
    """Grad-CAM of the tile under the world point ``(x_um, y_um)``.

    The map explains ``model`` on the input the heatmap gave it: the same tile
    of ``grid``, stain-normalised with ``normalizer`` when the map was, and on
    the device the model sits on.

    Returns ``(cam, (x0, y0))``: the ``(T, T)`` map and the tile's level-0
    top-left corner (on ``grid`` when given, else centred on the point).
    """
    import torch

    from histoscope.models.gradcam import grad_cam

    t = spec.tile_size
    f = spec.mpp / slide.mpp
    px, py = x_um / slide.mpp, y_um / slide.mpp
    if grid is not None:
        s = grid.stride
        x0, y0 = int(np.floor(px / s) * s), int(np.floor(py / s) * s)
    else:
        x0, y0 = int(px - t * f / 2), int(py - t * f / 2)
    rgb = slide.read_region(x0, y0, t, t, mpp=spec.mpp)
    net = model if normalizer is None else StainNormalized(model, spec, normalizer)
    dev = next(iter(model.parameters()), torch.zeros(())).device
    net = net.to(dev)
    x = torch.from_numpy(rgb).to(dev).permute(2, 0, 1)[None].float() / 255
    mean = torch.tensor(spec.mean, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=dev).view(1, 3, 1, 1)
    return grad_cam(net, (x - mean) / std, target).cpu().numpy(), (x0, y0)


@dataclass(frozen=True, kw_only=True)
class GradCamResult(Result):
    """Grad-CAM of one tile, placed over that tile.

    Attributes
    ----------
    cam
        ``(T, T)`` map in [0, 1].
    origin
        Level-0 ``(x, y)`` of the tile's top-left corner.
    mpp, slide_mpp
        µm per map pixel and per level-0 pixel.
    """

    cam: np.ndarray
    origin: tuple[int, int]
    mpp: float
    slide_mpp: float

    def to_layers(self) -> list:
        off = (self.mpp - self.slide_mpp) / 2
        x0, y0 = self.origin
        kwargs = {"name": "Grad-CAM", "scale": (self.mpp, self.mpp), "units": ("um", "um"),
                  "opacity": 0.5, "colormap": "turbo", "contrast_limits": (0, 1),
                  "translate": (y0 * self.slide_mpp + off, x0 * self.slide_mpp + off),
                  "metadata": {"histoscope": self.provenance.to_dict()}}  # fmt: skip
        return [(self.cam, kwargs, "image")]

    def summary(self) -> dict[str, Any]:
        iy, ix = np.unravel_index(int(np.argmax(self.cam)), self.cam.shape)
        f = self.mpp / self.slide_mpp
        return {"tile_x": int(self.origin[0]), "tile_y": int(self.origin[1]),
                "peak_x": float(self.origin[0] + (ix + 0.5) * f),
                "peak_y": float(self.origin[1] + (iy + 0.5) * f)}  # fmt: skip

    def save(self, out_dir) -> list[Path]:
        from histoscope.results import write_npy

        out = Path(out_dir)
        return [write_npy(out / "gradcam.npy", self.cam),
                self._write_provenance(out, "gradcam.provenance.json")]  # fmt: skip


def _run_gradcam(session, checkpoint, params: TumourParams, *, region=None, near=None,
                 engine=None):  # fmt: skip
    model, card = checkpoint
    spec, slide = model.input_spec, session.slide
    yield Step(0, 1, "Grad-CAM")
    grid = session.grid(spec.mpp, spec.tile_size, params.min_tissue)
    normalizer = _normalizer(session, params, card)
    target = tumour_index(getattr(card, "classes", ()))
    x_um, y_um = (near[0] + 0.5) * slide.mpp, (near[1] + 0.5) * slide.mpp
    cam, origin = tile_gradcam(slide, model, spec, x_um, y_um, grid, target, normalizer)
    prov = Provenance(task="gradcam", slide=str(slide.path),
                      checkpoint_sha256=getattr(card, "sha256", "") or "",
                      params={**plain(params), "point": list(near), "target_class": target,
                              "stain_norm_applied": "macenko" if normalizer else None},
                      mpp=spec.mpp)  # fmt: skip
    yield Step(1, 1, "Grad-CAM")
    return GradCamResult(provenance=prov, cam=cam, origin=origin, mpp=spec.mpp,
                         slide_mpp=float(slide.mpp))  # fmt: skip


GRADCAM = register(TaskSpec(name="gradcam", title="Grad-CAM of a tile", params=TumourParams,
                            run=_run_gradcam, family="tile_classifier",
                            default_checkpoint="tumour_patch_default.safetensors",
                            needs=("tissue",), needs_point=True))  # fmt: skip
