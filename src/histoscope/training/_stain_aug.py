"""Stain changes for training and testing: HED jitter and an out-of-range stain shift.

*HED jitter* (Tellez et al. 2018, the augmentation the seed's lesson asks
for): RGB -> optical density -> haematoxylin/eosin/DAB concentrations with
Ruifrok & Johnston's matrix, each concentration scaled by ``U(1-sigma, 1+sigma)``
and offset by ``U(-bias, bias)``, then back to RGB.

*Stain shift* makes a held-out set whose stain lies outside what the generator
draws: each tile is unmixed with its slide's own stain vectors and remixed
with vectors turned by a fixed angle (the generator turns them by at most 6°)
and with haematoxylin and eosin amounts scaled outside the generator's range.
It changes the stain *hues*, which HED jitter (which rescales amounts in a fixed
basis) does not, so a gain from jitter on this set is not circular.
"""

from __future__ import annotations

import numpy as np
import torch

#: Ruifrok & Johnston's H, E, DAB optical-density vectors (as in scikit-image).
RGB_FROM_HED = np.array(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64
)
RGB_FROM_HED /= np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)


def hed_jitter(x: torch.Tensor, gen: torch.Generator, sigma: float, bias: float) -> torch.Tensor:
    """Jitter the stains of a batch.

    Parameters
    ----------
    x
        ``(B, 3, H, W)`` float RGB in [0, 255].
    gen
        Generator all randomness is drawn from.
    sigma
        Concentration scale range (``U(1-sigma, 1+sigma)`` per image and stain).
    bias
        Concentration offset range in OD units (``U(-bias, bias)``).

    Returns
    -------
    torch.Tensor
        Same shape, float RGB in [0, 255].
    """
    if sigma <= 0 and bias <= 0:
        return x
    m = torch.as_tensor(RGB_FROM_HED, dtype=x.dtype)
    minv = torch.linalg.inv(m)
    od = -torch.log10(x.clamp(min=1.0) / 255.0)
    conc = torch.einsum("bchw,cd->bdhw", od, minv)
    b = x.shape[0]
    alpha = 1 + (torch.rand((b, 3, 1, 1), generator=gen, dtype=x.dtype) * 2 - 1) * sigma
    beta = (torch.rand((b, 3, 1, 1), generator=gen, dtype=x.dtype) * 2 - 1) * bias
    od = torch.einsum("bdhw,dc->bchw", conc * alpha + beta, m)
    return (255.0 * torch.pow(10.0, -od)).clamp(0.0, 255.0)


def _turn(v: np.ndarray, rng: np.random.Generator, degrees: float) -> np.ndarray:
    """Unit vector ``v`` turned by exactly ``degrees`` in a random direction, kept positive."""
    d = rng.standard_normal(3)
    d -= d.dot(v) * v
    d /= np.linalg.norm(d)
    a = np.deg2rad(degrees)
    out = np.abs(np.cos(a) * v + np.sin(a) * d)
    return out / np.linalg.norm(out)


def stain_shift(
    images: np.ndarray,
    stains: np.ndarray | None,
    rng: np.random.Generator,
    degrees: float = 12.0,
    amount: tuple[float, float] = (1.45, 1.7),
) -> np.ndarray:
    """Restain tiles of one slide with turned stain vectors and changed amounts.

    Parameters
    ----------
    images
        ``(N, T, T, 3)`` uint8 tiles of one slide.
    stains
        ``(3, 3)`` OD vectors the slide was rendered with (H, E, third);
        ``None`` uses :data:`RGB_FROM_HED`.
    rng
        Draws the turn directions and whether each amount goes up or down.
    degrees
        Angle each of H and E is turned by.
    amount
        Haematoxylin and eosin are multiplied by ``f`` or ``1/f`` with
        ``f ~ U(*amount)`` (the generator draws strengths in 0.6-1.4).

    Returns
    -------
    numpy.ndarray
        Restained uint8 tiles.
    """
    src = RGB_FROM_HED if stains is None else np.asarray(stains, np.float64)
    src = src / np.linalg.norm(src, axis=1, keepdims=True)
    dst = src.copy()
    dst[0] = _turn(src[0], rng, degrees)
    dst[1] = _turn(src[1], rng, degrees)
    scale = np.ones(3)
    for i in range(2):
        f = rng.uniform(*amount)
        scale[i] = f if rng.random() < 0.5 else 1 / f
    od = -np.log10(np.maximum(images.astype(np.float64), 1.0) / 255.0)
    conc = od @ np.linalg.inv(src)
    out = 255.0 * np.power(10.0, -((conc * scale) @ dst))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
