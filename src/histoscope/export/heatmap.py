"""Heatmap outputs that open elsewhere: TIFF with µm/px, per-tile CSV, a PNG overview."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from histoscope.atomic import atomic_write_bytes, atomic_write_text


def write_heatmap_outputs(heat, slide, out_dir, *, stem: str, value: str) -> list[Path]:
    """Write ``<stem>.tif``, ``<stem>_tiles.csv``, ``<stem>.json`` and ``<stem>_overview.png``.

    The TIFF is float32, one pixel per tile, NaN on background, with its
    resolution set to the tile size so it overlays the slide in QuPath/Fiji;
    the JSON sidecar holds the placement (µm/px and offset) and provenance.
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
    return files


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
