"""Space Ranger's binned Visium HD outputs, placed in level-0 pixels of the H&E image.

Space Ranger writes one folder per bin size (``square_002um``, ``square_008um``,
``square_016um``), each holding

- ``filtered_feature_bc_matrix.h5``: the 10x HDF5 matrix (``matrix/data``,
  ``indices``, ``indptr``, ``shape`` as features x barcodes in CSC order,
  ``barcodes`` and ``features/{id,name,feature_type}``);
- ``spatial/tissue_positions.parquet`` (or ``.csv``): ``barcode``,
  ``in_tissue``, ``array_row``, ``array_col``, ``pxl_row_in_fullres``,
  ``pxl_col_in_fullres`` (bin centres in pixels of the full-resolution image);
- ``spatial/scalefactors_json.json``: ``microns_per_pixel``, ``bin_size_um``,
  ``spot_diameter_fullres`` (the bin's edge in full-resolution pixels), ...

:func:`read_binned` joins the three by barcode and returns every bin with its
centre in level-0 pixels of the image it was registered to, checking that the
image given (its size and µm/px) is that image.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from histoscope.errors import HistoScopeError

if TYPE_CHECKING:
    from scipy import sparse

__all__ = ["BinnedCounts", "ExpressionDataError", "bin_folders", "read_binned"]

#: Bin folders Space Ranger writes, by bin edge in µm.
BIN_FOLDERS = {2: "square_002um", 8: "square_008um", 16: "square_016um"}
POSITION_COLUMNS = ("barcode", "array_row", "array_col", "pxl_row_in_fullres",
                    "pxl_col_in_fullres")  # fmt: skip
#: Relative disagreement allowed between the scale factors' and the image's µm/px.
MPP_TOLERANCE = 0.05


class ExpressionDataError(HistoScopeError, ValueError):
    """Binned expression that cannot be used: a missing file or key, or data that disagree."""


@dataclass(frozen=True)
class BinnedCounts:
    """Counts per bin and gene, each bin placed in level-0 pixels of the H&E image.

    Attributes
    ----------
    counts
        ``(n_bins, n_genes)`` CSR matrix of counts.
    genes
        Gene names (``features/name``), in column order.
    barcodes
        ``(n_bins,)`` bin barcodes.
    array_row, array_col
        ``(n_bins,)`` integer bin grid indices.
    y_px, x_px
        ``(n_bins,)`` bin centres in level-0 pixels of the full-resolution image.
    bin_um
        Bin edge in µm.
    mpp
        µm per full-resolution pixel (from the scale factors).
    source
        The bin folder read.
    """

    counts: sparse.csr_matrix
    genes: tuple[str, ...]
    barcodes: np.ndarray
    array_row: np.ndarray
    array_col: np.ndarray
    y_px: np.ndarray
    x_px: np.ndarray
    bin_um: float
    mpp: float
    source: Path

    @property
    def bin_px(self) -> float:
        """Bin edge in level-0 pixels."""
        return self.bin_um / self.mpp

    @property
    def n_bins(self) -> int:
        """Number of bins."""
        return int(self.counts.shape[0])

    def grid_index(self) -> tuple[np.ndarray, np.ndarray]:
        """Each bin's cell ``(row, col)`` on an axis-aligned grid of ``bin_px`` from pixel 0.

        Cell ``(r, c)`` covers level-0 pixels ``[r b, (r + 1) b) x [c b, (c + 1) b)``;
        a bin goes to the cell holding its centre.
        """
        b = self.bin_px
        return (np.floor(self.y_px / b).astype(np.int64), np.floor(self.x_px / b).astype(np.int64))

    def spatial_um(self) -> np.ndarray:
        """``(n_bins, 2)`` bin centres ``(x, y)`` in µm (AnnData's ``obsm["spatial"]``)."""
        return np.c_[self.x_px, self.y_px] * self.mpp


def bin_folders(folder: str | os.PathLike) -> dict[int, Path]:
    """The ``square_NNNum`` folders under ``folder`` (or ``folder`` itself), by bin edge in µm.

    Raises
    ------
    ExpressionDataError
        If ``folder`` holds no bin folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ExpressionDataError(f"{folder}: Space Ranger output folder does not exist")
    found: dict[int, Path] = {}
    cands = [folder] if _bin_um(folder) else [*folder.glob("square_*um"),
                                               *folder.glob("binned_outputs/square_*um")]  # fmt: skip
    for cand in sorted(cands):
        if cand.is_dir() and _bin_um(cand):
            found.setdefault(_bin_um(cand), cand)
    if not found:
        raise ExpressionDataError(f"{folder}: no square_002um / square_008um / square_016um "
                                  "folder (Space Ranger binned outputs)")  # fmt: skip
    return dict(sorted(found.items()))


def _bin_um(path: Path) -> int:
    """The bin edge a ``square_NNNum`` folder name gives (0 for any other name)."""
    name = path.name
    digits = name[len("square_") : -2]
    ok = name.startswith("square_") and name.endswith("um") and digits.isdigit()
    return int(digits) if ok else 0


def _read_matrix(path: Path):
    """``(counts bins x genes CSR, genes, barcodes)`` from a 10x HDF5 matrix."""
    import h5py
    from scipy import sparse

    if not path.is_file():
        raise ExpressionDataError(f"{path}: matrix file does not exist")
    try:
        with h5py.File(path, "r") as f:
            m = f["matrix"]
            shape = tuple(int(v) for v in m["shape"][:])
            data, indices, indptr = m["data"][:], m["indices"][:], m["indptr"][:]
            barcodes = np.array([b.decode() for b in m["barcodes"][:]], dtype=object)
            names = [b.decode() for b in m["features/name"][:]]
            ftype = (
                [b.decode() for b in m["features/feature_type"][:]]
                if "feature_type" in m["features"]
                else ["Gene Expression"] * len(names)
            )
    except (OSError, KeyError) as exc:
        raise ExpressionDataError(
            f"{path}: not a 10x HDF5 feature-barcode matrix ({exc})"
        ) from None
    if len(shape) != 2 or shape != (len(names), len(barcodes)) or len(indptr) != shape[1] + 1:
        raise ExpressionDataError(
            f"{path}: matrix shape {shape} does not match its {len(names)} features, "
            f"{len(barcodes)} barcodes and {len(indptr)} column pointers"
        )
    try:
        mat = sparse.csc_matrix((data, indices, indptr), shape=shape)
    except ValueError as exc:
        raise ExpressionDataError(f"{path}: inconsistent sparse matrix ({exc})") from None
    keep = np.array([t == "Gene Expression" for t in ftype])
    counts = mat[keep].T.tocsr()
    return counts, tuple(n for n, k in zip(names, keep, strict=True) if k), barcodes


def _read_positions(spatial: Path):
    import pandas as pd

    pq, csv = spatial / "tissue_positions.parquet", spatial / "tissue_positions.csv"
    if pq.is_file():
        try:
            table = pd.read_parquet(pq)
        except Exception as exc:  # pyarrow raises its own types
            raise ExpressionDataError(f"{pq}: cannot read the positions ({exc})") from None
        where = pq
    elif csv.is_file():
        table, where = pd.read_csv(csv), csv
    else:
        raise ExpressionDataError(f"{spatial}: no tissue_positions.parquet or tissue_positions.csv")
    missing = [c for c in POSITION_COLUMNS if c not in table.columns]
    if missing:
        raise ExpressionDataError(f"{where}: missing column(s) {', '.join(missing)}")
    return table, where


def _scale_factors(path: Path) -> tuple[float, float]:
    """``(microns_per_pixel, bin_size_um)`` from ``scalefactors_json.json``."""
    if not path.is_file():
        raise ExpressionDataError(f"{path}: scale factor file does not exist")
    try:
        sf = json.loads(path.read_text())
    except ValueError as exc:
        raise ExpressionDataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(sf, dict):
        raise ExpressionDataError(f"{path}: must hold a JSON object")
    bin_um = sf.get("bin_size_um")
    if not isinstance(bin_um, int | float) or not bin_um > 0:
        raise ExpressionDataError(f"{path}: missing scale factor 'bin_size_um' (got {bin_um!r})")
    mpp = sf.get("microns_per_pixel")
    if mpp is None and isinstance(sf.get("spot_diameter_fullres"), int | float):
        mpp = bin_um / float(sf["spot_diameter_fullres"])  # a bin is spot_diameter px wide
    if not isinstance(mpp, int | float) or not mpp > 0:
        raise ExpressionDataError(f"{path}: missing scale factor 'microns_per_pixel' (and no "
                                  "'spot_diameter_fullres' to derive it from)")  # fmt: skip
    return float(mpp), float(bin_um)


def read_binned(
    folder: str | os.PathLike,
    bin_um: int | None = None,
    *,
    image_shape: tuple[int, int] | None = None,
    image_mpp: float | None = None,
) -> BinnedCounts:
    """Read one bin size of Space Ranger's binned outputs, placed on the H&E image.

    Parameters
    ----------
    folder
        A ``square_NNNum`` folder, or a folder holding them (or ``binned_outputs/``).
    bin_um
        Bin edge to read (2, 8 or 16); default 2 µm, or the one size ``folder`` holds.
    image_shape
        ``(height, width)`` of the level-0 H&E image; every bin must lie on it.
    image_mpp
        µm/px of that image; must agree with the scale factors within 5%.

    Returns
    -------
    BinnedCounts

    Raises
    ------
    ExpressionDataError
        Naming the file and the reason: a missing file, column or scale
        factor; barcodes of the matrix missing from the positions; bins
        outside the image, or an image whose µm/px differs from the positions'.
    """
    folders = bin_folders(folder)
    if bin_um is None:
        bin_um = 2 if 2 in folders or len(folders) > 1 else next(iter(folders))
    if int(bin_um) not in folders:
        raise ExpressionDataError(f"{folder}: no {bin_um} µm bins; found "
                                  f"{', '.join(f'{k} µm' for k in folders)}")  # fmt: skip
    sq = folders[int(bin_um)]
    spatial = sq / "spatial"
    counts, genes, barcodes = _read_matrix(sq / "filtered_feature_bc_matrix.h5")
    mpp, size_um = _scale_factors(spatial / "scalefactors_json.json")
    table, where = _read_positions(spatial)
    table = table.drop_duplicates("barcode").set_index("barcode")
    pos = table.reindex(barcodes)
    lost = pos["pxl_row_in_fullres"].isna().to_numpy()
    if lost.any():
        raise ExpressionDataError(
            f"{sq}: matrix and positions do not match: {int(lost.sum())} of {len(barcodes)} "
            f"matrix barcodes (e.g. {barcodes[lost][0]!r}) are not in {where.name}"
        )
    y = pos["pxl_row_in_fullres"].to_numpy(float)
    x = pos["pxl_col_in_fullres"].to_numpy(float)
    out = BinnedCounts(counts=counts, genes=genes, barcodes=barcodes,
                       array_row=pos["array_row"].to_numpy(np.int64),
                       array_col=pos["array_col"].to_numpy(np.int64),
                       y_px=y, x_px=x, bin_um=size_um, mpp=mpp, source=sq)  # fmt: skip
    check_image(out, image_shape, image_mpp)
    return out


def check_image(
    bins: BinnedCounts, image_shape: tuple[int, int] | None, image_mpp: float | None
) -> None:
    """Refuse an H&E image that is not the one the bins were registered to.

    Raises
    ------
    ExpressionDataError
        If the µm/px differ by more than 5%, or bins lie outside the image.
    """
    if image_mpp is not None and image_mpp > 0:
        if abs(bins.mpp - image_mpp) > MPP_TOLERANCE * image_mpp:
            raise ExpressionDataError(
                f"{bins.source}: the image is {image_mpp:g} µm/px but the positions are in pixels "
                f"of {bins.mpp:g} µm (scalefactors microns_per_pixel): another image or level"
            )
    if image_shape is not None and bins.n_bins:
        h, w = (int(v) for v in image_shape)
        half = bins.bin_px / 2
        out = ((bins.y_px < -half) | (bins.x_px < -half) | (bins.y_px > h + half)
               | (bins.x_px > w + half))  # fmt: skip
        if out.any():
            k = int(np.flatnonzero(out)[0])
            raise ExpressionDataError(
                f"{bins.source}: {int(out.sum())} of {bins.n_bins} bins lie outside the image "
                f"({w} x {h} px), e.g. {bins.barcodes[k]} at x={bins.x_px[k]:.1f}, "
                f"y={bins.y_px[k]:.1f}: the positions belong to another image"
            )
