"""Sessions: products computed once, feature tables kept in the folder and reused."""

from __future__ import annotations

import numpy as np
import pytest

import histoscope as hs
from histoscope.session import SessionError, default_folder


@pytest.fixture(scope="module")
def he(tmp_path_factory):
    from histoscope.synthetic import generate

    return generate(tmp_path_factory.mktemp("he"), kind="he", size=(1024, 1024), seed=4).slide


def test_default_folder_is_beside_the_slide(he):
    with hs.open_session(he) as s:
        assert s.folder == default_folder(he) == he.with_name(he.name + ".histoscope")
        assert s.slide.path == he


def test_a_bare_slide_given_to_a_task_gets_an_in_memory_session(he):
    slide = hs.open_slide(he)
    res = hs.tasks.run("tissue", slide)
    assert res.mask.mask.any()
    assert res.provenance.slide == str(he)


def test_products_are_computed_once_per_params(he):
    from histoscope.tissue import TissueParams

    s = hs.open_session(he, in_memory=True)
    a, b = s.tissue(), s.tissue()
    assert a is b and s.computed["tissue"] == 1
    s.tissue(TissueParams(channel="grey"))
    assert s.computed["tissue"] == 2
    s.grid(1.0, 128)
    s.grid(1.0, 128)
    assert s.computed["grid"] == 1


def test_tissue_task_sets_the_mask_later_tasks_use(he):
    s = hs.open_session(he, in_memory=True)
    hs.tasks.run("tissue", s, min_area_um2=1e9)  # nothing is that large: empty mask
    assert not s.tissue().mask.any()
    with pytest.raises(ValueError, match="no tissue tiles"):
        hs.tasks.run("mil", s)


def test_feature_table_is_kept_in_the_folder_and_reused(he, tmp_path):
    from histoscope.features import FeatureTable, registry_features
    from histoscope.progress import drive

    fm = registry_features("test_cnn", {"tile_size": 32, "mpp": 4.0}, seed=3)
    with hs.open_session(he, tmp_path / "sess") as s:
        grid = s.grid(fm.spec.mpp, fm.spec.tile_size)
        first = drive(s.iter_features(fm, grid))
        path = s.feature_path(fm, grid)
    assert path.is_file() and s.computed["features"] == 1
    on_disk = FeatureTable.load(path)
    np.testing.assert_array_equal(on_disk.coords, grid.coords)
    np.testing.assert_allclose(on_disk.features, first.features)
    assert on_disk.attrs["patch_size"] == 32 and on_disk.attrs["mpp"] == 4.0
    assert on_disk.attrs["patch_size_level0"] == pytest.approx(grid.stride)
    with hs.open_session(he, tmp_path / "sess") as again:
        steps = []
        second = drive(again.iter_features(fm, again.grid(4.0, 32)), steps.append)
    assert again.computed["features"] == 0 and steps == []  # read back, not encoded
    np.testing.assert_allclose(second.features, first.features)


def test_a_cancelled_table_is_neither_cached_nor_written(he, tmp_path):
    from histoscope.engine import EngineParams
    from histoscope.features import registry_features
    from histoscope.progress import drive

    fm = registry_features("test_cnn", {"tile_size": 32, "mpp": 4.0}, seed=3)
    s = hs.open_session(he, tmp_path / "sess")
    grid = s.grid(4.0, 32)
    table = drive(s.iter_features(fm, grid, EngineParams(batch_size=4, workers=1)),
                  progress=lambda step: False)  # fmt: skip
    assert not table.complete and table.done.sum() == 4
    assert not s.feature_path(fm, grid).exists() and s.computed["features"] == 0


def test_read_only_folder_names_the_way_out(he, tmp_path, monkeypatch):
    import os

    real = os.access
    ro = tmp_path / "ro"
    ro.mkdir()
    monkeypatch.setattr(os, "access", lambda p, m: False if str(p).startswith(str(ro)) else
                        real(p, m))  # fmt: skip
    with pytest.raises(SessionError, match=r"read-only.*folder=.*--session-dir"):
        hs.open_session(he, ro / "case.histoscope")
    with pytest.raises(SessionError, match="read-only"):
        hs.open_session(he, ro)


def test_a_replaced_slide_does_not_get_the_old_feature_table(tmp_path):
    import os

    from PIL import Image

    from histoscope.features import registry_features
    from histoscope.progress import drive

    rng = np.random.default_rng(0)
    img = np.full((1024, 1024, 3), 240, np.uint8)
    tissue = rng.normal((180, 60, 150), 25, (768, 768, 3))
    img[128:896, 128:896] = np.clip(tissue, 0, 255).astype(np.uint8)
    path = tmp_path / "case.png"
    Image.fromarray(img).save(path)
    fm = registry_features("test_cnn", {"tile_size": 32, "mpp": 4.0}, seed=3)

    def table():
        with hs.open_session(path, tmp_path / "sess", mpp=0.5) as s:
            return drive(s.iter_features(fm, s.grid(4.0, 32, 0.0))), s.computed["features"]

    first, n1 = table()
    Image.fromarray(img[:, :, [1, 0, 2]].copy()).save(path)  # same size, other pixels
    os.utime(path, ns=(1, 1))
    second, n2 = table()
    assert n1 == 1 and n2 == 1  # encoded again, not served from the folder
    assert not np.allclose(first.features, second.features)
