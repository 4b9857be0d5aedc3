"""Predicted bins as AnnData (bins x genes, sparse) at 2, 8 or 16 µm, read from the stack.

Rows are the bins that were predicted (no NaN), summed from 2 µm bins into
``k x k`` blocks for 8 and 16 µm (expected counts add up); values below
``min_value`` are stored as zeros, which keeps ``X`` sparse. ``obsm["spatial"]``
holds bin centres ``(x, y)`` in µm, placed as the napari layers place them,
and ``obs`` the bin's ``array_row`` / ``array_col`` at its own size. The
stack is read one chunk row at a time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from histoscope.atomic import atomic_path
from histoscope.expression.stack import _open_group, read_stack_attrs

__all__ = ["write_bins_h5ad", "write_cells_h5ad"]


def _blocks(stack: Path, meta: dict[str, Any], k: int, min_value: float):
    """Per chunk row: ``(rows, cols, csr)`` of the predicted ``k``-aggregated bins."""
    from scipy import sparse

    arr = _open_group(stack, "r")["0"]
    h, w = meta["shape"]
    step = int(meta["chunk"]) // k * k or k
    for y0 in range(0, h, step):
        block = np.asarray(arr[:, y0 : min(y0 + step, h), :], np.float32)  # (G, hh, W)
        g, hh, ww = block.shape
        ph, pw = -hh % k, -ww % k
        if ph or pw:
            block = np.pad(block, ((0, 0), (0, ph), (0, pw)), constant_values=np.nan)
        blk = block.reshape(g, block.shape[1] // k, k, block.shape[2] // k, k)
        has = np.isfinite(blk).all(0).any(axis=(1, 3))  # any predicted 2 µm bin
        summed = np.nansum(blk, axis=(2, 4))  # (G, h', w')
        r, c = np.nonzero(has)
        vals = summed[:, r, c].T
        vals[vals < min_value] = 0
        yield r + y0 // k, c, sparse.csr_matrix(vals.astype(np.float32))


def write_bins_h5ad(
    stack: str | os.PathLike,
    path: str | os.PathLike,
    bin_um: int = 8,
    *,
    min_value: float = 1e-3,
    uns: dict[str, Any] | None = None,
) -> Path:
    """Write the stack's predicted bins at ``bin_um`` (2, 8, 16, ...) as ``.h5ad``, atomically.

    Parameters
    ----------
    stack
        An expression stack folder.
    path
        Target ``.h5ad``.
    bin_um
        Output bin edge in µm: a whole multiple of the stack's bin.
    min_value
        Expected counts below this are stored as 0.
    uns
        Provenance and summary (JSON-able).

    Returns
    -------
    pathlib.Path
    """
    import anndata as ad
    import pandas as pd
    from scipy import sparse

    from histoscope.export.anndata import h5_safe

    stack = Path(stack)
    meta = read_stack_attrs(stack)
    k = bin_um / meta["bin_um"]
    if k < 1 or abs(k - round(k)) > 1e-9:
        raise ValueError(f"bin_um {bin_um} is not a whole multiple of the stack's "
                         f"{meta['bin_um']} µm bins")  # fmt: skip
    k = int(round(k))
    rows, cols, mats = [], [], []
    for r, c, m in _blocks(stack, meta, k, min_value):
        rows.append(r)
        cols.append(c)
        mats.append(m)
    g = len(meta["genes"])
    r = np.concatenate(rows) if rows else np.zeros(0, int)
    c = np.concatenate(cols) if cols else np.zeros(0, int)
    x = sparse.vstack(mats).tocsr() if mats else sparse.csr_matrix((0, g), dtype=np.float32)
    # centre of a k-block in µm on the slide layer: (k * b * (i + 1/2) - 1/2) * mpp
    b_um, mpp = meta["bin_um"], meta["slide_mpp"]
    xy = np.c_[(c + 0.5) * k * b_um - mpp / 2, (r + 0.5) * k * b_um - mpp / 2]
    obs = pd.DataFrame({"array_row": r.astype(np.int64), "array_col": c.astype(np.int64)},
                       index=pd.Index([f"s_{bin_um:03d}um_{i:05d}_{j:05d}" for i, j in
                                       zip(r, c, strict=True)], dtype=object))  # fmt: skip
    var = pd.DataFrame(index=pd.Index(meta["genes"], dtype=object))
    info = {"bin_um": bin_um, "min_value": min_value, "stack": str(stack), **(uns or {})}
    adata = ad.AnnData(X=x, obs=obs, var=var, obsm={"spatial": xy.astype(np.float64)},
                       uns=h5_safe({"histoscope": info}))  # fmt: skip
    out = Path(path)
    with atomic_path(out, ".h5ad") as tmp:
        adata.write_h5ad(tmp)
    return out


def write_cells_h5ad(
    stack: str | os.PathLike,
    path: str | os.PathLike,
    x: np.ndarray,
    y: np.ndarray,
    *,
    radius_px: float | np.ndarray | None = None,
    outlines: list[np.ndarray] | None = None,
    table: Any = None,
    uns: dict[str, Any] | None = None,
) -> Path:
    """Cells x genes AnnData: mean predicted expression under each nucleus, atomically.

    Parameters
    ----------
    stack
        An expression stack folder.
    path
        Target ``.h5ad``.
    x, y
        ``(N,)`` nucleus centroids in level-0 pixels.
    radius_px, outlines
        As :func:`histoscope.expression.stack.cell_expression`.
    table
        Per-cell columns for ``obs`` (e.g. the cell table's class and
        confidence); default the centroids.
    uns
        Provenance and summary (JSON-able).

    Returns
    -------
    pathlib.Path
    """
    from histoscope.export.anndata import write_h5ad
    from histoscope.expression.stack import cell_expression

    meta = read_stack_attrs(stack)
    x, y = np.asarray(x, float), np.asarray(y, float)
    values = cell_expression(stack, x, y, radius_px=radius_px, outlines=outlines)
    obs = table if table is not None else {"x_px": x, "y_px": y}
    info = {"stack": str(stack), "measure": "mean expected counts per 2 µm bin under the nucleus",
            **(uns or {})}  # fmt: skip
    return write_h5ad(path, obs, np.c_[x, y] * meta["slide_mpp"], uns={"histoscope": info},
                      var=list(meta["genes"]), X=values)  # fmt: skip
