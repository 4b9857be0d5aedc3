"""OME-Zarr (NGFF 0.4 / 0.5) multiscale images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from histoscope.errors import SlideError
from histoscope.slide._backend import (
    BACKGROUND,
    Backend,
    LevelInfo,
    SlideMetadata,
    to_rgb_uint8,
)

_UNIT_TO_UM = {"nanometer": 1e-3, "micrometer": 1.0, "millimeter": 1e3, "centimeter": 1e4}


def is_ome_zarr(path: Path) -> bool:
    """Cheap check: a directory with NGFF multiscales metadata."""
    return path.is_dir() and ((path / ".zattrs").is_file() or (path / "zarr.json").is_file())


def _read_attrs(path: Path) -> dict:
    for name in ("zarr.json", ".zattrs"):
        f = path / name
        if f.is_file():
            try:
                attrs = json.loads(f.read_text())
            except (OSError, ValueError) as exc:
                raise SlideError(f"{path}: {name} is not valid JSON ({exc})") from exc
            attrs = attrs.get("attributes", attrs)
            return attrs.get("ome", attrs)
    raise SlideError(f"{path}: no .zattrs or zarr.json")


class OmeZarrBackend(Backend):
    """Reads the multiscales of an OME-Zarr group; axes are mapped to (Y, X, RGB)."""

    name = "ome-zarr"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        import zarr

        attrs = _read_attrs(path)
        ms = attrs.get("multiscales")
        if not ms:
            raise SlideError(f"{path}: Zarr group has no 'multiscales' metadata (not OME-Zarr)")
        ms = ms[0]
        axes = [a["name"] if isinstance(a, dict) else a for a in ms.get("axes", ["y", "x"])]
        units = [a.get("unit") if isinstance(a, dict) else None for a in ms.get("axes", [])]
        if "y" not in axes or "x" not in axes:
            raise SlideError(f"{path}: OME-Zarr axes {axes} have no y and x")
        try:
            group = zarr.open_group(str(path), mode="r")
            self._arrays = [group[d["path"]] for d in ms["datasets"]]
        except Exception as exc:
            raise SlideError(f"{path}: OME-Zarr datasets cannot be opened ({exc})") from exc
        # Where chunk files can be checked for existence (local, unsharded arrays):
        # a chunk never written reads as the fill value (black), but it is background.
        local = isinstance(group.store, zarr.storage.LocalStore)
        self._chunk_dirs = [
            path / d["path"] if local and getattr(a, "shards", None) is None else None
            for d, a in zip(ms["datasets"], self._arrays, strict=True)
        ]
        self._axes = axes
        base_w = self._arrays[0].shape[axes.index("x")]
        for arr in self._arrays:
            shp, chunks = arr.shape, arr.chunks
            h, w = shp[axes.index("y")], shp[axes.index("x")]
            tile = (chunks[axes.index("y")], chunks[axes.index("x")])
            self.levels.append(LevelInfo(shape=(h, w), tile=tile, downsample=base_w / w))
        mpp = None
        scale = next(
            (t["scale"] for t in ms["datasets"][0].get("coordinateTransformations", [])
             if t.get("type") == "scale"), None)  # fmt: skip
        if scale is not None:
            ix = axes.index("x")
            unit = units[ix] if ix < len(units) else None
            mpp = float(scale[ix]) * _UNIT_TO_UM.get(unit or "micrometer", 1.0)
        self.metadata = SlideMetadata(vendor="ome-zarr", mpp=mpp, properties={"ome-zarr": attrs})

    def read_block(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        sel: list[object] = []
        for ax in self._axes:
            if ax == "y":
                sel.append(slice(y0, y1))
            elif ax == "x":
                sel.append(slice(x0, x1))
            elif ax == "c":
                sel.append(slice(0, 4))
            else:
                sel.append(0)
        arr = np.asarray(self._arrays[level][tuple(sel)])
        kept = [a for a in self._axes if a in ("y", "x", "c")]
        if "c" in kept:
            arr = np.moveaxis(arr, kept.index("c"), -1)
        out = to_rgb_uint8(arr)
        for by0, by1, bx0, bx1 in self._missing_chunks(level, y0, y1, x0, x1):
            if not out.flags.writeable:
                out = out.copy()
            out[max(by0 - y0, 0) : by1 - y0, max(bx0 - x0, 0) : bx1 - x0] = BACKGROUND
        return out

    def _missing_chunks(self, level: int, y0: int, y1: int, x0: int, x1: int) -> list:
        """Level-pixel boxes ``(y0, y1, x0, x1)`` of the chunks never written."""
        root = self._chunk_dirs[level]
        if root is None:
            return []
        arr = self._arrays[level]
        th, tw = self.levels[level].tile
        iy, ix = self._axes.index("y"), self._axes.index("x")
        boxes = []
        for ty in range(y0 // th, -(-y1 // th)):
            for tx in range(x0 // tw, -(-x1 // tw)):
                coords = [0] * len(self._axes)
                coords[iy], coords[ix] = ty, tx
                if not (root / arr.metadata.encode_chunk_key(tuple(coords))).exists():
                    boxes.append((ty * th, (ty + 1) * th, tx * tw, (tx + 1) * tw))
        return boxes

    def read_tile(self, level: int, ty: int, tx: int) -> np.ndarray:
        info = self.levels[level]
        th, tw = info.tile
        return self.read_block(level, ty * th, min((ty + 1) * th, info.shape[0]),
                               tx * tw, min((tx + 1) * tw, info.shape[1]))  # fmt: skip
