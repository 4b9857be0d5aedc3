"""Nuclei of a slide, tile by tile, each nucleus kept once."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Generator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from typing import TYPE_CHECKING

from histoscope.errors import SlideError
from histoscope.nuclei._adapters import detector
from histoscope.nuclei._params import NucleiParams
from histoscope.nuclei._table import Nuclei

if TYPE_CHECKING:
    from histoscope.slide import Slide
    from histoscope.tissue import TissueMask


def tile_cores(
    region: tuple[float, float, float, float], step: float
) -> list[tuple[float, float, float, float]]:
    """Cores ``(x0, y0, x1, y1)`` (level-0 px) that partition ``region`` in steps of ``step``.

    A nucleus belongs to the one core holding its centroid (``x0 <= x < x1``).
    """
    x, y, w, h = region
    nx, ny = max(1, math.ceil(w / step - 1e-9)), max(1, math.ceil(h / step - 1e-9))
    xs = [x + i * step for i in range(nx)] + [x + w]
    ys = [y + j * step for j in range(ny)] + [y + h]
    return [(xs[i], ys[j], xs[i + 1], ys[j + 1]) for j in range(ny) for i in range(nx)]


def _has_tissue(tissue: TissueMask, core, slide_mpp: float, pad: float) -> bool:
    """Whether any mask pixel under ``core`` (grown by ``pad`` level-0 px) is tissue."""
    f = tissue.mpp / slide_mpp  # level-0 px per mask px
    m = tissue.mask
    c0 = max(0, int(math.floor((core[0] - pad) / f)))
    r0 = max(0, int(math.floor((core[1] - pad) / f)))
    c1 = min(m.shape[1], int(math.ceil((core[2] + pad) / f)))
    r1 = min(m.shape[0], int(math.ceil((core[3] + pad) / f)))
    return c1 > c0 and r1 > r0 and bool(m[r0:r1, c0:c1].any())


def _order(cores, near: tuple[float, float] | None) -> list[int]:
    if near is None:
        return list(range(len(cores)))
    d = [math.hypot((c[0] + c[2]) / 2 - near[0], (c[1] + c[3]) / 2 - near[1]) for c in cores]
    return sorted(range(len(cores)), key=lambda i: (d[i], i))


def detect_tile(slide: Slide, core, mpp: float, params: NucleiParams, detect) -> Nuclei:
    """Nuclei whose centroid lies in ``core`` (level-0 px), found in a read padded by the overlap."""
    f = mpp / slide.mpp  # level-0 px per tile px
    margin = params.overlap_um / 2 / mpp  # tile px of context on each side
    rx, ry = round(core[0] - margin * f), round(core[1] - margin * f)
    w = math.ceil((core[2] - rx) / f + margin)
    h = math.ceil((core[3] - ry) / f + margin)
    rgb = slide.read_region(rx, ry, w, h, mpp=mpp)
    found = detect(rgb, mpp, params)
    # tile pixel j covers level-0 [rx + j f, rx + (j + 1) f): its centre is at index rx + (j + .5) f - .5
    placed = found.translated(rx + 0.5 * f - 0.5, ry + 0.5 * f - 0.5, f, mpp=slide.mpp)
    own = (
        (placed.x >= core[0]) & (placed.x < core[2]) & (placed.y >= core[1]) & (placed.y < core[3])
    )
    return placed.subset(own)


def iter_detect(
    slide: Slide,
    params: NucleiParams | None = None,
    *,
    region: tuple[float, float, float, float] | None = None,
    tissue: TissueMask | None = None,
    near: tuple[float, float] | None = None,
    workers: int = 1,
) -> Generator[tuple[int, int, Nuclei], bool | None, Nuclei]:
    """Detect nuclei over a slide tile by tile.

    Parameters
    ----------
    slide
        An open slide with a known µm/px.
    params
        :class:`NucleiParams` (default: the classical detector at 0.5 µm/px).
    region
        ``(x, y, w, h)`` in level-0 px; ``None``: the whole slide.
    tissue
        A :class:`~histoscope.tissue.TissueMask`: tiles with no tissue are skipped
        (they count as done).
    near
        ``(x, y)`` level-0 px: tiles nearest that point first.
    workers
        Tiles searched at once in threads (the detector's NumPy, SciPy and
        scikit-image work releases the GIL); results still come in tile order.

    Yields
    ------
    tuple
        ``(done, total, nuclei)`` after each tile: tiles finished, tiles in all, and the
        nuclei that tile owns (level-0 px). Send ``False`` to stop; the nuclei of the
        tiles finished are returned.

    Returns
    -------
    Nuclei
        Every nucleus whose centroid lies in ``region``, each once: a nucleus belongs to
        the tile whose core (the tile without its overlap) holds its centroid.
    """
    params = params or NucleiParams()
    if not slide.mpp:
        raise SlideError(f"{slide.path}: nucleus detection needs the slide's µm/px; pass mpp= "
                         "when opening the slide (CLI: --mpp)")  # fmt: skip
    detect = detector(params)
    mpp = max(params.mpp, float(slide.mpp))
    x0, y0, w0, h0 = region if region is not None else (0, 0, slide.dimensions[0],
                                                        slide.dimensions[1])  # fmt: skip
    if not (w0 > 0 and h0 > 0):
        raise ValueError(f"region must have a positive size, got {region}")
    step = params.tile_size * mpp / slide.mpp
    cores = tile_cores((x0, y0, w0, h0), step)
    order = _order(cores, near)
    pad = params.overlap_um / 2 / slide.mpp
    if int(workers) < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    parts: list[Nuclei] = []

    def work(k: int) -> Nuclei:
        core = cores[k]
        if tissue is not None and not _has_tissue(tissue, core, float(slide.mpp), pad):
            return Nuclei.empty(float(slide.mpp))
        return detect_tile(slide, core, mpp, params, detect)

    if int(workers) == 1:
        for done, k in enumerate(order, start=1):
            found = work(k)
            parts.append(found)
            if (yield (done, len(cores), found)) is False:
                break
        return Nuclei.concat(parts, float(slide.mpp))
    pool = ThreadPoolExecutor(int(workers), thread_name_prefix="histoscope-nuclei")
    todo = iter(order)
    pending: deque[Future] = deque(pool.submit(work, k) for k in islice(todo, int(workers)))
    try:
        done = 0
        while pending:
            found = pending.popleft().result()
            done += 1
            parts.append(found)
            k = next(todo, None)
            if k is not None:
                pending.append(pool.submit(work, k))
            if (yield (done, len(cores), found)) is False:
                break
    finally:  # a stop or close: tiles not started are dropped, running ones finish
        for fut in pending:
            fut.cancel()
        pool.shutdown(wait=True)
    return Nuclei.concat(parts, float(slide.mpp))


def detect_slide(slide: Slide, params: NucleiParams | None = None, **kwargs) -> Nuclei:
    """Run :func:`iter_detect` to the end (same keyword arguments) and return every nucleus."""
    from histoscope.progress import drive

    return drive(iter_detect(slide, params, **kwargs))
