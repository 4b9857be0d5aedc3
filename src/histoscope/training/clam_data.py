"""Data for the ``clam`` family: synthetic slides, cached tile features, bags.

Tile features are extracted once per slide with a frozen backbone, through
the same engine and tile grid as inference (tissue mask, then tiles with
more than ``min_tissue`` tissue), and cached as HDF5 in the CLAM/TRIDENT
layout: a ``features`` dataset ``(N, D)`` float32 and a ``coords`` dataset
``(N, 2)`` int64 of level-0 ``(x, y)`` tile corners, with the tile size,
µm/px and backbone identity as attributes. Real-data readers of that format
(CLAM's ``Generic_MIL_Dataset``, TRIDENT outputs) read these files as they are,
and :func:`read_features` reads theirs.

A bag is one slide's features with its label and, for synthetic slides, each
tile's true tumour fraction (from the tumour mask PNG at
``label["mask_um_per_px"]``), used to score attention against the mask.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histoscope.atomic import atomic_write_text
from histoscope.features import read_features, write_features
from histoscope.training._recipe import RecipeError

__all__ = ["Bag", "ensure_dataset", "load_bags", "read_features", "slide_features",
           "write_features", "write_foci_dataset"]  # fmt: skip


# ---------------------------------------------------------------- data sets
def write_foci_dataset(
    out_dir: str | os.PathLike,
    size: tuple[int, int],
    seed: int,
    count: int,
    mpp: float,
    *,
    progress: Callable[[int, int, str], None] | None = None,
) -> Path:
    """A held-out set of benign slides and slides with one small tumour focus.

    Seeds from ``seed`` upwards are drawn in order and kept when the
    generator's parameters give a ``"focus"`` slide (tumour 1-4.5 % of the
    tissue) or a benign one, until ``count // 2`` focus and ``count - count // 2``
    benign slides are found. Every slide is in split ``"test"``; the manifest
    has the rows of ``histoscope synth``.

    Returns
    -------
    pathlib.Path
        The ``manifest.json`` written.
    """
    from histoscope.synthetic import generate
    from histoscope.synthetic._params import sample_params

    want = {"focus": count // 2, "none": count - count // 2}
    seeds: list[int] = []
    s = int(seed)
    while sum(want.values()) > 0:
        extent = sample_params("he", s, tuple(size), mpp).tumour_extent
        if want.get(extent, 0) > 0:
            want[extent] -= 1
            seeds.append(s)
        s += 1
        if s - seed > 100 * count:
            raise RuntimeError(f"no {want} slides among seeds {seed}..{s}")
    out = Path(out_dir)
    rows = []
    for k, sd in enumerate(seeds):
        sl = generate(out / "slides", "he", tuple(size), sd, mpp)
        label = sl.read_label()
        rows.append({
            "name": sl.slide.stem, "split": "test", "kind": "he", "seed": sd,
            "slide": str(sl.slide.relative_to(out)), "label_json": str(sl.label.relative_to(out)),
            "tumour_mask": str(sl.tumour_mask.relative_to(out)), "label": label["label"],
            "organ": label["organ"], "tumour_extent": label["tumour_extent"],
            "tumour_fraction": round(label["tumour_fraction"], 5), "mpp": mpp,
        })  # fmt: skip
        if progress is not None:
            progress(k + 1, len(seeds), sl.slide.stem)
    manifest = {"kind": "he", "size": [int(v) for v in size], "mpp": mpp, "first_seed": seed,
                "count": count, "splits": {"train": [], "val": [],
                                           "test": [r["name"] for r in rows]},
                "slides": rows}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1))
    return out / "manifest.json"


def ensure_dataset(path: str | os.PathLike, generate: Mapping[str, Any] | None, *,
                   foci: bool = False) -> Path:  # fmt: skip
    """The dataset folder, generated with ``generate`` settings when its manifest is missing.

    Parameters
    ----------
    path
        Dataset folder.
    generate
        ``{count, size, seed, mpp, fractions, tumour_extent}`` or ``None`` (then the
        folder must exist). ``tumour_extent`` (``none`` / ``focus`` / ``moderate`` /
        ``extensive``) keeps only seeds from ``seed`` up whose slide has that
        extent, exactly as ``histoscope synth --tumour-extent`` does.
    foci
        Generate with :func:`write_foci_dataset` instead of ``write_dataset``.
    """
    root = Path(path)
    if (root / "manifest.json").is_file() or generate is None:
        return root
    g = dict(generate)
    size = tuple(int(v) for v in g.get("size", (2048, 2048)))
    seed, count, mpp = int(g.get("seed", 0)), int(g.get("count", 10)), float(g.get("mpp", 1.0))
    extent = g.get("tumour_extent", "any")
    if extent != "any":
        from histoscope.synthetic.cli import seeds_with_extent, write_selected

        try:
            seeds = seeds_with_extent("he", extent, seed, count, size, mpp)
        except ValueError as exc:
            raise RecipeError(f"cannot generate {root}: {exc}") from None
        write_selected(root, "he", size, seeds, mpp)
    elif foci:
        write_foci_dataset(root, size, seed, count, mpp)
    else:
        from histoscope.synthetic._dataset import write_dataset

        fr = tuple(g.get("fractions", (0.7, 0.15, 0.15)))
        write_dataset(root, kind="he", size=size, seed=seed, count=count, mpp=mpp, fractions=fr)
    return root


# ---------------------------------------------------------------- features
@dataclass(frozen=True)
class Bag:
    """One slide as a MIL bag.

    Attributes
    ----------
    name
        Slide name.
    features
        ``(N, D)`` float32 tile features.
    coords
        ``(N, 2)`` level-0 ``(x, y)`` tile corners.
    label
        Slide class index (1: tumour present).
    tumour_fraction
        ``(N,)`` true tumour fraction of each tile.
    extent
        The generator's tumour extent (``none``, ``focus``, ``moderate``, ``extensive``).
    slide_tumour_fraction
        Tumour share of the slide's tissue.
    """

    name: str
    features: np.ndarray
    coords: np.ndarray
    label: int
    tumour_fraction: np.ndarray
    extent: str
    slide_tumour_fraction: float


def tile_tumour_fraction(mask: np.ndarray, mask_um: float, coords: np.ndarray,
                         tile_level0: float, slide_mpp: float) -> np.ndarray:  # fmt: skip
    """Mean of a boolean ``mask`` (at ``mask_um`` µm/px) over each tile's footprint."""
    m = np.asarray(mask, np.float64)
    integral = np.zeros((m.shape[0] + 1, m.shape[1] + 1))
    integral[1:, 1:] = m.cumsum(0).cumsum(1)
    scale = slide_mpp / mask_um
    x0 = np.clip(np.rint(coords[:, 0] * scale).astype(int), 0, m.shape[1])
    y0 = np.clip(np.rint(coords[:, 1] * scale).astype(int), 0, m.shape[0])
    x1 = np.clip(np.rint((coords[:, 0] + tile_level0) * scale).astype(int), 0, m.shape[1])
    y1 = np.clip(np.rint((coords[:, 1] + tile_level0) * scale).astype(int), 0, m.shape[0])
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    s = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return (s / area).astype(np.float32)


class _Restained(torch.nn.Module):
    """Feature module seeing tiles restained by :func:`~._stain_aug.stain_shift` first.

    The same shift (one ``rng`` seed) is applied to every batch of the slide.
    """

    def __init__(self, module: torch.nn.Module, spec, stains, seed: Sequence[int],
                 degrees: float, amount: tuple[float, float]) -> None:  # fmt: skip
        super().__init__()
        self.module, self.spec, self.stains = module, spec, stains
        self.seed, self.degrees, self.amount = list(seed), float(degrees), tuple(amount)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from histoscope.training._stain_aug import stain_shift

        mean = torch.tensor(self.spec.mean, dtype=x.dtype).view(1, 3, 1, 1) * 255
        std = torch.tensor(self.spec.std, dtype=x.dtype).view(1, 3, 1, 1) * 255
        rgb = (x * std + mean).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        rng = np.random.default_rng(self.seed)
        out = stain_shift(rgb, self.stains, rng, self.degrees, self.amount)
        y = torch.from_numpy(out).permute(0, 3, 1, 2).to(x.dtype)
        return self.module((y - mean) / std)


def slide_features(slide_path: str | os.PathLike, fm, cache: Path, *, min_tissue: float = 0.5,
                   shift: Mapping[str, Any] | None = None,
                   ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:  # fmt: skip
    """Features of one slide's tissue tiles, from ``cache`` or computed and cached there.

    The cache file is ``cache/<weights hash[:12]>_t<min_tissue>[_shift...]/<slide stem>.h5``,
    so features of other weights or settings never mix.

    Parameters
    ----------
    slide_path
        The slide.
    fm
        :class:`histoscope.tasks.mil.FeatureModel`.
    cache
        Cache folder.
    min_tissue
        Tissue fraction a tile needs.
    shift
        ``{"stains", "seed", "degrees", "amount"}``: restain every tile with
        :func:`~histoscope.training._stain_aug.stain_shift` before encoding
        (the held-out stain-shifted evaluation).
    """
    from histoscope.tasks.mil import FeatureModel

    slide_path = Path(slide_path)
    key = f"{fm.descriptor['weights_sha256'][:12]}_t{min_tissue:g}"
    if shift is not None:
        key += f"_shift{shift['degrees']:g}-{shift['amount'][0]:g}-{shift['amount'][1]:g}-{shift['seed'][0]}"
    path = Path(cache) / key / f"{slide_path.stem}.h5"
    if path.is_file():
        return read_features(path)
    if shift is not None:
        mod = _Restained(fm.module, fm.spec, shift["stains"], shift["seed"], shift["degrees"],
                         shift["amount"])  # fmt: skip
        fm = FeatureModel(mod, fm.spec, fm.descriptor)
    write_slide_features(slide_path, fm, path, min_tissue)
    return read_features(path)


def write_slide_features(slide_path: Path, fm, path: Path, min_tissue: float) -> Path:
    """Encode a slide's tissue tiles with ``fm`` and write them to ``path`` (CLAM/TRIDENT .h5)."""
    from histoscope.engine import EngineParams
    from histoscope.progress import drive
    from histoscope.slide import open_slide
    from histoscope.tasks.mil import iter_features, tile_grid_for

    slide_path = Path(slide_path)
    with open_slide(slide_path) as slide:
        grid = tile_grid_for(slide, fm.spec, min_tissue=min_tissue)
        out = drive(iter_features(slide, fm, grid, EngineParams(batch_size=64, workers=1,
                                                                 prefetch=2)))  # fmt: skip
        attrs = {"patch_size": int(grid.tile_size), "patch_size_level0": float(grid.stride),
                 "patch_level": 0, "mpp": float(grid.mpp), "slide_mpp": float(grid.slide_mpp),
                 "min_tissue": float(min_tissue), "encoder": fm.descriptor["backbone"],
                 "encoder_checkpoint": fm.descriptor.get("checkpoint") or "",
                 "encoder_sha256": fm.descriptor["weights_sha256"], "name": slide_path.stem}  # fmt: skip
        return write_features(path, out.outputs, grid.coords, attrs)


def load_bags(root: str | os.PathLike, split: str, fm, cache: str | os.PathLike, *,
              min_tissue: float = 0.5, shift: Mapping[str, Any] | None = None,
              progress: Callable[[int, int, str], None] | None = None) -> list[Bag]:  # fmt: skip
    """Every slide of one split as a :class:`Bag` (features cached, truth from the masks).

    ``root`` is a synth folder, or several joined by ``os.pathsep`` (``a:b``),
    whose slides are pooled in order (each folder's features cached apart).

    ``shift`` (``{"shift_degrees", "shift_amount", "seed"}``, as the
    ``tile_classifier`` family's ``eval`` section) restains each slide's tiles
    out of the generator's stain range before encoding; slide ``k`` of the
    split gets the shift drawn from ``[seed, k, 0x57A1]``.

    Raises
    ------
    RecipeError
        If the folder, its manifest or the split is missing, or a slide has no tissue tiles.
    """
    from PIL import Image

    from histoscope.training._tiles import read_manifest

    folders = [Path(p) for p in str(root).split(os.pathsep)]
    rows, roots = [], []
    for folder in folders:
        got = [
            r for r in read_manifest(folder)["slides"] if split == "all" or r.get("split") == split
        ]
        if not got:
            raise RecipeError(f"data folder {folder} has no slides in split {split!r}"
                              + ("; a synth set is split train/val/test: use split 'all' for a "
                                 "set made only for testing" if split != "all" else ""))  # fmt: skip
        rows += got
        roots += [folder] * len(got)
    # several folders may hold slides of the same name (same seeds, other extents)
    caches = {f: Path(cache) / (f"{i}_{f.name}" if len(folders) > 1 else "")
              for i, f in enumerate(folders)}  # fmt: skip
    bags = []
    for k, (root, row) in enumerate(zip(roots, rows, strict=True)):
        label = json.loads((root / row["label_json"]).read_text())
        sh = None
        if shift is not None:
            stains = label.get("params", {}).get("stains")
            sh = {"stains": None if stains is None else np.asarray(stains, np.float64),
                  "seed": [int(shift["seed"]), k, 0x57A1], "degrees": float(shift["shift_degrees"]),
                  "amount": tuple(float(v) for v in shift["shift_amount"])}  # fmt: skip
        feats, xy, attrs = slide_features(root / row["slide"], fm, caches[root],
                                          min_tissue=min_tissue, shift=sh)  # fmt: skip
        if len(feats) == 0:
            raise RecipeError(f"slide {row['slide']} in {root} has no tissue tiles")
        mask = np.asarray(Image.open(root / row["tumour_mask"])) > 0
        frac = tile_tumour_fraction(mask, float(label["mask_um_per_px"]), xy,
                                    float(attrs["patch_size_level0"]), float(attrs["slide_mpp"]))  # fmt: skip
        bags.append(Bag(row["name"], feats, xy, int(row["label"]), frac, row["tumour_extent"],
                        float(row["tumour_fraction"])))  # fmt: skip
        if progress is not None:
            progress(k + 1, len(rows), row["name"])
    return bags
