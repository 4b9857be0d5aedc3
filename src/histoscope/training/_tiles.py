"""Labelled tiles from a ``histoscope synth`` dataset, and the stain changes used on them.

Tiles lie on the same grid as :func:`histoscope.tissue.tile_grid` (origin at
the slide's top-left, stride = tile size x µm/px). A tile is labelled from the
slide's ground truth at ``mask_um_per_px``: *tumour* when at least
``tumour_min`` of its area is tumour, *normal* when at most ``normal_max`` is,
and left out in between (a border tile is neither, and counting it as either
would teach the model the mask's blur). Only tiles whose true tissue fraction
exceeds ``min_tissue`` are kept, as at inference.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histoscope.training._recipe import RecipeError

CLASSES = ("normal", "tumour")
#: Folder names read as each class in a patch folder (``split/class/*.png``).
CLASS_FOLDERS = {
    "normal": ("normal", "benign", "non_tumour", "non-tumour", "nontumour", "non_tumor", "0"),
    "tumour": ("tumour", "tumor", "malignant", "cancer", "1"),
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass(frozen=True)
class TileSet:
    """Tiles of one split.

    Attributes
    ----------
    images
        ``(N, T, T, 3)`` uint8 RGB.
    labels
        ``(N,)`` int64, index into :data:`CLASSES`.
    slide
        ``(N,)`` index into ``names``.
    coords
        ``(N, 2)`` level-0 ``(x, y)`` of each tile's top-left corner.
    tumour_fraction
        ``(N,)`` true tumour fraction of each tile.
    names
        Slide names.
    stains
        Per slide, the ``(3, 3)`` stain OD vectors it was rendered with
        (from its label JSON; ``None`` when unknown).
    """

    images: np.ndarray
    labels: np.ndarray
    slide: np.ndarray
    coords: np.ndarray
    tumour_fraction: np.ndarray
    names: tuple[str, ...]
    stains: tuple[np.ndarray | None, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def counts(self) -> dict[str, int]:
        """Tiles per class."""
        return {c: int((self.labels == i).sum()) for i, c in enumerate(CLASSES)}


def is_patch_folder(data: str | Path) -> bool:
    """Whether ``data`` holds ``<split>/<class>/`` image folders (torchvision ImageFolder style)."""
    root = Path(data)
    return root.is_dir() and any(
        (root / sp / name).is_dir()
        for sp in ("train", "val", "test")
        for names in CLASS_FOLDERS.values()
        for name in names
    )


def load_patch_folder(data: str | Path, split: str, *, tile_size: int) -> TileSet:
    """Patches from ``<data>/<split>/<class>/*.png`` (the seed's holdout-patch layout).

    Class folders are matched by name (:data:`CLASS_FOLDERS`, case-insensitive);
    patches of another size are resized to ``tile_size`` (bilinear). Patch files
    carry no µm/px: they are taken to be at the checkpoint's. ``split="all"``
    reads every split folder.

    Raises
    ------
    RecipeError
        If the split has no class folder or no images.
    """
    from PIL import Image

    root = Path(data)
    splits = ("train", "val", "test") if split == "all" else (split,)
    lookup = {n.lower(): i for i, c in enumerate(CLASSES) for n in CLASS_FOLDERS[c]}
    files: list[tuple[Path, int]] = []
    for sp in splits:
        base = root / sp
        for sub in sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []:
            if sub.name.lower() in lookup:
                files += [(f, lookup[sub.name.lower()]) for f in sorted(sub.rglob("*"))
                          if f.suffix.lower() in IMAGE_SUFFIXES]  # fmt: skip
    if not files:
        raise RecipeError(
            f"patch folder {root}: no images under {'/'.join(splits)}/<class>/ for split "
            f"{split!r}; class folders are named {CLASS_FOLDERS}"
        )
    images = np.empty((len(files), tile_size, tile_size, 3), np.uint8)
    for i, (f, _) in enumerate(files):
        with Image.open(f) as im:
            im = im.convert("RGB")
            if im.size != (tile_size, tile_size):
                im = im.resize((tile_size, tile_size), Image.BILINEAR)
            images[i] = np.asarray(im)
    labels = np.array([c for _, c in files], np.int64)
    return TileSet(
        images=images,
        labels=labels,
        slide=np.zeros(len(files), np.int64),
        coords=np.zeros((len(files), 2), np.int64),
        tumour_fraction=labels.astype(np.float32),
        names=(f"{root.name}/{split}",),
        stains=(None,),
    )


def read_manifest(data: str | Path) -> dict:
    """The ``manifest.json`` of a dataset folder written by ``histoscope synth``.

    Raises
    ------
    RecipeError
        If the folder or its manifest is missing or unreadable.
    """
    root = Path(data)
    if not root.is_dir():
        raise RecipeError(f"data folder {root} does not exist")
    path = root / "manifest.json"
    if not path.is_file():
        raise RecipeError(
            f"data folder {root} has no manifest.json; expected a folder written by "
            "`histoscope synth OUT --kind he`, or patches in <split>/<class>/ folders"
        )
    try:
        manifest = json.loads(path.read_text())
        manifest["slides"]  # noqa: B018 - presence check
    except (ValueError, KeyError, TypeError) as exc:
        raise RecipeError(f"{path} is not a histoscope synth manifest ({exc})") from exc
    return manifest


def _box_fraction(mask: np.ndarray, mask_um: float, rows: int, cols: int, tile_um: float):
    """Mean of ``mask`` over each tile's footprint (exact for any scale ratio)."""
    m = mask.astype(np.float64)
    integral = np.zeros((m.shape[0] + 1, m.shape[1] + 1))
    integral[1:, 1:] = m.cumsum(0).cumsum(1)
    step = tile_um / mask_um  # mask pixels per tile

    def at(edges: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        e = np.clip(edges, 0, n)
        i = np.minimum(np.floor(e).astype(int), n - 1)
        return i, e - i

    (yi, fy), (xi, fx) = (
        at(np.arange(rows + 1) * step, m.shape[0]),
        at(np.arange(cols + 1) * step, m.shape[1]),
    )
    t = integral
    a = ((t[yi][:, xi] * (1 - fx) + t[yi][:, xi + 1] * fx) * (1 - fy)[:, None]
         + (t[yi + 1][:, xi] * (1 - fx) + t[yi + 1][:, xi + 1] * fx) * fy[:, None])  # fmt: skip
    sums = a[1:, 1:] - a[:-1, 1:] - a[1:, :-1] + a[:-1, :-1]
    return sums / (step * step)


def tile_labels(
    tumour: np.ndarray,
    tissue: np.ndarray,
    mask_um: float,
    slide_um: tuple[float, float],
    tile_um: float,
    *,
    min_tissue: float = 0.5,
    tumour_min: float = 0.5,
    normal_max: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Label every tile of the grid from ground-truth masks.

    Parameters
    ----------
    tumour, tissue
        Boolean masks at ``mask_um`` µm/px (tumour; any tissue).
    mask_um
        µm per mask pixel.
    slide_um
        Slide ``(height, width)`` in µm.
    tile_um
        Tile edge in µm.
    min_tissue, tumour_min, normal_max
        See the module docstring.

    Returns
    -------
    labels, tumour_fraction
        ``(rows, cols)`` int labels (-1: not used) and float tumour fractions.
    """
    rows = max(1, math.ceil(slide_um[0] / tile_um - 1e-9))
    cols = max(1, math.ceil(slide_um[1] / tile_um - 1e-9))
    frac_tissue = _box_fraction(tissue, mask_um, rows, cols, tile_um)
    frac_tumour = _box_fraction(tumour, mask_um, rows, cols, tile_um)
    labels = np.full((rows, cols), -1, np.int64)
    keep = frac_tissue > min_tissue
    labels[keep & (frac_tumour <= normal_max + 1e-9)] = 0
    labels[keep & (frac_tumour >= tumour_min)] = 1
    return labels, frac_tumour.astype(np.float32)


def _read_truth(root: Path, row: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    from PIL import Image

    label_path = root / row["label_json"]
    if not label_path.is_file():
        raise RecipeError(f"data folder {root}: label file {label_path} is missing")
    label = json.loads(label_path.read_text())
    tumour = np.asarray(Image.open(root / row["tumour_mask"])) > 0
    tissue_name = label.get("files", {}).get("tissue_map")
    if tissue_name is None:
        raise RecipeError(f"{label_path} names no tissue_map file")
    tissue = np.asarray(Image.open(label_path.parent / tissue_name)) > 0
    return tumour, tissue, label


def load_split(
    data: str | Path,
    split: str,
    *,
    mpp: float,
    tile_size: int,
    min_tissue: float = 0.5,
    tumour_min: float = 0.5,
    normal_max: float = 0.0,
    max_per_slide: int | None = None,
    seed: int = 0,
) -> TileSet:
    """Read every labelled tile of one split.

    Parameters
    ----------
    data
        Dataset folder from ``histoscope synth``.
    split
        ``"train"``, ``"val"``, ``"test"`` or ``"all"``.
    mpp, tile_size
        Resolution and size the tiles are read at.
    min_tissue, tumour_min, normal_max
        Labelling rule (see the module docstring).
    max_per_slide
        Keep at most this many tiles of each class per slide (seeded choice).
    seed
        Seeds that choice.

    Returns
    -------
    TileSet

    Raises
    ------
    RecipeError
        If the data folder, its manifest or the split's slides are missing.
    """
    from histoscope.slide import open_slide

    root = Path(data)
    manifest = read_manifest(root)
    rows = [r for r in manifest["slides"] if split == "all" or r.get("split") == split]
    if not rows:
        raise RecipeError(f"data folder {root} has no slides in split {split!r}")
    tile_um = tile_size * mpp
    parts: dict[str, list] = {k: [] for k in ("img", "lab", "sl", "xy", "tf")}
    names, stains = [], []
    for k, row in enumerate(rows):
        path = root / row["slide"]
        if not path.exists():
            raise RecipeError(f"data folder {root}: slide {path} is missing")
        tumour, tissue, label = _read_truth(root, row)
        stain = label.get("params", {}).get("stains")
        names.append(row["name"])
        stains.append(np.asarray(stain, np.float64) if stain else None)
        with open_slide(path) as slide:
            h0, w0 = slide.shape
            s_mpp = float(slide.mpp)
            labels, tfrac = tile_labels(
                tumour, tissue, float(label["mask_um_per_px"]), (h0 * s_mpp, w0 * s_mpp),
                tile_um, min_tissue=min_tissue, tumour_min=tumour_min, normal_max=normal_max,
            )  # fmt: skip
            chosen = _choose(labels, max_per_slide, np.random.default_rng([seed, k]))
            stride = tile_um / s_mpp
            for r in np.unique(chosen[:, 0]):
                cs = chosen[chosen[:, 0] == r, 1]
                y0 = int(math.floor(r * stride))
                c_lo, c_hi = int(cs.min()), int(cs.max()) + 1
                x0 = int(math.floor(c_lo * stride))
                strip = slide.read_region(x0, y0, tile_size * (c_hi - c_lo), tile_size, mpp=mpp)
                tiles = strip.reshape(tile_size, c_hi - c_lo, tile_size, 3).transpose(1, 0, 2, 3)
                parts["img"].append(tiles[cs - c_lo])
                parts["lab"].append(labels[r, cs])
                parts["tf"].append(tfrac[r, cs])
                parts["sl"].append(np.full(len(cs), k))
                xy = np.stack([np.floor(cs * stride), np.full(len(cs), y0)], 1)
                parts["xy"].append(xy.astype(np.int64))
    if not parts["lab"]:
        raise RecipeError(f"data folder {root}: split {split!r} has no labelled tissue tiles")
    return TileSet(
        images=np.ascontiguousarray(np.concatenate(parts["img"])),
        labels=np.concatenate(parts["lab"]).astype(np.int64),
        slide=np.concatenate(parts["sl"]).astype(np.int64),
        coords=np.concatenate(parts["xy"]),
        tumour_fraction=np.concatenate(parts["tf"]).astype(np.float32),
        names=tuple(names),
        stains=tuple(stains),
    )


def _choose(labels: np.ndarray, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    """``(row, col)`` of labelled tiles, at most ``cap`` per class, in raster order."""
    picks = []
    for c in range(len(CLASSES)):
        idx = np.argwhere(labels == c)
        if cap is not None and len(idx) > cap:
            idx = idx[np.sort(rng.choice(len(idx), cap, replace=False))]
        picks.append(idx)
    out = np.concatenate(picks).reshape(-1, 2)
    return out[np.lexsort((out[:, 1], out[:, 0]))]
