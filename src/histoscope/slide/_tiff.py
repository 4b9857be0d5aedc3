"""Pyramidal TIFF backend (generic tiled TIFF, OME-TIFF, SVS) on tifffile.

Tiles are read with ``os.pread`` (no shared file position, so any number of
threads can read at once) and decoded by the page's own codec (imagecodecs).
"""

from __future__ import annotations

import contextlib
import os
import re
import weakref
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from histoscope.errors import SlideError
from histoscope.slide._backend import Backend, LevelInfo, SlideMetadata, to_rgb_uint8, white_tile

_UNIT_TO_UM = {
    "pm": 1e-6, "nm": 1e-3, "µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "micron": 1.0,
    "mm": 1e3, "cm": 1e4, "m": 1e6,
}  # fmt: skip


class NotASlide(SlideError):
    """The TIFF is readable but is no slide (a stack, truncated): no other reader may try."""


class _Level:
    """One TIFF page seen as a grid of independently decodable chunks."""

    def __init__(self, page) -> None:
        self.page = page
        self.height, self.width = int(page.imagelength), int(page.imagewidth)
        if page.is_tiled:
            self.th, self.tw = int(page.tilelength), int(page.tilewidth)
        else:
            self.th, self.tw = min(int(page.rowsperstrip), self.height), self.width
        self.ny = -(-self.height // self.th)
        self.nx = -(-self.width // self.tw)
        # Plain tuples, as tifffile parsed them: indexing a tuple is faster than
        # a numpy array, and converting a 100k-tile table would cost at open.
        self.offsets: tuple[int, ...] = tuple(page.dataoffsets)
        self.counts: tuple[int, ...] = tuple(page.databytecounts)
        self.decode = page.decode
        self.jpegtables = getattr(page, "jpegtables", None)


class TiffBackend(Backend):
    """Tiled or stripped, chunky (RGB-interleaved) 8-bit TIFF pyramids."""

    name = "tifffile"
    threaded_tiles = True
    cache_tiles = True

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        import tifffile

        self._levels: list[_Level] = []

        try:
            self._tif = tifffile.TiffFile(path)
        except Exception as exc:
            raise SlideError(f"{path}: not a readable TIFF file ({exc})") from exc
        try:
            self._init_levels()
        except SlideError:
            self._tif.close()
            raise
        except Exception as exc:
            self._tif.close()
            raise SlideError(f"{path}: TIFF structure could not be read ({exc})") from exc
        self._fd = os.open(path, os.O_RDONLY)
        # Slides left to the garbage collector (napari layers) release both handles.
        self._release = weakref.finalize(self, _release, self._tif, self._fd)
        self.metadata = self._read_metadata()

    def _init_levels(self) -> None:
        tif = self._tif
        if not tif.series:
            raise SlideError(f"{self.path}: TIFF file holds no image")
        series = tif.series[0]
        pages = []
        for lvl in series.levels:
            if len(lvl.pages) != 1:
                raise NotASlide(
                    f"{self.path}: TIFF level with {len(lvl.pages)} planes is not an RGB slide"
                )
            pages.append(
                lvl.pages[0].keyframe if hasattr(lvl.pages[0], "keyframe") else lvl.pages[0]
            )
        size = self.path.stat().st_size
        base_w = None
        for page in pages:
            if not page.imagewidth or not page.imagelength or not page.dataoffsets:
                raise SlideError(f"{self.path}: TIFF directory holds no image data")
            if page.planarconfig != 1 and page.samplesperpixel > 1:
                raise SlideError(f"{self.path}: planar (separate-channel) TIFF is not supported")
            if page.bitspersample not in (8, 16) or page.samplesperpixel not in (1, 2, 3, 4):
                raise SlideError(
                    f"{self.path}: {page.samplesperpixel} samples of {page.bitspersample} bits "
                    "per pixel is not an RGB or grey slide"
                )
            lvl = _Level(page)
            last = max(lvl.offsets)  # C-speed scans; no per-tile Python work at open
            end = last + lvl.counts[lvl.offsets.index(last)]
            if end > size:
                raise NotASlide(
                    f"{self.path}: file is truncated: tile data runs to byte {end} "
                    f"but the file has {size} bytes"
                )
            if len(lvl.offsets) < lvl.ny * lvl.nx:
                raise NotASlide(f"{self.path}: TIFF tile table is incomplete")
            base_w = base_w or lvl.width
            self._levels.append(lvl)
            self.levels.append(
                LevelInfo(shape=(lvl.height, lvl.width), tile=(lvl.th, lvl.tw),
                          downsample=base_w / lvl.width)
            )  # fmt: skip

    # ------------------------------------------------------------------ pixels
    def read_tile(self, level: int, ty: int, tx: int) -> np.ndarray:
        lvl = self._levels[level]
        h = min(lvl.th, lvl.height - ty * lvl.th)
        w = min(lvl.tw, lvl.width - tx * lvl.tw)
        index = ty * lvl.nx + tx
        count = lvl.counts[index]
        if count == 0:
            return white_tile(h, w)
        if self._fd < 0:
            raise OSError("the slide is closed")
        data = os.pread(self._fd, count, lvl.offsets[index])
        if len(data) != count:
            raise OSError(f"short read at byte {lvl.offsets[index]}")
        arr = lvl.decode(data, index, jpegtables=lvl.jpegtables)[0]
        if arr is None:
            return white_tile(h, w)
        arr = np.asarray(arr)
        arr = arr.reshape(arr.shape[-3:]) if arr.ndim > 3 else arr
        return to_rgb_uint8(arr[:h, :w])

    # ---------------------------------------------------------------- metadata
    def _read_metadata(self) -> SlideMetadata:
        tif = self._tif
        page = tif.pages[0]
        props: dict[str, object] = {}
        for tag in page.tags:
            if tag.name in ("ImageDescription", "Software", "Make", "Model", "DateTime"):
                props[f"tiff.{tag.name}"] = str(tag.value)[:2000]
        vendor = "generic-tiff"
        mpp = None
        mag = None
        desc = page.description or ""
        if tif.is_ome and tif.ome_metadata:
            vendor = "ome-tiff"
            mpp = _ome_mpp(tif.ome_metadata)
        elif tif.is_svs or desc.startswith("Aperio"):
            vendor = "aperio"
            m = re.search(r"MPP\s*=\s*([0-9.eE+-]+)", desc)
            mpp = float(m.group(1)) if m else None
            m = re.search(r"AppMag\s*=\s*([0-9.]+)", desc)
            mag = float(m.group(1)) if m else None
        if mpp is None:
            mpp = _resolution_mpp(page)
        return SlideMetadata(vendor=vendor, mpp=mpp, magnification=mag, properties=props)

    def associated_images(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for series in self._tif.series[1:]:
            name = (series.name or "").lower()
            key = next((k for k in ("label", "macro", "thumbnail") if k in name), None)
            if key is None or key in out:
                continue
            try:
                out[key] = to_rgb_uint8(series.asarray())
            except Exception:
                continue
        return out

    def close(self) -> None:
        self._fd = -1  # a later read must fail, not hit a reused descriptor
        self._release()


def _release(tif, fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
    tif.close()


def _ome_mpp(xml: str) -> float | None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for el in root.iter():
        if el.tag.endswith("Pixels") and el.get("PhysicalSizeX"):
            unit = el.get("PhysicalSizeXUnit", "µm")
            return float(el.get("PhysicalSizeX")) * _UNIT_TO_UM.get(unit, 1.0)
    return None


def _resolution_mpp(page) -> float | None:
    tags = page.tags
    if "XResolution" not in tags:
        return None
    num, den = tags["XResolution"].value
    if not num or not den:
        return None
    per_unit = num / den
    unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
    if unit == 3:  # centimetre
        mpp = 1e4 / per_unit
    elif unit == 2:  # inch; 72/96/300 dpi are screen or print defaults, not microscopy
        mpp = 25400.0 / per_unit
        if mpp > 20:
            return None
    else:
        return None
    return mpp if 0.01 < mpp < 1000 else None
