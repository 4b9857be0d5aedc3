"""Cell types of a slide's nuclei with a NuClass checkpoint (fast tile path or reference crops).

Two ways to run the same weights (see :mod:`histoscope.models.nuclass`):

``"crops"`` (the reference)
    per cell one 1024 px read at the card's µm/px: its central 224 px is the
    local crop, the whole read averaged 2 x 2 to 512 px is the context.
``"fast"``
    the cells are grouped by tiles of ``TILE`` px; per tile one read of the box
    around its cells with a margin: one local trunk pass over the box (plus the
    local margin) and one context trunk pass over it plus the context margin,
    every nucleus pooled from the two feature maps with RoIAlign. Boxes start on
    the trunks' stride lattice, so a cell's answer does not depend on the other
    cells of the call. Tiles run in spatial order, one at a time, so memory does
    not grow with the slide.

The held-out comparison of the two (``training/nuclass.md``) is what makes
``"fast"`` the default.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from histoscope.errors import HistoScopeError

if TYPE_CHECKING:
    from histoscope.checkpoints import ModelCard

PATHS = ("fast", "crops")
#: Core tile edge of the fast path, in pixels at the card's µm/px.
TILE = 2048


class CellTypesError(HistoScopeError, ValueError):
    """Bad input to cell typing: mismatched coordinates, unknown path, wrong checkpoint."""


@dataclass
class CellTypes:
    """Per-cell NuClass output, rows in the order of the cells asked for.

    Attributes
    ----------
    classes
        Class names, column order of the probabilities.
    prob
        ``(n, C)`` fused probabilities (after the fused temperature).
    p_local, p_global
        ``(n, C)`` each path's probabilities.
    g
        ``(n,)`` gate weight of the global path.
    index
        ``(n,)`` position of each row in the input coordinates (default ``0..n-1``).
    """

    classes: tuple[str, ...]
    prob: np.ndarray
    p_local: np.ndarray
    p_global: np.ndarray
    g: np.ndarray
    index: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.index is None:  # rows are the input cells in order
            self.index = np.arange(len(self.g), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.g)

    @property
    def pred(self) -> np.ndarray:
        """Fused class index per cell."""
        return self.prob.argmax(1)

    @property
    def confidence(self) -> np.ndarray:
        """Largest fused probability per cell."""
        return self.prob.max(1)

    @property
    def local_pred(self) -> np.ndarray:
        return self.p_local.argmax(1)

    @property
    def global_pred(self) -> np.ndarray:
        return self.p_global.argmax(1)

    @classmethod
    def empty(cls, classes: Sequence[str]) -> CellTypes:
        c = len(classes)
        z = np.zeros((0, c), np.float32)
        return cls(tuple(classes), z, z.copy(), z.copy(), np.zeros(0, np.float32),
                   np.zeros(0, np.int64))  # fmt: skip

    @classmethod
    def concat(cls, parts: Sequence[CellTypes]) -> CellTypes:
        """Rows of ``parts`` one after the other (all with the same classes)."""
        if not parts:
            raise CellTypesError("CellTypes.concat needs at least one part")
        classes = parts[0].classes
        if any(p.classes != classes for p in parts):
            raise CellTypesError("CellTypes.concat: parts have different classes")
        return cls(classes, *(np.concatenate([getattr(p, k) for p in parts])
                              for k in ("prob", "p_local", "p_global", "g", "index")))  # fmt: skip

    def subset(self, keep) -> CellTypes:
        """Rows selected by a boolean mask or integer indices."""
        return CellTypes(self.classes, self.prob[keep], self.p_local[keep], self.p_global[keep],
                         self.g[keep], self.index[keep])  # fmt: skip

    def sorted(self) -> CellTypes:
        """Rows in input order."""
        return self.subset(np.argsort(self.index, kind="stable"))


# ------------------------------------------------------------------ geometry
@dataclass(frozen=True)
class _Geometry:
    mpp: float  # local µm/px (the card's)
    crop: int  # local crop px (224)
    read: int  # context read px at the local µm/px (1024)
    local_margin: int  # fast path: local px around a tile
    context_margin: int  # fast path: local px of context around a tile (even)
    lattice: int  # fast path: boxes start on multiples of this (both trunks' strides)


def _geometry(model, card: ModelCard) -> _Geometry:
    lc, cc = model.config["local"], model.config["context"]
    mpp = float(lc["mpp"])
    ratio = float(cc["mpp"]) / mpp
    if abs(ratio - 2.0) > 1e-6:
        raise CellTypesError(f"checkpoint {card.sha256[:12]}: context µm/px must be twice the "
                             f"local one, got {cc['mpp']} and {mpp}")  # fmt: skip
    reach_l = model.local_trunk.stride * 2 + 8
    local_margin = int(np.ceil(float(lc["box_um"]) / mpp / 2)) + reach_l
    reach_c = model.context_trunk.stride * 2 + 8
    half_box = max(float(b) for b in cc["boxes_um"]) / mpp / 2
    context_margin = int(np.ceil((half_box + 2 * reach_c) / 2)) * 2
    lattice = math.lcm(model.local_trunk.stride, 2 * model.context_trunk.stride)
    return _Geometry(mpp, int(lc["crop"]), int(cc["read"]), local_margin, context_margin, lattice)


def _check(model, card, x, y, path) -> tuple[np.ndarray, np.ndarray]:
    if card.family != "nuclass":
        raise CellTypesError(
            f"cell typing needs a 'nuclass' checkpoint, got family {card.family!r}"
        )
    if path not in PATHS:
        raise CellTypesError(f"path must be one of {', '.join(PATHS)}, got {path!r}")
    x = np.asarray(x, np.float64).ravel()
    y = np.asarray(y, np.float64).ravel()
    if x.shape != y.shape:
        raise CellTypesError(f"x and y must have the same length, got {x.size} and {y.size}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise CellTypesError("cell coordinates must be finite numbers")
    return x, y


def _from_heads(out: dict, classes, index) -> CellTypes:
    return CellTypes(tuple(classes), out["prob"].numpy().astype(np.float32),
                     out["p_local"].numpy().astype(np.float32),
                     out["p_global"].numpy().astype(np.float32),
                     out["g"].numpy().astype(np.float32), np.asarray(index, np.int64))  # fmt: skip


def _read(slide, x0: int, y0: int, size: int, mpp: float) -> np.ndarray:
    return np.ascontiguousarray(slide.read_region(int(x0), int(y0), size, size, mpp=mpp)[..., :3])


# ------------------------------------------------------------------ crop path
def crops_for(
    slide, x: float, y: float, geo: _Geometry
) -> tuple[np.ndarray, np.ndarray, tuple, tuple]:
    """One cell's local crop, context crop and its position ``(x, y)`` in each."""
    from histoscope.training.nuclass_data import mean2

    f = geo.mpp / float(slide.mpp)
    h = geo.read // 2
    x0, y0 = int(round(x - h * f)), int(round(y - h * f))
    big = _read(slide, x0, y0, geo.read, geo.mpp)
    u, v = (x + 0.5 - x0) / f, (y + 0.5 - y0) / f
    off = h - geo.crop // 2
    local = big[off : off + geo.crop, off : off + geo.crop]
    return local, mean2(big), (u - off, v - off), (u / 2, v / 2)


def _classify_crops(slide, x, y, model, tissue, geo, batch, order):
    import torch

    for s in range(0, len(order), batch):
        sel = order[s : s + batch]
        parts = [crops_for(slide, x[i], y[i], geo) for i in sel]
        loc = model.normalise(torch.from_numpy(np.stack([p[0] for p in parts])))
        ctx = model.normalise(torch.from_numpy(np.stack([p[1] for p in parts])))
        lxy = torch.tensor([p[2] for p in parts], dtype=torch.float32)
        cxy = torch.tensor([p[3] for p in parts], dtype=torch.float32)
        t = torch.full((len(sel),), tissue, dtype=torch.long)
        with torch.no_grad():
            out = model(loc, ctx, t, lxy, cxy)
        yield _from_heads(out, model.classes, sel)


# ------------------------------------------------------------------ fast path
def tile_order(x: np.ndarray, y: np.ndarray, tile_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Cells grouped by tile in row-major spatial order: ``(order, tile starts)``."""
    if len(x) == 0:
        return np.zeros(0, np.int64), np.zeros(1, np.int64)
    tx = np.floor(x / tile_px).astype(np.int64)
    ty = np.floor(y / tile_px).astype(np.int64)
    key = (ty - ty.min()) * (tx.max() - tx.min() + 1) + (tx - tx.min())
    order = np.argsort(key, kind="stable")
    k = key[order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    return order, np.r_[starts, len(order)]


def _span(u: np.ndarray, lat: int) -> tuple[float, int]:
    """Start (on the lattice) and length of the box around one tile's cells along one axis.

    Cells spread over more than half the tile get the whole tile, so a dense slide runs
    tiles of one size (and the allocator reuses their memory); sparse ones get their box.
    """
    if u.max() - u.min() > TILE / 2:
        return TILE * np.floor(u[0] / TILE), TILE
    b0 = lat * np.floor(u.min() / lat)
    return b0, int(np.ceil(u.max() - b0)) + 1


def _classify_tile(slide, x, y, sel, model, tissue, geo):
    """One trunk pass each over the box around the cells ``sel`` (plus margins), pooled at each."""
    import torch

    from histoscope.training.nuclass_data import mean2

    f = geo.mpp / float(slide.mpp)
    mc, ml, lat = geo.context_margin, geo.local_margin, geo.lattice
    ux, uy = x[sel] / f, y[sel] / f  # cells in pixels at the model's µm/px
    # the box starts on the trunks' stride lattice, so a cell's features do not depend on
    # which other cells share its call (a detector tile, a whole tile of ours)
    bx0, w = _span(ux, lat)
    by0, h = _span(uy, lat)
    big_w, big_h = (w + 2 * mc + 1) // 2 * 2, (h + 2 * mc + 1) // 2 * 2
    x0, y0 = int(round((bx0 - mc) * f)), int(round((by0 - mc) * f))
    big = np.ascontiguousarray(slide.read_region(x0, y0, big_w, big_h, mpp=geo.mpp)[..., :3])
    o = mc - ml
    local = big[o : o + h + 2 * ml, o : o + w + 2 * ml]
    u = ((x[sel] + 0.5 - x0) / f).astype(np.float32)
    v = ((y[sel] + 0.5 - y0) / f).astype(np.float32)
    idx = torch.zeros(len(sel), dtype=torch.long)
    t = torch.full((len(sel),), tissue, dtype=torch.long)
    with torch.no_grad():
        lmap = model.local_map(model.normalise(torch.from_numpy(np.ascontiguousarray(local)[None])))
        raw_l = model.pool_local(lmap, idx, torch.from_numpy(np.stack([u - o, v - o], 1)))
        del lmap
        cmap = model.context_map(model.normalise(torch.from_numpy(mean2(big)[None])))
        raw_c = model.pool_context(cmap, idx, torch.from_numpy(np.stack([u / 2, v / 2], 1)))
        out = model.heads(raw_l, raw_c, t)
    return _from_heads(out, model.classes, sel)


def iter_classify(
    slide,
    x,
    y,
    model,
    card: ModelCard,
    *,
    path: str = "fast",
    organ: str | None = None,
    batch: int = 256,
) -> Generator[tuple[int, int, CellTypes], bool | None, CellTypes]:
    """Type the cells at level-0 centroids ``x``, ``y``, yielding as tiles or batches finish.

    Parameters
    ----------
    slide
        A :class:`histoscope.slide.Slide` (read at the card's µm/px).
    x, y
        Level-0 pixel centroids.
    model, card
        A loaded ``nuclass`` checkpoint.
    path
        ``"fast"`` (tile pass + RoIAlign) or ``"crops"`` (one crop pair per cell).
    organ
        Organ token for FiLM; ``None`` (default) uses "unknown".
    batch
        Cells per batch on the crop path.

    Yields
    ------
    tuple
        ``(done, total, types)``: ``types`` are the cells just finished, with
        ``types.index`` their positions in the input. Send ``False`` to stop.

    Returns
    -------
    CellTypes
        All cells in input order, or after a stop the cells finished so far
        (in input order, ``index`` saying which).
    """
    import torch

    x, y = _check(model, card, x, y, path)
    geo = _geometry(model, card)
    if batch < 1:
        raise CellTypesError(f"batch must be at least 1, got {batch}")
    model.eval()
    tissue = model.tissue_index(organ)
    n = len(x)
    parts: list[CellTypes] = []
    done = 0
    threads = torch.get_num_threads()
    try:
        if path == "crops":
            order = np.arange(n)
            gen = _classify_crops(slide, x, y, model, tissue, geo, batch, order)
        else:
            tile_px = TILE * geo.mpp / float(slide.mpp)
            order, starts = tile_order(x, y, tile_px)
            gen = (_classify_tile(slide, x, y, order[a:b], model, tissue, geo)
                   for a, b in zip(starts[:-1], starts[1:], strict=True))  # fmt: skip
        for part in gen:
            parts.append(part)
            done += len(part)
            if (yield done, n, part) is False:
                break
    finally:
        torch.set_num_threads(threads)
    if not parts:
        return CellTypes.empty(model.classes)
    return CellTypes.concat(parts).sorted()


def classify(slide, x, y, model, card, **kw: Any) -> CellTypes:
    """:func:`iter_classify` run to the end."""
    from histoscope.progress import drive

    return drive(iter_classify(slide, x, y, model, card, **kw))


# ------------------------------------------------------------------ explain
def explain_cell(
    slide,
    x: float,
    y: float,
    model,
    card: ModelCard,
    *,
    organ: str | None = None,
    target: int | None = None,
) -> dict:
    """A cell's crops, Grad-CAM of each path for a class, probabilities and gate.

    ``target`` is the class index the Grad-CAM explains (e.g. the class a
    panel shows for the cell); default: the crop path's own fused class.
    ``pred`` is always the crop path's own call.

    Returns
    -------
    dict
        ``local`` (224 px uint8 RGB), ``context`` (512 px), ``local_cam`` and
        ``context_cam`` (float 0..1, same sizes), ``classes``, ``prob``,
        ``p_local``, ``p_global``, ``g``, ``pred`` (class name).
    """
    import torch
    from torch import nn

    from histoscope.models.gradcam import grad_cam

    xs, ys = _check(model, card, [x], [y], "crops")
    geo = _geometry(model, card)
    model.eval()
    local, ctx, lxy, cxy = crops_for(slide, float(xs[0]), float(ys[0]), geo)
    tissue = torch.tensor([model.tissue_index(organ)])
    lt = model.normalise(torch.from_numpy(np.ascontiguousarray(local)[None]))
    ct = model.normalise(torch.from_numpy(ctx[None]))
    lxy_t, cxy_t = (
        torch.tensor([lxy], dtype=torch.float32),
        torch.tensor([cxy], dtype=torch.float32),
    )
    with torch.no_grad():
        out = model(lt, ct, tissue, lxy_t, cxy_t)
        _, f_l = model.local_logits(
            model.pool_local(model.local_map(lt), torch.zeros(1, dtype=torch.long), lxy_t), tissue
        )
    own = int(out["prob"].argmax(1))
    if target is None:
        target = own
    elif not 0 <= int(target) < len(model.classes):
        raise CellTypesError(
            f"target class {target} is not one of the {len(model.classes)} classes"
        )
    target = int(target)

    class LocalLogits(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = model.local_trunk

        def forward(self, img):
            raw = model.pool_local(self.trunk(img), torch.zeros(1, dtype=torch.long), lxy_t)
            return model.local_logits(raw, tissue)[0]

    class GlobalLogits(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = model.context_trunk

        def forward(self, img):
            raw = model.pool_context(self.trunk(img), torch.zeros(1, dtype=torch.long), cxy_t)
            return model.global_logits(f_l, raw)[0]

    lw, gw = LocalLogits(), GlobalLogits()
    cam_l = grad_cam(lw, lt, target, layer=model.local_trunk.layers)
    cam_c = grad_cam(gw, ct, target, layer=model.context_trunk.layers)
    return {
        "local": np.ascontiguousarray(local), "context": ctx,
        "local_cam": cam_l.numpy().astype(np.float32), "context_cam": cam_c.numpy().astype(np.float32),
        "classes": model.classes, "prob": out["prob"][0].numpy(), "p_local": out["p_local"][0].numpy(),
        "p_global": out["p_global"][0].numpy(), "g": float(out["g"][0]), "pred": model.classes[own],
        "target": model.classes[target],
    }  # fmt: skip
