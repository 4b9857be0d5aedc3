"""The low-resolution plan of a slide: where each tissue compartment lies.

The plan is a small ``uint8`` map (one pixel per :data:`MAP_UM` µm) of
:data:`~histoscope.synthetic._constants.TISSUE_TYPES`, plus smooth fields for
inflammation and fibre orientation. Pixels look it up through a small domain
warp so compartment borders are organic rather than staircase-shaped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from histoscope.synthetic._constants import (
    FAT,
    GLASS,
    LYMPHOID,
    MUCOSA,
    MUSCLE,
    NECROSIS,
    ORGANS,
    STROMA,
    TUMOUR,
)
from histoscope.synthetic._noise import Texture
from histoscope.synthetic._params import SlideParams

#: µm per pixel of the tissue plan (and of the written tumour mask).
MAP_UM = 16.0


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Zero-mean, unit-variance noise of ``shape`` with correlation length ``scale`` px."""
    scale = max(float(scale), 1.0)
    ch = int(np.ceil(shape[0] / scale)) + 3
    cw = int(np.ceil(shape[1] / scale)) + 3
    white = ndi.gaussian_filter(rng.standard_normal((ch, cw)), 0.7)
    off = int(scale)
    out = ndi.zoom(white, scale, order=3)[off : off + shape[0], off : off + shape[1]]
    out = out - out.mean()
    return out / (out.std() + 1e-12)


@dataclass
class Layout:
    """Tissue plan and the textures shared by every tile of one slide."""

    types: np.ndarray  # (mh, mw) uint8 tissue type
    inflammation: np.ndarray  # (mh, mw) float32 in [0, 1]
    angle: np.ndarray  # (mh, mw) float32 fibre orientation, radians
    map_px: float  # level-0 pixels per map pixel
    warp: Texture
    warp_amp: float  # level-0 px
    tumour_mask: np.ndarray  # (mh, mw) bool: tumour bed incl. necrosis

    def map_index(self, yy: np.ndarray, xx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Map pixel indices ``(my, mx)`` under level-0 coordinates, after the warp."""
        wy = (self.warp.sample(yy, xx) - 0.5) * self.warp_amp
        wx = (self.warp.sample(xx + 97, yy + 31) - 0.5) * self.warp_amp
        my = np.clip(((yy + wy) / self.map_px).astype(np.int64), 0, self.types.shape[0] - 1)
        mx = np.clip(((xx + wx) / self.map_px).astype(np.int64), 0, self.types.shape[1] - 1)
        return my, mx

    def type_at(self, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        """Tissue type at level-0 pixel coordinates (broadcast together)."""
        my, mx = self.map_index(yy, xx)
        return self.types[my, mx]

    def field_at(self, field: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        """A smooth map field (inflammation, angle) at level-0 coordinates."""
        my, mx = self.map_index(yy, xx)
        return field[my, mx]

    @property
    def tissue_fraction_tumour(self) -> float:
        """Tumour bed area as a fraction of the tissue area."""
        tissue = self.types != GLASS
        return float(self.tumour_mask.sum() / max(1, tissue.sum()))


def _tissue_outline(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    mh, mw = shape
    field = smooth_noise(rng, shape, max(mh, mw) / 5)
    yy = np.linspace(-1, 1, mh)[:, None]
    xx = np.linspace(-1, 1, mw)[None, :]
    field = field - 2.2 * (yy**2 + xx**2) ** 1.5
    by, bx = max(1, int(0.03 * mh)), max(1, int(0.03 * mw))  # glass margin on each side
    field[:by] = field[-by:] = -9
    field[:, :bx] = field[:, -bx:] = -9
    frac = rng.uniform(0.35, 0.7)
    mask = field > np.quantile(field, 1 - frac)
    mask = ndi.binary_fill_holes(ndi.binary_opening(mask, iterations=1))
    lab, n = ndi.label(mask)
    if n > 1:  # keep the larger pieces, as a section may break into fragments
        sizes = ndi.sum(mask, lab, range(1, n + 1))
        keep = np.flatnonzero(sizes >= 0.05 * sizes.max()) + 1
        mask = np.isin(lab, keep)
    return mask


def _disc(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def build_layout(p: SlideParams) -> Layout:
    """Plan the compartments of the slide described by ``p``.

    Parameters
    ----------
    p
        Slide parameters.

    Returns
    -------
    Layout
    """
    rng = np.random.default_rng([p.seed, 0x1A40])
    h_um, w_um = p.shape[0] * p.mpp, p.shape[1] * p.mpp
    shape = (max(8, int(np.ceil(h_um / MAP_UM))), max(8, int(np.ceil(w_um / MAP_UM))))
    tissue = _tissue_outline(rng, shape)
    weights = {"stroma": 0.5, **ORGANS[p.organ]["weights"]}
    scale = 900.0 / MAP_UM  # compartments ~1 mm across
    fields = {
        STROMA: np.full(shape, np.log(weights.get("stroma", 0.5) + 0.3)),
    }
    for name, t in (("mucosa", MUCOSA), ("fat", FAT), ("muscle", MUSCLE), ("lymphoid", LYMPHOID)):
        w = weights.get(name, 0.0)
        if w > 0:
            aniso = smooth_noise(rng, shape, scale * (0.6 if t == MUSCLE else 1.0))
            fields[t] = aniso + np.log(w)
    keys = list(fields)
    stack = np.stack([fields[k] for k in keys])
    types = np.asarray(keys, np.uint8)[np.argmax(stack, axis=0)]
    types[~tissue] = GLASS
    # lymphoid aggregates: small round follicles scattered in the tissue
    area_mm2 = tissue.sum() * (MAP_UM / 1000) ** 2
    ys, xs = np.nonzero(tissue)
    for _ in range(int(rng.poisson(area_mm2 * 0.6 * (0.3 + p.inflammation)))):
        k = rng.integers(len(ys))
        r = rng.uniform(90, 260) / MAP_UM
        types[_disc(shape, ys[k], xs[k], r) & tissue] = LYMPHOID
    tumour = np.zeros(shape, bool)
    if p.malignant and len(ys):
        target = p.tumour_fraction_target * tissue.sum()
        tfield = smooth_noise(rng, shape, scale * 1.2)
        if p.tumour_extent == "focus":
            k = rng.integers(len(ys))
            yy, xx = np.ogrid[: shape[0], : shape[1]]
            tfield = -np.hypot(yy - ys[k], xx - xs[k]) + 0.8 * smooth_noise(rng, shape, 4.0)
        vals = np.sort(tfield[tissue])[::-1]
        thr = vals[min(len(vals) - 1, max(1, int(target)))]
        tumour = (tfield > thr) & tissue
        if not tumour.any():
            tumour.flat[np.flatnonzero(tissue)[0]] = True
        types[tumour] = TUMOUR
        dist = ndi.distance_transform_edt(tumour) * MAP_UM
        if rng.random() < 0.6:
            nec = (dist > rng.uniform(250, 450)) & (smooth_noise(rng, shape, 6.0) > -0.3)
            types[nec] = NECROSIS
        near = ndi.distance_transform_edt(~tumour) * MAP_UM < 200
    else:
        near = np.zeros(shape, bool)
    inflam = 0.5 + 0.5 * np.tanh(smooth_noise(rng, shape, scale * 0.5))
    inflam = np.clip(p.inflammation * (0.4 + inflam) + 0.6 * near * p.inflammation, 0, 1)
    angle = np.pi * (0.5 + 0.5 * np.tanh(0.6 * smooth_noise(rng, shape, scale * 0.4)))
    map_px = MAP_UM / p.mpp
    return Layout(
        types=types,
        inflammation=inflam.astype(np.float32),
        angle=angle.astype(np.float32),
        map_px=map_px,
        warp=Texture(rng, 256, 10.0),
        warp_amp=p.um(24.0),
        tumour_mask=tumour,
    )
