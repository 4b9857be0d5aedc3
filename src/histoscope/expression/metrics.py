"""Held-out metrics of predicted 2 µm expression (SYSTEMS.md section 3).

- PCC per gene over bins with any count (any gene), at 2 µm and with bins
  summed to 8 and 16 µm (4 x 4 and 8 x 8 blocks of 2 µm bins);
- SSIM per (image, gene) after min-max scaling of prediction and truth
  (``skimage.metrics.structural_similarity``, 7 x 7 window, ``data_range=1``);
  an image is one patch fully covered by bins whose truth is not constant;
- MSE over bins with data, at 2 µm;
- the shuffled-label control: the same metrics with each patch's truth taken
  from another patch of the set (a fixed random cycle over all patches, so
  no patch keeps its own and slides are mixed), which keeps the truth's
  spatial statistics and breaks its correspondence with the image. PCC should collapse to about 0; SSIM, as the seed's authors
  found, barely drops, which is why PCC is reported first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["block_sum", "evaluate_patches", "pcc_per_gene", "ssim_per_image"]

AGGREGATE_BINS = {"2um": 1, "8um": 4, "16um": 8}


def block_sum(x: np.ndarray, k: int) -> np.ndarray:
    """``(N, G, P, P)`` summed over ``k x k`` blocks -> ``(N, G, P / k, P / k)``."""
    if k == 1:
        return x
    n, g, h, w = x.shape
    if h % k or w % k:
        raise ValueError(f"patches of {h} x {w} bins do not split into {k} x {k} blocks")
    return x.reshape(n, g, h // k, k, w // k, k).sum(axis=(3, 5))


def pcc_per_gene(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Pearson correlation per column of ``(n, G)`` arrays (NaN where either is constant)."""
    p = pred.astype(np.float64) - pred.mean(0)
    t = truth.astype(np.float64) - truth.mean(0)
    den = np.sqrt((p**2).sum(0) * (t**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (p * t).sum(0) / np.where(den > 0, den, 1), np.nan)


def _flat_any(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray, k: int):
    """Bins (aggregated by ``k``) with data and any count: ``(n, G)`` prediction and truth."""
    p = block_sum(pred.astype(np.float32), k)
    t = block_sum(truth.astype(np.float32), k)
    m = block_sum(mask[:, None].astype(np.float32), k)[:, 0] > 0
    keep = m & (t.sum(1) > 0)  # (N, h, w)
    return p.transpose(0, 2, 3, 1)[keep], t.transpose(0, 2, 3, 1)[keep]


def ssim_per_image(
    pred: np.ndarray, truth: np.ndarray, mask: np.ndarray, images: np.ndarray | None = None
) -> np.ndarray:
    """SSIM per (patch, gene) after min-max scaling: ``(N, G)``, NaN where undefined.

    Undefined: a patch not fully covered by bins, a constant truth or
    prediction (min-max scaling needs a range), or a patch not in ``images``
    (indices of the patches to score; default all).
    """
    from skimage.metrics import structural_similarity

    n, g = pred.shape[:2]
    out = np.full((n, g), np.nan)
    full = mask.all(axis=(1, 2))
    if images is not None:
        full &= np.isin(np.arange(n), images)
    for i in np.flatnonzero(full):
        for j in range(g):
            a, b = pred[i, j].astype(np.float64), truth[i, j].astype(np.float64)
            ra, rb = np.ptp(a), np.ptp(b)
            if ra > 0 and rb > 0:
                out[i, j] = structural_similarity((a - a.min()) / ra, (b - b.min()) / rb,
                                                  win_size=7, data_range=1.0)  # fmt: skip
    return out


def _shuffle(n: int, seed: int) -> np.ndarray:
    """A permutation of ``n`` patch indices keeping none in place (one random cycle).

    It runs over all patches, not within each slide: pooled over slides, a
    within-slide shuffle keeps the slides' different expression levels and
    so a PCC above zero that has nothing to do with the image.
    """
    rng = np.random.default_rng([seed, 0x5AFF])
    order = rng.permutation(n)
    perm = np.arange(n)
    if n > 1:
        perm[order] = order[np.roll(np.arange(n), 1)]
    return perm


def evaluate_patches(
    pred: np.ndarray,
    truth: np.ndarray,
    mask: np.ndarray,
    slide: np.ndarray,
    genes: Sequence[str],
    *,
    seed: int = 0,
    ssim: bool = True,
    ssim_images: int = 400,
) -> dict[str, Any]:
    """All metrics of predictions against truth, and the shuffled-label control.

    Parameters
    ----------
    pred
        ``(N, G, P, P)`` expected counts.
    truth
        ``(N, G, P, P)`` counts.
    mask
        ``(N, P, P)`` bins with data.
    slide
        ``(N,)`` slide of each patch (for ``pcc_8um_per_slide``; the
        control shuffles over all patches).
    genes
        Gene names.
    seed
        Seeds the control's permutation.
    ssim
        Also compute SSIM (the slowest part).
    ssim_images
        SSIM on at most this many fully covered patches (a fixed random subset).

    Returns
    -------
    dict
        ``{"model": m, "shuffled": m, "genes": [...], "n_patches": N}`` where
        ``m`` has ``pcc_<scale>`` (mean over genes), ``pcc_<scale>_per_gene``,
        ``n_bins_<scale>``, ``mse_2um``, ``ssim`` and ``ssim_per_gene``; the
        model's also ``pcc_8um_per_slide`` (in order of the slide ids).
    """
    out: dict[str, Any] = {"genes": list(genes), "n_patches": int(len(pred))}
    perm = _shuffle(len(pred), seed)
    full = np.flatnonzero(mask.all(axis=(1, 2)) & mask[perm].all(axis=(1, 2)))
    rng = np.random.default_rng([seed, 0x551])
    chosen = np.sort(rng.choice(full, min(len(full), ssim_images), replace=False))
    for name, t, m in (("model", truth, mask), ("shuffled", truth[perm], mask[perm] & mask)):
        res: dict[str, Any] = {}
        for scale, k in AGGREGATE_BINS.items():
            p, tt = _flat_any(pred, t, m, k)
            r = pcc_per_gene(p, tt)
            res[f"pcc_{scale}"] = float(np.nanmean(r)) if np.isfinite(r).any() else None
            res[f"pcc_{scale}_per_gene"] = [None if not np.isfinite(v) else float(v) for v in r]
            res[f"n_bins_{scale}"] = int(len(p))
        mm = m[:, None].repeat(pred.shape[1], 1)
        res["mse_2um"] = (
            float(((pred - t.astype(np.float32))[mm] ** 2).mean()) if mm.any() else None
        )
        if ssim:
            s = ssim_per_image(pred, t, m, chosen)
            with np.errstate(all="ignore"):
                per = np.nanmean(np.where(np.isfinite(s), s, np.nan), 0) if s.size else s
            res["ssim"] = float(np.nanmean(s)) if np.isfinite(s).any() else None
            res["ssim_per_gene"] = [None if not np.isfinite(v) else float(v) for v in per]
            res["n_ssim_images"] = int(np.isfinite(s).sum())
        out[name] = res
    per = []
    for sl in np.unique(slide):
        p, tt = _flat_any(pred[slide == sl], truth[slide == sl], mask[slide == sl], 4)
        r = pcc_per_gene(p, tt)
        per.append(float(np.nanmean(r)) if np.isfinite(r).any() else None)
    out["model"]["pcc_8um_per_slide"] = per
    return out
