"""Counter-based random numbers and periodic noise textures.

Rendering is tile-local: any pixel or cell can be computed from its absolute
coordinates and the slide seed alone, so tiles can be drawn in any order, in
parallel, and always agree at their borders. Two tools make that possible:

- :func:`hash_uniform` maps integer keys to uniforms in ``[0, 1)`` with a
  SplitMix64 finaliser, vectorised over numpy arrays;
- :class:`Texture` is a periodic noise image (filtered in Fourier space, so
  it wraps seamlessly) sampled at ``(y mod n, x mod n)``.
"""

from __future__ import annotations

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)
_K = (
    np.uint64(0xD6E8FEB86659FD93),
    np.uint64(0xA0761D6478BD642F),
    np.uint64(0xE7037ED1A0B428DB),
    np.uint64(0x8EBC6AF09C88C6E3),
)


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def hash_uniform(seed: int, *keys: np.ndarray | int) -> np.ndarray:
    """Uniform floats in ``[0, 1)`` determined by ``seed`` and integer ``keys``.

    Parameters
    ----------
    seed
        Slide seed.
    *keys
        Up to four integer arrays (or scalars), broadcast together; the same
        keys always give the same number.

    Returns
    -------
    numpy.ndarray
        float64 array of the broadcast shape.
    """
    if len(keys) > len(_K):
        raise ValueError(f"at most {len(_K)} keys, got {len(keys)}")
    with np.errstate(over="ignore"):
        z = np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * _GOLD
        for k, mult in zip(keys, _K[: len(keys)], strict=True):
            z = _mix(z ^ (np.asarray(k).astype(np.int64).astype(np.uint64) * mult))
        z = _mix(z + _GOLD)
    return (np.asarray(z) >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


def hash_normal(seed: int, *keys: np.ndarray | int) -> np.ndarray:
    """Standard normal floats from two hashed uniforms (Box-Muller)."""
    u1 = hash_uniform(seed, *keys)
    u2 = hash_uniform(seed ^ 0x5DEECE66D, *keys)
    return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2 * np.pi * u2)


class Texture:
    """Periodic band-limited noise, sampled at integer pixel coordinates.

    Parameters
    ----------
    rng
        Generator that fixes the texture.
    n
        Period in pixels (power of two is fastest).
    scale
        Correlation length in pixels along y (and x unless ``aniso``).
    aniso
        Ratio of the correlation length along x to that along y; ``> 1`` gives
        streaks along x (fibres), rotated by ``angle`` radians.
    angle
        Orientation of the streaks.
    """

    def __init__(
        self,
        rng: np.random.Generator,
        n: int,
        scale: float,
        aniso: float = 1.0,
        angle: float = 0.0,
    ) -> None:
        white = rng.standard_normal((n, n))
        fy = np.fft.fftfreq(n)[:, None]
        fx = np.fft.fftfreq(n)[None, :]
        c, s = np.cos(angle), np.sin(angle)
        fu = fy * c - fx * s
        fv = fy * s + fx * c
        sig = 1.0 / (2 * np.pi * scale)
        filt = np.exp(-0.5 * ((fu / sig) ** 2 + (fv * aniso / sig) ** 2))
        img = np.real(np.fft.ifft2(np.fft.fft2(white) * filt))
        img = (img - img.mean()) / (img.std() + 1e-12)
        # map to [0, 1] through the normal CDF approximation (logistic)
        self.data = (1.0 / (1.0 + np.exp(-1.7 * img))).astype(np.float32)
        self.n = n

    @classmethod
    def from_array(cls, data: np.ndarray) -> Texture:
        """A texture holding ``data`` (square, power-of-two side)."""
        n = data.shape[0]
        if data.shape != (n, n) or n & (n - 1):
            raise ValueError(f"data must be square with a power-of-two side, got {data.shape}")
        tex = cls.__new__(cls)
        tex.data, tex.n = data.astype(np.float32), n
        return tex

    def sample(self, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        """Values at integer coordinates ``yy``, ``xx`` (any broadcastable shapes)."""
        m = self.n - 1
        yy, xx = np.asarray(yy), np.asarray(xx)
        if yy.dtype.kind != "i":
            yy = yy.astype(np.int64)  # floor for the non-negative coordinates used here
        if xx.dtype.kind != "i":
            xx = xx.astype(np.int64)
        return self.data[yy & m, xx & m]
