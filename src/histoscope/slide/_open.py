"""Format detection and :func:`open_slide`."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from histoscope.errors import SlideError
from histoscope.slide._slide import Slide, TileErrorPolicy

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


def open_slide(
    path: str | os.PathLike,
    *,
    mpp: float | None = None,
    on_tile_error: TileErrorPolicy = "raise",
    on_warning: Callable[[str], None] | None = None,
) -> Slide:
    """Open a whole-slide image (or a plain image) as a :class:`Slide`.

    Parameters
    ----------
    path
        SVS, NDPI, MRXS, SCN, BIF, Philips TIFF, DICOM, generic tiled TIFF,
        OME-TIFF, an OME-Zarr directory, or a PNG/JPEG/TIFF image.
    mpp
        µm per level-0 pixel; overrides what the file says (needed for plain
        images, which carry none).
    on_tile_error
        ``"raise"`` (default): reading a corrupt tile raises :class:`SlideError`.
        ``"blank"``: the tile reads as white and one warning is issued.
    on_warning
        Called with the warning text instead of :func:`warnings.warn`
        (napari uses this to show one notification).

    Raises
    ------
    SlideError
        With the path and the reason: missing, empty, truncated, unsupported
        or unreadable file.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise SlideError(f"{p}: no such file")
    if p.is_file() and p.stat().st_size == 0:
        raise SlideError(f"{p}: file is empty (0 bytes)")
    fmt = sniff_format(p)
    if fmt is None:
        raise SlideError(
            f"{p}: unsupported format {p.suffix or '(no extension)'!r}; HistoScope reads "
            + ", ".join(sorted(SUPPORTED_EXTS))
        )
    backend = _open_backend(p, fmt)
    return Slide(backend, mpp=mpp, on_tile_error=on_tile_error, on_warning=on_warning)


def _open_backend(p: Path, fmt: str):
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


def _open_tiff(p: Path):
    """Fast tifffile path first; OpenSlide for TIFF flavours it cannot take."""
    from histoscope.slide._openslide import OpenSlideBackend
    from histoscope.slide._tiff import NotASlide, TiffBackend

    with open(p, "rb") as fh:
        head = fh.read(4)
    if head not in _TIFF_MAGIC:
        raise SlideError(f"{p}: not a TIFF file (it does not start with a TIFF header)")
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
