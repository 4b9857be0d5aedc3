"""Cells for NuClass training: the authors' patch trio, or windows of synthetic H&E.

Every training item is a :class:`Window`: one local image (at the local µm/px)
and one context image (at the context µm/px, twice the local one: the 1024 px
context averaged 2 x 2 to 512 px), with the positions of one or more labelled
cells in each. A trio gives one window per cell (the reference crop path); a
synthetic region gives windows with every cell inside labelled (the fast path's
tile pass). Both train the same weights, since the model pools its feature maps
at the cells (see :mod:`histoscope.models.nuclass`).

The trio (``annotations.json``, ``patches_224x224.h5``, ``patches_1024x1024.h5``)
is read as the NuClass code reads it: ``annotations.json`` maps cell ids to
records with ``class_id`` and ``tissue_type``; each HDF5 file holds either one
``images`` array with a parallel ``keys`` array, or one dataset per cell id. A
folder may hold the trio itself or ``train/`` and ``test/`` sub-folders with one
each.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from histoscope.errors import HistoScopeError
from histoscope.training._recipe import RecipeError

if TYPE_CHECKING:
    from torch import nn

TRIO = ("annotations.json", "patches_224x224.h5", "patches_1024x1024.h5")


class NuClassDataError(HistoScopeError, ValueError):
    """A NuClass dataset that cannot be read: missing file, bad JSON or HDF5, unknown class."""


@dataclass
class Window:
    """One local image and one context image with labelled cells in both.

    Attributes
    ----------
    local, context
        ``(H, W, 3)`` uint8 at the local µm/px and ``(H', W', 3)`` at the context µm/px.
    local_xy, context_xy
        ``(K, 2)`` float32 cell positions ``(x, y)`` (pixel ``i`` spans ``[i, i+1)``).
    y, tissue
        ``(K,)`` int64 class and organ-token indices.
    """

    local: np.ndarray
    context: np.ndarray
    local_xy: np.ndarray
    context_xy: np.ndarray
    y: np.ndarray
    tissue: np.ndarray


def collate(windows: Sequence[Window]):
    """Stack windows of equal size: images ``(B, 3, H, W)`` uint8, cell tables with image index."""
    import torch

    def stack(key):
        return torch.from_numpy(np.stack([getattr(w, key) for w in windows])).permute(0, 3, 1, 2)

    idx = np.concatenate([np.full(len(w.y), i) for i, w in enumerate(windows)])
    cat = {k: torch.from_numpy(np.concatenate([getattr(w, k) for w in windows]))
           for k in ("local_xy", "context_xy", "y", "tissue")}  # fmt: skip
    return {"local": stack("local"), "context": stack("context"),
            "index": torch.from_numpy(idx), **cat}  # fmt: skip


def mean2(img: np.ndarray) -> np.ndarray:
    """2 x 2 block mean of an ``(H, W, 3)`` uint8 image (H, W even), rounded to uint8."""
    h, w = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
    a = img[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).astype(np.uint16).sum(axis=(1, 3))
    return ((a + 2) // 4).astype(np.uint8)


# ------------------------------------------------------------------ the trio
def _trio_dirs(root: Path, split: str | None) -> list[Path]:
    if all((root / f).exists() for f in TRIO):
        return [root]
    subs = [root / s for s in ((split,) if split else ("train", "test"))]
    found = [d for d in subs if all((d / f).exists() for f in TRIO)]
    if not found:
        raise NuClassDataError(f"{root}: no NuClass trio ({', '.join(TRIO)}) here or in "
                               f"{', '.join(s.name for s in subs)}/")  # fmt: skip
    return found


def read_annotations(path: Path) -> dict[str, dict]:
    """``annotations.json``: cell id -> record (``class_id``, ``tissue_type``, ...)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise NuClassDataError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(doc, dict) or not all(isinstance(v, dict) for v in doc.values()):
        raise NuClassDataError(f"{path}: expected an object of cell id -> record")
    for key, rec in doc.items():
        if "class_id" not in rec:
            raise NuClassDataError(f"{path}: cell {key!r} has no class_id")
    return doc


class _H5Patches:
    """Patches of one HDF5 file by cell id (merged ``images``+``keys`` or one dataset per id)."""

    def __init__(self, path: Path) -> None:
        import h5py

        self.path = path
        try:
            self.f = h5py.File(path, "r")
        except OSError as exc:
            raise NuClassDataError(f"{path}: not a readable HDF5 file ({exc})") from None
        self.merged = "images" in self.f and "keys" in self.f
        if self.merged:
            keys = self.f["keys"][()]
            self.k2i = {(k.decode() if isinstance(k, bytes) else str(k)): i
                        for i, k in enumerate(keys)}  # fmt: skip

    def get(self, key: str) -> np.ndarray:
        if self.merged:
            if key not in self.k2i:
                raise NuClassDataError(f"{self.path}: no patch for cell {key!r}")
            arr = self.f["images"][self.k2i[key]]
        else:
            if key not in self.f:
                raise NuClassDataError(f"{self.path}: no patch for cell {key!r}")
            arr = self.f[key][()]
        arr = np.asarray(arr)
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, -1)
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
            raise NuClassDataError(f"{self.path}: patch {key!r} has shape {arr.shape}")
        return np.clip(arr[..., :3], 0, 255).astype(np.uint8)


class TrioSource:
    """Cells of one or more NuClass trios; one :class:`Window` per cell.

    Parameters
    ----------
    root
        Folder with the trio, or with ``train/`` / ``test/`` trios.
    classes
        Class names in logit order; cells of other classes are skipped.
    tissues
        Organ tokens (ending with ``"unknown"``); other organs map to "unknown".
    split
        Sub-folder to read when ``root`` has several.
    local_size
        Edge of the central part of the 224 px crop handed to the model.
    """

    def __init__(self, root, classes: Sequence[str], tissues: Sequence[str],
                 split: str | None = None, local_size: int = 224) -> None:  # fmt: skip
        self.classes, self.tissues = list(classes), list(tissues)
        self.local_size = int(local_size)
        self.items: list[tuple[int, str]] = []
        self.files: list[tuple[_H5Patches, _H5Patches]] = []
        ys, ts = [], []
        for d in _trio_dirs(Path(root), split):
            ann = read_annotations(d / TRIO[0])
            self.files.append((_H5Patches(d / TRIO[1]), _H5Patches(d / TRIO[2])))
            for key, rec in ann.items():
                name = str(rec["class_id"])
                if name not in self.classes:
                    continue
                tissue = str(rec.get("tissue_type", "")).strip().lower()
                self.items.append((len(self.files) - 1, str(key)))
                ys.append(self.classes.index(name))
                ts.append(self.tissues.index(tissue) if tissue in self.tissues else len(self.tissues) - 1)  # fmt: skip
        if not self.items:
            raise NuClassDataError(f"{root}: no cell of the classes {self.classes}")
        self.y, self.tissue = np.asarray(ys, np.int64), np.asarray(ts, np.int64)

    def __len__(self) -> int:
        return len(self.items)

    def window(self, i: int, shift: tuple[int, int] = (0, 0)) -> Window:
        """Cell ``i``: the central ``local_size`` px of its 224 crop (moved by ``shift``), its context."""
        f, key = self.items[i]
        local, ctx = self.files[f][0].get(key), self.files[f][1].get(key)
        c = local.shape[0] // 2
        h = self.local_size // 2
        dx, dy = shift
        x0 = int(np.clip(c - h + dx, 0, local.shape[1] - self.local_size))
        y0 = int(np.clip(c - h + dy, 0, local.shape[0] - self.local_size))
        crop = local[y0 : y0 + self.local_size, x0 : x0 + self.local_size]
        ctx = mean2(ctx)
        cc = ctx.shape[0] / 2 + 0.25  # the cell's pixel (index 512 of 1024) after 2 x 2 averaging
        return Window(crop, ctx, np.array([[c - x0 + 0.5, c - y0 + 0.5]], np.float32),
                      np.array([[cc, cc]], np.float32), self.y[i : i + 1], self.tissue[i : i + 1])  # fmt: skip


# -------------------------------------------------------------- synthetic regions
@dataclass
class Region:
    """A rendered synthetic region at the local µm/px and the cells inside it."""

    image: np.ndarray  # (H, W, 3) uint8
    x: np.ndarray  # cell centres relative to the region (pixel centres at integers)
    y: np.ndarray
    cls: np.ndarray
    organ: str


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """The image after one JPEG round trip, as a slide's tiles have had."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=int(quality))
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def render_regions(seed: int, count: int, size: int, slide: int, mpp: float) -> list[Region]:
    """``count`` regions of ``size`` px from the synthetic H&E slide of ``seed``.

    Region centres are drawn from the slide's cells, rare classes first, so
    every class appears; the pixels are JPEG-compressed as a written slide's.
    """
    from histoscope.synthetic._cells import cells_in_window, make_context
    from histoscope.synthetic._params import sample_params
    from histoscope.synthetic._render import render_region

    p = sample_params("he", seed, (slide, slide), mpp)
    ctx = make_context(p)
    all_c = cells_in_window(ctx, size / 2, size / 2, slide - size / 2, slide - size / 2)
    keep = all_c["cls"] >= 0
    cx, cy, cls = all_c["x"][keep], all_c["y"][keep], all_c["cls"][keep]
    rng = np.random.default_rng([seed, 0x9C1])
    out = []
    for _ in range(count):
        if len(cls) == 0:
            break
        present = np.unique(cls)
        freq = np.array([(cls == c).mean() for c in present])
        c = rng.choice(present, p=(1 / freq) / (1 / freq).sum())
        j = rng.choice(np.flatnonzero(cls == c))
        y0, x0 = int(cy[j]) - size // 2, int(cx[j]) - size // 2
        img = _jpeg(render_region(ctx, y0, x0, size, size), p.jpeg_quality)
        w = cells_in_window(ctx, y0, x0, y0 + size, x0 + size)
        k = w["cls"] >= 0
        out.append(
            Region(img, w["x"][k] - x0, w["y"][k] - y0, w["cls"][k].astype(np.int64), p.organ)
        )
    return out


class RegionSource:
    """Windows of synthetic regions with every cell labelled (the fast path's tile pass).

    Parameters
    ----------
    regions
        Rendered regions (all the same size).
    tissues
        Organ tokens; a region's organ maps to its token.
    window
        Local window edge (local px); the context window adds ``margin`` context
        px on every side.
    margin
        Context px around the local window (half the largest pooling box plus
        the trunk's reach).
    edge
        Cells closer than this to the local window's edge are not labelled.
    """

    def __init__(self, regions: Sequence[Region], tissues: Sequence[str], window: int,
                 margin: int, edge: int) -> None:  # fmt: skip
        self.regions = list(regions)
        self.tissues = list(tissues)
        self.size, self.margin, self.edge = int(window), int(margin), int(edge)
        size = self.regions[0].image.shape[0]
        lo = 2 * self.margin
        hi = size - 2 * self.margin - self.size
        if hi <= lo:
            raise RecipeError(f"regions of {size} px are too small for a {window} px window "
                              f"with a {margin} px context margin")  # fmt: skip
        self.lo, self.hi = lo, hi
        self.context_images = [mean2(r.image) for r in self.regions]
        per = max(1, ((hi - lo) // self.size + 1) ** 2)
        self.items = [(r, k) for r in range(len(self.regions)) for k in range(per)]

    def __len__(self) -> int:
        return len(self.items)

    def window_at(self, r: int, ox: int, oy: int) -> Window:
        """The window whose local image starts at ``(ox, oy)`` of region ``r``."""
        reg = self.regions[r]
        s, m = self.size, self.margin
        local = reg.image[oy : oy + s, ox : ox + s]
        cx0, cy0 = ox // 2 - m, oy // 2 - m
        ctx = self.context_images[r][cy0 : cy0 + s // 2 + 2 * m, cx0 : cx0 + s // 2 + 2 * m]
        lx, ly = reg.x - ox + 0.5, reg.y - oy + 0.5
        inside = ((lx >= self.edge) & (lx < s - self.edge)
                  & (ly >= self.edge) & (ly < s - self.edge))  # fmt: skip
        t = self.tissues.index(reg.organ) if reg.organ in self.tissues else len(self.tissues) - 1
        return Window(
            local, ctx,
            np.stack([lx[inside], ly[inside]], 1).astype(np.float32),
            np.stack([(reg.x[inside] + 0.5) / 2 - cx0, (reg.y[inside] + 0.5) / 2 - cy0], 1).astype(np.float32),
            reg.cls[inside], np.full(int(inside.sum()), t, np.int64),
        )  # fmt: skip

    def window(self, i: int, rng: np.random.Generator) -> Window:
        """Item ``i``: a window of its region at a random offset (any phase of the trunks' strides)."""
        r, _ = self.items[i]
        ox, oy = (int(v) for v in rng.integers(self.lo, self.hi + 1, size=2))
        return self.window_at(r, ox, oy)

    def grid_windows(self) -> list[Window]:
        """Non-overlapping windows covering every region (for validation; each cell once)."""
        out = []
        for r in range(len(self.regions)):
            for oy in range(self.lo, self.hi + 1, self.size - 2 * self.edge):
                for ox in range(self.lo, self.hi + 1, self.size - 2 * self.edge):
                    out.append(self.window_at(r, ox // 2 * 2, oy // 2 * 2))
        return out


def regions_cached(seeds: Sequence[int], per_seed: int, size: int, slide: int, mpp: float,
                   cache: Path) -> list[Region]:  # fmt: skip
    """:func:`render_regions` for every seed, stored in ``cache`` (``.npz``, no pickles)."""
    key = hashlib.sha256(json.dumps([list(seeds), per_seed, size, slide, mpp]).encode()).hexdigest()
    path = Path(cache) / f"nuclass_regions_{key[:16]}.npz"
    if path.exists():
        z = np.load(path, allow_pickle=False)
        n = int(z["n"])
        return [Region(z[f"img{i}"], z[f"x{i}"], z[f"y{i}"], z[f"c{i}"], str(z[f"o{i}"]))
                for i in range(n)]  # fmt: skip
    regions = [r for s in seeds for r in render_regions(int(s), per_seed, size, slide, mpp)]
    arrays = {"n": np.array(len(regions))}
    for i, r in enumerate(regions):
        arrays.update({f"img{i}": r.image, f"x{i}": r.x, f"y{i}": r.y, f"c{i}": r.cls,
                       f"o{i}": np.array(r.organ)})  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    from histoscope.atomic import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    return regions


def predict_windows(
    model: nn.Module, windows: list[Window], tissue: int | None = None
) -> dict[str, np.ndarray]:
    """Outputs of :meth:`NuClass.heads` for every cell of ``windows`` (tissue token overridable)."""
    import torch

    with torch.no_grad():
        return _predict_windows(model, windows, tissue)


def _predict_windows(model, windows, tissue):
    import torch

    model.eval()
    dev = model.temperature.device
    outs: dict[str, list] = {}
    ys = []
    for w in windows:
        if len(w.y) == 0:
            continue
        b = {k: v.to(dev) for k, v in collate([w]).items()}
        t = b["tissue"] if tissue is None else torch.full_like(b["tissue"], tissue)
        raw_l = model.pool_local(
            model.local_map(model.normalise(b["local"])), b["index"], b["local_xy"]
        )
        raw_c = model.pool_context(model.context_map(model.normalise(b["context"])), b["index"],
                                   b["context_xy"])  # fmt: skip
        for k, v in model.heads(raw_l, raw_c, t).items():
            outs.setdefault(k, []).append(v.cpu().numpy())
        ys.append(w.y)
    res = {k: np.concatenate(v) for k, v in outs.items()}
    res["y"] = np.concatenate(ys)
    return res


def macro_f1(y: np.ndarray, pred: np.ndarray, n: int) -> tuple[float, list[float]]:
    """Macro F1 over classes present in ``y`` and each class's F1."""
    per = []
    for c in range(n):
        tp = float(((pred == c) & (y == c)).sum())
        fp = float(((pred == c) & (y != c)).sum())
        fn = float(((pred != c) & (y == c)).sum())
        per.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn > 0 else float("nan"))
    present = [per[c] for c in range(n) if (y == c).any()]
    return float(np.mean(present)) if present else float("nan"), per


def cell_metrics(res: Mapping[str, np.ndarray], classes: list[str]) -> dict[str, Any]:
    """Accuracy, macro F1 and per-class F1 of local, global and gated on the same cells, plus ECE."""
    from histoscope.training.metrics import ece

    y = res["y"]
    out: dict[str, Any] = {"n": int(len(y)), "n_per_class": {c: int((y == i).sum())
                                                             for i, c in enumerate(classes)}}  # fmt: skip
    for name, key in (("local", "p_local"), ("global", "p_global"), ("gated", "prob")):
        p = res[key]
        f1, per = macro_f1(y, p.argmax(1), len(classes))
        out[name] = {"accuracy": float((p.argmax(1) == y).mean()), "macro_f1": f1,
                     "per_class_f1": {c: (None if np.isnan(v) else float(v))
                                      for c, v in zip(classes, per, strict=True)},
                     "ece": ece(p, y)}  # fmt: skip
    out["mean_g"] = float(res["g"].mean())
    return out
