"""Format detection and backend selection; :func:`open_slide` lives in ``_slide``."""

from __future__ import annotations

import os
from pathlib import Path

from histoscope.errors import SlideError
from histoscope.slide._backend import Backend

#: Extensions read by OpenSlide only.
OPENSLIDE_EXTS = {".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide", ".dcm", ".isyntax"}
TIFF_EXTS = {".tif", ".tiff", ".svs", ".btf", ".tf2", ".tf8", ".qptiff"}
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
ZARR_EXTS = {".zarr", ".ome.zarr"}
SUPPORTED_EXTS = OPENSLIDE_EXTS | TIFF_EXTS | IMAGE_EXTS | ZARR_EXTS

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def sniff_format(path: str | os.PathLike) -> str | None:
    """Guess the reader for ``path`` from its name and first bytes; never raises.

    Returns one of ``"tiff"``, ``"openslide"``, ``"ome-zarr"``, ``"image"`` or
    ``None`` when HistoScope does not read this kind of file.
    """
    try:
        p = Path(path)
        name = p.name.lower()
        if name.endswith((".zarr", ".zarr/")) or (p.is_dir() and _is_zarr_dir(p)):
            return "ome-zarr"
        ext = p.suffix.lower()
        if ext in OPENSLIDE_EXTS:
            return "openslide"
        if ext in TIFF_EXTS:
            return "tiff"
        if ext in IMAGE_EXTS:
            return "image"
        if p.is_file():
            with open(p, "rb") as fh:
                head = fh.read(4)
            if head in _TIFF_MAGIC:
                return "tiff"
    except OSError:
        return None
    return None


def _is_zarr_dir(p: Path) -> bool:
    return (p / ".zattrs").is_file() or (p / "zarr.json").is_file()


def open_backend(path: str | os.PathLike) -> Backend:
    """The backend that reads ``path``, picked by content (see :func:`sniff_format`).

    :func:`histoscope.slide._slide.open_slide` wraps it in a :class:`Slide`;
    this module stays below ``_slide`` so that a slide can re-open itself
    (when unpickled) without an import cycle.

    Raises
    ------
    SlideError
        With the path and the reason: missing, empty, truncated, unsupported
        or unreadable file.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise SlideError(f"{p}: no such file", path=p)
    if p.is_file() and p.stat().st_size == 0:
        raise SlideError(f"{p}: file is empty (0 bytes)", path=p, damaged=True)
    fmt = sniff_format(p)
    if fmt is None:
        raise SlideError(
            f"{p}: unsupported format {p.suffix or '(no extension)'!r}; HistoScope reads "
            + ", ".join(sorted(SUPPORTED_EXTS)),
            path=p,
        )
    return _open_backend(p, fmt)


def _open_backend(p: Path, fmt: str) -> Backend:
    if fmt == "ome-zarr":
        from histoscope.slide._zarr import OmeZarrBackend

        return OmeZarrBackend(p)
    if fmt == "image":
        from histoscope.slide._image import ImageBackend

        return ImageBackend(p)
    if fmt == "openslide":
        from histoscope.slide._openslide import OpenSlideBackend

        return OpenSlideBackend(p)
    return _open_tiff(p)


def _open_tiff(p: Path) -> Backend:
    """Fast tifffile path first; OpenSlide for TIFF flavours it cannot take."""
    from histoscope.slide._openslide import OpenSlideBackend
    from histoscope.slide._tiff import NotASlide, TiffBackend

    with open(p, "rb") as fh:
        head = fh.read(4)
    if head not in _TIFF_MAGIC:
        raise SlideError(
            f"{p}: not a TIFF file (it does not start with a TIFF header)", path=p, damaged=True
        )
    try:
        return TiffBackend(p)
    except NotASlide:
        raise
    except SlideError as tiff_err:
        try:
            return OpenSlideBackend(p)
        except SlideError:
            pass
        # An untiled, single-image TIFF: read it whole.
        try:
            from histoscope.slide._image import ImageBackend

            return ImageBackend(p)
        except SlideError:
            raise tiff_err from None
