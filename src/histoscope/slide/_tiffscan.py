"""Read a TIFF's directory structure without reading its tile tables.

tifffile parses every page's tile offsets and byte counts when it lists a
pyramid: about 0.2 µs per tile, so a 100,000-pixel-wide slide takes tens of
milliseconds to open. This scanner reads only the IFD entries of the pages
that make up the pyramid (a few hundred bytes each); the tables themselves
are read when a level is first decoded. It knows the three layouts that make
up nearly all pyramidal TIFFs - OME-TIFF with SubIFDs, Aperio SVS and a
chain of reduced-resolution pages - and says ``None`` for anything else, so
the caller can fall back to tifffile's full parse.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np

#: TIFF field type -> (numpy dtype code, bytes per value).
_TYPES = {
    1: ("u1", 1), 2: ("S1", 1), 3: ("u2", 2), 4: ("u4", 4), 5: ("u4", 8), 6: ("i1", 1),
    7: ("u1", 1), 8: ("i2", 2), 9: ("i4", 4), 10: ("i4", 8), 11: ("f4", 4), 12: ("f8", 8),
    13: ("u4", 4), 16: ("u8", 8), 17: ("i8", 8), 18: ("u8", 8),
}  # fmt: skip
MAX_IFDS = 4096


class ScanError(Exception):
    """The file is not laid out the way the scanner reads it."""


class Truncated(ScanError):
    """A directory or table lies beyond the end of the file."""


@dataclass
class Ifd:
    """One image file directory: ``code -> (type, count, inline bytes or None, offset)``."""

    offset: int
    entries: dict[int, tuple[int, int, bytes | None, int]]


class TiffScan:
    """Directory reader over a file descriptor (``os.pread``: thread-safe)."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size = fd, size
        head = self._read(0, 16)
        order = {b"II": "<", b"MM": ">"}.get(head[:2])
        if order is None:
            raise ScanError("no TIFF byte-order mark")
        self.bo = order
        version = struct.unpack(order + "H", head[2:4])[0]
        if version == 42:
            self.big, self.first = False, struct.unpack(order + "I", head[4:8])[0]
        elif version == 43:
            self.big, self.first = True, struct.unpack(order + "Q", head[8:16])[0]
        else:
            raise ScanError(f"TIFF version {version}")

    def _read(self, offset: int, n: int) -> bytes:
        if offset < 0 or offset + n > self.size:
            raise Truncated(f"{n} bytes at byte {offset} run past the end of the file")
        return os.pread(self.fd, n, offset)

    def ifd(self, offset: int) -> tuple[Ifd, int]:
        """The directory at ``offset`` and the offset of the next one (0: none)."""
        cnt_fmt, ent, ptr = ("Q", 20, "Q") if self.big else ("H", 12, "I")
        cnt_size = struct.calcsize(cnt_fmt)
        (n,) = struct.unpack(self.bo + cnt_fmt, self._read(offset, cnt_size))
        if n == 0 or n > 4096:
            raise ScanError(f"directory at byte {offset} has {n} entries")
        raw = self._read(offset + cnt_size, n * ent + struct.calcsize(ptr))
        entries = {}
        inline = 8 if self.big else 4
        for i in range(n):
            e = raw[i * ent : (i + 1) * ent]
            code, typ = struct.unpack(self.bo + "HH", e[:4])
            count = struct.unpack(self.bo + ("Q" if self.big else "I"), e[4 : 4 + inline])[0]
            value = e[4 + inline :]
            if typ not in _TYPES:
                continue
            nbytes = count * _TYPES[typ][1]
            if nbytes <= inline:
                entries[code] = (typ, count, value[:nbytes], -1)
            else:
                entries[code] = (typ, count, None, struct.unpack(self.bo + ptr, value)[0])
        (nxt,) = struct.unpack(self.bo + ptr, raw[n * ent :])
        return Ifd(offset, entries), nxt

    def chain(self) -> list[Ifd]:
        """Every directory of the main chain, first to last."""
        out, seen, offset = [], set(), self.first
        while offset and offset not in seen and len(out) < MAX_IFDS:
            seen.add(offset)
            ifd, offset = self.ifd(offset)
            out.append(ifd)
        if not out:
            raise ScanError("no image directory")
        return out

    def array(self, ifd: Ifd, code: int) -> np.ndarray | None:
        """The values of tag ``code`` (``None`` when absent)."""
        if code not in ifd.entries:
            return None
        typ, count, data, offset = ifd.entries[code]
        dtype, size = _TYPES[typ]
        if data is None:
            data = self._read(offset, count * size)
        if typ == 2:
            return np.frombuffer(data, "S1")
        return np.frombuffer(data, np.dtype(dtype).newbyteorder(self.bo))

    def int(self, ifd: Ifd, code: int, default: int = 0) -> int:
        """First value of an integer tag."""
        arr = self.array(ifd, code)
        return default if arr is None or not len(arr) else int(arr[0])

    def text(self, ifd: Ifd, code: int) -> str:
        """An ASCII tag as text ('' when absent)."""
        arr = self.array(ifd, code)
        if arr is None:
            return ""
        return arr.tobytes().split(b"\0", 1)[0].decode("utf-8", errors="replace")

    def rational(self, ifd: Ifd, code: int) -> tuple[int, int] | None:
        """A RATIONAL tag as ``(numerator, denominator)``."""
        arr = self.array(ifd, code)
        return None if arr is None or len(arr) < 2 else (int(arr[0]), int(arr[1]))


def _tiled_rgb(scan: TiffScan, ifd: Ifd) -> bool:
    spp = scan.int(ifd, 277, 1)
    return (
        322 in ifd.entries and 324 in ifd.entries and 325 in ifd.entries
        and scan.int(ifd, 258, 1) in (8, 16) and 1 <= spp <= 4
        and (scan.int(ifd, 284, 1) == 1 or spp == 1)
    )  # fmt: skip


def pyramid(scan: TiffScan) -> tuple[str, list[Ifd]] | None:
    """``(layout, level directories)``, largest first, or ``None`` for other layouts.

    ``layout`` is ``"ome-tiff"``, ``"aperio"`` or ``"generic-tiff"``.
    """
    chain = scan.chain()
    first = chain[0]
    desc = scan.text(first, 270)
    if "<OME" in desc[:4096]:
        if len(chain) != 1:  # several images or planes: let tifffile sort them out
            return None
        subs = scan.array(first, 330)
        levels = [first] + [scan.ifd(int(o))[0] for o in (subs if subs is not None else [])]
        layout = "ome-tiff"
    elif desc.startswith("Aperio"):
        levels = [first] + [
            i for i in chain[1:]
            if _tiled_rgb(scan, i) and not any(k in scan.text(i, 270) for k in ("label", "macro"))
        ]  # fmt: skip
        layout = "aperio"
    else:
        levels = [first]
        for ifd in chain[1:]:
            if not scan.int(ifd, 254) & 1 or scan.int(ifd, 256) >= scan.int(levels[-1], 256):
                return None  # another full-size page: a stack, or something unknown
            levels.append(ifd)
        layout = "generic-tiff"
    if not all(_tiled_rgb(scan, i) for i in levels):
        return None
    widths = [scan.int(i, 256) for i in levels]
    if any(b >= a for a, b in zip(widths, widths[1:], strict=False)):
        return None
    return layout, levels
