"""Small Space Ranger binned outputs written by the tests, in exactly Space Ranger's layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


def write_spaceranger(
    root: Path,
    counts: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    *,
    bin_um: int = 2,
    mpp: float = 0.5,
    genes: list[str] | None = None,
    positions: str = "parquet",
    scalefactors: dict | None = None,
    extra_positions: int = 0,
) -> Path:
    """One ``square_NNNum`` folder: 10x HDF5 matrix, positions and scale factors."""
    import h5py
    import pandas as pd
    from scipy import sparse

    sq = root / f"square_{bin_um:03d}um"
    (sq / "spatial").mkdir(parents=True, exist_ok=True)
    genes = genes or [f"G{i}" for i in range(counts.shape[1])]
    barcodes = [f"s_{bin_um:03d}um_{r:05d}_{c:05d}-1" for r, c in zip(rows, cols, strict=True)]
    mat = sparse.csc_matrix(counts.T.astype(np.int32))
    with h5py.File(sq / "filtered_feature_bc_matrix.h5", "w") as f:
        m = f.create_group("matrix")
        m.create_dataset("barcodes", data=np.array(barcodes, dtype="S"))
        m.create_dataset("data", data=mat.data)
        m.create_dataset("indices", data=mat.indices.astype(np.int64))
        m.create_dataset("indptr", data=mat.indptr.astype(np.int64))
        m.create_dataset("shape", data=np.array(mat.shape, np.int32))
        ft = m.create_group("features")
        ft.create_dataset("id", data=np.array([f"ENSG{i:05d}" for i in range(len(genes))], "S"))
        ft.create_dataset("name", data=np.array(genes, "S"))
        ft.create_dataset("feature_type", data=np.array(["Gene Expression"] * len(genes), "S"))
    px = bin_um / mpp
    n_extra = extra_positions  # bins outside tissue: in the positions, not in the matrix
    table = pd.DataFrame({
        "barcode": barcodes + [f"s_{bin_um:03d}um_99999_{k:05d}-1" for k in range(n_extra)],
        "in_tissue": [1] * len(barcodes) + [0] * n_extra,
        "array_row": np.r_[rows, np.full(n_extra, 0)].astype(np.int32),
        "array_col": np.r_[cols, np.arange(n_extra)].astype(np.int32),
        "pxl_row_in_fullres": np.r_[(rows + 0.5) * px, np.full(n_extra, px / 2)],
        "pxl_col_in_fullres": np.r_[(cols + 0.5) * px, (np.arange(n_extra) + 0.5) * px],
    })  # fmt: skip
    table = table.iloc[::-1]  # Space Ranger's order is not the matrix's
    if positions == "parquet":
        table.to_parquet(sq / "spatial" / "tissue_positions.parquet")
    else:
        table.to_csv(sq / "spatial" / "tissue_positions.csv", index=False)
    sf = {"spot_diameter_fullres": px, "bin_size_um": float(bin_um), "microns_per_pixel": mpp,
          "tissue_hires_scalef": 0.2, "tissue_lowres_scalef": 0.02}  # fmt: skip
    if scalefactors is not None:
        sf = scalefactors
    (sq / "spatial" / "scalefactors_json.json").write_text(json.dumps(sf))
    return sq


@pytest.fixture
def binned(tmp_path):
    """A 6 x 5 bin grid with 3 genes at 2 µm and its 8 µm aggregate, on a 0.5 µm/px image."""
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[:6, :5]
    rows, cols = rows.ravel() + 2, cols.ravel() + 3  # tissue starts at bin (2, 3)
    counts = rng.poisson(0.7, (len(rows), 3))
    write_spaceranger(tmp_path / "binned_outputs", counts, rows, cols, extra_positions=4)
    r8, c8 = rows // 4, cols // 4
    keys = np.unique(np.c_[r8, c8], axis=0)
    agg = np.array([counts[(r8 == r) & (c8 == c)].sum(0) for r, c in keys])
    write_spaceranger(tmp_path / "binned_outputs", agg, keys[:, 0], keys[:, 1], bin_um=8)
    return tmp_path, counts, rows, cols
