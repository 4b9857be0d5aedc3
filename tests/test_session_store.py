"""Session folders on disk: layers saved and reopened exactly, crash-safe saves, wrong slides refused."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd
import pytest

import histoscope as hs
from histoscope.session import SessionError


@pytest.fixture()
def slide(tmp_path):
    from histoscope.slide import write_pyramidal_tiff

    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)
    return write_pyramidal_tiff(tmp_path / "case.tif", img, mpp=0.5, min_size=128)


def _layers():
    feats = pd.DataFrame({"class": pd.Categorical(["tumour", "stroma", "tumour"]),
                          "area": [10.0, 12.5, 9.0]})  # fmt: skip
    heat = (np.arange(16, dtype=np.float32).reshape(4, 4) / 15,
            {"name": "heat", "scale": (64.0, 64.0), "translate": (31.75, 31.75), "opacity": 0.4,
             "colormap": "magma", "contrast_limits": (0.1, 0.9), "visible": False,
             "metadata": {"histoscope": {"task": "tumour"}, "slide": object()}},
            "image")  # fmt: skip
    pts = (np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]),
           {"name": "cells", "features": feats, "face_color": np.array([[1, 0, 0, 1.0]] * 3)},
           "points")  # fmt: skip
    shapes = ([np.array([[0.0, 0], [0, 10], [10, 10]]), np.array([[5.0, 5], [5, 9], [9, 9], [9, 5]])],
              {"name": "roi", "shape_type": ["polygon", "rectangle"]}, "shapes")  # fmt: skip
    return [heat, pts, shapes]


def test_layers_round_trip_through_the_session_folder(slide, tmp_path):
    with hs.open_session(slide, tmp_path / "s") as s:
        s.save_layers(_layers(), {"opacity": 0.8, "position": 0})
    with hs.open_session(slide, tmp_path / "s") as again:
        back = again.layers()
        assert again.slide_display() == {"opacity": 0.8, "position": 0}
    assert [(k["name"], t) for _, k, t in back] == [("heat", "image"), ("cells", "points"),
                                                  ("roi", "shapes")]  # fmt: skip
    (hd, hk, _), (pd_, pk, _), (sd, sk, _) = back
    np.testing.assert_array_equal(hd, _layers()[0][0])
    assert hk["opacity"] == 0.4 and hk["visible"] is False and hk["colormap"] == "magma"
    assert list(hk["contrast_limits"]) == [0.1, 0.9] and list(hk["scale"]) == [64.0, 64.0]
    assert hk["metadata"] == {"histoscope": {"task": "tumour"}}  # the live object is not saved
    np.testing.assert_array_equal(pd_, _layers()[1][0])
    pd.testing.assert_frame_equal(pk["features"], _layers()[1][1]["features"])
    np.testing.assert_array_equal(pk["face_color"], _layers()[1][1]["face_color"])
    assert len(sd) == 2 and sk["shape_type"] == ["polygon", "rectangle"]
    np.testing.assert_array_equal(sd[1], _layers()[2][0][1])


def test_a_session_folder_of_another_slide_is_refused(slide, tmp_path):
    from histoscope.slide import write_pyramidal_tiff

    with hs.open_session(slide, tmp_path / "s") as s:
        s.save_manifest()
    other = write_pyramidal_tiff(tmp_path / "other.tif", np.zeros((512, 512, 3), np.uint8),
                                 mpp=0.5, min_size=128)  # fmt: skip
    with pytest.raises(SessionError, match="belongs to another slide"):
        hs.open_session(other, tmp_path / "s")


CHILD = textwrap.dedent(
    """
    import sys, numpy as np, histoscope as hs
    s = hs.open_session(sys.argv[1], sys.argv[2])
    small = [(np.full((4, 4), 1.0), {"name": "a"}, "image")]
    s.save_layers(small)
    print("ready", flush=True)
    big = [(np.full((2048, 2048), float(i)), {"name": f"b{i}"}, "image") for i in range(6)]
    while True:
        s.save_layers(big)
    """
)


def test_a_save_killed_midway_leaves_the_previous_complete_session(slide, tmp_path):
    folder = tmp_path / "s"
    for delay in (0.05, 0.2, 0.45):
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(slide), str(folder)],
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.kill()
        proc.wait()
        with hs.open_session(slide, folder) as s:
            layers = s.layers()  # whichever generation the manifest names is complete
        names = [k["name"] for _, k, _ in layers]
        assert names in (["a"], [f"b{i}" for i in range(6)])
        for data, kwargs, _ in layers:
            want = 1.0 if kwargs["name"] == "a" else float(kwargs["name"][1:])
            assert data.shape in ((4, 4), (2048, 2048)) and (data == want).all()


def test_expression_gene_layers_are_saved_as_a_reference_to_their_stack(tmp_path):
    from histoscope.expression.stack import StackWriter, open_levels
    from histoscope.session_store import SessionFileError, load_layer, save_layer

    values = np.random.default_rng(0).random((2, 64, 96)).astype(np.float32)
    stack = tmp_path / "expr.ome.zarr"
    sw = StackWriter(stack, ["G0", "G1"], (64, 96), 2.0, 0.5, 16, 32, max_top=16)
    sw.levels[0][...] = values
    sw.close(complete=True)
    layer = (open_levels(stack, "G1"), {"name": "G1 (2 µm)", "multiscale": True,
             "scale": (2.0, 2.0), "metadata": {"stack": str(stack), "gene": "G1"}}, "image")  # fmt: skip
    gen = tmp_path / "gen"
    gen.mkdir()
    entry = save_layer(gen, 0, layer)
    assert entry["data"] == {"$stack": str(stack), "gene": "G1"}
    with np.load(gen / entry["file"]) as npz:  # no pixels copied into the session
        assert not [k for k in npz.files if k.startswith("l")]
    data, kwargs, kind = load_layer(gen, entry)
    assert kind == "image" and tuple(kwargs["scale"]) == (2.0, 2.0)
    np.testing.assert_array_equal(np.asarray(data[0]), np.asarray(layer[0][0]))  # same pixels
    np.testing.assert_allclose(np.asarray(data[0]), values[1], rtol=0.01)  # 7-bit storage
    import shutil

    shutil.rmtree(stack)
    with pytest.raises(SessionFileError, match="G1"):
        load_layer(gen, entry)


HOLDER = textwrap.dedent(
    """
    import sys, time
    from histoscope.session_store import folder_lock
    with folder_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(120)
    """
)


def test_a_second_process_waits_then_fails_naming_folder_and_holder(slide, tmp_path, monkeypatch):
    from histoscope import session_store
    from histoscope.session_store import SessionLockedError

    folder = tmp_path / "s"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "locked"
        monkeypatch.setattr(session_store, "LOCK_TIMEOUT_S", 0.6)
        with hs.open_session(slide, folder) as s:
            t0 = time.monotonic()
            with pytest.raises(SessionLockedError, match=rf"{folder.name}.*pid {proc.pid} on "):
                s.save_layers([(np.ones((2, 2)), {"name": "mine"}, "image")])
            assert 0.5 < time.monotonic() - t0 < 10
            assert isinstance(SessionLockedError("x"), SessionError)
            assert not (folder / "session.json").exists() or not s.layers()
            proc.kill()  # the holder dies without letting go: its lock goes with it
            proc.wait()
            s.save_layers([(np.ones((2, 2)), {"name": "mine"}, "image")])
            assert [k["name"] for _, k, _ in s.layers()] == ["mine"]
    finally:
        proc.kill()
        proc.wait()


WRITER = textwrap.dedent(
    """
    import sys, numpy as np, histoscope as hs
    s = hs.open_session(sys.argv[1], sys.argv[2])
    tag = sys.argv[3]
    for i in range(24):
        s.save_layers([(np.full((64, 64), float(i)), {"name": f"{tag}{i}"}, "image")] * 3)
    print("done", flush=True)
    """
)


#: Rewrites the manifest (as the CLI does) while the writers save layers; counts the times the
#: manifest it finds under the lock names a layers folder that is gone (an old one written back).
MANIFEST_WRITER = textwrap.dedent(
    """
    import sys, time, histoscope as hs
    from histoscope import session_store
    from histoscope.session_store import folder_lock, read_manifest

    def slow_read(folder):  # a slow disk: the manifest read takes a while
        doc = read_manifest(folder)
        time.sleep(0.03)
        return doc

    session_store.read_manifest = slow_read
    s = hs.open_session(sys.argv[1], sys.argv[2])
    _ = s.fingerprint
    print("ready", flush=True)
    lost = runs = 0
    end = time.monotonic() + float(sys.argv[3])
    while time.monotonic() < end:
        s.save_manifest()
        runs += 1
        with folder_lock(s.folder):
            d = read_manifest(s.folder).get("layers_dir")
            lost += bool(d) and not (s.folder / d).is_dir()
    print(lost, runs, flush=True)
    """
)


def test_two_processes_saving_one_folder_take_turns(slide, tmp_path):
    from histoscope.session_store import LAYERS_DIR, read_manifest

    folder = tmp_path / "s"
    with hs.open_session(slide, folder) as s:
        s.save_manifest()  # the fingerprint once, so both children start at once
    manifests = subprocess.Popen([sys.executable, "-c", MANIFEST_WRITER, str(slide), str(folder),
                                  "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert manifests.stdout.readline().strip() == "ready"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(slide), str(folder), tag],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for tag in "pq"]  # fmt: skip
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    out, err = manifests.communicate(timeout=120)
    assert manifests.returncode == 0, err[-2000:]
    lost, runs = map(int, out.split())
    assert runs > 0 and lost == 0, (lost, runs)  # never an old layers folder written back
    with hs.open_session(slide, folder) as s:
        s.save_manifest()  # the last word is the CLI's: the layers are still found
    doc = read_manifest(folder)
    assert [e["name"] for e in doc["layers"]] in (["p23"] * 3, ["q23"] * 3)
    assert [p.name for p in (folder / LAYERS_DIR).iterdir()] == [doc["layers_dir"].split("/")[1]]
    with hs.open_session(slide, folder) as s:
        assert all((d == 23.0).all() for d, _, _ in s.layers())


def test_layer_units_are_saved_and_read_back_as_napari_takes_them(slide, tmp_path):
    napari = pytest.importorskip("napari")
    layer = napari.layers.Points(np.zeros((2, 2)), name="cells", units=("um", "um"))
    with hs.open_session(slide, tmp_path / "s") as s:
        s.save_layers([layer.as_layer_data_tuple()], {})
    with hs.open_session(slide, tmp_path / "s") as again:
        data, kwargs, kind = again.layers()[0]
    assert kwargs["units"] == ["micrometer", "micrometer"]
    back = napari.layers.Points(data, **{k: kwargs[k] for k in ("name", "units")})
    assert back.units == layer.units  # not 'pixel' (napari would warn: inconsistent units)
