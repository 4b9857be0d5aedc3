"""Draw one level-0 region: stain densities per pixel, then Beer-Lambert colour.

Each region is drawn from absolute coordinates only (tissue plan, hashed
cells, periodic textures), with a margin wide enough for the optical blur, so
neighbouring regions drawn separately join without seams.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from histoscope.synthetic._cells import SlideContext, cells_in_window, wobble
from histoscope.synthetic._constants import (
    FAT,
    LYMPHOID,
    MUCOSA,
    MUSCLE,
    NECROSIS,
    STROMA,
    TUMOUR,
)
from histoscope.synthetic._noise import hash_uniform

_BUCKETS = (5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 18, 20, 23, 26, 30, 35, 40, 46, 54, 62)
_H_SCALE, _E_SCALE = 0.6, 0.55  # overall densities of the two stains
_SOFT = 0.7
_MAX_CELL_UM = 30.0  # largest cell extent from its centre (a macrophage's cytoplasm)  # px of edge softness of nuclei before the optical blur


def _background(ctx: SlideContext, yy: np.ndarray, xx: np.ndarray):
    """Haematoxylin and eosin optical density of the extracellular tissue."""
    lay = ctx.layout
    my, mx = lay.map_index(yy, xx)  # one domain-warped look-up serves every map field
    t = lay.types[my, mx]
    shape = t.shape
    hod = np.zeros(shape, np.float32)
    eod = np.zeros(shape, np.float32)
    if not (t != 0).any():
        return t, hod, eod
    ang = lay.angle[my, mx]
    fib = _oriented(ctx, yy, xx, ang + 0.7)
    grain = ctx.coarse.sample(yy, xx)
    stroma = t == STROMA
    if (t == TUMOUR).any():
        nest = ctx.nest_at(yy, xx) & (t == TUMOUR)
        des = (t == TUMOUR) & ~nest
        eod[nest] = (0.26 * (0.8 + 0.4 * grain))[nest]
        hod[nest] = 0.05
        stroma = stroma | des
    eod[stroma] = (0.34 * (0.3 + 1.2 * fib))[stroma]
    hod[stroma] = 0.02
    m = t == MUCOSA
    eod[m] = (0.2 * (0.5 + 0.8 * fib))[m]
    hod[m] = 0.05
    m = t == LYMPHOID
    eod[m], hod[m] = 0.1, 0.06
    m = t == NECROSIS
    if m.any():
        g2 = ctx.grain.sample(yy, xx)
        eod[m] = (0.55 * (0.5 + 0.9 * grain))[m]
        hod[m] = (0.18 * g2 * grain)[m]
    m = t == MUSCLE
    if m.any():
        streak = _oriented(ctx, yy, xx, ang)
        eod[m] = (0.55 * (0.7 + 0.6 * streak))[m]
        hod[m] = 0.03
    m = t == FAT
    if m.any():
        eod[m] = (0.42 * _fat_membranes(ctx, yy, xx))[m]
    return t, hod, eod


def _oriented(ctx: SlideContext, yy, xx, ang):
    """Fibre texture streaked along the local angle (blend of three orientations)."""
    out = np.zeros(np.broadcast(yy, xx).shape, np.float32)
    for k in range(3):
        phi = k * np.pi / 3
        # the fibre texture runs along x; transposing / shearing the lookup turns it
        if k == 0:
            tex = ctx.fibre.sample(yy, xx)
        elif k == 1:
            tex = ctx.fibre.sample(xx + 311, yy)
        else:
            tex = ctx.fibre.sample(yy + xx, xx - yy)
        out += (np.cos(ang - phi) ** 2 * (2 / 3)).astype(np.float32) * tex
    return out


def _fat_membranes(ctx: SlideContext, yy, xx) -> np.ndarray:
    """Adipocyte membranes: ridges of a Worley (cellular) noise."""
    p = ctx.params
    s = p.um(p.fat_cell_um)
    gy, gx = np.floor(yy / s).astype(np.int64), np.floor(xx / s).astype(np.int64)
    yy, xx = np.broadcast_arrays(yy, xx)
    gy, gx = np.broadcast_arrays(gy, gx)
    d1 = np.full(yy.shape, np.inf)
    d2 = np.full(yy.shape, np.inf)
    for oy in (-1, 0, 1):
        for ox in (-1, 0, 1):
            cy, cx = gy + oy, gx + ox
            sy = (cy + 0.15 + 0.7 * hash_uniform(p.seed, 901, cy, cx)) * s
            sx = (cx + 0.15 + 0.7 * hash_uniform(p.seed, 902, cy, cx)) * s
            d = np.hypot(yy - sy, xx - sx)
            d2 = np.where(d < d1, d1, np.minimum(d2, d))
            d1 = np.minimum(d1, d)
    thick = p.um(1.0)
    return np.exp(-(((d2 - d1) / thick) ** 2)).astype(np.float32)


def _objects_od(ctx, objs: dict, gland: bool, y0, x0, hod, eod) -> None:
    """Paint gland epithelium/lumens or vessel lumens/walls into the OD maps."""
    p = ctx.params
    h, w = hod.shape
    wall = p.um(2.0)
    for n in range(len(objs["y"])):
        o = {k: v[n] for k, v in objs.items()}
        r = o["ro"] * (1 + o["g2"] + o["g3"]) + wall + 2
        ya, yb = max(0, int(o["y"] - r - y0)), min(h, int(o["y"] + r - y0) + 1)
        xa, xb = max(0, int(o["x"] - r - x0)), min(w, int(o["x"] + r - x0) + 1)
        if ya >= yb or xa >= xb:
            continue
        dy = np.arange(ya, yb)[:, None] + y0 - o["y"]
        dx = np.arange(xa, xb)[None, :] + x0 - o["x"]
        d = np.hypot(dy, dx) / wobble(o, np.arctan2(dy, dx))
        hs, es = hod[ya:yb, xa:xb], eod[ya:yb, xa:xb]
        if gland:
            band = (d >= o["rl"]) & (d < o["ro"])
            es[band], hs[band] = 0.36, 0.05
            lumen = d < o["rl"]
            es[lumen], hs[lumen] = 0.03, 0.01
        else:
            ring = (d >= o["ro"]) & (d < o["ro"] + wall)
            es[ring] = 0.5
            lumen = d < o["ro"]
            es[lumen], hs[lumen] = 0.06, 0.0


def _splat(ctx, c: dict, sel: np.ndarray, half: int, y0, x0, shape) -> tuple:
    """Nuclei, cytoplasm and DAB of the cells ``sel`` drawn in ``2*half+1`` px stamps.

    Returns flat pixel indices into the region and the H, E and DAB optical
    density to add there (DAB ``None`` when there is none).
    """
    p = ctx.params
    h, w = shape
    cy, cx = c["y"][sel], c["x"][sel]
    iy, ix = np.round(cy).astype(np.int64), np.round(cx).astype(np.int64)
    off = np.arange(-half, half + 1)
    py = iy[:, None, None] + off[None, :, None]
    px = ix[:, None, None] + off[None, None, :]
    dy = (iy - cy).astype(np.float32)[:, None, None] + off.astype(np.float32)[None, :, None]
    dx = (ix - cx).astype(np.float32)[:, None, None] + off.astype(np.float32)[None, None, :]

    def col(k):
        return c[k][sel].astype(np.float32)[:, None, None]

    theta, a, b = col("theta"), col("a"), col("b")
    ct, st = np.cos(theta), np.sin(theta)
    u = dy * st + dx * ct  # along the long axis
    v = dx * st - dy * ct
    un, vn = u / a, v / b
    rho = np.sqrt(un * un + vn * vn)
    # boundary harmonics cos(k phi + ph) from cos/sin of the elliptic angle, no arctan
    inv = 1.0 / np.maximum(rho, 1e-6)
    cs, sn = un * inv, vn * inv
    ph2, ph3, amp2, amp3 = col("ph2"), col("ph3"), col("amp2"), col("amp3")
    rb = (
        1.0
        + (amp2 * np.cos(ph2)) * (cs * cs - sn * sn)
        - (amp2 * np.sin(ph2)) * (2 * cs * sn)
        + (amp3 * np.cos(ph3)) * (cs * (4 * cs * cs - 3))
        - (amp3 * np.sin(ph3)) * (sn * (3 - 4 * sn * sn))
    )
    nuc = np.clip((rb - rho) * (b / _SOFT) + 0.5, 0, 1)
    contrast = col("contrast")
    tex = (1 - contrast) + (2 * contrast) * ctx.chrom.sample(py, px)
    rr = np.minimum(rho / np.maximum(rb, 0.3), 1)
    hn = (col("hdens") * nuc) * tex * (1 - col("ves") * (1 - rr * rr))
    en = None
    if (c["nucleolus"][sel] > 0).any():
        nucleolus = np.exp(-((rho * (1 / 0.22)) ** 2)) * col("nucleolus")
        hn += 0.5 * nucleolus
        en = 0.35 * nucleolus
    cf = col("cf")
    ca, cb = a * cf * col("cf_asp"), b * cf
    shift = col("ecc") * (ca - a)
    rhoc = np.sqrt(((u + shift) / ca) ** 2 + (v / cb) ** 2)
    cyto = np.clip((1 - rhoc) * (cb / _SOFT) + 0.5, 0, 1) * (cf > 1.01)
    rbc = col("hdens") == 0  # red cells: the whole disc is eosin
    ecell = col("edens") * (cyto * (0.75 + 0.25 * tex) * ~rbc + nuc * rbc)
    if en is not None:
        ecell += en
    valid = (py >= y0) & (py < y0 + h) & (px >= x0) & (px < x0 + w)
    idx = ((py - y0) * w + (px - x0))[valid]
    dw = None
    if p.kind == "ihc" and p.positive_fraction > 0 and (c["dab"][sel] > 0).any():
        dab = col("dab") * (0.85 + 0.15 * tex)
        comp = p.compartment
        d = np.zeros_like(nuc)
        if "nuclear" in comp:
            d += nuc
        if "cytoplasmic" in comp:
            d += cyto * (1 - nuc) * 0.9
        if comp == "membranous":
            memb = np.exp(-(((rhoc - 0.95) * cb / p.um(0.8)) ** 2))
            d += 1.6 * memb * (1 - nuc)
        dw = (dab * d)[valid]
    return idx, hn[valid], ecell[valid], dw


class _Accumulator:
    """Sums stamp contributions per pixel, a few million stamp pixels at a time."""

    def __init__(self, maps: list[np.ndarray], limit: int = 3_000_000) -> None:
        self.maps, self.limit = maps, limit
        self.parts: list[tuple] = []
        self.size = 0

    def add(self, part: tuple) -> None:
        self.parts.append(part)
        self.size += len(part[0])
        if self.size >= self.limit:
            self.flush()

    def flush(self) -> None:
        if not self.parts:
            return
        n = self.maps[0].size
        idx = np.concatenate([q[0] for q in self.parts])
        for ch in range(3):
            ws = [q[1 + ch] for q in self.parts if q[1 + ch] is not None]
            if not ws:
                continue
            ii = (
                idx
                if len(ws) == len(self.parts)
                else np.concatenate([q[0] for q in self.parts if q[1 + ch] is not None])
            )
            self.maps[ch] += np.bincount(ii, np.concatenate(ws), n).reshape(self.maps[ch].shape)
        self.parts, self.size = [], 0


def render_region(ctx: SlideContext, y: int, x: int, h: int, w: int) -> np.ndarray:
    """Render the level-0 region ``[y, y+h) x [x, x+w)`` as ``(h, w, 3)`` uint8.

    Parameters
    ----------
    ctx
        Slide context.
    y, x, h, w
        Region in level-0 pixels (may extend past the slide; drawn anyway).

    Returns
    -------
    numpy.ndarray
    """
    p = ctx.params
    pad = int(4 * p.blur_sigma + 0.5) + 1  # = the Gaussian kernel radius, so tiles join exactly
    y0, x0, hh, ww = y - pad, x - pad, h + 2 * pad, w + 2 * pad
    yy = np.arange(y0, y0 + hh)[:, None]
    xx = np.arange(x0, x0 + ww)[None, :]
    t, hod, eod = _background(ctx, yy, xx)
    dod = np.zeros_like(hod)
    if (t != 0).any():
        margin = int(np.ceil(max(_BUCKETS[-1], p.um(_MAX_CELL_UM)))) + 8
        c = cells_in_window(ctx, y0 - margin, x0 - margin, y0 + hh + margin, x0 + ww + margin)
        _objects_od(ctx, c["glands"], True, y0, x0, hod, eod)
        _objects_od(ctx, c["vessels"], False, y0, x0, hod, eod)
        extent = np.maximum(
            c["a"] * (1 + c["amp2"] + c["amp3"]), c["a"] * c["cf"] * c["cf_asp"] * (1 + c["ecc"])
        )
        need = np.ceil(extent + 1.0).astype(np.int64)
        buckets = np.asarray(_BUCKETS)
        # stamp half-sizes: the nearest bucket, or multiples of 8 for big cells at fine µm/px
        halves = np.where(
            need <= buckets[-1],
            buckets[np.minimum(np.searchsorted(buckets, need), len(buckets) - 1)],
            -(-need // 8) * 8,
        )
        acc = _Accumulator([hod, eod, dod])
        for half in np.unique(halves):
            sel = np.flatnonzero(halves == half)
            half = int(half)
            for chunk in np.array_split(sel, max(1, len(sel) * (2 * half + 1) ** 2 // 400_000)):
                acc.add(_splat(ctx, c, chunk, half, y0, x0, (hh, ww)))
        acc.flush()
    if p.kind == "ihc":  # the counterstain tints stroma and cytoplasm faintly
        hod += 0.15 * eod
    # Beer-Lambert: I = I0 * 10^-(sum of concentration x stain OD vector)
    stains = -np.log(10.0) * np.asarray(p.stains, np.float32)
    hc = np.minimum(hod * _H_SCALE, 3.0) * np.float32(p.h_strength)
    ec = np.minimum(eod * _E_SCALE, 3.0) * np.float32(p.e_strength)
    dc = np.minimum(dod, 3.0) if p.kind == "ihc" else None
    noise = (2 * p.noise) * (ctx.grain.sample(yy * 7 + 3, xx * 5 + 1) - np.float32(0.5))
    out = np.empty((h, w, 3), np.uint8)
    for ch in range(3):
        log_t = hc * stains[0, ch] + ec * stains[1, ch]
        if dc is not None:
            log_t += dc * stains[2, ch]
        img = np.float32(p.background[ch]) * np.exp(log_t) + noise
        img = ndi.gaussian_filter(img, p.blur_sigma, mode="nearest")
        out[..., ch] = np.clip(img[pad : pad + h, pad : pad + w] + 0.5, 0, 255)
    return out
