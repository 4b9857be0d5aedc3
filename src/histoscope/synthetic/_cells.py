"""Cells of a slide, computed on demand for any window.

Every cell sits on a site of a jittered hexagonal lattice (one lattice per
population: tumour sheet, inflammatory cells, fibroblasts, ...) or on the rim
of a gland or vessel, which themselves sit on coarser lattices. Whether a
site holds a cell, its class and its shape are hashed from the slide seed
and the site's indices (:func:`~histoscope.synthetic._noise.hash_uniform`),
so the cells inside any window are the same whether that window is a 256 px
tile being drawn or a 2 mm block being written to the ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from histoscope.synthetic._constants import (
    C_ENDOTHELIAL,
    C_EPITHELIAL,
    C_FIBROBLAST,
    C_LYMPHOCYTE,
    C_MACROPHAGE,
    C_NEUTROPHIL,
    C_PLASMA,
    C_SMOOTH_MUSCLE,
    C_TUMOUR,
    CELL_CLASSES,
    FAT,
    IMMUNE_MIX,
    LYMPHOID,
    MUCOSA,
    MUSCLE,
    NECROSIS,
    STROMA,
    TUMOUR,
)
from histoscope.synthetic._layout import Layout
from histoscope.synthetic._noise import Texture, hash_normal, hash_uniform
from histoscope.synthetic._params import SlideParams

#: Non-cell objects drawn like cells but never written to the ground truth.
RBC, DEBRIS = -1, -2

# Morphology groups; the three spindle classes share one on purpose (they are
# the context-only pairs).
G_TUMOUR, G_EPI, G_LYMPH, G_PLASMA, G_NEUT, G_MACRO, G_SPINDLE, G_RBC, G_DEBRIS = range(9)
GROUP_OF_CLASS = {
    C_TUMOUR: G_TUMOUR,
    C_EPITHELIAL: G_EPI,
    C_LYMPHOCYTE: G_LYMPH,
    C_PLASMA: G_PLASMA,
    C_NEUTROPHIL: G_NEUT,
    C_MACROPHAGE: G_MACRO,
    C_FIBROBLAST: G_SPINDLE,
    C_SMOOTH_MUSCLE: G_SPINDLE,
    C_ENDOTHELIAL: G_SPINDLE,
    RBC: G_RBC,
    DEBRIS: G_DEBRIS,
}
_COLS = ("r", "r_sd", "asp", "asp_sd", "irr", "amp2", "amp3", "contrast", "hdens", "nucleolus",
         "cf", "cf_asp", "edens", "ecc", "ves")  # fmt: skip
#: Per-group morphology: nucleus radius µm (mean, sd), aspect ratio (mean, sd),
#: random irregularity, fixed k=2 / k=3 boundary harmonics (kidney, lobes),
#: chromatin contrast, haematoxylin density, nucleolus, cytoplasm size factor
#: and aspect, eosin density, nucleus offset within the cytoplasm (fraction),
#: vesicular chromatin (pale centre, dark rim).
MORPH = np.array(
    [
        [5.6, 1.0, 1.35, 0.2, 0.10, 0.0, 0.0, 0.55, 0.80, 0.9, 1.2, 1.0, 0.10, 0.0, 0.45],  # tumour
        [3.6, 0.35, 1.9, 0.25, 0.03, 0.0, 0.0, 0.30, 0.85, 0.0, 1.5, 1.4, 0.10, 0.3, 0.1],  # epi
        [3.1, 0.25, 1.08, 0.05, 0.03, 0.0, 0.0, 0.15, 1.45, 0.0, 1.25, 1.0, 0.12, 0.0, 0.0],  # lym
        [2.9, 0.25, 1.12, 0.06, 0.03, 0.0, 0.0, 0.75, 1.10, 0.0, 2.1, 1.45, 0.45, 0.55, 0.2],  # pc
        [3.7, 0.3, 1.15, 0.08, 0.03, 0.0, 0.38, 0.20, 1.25, 0.0, 1.55, 1.0, 0.30, 0.0, 0.0],  # neu
        [4.0, 0.45, 1.45, 0.15, 0.05, 0.22, 0.0, 0.30, 0.60, 0.0, 2.5, 1.2, 0.20, 0.35, 0.3],  # mac
        [3.1, 0.35, 3.6, 0.6, 0.04, 0.0, 0.0, 0.20, 1.00, 0.0, 1.3, 1.0, 0.25, 0.0, 0.0],  # spin
        [3.6, 0.2, 1.0, 0.02, 0.01, 0.0, 0.0, 0.00, 0.00, 0.0, 1.0, 1.0, 0.75, 0.0, 0.0],  # rbc
        [1.1, 0.35, 1.2, 0.2, 0.25, 0.0, 0.0, 0.10, 1.60, 0.0, 1.0, 1.0, 0.00, 0.0, 0.0],  # debris
    ]
)
M = {name: i for i, name in enumerate(_COLS)}

(P_TUMOUR, P_LYMPHOID, P_IMMUNE, P_FIBRO, P_MUSCLE, P_DEBRIS,
 P_GLAND, P_VESSEL, P_GLAND_CELL, P_ENDO, P_RBC) = range(11)  # fmt: skip


@dataclass(frozen=True)
class Population:
    """One lattice of candidate cell sites."""

    pop: int
    spacing_um: float
    jitter: float
    occupancy: dict[int, float]


POPULATIONS = (
    Population(P_LYMPHOID, 7.4, 0.55, {LYMPHOID: 0.88}),
    Population(
        P_IMMUNE,
        9.0,
        0.45,
        {STROMA: 0.30, MUCOSA: 0.40, TUMOUR: 0.25, MUSCLE: 0.08, NECROSIS: 0.35, FAT: 0.04},
    ),  # fmt: skip
    Population(
        P_FIBRO, 15.0, 0.45, {STROMA: 0.45, MUCOSA: 0.22, TUMOUR: 0.5, FAT: 0.02, LYMPHOID: 0.03}
    ),  # fmt: skip
    Population(P_MUSCLE, 10.5, 0.3, {MUSCLE: 0.78}),
    Population(P_DEBRIS, 7.0, 0.5, {NECROSIS: 0.45}),
)
GLAND_SPACING_UM, VESSEL_SPACING_UM = 84.0, 130.0
GLAND_OCC = {MUCOSA: 0.92}
VESSEL_OCC = {STROMA: 0.45, MUSCLE: 0.3, FAT: 0.35, TUMOUR: 0.2, LYMPHOID: 0.12}
MAX_OBJECT_UM = 40.0  # largest gland / vessel radius incl. wobble


@dataclass
class SlideContext:
    """What every window needs: parameters, plan and shared textures."""

    params: SlideParams
    layout: Layout
    nest: Texture  # tumour nests vs desmoplastic stroma
    fibre: Texture  # stroma fibres
    grain: Texture  # fine chromatin / speckle
    coarse: Texture  # coarse chromatin, granularity
    chrom: Texture  # chromatin: fine and coarse grain mixed, one look-up per pixel

    @property
    def seed(self) -> int:
        return self.params.seed

    def nest_at(self, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        """True where tumour regions hold tumour cells rather than stroma."""
        return self.nest.sample(yy, xx) >= self.params.nest_threshold


def _occ_lut(occ: dict[int, float]) -> np.ndarray:
    lut = np.zeros(8)
    for t, v in occ.items():
        lut[t] = v
    return lut


def _lattice(seed, pop, spacing, jitter, y0, x0, y1, x1):
    """Jittered hexagonal lattice sites whose position lies in ``[y0, y1) x [x0, x1)``."""
    row = spacing * np.sqrt(3) / 2
    pad = jitter * spacing + spacing
    i = np.arange(int(np.floor((y0 - pad) / row)), int(np.ceil((y1 + pad) / row)) + 1)
    j = np.arange(int(np.floor((x0 - pad) / spacing)), int(np.ceil((x1 + pad) / spacing)) + 1)
    ii, jj = np.meshgrid(i, j, indexing="ij")
    ii, jj = ii.ravel(), jj.ravel()
    y = ii * row + (hash_uniform(seed, pop * 64 + 1, ii, jj) - 0.5) * jitter * spacing
    x = (jj + 0.5 * (ii & 1)) * spacing + (hash_uniform(seed, pop * 64 + 2, ii, jj) - 0.5) * (
        jitter * spacing
    )
    keep = (y >= y0) & (y < y1) & (x >= x0) & (x < x1)
    return ii[keep], jj[keep], y[keep], x[keep]


def _uid(pop, i, j, k=0):
    i = np.asarray(i, np.int64) & 0xFFFFF
    j = np.asarray(j, np.int64) & 0xFFFFF
    k = np.asarray(k, np.int64) & 0xFFFF
    return (np.int64(pop) << 56) | (i << 36) | (j << 16) | k


def _objects(ctx: SlideContext, kind: int, y0, x0, y1, x1) -> dict[str, np.ndarray]:
    """Glands or vessels centred in the window: centre, radii, wobble."""
    p = ctx.params
    seed = ctx.seed
    spacing = p.um(GLAND_SPACING_UM if kind == P_GLAND else VESSEL_SPACING_UM)
    jit = 0.1 if kind == P_GLAND else 0.3
    i, j, y, x = _lattice(seed, kind, spacing, jit, y0, x0, y1, x1)
    t = ctx.layout.type_at(y, x)
    occ = _occ_lut(GLAND_OCC if kind == P_GLAND else VESSEL_OCC)[t]
    if kind == P_VESSEL:  # vessels in tumour only between nests
        occ = np.where((t == TUMOUR) & ctx.nest_at(y, x), 0.0, occ)
    keep = hash_uniform(seed, kind * 64 + 3, i, j) < occ
    i, j, y, x = i[keep], j[keep], y[keep], x[keep]
    u = hash_uniform(seed, kind * 64 + 4, i, j)
    if kind == P_GLAND:
        ro = p.um(18 + 11 * u)
        rl = ro * (0.22 + 0.3 * hash_uniform(seed, kind * 64 + 5, i, j))
    else:
        ro = p.um(5 + 11 * u**1.5)
        rl = ro
    return {
        "i": i,
        "j": j,
        "y": y,
        "x": x,
        "ro": ro,
        "rl": rl,
        "g2": (0.25 if kind == P_GLAND else 0.12) * hash_uniform(seed, kind * 64 + 6, i, j),
        "psi": np.pi * hash_uniform(seed, kind * 64 + 7, i, j),
        "g3": (0.08 if kind == P_GLAND else 0.0) * hash_uniform(seed, kind * 64 + 8, i, j),
        "psi3": 2 * np.pi * hash_uniform(seed, kind * 64 + 9, i, j),
    }


def wobble(obj: dict, phi: np.ndarray) -> np.ndarray:
    """Radius multiplier of a gland/vessel outline at polar angle ``phi`` (elongation + lobes)."""
    return (
        1.0 + obj["g2"] * np.cos(2 * (phi - obj["psi"])) + obj["g3"] * np.cos(3 * phi - obj["psi3"])
    )


def _rim_cells(ctx: SlideContext, obj: dict, pop: int) -> dict[str, np.ndarray]:
    """Epithelium around gland lumens or endothelium around vessel lumens."""
    p, seed = ctx.params, ctx.seed
    if pop == P_GLAND_CELL:
        rc = obj["rl"] + 0.62 * (obj["ro"] - obj["rl"])  # basal nuclei
        step = p.um(7.0)
    else:
        rc = obj["ro"] + p.um(1.0)
        step = p.um(11.0)
    n = np.maximum(3, np.floor(2 * np.pi * rc / step)).astype(np.int64)
    g = np.repeat(np.arange(len(n)), n)
    k = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    phase = 2 * np.pi * hash_uniform(seed, pop * 64 + 8, obj["i"], obj["j"])
    phi = 2 * np.pi * k / n[g] + phase[g]
    w = wobble({k: obj[k][g] for k in ("g2", "psi", "g3", "psi3")}, phi)
    r = rc[g] * w
    cls = C_EPITHELIAL if pop == P_GLAND_CELL else C_ENDOTHELIAL
    theta = phi if pop == P_GLAND_CELL else phi + np.pi / 2
    return {
        "pop": np.full(len(g), pop),
        "i": obj["i"][g],
        "j": obj["j"][g],
        "k": k,
        "y": obj["y"][g] + r * np.sin(phi),
        "x": obj["x"][g] + r * np.cos(phi),
        "cls": np.full(len(g), cls),
        "theta": theta,
    }


def _rbcs(ctx: SlideContext, obj: dict) -> dict[str, np.ndarray]:
    """Red blood cells filling vessel lumens (drawn, never in the ground truth)."""
    p, seed = ctx.params, ctx.seed
    n = np.floor(0.45 * obj["ro"] ** 2 / p.um(3.6) ** 2).astype(np.int64)
    g = np.repeat(np.arange(len(n)), n)
    k = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    r = (
        0.8
        * obj["ro"][g]
        * np.sqrt(hash_uniform(seed, P_RBC * 64 + 1, obj["i"][g], obj["j"][g], k))
    )
    phi = 2 * np.pi * hash_uniform(seed, P_RBC * 64 + 2, obj["i"][g], obj["j"][g], k)
    return {
        "pop": np.full(len(g), P_RBC),
        "i": obj["i"][g],
        "j": obj["j"][g],
        "k": k,
        "y": obj["y"][g] + r * np.sin(phi),
        "x": obj["x"][g] + r * np.cos(phi),
        "cls": np.full(len(g), RBC),
        "theta": np.zeros(len(g)),
    }


def _inside(y: np.ndarray, x: np.ndarray, objs: list[dict], pad: float) -> np.ndarray:
    out = np.zeros(len(y), bool)
    for o in objs:
        if len(o["y"]) == 0 or len(y) == 0:
            continue
        d2 = (y[:, None] - o["y"][None]) ** 2 + (x[:, None] - o["x"][None]) ** 2
        out |= (d2 < ((o["ro"] * (1 + o["g2"] + o["g3"]))[None] + pad) ** 2).any(axis=1)
    return out


def _immune_classes(u: np.ndarray) -> np.ndarray:
    """Class ids for inflammatory sites from uniforms ``u``: the same mix everywhere."""
    names = list(IMMUNE_MIX)
    cum = np.cumsum([IMMUNE_MIX[n] for n in names])
    idx = np.searchsorted(cum / cum[-1], u, side="right")
    return np.asarray([CELL_CLASSES.index(n) for n in names])[np.minimum(idx, len(names) - 1)]


def _lattice_cells(ctx: SlideContext, pop: Population, y0, x0, y1, x1, objs) -> dict:
    p, seed, lay = ctx.params, ctx.seed, ctx.layout
    i, j, y, x = _lattice(seed, pop.pop, p.um(pop.spacing_um), pop.jitter, y0, x0, y1, x1)
    t = lay.type_at(y, x)
    occ = _occ_lut(pop.occupancy)[t]
    if pop.pop == P_TUMOUR:
        occ = occ * ctx.nest_at(y, x)
    elif pop.pop in (P_FIBRO, P_IMMUNE):
        occ = np.where((t == TUMOUR) & ctx.nest_at(y, x), occ * 0.25, occ)
    if pop.pop == P_IMMUNE:
        occ = occ * lay.field_at(lay.inflammation, y, x)
    keep = hash_uniform(seed, pop.pop * 64 + 3, i, j) < occ
    keep &= ~_inside(y, x, objs, p.um(2.5))
    i, j, y, x = i[keep], j[keep], y[keep], x[keep]
    u = hash_uniform(seed, pop.pop * 64 + 4, i, j)
    cls = {
        P_TUMOUR: np.full(len(i), C_TUMOUR),
        P_FIBRO: np.full(len(i), C_FIBROBLAST),
        P_MUSCLE: np.full(len(i), C_SMOOTH_MUSCLE),
        P_DEBRIS: np.full(len(i), DEBRIS),
    }.get(pop.pop)
    if cls is None:
        cls = _immune_classes(u)
    ang = lay.field_at(lay.angle, y, x).astype(np.float64)
    nrm = hash_normal(seed, pop.pop * 64 + 5, i, j)
    if pop.pop == P_FIBRO:
        theta = ang + 0.6 * nrm
    elif pop.pop == P_MUSCLE:
        theta = ang + 0.12 * nrm
    else:
        theta = np.pi * hash_uniform(seed, pop.pop * 64 + 6, i, j)
    return {"pop": np.full(len(i), pop.pop), "i": i, "j": j, "k": np.zeros(len(i), np.int64),
            "y": y, "x": x, "cls": cls, "theta": theta}  # fmt: skip


def _morphology(ctx: SlideContext, c: dict) -> None:
    """Add shape, stain and DAB columns to the cell table ``c`` in place."""
    p, seed = ctx.params, ctx.seed
    g = np.asarray([GROUP_OF_CLASS[int(v)] for v in range(-2, 9)])[c["cls"] + 2]
    T = MORPH[g]
    key = (c["pop"] * 64 + 16, c["i"], c["j"], c["k"])

    def u(n):
        return hash_uniform(seed, key[0] + n, *key[1:])

    def z(n):
        return np.clip(hash_normal(seed, key[0] + n, *key[1:]), -2.5, 2.5)

    r = p.um(np.maximum(0.4, T[:, M["r"]] + T[:, M["r_sd"]] * z(0)))
    asp = np.maximum(1.0, T[:, M["asp"]] + T[:, M["asp_sd"]] * z(1))
    c["a"] = r * np.sqrt(asp)
    c["b"] = r / np.sqrt(asp)
    c["amp2"] = T[:, M["amp2"]] + T[:, M["irr"]] * u(2)
    c["ph2"] = 2 * np.pi * u(3)
    c["amp3"] = T[:, M["amp3"]] + 0.6 * T[:, M["irr"]] * u(4)
    c["ph3"] = 2 * np.pi * u(5)
    c["contrast"] = T[:, M["contrast"]]
    c["hdens"] = T[:, M["hdens"]] * (1 + 0.12 * z(6))
    c["nucleolus"] = T[:, M["nucleolus"]] * (u(7) > 0.25)
    c["cf"] = T[:, M["cf"]]
    c["cf_asp"] = T[:, M["cf_asp"]]
    c["edens"] = T[:, M["edens"]]
    c["ecc"] = T[:, M["ecc"]]
    c["ves"] = T[:, M["ves"]]
    c["dab"] = np.zeros(len(g))
    if p.kind == "ihc" and p.positive_fraction > 0:
        target = np.isin(c["cls"], target_classes(p))
        pos = target & (u(8) < p.positive_fraction)
        c["dab"] = np.where(pos, p.dab_intensity * np.exp(0.15 * z(9)), 0.0)


def target_classes(p: SlideParams) -> tuple[int, ...]:
    """Cell classes an IHC slide's antibody is scored on."""
    return (C_LYMPHOCYTE,) if p.organ == "lymph node" else (C_TUMOUR, C_EPITHELIAL)


def cells_in_window(ctx: SlideContext, y0: float, x0: float, y1: float, x1: float) -> dict:
    """All cells (and red cells / debris) whose centre lies in ``[y0, y1) x [x0, x1)``.

    Parameters
    ----------
    ctx
        Slide context.
    y0, x0, y1, x1
        Window in level-0 pixels; windows that tile the slide partition its
        cells exactly.

    Returns
    -------
    dict
        Column name -> 1-D array: ``y``, ``x`` (level-0 px), ``cls`` (class id,
        negative for red cells and debris), ``uid``, shape columns ``a``, ``b``
        (nucleus semi-axes, px), ``theta`` and the stain columns.
    """
    p = ctx.params
    m = p.um(MAX_OBJECT_UM) + 2
    glands = _objects(ctx, P_GLAND, y0 - m, x0 - m, y1 + m, x1 + m)
    vessels = _objects(ctx, P_VESSEL, y0 - m, x0 - m, y1 + m, x1 + m)
    parts = [_rim_cells(ctx, glands, P_GLAND_CELL), _rim_cells(ctx, vessels, P_ENDO),
             _rbcs(ctx, vessels)]  # fmt: skip
    pops = (Population(P_TUMOUR, p.tumour_spacing_um, 0.35, {TUMOUR: 0.97}), *POPULATIONS)
    for pop in pops:
        parts.append(_lattice_cells(ctx, pop, y0, x0, y1, x1, [glands, vessels]))
    c = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
    inwin = (c["y"] >= y0) & (c["y"] < y1) & (c["x"] >= x0) & (c["x"] < x1)
    c = {k: v[inwin] for k, v in c.items()}
    c["cls"] = c["cls"].astype(np.int64)
    c["uid"] = _uid(c["pop"], c["i"], c["j"], c["k"])
    _morphology(ctx, c)
    c["glands"], c["vessels"] = glands, vessels
    return c


def nucleus_polygon(c: dict, n_vertices: int = 16) -> np.ndarray:
    """Nucleus outlines ``(n_cells, n_vertices, 2)`` as ``(x, y)`` level-0 px."""
    phi = np.linspace(0, 2 * np.pi, n_vertices, endpoint=False)[None, :]
    rb = boundary(c, phi)
    u = c["a"][:, None] * rb * np.cos(phi)
    v = c["b"][:, None] * rb * np.sin(phi)
    ct, st = np.cos(c["theta"])[:, None], np.sin(c["theta"])[:, None]
    dy = u * st - v * ct
    dx = u * ct + v * st
    return np.stack([c["x"][:, None] + dx, c["y"][:, None] + dy], axis=-1)


def boundary(c: dict, phi: np.ndarray) -> np.ndarray:
    """Nucleus boundary radius (in units of the ellipse) at elliptic angle ``phi``."""
    s = slice(None), None
    return (
        1.0
        + c["amp2"][s] * np.cos(2 * phi + c["ph2"][s])
        + c["amp3"][s] * np.cos(3 * phi + c["ph3"][s])
    )


def make_context(params: SlideParams) -> SlideContext:
    """Plan the slide and build its shared textures (deterministic for the seed)."""
    from histoscope.synthetic._layout import build_layout

    rng = np.random.default_rng([params.seed, 0x7E7])
    grain, coarse = Texture(rng, 256, 0.8), Texture(rng, 256, 2.0)
    i = np.arange(256)
    chrom = 0.5 * grain.data + 0.5 * coarse.data[(2 * i[:, None]) & 255, (2 * i[None, :]) & 255]
    return SlideContext(
        params=params,
        layout=build_layout(params),
        nest=Texture(rng, 1024, params.um(22.0)),
        fibre=Texture(rng, 512, 1.5, aniso=12.0),
        grain=grain,
        coarse=coarse,
        chrom=Texture.from_array(chrom),
    )
