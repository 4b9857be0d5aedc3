"""Per-slide parameters: stain, scanner, organ, tumour extent, IHC design.

Everything random about a slide *as a whole* is drawn here from its seed, so
two slides differ in stain and scanner as real slides from two labs do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from histoscope.synthetic._constants import (
    ANTIBODIES,
    COMPARTMENTS,
    INTENSITY_EDGES,
    ORGANS,
    REFERENCE_STAINS,
)

KINDS = ("he", "ihc")
TUMOUR_EXTENTS = ("none", "focus", "moderate", "extensive")
#: Range of tumour fraction of the tissue area per extent class.
EXTENT_RANGES = {"focus": (0.01, 0.045), "moderate": (0.10, 0.35), "extensive": (0.40, 0.75)}


def _rotate_towards(v: np.ndarray, rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """``v`` turned by up to ``max_deg`` degrees in a random direction, kept positive."""
    d = rng.standard_normal(3)
    d -= d.dot(v) * v
    d /= np.linalg.norm(d)
    ang = np.deg2rad(rng.uniform(0, max_deg))
    out = np.abs(np.cos(ang) * v + np.sin(ang) * d)
    return out / np.linalg.norm(out)


@dataclass(frozen=True)
class SlideParams:
    """Everything that is random about one slide as a whole.

    Attributes are plain Python values so the object serialises to JSON with
    :meth:`to_dict`.
    """

    kind: str
    seed: int
    shape: tuple[int, int]
    mpp: float
    organ: str
    stains: tuple[tuple[float, float, float], ...]
    h_strength: float
    e_strength: float
    background: tuple[float, float, float]
    blur_sigma: float
    jpeg_quality: int
    noise: float
    tumour_extent: str
    tumour_fraction_target: float
    nest_threshold: float
    inflammation: float
    tumour_spacing_um: float
    fat_cell_um: float
    compartment: str = "none"
    antibody: str = ""
    dab_intensity: float = 0.0
    positive_fraction: float = 0.0
    near_boundary: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def malignant(self) -> bool:
        """True when the slide contains tumour."""
        return self.tumour_extent != "none"

    def um(self, micrometres: float) -> float:
        """Convert µm to level-0 pixels."""
        return micrometres / self.mpp

    def to_dict(self) -> dict:
        """JSON-ready dictionary of the parameters."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["stains"] = [list(s) for s in self.stains]
        d["shape"] = list(self.shape)
        d["background"] = list(self.background)
        return d


def _ihc_design(rng: np.random.Generator) -> dict:
    """Compartment, antibody, DAB intensity and positive fraction for an IHC slide."""
    compartment = str(rng.choice(COMPARTMENTS))
    antibody = str(rng.choice(ANTIBODIES[compartment]))
    near = bool(rng.random() < 0.3)
    if rng.random() < 0.2:  # negative stain
        return {
            "compartment": compartment,
            "antibody": antibody,
            "dab_intensity": 0.0,
            "positive_fraction": 0.0,
            "near_boundary": False,
        }
    q = int(rng.integers(1, 4))  # <25%, 25-75%, >75%
    if near:
        if q == 2:
            edge = float(rng.choice([0.25, 0.75]))
            side = 1 if edge == 0.25 else -1
        else:
            edge, side = (0.25, -1) if q == 1 else (0.75, 1)
        frac = float(edge + side * rng.uniform(0.01, 0.04))
    else:
        lo, hi = {1: (0.03, 0.2), 2: (0.3, 0.7), 3: (0.8, 0.97)}[q]
        frac = float(rng.uniform(lo, hi))
    i = int(rng.integers(1, 4))  # weak, moderate, strong
    lo, hi = {1: (0.10, INTENSITY_EDGES[0]), 2: INTENSITY_EDGES, 3: (INTENSITY_EDGES[1], 0.85)}[i]
    if near and rng.random() < 0.5 and i in (1, 3):
        edge = INTENSITY_EDGES[0] if i == 1 else INTENSITY_EDGES[1]
        side = -1 if i == 1 else 1
        inten = float(edge + side * rng.uniform(0.01, 0.03))
    elif near and i == 2:
        edge = float(rng.choice(INTENSITY_EDGES))
        side = 1 if edge == INTENSITY_EDGES[0] else -1
        inten = float(edge + side * rng.uniform(0.01, 0.03))
    else:
        inten = float(rng.uniform(lo, hi))
    return {
        "compartment": compartment,
        "antibody": antibody,
        "dab_intensity": inten,
        "positive_fraction": frac,
        "near_boundary": near,
    }


def sample_params(kind: str, seed: int, shape: tuple[int, int], mpp: float) -> SlideParams:
    """Draw the slide-level parameters for ``seed``.

    Parameters
    ----------
    kind
        ``"he"`` or ``"ihc"``.
    seed
        Non-negative integer.
    shape
        Level-0 ``(height, width)`` in pixels.
    mpp
        µm per level-0 pixel.

    Returns
    -------
    SlideParams
    """
    rng = np.random.default_rng([int(seed), 0x5EED])
    organ = str(rng.choice(list(ORGANS)))
    ref = REFERENCE_STAINS
    stains = tuple(tuple(float(v) for v in _rotate_towards(ref[i], rng, 6.0)) for i in range(3))
    tint = rng.uniform(-6, 6, 3)
    base = rng.uniform(236, 250)
    background = tuple(float(np.clip(base + t, 220, 254)) for t in tint)
    malignant = rng.random() < (0.65 if kind == "he" else 0.5)
    if malignant:
        extent = str(rng.choice(["focus", "moderate", "extensive"], p=[0.3, 0.4, 0.3]))
        target = float(rng.uniform(*EXTENT_RANGES[extent]))
    else:
        extent, target = "none", 0.0
    ihc = _ihc_design(rng) if kind == "ihc" else {}
    return SlideParams(
        kind=kind,
        seed=int(seed),
        shape=(int(shape[0]), int(shape[1])),
        mpp=float(mpp),
        organ=organ,
        stains=stains,
        h_strength=float(rng.uniform(0.65, 1.35)),
        e_strength=float(rng.uniform(0.6, 1.4)) if kind == "he" else 0.0,
        background=background,
        blur_sigma=float(rng.uniform(0.2, 1.1)),
        jpeg_quality=int(rng.integers(70, 96)),
        noise=float(rng.uniform(1.0, 4.0)),
        tumour_extent=extent,
        tumour_fraction_target=target,
        nest_threshold=float(rng.choice([0.0, 0.35, 0.5])),
        inflammation=float(rng.uniform(0.05, 1.0)),
        tumour_spacing_um=float(rng.uniform(10.5, 13.5)),
        fat_cell_um=float(rng.uniform(40, 75)),
        **ihc,
    )
