"""Plain images (PNG, JPEG, BMP, untiled TIFF): one level held in memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from histoscope.errors import SlideError
from histoscope.slide._backend import Backend, LevelInfo, SlideMetadata, to_rgb_uint8

#: Larger plain images should be converted to a pyramidal TIFF first.
MAX_PIXELS = 40_000 * 40_000
_CHUNK = 1024


class ImageBackend(Backend):
    """A single-level image decoded once at open."""

    name = "image"

    def __init__(self, path: Path, array: np.ndarray | None = None) -> None:
        super().__init__(path)
        if array is None:
            array = _decode(path)
        self._arr = to_rgb_uint8(np.asarray(array))
        h, w = self._arr.shape[:2]
        if h == 0 or w == 0:
            raise SlideError(f"{path}: image has no pixels")
        self.levels = [
            LevelInfo(shape=(h, w), tile=(min(h, _CHUNK), min(w, _CHUNK)), downsample=1.0)
        ]
        self.metadata = SlideMetadata(vendor="image")

    def read_tile(self, level: int, ty: int, tx: int) -> np.ndarray:
        th, tw = self.levels[0].tile
        return self._arr[ty * th : (ty + 1) * th, tx * tw : (tx + 1) * tw].copy()

    def read_block(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return self._arr[y0:y1, x0:x1].copy()  # a caller may write into what it gets


def _decode(path: Path) -> np.ndarray:
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        try:
            return tifffile.imread(path, key=0)
        except Exception as exc:
            raise SlideError(f"{path}: not a readable TIFF image ({exc})") from exc
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("RGB", "RGBA", "L", "LA"):
                im = im.convert("RGBA")
            return np.asarray(im)
    except Exception as exc:
        raise SlideError(f"{path}: not a readable image ({exc})") from exc
