"""Sample slides generated once into a cache folder (napari's sample data uses this)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from histoscope.synthetic._generate import SyntheticSlide, generate

#: Default seeds of the sample slides: an H&E slide with a moderate colon tumour and an IHC
#: slide with strong membranous staining (see docs/synthetic.md).
SAMPLE_SEEDS = {"he": 45, "ihc": 41}


def cache_dir() -> Path:
    """``$HISTOSCOPE_CACHE/synthetic`` or ``~/.cache/histoscope/synthetic``."""
    root = os.environ.get("HISTOSCOPE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "histoscope"
    )
    return Path(root) / "synthetic"


def _paths(folder: Path, stem: str, kind: str) -> SyntheticSlide:
    return SyntheticSlide(
        slide=folder / f"{stem}.tif",
        cells_csv=folder / f"{stem}.cells.csv",
        cells_geojson=folder / f"{stem}.cells.geojson",
        tumour_mask=folder / f"{stem}.tumour_mask.png",
        tissue_map=folder / f"{stem}.tissue_map.png",
        label=folder / f"{stem}.label.json",
        hpa_csv=folder / f"{stem}.hpa.csv" if kind == "ihc" else None,
    )


def sample_slide(
    kind: str = "he",
    size: tuple[int, int] = (4096, 4096),
    seed: int | None = None,
    *,
    root: str | os.PathLike | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SyntheticSlide:
    """A synthetic slide from the cache, generated on first use.

    Parameters
    ----------
    kind
        ``"he"`` or ``"ihc"``.
    size
        Level-0 ``(height, width)``.
    seed
        Defaults to :data:`SAMPLE_SEEDS` for ``kind``.
    root
        Cache folder; defaults to :func:`cache_dir`.
    progress
        ``progress(done, total)`` over tiles while generating (not called on a hit).

    Returns
    -------
    SyntheticSlide
        Paths inside the cache; the folder is complete or absent, never half written.
    """
    if kind not in SAMPLE_SEEDS:
        raise ValueError(f"kind must be one of {tuple(SAMPLE_SEEDS)}, got {kind!r}")
    seed = SAMPLE_SEEDS[kind] if seed is None else seed
    base = Path(root) if root is not None else cache_dir()
    h, w = (int(v) for v in size)
    stem = f"{kind}_{seed:05d}"
    folder = base / f"{stem}_{h}x{w}"
    if (folder / f"{stem}.label.json").is_file():
        return _paths(folder, stem, kind)
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=base))
    try:
        generate(tmp, kind, (h, w), seed, name=stem, progress=progress)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished first: keep theirs
            if not (folder / f"{stem}.label.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _paths(folder, stem, kind)
