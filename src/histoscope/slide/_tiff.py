"""Pyramidal TIFF backend (generic tiled TIFF, OME-TIFF, SVS) on tifffile.

Tiles are read with ``os.pread`` (no shared file position, so any number of
threads can read at once) and decoded by the page's own codec (imagecodecs).

Opening does not grow with the slide: for the usual pyramid layouts the
directory scanner in :mod:`._tiffscan` gives the geometry and metadata, and
tifffile parses a level (and its tile table) only when that level is first
read. Other layouts go through tifffile's full parse at open.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import threading
import weakref
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from histoscope.errors import SlideError
from histoscope.slide._backend import Backend, LevelInfo, SlideMetadata, to_rgb_uint8, white_tile
from histoscope.slide._tiffscan import ScanError, TiffScan, Truncated, pyramid

_UNIT_TO_UM = {
    "pm": 1e-6, "nm": 1e-3, "µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "micron": 1.0,
    "mm": 1e3, "cm": 1e4, "m": 1e6,
}  # fmt: skip


class NotASlide(SlideError):
    """The TIFF is readable but is no slide (a stack, truncated): no other reader may try."""

    damaged = True


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


_TEXT_TAGS = {270: "ImageDescription", 305: "Software", 271: "Make", 272: "Model", 306: "DateTime"}


class TiffBackend(Backend):
    """Tiled or stripped, chunky (RGB-interleaved) 8- or 16-bit TIFF pyramids."""

    name = "tifffile"
    threaded_tiles = True
    cache_tiles = True

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._lock = threading.RLock()  # guards tifffile's file handle and lazy levels
        self._handles: dict[str, object] = {"tif": None}
        self._levels: list[_Level | None] = []
        self._ifds: list[int] = []  # directory offset of each level (lazy mode)
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise SlideError(f"{path}: cannot be opened ({exc.strerror})", path=path) from exc
        # Slides left to the garbage collector (napari layers) release their handles.
        self._release = weakref.finalize(self, _release, self._handles, self._fd)
        self._size = os.fstat(self._fd).st_size
        try:
            if not self._init_lazy():
                self._init_eager()
        except BaseException:
            self._release()
            raise

    # ------------------------------------------------------------- structure
    def _tiffile(self):
        """tifffile's view of the file, opened on first need."""
        with self._lock:
            if self._handles["tif"] is None:
                import tifffile

                try:
                    self._handles["tif"] = tifffile.TiffFile(self.path)
                except Exception as exc:
                    raise SlideError(
                        f"{self.path}: not a readable TIFF file ({exc})",
                        path=self.path,
                        damaged=True,
                    ) from exc
            return self._handles["tif"]

    def _init_lazy(self) -> bool:
        """Geometry and metadata from the directories alone; ``False``: layout unknown."""
        try:
            scan = TiffScan(self._fd, self._size)
            found = pyramid(scan)
            if found is None:
                return False
            layout, ifds = found
            small = ifds[-1]  # cheap truncation check: the last level's tile data
            ends = scan.array(small, 324).astype(np.int64) + scan.array(small, 325)
            if len(ends) and int(ends.max()) > self._size:
                raise Truncated(f"tile data runs to byte {int(ends.max())}")
        except Truncated as exc:
            raise NotASlide(
                f"{self.path}: file is truncated ({exc}; the file has {self._size} bytes)"
            ) from None
        except (ScanError, OSError, struct.error, ValueError, TypeError):
            return False
        base_w = scan.int(ifds[0], 256)
        for ifd in ifds:
            h, w = scan.int(ifd, 257), scan.int(ifd, 256)
            tile = (scan.int(ifd, 323), scan.int(ifd, 322))
            self.levels.append(LevelInfo(shape=(h, w), tile=tile, downsample=base_w / w))
        self._ifds = [ifd.offset for ifd in ifds]
        self._levels = [None] * len(ifds)
        first = ifds[0]
        props = {f"tiff.{name}": scan.text(first, code)[:2000]
                 for code, name in _TEXT_TAGS.items() if code in first.entries}  # fmt: skip
        self.metadata = _metadata(
            layout, scan.text(first, 270), scan.rational(first, 282), scan.int(first, 296, 2), props
        )
        return True

    def _init_eager(self) -> None:
        tif = self._tiffile()
        try:
            pages = self._eager_pages(tif)
        except SlideError:
            raise
        except Exception as exc:
            raise SlideError(
                f"{self.path}: TIFF structure could not be read ({exc})",
                path=self.path,
                damaged=True,
            ) from exc
        base_w = None
        for page in pages:
            lvl = self._checked(_Level(page))
            base_w = base_w or lvl.width
            self._levels.append(lvl)
            self.levels.append(
                LevelInfo(shape=(lvl.height, lvl.width), tile=(lvl.th, lvl.tw),
                          downsample=base_w / lvl.width)
            )  # fmt: skip
        page = tif.pages.first
        props = {f"tiff.{tag.name}": str(tag.value)[:2000]
                 for tag in page.tags if tag.code in _TEXT_TAGS}  # fmt: skip
        desc = page.description or ""
        layout = "ome-tiff" if tif.is_ome else "aperio" if tif.is_svs else "generic-tiff"
        xres = page.tags["XResolution"].value if "XResolution" in page.tags else None
        unit = int(page.tags["ResolutionUnit"].value) if "ResolutionUnit" in page.tags else 2
        self.metadata = _metadata(layout, desc, xres, unit, props)

    def _eager_pages(self, tif) -> list:
        if not tif.series:
            raise SlideError(f"{self.path}: TIFF file holds no image", path=self.path, damaged=True)
        pages = []
        for lvl in tif.series[0].levels:
            if len(lvl.pages) != 1:
                raise NotASlide(
                    f"{self.path}: TIFF level with {len(lvl.pages)} planes is not an RGB slide"
                )
            page = lvl.pages[0]
            pages.append(page.keyframe if hasattr(page, "keyframe") else page)
        for page in pages:
            if not page.imagewidth or not page.imagelength or not page.dataoffsets:
                raise SlideError(
                    f"{self.path}: TIFF directory holds no image data", path=self.path, damaged=True
                )
            if page.planarconfig != 1 and page.samplesperpixel > 1:
                raise SlideError(
                    f"{self.path}: planar (separate-channel) TIFF is not supported", path=self.path
                )
            if page.bitspersample not in (8, 16) or page.samplesperpixel not in (1, 2, 3, 4):
                raise SlideError(
                    f"{self.path}: {page.samplesperpixel} samples of {page.bitspersample} bits "
                    "per pixel is not an RGB or grey slide",
                    path=self.path,
                )
        return pages

    def _checked(self, lvl: _Level) -> _Level:
        """``lvl`` once its tile table is complete and inside the file."""
        if len(lvl.offsets) < lvl.ny * lvl.nx:
            raise NotASlide(f"{self.path}: TIFF tile table is incomplete")
        last = max(lvl.offsets)  # C-speed scans; no per-tile Python work
        end = last + lvl.counts[lvl.offsets.index(last)]
        if end > self._size:
            raise NotASlide(
                f"{self.path}: file is truncated: tile data runs to byte {end} "
                f"but the file has {self._size} bytes"
            )
        return lvl

    def _level(self, level: int) -> _Level:
        """The decodable level, parsing its directory with tifffile on first use."""
        lvl = self._levels[level]
        if lvl is not None:
            return lvl
        with self._lock:
            if self._levels[level] is None:
                import tifffile

                tif = self._tiffile()
                page = tif.pages.first
                if page.offset != self._ifds[level]:
                    tif.filehandle.seek(self._ifds[level])
                    page = tifffile.TiffPage(tif, index=level)
                self._levels[level] = self._checked(_Level(page))
            return self._levels[level]

    # ------------------------------------------------------------------ pixels
    def read_tile(self, level: int, ty: int, tx: int) -> np.ndarray:
        lvl = self._levels[level] or self._level(level)
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

    def associated_images(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        with self._lock:
            for series in self._tiffile().series[1:]:
                name = (series.name or "").lower()
                key = next((k for k in ("label", "macro", "thumbnail") if k in name), None)
                if key is None or key in out:
                    continue
                try:
                    out[key] = to_rgb_uint8(series.asarray())
                except Exception:  # noqa: S112 - an unreadable extra image is not an error
                    continue
        return out

    def close(self) -> None:
        self._fd = -1  # a later read must fail, not hit a reused descriptor
        self._release()


def _release(handles: dict, fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
    tif = handles.pop("tif", None)
    if tif is not None:
        tif.close()


def _metadata(layout: str, desc: str, xres, unit: int, props: dict) -> SlideMetadata:
    """Vendor, µm/px and magnification from the first page's description and tags."""
    mpp = mag = None
    if layout == "ome-tiff":
        mpp = _ome_mpp(desc)
    elif layout == "aperio" or desc.startswith("Aperio"):
        layout = "aperio"
        m = re.search(r"MPP\s*=\s*([0-9.eE+-]+)", desc)
        mpp = float(m.group(1)) if m else None
        m = re.search(r"AppMag\s*=\s*([0-9.]+)", desc)
        mag = float(m.group(1)) if m else None
    if mpp is None:
        mpp = _resolution_mpp(xres, unit)
    return SlideMetadata(vendor=layout, mpp=mpp, magnification=mag, properties=props)


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


def _resolution_mpp(xres: tuple[int, int] | None, unit: int) -> float | None:
    """µm/px from the XResolution rational and ResolutionUnit (2 inch, 3 cm)."""
    if not xres or len(xres) < 2:
        return None
    num, den = xres[0], xres[1]
    if not num or not den:
        return None
    per_unit = num / den
    if unit == 3:  # centimetre
        mpp = 1e4 / per_unit
    elif unit == 2:  # inch; 72/96/300 dpi are screen or print defaults, not microscopy
        mpp = 25400.0 / per_unit
        if mpp > 20:
            return None
    else:
        return None
    return mpp if 0.01 < mpp < 1000 else None
