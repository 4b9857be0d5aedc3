"""The expression task: a stack written tile by tile, layers on the slide, exports, per-cell means."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import histoscope as hs
from histoscope.params import ParamError

GENES = [f"G{i}" for i in range(5)]


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    from histoscope.synthetic import generate

    return generate(tmp_path_factory.mktemp("he"), "he", (512, 512), seed=11, mpp=0.5).slide


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    import torch

    from histoscope.checkpoints import save_checkpoint
    from histoscope.models.expression import ExpressionModel

    torch.manual_seed(0)
    m = ExpressionModel(GENES, scales_um=[2, 8, 32], dim=16, heads=8, widths=(8, 16)).eval()
    with torch.no_grad():
        m.decoder[-1].bias[: len(GENES)] += 1.0  # means well above the export threshold
    card = {"family": "expression", "config": m.config,
            "input_spec": {"mean": [0.5] * 3, "std": [0.25] * 3}}  # fmt: skip
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "e.safetensors", m, card)


def _direct(slide_path, ckpt, origin):
    """One patch predicted straight from read_region, not through the engine or the stack."""
    import torch

    from histoscope.checkpoints import load_checkpoint
    from histoscope.slide import open_slide

    model, _ = load_checkpoint(ckpt, "expression")
    s = open_slide(slide_path)
    b = 2.0 / s.mpp
    cy, cx = (origin + 8) * b  # patch centre, level-0 px
    xs = []
    for v in model.views():
        f = v["mpp"] / s.mpp
        q = max(int(round(f)), 1)
        ox = int(np.round((cx - v["size_px"] * f / 2) / q) * q)
        oy = int(np.round((cy - v["size_px"] * f / 2) / q) * q)
        img = s.read_region(ox, oy, v["size_px"], v["size_px"], mpp=v["mpp"])
        t = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
        xs.append((t - 0.5) / 0.25)
    with torch.no_grad():
        return model.expected(model(xs))[0].numpy()


def test_a_region_is_written_into_the_stack_and_matches_a_direct_prediction(slide, ckpt, tmp_path):
    from histoscope.expression.stack import open_levels

    session = hs.open_session(slide, tmp_path / "sess")
    res = hs.tasks.run("expression", session, ckpt, region=(64, 64, 100, 100), genes="G1,G3")
    assert res.stack.parent == tmp_path / "sess" / "expression" and res.shown == ("G1", "G3")
    lv0 = np.asarray(open_levels(res.stack)[0])
    assert lv0.shape == (5, 128, 128)  # 512 px at 0.5 µm/px = 128 bins of 2 µm
    rows, cols = np.nonzero(np.isfinite(lv0[0]))
    # only tissue patches (16 bins = 64 px) touching x, y in [64, 164) px
    assert len(rows) and rows.min() >= 16 and rows.max() <= 47
    assert cols.min() >= 16 and cols.max() <= 47
    n = res.summary()["patches"]["total"]
    assert len(rows) == n * 256 and res.summary()["patches"] == {"total": n, "done": n}
    r0, c0 = rows[0] // 16 * 16, cols[0] // 16 * 16
    np.testing.assert_allclose(lv0[:, r0 : r0 + 16, c0 : c0 + 16],
                               _direct(slide, ckpt, np.array([r0, c0])), rtol=1e-2, atol=1e-6)  # fmt: skip
    assert not res.summary()["complete"]


def test_patches_in_any_order_give_the_pyramid_of_the_whole(tmp_path):
    from histoscope.export.omezarr import pyramid
    from histoscope.expression.stack import StackWriter, open_levels

    rng = np.random.default_rng(0)
    full = np.full((2, 40, 40), np.nan, np.float32)
    origins = np.array([(r, c) for r in range(0, 40, 4) for c in range(0, 40, 4)
                        if rng.random() < 0.7])  # fmt: skip
    w = StackWriter(tmp_path / "s.ome.zarr", ["a", "b"], (40, 40), 2.0, 0.5, 4, chunk=8,
                    max_top=8)  # fmt: skip
    w.expect(origins)
    for k in rng.permutation(len(origins)):
        v = rng.random((1, 2, 4, 4)).astype(np.float32)
        r, c = origins[k]
        full[:, r : r + 4, c : c + 4] = v[0]
        w.write(origins[k : k + 1], v)
    assert not w._bufs  # every chunk left memory when its last patch came in
    w.close(complete=True)
    got = [np.asarray(a) for a in open_levels(tmp_path / "s.ome.zarr")]
    want = pyramid(np.moveaxis(full, 0, -1), "mean", 8)
    assert [g.shape[1] for g in got] == [40, 20, 10, 5]
    for g, ref in zip(got, want, strict=True):  # values keep 7 mantissa bits: < 1% off
        np.testing.assert_allclose(g, np.moveaxis(ref, -1, 0), rtol=1e-2)


def test_cancel_keeps_the_patches_written_and_a_rerun_predicts_only_the_rest(slide, ckpt, tmp_path):
    from histoscope.engine import EngineParams

    session = hs.open_session(slide, tmp_path / "sess")
    stop = threading.Event()

    def progress(step):
        if step.total:
            stop.set()

    ep = EngineParams(batch_size=2, workers=1, prefetch=1)
    res = hs.tasks.run("expression", session, ckpt, progress=progress, cancel=stop, engine=ep,
                       near=(300.0, 300.0))  # fmt: skip
    total = res.patches["total"]
    assert res.cancelled and res.patches["done"] == 2 < total
    from histoscope.expression.stack import open_levels

    assert np.isfinite(np.asarray(open_levels(res.stack)[0])[0]).sum() == 2 * 256
    steps = []
    again = hs.tasks.run("expression", session, ckpt, progress=steps.append, engine=ep)
    assert not again.cancelled and again.summary()["complete"]
    assert max(s.total for s in steps if s.what == "expression patches") == total
    assert [s.done for s in steps if s.total][0] == 4  # started from the 2 kept, batch of 2


def test_layers_sit_on_the_slide_at_two_microns(slide, ckpt, tmp_path):
    res = hs.tasks.run("expression", hs.open_session(slide, tmp_path / "s"), ckpt,
                       genes="G0,G2,G4")  # fmt: skip
    layers = res.to_layers()
    assert [k["name"] for _, k, _ in layers] == ["G0 (2 µm)", "G2 (2 µm)", "G4 (2 µm)"]
    cmaps = {k["colormap"] for _, k, _ in layers}
    assert len(cmaps) == 3 and all(k["blending"] == "additive" for _, k, _ in layers)
    data, kw, kind = layers[1]
    assert kind == "image" and kw["multiscale"] and kw["scale"] == (2.0, 2.0)
    # bin (r, c) covers level-0 px [4r, 4r + 4): its centre (4r + 1.5) px is at (4r + 1.5) * 0.5 µm
    assert kw["translate"] == (0.75, 0.75)
    assert res.summary()["complete"] and res.summary()["predicted_mm2"] > 0.01
    v = np.asarray(data[-1])
    lo, hi = np.percentile(v[np.isfinite(v)], [1, 99.5])
    assert kw["contrast_limits"] == pytest.approx((lo, hi))


def test_save_writes_the_stack_and_bins_at_2_8_16_um(slide, ckpt, tmp_path):
    import anndata as ad
    from scipy import sparse

    from histoscope.expression.stack import open_levels

    res = hs.tasks.run("expression", hs.open_session(slide, tmp_path / "s"), ckpt)
    files = {p.name: p for p in res.save(tmp_path / "out")}
    assert {"expression.ome.zarr", "expression.json", "expression_bins_002um.h5ad",
            "expression_bins_008um.h5ad", "expression_bins_016um.h5ad"} <= set(files)  # fmt: skip
    lv0 = np.asarray(open_levels(files["expression.ome.zarr"])[0])
    a8 = ad.read_h5ad(files["expression_bins_008um.h5ad"])
    # every predicted value is well above min_value: dense, not a CSR matrix twice its size
    assert not sparse.issparse(a8.X) and a8.uns["histoscope"]["x_format"] == "dense"
    assert list(a8.var_names) == GENES
    r, c = a8.obs["array_row"].to_numpy()[5], a8.obs["array_col"].to_numpy()[5]
    block = np.nansum(lv0[:, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4], axis=(1, 2))
    np.testing.assert_allclose(np.asarray(a8.X[5]).ravel(), block, rtol=1e-5)
    # 8 µm bin centre in µm: (4 c + 2) bins * 2 µm - 0.25 (half a 0.5 µm pixel)
    np.testing.assert_allclose(a8.obsm["spatial"][5], [(4 * c + 2) * 2 - 0.25,
                                                       (4 * r + 2) * 2 - 0.25])  # fmt: skip
    a2 = ad.read_h5ad(files["expression_bins_002um.h5ad"])
    assert a2.n_obs == np.isfinite(lv0[0]).sum() and a2.n_vars == 5


def test_cell_expression_under_centroids_and_outlines(slide, ckpt, tmp_path):
    from histoscope.expression.stack import open_levels

    res = hs.tasks.run("expression", hs.open_session(slide, tmp_path / "s"), ckpt)
    lv0 = np.asarray(open_levels(res.stack)[0])
    from histoscope.tasks.expression import cell_expression

    x, y = np.array([130.0, 200.5]), np.array([150.0, 222.0])  # level-0 px, bins of 4 px
    one = cell_expression(res.stack, x, y)  # the bin under each centroid
    np.testing.assert_allclose(one[0], lv0[:, 37, 32])
    disc = cell_expression(res.stack, x, y, radius_px=4.5)
    rr, cc = np.mgrid[:128, :128]
    inside = ((cc + 0.5) * 4 - 130) ** 2 + ((rr + 0.5) * 4 - 150) ** 2 <= 4.5**2
    np.testing.assert_allclose(disc[0], lv0[:, inside].mean(1), rtol=1e-5)
    square = np.array([[120, 140], [140, 140], [140, 160], [120, 160]], float)
    out = cell_expression(res.stack, x[:1], y[:1], outlines=[square])
    np.testing.assert_allclose(out[0], lv0[:, 35:40, 30:35].reshape(5, -1).mean(1), rtol=1e-5)


def test_cells_by_genes_anndata(slide, ckpt, tmp_path):
    import anndata as ad

    from histoscope.expression.bins_h5ad import write_cells_h5ad
    from histoscope.tasks.expression import cell_expression

    res = hs.tasks.run("expression", hs.open_session(slide, tmp_path / "s"), ckpt)
    x, y = np.array([130.0, 200.5, 90.0]), np.array([150.0, 222.0, 300.0])
    path = write_cells_h5ad(res.stack, tmp_path / "cells.h5ad", x, y, radius_px=6.0,
                            table={"cls": ["a", "b", "a"]})  # fmt: skip
    a = ad.read_h5ad(path)
    assert (
        a.shape == (3, 5) and list(a.var_names) == GENES and list(a.obs["cls"]) == ["a", "b", "a"]
    )
    np.testing.assert_allclose(a.X, cell_expression(res.stack, x, y, radius_px=6.0), rtol=1e-6)
    np.testing.assert_allclose(a.obsm["spatial"][1], [100.25, 111.0])  # level-0 px x 0.5 µm/px


def test_bad_gene_choices_are_refused(slide, ckpt):
    with pytest.raises(ParamError, match="NOPE not among the model's genes"):
        hs.tasks.run("expression", slide, ckpt, genes="G0,NOPE")
    with pytest.raises(ParamError, match="at most 6 genes"):
        hs.tasks.run("expression", slide, ckpt, genes=",".join(GENES + ["a", "b"]))
    with pytest.raises(hs.CheckpointError, match="expected 'expression'"):
        hs.tasks.run("expression", slide, hs.tasks.get("tumour").default_checkpoint_path())


def test_a_stack_without_session_folder_is_deleted_with_the_session_and_its_results(slide, ckpt):
    import gc

    session = hs.open_session(slide, in_memory=True)
    res = hs.tasks.run("expression", session, ckpt, region=(64, 64, 40, 40))
    root = res.stack.parent
    assert res.stack.is_dir() and res.scratch.path == root
    again = hs.tasks.run("expression", session, ckpt, region=(64, 64, 40, 40))
    assert again.stack == res.stack and again.patches["done"] == again.patches["total"]
    session.close()
    del session, again
    gc.collect()
    assert res.stack.is_dir()  # the result still shows and saves it
    del res
    gc.collect()
    assert not root.exists()


@pytest.mark.parametrize("damage", ["done", "0", ".zattrs"])
def test_a_damaged_session_stack_is_rebuilt_and_named_when_read(slide, ckpt, tmp_path, damage):
    import shutil

    from histoscope.expression.spaceranger import ExpressionDataError
    from histoscope.expression.stack import open_levels

    session = hs.open_session(slide, tmp_path / "sess")
    region = (64, 64, 40, 40)
    res = hs.tasks.run("expression", session, ckpt, region=region)
    n = res.patches["total"]
    target = res.stack / damage
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.write_text("{not json")
    with pytest.raises(ExpressionDataError, match=f"{res.stack}: damaged expression stack"):
        open_levels(res.stack)
    again = hs.tasks.run("expression", session, ckpt, region=region)
    assert again.patches == {"total": n, "done": n}
    assert np.isfinite(np.asarray(open_levels(again.stack)[0])[0]).sum() == n * 256


def test_a_region_run_keeps_a_complete_stack_complete(slide, ckpt, tmp_path):
    session = hs.open_session(slide, tmp_path / "sess")
    assert hs.tasks.run("expression", session, ckpt).summary()["complete"]
    part = hs.tasks.run("expression", session, ckpt, region=(64, 64, 40, 40))
    assert part.patches["done"] == part.patches["total"] and part.summary()["complete"]


def test_the_stack_tells_ome_zarr_viewers_each_genes_window_and_shows_two(tmp_path):
    from histoscope.expression.stack import StackWriter, _open_group

    rng = np.random.default_rng(3)
    w = StackWriter(tmp_path / "s.ome.zarr", ["a", "b", "c", "d"], (16, 16), 2.0, 0.5, 4,
                    chunk=8, max_top=8)  # fmt: skip
    origins = np.array([(r, c) for r in range(0, 16, 4) for c in range(0, 16, 4)])
    vals = rng.random((len(origins), 4, 4, 4)).astype(np.float32)
    vals *= np.array([1.0, 10.0, 100.0, 0.0], np.float32)[None, :, None, None]
    w.expect(origins)
    w.write(origins, vals)
    w.close(complete=True)
    chans = dict(_open_group(tmp_path / "s.ome.zarr", "r").attrs)["omero"]["channels"]
    assert [c["active"] for c in chans] == [True, True, False, False]
    assert [c["label"] for c in chans] == ["a", "b", "c", "d"]
    top = np.asarray(w.levels[-1][...])
    for g, ch in enumerate(chans[:3]):
        lo, hi = np.percentile(top[g], [1, 99.5])
        assert ch["window"]["start"] == pytest.approx(lo) and ch["window"]["end"] == pytest.approx(
            hi
        )
        assert ch["window"]["max"] == pytest.approx(top[g].max())
    assert chans[2]["window"]["end"] > 10 * chans[1]["window"]["end"] > 0
    assert (
        chans[3]["window"]["end"] > chans[3]["window"]["start"] == 0.0
    )  # all zero: a valid window


def test_a_rerun_keeps_the_training_data_check_of_the_stack(slide, tmp_path, tmp_path_factory):
    """A rerun that predicts no patch judges the stack's stored patch features, not nothing."""
    import torch

    from histoscope.checkpoints import save_checkpoint
    from histoscope.models.expression import ExpressionModel
    from histoscope.ood import fit_reference

    torch.manual_seed(0)
    m = ExpressionModel(GENES, scales_um=[2, 8, 32], dim=16, heads=8, widths=(8, 16)).eval()
    rng = np.random.default_rng(0)
    d = 16
    ref = fit_reference([rng.normal(size=(50, d)) for _ in range(4)],
                        [rng.normal(size=(50, d)) for _ in range(4)], rank=2)  # fmt: skip
    card = {"family": "expression", "config": m.config, "data": {"ood": ref.to_dict()},
            "input_spec": {"mean": [0.5] * 3, "std": [0.25] * 3}}  # fmt: skip
    ck = save_checkpoint(tmp_path_factory.mktemp("ck") / "ood.safetensors", m, card)
    session = hs.open_session(slide, tmp_path / "sess")
    first = hs.tasks.run("expression", session, ck).summary()
    assert first["ood"]["n_items"] == first["patches"]["total"] >= 8
    again = hs.tasks.run("expression", session, ck).summary()
    assert again["patches"]["done"] == again["patches"]["total"]  # nothing predicted anew
    assert again["ood"] == first["ood"]
