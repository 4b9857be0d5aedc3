"""``generate``: one synthetic slide and its ground truth on disk."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from histoscope.synthetic._cells import make_context
from histoscope.synthetic._params import KINDS, sample_params
from histoscope.synthetic._tiles import write_slide
from histoscope.synthetic._truth import (
    collect_cells,
    slide_label,
    write_cells,
    write_hpa_row,
    write_masks,
)


@dataclass(frozen=True)
class SyntheticSlide:
    """Paths of one generated slide and its ground-truth files.

    Attributes
    ----------
    slide
        Pyramidal JPEG-tiled TIFF.
    cells_csv, cells_geojson
        One row / one QuPath detection per cell (centroid, class, polygon).
    tumour_mask, tissue_map
        PNGs at ``label["mask_um_per_px"]`` µm/px.
    label
        JSON with the slide label, tumour extent, organ, counts, stain vectors
        and (IHC) the five iSight labels.
    hpa_csv
        IHC only: one HPA-style row with metadata text and the five labels.
    extras
        Further outputs by name (expression, NuClass patches, report).
    """

    slide: Path
    cells_csv: Path
    cells_geojson: Path
    tumour_mask: Path
    tissue_map: Path
    label: Path
    hpa_csv: Path | None = None
    extras: tuple[tuple[str, Path], ...] = ()

    def read_label(self) -> dict:
        """The label JSON as a dictionary."""
        return json.loads(self.label.read_text())


def _check(kind: str, size, seed: int, mpp: float) -> tuple[int, int]:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"size must be (height, width), got {size!r}") from None
    if h < 256 or w < 256:
        raise ValueError(f"size must be at least (256, 256) pixels, got {size!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not (0.05 <= float(mpp) <= 10):
        raise ValueError(f"mpp must be between 0.05 and 10 µm/px, got {mpp!r}")
    return h, w


def generate(
    out_dir: str | os.PathLike,
    kind: str = "he",
    size: tuple[int, int] = (4096, 4096),
    seed: int = 0,
    mpp: float = 0.5,
    *,
    name: str | None = None,
    extras: bool = False,
    progress: Callable[[int, int], None] | None = None,
    workers: int | None = None,
) -> SyntheticSlide:
    """Generate one synthetic slide with its ground truth.

    Parameters
    ----------
    out_dir
        Folder to write into (created if missing).
    kind
        ``"he"`` (haematoxylin and eosin) or ``"ihc"`` (haematoxylin + DAB).
    size
        Level-0 ``(height, width)`` in pixels, each at least 256.
    seed
        Non-negative integer; the same seed gives the same slide and truth.
    mpp
        µm per level-0 pixel.
    name
        File stem; defaults to ``"{kind}_{seed:05d}"``.
    extras
        Also write 2 µm expression (Visium HD layout), the NuClass patch trio
        and a report; their paths are in ``SyntheticSlide.extras``.
    progress
        ``progress(done, total)`` over the slide's tiles.
    workers
        Rendering threads (default: all CPUs).

    Returns
    -------
    SyntheticSlide

    Raises
    ------
    ValueError
        If ``kind``, ``size``, ``seed`` or ``mpp`` is invalid.
    """
    h, w = _check(kind, size, seed, mpp)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = name or f"{kind}_{seed:05d}"
    params = sample_params(kind, seed, (h, w), mpp)
    ctx = make_context(params)
    slide = write_slide(out / f"{stem}.tif", params, ctx, progress=progress, workers=workers)
    cells = collect_cells(ctx)
    paths = {
        "cells_csv": out / f"{stem}.cells.csv",
        "cells_geojson": out / f"{stem}.cells.geojson",
        "tumour_mask": out / f"{stem}.tumour_mask.png",
        "tissue_map": out / f"{stem}.tissue_map.png",
        "label": out / f"{stem}.label.json",
    }
    write_cells(cells, mpp, paths["cells_csv"], paths["cells_geojson"])
    write_masks(ctx, paths["tumour_mask"], paths["tissue_map"])
    files = {"slide": slide.name, **{k: v.name for k, v in paths.items() if k != "label"}}
    hpa = None
    if kind == "ihc":
        hpa = out / f"{stem}.hpa.csv"
        files["hpa_csv"] = hpa.name
    more: dict[str, Path] = {}
    if extras:
        from histoscope.synthetic._extras import write_extras

        more = write_extras(ctx, cells, slide, out, stem)
        files.update({k: v.name for k, v in more.items()})
    label = slide_label(ctx, cells, files)
    paths["label"].write_text(json.dumps(label, indent=1))
    if hpa is not None:
        write_hpa_row(label, slide.name, hpa)
    return SyntheticSlide(slide=slide, hpa_csv=hpa, extras=tuple(more.items()), **paths)
