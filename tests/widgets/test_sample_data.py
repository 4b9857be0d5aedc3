"""Sample data offered in napari's File > Open Sample menu."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.mark.parametrize("key", ["synthetic-he", "synthetic-ihc"])
def test_synthetic_samples_generate_once_into_the_cache(
    make_napari_viewer, tmp_path, monkeypatch, key
):
    monkeypatch.setenv("HISTOSCOPE_CACHE", str(tmp_path))
    viewer = make_napari_viewer()
    [layer] = viewer.open_sample("napari-histoscope", key)
    assert layer.multiscale and layer.rgb
    np.testing.assert_allclose(layer.scale, (0.5, 0.5))
    made = sorted(p.name for p in tmp_path.rglob("*.tif"))
    assert len(made) == 1
    viewer.open_sample("napari-histoscope", key)  # second time: from the cache
    assert sorted(p.name for p in tmp_path.rglob("*.tif")) == made


def test_skimage_ihc_sample(make_napari_viewer):
    viewer = make_napari_viewer()
    [layer] = viewer.open_sample("napari-histoscope", "skimage-ihc")
    assert layer.data.shape == (512, 512, 3)
