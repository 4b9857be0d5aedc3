"""Tissue detection and the tile grid.

The mask is computed on a low-resolution read of the slide (saturation or
inverted grey -> Gaussian blur -> Otsu -> holes filled -> small objects
removed), and the tile grid keeps the tiles, at a target µm/px and tile size,
whose footprint is covered by tissue above a fraction. Coordinates leave this
module in level-0 pixels, as everywhere in HistoScope.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from histoscope.errors import SlideError
from histoscope.params import ParamError, check, param

if TYPE_CHECKING:
    from histoscope.slide import Slide


@dataclass(frozen=True)
class TissueParams:
    """Settings of :func:`tissue_mask`.

    Attributes
    ----------
    mpp
        µm/px of the low-resolution read the mask is computed on.
    channel
        ``"saturation"`` (robust to pale H&E and to grey pen/dust) or
        ``"grey"`` (inverted luminance, for IHC with weak colour).
    blur_um
        Gaussian sigma in µm before thresholding.
    min_threshold
        Floor on the Otsu threshold (0-1 scale), so a blank slide gives an
        empty mask instead of thresholding noise.
    fill_holes
        Fill enclosed holes (lumens, fat) inside tissue.
    min_area_um2
        Remove tissue pieces smaller than this.
    background_margin
        When set, the threshold is at most the glass level (the 2nd
        percentile of the blurred channel) plus this margin. Otsu splits the
        two largest populations; on a slide that is mostly tissue those are
        dense and pale tissue, and the pale half (counterstain-only IHC
        stroma, say) would be dropped. ``None`` keeps Otsu alone.
    """

    mpp: float = param(
        8.0, "µm/px of the low-resolution read the mask is computed on", min=1e-3, max=1024.0
    )
    channel: Literal["saturation", "grey"] = param(
        "saturation",
        "saturation (H&E) or grey (inverted luminance, pale IHC)",
        choices=("saturation", "grey"),
    )
    blur_um: float = param(16.0, "Gaussian blur before the threshold, in µm", min=0.0, max=1000.0)
    min_threshold: float = param(0.05, "floor on the Otsu threshold (0-1)", min=0.0, max=1.0)
    fill_holes: bool = param(True, "fill holes (lumens, fat) inside tissue")
    min_area_um2: float = param(
        20_000.0, "remove tissue pieces smaller than this (µm²)", min=0.0, max=1e12
    )
    background_margin: float | None = param(
        None,
        "cap the threshold at the glass level plus this margin (0-1); none: Otsu alone",
        min=0.0,
        max=1.0,
    )

    def __post_init__(self) -> None:
        check(self, "tissue")
        if self.background_margin is not None and not 0 < self.background_margin < 1:
            raise ValueError(f"background_margin must be in (0, 1), got {self.background_margin}")


@dataclass(frozen=True)
class TissueMask:
    """A boolean tissue mask and where it sits on the slide.

    Attributes
    ----------
    mask
        ``(H, W)`` bool; pixel ``(i, j)`` covers level-0 pixels from
        ``(j, i) * mpp / slide_mpp``.
    mpp
        µm per mask pixel.
    threshold
        The threshold used (0-1 scale of the chosen channel).
    """

    mask: np.ndarray
    mpp: float
    threshold: float

    @property
    def fraction(self) -> float:
        """Fraction of the slide area covered by tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0


def _channel(rgb: np.ndarray, channel: str) -> np.ndarray:
    x = rgb.astype(np.float32) / 255.0
    if channel == "grey":
        return 1.0 - (0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2])
    mx, mn = x.max(axis=-1), x.min(axis=-1)
    return np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0).astype(np.float32)


def mask_from_rgb(rgb: np.ndarray, mpp: float, params: TissueParams | None = None) -> TissueMask:
    """Tissue mask of an RGB image already at ``mpp`` µm/px (see :func:`tissue_mask`)."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu
    from skimage.morphology import remove_small_objects

    p = params or TissueParams(mpp=mpp)
    img = _channel(rgb, p.channel)
    sigma = p.blur_um / mpp
    if sigma > 0:
        img = ndimage.gaussian_filter(img, sigma)
    thr = float(threshold_otsu(img)) if np.ptp(img) > 0 else 1.0
    if p.background_margin is not None:
        thr = min(thr, float(np.percentile(img, 2)) + p.background_margin)
    thr = max(thr, p.min_threshold)
    mask = img > thr
    if p.fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    min_px = int(p.min_area_um2 / mpp**2)
    if min_px > 1 and mask.any():
        mask = remove_small_objects(mask, max_size=min_px - 1)
    return TissueMask(mask=np.asarray(mask, dtype=bool), mpp=float(mpp), threshold=thr)


@dataclass(frozen=True)
class EditedTissue(TissueParams):
    """The tissue in force is a mask the user edited, not one :func:`tissue_mask` computes.

    It keys the edited mask in a session's cache (see
    :func:`histoscope.tasks.tissue.use_edited_mask`): the detection settings the
    mask started from, plus the SHA-256 of the edited pixels, so two different
    edits never share a tile grid or a feature table.
    """

    edit_sha256: str = param("", "SHA-256 of the edited mask's pixels")

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.edit_sha256) != 64:
            raise ParamError(f"tissue.edit_sha256={self.edit_sha256!r}: must be a SHA-256 hex "
                             "digest (64 characters)")  # fmt: skip


def mask_sha256(mask: np.ndarray) -> str:
    """SHA-256 of a mask's tissue pixels (any dtype; nonzero is tissue) and its shape."""
    import hashlib

    m = np.ascontiguousarray(np.asarray(mask) != 0)
    return hashlib.sha256(repr(m.shape).encode() + np.packbits(m).tobytes()).hexdigest()


def mask_shape(slide: Slide, mpp: float) -> tuple[int, int]:
    """``(rows, cols)`` of a tissue mask of ``slide`` at ``mpp`` µm/px (as :func:`tissue_mask`)."""
    h0, w0 = slide.shape
    f = mpp / slide.mpp
    return max(1, math.ceil(h0 / f)), max(1, math.ceil(w0 / f))


def tissue_mask(slide: Slide, params: TissueParams | None = None) -> TissueMask:
    """Detect tissue on a low-resolution read of ``slide``.

    Parameters
    ----------
    slide
        An open slide with a known µm/px.
    params
        :class:`TissueParams`; defaults work for H&E at 8 µm/px.

    Returns
    -------
    TissueMask
        The mask covering the whole slide and its µm/px.
    """
    p = params or TissueParams()
    if isinstance(p, EditedTissue):  # its pixels live in a session's cache, not in the slide
        raise ValueError(f"{slide.path}: the edited tissue mask {p.edit_sha256[:12]} is not "
                         "in this session any more; run tissue detection again")  # fmt: skip
    if not slide.mpp:
        raise SlideError(f"{slide.path}: tissue detection needs the slide's µm/px")
    h, w = mask_shape(slide, p.mpp)
    rgb = slide.read_region(0, 0, w, h, mpp=p.mpp)
    return mask_from_rgb(rgb, p.mpp, p)


@dataclass(frozen=True)
class TileGrid:
    """Tiles at a target resolution, placed in level-0 pixels.

    Attributes
    ----------
    coords
        ``(N, 2)`` int64 level-0 ``(x, y)`` of each tile's top-left corner.
    index
        ``(N, 2)`` int64 ``(row, col)`` of each tile in the full grid.
    shape
        ``(rows, cols)`` of the full grid over the slide.
    tile_size
        Tile edge in output pixels.
    mpp
        µm/px the tiles are read at.
    slide_mpp
        µm per level-0 pixel of the slide.
    tissue
        ``(N,)`` float32 tissue fraction of each kept tile.
    """

    coords: np.ndarray
    index: np.ndarray
    shape: tuple[int, int]
    tile_size: int
    mpp: float
    slide_mpp: float
    tissue: np.ndarray

    @property
    def stride(self) -> float:
        """Tile edge in level-0 pixels."""
        return self.tile_size * self.mpp / self.slide_mpp

    def __len__(self) -> int:
        return len(self.coords)

    def to_dict(self) -> dict:
        """Plain-data summary for provenance (not the coordinates themselves)."""
        return {
            "tile_size": self.tile_size,
            "mpp": self.mpp,
            "slide_mpp": self.slide_mpp,
            "shape": list(self.shape),
            "n_tiles": len(self),
        }


def tile_grid(
    slide: Slide,
    mask: TissueMask | None,
    mpp: float,
    tile_size: int,
    min_tissue: float = 0.5,
) -> TileGrid:
    """Non-overlapping tiles with more than ``min_tissue`` of their area in tissue.

    Parameters
    ----------
    slide
        The slide (its level-0 size and µm/px place the grid).
    mask
        From :func:`tissue_mask`; ``None`` keeps every tile.
    mpp
        µm/px the tiles will be read at.
    tile_size
        Tile edge in pixels at ``mpp``.
    min_tissue
        Keep tiles whose tissue fraction is strictly above this.

    Returns
    -------
    TileGrid
        Kept tiles in raster order (row by row).
    """
    if not slide.mpp:
        raise SlideError(f"{slide.path}: a tile grid at {mpp} µm/px needs the slide's µm/px")
    if tile_size <= 0 or not mpp > 0:
        raise ValueError(f"tile_size and mpp must be positive, got {tile_size}, {mpp}")
    h0, w0 = slide.shape
    stride = tile_size * mpp / slide.mpp
    rows, cols = max(1, math.ceil(h0 / stride)), max(1, math.ceil(w0 / stride))
    if mask is None:
        frac = np.ones((rows, cols), np.float32)
    else:
        frac = _coverage(mask, rows, cols, tile_size * mpp)
    keep = frac > min_tissue if mask is not None else frac > 0
    rr, cc = np.nonzero(keep)
    coords = np.stack([np.floor(cc * stride), np.floor(rr * stride)], axis=1).astype(np.int64)
    return TileGrid(
        coords=coords.reshape(-1, 2),
        index=np.stack([rr, cc], axis=1).astype(np.int64).reshape(-1, 2),
        shape=(rows, cols),
        tile_size=int(tile_size),
        mpp=float(mpp),
        slide_mpp=float(slide.mpp),
        tissue=frac[rr, cc].astype(np.float32),
    )


def inside_slide(grid: TileGrid, slide: Slide) -> TileGrid:
    """``grid`` without the tiles that cross the slide's edge (the grid's shape is kept).

    A tile reaching past the right or bottom edge would be read half as glass
    padding, and a model trained on whole tiles scores such a tile on what it
    never saw; the tumour map and MIL therefore score only tiles that lie
    wholly on the slide.
    """
    h0, w0 = slide.shape
    end = grid.coords + grid.stride
    tol = 1e-6 * grid.stride
    keep = (end[:, 0] <= w0 + tol) & (end[:, 1] <= h0 + tol)
    if keep.all():
        return grid
    return TileGrid(coords=grid.coords[keep], index=grid.index[keep], shape=grid.shape,
                    tile_size=grid.tile_size, mpp=grid.mpp, slide_mpp=grid.slide_mpp,
                    tissue=grid.tissue[keep])  # fmt: skip


def edge_tiles_note(n: int) -> str | None:
    """The sentence a summary and a panel show for ``n`` tissue tiles dropped at the slide edge."""
    if not n:
        return None
    return f"{n} edge tile{'s' if n != 1 else ''} with tissue not scored (partly off the slide)"


def edge_summary(provenance) -> dict[str, Any]:
    """Summary keys ``edge_tiles_not_scored`` and ``edge_note`` (its sentence, or ``None``)."""
    n = int((getattr(provenance, "tile_grid", None) or {}).get("edge_tiles_not_scored", 0))
    return {"edge_tiles_not_scored": n, "edge_note": edge_tiles_note(n)}


def tissue_source(params: TissueParams) -> dict[str, Any]:
    """Which tissue mask a tile grid came from, for provenance.

    ``{"tissue_mask": "detected" | "edited", "tissue_edit_sha256": <sha> | None}``.
    """
    edited = isinstance(params, EditedTissue)
    return {"tissue_mask": "edited" if edited else "detected",
            "tissue_edit_sha256": params.edit_sha256 if edited else None}  # fmt: skip


def no_tiles_error(session, tile_um: float, min_tissue: float, what: str,
                   edge: int = 0) -> ValueError:  # fmt: skip
    """Why a slide gave no tile to score, as the error to raise.

    The image is smaller than one tile; or the user's edited mask holds no
    tissue; or no tile has ``min_tissue`` of tissue (and ``edge`` tissue tiles
    were dropped because they run off the slide).
    """
    slide, params = session.slide, session.tissue_params
    h0, w0 = slide.shape
    w_um, h_um = w0 * slide.mpp, h0 * slide.mpp
    if min(w_um, h_um) < tile_um * (1 - 1e-6):
        return ValueError(f"{slide.path}: image smaller than one {tile_um:g} µm tile "
                          f"({w_um:.0f} x {h_um:.0f} µm); {what} scores whole tiles only")  # fmt: skip
    if isinstance(params, EditedTissue) and not session.tissue(params).mask.any():
        return ValueError(f"{slide.path}: the edited tissue mask has no tissue; paint tissue "
                          "back or run the tissue mask again")  # fmt: skip
    note = edge_tiles_note(edge)
    return ValueError(f"{slide.path}: no tissue tiles for {what} (min_tissue={min_tissue})"
                      + (f"; {note}" if note else ""))  # fmt: skip


def _coverage(mask: TissueMask, rows: int, cols: int, tile_um: float) -> np.ndarray:
    """Mean of the mask over each tile's footprint (area-weighted, any scale ratio)."""
    m = mask.mask.astype(np.float64)
    step = tile_um / mask.mpp  # mask pixels per tile (may be < 1)
    integral = np.zeros((m.shape[0] + 1, m.shape[1] + 1))
    integral[1:, 1:] = m.cumsum(0).cumsum(1)

    def area(ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        # integral of the piecewise-constant mask over [0, y] x [0, x], fractional edges
        ys = np.clip(ys, 0, m.shape[0])
        xs = np.clip(xs, 0, m.shape[1])
        return _bilinear(integral, ys[:, None], xs[None, :])

    y = np.arange(rows + 1) * step
    x = np.arange(cols + 1) * step
    a = area(y, x)
    sums = a[1:, 1:] - a[:-1, 1:] - a[1:, :-1] + a[:-1, :-1]
    return (sums / (step * step)).astype(np.float32)


def _bilinear(table: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    y0 = np.minimum(np.floor(y).astype(int), table.shape[0] - 2)
    x0 = np.minimum(np.floor(x).astype(int), table.shape[1] - 2)
    fy, fx = y - y0, x - x0
    t00, t01 = table[y0, x0], table[y0, x0 + 1]
    t10, t11 = table[y0 + 1, x0], table[y0 + 1, x0 + 1]
    return (t00 * (1 - fy) + t10 * fy) * (1 - fx) + (t01 * (1 - fy) + t11 * fy) * fx
