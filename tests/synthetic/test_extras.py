"""Expression (Visium HD layout), NuClass trio and reports, read with their real readers."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from histoscope.synthetic import CELL_CLASSES, generate
from histoscope.synthetic._expression import MARKERS, NEIGHBOURHOOD, gene_panel


@pytest.fixture(scope="module")
def he(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("ex"), "he", (1024, 1024), seed=5, extras=True)


def _matrix(path):
    import h5py
    from scipy import sparse

    with h5py.File(path, "r") as f:
        m = f["matrix"]
        shape = tuple(m["shape"][:])
        mat = sparse.csc_matrix((m["data"][:], m["indices"][:], m["indptr"][:]), shape=shape)
        names = [n.decode() for n in m["features/name"][:]]
        assert {v.decode() for v in m["features/feature_type"][:]} == {"Gene Expression"}
        assert len(m["features/id"]) == len(m["features/genome"]) == shape[0]
        barcodes = [b.decode() for b in m["barcodes"][:]]
    return mat, names, barcodes


def test_visium_matrix_is_a_sparse_zinb_panel(he):
    ex = dict(he.extras)
    mat, names, barcodes = _matrix(ex["visium_matrix"])
    assert len(names) >= 50 and names == gene_panel()
    assert mat.shape == (len(names), len(barcodes))
    zeros = 1 - mat.nnz / np.prod(mat.shape)
    assert 0.95 <= zeros < 0.999
    assert mat.data.min() >= 1 and mat.data.dtype.kind == "i"
    positions = ex["visium_positions"]
    if str(positions).endswith(
        ".parquet"
    ):  # Space Ranger's own format, read as Space Ranger users do
        import pyarrow.parquet as pq

        rows = pq.read_table(positions).to_pylist()
    else:
        with open(positions) as fh:
            rows = list(csv.DictReader(fh))
    assert [r["barcode"] for r in rows] == barcodes
    sf = json.loads(ex["visium_scalefactors"].read_text())
    assert sf["bin_size_um"] == 2.0 and sf["microns_per_pixel"] == 0.5
    assert sf["spot_diameter_fullres"] == pytest.approx(4.0)
    r0 = rows[0]
    assert barcodes[0] == f"s_002um_{int(r0['array_row']):05d}_{int(r0['array_col']):05d}-1"
    assert float(r0["pxl_row_in_fullres"]) == pytest.approx((int(r0["array_row"]) + 0.5) * 4)


def _bins_at_cells(he):
    mat, names, barcodes = _matrix(dict(he.extras)["visium_matrix"])
    col = {b: i for i, b in enumerate(barcodes)}
    cells = list(csv.DictReader(open(he.cells_csv)))
    idx, cls = [], []
    for c in cells:
        b = f"s_002um_{int(float(c['y']) // 4):05d}_{int(float(c['x']) // 4):05d}-1"
        if b in col:
            idx.append(col[b])
            cls.append(c["class"])
    return mat.tocsr()[:, idx].toarray(), names, np.array(cls)


def test_marker_genes_follow_the_cell_class(he):
    counts, names, cls = _bins_at_cells(he)
    for name in ("tumour", "lymphocyte", "fibroblast"):
        here = cls == name
        if here.sum() < 30:
            continue
        markers = [names.index(g) for g in MARKERS[name]]
        others = [names.index(g) for n, gs in MARKERS.items() if n != name for g in gs
                  if g not in MARKERS[name]]  # fmt: skip
        assert counts[markers][:, here].mean() > 5 * counts[others][:, here].mean(), name


def test_neighbourhood_genes_follow_the_neighbourhood():
    from histoscope.synthetic._cells import make_context
    from histoscope.synthetic._expression import _programmes, expected_counts
    from histoscope.synthetic._params import sample_params
    from histoscope.synthetic._truth import collect_cells

    ctx = make_context(sample_params("he", 5, (1024, 1024), 0.5))
    cells = collect_cells(ctx)
    mu, rc, genes, source = expected_counts(ctx, cells)
    prog = _programmes(ctx, cells, (256, 256), 4.0)
    same = source == CELL_CLASSES.index("tumour")  # one class: only the neighbourhood varies
    assert same.sum() > 500
    marker = genes.index(MARKERS["tumour"][0])
    tested = 0
    for name, gs in NEIGHBOURHOOD.items():
        s = prog[name][rc[same, 0], rc[same, 1]]
        if s.std() < 0.02:
            continue
        tested += 1
        assert np.corrcoef(s, mu[same, genes.index(gs[0])])[0, 1] > 0.6, name
        assert abs(np.corrcoef(s, mu[same, marker])[0, 1]) < 0.3, name
    assert tested >= 2


def test_nuclass_trio_reads_like_the_reference_loader(he):
    import h5py
    import pandas as pd

    ex = dict(he.extras)
    df = pd.read_json(ex["nuclass_annotations"], orient="index")
    assert {"class_id", "tissue_type"} <= set(df.columns)
    assert set(df["class_id"]) <= set(CELL_CLASSES) and len(df) >= 8
    keys = [str(k) for k in df.index]
    for size, path in ((224, ex["nuclass_patches_224"]), (1024, ex["nuclass_patches_1024"])):
        with h5py.File(path, "r") as f:
            assert [k.decode() for k in f["keys"][:]] == keys
            img = f["images"][0]
            assert img.shape == (size, size, 3) and img.dtype == np.uint8
            c = size // 2
            centre = f["images"][:, c - 2 : c + 3, c - 2 : c + 3].astype(float).mean()
            ring = f["images"][:, c - 40 : c + 41 : 80, c - 40 : c + 41 : 80].astype(float).mean()
            assert centre < ring - 20  # each patch is centred on a nucleus


def test_report_states_the_truth_in_varied_words(he, tmp_path):
    from histoscope.synthetic._report import write_report

    rep = json.loads(dict(he.extras)["report"].read_text())
    label = he.read_label()
    f = rep["findings"]
    assert f["malignant"] == label["malignant"]
    assert f["tumour_percent"] == pytest.approx(100 * label["tumour_fraction"], abs=0.05)
    if label["malignant"]:
        assert f["diagnosis"] in rep["report"] or "carcinoma" in rep["report"]
    texts = {write_report(f, seed) for seed in range(12)}
    assert len(texts) >= 6
    ihc = generate(tmp_path, "ihc", (512, 512), seed=21, extras=True)
    text = json.loads(dict(ihc.extras)["report"].read_text())["report"]
    assert ihc.read_label()["params"]["antibody"] in text
