"""What the Cells panel draws of a large cell table: an image far out, the points in view near.

napari 0.9 sends every point of a Points layer to the canvas on each change
(colour, filter; about 1 s per million points, turning each point's symbol
into a string), draws all of them on each paint, in view or not, and in 2D
ignores ``shown`` when drawing. A million points costs seconds per change and
per paint with software OpenGL. So above :data:`POINTS_MAX` cells the panel
keeps the ``cells`` Points layer with every cell (the table, for the session
and export) hidden, and draws:

- near: the kept cells in a window round the view (the view plus
  :data:`MARGIN` on each side) as a second Points layer, while that window
  holds at most :data:`POINTS_MAX` of them;
- far: a multiscale image of codes (a class, or a value in 255 steps) shown
  through a colour map, one pixel per cell at each level
  (:class:`OverviewGrid`), which costs the same whatever the zoom. (Not an
  RGB image: the panels offer RGB image layers as slides.)
"""

from __future__ import annotations

import numpy as np

#: Most points drawn at once; beyond that many cells in the window, the overview image.
POINTS_MAX = 50_000
#: Largest side of the overview's finest level (px); its pixel is never under this many µm.
OVERVIEW_MAX_PX = 4096
OVERVIEW_MIN_UM = 2.0
#: Coarsest level: its larger side is at most this many px.
OVERVIEW_TOP_PX = 512
#: The window of drawn points reaches this fraction of the view beyond each edge (small pans
#: need no new window).
MARGIN = 0.25


def overview_um(coords: np.ndarray) -> float:
    """Pixel size (µm) of the overview's finest level for cells at ``coords`` (µm, ``[y, x]``)."""
    if not len(coords):
        return OVERVIEW_MIN_UM
    extent = float(np.max(coords)) + 1.0
    return max(OVERVIEW_MIN_UM, extent / OVERVIEW_MAX_PX)


class OverviewGrid:
    """Where each cell falls in the overview's finest level of ``um`` µm pixels.

    Worked out once per cell table; :meth:`levels` then paints any colours
    and filter into the same shapes.
    """

    def __init__(self, coords: np.ndarray, um: float) -> None:
        coords = np.asarray(coords, np.float64).reshape(-1, 2)
        self.um = um
        self.iy = np.floor(coords[:, 0] / um).astype(np.int64)
        self.ix = np.floor(coords[:, 1] / um).astype(np.int64)
        h, w = (int(self.iy.max()) + 1, int(self.ix.max()) + 1) if len(coords) else (1, 1)
        # padded to a multiple of the coarsest level's pixel: each level is exactly half the
        # one before, as napari assumes when it places a level by the ratio of the shapes
        step = 1
        while max(-(-h // step), -(-w // step)) > OVERVIEW_TOP_PX:
            step *= 2
        self.shape = (-(-h // step) * step, -(-w // step) * step)

    def levels(self, codes: np.ndarray, keep: np.ndarray) -> list[np.ndarray]:
        """Levels of ``(h, w)`` uint8 images of the kept cells' ``codes`` (1-255), 0 elsewhere.

        Level ``k`` has pixels of ``um * 2**k`` µm, its pixel ``(i, j)``
        covering ``[i, i + 1) * um * 2**k`` (place the layer with ``scale``
        and half a pixel of ``translate``), down to a larger side of at most
        :data:`OVERVIEW_TOP_PX`. Each kept cell writes its code into the pixel
        it falls in; where cells share a pixel the last one shows. Shown
        through :func:`code_colormap`, code 0 is transparent.
        """
        kept = np.flatnonzero(keep)
        code = np.asarray(codes, np.uint8)[kept]
        iy, ix = self.iy[kept], self.ix[kept]
        (h, w), out, k = self.shape, [], 0
        while True:
            img = np.zeros((h, w), np.uint8)
            img[iy >> k, ix >> k] = code
            out.append(img)
            if max(h, w) <= OVERVIEW_TOP_PX:
                return out
            k += 1
            h, w = h // 2, w // 2  # exact: see __init__


def class_codes(pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Overview codes of class indices (``-1``: untyped, the last colour): ``1 + class``.

    Past 254 classes the codes wrap round (classes then share colours far out).
    """
    idx = np.where(np.asarray(pred) < 0, n_classes, pred)
    return (1 + idx % 255).astype(np.uint8)


def value_codes(values: np.ndarray) -> np.ndarray:
    """Overview codes of values in 0-1: ``1 + round(254 * value)``."""
    return (1 + np.rint(254 * np.clip(np.asarray(values, np.float32), 0, 1))).astype(np.uint8)


def code_colormap(colors: np.ndarray, name: str):
    """napari colour map showing code ``k`` (1-255) as ``colors[k - 1]`` and 0 as transparent.

    Use with ``contrast_limits=(0, 255)``: 256 equal steps, one per code.
    """
    from napari.utils import Colormap

    lut = np.zeros((256, 4), np.float32)
    colors = np.asarray(colors, np.float32)[:255]
    lut[1 : 1 + len(colors)] = colors
    lut[1 + len(colors) :] = colors[-1] if len(colors) else 0
    return Colormap(colors=lut, controls=np.linspace(0, 1, 257), interpolation="zero", name=name)


def view_box(viewer) -> tuple[float, float, float, float]:
    """World ``(y0, x0, y1, x1)`` the canvas shows, widened by :data:`MARGIN` on each side."""
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    cy, cx = camera.center[-2:]
    ch, cw = viewer.canvas.size
    hy = ch / 2 / camera.zoom * (1 + 2 * MARGIN)
    hx = cw / 2 / camera.zoom * (1 + 2 * MARGIN)
    return cy - hy, cx - hx, cy + hy, cx + hx


def in_box(coords: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """Which ``coords`` (``[y, x]``) lie inside ``box`` ``(y0, x0, y1, x1)``."""
    y, x = coords[:, 0], coords[:, 1]
    y0, x0, y1, x1 = box
    return (y >= y0) & (y <= y1) & (x >= x0) & (x <= x1)
