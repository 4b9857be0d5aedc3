"""Samplers: what the inference engine reads from a slide, in what order, and how.

A sampler is a list of items placed on the slide in level-0 pixels. It knows
its length, the level-0 ``coords`` of each item, the order to process them in
(raster, or nearest to a level-0 point first) and how to read a batch of them
into ``(B, H, W, 3)`` uint8 tensors. :func:`histoscope.engine.iter_samples`
runs a model over any sampler.

- :class:`GridSampler` reads the tiles of a :class:`~histoscope.tissue.TileGrid`
  (horizontally adjacent tiles as one strip).
- :class:`PointSampler` reads, for each point (a cell centroid, say), one
  square crop per :class:`View` centred on it. A batch of nearby points is
  read with one :meth:`Slide.read_region` per view (a few when the points
  spread too far) and the crops are cut from it; each crop equals what its
  own ``read_region`` would return, pixel for pixel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from histoscope.errors import SlideError

if TYPE_CHECKING:
    import torch

    from histoscope.slide import Slide
    from histoscope.tissue import TileGrid

#: Most level pixels one read of a point batch may cover; larger boxes are split.
MAX_READ_PIXELS = 1 << 24


class Sampler(Protocol):
    """What :func:`histoscope.engine.iter_samples` runs over."""

    def __len__(self) -> int: ...

    @property
    def coords(self) -> np.ndarray:
        """``(N, 2)`` level-0 ``(x, y)`` of each item."""
        ...

    def order(self, near: tuple[float, float] | None = None) -> np.ndarray:
        """Item indices in processing order (nearest to level-0 ``near`` first)."""
        ...

    def read(
        self, slide: Slide, idx: np.ndarray, pin: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Items ``idx`` as ``(B, H, W, 3)`` uint8 tensors, one per view (pinned if asked)."""
        ...


def _buffer(n: int, size: int, pin: bool, width: int | None = None) -> torch.Tensor:
    import torch

    buf = torch.empty((n, size, width or size, 3), dtype=torch.uint8)
    return buf.pin_memory() if pin else buf


# ------------------------------------------------------------------------ grid
def tile_order(grid: TileGrid, near: tuple[float, float] | None = None) -> np.ndarray:
    """Processing order: raster, or by distance of tile centres to level-0 ``(x, y)``."""
    if near is None or len(grid) == 0:
        return np.arange(len(grid))
    centres = grid.coords + grid.stride / 2
    d2 = ((centres - np.asarray(near, dtype=np.float64)) ** 2).sum(axis=1)
    return np.argsort(d2, kind="stable")


@dataclass(frozen=True)
class GridSampler:
    """The tiles of a :class:`~histoscope.tissue.TileGrid`; ``coords`` are top-left corners."""

    grid: TileGrid

    def __len__(self) -> int:
        return len(self.grid)

    @property
    def coords(self) -> np.ndarray:
        return self.grid.coords

    def order(self, near: tuple[float, float] | None = None) -> np.ndarray:
        return tile_order(self.grid, near)

    def _runs(self, idx: np.ndarray) -> list[tuple[int, int]]:
        """Split ``idx`` into ``(start, stop)`` runs of horizontally adjacent tiles."""
        grid = self.grid
        if abs(grid.stride - round(grid.stride)) > 1e-9:
            return [(j, j + 1) for j in range(len(idx))]  # strips would shift tiles by a fraction
        rows, cols = grid.index[idx, 0], grid.index[idx, 1]
        breaks = np.flatnonzero((rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1] + 1)) + 1
        edges = [0, *breaks.tolist(), len(idx)]
        return list(zip(edges[:-1], edges[1:], strict=True))

    def read(self, slide: Slide, idx: np.ndarray, pin: bool = False) -> torch.Tensor:
        """Read tiles ``idx`` into a ``(B, T, T, 3)`` uint8 tensor.

        Horizontally adjacent tiles are read as one strip, so file tiles they
        share are decoded once; a strip is never longer than the batch.
        """
        t = self.grid.tile_size
        buf = _buffer(len(idx), t, pin)
        arr = buf.numpy()
        for a, b in self._runs(idx):
            x, y = self.grid.coords[idx[a]]
            strip = slide.read_region(int(x), int(y), t * (b - a), t, mpp=self.grid.mpp)
            arr[a:b] = strip.reshape(t, b - a, t, 3).transpose(1, 0, 2, 3)
        return buf


# ---------------------------------------------------------------------- points
@dataclass(frozen=True)
class View:
    """One crop per point: ``size`` px at ``mpp`` µm/px, resized to ``out_size`` if given.

    Attributes
    ----------
    size
        Crop edge in pixels at ``mpp``.
    mpp
        µm/px the crop is read at.
    out_size
        Edge after :func:`resize_crop`, or ``None`` to keep ``size``.
    """

    size: int
    mpp: float
    out_size: int | None = None

    def __post_init__(self) -> None:
        if int(self.size) != self.size or self.size <= 0 or not self.mpp > 0:
            raise ValueError(f"a view needs a positive size and mpp, got {self.size}, {self.mpp}")
        if self.out_size is not None and (
            int(self.out_size) != self.out_size or self.out_size <= 0
        ):
            raise ValueError(f"out_size must be a positive integer, got {self.out_size}")

    @property
    def out(self) -> int:
        """Edge of the crop the model receives."""
        return self.out_size or self.size

    @property
    def reduce(self) -> int:
        """Whole shrink factor ``size / out_size`` (1 when there is none)."""
        if self.out_size is None or self.size % self.out_size:
            return 1
        return self.size // self.out_size

    def step(self, slide_mpp: float) -> int:
        """Level-0 lattice the crop origins snap to (see :meth:`PointSampler.origins`)."""
        fr = self.mpp / slide_mpp * self.reduce
        return max(int(round(fr)), 1) if abs(fr - round(fr)) < 1e-9 else 1


def resize_crop(crop: np.ndarray, out_size: int | None) -> np.ndarray:
    """Resize a square crop to ``out_size``: the one resize a :class:`View` applies.

    A whole shrink factor is an exact block mean (:meth:`PIL.Image.Image.reduce`);
    other sizes use a box filter to shrink and bilinear to enlarge.
    """
    size = crop.shape[0]
    if out_size is None or out_size == size:
        return crop
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(crop))
    if size % out_size == 0:
        return np.asarray(img.reduce(size // out_size))
    resample = Image.Resampling.BOX if out_size < size else Image.Resampling.BILINEAR
    return np.asarray(img.resize((out_size, out_size), resample=resample))


def hilbert_index(ix: np.ndarray, iy: np.ndarray) -> np.ndarray:
    """Position of non-negative integer cells ``(ix, iy)`` along a Hilbert curve."""
    x, y = np.asarray(ix, np.int64).copy(), np.asarray(iy, np.int64).copy()
    top = int(max(x.max(initial=0), y.max(initial=0)))
    n = 1 << max(top.bit_length(), 1)
    d = np.zeros(x.shape, np.int64)
    s = n // 2
    while s > 0:
        rx, ry = (x & s) > 0, (y & s) > 0
        d += s * s * ((3 * rx) ^ ry)
        flip = ~ry & rx
        x, y = np.where(flip, n - 1 - x, x), np.where(flip, n - 1 - y, y)
        x, y = np.where(ry, x, y), np.where(ry, y, x)  # swap where ry == 0
        s //= 2
    return d


class PointSampler:
    """Crops centred on level-0 points, one per :class:`View` for each point.

    With one view the engine hands the model a ``(B, 3, S, S)`` tensor; with
    several, a tuple of them in view order.

    Parameters
    ----------
    points
        ``(N, 2)`` level-0 ``(x, y)`` centres (cell centroids, say).
    views
        One :class:`View` or a sequence of them.
    cell
        Level-0 size of the squares the ``near`` order ranks (nearest square
        first); within a square, and without ``near``, points follow a
        Hilbert curve, so each batch holds neighbours that one read covers.
    max_read_pixels
        A batch whose crops span more level pixels than this (or more than
        twice their own area) is read as several smaller boxes.
    """

    def __init__(
        self,
        points: np.ndarray,
        views: View | tuple[View, ...] | list[View],
        *,
        cell: int = 512,
        max_read_pixels: int = MAX_READ_PIXELS,
    ) -> None:
        pts = np.asarray(points, dtype=np.float64)
        if pts.size == 0:
            pts = pts.reshape(0, 2)
        if pts.ndim != 2 or pts.shape[1] != 2 or not np.isfinite(pts).all():
            raise ValueError(f"points must be a finite (N, 2) array of (x, y), got {pts.shape}")
        views = (views,) if isinstance(views, View) else tuple(views)
        if not views or not all(isinstance(v, View) for v in views):
            raise ValueError("views must be one or more View(size, mpp, out_size)")
        if cell < 8:
            raise ValueError(f"cell must be at least 8 level-0 px, got {cell}")
        self.points, self.views = pts, views
        self.cell, self.max_read_pixels = int(cell), int(max_read_pixels)

    def __len__(self) -> int:
        return len(self.points)

    @property
    def coords(self) -> np.ndarray:
        """``(N, 2)`` level-0 ``(x, y)`` centres."""
        return self.points

    def order(self, near: tuple[float, float] | None = None) -> np.ndarray:
        """Hilbert order, or squares of ``cell`` px nearest to ``near`` first."""
        if len(self) == 0:
            return np.arange(0)
        fine = self.cell / 8  # a cell is an aligned 8 x 8 block of the curve
        base = np.floor(self.points.min(axis=0) / self.cell) * self.cell
        ij = np.floor((self.points - base) / fine).astype(np.int64)
        curve = hilbert_index(ij[:, 0], ij[:, 1])
        if near is None:
            return np.argsort(curve, kind="stable")
        centres = (np.floor(self.points / self.cell) + 0.5) * self.cell
        d2 = ((centres - np.asarray(near, dtype=np.float64)) ** 2).sum(axis=1)
        return np.lexsort((curve, d2))

    def origins(self, view: View, slide_mpp: float, idx: np.ndarray | None = None) -> np.ndarray:
        """Level-0 top-left corners ``(x, y)`` of the crops of ``view``.

        With ``f = view.mpp / slide_mpp``, the crop of a point ``c`` is
        ``slide.read_region(ox, oy, size, size, mpp=view.mpp)`` (then
        :func:`resize_crop` to ``out_size``), where ``(ox, oy)`` is the
        multiple of ``q = view.step(slide_mpp)`` nearest to ``c - size * f / 2``
        (half-way cases to even). ``q`` is ``f * r`` (``r`` the whole shrink
        factor ``size / out_size``, else 1) when that is a whole number, else
        1: crops then share one output-pixel lattice, so a batch's crops are
        slices of one read and of one shared reduction. A crop's centre stays
        within half an output pixel of its point.
        """
        pts = self.points if idx is None else self.points[idx]
        f = view.mpp / slide_mpp
        q = view.step(slide_mpp)
        return (np.round((pts - view.size * f / 2) / q) * q).astype(np.int64)

    def read(
        self, slide: Slide, idx: np.ndarray, pin: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Crops of points ``idx``: a ``(B, S, S, 3)`` uint8 tensor per view."""
        if not slide.mpp:
            raise SlideError(f"{slide.path}: crops at a given µm/px need the slide's µm/px")
        out = []
        for view in self.views:
            origins = self.origins(view, slide.mpp, idx)
            out.append(_read_view(slide, origins, view, pin, self.max_read_pixels))
        return out[0] if len(out) == 1 else tuple(out)


@dataclass(frozen=True)
class _Plan:
    """Where each crop lies in the level ``read_region`` would read it from.

    Every number is computed exactly as :meth:`Slide.read_region` computes it,
    so cutting a crop from a larger read of that level gives the same pixels.
    """

    level: int
    ds: float
    scale: float
    lo: np.ndarray  # (B, 2) float level (x, y) of each crop's corner
    hi: np.ndarray  # (B, 2) float level (x, y) of its far corner
    i0: np.ndarray  # (B, 2) int level pixels read: [i0, i1)
    i1: np.ndarray
    direct: np.ndarray  # (B,) bool: a plain slice, no resampling

    @classmethod
    def make(cls, slide: Slide, origins: np.ndarray, size: int, mpp: float) -> _Plan:
        factor = mpp / slide.mpp
        level = slide.best_level(factor)
        ds = slide.level_downsamples[level]
        scale = factor / ds
        lo = origins / ds
        hi = lo + size * scale
        i0, i1 = np.floor(lo).astype(np.int64), np.ceil(hi).astype(np.int64)
        direct = (abs(scale - 1.0) < 1e-6) & (i0 == lo).all(axis=1)
        return cls(level, ds, scale, lo, hi, i0, i1, direct)


def _clusters(plan: _Plan, sel: np.ndarray, cap: int) -> list[np.ndarray]:
    """Split crops ``sel`` into groups whose level bounding box is worth one read."""
    x0, y0 = plan.i0[sel].min(axis=0)
    x1, y1 = plan.i1[sel].max(axis=0)
    area = int(x1 - x0) * int(y1 - y0)
    own = int(np.prod(plan.i1[sel] - plan.i0[sel], axis=1).sum())
    if len(sel) == 1 or (area <= cap and area <= 2 * own):
        return [sel]
    axis = 0 if x1 - x0 >= y1 - y0 else 1
    order = sel[np.argsort(plan.i0[sel, axis], kind="stable")]
    half = len(order) // 2
    return _clusters(plan, order[:half], cap) + _clusters(plan, order[half:], cap)


def _level0(v: int, ds: float) -> float | None:
    """A level-0 coordinate that ``read_region`` maps exactly onto level pixel ``v``."""
    c = float(v) * ds
    for cand in (c, float(np.nextafter(c, np.inf)), float(np.nextafter(c, -np.inf))):
        if cand / ds == v:
            return cand
    return None


def _read_view(slide: Slide, origins: np.ndarray, view: View, pin: bool, cap: int) -> torch.Tensor:
    """One view's crops for a batch: ``(B, out, out, 3)`` uint8 tensor."""
    buf = _buffer(len(origins), view.out, pin)
    if len(origins) == 0:
        return buf
    arr = buf.numpy()
    plan = _Plan.make(slide, origins, view.size, view.mpp)
    for sel in _clusters(plan, np.arange(len(origins)), cap):
        b0, b1 = plan.i0[sel].min(axis=0), plan.i1[sel].max(axis=0)
        x, y = _level0(int(b0[0]), plan.ds), _level0(int(b0[1]), plan.ds)
        if x is None or y is None:  # no level-0 corner lands exactly: read crop by crop
            for j in sel:
                ox, oy = (int(v) for v in origins[j])
                crop = slide.read_region(ox, oy, view.size, view.size, mpp=view.mpp)
                arr[j] = resize_crop(crop, view.out_size)
            continue
        w, h = (int(v) for v in b1 - b0)
        box = slide.read_region(x, y, w, h, level=plan.level)
        _cut(box, b0, plan, sel, view, arr)
    return buf


def _cut(box: np.ndarray, b0: np.ndarray, plan: _Plan, sel: np.ndarray, view: View, arr) -> None:
    """Cut crops ``sel`` from ``box`` (level pixels from ``b0``) into ``arr``."""
    r, size = view.reduce, view.size
    rel = plan.i0[sel] - b0
    if r > 1 and plan.direct[sel].all() and not (rel % r).any():
        from PIL import Image  # one block mean for the whole box, then slices

        small = np.asarray(Image.fromarray(box).reduce(r))
        for j, (x, y) in zip(sel, rel // r, strict=True):
            arr[j] = small[y : y + view.out, x : x + view.out]
        return
    for j, (x, y) in zip(sel, rel, strict=True):
        if plan.direct[j]:
            crop = box[y : y + size, x : x + size]
        else:
            crop = _resample(box, b0, plan, j, size)
        arr[j] = resize_crop(crop, view.out_size)


def _resample(box: np.ndarray, b0: np.ndarray, plan: _Plan, j: int, size: int) -> np.ndarray:
    """Crop ``j`` resampled from its level pixels, as :meth:`Slide.read_region` does."""
    from PIL import Image

    (x0, y0), (x1, y1) = plan.i0[j], plan.i1[j]
    region = box[y0 - b0[1] : y1 - b0[1], x0 - b0[0] : x1 - b0[0]]
    (lx0, ly0), (lx1, ly1) = plan.lo[j], plan.hi[j]
    crop_box = (lx0 - x0, ly0 - y0, lx1 - x0, ly1 - y0)
    resample = Image.Resampling.BOX if plan.scale > 1 else Image.Resampling.BILINEAR
    img = Image.fromarray(np.ascontiguousarray(region))
    return np.asarray(img.resize((size, size), resample=resample, box=crop_box))
