"""The whole-slide expression stack: an OME-Zarr image of genes x 2 µm bins, written tile by tile.

Level 0 is ``(genes, rows, cols)`` float32 over the slide's whole bin grid (bin
``(r, c)`` covers level-0 pixels ``[r b, (r + 1) b) x [c b, (c + 1) b)``, ``b``
the bin edge in pixels), NaN where nothing was predicted, chunked
``(1, chunk, chunk)`` so one gene of one region reads alone. Predictions
arrive patch by patch; a chunk is kept in memory only until its last patch
arrives, then written with its pyramid parents (NaN-aware 2x means), so
memory stays bounded by the chunks in flight whatever the slide's size and
the stack is a valid OME-Zarr (NGFF 0.4, channels named in ``omero``) at
every moment. Values keep 7 mantissa bits (:data:`KEEP_BITS`, a relative
precision of ~0.4%), which compresses ~3x better. A ``done`` array records the finished patches, so a later run
(the view first, then the whole slide) only predicts the rest.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from histoscope.expression.spaceranger import ExpressionDataError

__all__ = ["StackWriter", "cell_expression", "open_levels", "read_stack_attrs"]

KEY = "histoscope"
#: Mantissa bits kept of each predicted value (relative error < 2^-7 = 0.8%; in practice
#: < 0.4%): rounding the bits noise lives in makes the stack ~3x smaller after zstd.
KEEP_BITS = 7
#: OME-Zarr viewers show the first this many genes (as HistoScope does by default).
N_ACTIVE = 2
#: ``omero`` channel colours, in order (HistoScope's gene colour maps).
COLORS = ("FF00FF", "00FF00", "00FFFF", "FFFF00", "FF0000", "0000FF")
#: ``omero`` window: these percentiles of a gene's predicted values (top pyramid level).
WINDOW_PERCENTILES = (1.0, 99.5)


def _n_levels(shape: tuple[int, int], max_top: int = 256) -> int:
    n, (h, w) = 1, shape
    while max(h, w) > max_top:
        h, w, n = -(-h // 2), -(-w // 2), n + 1
    return n


def _new_array(group, name: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype, fill):
    """A Zarr-2 array (``/`` chunk keys, Blosc-zstd); floats keep :data:`KEEP_BITS` mantissa bits."""
    import numcodecs
    import zarr

    comp = numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE)
    floating = np.issubdtype(np.dtype(dtype), np.floating)
    filters = [numcodecs.BitRound(keepbits=KEEP_BITS)] if floating else None
    if int(zarr.__version__.split(".")[0]) >= 3:
        return group.create_array(name, shape=shape, dtype=dtype, chunks=chunks,
                                  compressors=comp, filters=filters, fill_value=fill,
                                  chunk_key_encoding={"name": "v2", "separator": "/"})  # fmt: skip
    return group.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks, compressor=comp,
                                filters=filters, fill_value=fill,
                                dimension_separator="/")  # fmt: skip


def _open_group(path: Path, mode: str):
    import zarr

    v2 = {"zarr_format": 2} if int(zarr.__version__.split(".")[0]) >= 3 and mode == "w" else {}
    return zarr.open_group(str(path), mode=mode, **v2)


def _damage(group, meta: dict[str, Any]) -> str | None:
    """What is missing or wrong in the stack's arrays for ``meta``, or ``None`` when whole."""
    try:
        g, (h, w) = len(meta["genes"]), (int(meta["shape"][0]), int(meta["shape"][1]))
        p = int(meta["patch_bins"])
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        return f"its histoscope attributes are incomplete ({exc!r})"
    try:
        n = len(dict(group.attrs)["multiscales"][0]["datasets"])
    except (KeyError, IndexError, TypeError) as exc:
        return f"its multiscales attributes are missing ({exc!r})"
    want = {str(k): (g, -(-h // 2**k), -(-w // 2**k)) for k in range(n)}
    want["done"] = (-(-h // p), -(-w // p))
    for name, shape in want.items():
        try:
            arr = group[name]
        except KeyError:
            return f"its array {name!r} is missing"
        except (ValueError, OSError) as exc:  # unreadable metadata
            return f"its array {name!r} cannot be read ({exc})"
        if tuple(arr.shape) != shape:
            return f"its array {name!r} is {tuple(arr.shape)}, not {shape}"
    return None


def _open_checked(path: Path):
    """The stack's group for reading, its arrays checked.

    Raises
    ------
    ExpressionDataError
        Naming the stack and what is missing.
    """
    meta = read_stack_attrs(path)
    group = _open_group(Path(path), "r")
    why = _damage(group, meta)
    if why is not None:
        raise ExpressionDataError(f"{path}: damaged expression stack: {why}; predict it again "
                                  "(a session's stack is rebuilt by the next run)")  # fmt: skip
    return group


class StackWriter:
    """Create (or reopen) a stack and write patches of predicted bins into it.

    Parameters
    ----------
    path
        The ``.ome.zarr`` folder.
    genes
        Channel names.
    shape
        ``(rows, cols)`` of the slide's bin grid.
    bin_um, slide_mpp
        Bin edge in µm and µm per level-0 pixel (placement).
    patch_bins
        Patch edge in bins (the ``done`` grid's cell).
    chunk
        Chunk edge in bins (a multiple of ``patch_bins``).
    max_top
        The pyramid halves until its top level fits in this many bins.
    attrs
        Extra JSON-able attributes under ``"histoscope"`` (provenance).

    A stack of other genes or geometry at ``path`` is replaced, and so is a
    damaged one (an array missing, unreadable or of the wrong shape).
    """

    def __init__(self, path: str | os.PathLike, genes, shape, bin_um: float, slide_mpp: float,
                 patch_bins: int, chunk: int = 128, attrs: dict[str, Any] | None = None,
                 max_top: int = 256):  # fmt: skip
        self.path = Path(path)
        self.genes = list(genes)
        self.shape = (int(shape[0]), int(shape[1]))
        self.p, self.chunk, self.max_top = int(patch_bins), int(chunk), int(max_top)
        if self.chunk % self.p:
            raise ValueError(f"chunk {chunk} must be a multiple of the patch edge {patch_bins}")
        meta = {"genes": self.genes, "shape": list(self.shape), "bin_um": float(bin_um),
                "slide_mpp": float(slide_mpp), "bin_px": float(bin_um) / float(slide_mpp),
                "patch_bins": self.p, "chunk": self.chunk, **(attrs or {})}  # fmt: skip
        self.group = self._open(meta)
        #: Whether the stack was already finished when opened (it stays so: patches are kept).
        self.was_complete = bool(dict(self.group.attrs)[KEY].get("complete", False))
        n = len(dict(self.group.attrs)["multiscales"][0]["datasets"])
        self.levels = [self.group[str(k)] for k in range(n)]
        self.done = self.group["done"]
        self._done = np.asarray(self.done[...], bool)
        self._bufs: dict[tuple[int, int], list] = {}
        self._left: dict[tuple[int, int], int] = {}

    def _open(self, meta: dict[str, Any]):
        from histoscope.export.omezarr import _multiscales

        same = ("genes", "shape", "bin_um", "slide_mpp", "patch_bins", "chunk", "checkpoint_sha256")
        if (self.path / ".zattrs").is_file():
            try:
                group = _open_group(self.path, "r+")
                old = dict(group.attrs).get(KEY, {})
            except (ValueError, OSError):  # unreadable metadata: rebuilt below
                group, old = None, {}
            if (group is not None and all(old.get(k) == meta.get(k) for k in same)
                    and _damage(group, meta) is None):  # fmt: skip
                group.attrs[KEY] = {**old, **meta, "complete": old.get("complete", False)}
                return group
        self.path.parent.mkdir(parents=True, exist_ok=True)
        group = _open_group(self.path, "w")
        g, (h, w) = len(self.genes), self.shape
        n = _n_levels(self.shape, self.max_top)
        for k in range(n):
            f = 2**k
            shp = (g, -(-h // f), -(-w // f))
            _new_array(group, str(k), shp, (1, min(self.chunk, shp[1]), min(self.chunk, shp[2])),
                       np.float32, np.nan)  # fmt: skip
        _new_array(group, "done", (-(-h // self.p), -(-w // self.p)), (256, 256), np.uint8, 0)
        off = meta["bin_um"] / 2 - meta["slide_mpp"] / 2  # bin centres on the slide layer
        ms = _multiscales(n, (meta["bin_um"],) * 2, (off, off), True, "expression", "mean")
        omero = {"name": "expression", "channels": [
            {"label": gname, "color": COLORS[i % len(COLORS)], "active": i < N_ACTIVE,
             "window": {"start": 0.0, "end": 1.0, "min": 0.0, "max": 1.0}}
            for i, gname in enumerate(self.genes)]}  # fmt: skip
        group.attrs.update({"multiscales": [ms], "omero": omero,
                            KEY: {**meta, "complete": False}})  # fmt: skip
        return group

    # ------------------------------------------------------------ writing
    def is_done(self, origins: np.ndarray) -> np.ndarray:
        """Which patches (``(N, 2)`` origins in bins) are already in the stack."""
        r, c = origins[:, 0] // self.p, origins[:, 1] // self.p
        return self._done[r, c]

    def expect(self, origins: np.ndarray) -> None:
        """Announce the patches a run will write (chunks are flushed when their last arrives)."""
        for r, c in origins // self.chunk:
            key = (int(r), int(c))
            self._left[key] = self._left.get(key, 0) + 1

    def write(self, origins: np.ndarray, values: np.ndarray) -> None:
        """Put predicted patches ``(B, G, P, P)`` at ``origins`` ``(B, 2)`` (bins)."""
        for (r0, c0), v in zip(origins, values, strict=True):
            key = (int(r0) // self.chunk, int(c0) // self.chunk)
            buf = self._bufs.get(key)
            if buf is None:
                buf = self._bufs[key] = [self._read_chunk(key), []]
            y, x = int(r0) - key[0] * self.chunk, int(c0) - key[1] * self.chunk
            h, w = buf[0].shape[1:]
            buf[0][:, y : y + self.p, x : x + self.p] = v[:, : h - y, : w - x]
            buf[1].append((int(r0) // self.p, int(c0) // self.p))
            self._left[key] = self._left.get(key, 1) - 1
            if self._left[key] <= 0:
                self._flush(key)

    def _bounds(self, key: tuple[int, int]) -> tuple[int, int, int, int]:
        y0, x0 = key[0] * self.chunk, key[1] * self.chunk
        return y0, min(y0 + self.chunk, self.shape[0]), x0, min(x0 + self.chunk, self.shape[1])

    def _read_chunk(self, key: tuple[int, int]) -> np.ndarray:
        y0, y1, x0, x1 = self._bounds(key)
        return np.asarray(self.levels[0][:, y0:y1, x0:x1], np.float32)

    def _flush(self, key: tuple[int, int]) -> None:
        from histoscope.export.omezarr import _halve

        data, cells = self._bufs.pop(key)
        self._left.pop(key, None)
        y0, y1, x0, x1 = self._bounds(key)
        self.levels[0][:, y0:y1, x0:x1] = data
        for k in range(1, len(self.levels)):  # the parents of this chunk, level by level
            y0, x0, y1, x1 = y0 // 2, x0 // 2, -(-y1 // 2), -(-x1 // 2)
            child = np.asarray(self.levels[k - 1][:, 2 * y0 : 2 * y1, 2 * x0 : 2 * x1])
            half = np.moveaxis(_halve(np.moveaxis(child, 0, -1), "mean"), -1, 0)
            self.levels[k][:, y0:y1, x0:x1] = half[:, : y1 - y0, : x1 - x0]
        if cells:
            rc = np.array(cells)
            self._done[rc[:, 0], rc[:, 1]] = True
            r0, r1, c0, c1 = rc[:, 0].min(), rc[:, 0].max() + 1, rc[:, 1].min(), rc[:, 1].max() + 1
            self.done[r0:r1, c0:c1] = self._done[r0:r1, c0:c1].astype(np.uint8)

    def close(self, complete: bool) -> None:
        """Write every chunk still in memory; record whether the slide is finished.

        A stack that was complete when opened stays complete.
        """
        for key in list(self._bufs):
            self._flush(key)
        self._left.clear()
        done = bool(complete) or self.was_complete
        attrs = dict(self.group.attrs)
        self.group.attrs.update({KEY: {**attrs[KEY], "complete": done},
                                 "omero": self._omero(attrs.get("omero", {}))})  # fmt: skip

    def _omero(self, old: dict[str, Any]) -> dict[str, Any]:
        """``omero`` with each gene's display window from its predicted values (top level).

        ``start``/``end`` are the :data:`WINDOW_PERCENTILES` of the gene's values,
        ``min``/``max`` their range; a gene with no value yet keeps ``0..1``.
        """
        top = np.asarray(self.levels[-1][...], np.float32)  # (G, <= max_top, <= max_top)
        chans = list(old.get("channels") or [])
        out = []
        for i, gene in enumerate(self.genes):
            ch = dict(chans[i]) if i < len(chans) else {}
            ch.setdefault("label", gene)
            ch.setdefault("color", COLORS[i % len(COLORS)])
            ch.setdefault("active", i < N_ACTIVE)
            v = top[i][np.isfinite(top[i])]
            if v.size:
                lo, hi = (float(q) for q in np.percentile(v, WINDOW_PERCENTILES))
                ch["window"] = {"start": lo, "end": hi if hi > lo else lo + 1e-6,
                                "min": float(v.min()), "max": float(v.max())}  # fmt: skip
            else:
                ch.setdefault("window", {"start": 0.0, "end": 1.0, "min": 0.0, "max": 1.0})
            out.append(ch)
        return {**old, "name": old.get("name", "expression"), "channels": out}


# ------------------------------------------------------------------- reading
def read_stack_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """The stack's ``histoscope`` attributes (genes, shape, bin_um, slide_mpp, ...).

    Raises
    ------
    ExpressionDataError
        If ``path`` is not an expression stack.
    """
    p = Path(path)
    if not (p / ".zattrs").is_file():
        raise ExpressionDataError(f"{p}: not an OME-Zarr expression stack (no .zattrs)")
    try:
        attrs = dict(_open_group(p, "r").attrs)
    except (ValueError, OSError) as exc:  # unreadable metadata
        raise ExpressionDataError(f"{p}: damaged expression stack: its metadata cannot be "
                                  f"read ({exc})") from exc  # fmt: skip
    if KEY not in attrs or "genes" not in attrs[KEY]:
        raise ExpressionDataError(f"{p}: OME-Zarr without HistoScope expression metadata")
    return attrs[KEY]


def open_levels(path: str | os.PathLike, gene: str | None = None) -> list:
    """The pyramid as dask arrays, full resolution first: ``(G, H, W)``, or ``(H, W)`` of ``gene``."""
    import dask.array as da

    meta = read_stack_attrs(path)
    group = _open_checked(Path(path))
    n = len(dict(group.attrs)["multiscales"][0]["datasets"])
    levels = [da.from_zarr(group[str(k)]) for k in range(n)]
    if gene is None:
        return levels
    if gene not in meta["genes"]:
        raise ExpressionDataError(f"{path}: no gene {gene!r} in the stack")
    i = meta["genes"].index(gene)
    return [lv[i] for lv in levels]


def cell_expression(
    stack: str | os.PathLike,
    x: np.ndarray,
    y: np.ndarray,
    *,
    radius_px: float | np.ndarray | None = None,
    outlines: list[np.ndarray] | None = None,
) -> np.ndarray:
    """Mean predicted expression under each cell: ``(n_cells, n_genes)``.

    Parameters
    ----------
    stack
        An expression stack (:class:`StackWriter`).
    x, y
        ``(N,)`` nucleus centroids in level-0 pixels.
    radius_px
        Bins whose centre lies within this many level-0 pixels of the
        centroid (one number or one per cell); default: only the bin
        holding the centroid.
    outlines
        Instead of a radius: one ``(K, 2)`` level-0 ``(x, y)`` polygon per
        cell; bins whose centre lies inside it (the centroid's bin when none does).

    Returns
    -------
    numpy.ndarray
        float32; NaN for a cell whose bins were never predicted.
    """
    from skimage.measure import points_in_poly

    meta = read_stack_attrs(stack)
    arr = _open_checked(Path(stack))["0"]
    b, chunk = float(meta["bin_px"]), int(meta["chunk"])
    h, w = meta["shape"]
    x, y = np.asarray(x, float).ravel(), np.asarray(y, float).ravel()
    n, g = len(x), len(meta["genes"])
    if outlines is not None and len(outlines) != n:
        raise ValueError(f"{len(outlines)} outlines for {n} cells")
    rad = np.broadcast_to(np.asarray(0.0 if radius_px is None else radius_px, float), (n,))
    out = np.full((n, g), np.nan, np.float32)
    reach = [np.ptp(o, axis=0).max() if outlines is not None else 2 * r for o, r in
             zip(outlines if outlines is not None else [None] * n, rad, strict=True)]  # fmt: skip
    reach_bins = int(np.ceil(max(reach, default=0) / b)) + 1
    key = (np.floor(y / b) // chunk).astype(int) * 1_000_000 + (np.floor(x / b) // chunk).astype(
        int
    )
    for k in np.unique(key):
        sel = np.flatnonzero(key == k)
        cy, cx = divmod(int(k), 1_000_000)
        y0, x0 = max(cy * chunk - reach_bins, 0), max(cx * chunk - reach_bins, 0)
        y1, x1 = min((cy + 1) * chunk + reach_bins, h), min((cx + 1) * chunk + reach_bins, w)
        block = np.asarray(arr[:, y0:y1, x0:x1], np.float32)  # (G, hh, ww)
        rr, cc = np.mgrid[y0:y1, x0:x1]
        by, bx = (rr + 0.5) * b, (cc + 0.5) * b  # bin centres, level-0 px
        for i in sel:
            if outlines is not None:
                inside = points_in_poly(np.c_[bx.ravel(), by.ravel()],
                                        np.asarray(outlines[i], float)).reshape(bx.shape)  # fmt: skip
            else:
                inside = (bx - x[i]) ** 2 + (by - y[i]) ** 2 <= rad[i] ** 2
            if not inside.any():  # the bin holding the centroid
                r, c = int(y[i] // b) - y0, int(x[i] // b) - x0
                if not (0 <= r < block.shape[1] and 0 <= c < block.shape[2]):
                    continue
                inside = np.zeros(bx.shape, bool)
                inside[r, c] = True
            vals = block[:, inside]
            ok = np.isfinite(vals).all(0)
            if ok.any():
                out[i] = vals[:, ok].mean(1)
    return out
