"""iSight training data: the HPA-style table and bags of tissue tiles.

The table is a CSV with one row per image, the layout of the Human Protein
Atlas annotations that iSight was trained on and of the ``hpa.csv`` written by
``histoscope synth --kind ihc``:

``image_path``
    Slide or image, relative to the table's folder (or absolute).
``metadata``
    Clinical text (tissue, SNOMED, antibody) for the metadata encoder; when the
    column is missing it is composed from ``tissue``, ``snomed`` and ``antibody``.
``intensity``, ``location``, ``quantity``, ``tissue``, ``malignancy``
    The five labels, by class name. An empty cell is a missing label (ignored
    by the loss and the metrics); any other value outside the model's classes
    is an error naming the row.
``split``
    Optional ``train`` / ``val`` / ``test``.

A bag is every tissue tile of one image at the model's input spec (from
:func:`histoscope.tasks.isight.isight_grid`), kept as a ``(N, S, S, 3)`` uint8
array in memory and in an on-disk cache, so epochs never re-read slides.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from histoscope.atomic import atomic_path
from histoscope.models.isight import INTENSITY, LOCATION, MALIGNANCY, QUANTITY, TASKS

#: Label value used for a missing label (ignored by loss and metrics).
MISSING = -1

#: Accepted spellings of class names (lower-cased, spaces removed) per task.
_ALIASES: dict[str, dict[str, str]] = {
    "quantity": {"25%-75%": "25-75%", "rare": "<25%", "0%": "none"},
    "location": {
        "cytoplasmic/membranous,nuclear": "cytoplasmic/membranous+nuclear",
        "nuclear,cytoplasmic/membranous": "cytoplasmic/membranous+nuclear",
        "nuclear+cytoplasmic/membranous": "cytoplasmic/membranous+nuclear",
        "cytoplasmic": "cytoplasmic/membranous",
        "membranous": "cytoplasmic/membranous",
    },
    "malignancy": {"tumor": "cancer", "tumour": "cancer", "malignant": "cancer"},
    "intensity": {},
    "tissue": {},
}

FIXED_CLASSES: dict[str, tuple[str, ...]] = {
    "intensity": INTENSITY,
    "location": LOCATION,
    "quantity": QUANTITY,
    "malignancy": MALIGNANCY,
}


@dataclass(frozen=True)
class ISightSample:
    """One row of the table.

    Attributes
    ----------
    image
        Absolute path of the slide or image.
    metadata
        Clinical text given to the metadata encoder ("" for none).
    labels
        ``task -> class name`` ("" where the table has no label).
    split
        ``train`` / ``val`` / ``test``, or "" when the table has no split column.
    row
        1-based data row number in the table (for error messages).
    """

    image: Path
    metadata: str
    labels: dict[str, str]
    split: str
    row: int

    @property
    def name(self) -> str:
        """The image's file name without its extension."""
        return self.image.name.split(".")[0]


def _norm(value: str) -> str:
    return "".join(value.lower().split())


def read_table(path: str | os.PathLike, split: str | None = None) -> list[ISightSample]:
    """Read an HPA-style table (see the module docstring).

    Parameters
    ----------
    path
        The CSV, or a dataset folder holding ``hpa.csv``.
    split
        Keep only rows of this split (all rows when ``None``). Asking for a
        split of a table without a ``split`` column is an error.

    Returns
    -------
    list of ISightSample

    Raises
    ------
    ValueError
        A missing column, an empty selection, or a row without an image path.
    """
    table = Path(path)
    if table.is_dir():
        table = table / "hpa.csv"
    if not table.is_file():
        raise FileNotFoundError(f"{table}: no HPA-style table")
    with open(table, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = set(reader.fieldnames or ())
        rows = list(reader)
    missing = [c for c in ("image_path", *TASKS) if c not in fields]
    if missing:
        raise ValueError(f"{table}: missing column(s) {missing}; found {sorted(fields)}")
    if split is not None and "split" not in fields:
        raise ValueError(f"{table}: asked for split {split!r} but the table has no split column")
    out = []
    for i, r in enumerate(rows, start=1):
        if split is not None and r["split"].strip() != split:
            continue
        if not r["image_path"].strip():
            raise ValueError(f"{table}, row {i}: empty image_path")
        image = Path(r["image_path"].strip())
        if not image.is_absolute():
            image = table.parent / image
        meta = r.get("metadata")
        if meta is None:
            parts = [
                f"{k.capitalize()}: {r[k].strip()}."
                for k in ("tissue", "snomed", "antibody")
                if r.get(k, "").strip()
            ]
            meta = " ".join(parts)
        labels = {t: (r[t] or "").strip() for t in TASKS}
        out.append(ISightSample(image, meta.strip(), labels, (r.get("split") or "").strip(), i))
    if not out:
        raise ValueError(f"{table}: no rows" + (f" in split {split!r}" if split else ""))
    return out


def tissue_classes(samples: Sequence[ISightSample]) -> list[str]:
    """Sorted tissue names that occur in ``samples`` (the tissue head's classes)."""
    names = sorted({s.labels["tissue"] for s in samples if s.labels["tissue"]})
    if not names:
        raise ValueError("no tissue labels in the table; give tissue_classes in the recipe")
    return names


def encode_labels(
    samples: Sequence[ISightSample], classes: Mapping[str, Sequence[str]]
) -> np.ndarray:
    """Class indices ``(n_samples, 5)`` in :data:`TASKS` order; ``MISSING`` where empty.

    Raises
    ------
    ValueError
        Naming the table row, the task, the value and the accepted classes.
    """
    out = np.full((len(samples), len(TASKS)), MISSING, dtype=np.int64)
    for j, task in enumerate(TASKS):
        names = list(classes[task])
        lookup = {_norm(c): k for k, c in enumerate(names)}
        for alias, target in _ALIASES.get(task, {}).items():
            if _norm(target) in lookup:
                lookup.setdefault(_norm(alias), lookup[_norm(target)])
        for i, s in enumerate(samples):
            value = s.labels[task]
            if not value:
                continue
            k = lookup.get(_norm(value))
            if k is None:
                raise ValueError(
                    f"row {s.row} ({s.image.name}): {task} {value!r} is not one of {names}"
                )
            out[i, j] = k
    return out


# --------------------------------------------------------------------- bags
def _cache_key(sample: ISightSample, spec, max_tiles: int, tissue=None) -> str:
    st = sample.image.stat()
    key = [str(sample.image.resolve()), st.st_size, st.st_mtime_ns, spec.to_dict(), max_tiles]
    if tissue is not None:  # bags of the default detection keep their older names
        key.append(asdict(tissue))
    ident = json.dumps(key)
    return hashlib.sha1(ident.encode()).hexdigest()[:20]


def read_bag(image: str | os.PathLike, spec, max_tiles: int = 64, tissue=None) -> np.ndarray:
    """Tissue tiles of one image at ``spec``: ``(N, S, S, 3)`` uint8, raster order.

    Parameters
    ----------
    image
        Slide or image path (anything :func:`histoscope.open_slide` reads).
    spec
        The model's :class:`~histoscope.models.backbones.InputSpec`.
    max_tiles
        At most this many tiles (evenly spaced), as in
        :func:`~histoscope.tasks.isight.isight_grid`.
    tissue
        :class:`~histoscope.tissue.TissueParams` of the tissue detection
        (``None``: :data:`~histoscope.tasks.isight.LEGACY_TISSUE`).
    """
    from histoscope.slide import open_slide
    from histoscope.tasks.isight import isight_grid

    slide = open_slide(image)
    try:
        grid = isight_grid(slide, spec, max_tiles=max_tiles, tissue=tissue)
        t = grid.tile_size
        bag = np.empty((len(grid), t, t, 3), np.uint8)
        for k, (x, y) in enumerate(grid.coords):
            bag[k] = slide.read_region(int(x), int(y), t, t, mpp=grid.mpp)
    finally:
        close = getattr(slide, "close", None)
        if close is not None:
            close()
    return bag


class BagCache:
    """Bags of tiles per image, read once and kept in memory and on disk.

    Parameters
    ----------
    spec
        The model's input spec (tile size and µm/px).
    max_tiles
        Tiles kept per image.
    cache_dir
        Folder for ``.npy`` copies of the bags (``None``: memory only). The
        file name hashes the image path, size, mtime, spec, ``max_tiles`` and
        tissue detection, so a changed slide or setting is read again.
    tissue
        Tissue detection (see :func:`read_bag`).
    """

    def __init__(
        self,
        spec,
        max_tiles: int = 64,
        cache_dir: str | os.PathLike | None = None,
        tissue=None,
    ):
        self.spec = spec
        self.tissue = tissue
        self.max_tiles = int(max_tiles)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._bags: dict[Path, np.ndarray] = {}

    def get(self, sample: ISightSample) -> np.ndarray:
        """The bag of ``sample`` (read on first use)."""
        bag = self._bags.get(sample.image)
        if bag is not None:
            return bag
        file = None
        if self.cache_dir is not None:
            key = _cache_key(sample, self.spec, self.max_tiles, self.tissue)
            file = self.cache_dir / f"{key}.npy"
            if file.exists():
                bag = np.load(file)
        if bag is None:
            bag = read_bag(sample.image, self.spec, self.max_tiles, self.tissue)
            if file is not None:
                with atomic_path(file, suffix=".npy") as tmp:  # np.save appends .npy otherwise
                    np.save(tmp, bag)
        self._bags[sample.image] = bag
        return bag

    def fill(
        self,
        samples: Sequence[ISightSample],
        progress: Callable[[int, int, str], None] | None = None,
    ) -> None:
        """Read every sample's bag now; ``progress(done, total, name)`` after each."""
        for k, s in enumerate(samples, start=1):
            self.get(s)
            if progress is not None:
                progress(k, len(samples), f"tiles {s.name}")


def collate(
    bags: Sequence[np.ndarray],
    spec,
    *,
    n_tiles: int | None = None,
    generator=None,
    flips: bool = True,
) -> tuple:
    """Stack bags into normalised tiles ``(B, N, 3, S, S)`` and a mask ``(B, N)``.

    Parameters
    ----------
    bags
        uint8 ``(N_i, S, S, 3)`` arrays.
    spec
        Input spec giving the normalisation.
    n_tiles
        In training, draw exactly this many tiles per bag at random (tile
        order carries no label information); a smaller bag is filled up by
        drawing its tiles again, so no padding tile passes the backbone's
        batch norm in training. ``None`` keeps every tile as is.
    generator
        ``torch.Generator`` for the random choices.
    flips
        With ``n_tiles``, also rotate each bag's tiles by a random multiple of
        90 degrees and flip them at random (orientation carries no label).
    """
    import torch

    picked = []
    for bag in bags:
        t = torch.from_numpy(bag)
        if n_tiles is not None and len(t) >= n_tiles:
            t = t[torch.randperm(len(t), generator=generator)[:n_tiles]]
        elif n_tiles is not None and len(t):  # fill up by drawing again: no padding tiles
            extra = torch.randint(0, len(t), (n_tiles - len(t),), generator=generator)
            t = torch.cat([t, t[extra]])
        if n_tiles is not None and flips:
            k = int(torch.randint(0, 4, (1,), generator=generator))
            t = torch.rot90(t, k, dims=(1, 2))
            if bool(torch.randint(0, 2, (1,), generator=generator)):
                t = t.flip(2)
        picked.append(t)
    n = max(max(len(t) for t in picked), 1)
    s = spec.tile_size
    x = torch.zeros(len(picked), n, 3, s, s)
    mask = torch.zeros(len(picked), n, dtype=torch.bool)
    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)
    for i, t in enumerate(picked):
        if len(t):
            x[i, : len(t)] = (t.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
            mask[i, : len(t)] = True
    return x, mask
