"""Write pyramidal, JPEG-tiled TIFFs that OpenSlide and tifffile both read.

Level 0 is produced tile by tile from an array or a render function, so a
50,000-pixel slide never has to exist in memory; each level is downsampled
into a disk-backed buffer while the level above it is written.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

RenderFn = Callable[[int, int, int, int], np.ndarray]
"""``render(y, x, h, w) -> (h, w, 3) uint8`` for a level-0 region."""


def _pyramid_shapes(h: int, w: int, min_size: int) -> list[tuple[int, int]]:
    shapes = [(h, w)]
    while max(shapes[-1]) > min_size:
        ph, pw = shapes[-1]
        shapes.append((max(1, ph // 2), max(1, pw // 2)))
    return shapes


def _downsample2(block: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """2x2 mean of ``block`` cropped/padded to ``(out_h, out_w)`` output pixels."""
    bh, bw = out_h * 2, out_w * 2
    if block.shape[0] < bh or block.shape[1] < bw:
        pad = np.full((bh, bw, 3), 255, np.uint8)
        pad[: block.shape[0], : block.shape[1]] = block[:bh, :bw]
        block = pad
    b = block[:bh, :bw].reshape(out_h, 2, out_w, 2, 3).astype(np.uint16)
    return ((b.sum(axis=(1, 3)) + 2) // 4).astype(np.uint8)


def write_pyramidal_tiff(
    path: str | os.PathLike,
    source: np.ndarray | RenderFn,
    *,
    mpp: float,
    shape: tuple[int, int] | None = None,
    tile: int = 256,
    quality: int = 90,
    min_size: int = 1024,
    description: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write an RGB slide as a JPEG-tiled TIFF pyramid with µm/px set.

    Parameters
    ----------
    path
        Output file; written to a temporary name and renamed when complete.
    source
        ``(H, W, 3)`` uint8 array, or ``render(y, x, h, w)`` returning the
        level-0 region (then ``shape`` is required).
    mpp
        µm per level-0 pixel, stored as the TIFF resolution (pixels per cm).
    shape
        ``(H, W)`` when ``source`` is a function.
    tile
        Tile edge in pixels (a multiple of 16).
    quality
        JPEG quality 1-100.
    min_size
        Halve until the longer side of the smallest level is at most this.
    progress
        Called as ``progress(tiles_done, tiles_total)``.

    Returns
    -------
    pathlib.Path
        The written file.
    """
    import tifffile

    path = Path(path)
    if isinstance(source, np.ndarray):
        if source.ndim != 3 or source.shape[2] != 3 or source.dtype != np.uint8:
            raise ValueError(
                f"source array must be (H, W, 3) uint8, got {source.shape} {source.dtype}"
            )
        arr = source
        shape = arr.shape[:2]

        def render(y: int, x: int, h: int, w: int) -> np.ndarray:
            return arr[y : y + h, x : x + w]

    else:
        if shape is None:
            raise ValueError("shape=(H, W) is required when source is a function")
        render = source
    if tile % 16 or tile <= 0:
        raise ValueError(f"tile must be a positive multiple of 16, got {tile}")
    if not mpp > 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    h0, w0 = int(shape[0]), int(shape[1])
    shapes = _pyramid_shapes(h0, w0, min_size)
    total = sum(-(-h // tile) * -(-w // tile) for h, w in shapes)
    done = [0]
    bigtiff = h0 * w0 * 3 * 4 // 3 > 2**31 // 4  # JPEG is ~10x smaller; leave ample margin

    tmpdir = tempfile.mkdtemp(prefix=".histoscope-", dir=path.parent)
    part = path.with_name(path.name + ".part")
    try:
        buffers = [
            np.lib.format.open_memmap(
                os.path.join(tmpdir, f"level{i}.npy"), mode="w+", dtype=np.uint8, shape=(*s, 3)
            )
            for i, s in enumerate(shapes[1:], start=1)
        ]

        def tiles(level: int) -> Iterator[np.ndarray]:
            h, w = shapes[level]
            nxt = buffers[level] if level + 1 < len(shapes) else None
            read = (
                render
                if level == 0
                else (lambda y, x, hh, ww: buffers[level - 1][y : y + hh, x : x + ww])
            )
            for y in range(0, h, tile):
                for x in range(0, w, tile):
                    th, tw = min(tile, h - y), min(tile, w - x)
                    block = np.asarray(read(y, x, th, tw), dtype=np.uint8)
                    if block.shape != (th, tw, 3):
                        raise ValueError(f"render returned {block.shape}, expected {(th, tw, 3)}")
                    if nxt is not None:
                        nh, nw = nxt.shape[:2]
                        oy, ox = y // 2, x // 2
                        oh, ow = min(-(-th // 2), nh - oy), min(-(-tw // 2), nw - ox)
                        if oh > 0 and ow > 0:
                            nxt[oy : oy + oh, ox : ox + ow] = _downsample2(block, oh, ow)
                    if (th, tw) != (tile, tile):
                        padded = np.full((tile, tile, 3), 255, np.uint8)
                        padded[:th, :tw] = block
                        block = padded
                    # Count before yielding: tifffile stops pulling after a level's
                    # last tile, so code after that final yield would never run.
                    done[0] += 1
                    if progress is not None:
                        progress(done[0], total)
                    yield block

        res = 1e4 / mpp
        with tifffile.TiffWriter(part, bigtiff=bigtiff) as tw:
            for level, (h, w) in enumerate(shapes):
                tw.write(
                    tiles(level),
                    shape=(h, w, 3),
                    dtype=np.uint8,
                    tile=(tile, tile),
                    photometric="rgb",
                    compression="jpeg",
                    compressionargs={"level": quality},
                    resolution=(res / 2**level, res / 2**level),
                    resolutionunit="CENTIMETER",
                    subfiletype=1 if level else 0,
                    description=description if level == 0 else None,
                    metadata=None,
                )
        buffers.clear()  # drop the memory maps before their files go
        os.replace(part, path)
    finally:
        if part.exists():
            part.unlink()
        for f in Path(tmpdir).glob("*"):
            f.unlink()
        os.rmdir(tmpdir)
    return path
