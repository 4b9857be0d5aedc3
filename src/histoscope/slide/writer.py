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

from histoscope.atomic import atomic_path

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
    path = Path(path)
    render, (h0, w0) = _as_render(source, shape)
    if tile % 16 or tile <= 0:
        raise ValueError(f"tile must be a positive multiple of 16, got {tile}")
    if not mpp > 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    shapes = _pyramid_shapes(h0, w0, min_size)
    total = sum(-(-h // tile) * -(-w // tile) for h, w in shapes)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    options = {
        "tile": (tile, tile),
        "compressionargs": {"level": quality},
        "resolution": 1e4 / mpp,
        "description": description,
        "bigtiff": h0 * w0 * 3 * 4 // 3 > 2**31 // 4,  # JPEG is ~10x smaller; ample margin
    }
    # tifffile reads the format from the name: the temporary file must end in .tif
    with (
        atomic_path(path, suffix=".tif") as part,
        tempfile.TemporaryDirectory(prefix=".histoscope-", dir=path.parent) as scratch,
    ):
        _write_levels(part, Path(scratch), shapes, render, tick, options)
    return path


def _as_render(
    source: np.ndarray | RenderFn, shape: tuple[int, int] | None
) -> tuple[RenderFn, tuple[int, int]]:
    """``source`` as a render function, and the level-0 ``(H, W)``."""
    if not isinstance(source, np.ndarray):
        if shape is None:
            raise ValueError("shape=(H, W) is required when source is a function")
        return source, (int(shape[0]), int(shape[1]))
    if source.ndim != 3 or source.shape[2] != 3 or source.dtype != np.uint8:
        raise ValueError(f"source array must be (H, W, 3) uint8, got {source.shape} {source.dtype}")

    def render(y: int, x: int, h: int, w: int) -> np.ndarray:
        return source[y : y + h, x : x + w]

    return render, (int(source.shape[0]), int(source.shape[1]))


def _write_levels(
    part: Path,
    scratch: Path,
    shapes: list[tuple[int, int]],
    render: RenderFn,
    tick: Callable[[], None],
    options: dict,
) -> None:
    """Write every level to ``part``; levels below 0 are buffered in ``scratch``."""
    import tifffile

    buffers = [
        np.lib.format.open_memmap(
            scratch / f"level{i}.npy", mode="w+", dtype=np.uint8, shape=(*s, 3)
        )
        for i, s in enumerate(shapes[1:], start=1)
    ]
    tile = options["tile"][0]
    res = options["resolution"]
    with tifffile.TiffWriter(part, bigtiff=options["bigtiff"]) as tw:
        for level, (h, w) in enumerate(shapes):
            read = render if level == 0 else _window_reader(buffers[level - 1])
            below = buffers[level] if level + 1 < len(shapes) else None
            tw.write(
                _level_tiles((h, w), tile, read, below, tick),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=options["tile"],
                photometric="rgb",
                compression="jpeg",
                compressionargs=options["compressionargs"],
                resolution=(res / 2**level, res / 2**level),
                resolutionunit="CENTIMETER",
                subfiletype=1 if level else 0,
                description=options["description"] if level == 0 else None,
                metadata=None,
            )
    buffers.clear()  # drop the memory maps before their files go


def _window_reader(buffer: np.ndarray) -> RenderFn:
    return lambda y, x, h, w: buffer[y : y + h, x : x + w]


def _level_tiles(
    shape: tuple[int, int],
    tile: int,
    read: RenderFn,
    below: np.ndarray | None,
    tick: Callable[[], None],
) -> Iterator[np.ndarray]:
    """The level's tiles, row by row, padded white; each is also halved into ``below``."""
    h, w = shape
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            th, tw = min(tile, h - y), min(tile, w - x)
            block = np.asarray(read(y, x, th, tw), dtype=np.uint8)
            if block.shape != (th, tw, 3):
                raise ValueError(f"render returned {block.shape}, expected {(th, tw, 3)}")
            if below is not None:
                nh, nw = below.shape[:2]
                oy, ox = y // 2, x // 2
                oh, ow = min(-(-th // 2), nh - oy), min(-(-tw // 2), nw - ox)
                if oh > 0 and ow > 0:
                    below[oy : oy + oh, ox : ox + ow] = _downsample2(block, oh, ow)
            if (th, tw) != (tile, tile):
                padded = np.full((tile, tile, 3), 255, np.uint8)
                padded[:th, :tw] = block
                block = padded
            # Count before yielding: tifffile stops pulling after a level's
            # last tile, so code after that final yield would never run.
            tick()
            yield block
