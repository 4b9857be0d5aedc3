"""Fixtures that write small slides in every format the slide layer reads.

Every file is built here, in ``tmp_path``, with tifffile, Pillow or zarr: no
test depends on a downloaded slide. The pixel content is a smooth colour
texture (``texture``) so JPEG round trips stay within a few grey levels and a
misplaced tile shows up as a large error.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

#: µm per level-0 pixel written into every fixture that carries one.
MPP = 0.5
#: Level-0 size of the pyramidal fixtures: not a multiple of the tile edge.
H, W = 1100, 1300
TILE = 256
#: Mean absolute error allowed between a JPEG slide and its source pixels.
JPEG_TOL = 3.0


def texture(y: int, x: int, h: int, w: int) -> np.ndarray:
    """A smooth, position-dependent RGB texture for the level-0 region."""
    yy, xx = np.mgrid[y : y + h, x : x + w].astype(np.float32)
    r = 128 + 60 * np.sin(xx / 37.0) + 40 * np.cos(yy / 53.0)
    g = 110 + 50 * np.cos((xx + yy) / 71.0)
    b = 150 + 70 * np.sin(yy / 29.0)
    return np.clip(np.stack([r, g, b], axis=-1), 0, 255).astype(np.uint8)


def half(img: np.ndarray, times: int = 1) -> np.ndarray:
    """2x2 mean downsample, ``times`` times (odd edges dropped)."""
    for _ in range(times):
        h, w = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
        b = img[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).astype(np.uint16)
        img = ((b.sum(axis=(1, 3)) + 2) // 4).astype(np.uint8)
    return img


@pytest.fixture(scope="session")
def image0() -> np.ndarray:
    """Level-0 pixels of the pyramidal fixtures."""
    return texture(0, 0, H, W)


@pytest.fixture(scope="session")
def tiled_tiff(tmp_path_factory, image0) -> Path:
    """A generic JPEG-tiled pyramidal TIFF with µm/px as TIFF resolution."""
    from histoscope.slide import write_pyramidal_tiff

    path = tmp_path_factory.mktemp("pyr") / "slide.tif"
    return write_pyramidal_tiff(path, image0, mpp=MPP, tile=TILE, quality=95, min_size=300)


@pytest.fixture(scope="session")
def ome_tiff(tmp_path_factory, image0) -> Path:
    """An OME-TIFF whose pyramid lives in SubIFDs, µm/px in PhysicalSizeX."""
    import tifffile

    path = tmp_path_factory.mktemp("ome") / "slide.ome.tif"
    meta = {"axes": "YXS", "PhysicalSizeX": MPP * 1000, "PhysicalSizeXUnit": "nm",
            "PhysicalSizeY": MPP * 1000, "PhysicalSizeYUnit": "nm"}  # fmt: skip
    opts = {"tile": (TILE, TILE), "photometric": "rgb", "compression": "jpeg",
            "compressionargs": {"level": 95}}  # fmt: skip
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(image0, subifds=2, metadata=meta, **opts)
        for i in (1, 2):
            tw.write(half(image0, i), subfiletype=1, **opts)
    return path


@pytest.fixture(scope="session")
def svs(tmp_path_factory, image0) -> Path:
    """An Aperio-style SVS: tiled levels, stripped thumbnail, label and macro."""
    import tifffile

    path = tmp_path_factory.mktemp("svs") / "slide.svs"
    head = "Aperio Image Library v12.0.15 \r\n"
    desc = f"{head}{W}x{H} [0,0 {W}x{H}] ({TILE}x{TILE}) JPEG/RGB Q=95|AppMag = 20|MPP = {MPP}"
    opts = {"photometric": "rgb", "metadata": None}
    jpeg = {"compression": "jpeg", "compressionargs": {"level": 95}}
    label = np.full((80, 160, 3), (30, 200, 30), np.uint8)
    with tifffile.TiffWriter(path) as tw:
        tw.write(image0, tile=(TILE, TILE), description=desc, **jpeg, **opts)
        thumb = half(image0, 3)
        tw.write(thumb, description=f"{head}{W}x{H} -> {thumb.shape[1]}x{thumb.shape[0]}",
                 **jpeg, **opts)  # fmt: skip
        lvl = half(image0, 2)
        tw.write(lvl, tile=(TILE, TILE), description=f"{head}{W}x{H} -> {lvl.shape[1]}x"
                 f"{lvl.shape[0]}", **jpeg, **opts)  # fmt: skip
        tw.write(label, subfiletype=1, description=f"{head}label 160x80", compression="lzw",
                 **opts)  # fmt: skip
        tw.write(label, subfiletype=9, description=f"{head}macro 160x80", **jpeg, **opts)
    return path


def write_ome_zarr(path: Path, image0: np.ndarray, axes: str = "yxc", unit: str = "micrometer",
                   scale: float = MPP, chunk: int = TILE) -> Path:  # fmt: skip
    """An NGFF 0.4 OME-Zarr (zarr v2 layout) with three levels, written with zarr."""
    import zarr

    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    datasets = []
    for i in range(3):
        img = half(image0, i)
        data = np.moveaxis(img, -1, 0) if axes == "cyx" else img
        chunks = (3, chunk, chunk) if axes == "cyx" else (chunk, chunk, 3)
        arr = group.create_array(str(i), shape=data.shape, dtype=np.uint8, chunks=chunks)
        arr[...] = data
        s = [scale * 2**i, scale * 2**i]
        s = [1.0, *s] if axes == "cyx" else [*s, 1.0]
        datasets.append(
            {"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": s}]}
        )
    ax = {"y": {"name": "y", "type": "space", "unit": unit},
          "x": {"name": "x", "type": "space", "unit": unit},
          "c": {"name": "c", "type": "channel"}}  # fmt: skip
    attrs = {"multiscales": [{"version": "0.4", "name": "slide",
                              "axes": [ax[a] for a in axes], "datasets": datasets}]}  # fmt: skip
    # Write .zattrs by hand, exactly as NGFF 0.4 lays it out.
    (path / ".zattrs").write_text(json.dumps(attrs))
    return path


@pytest.fixture(scope="session")
def ome_zarr(tmp_path_factory, image0) -> Path:
    """OME-Zarr with (y, x, c) axes and µm units."""
    return write_ome_zarr(tmp_path_factory.mktemp("zarr") / "slide.ome.zarr", image0)


@pytest.fixture(scope="session")
def ome_zarr_cyx(tmp_path_factory, image0) -> Path:
    """OME-Zarr with (c, y, x) axes and nm units."""
    path = tmp_path_factory.mktemp("zarr") / "slide_cyx.zarr"
    return write_ome_zarr(path, image0, axes="cyx", unit="nanometer", scale=MPP * 1000)


@pytest.fixture(scope="session")
def small_image() -> np.ndarray:
    """Pixels of the plain-image fixtures."""
    return texture(0, 0, 300, 400)


@pytest.fixture(scope="session")
def png(tmp_path_factory, small_image) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "image.png"
    Image.fromarray(small_image).save(path)
    return path


@pytest.fixture(scope="session")
def jpeg(tmp_path_factory, small_image) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "image.jpg"
    Image.fromarray(small_image).save(path, quality=95)
    return path


@pytest.fixture(scope="session")
def plain_tiff(tmp_path_factory, small_image) -> Path:
    """An untiled (stripped), uncompressed TIFF with no resolution."""
    import tifffile

    path = tmp_path_factory.mktemp("img") / "image.tif"
    tifffile.imwrite(path, small_image, photometric="rgb", metadata=None)
    return path


@pytest.fixture
def slide_copy(tmp_path, tiled_tiff) -> Path:
    """A private copy of the pyramidal TIFF that a test may damage."""
    return Path(shutil.copy(tiled_tiff, tmp_path / "copy.tif"))


def corrupt_tile(path: Path, index: int, level: int = 0) -> None:
    """Overwrite the JPEG bytes of one tile of ``level`` in place."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.series[0].levels[level].pages[0]
        off, n = int(page.dataoffsets[index]), int(page.databytecounts[index])
    junk = np.random.default_rng(index).integers(0, 256, n, dtype=np.uint8)
    junk[:2] = 0  # no JPEG start-of-image marker: every decoder must reject it
    with open(path, "r+b") as fh:
        fh.seek(off)
        fh.write(junk.tobytes())
        fh.flush()
        os.fsync(fh.fileno())
