"""Predicted bins as AnnData (bins x genes) at 2, 8 or 16 µm, streamed from the stack.

Rows are the bins that were predicted (no NaN), summed from 2 µm bins into
``k x k`` blocks for 8 and 16 µm (expected counts add up); values below
``min_value`` are stored as zeros. Predicted expected counts are rarely
below it, so ``X`` is a CSR matrix only when at most :data:`MAX_SPARSE_DENSITY`
of its values are kept, and a dense float32 array otherwise (a CSR matrix of
a nearly full table is twice its size). ``obsm["spatial"]`` holds bin centres
``(x, y)`` in µm, placed as the napari layers place them, and ``obs`` the
bin's ``array_row`` / ``array_col`` at its own size, indexed
``s_{bin}um_{row}_{col}`` as Space Ranger names its bins.

The file is written in AnnData's on-disk layout with h5py, one chunk row of
the stack at a time: a first pass counts the predicted bins and the values
kept, a second one writes them, so memory holds one chunk row whatever the
slide's size.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from histoscope.atomic import atomic_path
from histoscope.expression.spaceranger import ExpressionDataError
from histoscope.expression.stack import _open_checked, read_stack_attrs

__all__ = ["MAX_SPARSE_DENSITY", "write_bins_h5ad", "write_cells_h5ad"]

#: ``X`` is stored sparse (CSR) only when at most this fraction of its values is non-zero.
MAX_SPARSE_DENSITY = 0.3


def _blocks(
    stack: Path, meta: dict[str, Any], k: int, min_value: float
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per chunk row: ``(rows, cols, values)`` of the predicted ``k``-aggregated bins.

    ``values`` is ``(n, G)`` float32 with values below ``min_value`` set to 0.
    """
    arr = _open_checked(stack)["0"]
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
        del block
        summed = np.nansum(blk, axis=(2, 4))  # (G, h', w')
        r, c = np.nonzero(has)
        vals = np.ascontiguousarray(summed[:, r, c].T, np.float32)
        vals[vals < min_value] = 0
        yield r + y0 // k, c, vals


def _mark(obj, kind: str, version: str) -> None:
    obj.attrs["encoding-type"] = kind
    obj.attrs["encoding-version"] = version


def _bin_names(bin_um: int, r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``s_{bin:03d}um_{row:05d}_{col:05d}`` as fixed-width bytes (no Python string per bin)."""
    rs = np.char.zfill(r.astype("S12"), 5)
    cs = np.char.zfill(c.astype("S12"), 5)
    return np.char.add(np.char.add(np.char.add(f"s_{bin_um:03d}um_".encode(), rs), b"_"), cs)


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

    Notes
    -----
    ``X`` is CSR when at most :data:`MAX_SPARSE_DENSITY` of its values are
    ``>= min_value``, dense otherwise; ``uns["histoscope"]["x_density"]``
    records the fraction kept.
    """
    import h5py
    import pandas as pd
    from anndata.io import write_elem

    from histoscope.export.anndata import h5_safe

    stack = Path(stack)
    meta = read_stack_attrs(stack)
    k = bin_um / meta["bin_um"]
    if k < 1 or abs(k - round(k)) > 1e-9:
        raise ValueError(f"bin_um {bin_um} is not a whole multiple of the stack's "
                         f"{meta['bin_um']} µm bins")  # fmt: skip
    k = int(round(k))
    genes = list(meta["genes"])
    g = len(genes)
    n = nnz = 0  # first pass: the sizes
    for r, _, vals in _blocks(stack, meta, k, min_value):
        n += len(r)
        nnz += int(np.count_nonzero(vals))
    density = nnz / (n * g) if n * g else 0.0
    dense = density > MAX_SPARSE_DENSITY
    b_um, mpp = meta["bin_um"], meta["slide_mpp"]
    info = {"bin_um": bin_um, "min_value": min_value, "stack": str(stack),
            "x_density": round(density, 4), "x_format": "dense" if dense else "csr",
            **(uns or {})}  # fmt: skip
    name_len = len(_bin_names(bin_um, np.array([10**6]), np.array([10**6]))[0])
    out = Path(path)
    with atomic_path(out, ".h5ad") as tmp, h5py.File(tmp, "w") as f:
        _mark(f, "anndata", "0.1.0")
        rows = max(1, min(n, 65536))
        if dense:
            per = max(1, min(n, (1 << 18) // max(g, 1)))  # ~1 MiB chunks of whole rows
            x = f.create_dataset("X", (n, g), np.float32, chunks=(per, g) if n * g else None)
            _mark(x, "array", "0.2.0")
        else:
            xg = f.create_group("X")
            _mark(xg, "csr_matrix", "0.1.0")
            xg.attrs["shape"] = np.array([n, g], np.int64)
            data = xg.create_dataset("data", (nnz,), np.float32,
                                     chunks=(max(1, min(nnz, 1 << 18)),) if nnz else None)  # fmt: skip
            indices = xg.create_dataset("indices", (nnz,), np.int32,
                                        chunks=(max(1, min(nnz, 1 << 18)),) if nnz else None)  # fmt: skip
            indptr = xg.create_dataset("indptr", (n + 1,), np.int64)
            indptr[0] = 0
        obs = f.create_group("obs")
        _mark(obs, "dataframe", "0.2.0")
        obs.attrs["_index"] = "_index"
        obs.attrs["column-order"] = np.array(["array_row", "array_col"], dtype=object)
        chunks = (rows,) if n else None
        index = obs.create_dataset("_index", (n,), f"S{name_len}", chunks=chunks)
        _mark(index, "string-array", "0.2.0")
        arow = obs.create_dataset("array_row", (n,), np.int64, chunks=chunks)
        acol = obs.create_dataset("array_col", (n,), np.int64, chunks=chunks)
        _mark(arow, "array", "0.2.0")
        _mark(acol, "array", "0.2.0")
        obsm = f.create_group("obsm")
        _mark(obsm, "dict", "0.1.0")
        spatial = obsm.create_dataset("spatial", (n, 2), np.float64,
                                      chunks=(rows, 2) if n else None)  # fmt: skip
        _mark(spatial, "array", "0.2.0")
        i = j = 0  # second pass: the values, one chunk row at a time
        for r, c, vals in _blocks(stack, meta, k, min_value):
            m = len(r)
            if not m:
                continue
            if i + m > n:
                raise ExpressionDataError(
                    f"{stack}: the stack changed while it was exported to {out}"
                )
            if dense:
                x[i : i + m] = vals
            else:
                rr, cc = np.nonzero(vals)  # row-major: CSR order
                data[j : j + len(rr)] = vals[rr, cc]
                indices[j : j + len(rr)] = cc.astype(np.int32)
                counts = np.bincount(rr, minlength=m)
                indptr[i + 1 : i + m + 1] = j + np.cumsum(counts)
                j += len(rr)
            index[i : i + m] = _bin_names(bin_um, r, c)
            arow[i : i + m] = r
            acol[i : i + m] = c
            # centre of a k-block in µm on the slide layer: (k * b * (i + 1/2) - 1/2) * mpp
            spatial[i : i + m] = np.c_[(c + 0.5) * k * b_um - mpp / 2,
                                       (r + 0.5) * k * b_um - mpp / 2]  # fmt: skip
            i += m
        if i != n or (not dense and j != nnz):
            raise ExpressionDataError(f"{stack}: the stack changed while it was exported to {out}")
        write_elem(f, "var", pd.DataFrame(index=pd.Index(genes, dtype=object)))
        write_elem(f, "uns", h5_safe({"histoscope": info}))
        for name in ("layers", "obsp", "varm", "varp"):
            write_elem(f, name, {})
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
