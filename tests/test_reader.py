"""The napari reader contribution, without a viewer."""

from __future__ import annotations

import itertools

import pytest

from histoscope._reader import get_reader
from histoscope.errors import SlideError
from histoscope.layers import SLIDE_KEY


def test_reader_builds_multiscale_layer_in_um(pyramid_tiff):
    reader = get_reader(str(pyramid_tiff))
    assert reader is not None
    [(data, kwargs, layer_type)] = reader(str(pyramid_tiff))
    assert layer_type == "image"
    assert kwargs["multiscale"] and kwargs["rgb"]
    assert kwargs["scale"] == (0.5, 0.5)
    assert next(d.shape[:2] for d in data) == (1536, 2304)
    assert all(a.shape[0] > b.shape[0] for a, b in itertools.pairwise(data))
    assert kwargs["metadata"][SLIDE_KEY]["mpp"] == 0.5


@pytest.mark.parametrize(
    "name", ["notes.txt", "scan.czi", "noext", "missing_dir/"], ids=["txt", "czi", "noext", "dir"]
)
def test_get_reader_declines_what_it_cannot_read(tmp_path, name):
    p = tmp_path / name
    if not name.endswith("/"):
        p.write_bytes(b"hello")
    assert get_reader(str(p)) is None


def test_get_reader_never_raises_on_odd_input(tmp_path):
    assert get_reader([]) is None
    assert get_reader(str(tmp_path / "does-not-exist.xyz")) is None


def test_reader_reports_bad_slide_with_path(tmp_path):
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"this is not a slide at all" * 10)
    reader = get_reader(str(bad))
    assert reader is not None  # cheap: decided by name
    with pytest.raises(SlideError, match=r"broken\.svs"):
        reader(str(bad))
