"""Gene expression per 2 µm bin, written as Space Ranger's binned output.

Each bin takes the profile of the cell covering it (or of the extracellular
compartment), plus neighbourhood programmes that no single cell predicts:
interferon response near lymphocytes, hypoxia near necrosis, and an invasion
programme at the tumour border. Counts are zero-inflated negative binomial
draws, so a 2 µm map is almost all zeros, as Visium HD's is.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from histoscope.synthetic._cells import SlideContext
from histoscope.synthetic._constants import CELL_CLASSES, NECROSIS, STROMA

BIN_UM = 2.0

#: Marker genes per cell class (their mean rises sharply in that class).
MARKERS: dict[str, tuple[str, ...]] = {
    "tumour": ("EPCAM", "KRT8", "KRT18", "CEACAM5", "MKI67", "TOP2A"),
    "epithelial": ("EPCAM", "KRT8", "KRT20", "MUC2", "CDH1", "LGR5"),
    "lymphocyte": ("PTPRC", "CD3E", "CD3D", "CD2", "IL7R", "MS4A1"),
    "plasma_cell": ("PTPRC", "MZB1", "JCHAIN", "IGKC", "SDC1"),
    "neutrophil": ("PTPRC", "CSF3R", "FCGR3B", "S100A8", "S100A9"),
    "macrophage": ("PTPRC", "CD68", "CD163", "LYZ", "C1QA", "C1QB"),
    "fibroblast": ("COL1A1", "COL1A2", "COL3A1", "DCN", "LUM"),
    "smooth_muscle": ("ACTA2", "DES", "MYH11", "CNN1", "TAGLN"),
    "endothelial": ("PECAM1", "VWF", "CDH5", "CLDN5", "KDR"),
}
#: Genes driven by the neighbourhood, not by the class of the cell itself.
NEIGHBOURHOOD: dict[str, tuple[str, ...]] = {
    "immune_density": ("CXCL9", "CXCL10", "HLA-DRA", "STAT1", "GBP1"),
    "hypoxia": ("VEGFA", "CA9", "SLC2A1", "NDRG1"),
    "tumour_border": ("VIM", "SNAI2", "TGFBI", "MMP7"),
}
HOUSEKEEPING = ("ACTB", "GAPDH", "B2M", "MALAT1", "RPLP0")


def gene_panel() -> list[str]:
    """The gene names, markers first, in a fixed order (>= 50 genes)."""
    genes = [g for gs in MARKERS.values() for g in gs]
    genes += [g for gs in NEIGHBOURHOOD.values() for g in gs] + list(HOUSEKEEPING)
    return list(dict.fromkeys(genes))


def _profiles(genes: list[str]) -> np.ndarray:
    """Mean counts per 2 µm bin: rows = classes + extracellular (stroma / other)."""
    g = {n: i for i, n in enumerate(genes)}
    prof = np.full((len(CELL_CLASSES) + 2, len(genes)), 0.002)
    for c, name in enumerate(CELL_CLASSES):
        for m in MARKERS[name]:
            prof[c, g[m]] = 0.25
    prof[len(CELL_CLASSES), [g[n] for n in ("COL1A1", "COL3A1", "DCN")]] = 0.03  # matrix
    for h in HOUSEKEEPING:
        prof[: len(CELL_CLASSES), g[h]] = 0.08
        prof[len(CELL_CLASSES) :, g[h]] = 0.01
    return prof


def _programmes(ctx: SlideContext, cells: dict, shape: tuple[int, int], bin_px: float):
    """Per-bin strengths of the three neighbourhood programmes, each in [0, 1]."""
    lay = ctx.layout
    immune = np.isin(cells["cls"], [CELL_CLASSES.index(n) for n in
                                    ("lymphocyte", "plasma_cell", "neutrophil", "macrophage")])  # fmt: skip
    grid = np.zeros(shape)
    by = np.clip((cells["y"][immune] / bin_px).astype(int), 0, shape[0] - 1)
    bx = np.clip((cells["x"][immune] / bin_px).astype(int), 0, shape[1] - 1)
    np.add.at(grid, (by, bx), 1.0)
    sigma = 25.0 / BIN_UM
    dens = ndi.gaussian_filter(grid, sigma) * (2 * np.pi * sigma**2)  # immune cells within ~25 µm
    immune_p = 1 - np.exp(-dens / 6.0)
    map_um = lay.map_px * ctx.params.mpp
    nec = lay.types == NECROSIS
    d_nec = ndi.distance_transform_edt(~nec) * map_um if nec.any() else np.full(nec.shape, 1e9)
    tum = lay.tumour_mask
    if tum.any() and (~tum).any():
        inner, outer = ndi.distance_transform_edt(tum), ndi.distance_transform_edt(~tum)
        d_border = np.where(tum, inner, outer) * map_um
    else:
        d_border = np.full(tum.shape, 1e9)
    yy = (np.arange(shape[0]) + 0.5) * bin_px
    xx = (np.arange(shape[1]) + 0.5) * bin_px
    my = np.clip((yy / lay.map_px).astype(int), 0, tum.shape[0] - 1)[:, None]
    mx = np.clip((xx / lay.map_px).astype(int), 0, tum.shape[1] - 1)[None, :]
    hypoxia = np.exp(-d_nec[my, mx] / 120.0)
    border = np.exp(-d_border[my, mx] / 60.0)
    return {"immune_density": immune_p, "hypoxia": hypoxia, "tumour_border": border}


def expected_counts(ctx: SlideContext, cells: dict):
    """Expected counts of the tissue bins.

    Returns
    -------
    tuple
        ``mu`` ``(n_bins, n_genes)``, bin grid index ``(n_bins, 2)`` as (row,
        col), gene names, and each bin's source: a cell class id, or
        ``len(CELL_CLASSES)`` for stroma matrix, ``+ 1`` for other tissue.
    """
    from scipy.spatial import cKDTree

    p = ctx.params
    bin_px = BIN_UM / p.mpp
    shape = (int(p.shape[0] // bin_px), int(p.shape[1] // bin_px))
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    cy, cx = (rows + 0.5) * bin_px, (cols + 0.5) * bin_px
    types = ctx.layout.type_at(cy.astype(np.int64), cx.astype(np.int64))
    tissue = types != 0
    genes = gene_panel()
    prof = _profiles(genes)
    cls = np.where(types == STROMA, len(CELL_CLASSES), len(CELL_CLASSES) + 1)
    if len(cells["x"]):
        area = np.abs(np.sum(cells["polygon"][..., 0] * np.roll(cells["polygon"][..., 1], -1, 1)
                             - np.roll(cells["polygon"][..., 0], -1, 1) * cells["polygon"][..., 1],
                             axis=1)) / 2  # fmt: skip
        radius = 1.3 * np.sqrt(area / np.pi) + bin_px / 2  # nucleus plus a rim of cytoplasm
        tree = cKDTree(np.c_[cells["y"], cells["x"]])
        dist, idx = tree.query(np.c_[cy[tissue], cx[tissue]], k=1)
        inside = dist < radius[idx]
        sub = cls[tissue]
        sub[inside] = cells["cls"][idx[inside]]
        cls[tissue] = sub
    prog = _programmes(ctx, cells, shape, bin_px)
    mu = prof[cls[tissue]]
    g = {n: i for i, n in enumerate(genes)}
    is_cell = cls[tissue] < len(CELL_CLASSES)
    tumour_cell = cls[tissue] == CELL_CLASSES.index("tumour")
    for name, gs in NEIGHBOURHOOD.items():
        s = prog[name][tissue]
        gain = 0.35 * s * np.where(tumour_cell, 1.0, np.where(is_cell, 0.4, 0.1))
        for gene in gs:
            mu[:, g[gene]] += gain
    yy, xx = cy[tissue].astype(np.int64), cx[tissue].astype(np.int64)
    mu *= np.exp(0.25 * ctx.coarse.sample(yy, xx))[:, None]  # smooth capture efficiency
    return mu, np.c_[rows[tissue], cols[tissue]], genes, cls[tissue]


def sample_zinb(rng: np.random.Generator, mu: np.ndarray, theta: np.ndarray, pi: float):
    """Zero-inflated negative binomial counts with mean ``(1 - pi) * mu`` per entry."""
    lam = rng.gamma(theta[None, :], mu / theta[None, :])
    counts = rng.poisson(lam)
    counts[rng.random(counts.shape) < pi] = 0
    return counts.astype(np.int32)


def write_visium_hd(ctx: SlideContext, cells: dict, out: Path) -> dict[str, Path]:
    """Write ``square_002um`` binned output: 10x HDF5 matrix, positions, scale factors.

    Returns
    -------
    dict
        ``matrix``, ``positions`` and ``scalefactors`` paths.
    """
    import h5py
    from scipy import sparse

    p = ctx.params
    mu, rc, genes, _ = expected_counts(ctx, cells)
    rng = np.random.default_rng([p.seed, 0xE0])
    theta = rng.uniform(0.6, 2.5, len(genes))
    counts = sample_zinb(rng, mu, theta, pi=0.3)
    mat = sparse.csc_matrix(counts.T)  # features x barcodes, one column per bin
    sq = out / "square_002um"
    spatial = sq / "spatial"
    spatial.mkdir(parents=True, exist_ok=True)
    barcodes = [f"s_002um_{r:05d}_{c:05d}-1" for r, c in rc]
    h5 = sq / "filtered_feature_bc_matrix.h5"
    with h5py.File(h5, "w") as f:
        f.attrs["filetype"] = "matrix"
        f.attrs["version"] = 2
        f.attrs["library_ids"] = np.array([b"histoscope_synthetic"])
        f.attrs["chemistry_description"] = "Visium HD v1 (synthetic)"
        m = f.create_group("matrix")
        m.create_dataset("barcodes", data=np.array(barcodes, dtype="S"))
        m.create_dataset("data", data=mat.data.astype(np.int32), compression="gzip")
        m.create_dataset("indices", data=mat.indices.astype(np.int64), compression="gzip")
        m.create_dataset("indptr", data=mat.indptr.astype(np.int64))
        m.create_dataset("shape", data=np.array(mat.shape, dtype=np.int32))
        ft = m.create_group("features")
        ft.create_dataset("id", data=np.array([f"SYN{i:05d}" for i in range(len(genes))], "S"))
        ft.create_dataset("name", data=np.array(genes, dtype="S"))
        ft.create_dataset("feature_type", data=np.array(["Gene Expression"] * len(genes), "S"))
        ft.create_dataset("genome", data=np.array(["GRCh38"] * len(genes), "S"))
        ft.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
    bin_px = BIN_UM / p.mpp
    pos = _write_positions(spatial, barcodes, rc, bin_px)
    sf = spatial / "scalefactors_json.json"
    big = max(p.shape)
    sf.write_text(json.dumps({
        "spot_diameter_fullres": bin_px,
        "bin_size_um": BIN_UM,
        "microns_per_pixel": p.mpp,
        "tissue_hires_scalef": 6000 / big if big > 6000 else 1.0,
        "tissue_lowres_scalef": 600 / big,
        "fiducial_diameter_fullres": bin_px * 10,
        "regist_target_img_scalef": 1.0,
    }, indent=1))  # fmt: skip
    return {"matrix": h5, "positions": pos, "scalefactors": sf}


def _write_positions(spatial: Path, barcodes: list[str], rc: np.ndarray, bin_px: float) -> Path:
    """``tissue_positions.parquet`` when pyarrow is present, else the CSV Space Ranger also writes."""
    cols = {
        "barcode": barcodes,
        "in_tissue": np.ones(len(barcodes), np.int32),
        "array_row": rc[:, 0].astype(np.int32),
        "array_col": rc[:, 1].astype(np.int32),
        "pxl_row_in_fullres": (rc[:, 0] + 0.5) * bin_px,
        "pxl_col_in_fullres": (rc[:, 1] + 0.5) * bin_px,
    }
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        path = spatial / "tissue_positions.csv"
        with open(path, "w", newline="") as fh:
            wr = csv.writer(fh)
            wr.writerow(list(cols))
            for k in range(len(barcodes)):
                wr.writerow([barcodes[k], 1, int(rc[k, 0]), int(rc[k, 1]),
                             f"{cols['pxl_row_in_fullres'][k]:.2f}",
                             f"{cols['pxl_col_in_fullres'][k]:.2f}"])  # fmt: skip
        return path
    path = spatial / "tissue_positions.parquet"
    pq.write_table(pa.table(cols), path)
    return path
