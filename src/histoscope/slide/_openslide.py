"""OpenSlide backend: SVS, NDPI, MRXS, SCN, BIF, Philips TIFF, DICOM, VMS..."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from histoscope.errors import SlideError
from histoscope.slide._backend import Backend, LevelInfo, SlideMetadata, to_rgb_uint8

_DEFAULT_TILE = 512


def _import_openslide():
    try:
        import openslide
    except ImportError as exc:  # pragma: no cover - openslide-bin is a dependency
        raise SlideError(
            "OpenSlide is not available: install 'openslide-python' and 'openslide-bin'"
        ) from exc
    return openslide


class OpenSlideBackend(Backend):
    """Every vendor format OpenSlide reads.

    OpenSlide handles are thread-safe, but after one failed read (a corrupt
    tile) a handle fails every later call. So a failed read swaps in a fresh
    handle and is tried once more: a tile that fails twice is really bad,
    and the slide stays readable around it.
    """

    name = "openslide"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        openslide = _import_openslide()
        self._open = lambda: openslide.OpenSlide(str(path))
        self._swap = threading.Lock()
        try:
            self._osr = self._open()
        except Exception as exc:
            raise SlideError(
                f"{path}: OpenSlide cannot open it ({exc})", path=path, damaged=True
            ) from exc
        props = dict(self._osr.properties)
        base_w = self._osr.level_dimensions[0][0]
        for i, (w, h) in enumerate(self._osr.level_dimensions):
            tw = int(props.get(f"openslide.level[{i}].tile-width", _DEFAULT_TILE) or _DEFAULT_TILE)
            th = int(props.get(f"openslide.level[{i}].tile-height", _DEFAULT_TILE) or _DEFAULT_TILE)
            # Very small native tiles (some NDPI/MRXS) make dask graphs huge; read >= 256 px.
            tw, th = max(tw, 256), max(th, 256)
            self.levels.append(LevelInfo(shape=(h, w), tile=(th, tw), downsample=base_w / w))
        self._ds = [float(d) for d in self._osr.level_downsamples]
        mpp = props.get("openslide.mpp-x")
        mag = props.get("openslide.objective-power")
        self.metadata = SlideMetadata(
            vendor=props.get("openslide.vendor", "openslide"),
            mpp=float(mpp) if mpp else None,
            magnification=float(mag) if mag else None,
            properties=props,
        )

    def read_tile(self, level: int, ty: int, tx: int) -> np.ndarray:
        info = self.levels[level]
        th, tw = info.tile
        y0, x0 = ty * th, tx * tw
        h, w = min(th, info.shape[0] - y0), min(tw, info.shape[1] - x0)
        return self.read_block(level, y0, y0 + h, x0, x0 + w)

    def read_block(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        ds = self._ds[level]
        loc = (round(x0 * ds), round(y0 * ds))
        for attempt in (0, 1):
            osr = self._osr
            try:
                img = osr.read_region(loc, level, (x1 - x0, y1 - y0))
                break
            except Exception:
                self._reopen(osr)
                if attempt:
                    raise
        return to_rgb_uint8(np.asarray(img))  # RGBA, transparent -> white

    def _reopen(self, failed) -> None:
        """Replace ``failed`` (now unusable) with a fresh handle, once per failure."""
        with self._swap:
            if self._osr is failed:
                self._osr = self._open()

    def associated_images(self) -> dict[str, np.ndarray]:
        return {
            name: to_rgb_uint8(np.asarray(img)) for name, img in self._osr.associated_images.items()
        }

    def close(self) -> None:
        self._osr.close()
