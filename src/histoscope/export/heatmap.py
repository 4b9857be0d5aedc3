"""Heatmap outputs that open elsewhere.

A TIFF with µm/px (QuPath, Fiji), an OME-Zarr pyramid placed in µm (napari,
ome-zarr tools), the per-tile table as CSV and as AnnData ``.h5ad`` (tile
centres in ``obsm["spatial"]``), a JSON sidecar and a PNG overview.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from histoscope.atomic import atomic_write_bytes, atomic_write_text


def write_heatmap_outputs(heat, slide, out_dir, *, stem: str, value: str) -> list[Path]:
    """Write a :class:`~histoscope.results.TileHeatmap` in every exchange format.

    ``<stem>.tif``, ``<stem>_tiles.csv``, ``<stem>.json``,
    ``<stem>_overview.png``, then ``<stem>.ome.zarr`` (:func:`write_heatmap_ome_zarr`)
    and ``<stem>_tiles.h5ad`` (:func:`write_tile_table`). The TIFF is float32,
    one pixel per tile, NaN on background, with its resolution set to the tile
    size so it overlays the slide in QuPath/Fiji; the JSON sidecar holds the
    placement (µm/px and offset) and provenance.
    """
    import tifffile

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    grid, vals = heat.grid, heat.values
    (step, _), (off, _) = heat.placement()
    buf = io.BytesIO()
    res = 1e4 / step
    tifffile.imwrite(
        buf, vals.astype(np.float32), resolution=(res, res), resolutionunit="CENTIMETER"
    )
    files = [atomic_write_bytes(out / f"{stem}.tif", buf.getvalue())]

    rows = io.StringIO()
    w = csv.writer(rows)
    w.writerow(["x", "y", "x_um", "y_um", "row", "col", "tissue_fraction", value])
    for (x, y), (r, c), t in zip(grid.coords, grid.index, grid.tissue, strict=True):
        v = vals[r, c]
        w.writerow([int(x), int(y), f"{x * grid.slide_mpp:.2f}", f"{y * grid.slide_mpp:.2f}",
                    int(r), int(c), f"{t:.3f}", "" if np.isnan(v) else f"{v:.5f}"])  # fmt: skip
    files.append(atomic_write_text(out / f"{stem}_tiles.csv", rows.getvalue()))
    meta = {"um_per_pixel": step, "offset_um": off, "shape": list(vals.shape),
            "slide_mpp": grid.slide_mpp, "provenance": heat.provenance.to_dict()}  # fmt: skip
    files.append(atomic_write_text(out / f"{stem}.json", json.dumps(meta, indent=2) + "\n"))
    files.append(atomic_write_bytes(out / f"{stem}_overview.png", overview_png(heat, slide)))
    files.append(write_heatmap_ome_zarr(heat, out / f"{stem}.ome.zarr"))
    files.append(write_tile_table(heat, out / f"{stem}_tiles.h5ad", value))
    return files


def write_heatmap_ome_zarr(heat, path) -> Path:
    """``heat`` as an OME-Zarr pyramid (NaN-aware mean) placed as its napari layer.

    Level 0 has the layer's ``scale`` and ``translate``
    (:meth:`~histoscope.results.TileHeatmap.placement`); the name, channels,
    provenance and summary are stored under the ``"histoscope"`` attribute.
    """
    from histoscope.export.omezarr import write_ome_zarr

    scale, translate = heat.placement()
    attrs = {"histoscope": {"name": heat.name, "channels": list(heat.channels),
                            "slide_mpp": heat.grid.slide_mpp, "summary": heat.summary(),
                            "provenance": heat.provenance.to_dict()}}  # fmt: skip
    return write_ome_zarr(path, heat.values, scale, translate, method="mean", name=heat.name,
                          attrs=attrs)  # fmt: skip


def write_tile_table(heat, path, value: str) -> Path:
    """One row per grid tile as AnnData ``.h5ad``.

    ``obs``: ``x``, ``y`` (level-0 top-left corner), ``row``, ``col``,
    ``tissue_fraction`` and ``value`` (NaN where unscored); a heatmap with
    channels puts them in ``X`` (``var`` = channel names) instead.
    ``obsm["spatial"]``: tile centres ``(x, y)`` in µm, where the heatmap
    layer draws them; ``uns``: provenance, summary and placement.
    """
    from histoscope.export.anndata import write_h5ad

    grid, vals = heat.grid, heat.values
    (sy, sx), (ty, tx) = heat.placement()
    r, c = grid.index[:, 0], grid.index[:, 1]
    table = {"x": grid.coords[:, 0].astype(np.int64), "y": grid.coords[:, 1].astype(np.int64),
             "row": r.astype(np.int64), "col": c.astype(np.int64),
             "tissue_fraction": np.asarray(grid.tissue, np.float32)}  # fmt: skip
    spatial = np.stack([tx + c * sx, ty + r * sy], axis=1)
    uns = {"provenance": heat.provenance.to_dict(), "summary": heat.summary(), "value": value,
           "placement": {"scale_um": [sy, sx], "translate_um": [ty, tx], "axes": ["y", "x"]},
           "spatial_unit": "um", "slide_mpp": grid.slide_mpp}  # fmt: skip
    if vals.ndim == 2:
        table[value] = vals[r, c].astype(np.float32)
        return write_h5ad(path, table, spatial, uns)
    names = list(heat.channels) or [f"{value}_{i}" for i in range(vals.shape[2])]
    return write_h5ad(path, table, spatial, uns, var=names, X=vals[r, c].astype(np.float32))


#: Anchor colours of matplotlib's "magma" at 0, 0.25, 0.5, 0.75 and 1.
_MAGMA = np.array([[0, 0, 4], [81, 18, 124], [183, 55, 121], [252, 137, 97], [252, 253, 191]]) / 255


def magma(x: np.ndarray) -> np.ndarray:
    """RGBA floats for values in [0, 1], interpolated along magma's anchors."""
    pos = np.linspace(0, 1, len(_MAGMA))
    rgb = np.stack([np.interp(x, pos, _MAGMA[:, c]) for c in range(3)], axis=-1)
    return np.concatenate([rgb, np.ones((*x.shape, 1))], axis=-1)


def overview_png(heat, slide, max_size: int = 1600) -> bytes:
    """Slide thumbnail with the heatmap blended over tissue (magma), PNG bytes."""
    from PIL import Image

    thumb = slide.thumbnail(max_size)
    vals = heat.values
    finite = np.isfinite(vals)
    lo, hi = (
        (0.0, 1.0) if not finite.any() else (min(0.0, np.nanmin(vals)), max(1.0, np.nanmax(vals)))
    )
    rgba = magma(np.clip((np.nan_to_num(vals) - lo) / (hi - lo), 0, 1))
    rgba[..., 3] = np.where(finite, 0.55, 0.0)
    # the heatmap covers rows*stride level-0 px; crop to the slide's extent when resizing
    s = heat.grid.stride
    h0, w0 = slide.shape
    big = Image.fromarray((rgba * 255).astype(np.uint8)).resize(
        (max(1, round(vals.shape[1] * s * thumb.shape[1] / w0)),
         max(1, round(vals.shape[0] * s * thumb.shape[0] / h0))), Image.Resampling.NEAREST)  # fmt: skip
    base = Image.fromarray(thumb).convert("RGBA")
    layer = Image.new("RGBA", base.size)
    layer.paste(big.crop((0, 0, *base.size)), (0, 0))
    buf = io.BytesIO()
    Image.alpha_composite(base, layer).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()
