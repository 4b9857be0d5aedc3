"""Bins AnnData export: streamed from the stack chunk row by chunk row, sparse only when sparse."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest


def _stack(path, values, chunk=32):
    """A stack whose level 0 is ``values`` ``(G, H, W)`` (NaN = not predicted)."""
    from histoscope.expression.stack import StackWriter

    g, h, w = values.shape
    sw = StackWriter(path, [f"G{i}" for i in range(g)], (h, w), 2.0, 0.5, 16, chunk,
                     max_top=64)  # fmt: skip
    sw.levels[0][...] = values
    sw.close(complete=True)
    return path


def _values(rng, g, h, w, sparse_frac):
    v = rng.random((g, h, w)).astype(np.float32) + 0.01
    v[rng.random((g, h, w)) < sparse_frac] = 0.0
    v[:, : h // 4, : w // 3] = np.nan  # background: not predicted
    return v


@pytest.mark.parametrize(("zeros", "fmt"), [(0.9, "csr"), (0.05, "dense")])
def test_bins_match_the_stack_and_x_is_sparse_only_when_sparse(tmp_path, zeros, fmt):
    import anndata as ad
    from scipy import sparse

    from histoscope.expression.bins_h5ad import write_bins_h5ad
    from histoscope.expression.stack import open_levels

    v = _values(np.random.default_rng(1), 3, 72, 40, zeros)
    stack = _stack(tmp_path / "s.ome.zarr", v)
    lv0 = np.asarray(open_levels(stack)[0])
    for b, k in ((2, 1), (8, 4)):
        a = ad.read_h5ad(write_bins_h5ad(stack, tmp_path / f"b{b}.h5ad", b, uns={"x": 1}))
        # 2 µm keeps the stack's zeros; summing 16 of them into 8 µm fills nearly every value
        got = fmt if b == 2 else "dense"
        assert a.uns["histoscope"]["x_format"] == got and a.uns["histoscope"]["x"] == 1
        assert sparse.issparse(a.X) == (got == "csr")
        x = a.X.toarray() if sparse.issparse(a.X) else np.asarray(a.X)
        r, c = a.obs["array_row"].to_numpy(), a.obs["array_col"].to_numpy()
        hh, ww = -(-72 // k), -(-40 // k)
        pad = np.pad(lv0, ((0, 0), (0, hh * k - 72), (0, ww * k - 40)), constant_values=np.nan)
        blk = pad.reshape(3, hh, k, ww, k)
        has = np.isfinite(blk).all(0).any(axis=(1, 3))
        assert len(r) == has.sum() and has[r, c].all()
        want = np.nansum(blk, axis=(2, 4))[:, r, c].T
        want[want < 1e-3] = 0
        np.testing.assert_allclose(x, want, rtol=1e-6)
        assert a.obs_names[0] == f"s_{b:03d}um_{r[0]:05d}_{c[0]:05d}"
        np.testing.assert_allclose(a.obsm["spatial"][:, 1], (r + 0.5) * k * 2 - 0.25)
        assert list(a.var_names) == ["G0", "G1", "G2"]


def _peak(tmp_path, name, rows, warm=False):
    from histoscope.expression.bins_h5ad import write_bins_h5ad

    v = _values(np.random.default_rng(2), 8, 64 * rows, 256, 0.9)
    stack = _stack(tmp_path / f"{name}.ome.zarr", v, chunk=64)
    del v
    if warm:  # imports and caches outside the count
        write_bins_h5ad(stack, tmp_path / "warm.h5ad", 2)
    tracemalloc.start()
    try:
        write_bins_h5ad(stack, tmp_path / f"{name}.h5ad", 2)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_number_of_chunk_rows(tmp_path):
    small, large = _peak(tmp_path, "two", 2, warm=True), _peak(tmp_path, "eight", 8)
    assert large < 1.25 * small, (small, large)  # the whole table in memory: ~4x
