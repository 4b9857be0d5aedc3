"""Training patches: H&E views around a patch of bins and the counts of those bins.

A slide's bins (read by :func:`~histoscope.expression.spaceranger.read_binned`)
sit on an axis-aligned grid of ``bin_px`` level-0 pixels; patches are
``patch_bins x patch_bins`` blocks of that grid. Each patch gets the model's
views (:func:`histoscope.models.expression.views`), read by the same
:class:`~histoscope.samplers.PointSampler` the whole-slide task uses, so
training and inference see identical pixels.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histoscope.expression.spaceranger import BinnedCounts, ExpressionDataError, read_binned

__all__ = ["PatchSet", "concat", "load_slide_patches", "patch_grid", "sampler_for", "slide_pairs"]


@dataclass(frozen=True)
class PatchSet:
    """Patches of one or more slides.

    Attributes
    ----------
    views
        One ``(N, S, S, 3)`` uint8 array per model view.
    counts
        ``(N, G, P, P)`` uint8 counts per bin (clipped at 255).
    mask
        ``(N, P, P)`` bool: bins with data (in the matrix).
    slide
        ``(N,)`` index into ``names``.
    origin
        ``(N, 2)`` patch ``(row, col)`` in bins.
    names
        Slide names.
    genes
        Gene names.
    """

    views: tuple[np.ndarray, ...]
    counts: np.ndarray
    mask: np.ndarray
    slide: np.ndarray
    origin: np.ndarray
    names: tuple[str, ...]
    genes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.counts)


def patch_grid(bins: BinnedCounts, patch_bins: int, min_fill: float = 0.5) -> np.ndarray:
    """``(M, 2)`` patch origins ``(row, col)`` in bins holding at least ``min_fill`` of their bins."""
    r, c = bins.grid_index()
    keys, n = np.unique(np.c_[r // patch_bins, c // patch_bins], axis=0, return_counts=True)
    keep = (n >= min_fill * patch_bins**2) & (keys >= 0).all(1)
    return keys[keep] * patch_bins


def sampler_for(origins: np.ndarray, config: Mapping[str, Any], bin_px: float):
    """The :class:`~histoscope.samplers.PointSampler` reading each patch's views.

    Parameters
    ----------
    origins
        ``(N, 2)`` patch origins ``(row, col)`` in bins.
    config
        The model config (patch geometry and views).
    bin_px
        Bin edge in level-0 pixels.
    """
    from histoscope.models.expression import views
    from histoscope.samplers import PointSampler, View

    half = config["patch_bins"] * bin_px / 2
    centres = np.c_[origins[:, 1] * bin_px + half, origins[:, 0] * bin_px + half]
    vs = [View(int(v["size_px"]), float(v["mpp"])) for v in views(config)]
    return PointSampler(centres, vs, cell=max(8, int(4 * half)))


def _targets(bins: BinnedCounts, origins: np.ndarray, patch_bins: int):
    """Counts ``(N, G, P, P)`` (uint8, clipped) and data mask ``(N, P, P)`` of patches."""
    r, c = bins.grid_index()
    p = patch_bins
    lookup = {(int(a), int(b)): k for k, (a, b) in enumerate(origins // p)}
    pk = np.array([lookup.get((int(a), int(b)), -1) for a, b in zip(r // p, c // p, strict=True)])
    inside = np.flatnonzero(pk >= 0)
    n, g = len(origins), len(bins.genes)
    counts = np.zeros((n, g, p, p), np.uint8)
    mask = np.zeros((n, p, p), bool)
    mask[pk[inside], r[inside] % p, c[inside] % p] = True
    coo = bins.counts[inside].tocoo()
    b = inside[coo.row]
    counts[pk[b], coo.col, r[b] % p, c[b] % p] = np.minimum(coo.data, 255)
    return counts, mask


def slide_pairs(data_dir: str | os.PathLike, split: str) -> list[tuple[str, Path, Path]]:
    """``(name, slide, visium folder)`` of a ``histoscope synth --extras`` folder's split.

    Raises
    ------
    ExpressionDataError
        If the manifest is missing, the split unknown or empty, or a slide lacks
        its expression folder.
    """
    root = Path(data_dir)
    man = root / "manifest.json"
    if not man.is_file():
        raise ExpressionDataError(f"{root}: no manifest.json (make one with "
                                  "`histoscope synth DIR --extras`)")  # fmt: skip
    doc = json.loads(man.read_text())
    rows = [r for r in doc["slides"] if split == "all" or r["split"] == split]
    if not rows:
        raise ExpressionDataError(f"{man}: no slides in split {split!r}")
    out = []
    for r in rows:
        slide = root / r["slide"]
        vis = root / r["visium_matrix"] if "visium_matrix" in r else None
        if vis is None:
            raise ExpressionDataError(f"{man}: slide {r['name']} has no expression "
                                      "(generate with --extras)")  # fmt: skip
        out.append((r["name"], slide, vis.parent.parent))
    return out


def load_slide_patches(
    slide_path: str | os.PathLike,
    visium: str | os.PathLike,
    config: Mapping[str, Any],
    *,
    max_patches: int | None = None,
    seed: int = 0,
    min_fill: float = 0.5,
    name: str = "",
) -> PatchSet:
    """Patches of one slide with their views and counts.

    Parameters
    ----------
    slide_path
        The H&E slide.
    visium
        Its Space Ranger binned outputs (checked against the slide).
    config
        Model config (genes, patch geometry, views).
    max_patches
        Random subset of at most this many patches (all when ``None``).
    seed
        Seeds the subset.
    min_fill
        Patches need at least this fraction of their bins in the matrix.
    name
        Slide name in the set.
    """
    from histoscope.slide import open_slide

    slide = open_slide(slide_path)
    try:
        bins = read_binned(visium, int(config["bin_um"]), image_shape=slide.shape,
                           image_mpp=slide.mpp)  # fmt: skip
        genes = tuple(config["genes"])
        if bins.genes != genes:
            missing = [g for g in genes if g not in bins.genes]
            if missing:
                raise ExpressionDataError(
                    f"{bins.source}: lacks gene(s) {missing[:5]} of the model"
                )
            order = [bins.genes.index(g) for g in genes]
            bins = _reorder(bins, order, genes)
        origins = patch_grid(bins, int(config["patch_bins"]), min_fill)
        if max_patches is not None and len(origins) > max_patches:
            pick = np.random.default_rng([seed, 0xE4]).choice(len(origins), max_patches, False)
            origins = origins[np.sort(pick)]
        counts, mask = _targets(bins, origins, int(config["patch_bins"]))
        sampler = sampler_for(origins, config, bins.bin_px)
        views = _read_views(sampler, slide)
    finally:
        slide.close()
    return PatchSet(views=views, counts=counts, mask=mask, slide=np.zeros(len(origins), np.int64),
                    origin=origins, names=(name or Path(slide_path).stem,), genes=genes)  # fmt: skip


def _reorder(bins: BinnedCounts, order: list[int], genes: tuple[str, ...]) -> BinnedCounts:
    from dataclasses import replace

    return replace(bins, counts=bins.counts[:, order].tocsr(), genes=genes)


def _read_views(sampler, slide, batch: int = 256) -> tuple[np.ndarray, ...]:
    n = len(sampler)
    parts: list[list[np.ndarray]] = [[] for _ in sampler.views]
    for i in range(0, n, batch):
        got = sampler.read(slide, np.arange(i, min(n, i + batch)))
        got = got if isinstance(got, tuple) else (got,)
        for k, t in enumerate(got):
            parts[k].append(t.numpy())
    return tuple(np.concatenate(p) if p else np.zeros((0, v.out, v.out, 3), np.uint8)
                 for p, v in zip(parts, sampler.views, strict=True))  # fmt: skip


def concat(sets: Sequence[PatchSet]) -> PatchSet:
    """One set of several slides' patches (``slide`` indexes the joined ``names``)."""
    if not sets:
        raise ExpressionDataError("no patches to join")
    offsets = np.cumsum([0] + [len(s.names) for s in sets[:-1]])
    return PatchSet(
        views=tuple(np.concatenate([s.views[k] for s in sets]) for k in range(len(sets[0].views))),
        counts=np.concatenate([s.counts for s in sets]),
        mask=np.concatenate([s.mask for s in sets]),
        slide=np.concatenate([s.slide + o for s, o in zip(sets, offsets, strict=True)]),
        origin=np.concatenate([s.origin for s in sets]),
        names=tuple(n for s in sets for n in s.names),
        genes=sets[0].genes,
    )
