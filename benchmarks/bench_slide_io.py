"""Slide I/O benchmark: random 512 x 512 level-0 reads through every reader.

Run from the repository root::

    .venv/bin/python benchmarks/bench_slide_io.py            # full run (300 reads)
    .venv/bin/python benchmarks/bench_slide_io.py --reads 50 # quicker

The first run writes a 20,000 x 20,000 JPEG-tiled pyramidal TIFF (and a
10k / 100k-wide pair for the open-time check) under ``benchmarks/_data/``;
later runs reuse them. Every reader reads the same random positions. The raw
decode rate is one core decoding the file's own JPEG tiles with imagecodecs,
with the compressed bytes already in memory: the ceiling for any reader.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "_data"
SIZE = 20_000
READ = 512


# ------------------------------------------------------------------ test data
def _texture(n: int = 2048, seed: int = 0) -> np.ndarray:
    """An H&E-like texture: pink stroma, purple nuclei, white gaps, some noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    stroma = 0.5 + 0.25 * np.sin(xx / 23.0 + np.sin(yy / 41.0) * 3) * np.cos(yy / 31.0)
    nuclei = np.zeros((n, n), np.float32)
    for cy, cx, r in zip(
        rng.integers(0, n, 9000), rng.integers(0, n, 9000), rng.uniform(3, 8, 9000), strict=True
    ):
        y0, y1, x0, x1 = max(cy - 9, 0), min(cy + 10, n), max(cx - 9, 0), min(cx + 10, n)
        d2 = (yy[y0:y1, x0:x1] - cy) ** 2 + (xx[y0:y1, x0:x1] - cx) ** 2
        nuclei[y0:y1, x0:x1] = np.maximum(nuclei[y0:y1, x0:x1], (d2 < r * r) * 1.0)
    gaps = (np.sin(xx / 97.0) * np.sin(yy / 83.0)) > 0.85
    noise = rng.normal(0, 10, (n, n, 3)).astype(np.float32)
    pink = np.array([235, 150, 200], np.float32)
    purple = np.array([90, 60, 150], np.float32)
    rgb = pink * (0.75 + 0.3 * stroma[..., None])
    rgb = rgb * (1 - nuclei[..., None]) + purple * nuclei[..., None]
    rgb[gaps] = 245
    return np.clip(rgb + noise, 0, 255).astype(np.uint8)


def _renderer(n: int = 2048) -> Callable[[int, int, int, int], np.ndarray]:
    tex = _texture(n)

    def render(y: int, x: int, h: int, w: int) -> np.ndarray:
        # Shift each 2048 block so neighbouring tiles differ; wrap inside the texture.
        ys = (np.arange(y, y + h) + 7 * (x // n)) % n
        xs = (np.arange(x, x + w) + 13 * (y // n)) % n
        return tex[ys[:, None], xs[None, :]]

    return render


def _progress(label: str) -> Callable[[int, int], None]:
    def cb(done: int, total: int) -> None:
        if done % 2000 == 0 or done == total:
            print(f"\r  writing {label}: {done}/{total} tiles", end="", flush=True)
            if done == total:
                print()

    return cb


def bench_slide(size: int = SIZE) -> Path:
    """The 20k x 20k JPEG-tiled pyramid (written once, then cached)."""
    from histoscope.slide import write_pyramidal_tiff

    path = DATA / f"bench_{size}.tif"
    if not path.exists():
        DATA.mkdir(parents=True, exist_ok=True)
        write_pyramidal_tiff(
            path, _renderer(), mpp=0.25, shape=(size, size), tile=256, quality=85,
            progress=_progress(path.name),
        )  # fmt: skip
    return path


def wide_slide(width: int) -> Path:
    """A ``width`` x ``width / 4`` JPEG-tiled pyramid made of a few repeated tiles.

    The tiles are encoded once and written as bytes, so even the 100k-wide
    slide (about 100,000 tiles) takes seconds and a modest amount of disk.
    """
    import imagecodecs
    import tifffile

    from histoscope.atomic import atomic_path

    path = DATA / f"wide_{width}.tif"
    if path.exists():
        return path
    DATA.mkdir(parents=True, exist_ok=True)
    tex = _texture(512)
    light = (255 - (255 - tex.astype(np.int16)) // 6).astype(np.uint8)  # faint tissue
    encoded = [
        imagecodecs.jpeg8_encode(np.ascontiguousarray(light[y : y + 256, x : x + 256]), level=80)
        for y in (0, 256)
        for x in (0, 256)
    ]
    shapes = [(width // 4, width)]
    while max(shapes[-1]) > 1024:
        shapes.append((shapes[-1][0] // 2, shapes[-1][1] // 2))
    with atomic_path(path, suffix=".tif") as part, tifffile.TiffWriter(part, bigtiff=True) as tw:
        for level, (h, w) in enumerate(shapes):
            n = -(-h // 256) * -(-w // 256)
            tw.write(
                (encoded[i % 4] for i in range(n)), shape=(h, w, 3), dtype=np.uint8,
                tile=(256, 256), photometric="rgb", compression="jpeg",
                resolution=(4e4 / 2**level, 4e4 / 2**level), resolutionunit="CENTIMETER",
                subfiletype=1 if level else 0, metadata=None,
            )  # fmt: skip
    return path


# -------------------------------------------------------------------- readers
def _positions(n: int, size: int, seed: int = 42) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    return [(int(y), int(x)) for y, x in rng.integers(0, size - READ, (n, 2))]


def _interleaved(fns: dict[str, Callable[[int, int], object]], pos: list[tuple[int, int]]):
    """Per reader: (wall s, process CPU s) over every position, readers taking turns per read.

    Other processes' load swings within seconds here, so every reader reads
    position i before any reader reads position i + 1 (the order rotating),
    and all of them see the same load.
    """
    names = list(fns)
    for name in names:
        fns[name](*pos[0])  # warm-up (imports, first file access, lazy levels)
    wall = dict.fromkeys(names, 0.0)
    cpu = dict.fromkeys(names, 0.0)
    for i, (y, x) in enumerate(pos):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            c0, t0 = time.process_time(), time.perf_counter()
            fns[name](y, x)
            wall[name] += time.perf_counter() - t0
            cpu[name] += time.process_time() - c0
    return {name: (wall[name], cpu[name]) for name in names}


def readers(path: Path) -> dict[str, Callable[[int, int], np.ndarray]]:
    """The contenders, freshly opened, each returning a (512, 512, 3|4) array for (y, x)."""
    import openslide
    from napari_wsi.backends.openslide import OpenSlideStore

    import histoscope as hs
    from histoscope.slide import _cache

    # Separate Slide objects: readers take turns on the same window, and a shared
    # tile cache would hand the second one the first one's tiles.
    level0 = hs.open_slide(path).levels[0]
    other = hs.open_slide(path)
    budget, _cache.TILE_CACHE_BYTES = _cache.TILE_CACHE_BYTES, 0
    try:
        level0_nocache = hs.open_slide(path).levels[0]
    finally:
        _cache.TILE_CACHE_BYTES = budget
    store = OpenSlideStore(path)
    (wsi_levels, _params, _kind), *_ = store.to_layer_data_tuples()
    wsi0 = wsi_levels[0]
    osr = openslide.OpenSlide(str(path))

    def window(level):
        return lambda y, x: level[y : y + READ, x : x + READ].compute()

    raw, _ = raw_decoder(path)

    return {
        LEVELS: window(level0),
        LEVELS_NOCACHE: window(level0_nocache),
        READ_REGION: lambda y, x: other.read_region(x, y, READ, READ),
        NAPARI_WSI: window(wsi0),
        "openslide.OpenSlide.read_region (its own tile cache on)": lambda y, x: np.asarray(
            osr.read_region((x, y), 0, (READ, READ))
        ),
        RAW: raw,
    }


LEVELS = "histoscope Slide.levels[0][window].compute()"
LEVELS_NOCACHE = "histoscope Slide.levels[0][window].compute(), tile cache off"
READ_REGION = "histoscope Slide.read_region"
NAPARI_WSI = "napari-wsi 1.3 openslide store, levels[0][window].compute()"
RAW = "raw JPEG decode of the window's tiles, 1 thread, bytes in memory"


def raw_decoder(path: Path) -> tuple[Callable[[int, int], int], int]:
    """``decode(y, x)``: decode, in this thread, the level-0 JPEG tiles a window touches.

    The compressed tiles come from memory (all of level 0 is read up front), so
    this is the ceiling for any reader: nothing but ``imagecodecs.jpeg8_decode``.
    Returns the function (giving decoded pixels) and the tile edge.
    """
    import imagecodecs
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        tables, tile, nx = page.jpegtables, page.tilewidth, -(-page.imagewidth // page.tilewidth)
        with open(path, "rb") as fh:
            blobs = []
            for off, n in zip(page.dataoffsets, page.databytecounts, strict=True):
                fh.seek(off)
                blobs.append(fh.read(n))

    def decode(y: int, x: int) -> int:
        pixels = 0
        for ty in range(y // tile, -(-(y + READ) // tile)):
            for tx in range(x // tile, -(-(x + READ) // tile)):
                blob = blobs[ty * nx + tx]
                pixels += imagecodecs.jpeg8_decode(blob, tables=tables, colorspace="RGB").size // 3
        return pixels

    return decode, tile


def open_time(path: Path, repeats: int = 15) -> tuple[float, float]:
    """(median, min) seconds to open a slide and build its napari layer (no pixels read).

    The layer is what the reader hands napari: ``histoscope.layers.slide_layer``.
    """
    import histoscope as hs
    from histoscope.layers import slide_layer

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with hs.open_slide(path) as slide:
            data, kwargs, kind = slide_layer(slide)
            assert kind == "image" and kwargs["scale"] and len(data) > 1
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def openslide_open_time(path: Path, repeats: int = 15) -> float:
    """Median seconds for ``openslide.OpenSlide(path)`` plus its level geometry, for scale."""
    import openslide

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with openslide.OpenSlide(str(path)) as osr:
            assert osr.level_dimensions and osr.properties
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _tile_count(path: Path) -> int:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        return sum(len(page.dataoffsets) for page in tif.pages)


def _cpu_busy() -> tuple[float, float]:
    """(busy seconds of the whole machine, CPU seconds of this process) so far."""
    try:
        with open("/proc/stat") as fh:
            fields = [float(v) for v in fh.readline().split()[1:]]
        busy = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        busy = float("nan")
    t = os.times()
    return busy, t.user + t.system


def _warm(path: Path) -> None:
    """Read the file once so every reader finds it in the page cache."""
    with open(path, "rb") as fh:
        while fh.read(1 << 24):
            pass


# ----------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reads", type=int, default=300, help="random reads per reader per round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; the median is reported")
    args = ap.parse_args(argv)

    path = bench_slide()
    pos = _positions(args.reads, SIZE)
    mp = READ * READ / 1e6
    print(f"# Slide I/O: {args.reads} random {READ}x{READ} level-0 reads of {path.name}, "
          f"readers taking turns per read, median of {args.rounds} rounds (file in page "
          "cache, fresh handles each round)")  # fmt: skip
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    rounds: list[dict[str, tuple[float, float]]] = []
    busy0, own0, wall0 = *_cpu_busy(), time.perf_counter()
    for _ in range(args.rounds):
        _warm(path)
        rounds.append(_interleaved(readers(path), pos))  # fresh handles and caches
    busy1, own1, wall1 = *_cpu_busy(), time.perf_counter()
    others = (busy1 - busy0 - (own1 - own0)) / ((wall1 - wall0) * (os.cpu_count() or 1))
    print(f"# other processes used {100 * others:.0f}% of the machine's CPU during the reads")
    tiles = statistics.mean(
        (-(-(y + READ) // 256) - y // 256) * (-(-(x + READ) // 256) - x // 256) for y, x in pos
    )
    decoded = tiles * 256 * 256 / 1e6  # MP decoded per window by the raw row
    print(f"# MP/s counts output pixels; a window touches {tiles:.2f} tiles of 256 x 256 on "
          f"average, so {tiles * 65536 / READ**2:.2f}x its pixels are decoded")  # fmt: skip

    rows = {}
    for name in rounds[0]:
        wall = statistics.median(r[name][0] for r in rounds)
        cpu = statistics.median(r[name][1] for r in rounds)
        rows[name] = (args.reads / wall, args.reads * mp / wall, cpu / args.reads * 1e3)
    print("\n| reader | reads/s | MP/s | CPU ms/read |\n| --- | ---: | ---: | ---: |")
    for name, (rps, mps, cpu) in rows.items():
        if name == RAW:
            print(f"| {name} | {rps:.1f} | {rps * decoded:.1f} decoded | {cpu:.2f} |")
        else:
            print(f"| {name} | {rps:.1f} | {mps:.1f} | {cpu:.2f} |")
    raw = rows[RAW][0] * decoded  # decoded MP per wall second, one thread
    raw_cpu = args.reads * decoded / (rows[RAW][2] * args.reads / 1e3)  # per CPU second
    wsi = rows[NAPARI_WSI][1]
    print("\n| ratio | value | goal |\n| --- | ---: | ---: |")
    for name in (LEVELS, LEVELS_NOCACHE, READ_REGION):
        print(f"| {name} / napari-wsi | {rows[name][1] / wsi:.1f}x | >= 5x |")
    for name in (LEVELS, LEVELS_NOCACHE, READ_REGION):
        print(f"| {name} / raw 1-core decode rate | {rows[name][1] / raw:.2f}x | >= 0.5x |")
    for name in (LEVELS, LEVELS_NOCACHE, READ_REGION):
        print(f"| {name} / raw decode per CPU second | {rows[name][1] / raw_cpu:.2f}x | |")
    print("\n| share of the reader's CPU time that is JPEG decoding | value |\n| --- | ---: |")
    for name, (_, _, cpu) in rows.items():
        if name != RAW:
            print(f"| {name} | {min(rows[RAW][2] / cpu, 1):.0%} |")

    print("\n| open + napari layer data | size | tiles in file | median ms | min ms "
          "| OpenSlide open, median ms |")  # fmt: skip
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for width in (10_000, 100_000):
        p = wide_slide(width)
        tiles = _tile_count(p)
        med, best = open_time(p)
        osl = openslide_open_time(p)
        print(f"| {p.name} | {width} x {width // 4} | {tiles} | {med * 1e3:.1f} "
              f"| {best * 1e3:.1f} | {osl * 1e3:.1f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
