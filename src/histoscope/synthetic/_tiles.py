"""Feed the pyramid writer tile by tile from blocks rendered ahead in threads.

The writer asks for level-0 tiles in raster order. Drawing wider blocks is
cheaper per pixel (fewer cell look-ups at block borders), and numpy releases
the GIL in its array kernels, so blocks of the current and next block row are
drawn by a thread pool while the writer compresses. Only two block rows are
held at a time, so memory grows with the slide width, never its area.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from histoscope.synthetic._cells import SlideContext, make_context
from histoscope.synthetic._params import SlideParams
from histoscope.synthetic._render import render_region


class BlockRenderer:
    """Callable ``render(y, x, h, w)`` for :func:`histoscope.slide.write_pyramidal_tiff`.

    Parameters
    ----------
    ctx
        Slide context.
    block
        ``(height, width)`` of the blocks drawn at once.
    workers
        Threads; defaults to the number of CPUs.
    """

    def __init__(
        self, ctx: SlideContext, block: tuple[int, int] = (512, 2048), workers: int | None = None
    ) -> None:
        self.ctx = ctx
        self.bh, self.bw = block
        self.h, self.w = ctx.params.shape
        self.pool = ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1)
        self.futures: dict[tuple[int, int], Future] = {}
        self.nbx = -(-self.w // self.bw)
        self.nby = -(-self.h // self.bh)

    def _submit_row(self, by: int) -> None:
        if by >= self.nby:
            return
        for bx in range(self.nbx):
            if (by, bx) not in self.futures:
                y, x = by * self.bh, bx * self.bw
                h, w = min(self.bh, self.h - y), min(self.bw, self.w - x)
                self.futures[by, bx] = self.pool.submit(render_region, self.ctx, y, x, h, w)

    def __call__(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        by, bx = y // self.bh, x // self.bw
        if (y + h - 1) // self.bh != by or (x + w - 1) // self.bw != bx:
            return render_region(self.ctx, y, x, h, w)  # tile straddles blocks
        for key in [k for k in self.futures if k[0] < by]:
            del self.futures[key]
        self._submit_row(by)
        self._submit_row(by + 1)
        block = self.futures[by, bx].result()
        oy, ox = y - by * self.bh, x - bx * self.bw
        return block[oy : oy + h, ox : ox + w]

    def close(self) -> None:
        """Stop the worker threads and drop cached blocks."""
        for f in self.futures.values():
            f.cancel()
        self.pool.shutdown(wait=True)
        self.futures.clear()


def write_slide(
    path,
    params: SlideParams,
    ctx: SlideContext | None = None,
    tile: int = 256,
    progress: Callable[[int, int], None] | None = None,
    workers: int | None = None,
):
    """Render the slide of ``params`` into a pyramidal JPEG-tiled TIFF at ``path``."""
    from histoscope.slide import write_pyramidal_tiff

    ctx = ctx or make_context(params)
    render = BlockRenderer(ctx, block=(2 * tile, 8 * tile), workers=workers)
    desc = (
        f"HistoScope synthetic {params.kind} slide; seed={params.seed}; organ={params.organ}; "
        f"MPP = {params.mpp}"
    )
    try:
        return write_pyramidal_tiff(
            path,
            render,
            mpp=params.mpp,
            shape=params.shape,
            tile=tile,
            quality=params.jpeg_quality,
            description=desc,
            progress=progress,
        )
    finally:
        render.close()
