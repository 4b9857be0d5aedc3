"""Raster results as OME-Zarr (NGFF 0.4): a pyramid placed in µm over the slide.

A heatmap or a mask is written as a multiscale image with axes ``y``, ``x``
(``c``, ``y``, ``x`` for several channels) in micrometres, each level carrying
its own ``scale`` and ``translation`` so that pixel centres sit exactly where
the napari layer puts them (see :meth:`histoscope.results.TileHeatmap.placement`).
Levels halve the previous one (NaN-aware mean for float maps, max or nearest
for masks and labels) until the top one fits in 256 x 256. The folder is
written with the ``zarr`` package only (Zarr format 2, ``/``-nested chunk
keys, as NGFF 0.4 asks) into a temporary folder beside the target and renamed
into place (:func:`atomic_dir`). :func:`read_ome_zarr` reads it back, values
and placement, for HistoScope and tests; ``ome_zarr`` reads it too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

__all__ = ["OmeZarrRaster", "atomic_dir", "pyramid", "read_ome_zarr", "write_ome_zarr"]

NGFF_VERSION = "0.4"
#: Downsampling methods of :func:`pyramid`.
METHODS = ("mean", "max", "nearest")
_UNIT_TO_UM = {"nanometer": 1e-3, "micrometer": 1.0, "millimeter": 1e3, "centimeter": 1e4}


def _fsync_tree(folder: Path) -> None:
    """fsync every file, then every folder (deepest first) under ``folder``."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with open(Path(root) / name, "rb") as fh:
                os.fsync(fh.fileno())
    for root, _dirs, _files in sorted(os.walk(folder), key=lambda w: -len(w[0])):
        with contextlib.suppress(OSError):  # some file systems cannot open a directory
            fd = os.open(root, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside ``path``, renamed to ``path`` when the block ends without error.

    The folder version of :func:`histoscope.atomic.atomic_path`: everything
    written into the yielded folder is fsynced, then the folder is renamed
    over the target in one step. An existing target is first renamed aside
    and removed after, so a reader sees the old folder, briefly none, or the
    new one, never a half-written one.

    Parameters
    ----------
    path
        The folder to write (e.g. ``tumour_heatmap.ome.zarr``).

    Yields
    ------
    pathlib.Path
        An empty folder to write into. On an exception it is removed and the
        target is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent))
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700; give what mkdir() would
    old: Path | None = None
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old)  # an empty folder may be replaced by a folder
        os.replace(tmp, path)
        with contextlib.suppress(OSError):
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _halve(image: np.ndarray, method: str) -> np.ndarray:
    """``image`` (``(H, W, ...)``) downsampled 2x; an odd edge's last block holds one row/column."""
    if method == "nearest":
        return image[::2, ::2]
    h, w = image.shape[:2]
    floating = np.issubdtype(image.dtype, np.floating)
    if h % 2 or w % 2:  # pad with what the reduction ignores
        fill = np.nan if floating else np.iinfo(image.dtype).min
        pad = [(0, h % 2), (0, w % 2)] + [(0, 0)] * (image.ndim - 2)
        image = np.pad(image, pad, constant_values=fill)
    blocks = image.reshape(image.shape[0] // 2, 2, image.shape[1] // 2, 2, *image.shape[2:])
    if not floating:
        return blocks.max(axis=(1, 3))
    with warnings.catch_warnings():  # an all-NaN block stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        reduce = np.nanmean if method == "mean" else np.nanmax
        return reduce(blocks, axis=(1, 3)).astype(image.dtype)


def pyramid(image: np.ndarray, method: str | None = None, max_top: int = 256) -> list[np.ndarray]:
    """``image`` and its 2x downsamplings until the top level fits in ``max_top`` px.

    Parameters
    ----------
    image
        ``(H, W)`` or ``(H, W, C)``.
    method
        ``"mean"`` (NaN-aware: background stays NaN, partial blocks average
        what they hold), ``"max"`` (a mask keeps thin tissue) or ``"nearest"``
        (label ids kept). Default: mean for floats, nearest otherwise.
    max_top
        Largest edge, in pixels, of the top level.

    Returns
    -------
    list of numpy.ndarray
        Full resolution first; level ``k`` pixel ``j`` covers level-0 pixels
        ``[j 2^k, (j + 1) 2^k)``.
    """
    method = method or ("mean" if np.issubdtype(image.dtype, np.floating) else "nearest")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    if method == "mean" and not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"method 'mean' needs a float image, not {image.dtype}")
    levels = [np.asarray(image)]
    while max(levels[-1].shape[:2]) > max_top:
        levels.append(_halve(levels[-1], method))
    return levels


def level_transforms(
    scale_um: tuple[float, float], translate_um: tuple[float, float], level: int
) -> tuple[list[float], list[float]]:
    """``(scale, translation)`` in µm of pyramid ``level`` (``y``, ``x``).

    A level-``k`` pixel is a ``2^k`` block of level-0 pixels, so its centre
    sits at the block's centre: ``translate + (2^k - 1) / 2 * scale``.
    """
    f = 2**level
    scale = [float(s) * f for s in scale_um]
    trans = [float(t) + (f - 1) / 2 * float(s) for s, t in zip(scale_um, translate_um, strict=True)]
    return scale, trans


def _create_array(group, name: str, data: np.ndarray, chunks: tuple[int, ...]):
    """One Zarr-2 array with ``/`` chunk keys, Blosc-zstd, fill NaN (floats) or 0."""
    import numcodecs
    import zarr

    fill = np.nan if np.issubdtype(data.dtype, np.floating) else 0
    compressor = numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE)
    if int(zarr.__version__.split(".")[0]) >= 3:
        arr = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks,
                                 compressors=compressor, fill_value=fill,
                                 chunk_key_encoding={"name": "v2", "separator": "/"})  # fmt: skip
    else:  # zarr 2
        arr = group.create_dataset(name, shape=data.shape, dtype=data.dtype, chunks=chunks,
                                   compressor=compressor, fill_value=fill,
                                   dimension_separator="/")  # fmt: skip
    arr[...] = data
    return arr


def _multiscales(
    n_levels: int, scale_um, translate_um, channels: bool, name: str, method: str
) -> dict[str, Any]:
    axes = [{"name": "y", "type": "space", "unit": "micrometer"},
            {"name": "x", "type": "space", "unit": "micrometer"}]  # fmt: skip
    datasets = []
    for k in range(n_levels):
        scale, trans = level_transforms(scale_um, translate_um, k)
        if channels:
            scale, trans = [1.0, *scale], [0.0, *trans]
        datasets.append({"path": str(k), "coordinateTransformations": [
            {"type": "scale", "scale": scale}, {"type": "translation", "translation": trans}]})  # fmt: skip
    if channels:
        axes.insert(0, {"name": "c", "type": "channel"})
    return {"version": NGFF_VERSION, "name": name, "axes": axes, "datasets": datasets,
            "type": method, "metadata": {"method": f"2x {method} (histoscope)"}}  # fmt: skip


def write_ome_zarr(
    path: str | os.PathLike,
    image: np.ndarray,
    scale_um: tuple[float, float],
    translate_um: tuple[float, float] = (0.0, 0.0),
    *,
    method: str | None = None,
    name: str = "",
    attrs: dict[str, Any] | None = None,
    chunk: int = 256,
    max_top: int = 256,
) -> Path:
    """Write ``image`` as an OME-Zarr (NGFF 0.4) multiscale image placed in µm, atomically.

    Parameters
    ----------
    path
        Target folder, conventionally ending in ``.ome.zarr``.
    image
        ``(H, W)`` or ``(H, W, C)`` (stored as ``c, y, x``); bool becomes uint8.
    scale_um, translate_um
        ``(y, x)`` µm per pixel and centre of pixel ``(0, 0)`` of the full
        resolution, as the napari layer's ``scale`` and ``translate``.
    method
        Downsampling of :func:`pyramid`.
    name
        The image's name in the metadata.
    attrs
        Extra JSON-able attributes stored beside ``multiscales`` (e.g.
        ``{"histoscope": {...provenance...}}``).
    chunk
        Chunk edge in pixels.
    max_top
        Largest edge of the pyramid's top level.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    import zarr

    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8)
    if image.ndim not in (2, 3):
        raise ValueError(f"image must be (H, W) or (H, W, C), not {image.shape}")
    method = method or ("mean" if np.issubdtype(image.dtype, np.floating) else "nearest")
    levels = pyramid(image, method, max_top)
    channels = image.ndim == 3
    path = Path(path)
    with atomic_dir(path) as tmp:
        v2 = {"zarr_format": 2} if int(zarr.__version__.split(".")[0]) >= 3 else {}
        group = zarr.open_group(str(tmp), mode="w", **v2)
        for k, level in enumerate(levels):
            data = np.moveaxis(level, -1, 0) if channels else level
            edge = (min(chunk, data.shape[-2]) or 1, min(chunk, data.shape[-1]) or 1)
            _create_array(group, str(k), np.ascontiguousarray(data),
                          (data.shape[0], *edge) if channels else edge)  # fmt: skip
        ms = _multiscales(len(levels), scale_um, translate_um, channels, name, method)
        group.attrs.update({**(attrs or {}), "multiscales": [ms]})
    return path


class OmeZarrRaster(NamedTuple):
    """What :func:`read_ome_zarr` returns; unpacks as ``levels, scale_um, translate_um``."""

    #: Full resolution first, ``(H, W)`` or ``(H, W, C)`` (channels last, as written).
    levels: list[np.ndarray]
    #: ``(y, x)`` µm per pixel of the full resolution.
    scale_um: tuple[float, float]
    #: ``(y, x)`` µm of the centre of full-resolution pixel ``(0, 0)``.
    translate_um: tuple[float, float]


def _placement(ms: dict, axes: list[str], units: list[str | None]) -> tuple[tuple, tuple]:
    """Level-0 ``(scale, translate)`` of ``y``, ``x`` in µm (dataset then multiscale transforms)."""

    def parse(transforms) -> tuple[np.ndarray, np.ndarray]:
        scale, trans = np.ones(len(axes)), np.zeros(len(axes))
        for t in transforms or []:
            if t.get("type") == "scale":
                scale = np.asarray(t["scale"], float)
            elif t.get("type") == "translation":
                trans = np.asarray(t["translation"], float)
        return scale, trans

    s0, t0 = parse(ms["datasets"][0].get("coordinateTransformations"))
    s1, t1 = parse(ms.get("coordinateTransformations"))
    scale, trans = s0 * s1, t0 * s1 + t1
    iy, ix = axes.index("y"), axes.index("x")
    um = [_UNIT_TO_UM.get(units[i] or "micrometer", 1.0) for i in (iy, ix)]
    return (
        (float(scale[iy] * um[0]), float(scale[ix] * um[1])),
        (float(trans[iy] * um[0]), float(trans[ix] * um[1])),
    )


def read_ome_zarr(path: str | os.PathLike) -> OmeZarrRaster:
    """Read an OME-Zarr image (NGFF 0.4 or 0.5) with its placement in µm.

    HistoScope's slide reader opens OME-Zarr *slides* (as RGB); this reads a
    raster result (a float heatmap, a mask) back as written, so it can be
    shown aligned with the slide: ``napari.Viewer.add_image(levels,
    multiscale=True, scale=scale_um, translate=translate_um)``.

    Parameters
    ----------
    path
        The ``.ome.zarr`` folder.

    Returns
    -------
    OmeZarrRaster
        ``(levels, scale_um, translate_um)``; levels are loaded into memory
        (results are one pixel per tile or a low-resolution mask) with axes
        other than ``y``, ``x`` and ``c`` taken at index 0.
    """
    import zarr

    group = zarr.open_group(str(path), mode="r")
    attrs = dict(group.attrs)
    attrs = attrs.get("ome", attrs)  # NGFF 0.5 nests its metadata under "ome"
    if not attrs.get("multiscales"):
        raise ValueError(f"{path}: no 'multiscales' metadata (not an OME-Zarr image)")
    ms = attrs["multiscales"][0]
    raw_axes = ms.get("axes") or ["y", "x"]
    axes = [a["name"] if isinstance(a, dict) else a for a in raw_axes]
    units = [a.get("unit") if isinstance(a, dict) else None for a in raw_axes]
    levels = []
    for d in ms["datasets"]:
        arr = np.asarray(group[d["path"]][...])
        keep = [a for a in axes if a in ("y", "x", "c")]
        arr = arr[tuple(slice(None) if a in keep else 0 for a in axes)]
        levels.append(np.moveaxis(arr, keep.index("c"), -1) if "c" in keep else arr)
    scale, trans = _placement(ms, axes, units)
    return OmeZarrRaster(levels, scale, trans)
