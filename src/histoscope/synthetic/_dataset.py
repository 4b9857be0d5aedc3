"""A dataset of synthetic slides with train/val/test splits and one manifest."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from histoscope.atomic import atomic_write_text
from histoscope.synthetic._generate import SyntheticSlide, generate

SPLITS = ("train", "val", "test")


def assign_splits(n: int, seed: int, fractions=(0.7, 0.15, 0.15)) -> list[str]:
    """Split names for ``n`` slides: shuffled by ``seed``, val and test never empty when n >= 3."""
    if n < 1:
        raise ValueError(f"count must be at least 1, got {n}")
    if len(fractions) != 3 or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0):
        raise ValueError(
            f"fractions must be three non-negative numbers summing to 1, got {fractions}"
        )
    n_val = int(round(fractions[1] * n))
    n_test = int(round(fractions[2] * n))
    if n >= 3:
        n_val, n_test = max(1, n_val), max(1, n_test)
    n_train = max(0, n - n_val - n_test)
    names = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    names = names[:n]
    order = np.random.default_rng([seed, 0x5B117]).permutation(n)
    return [names[i] for i in np.argsort(order)]


def write_dataset(
    out_dir: str | os.PathLike,
    kind: str = "he",
    size: tuple[int, int] = (4096, 4096),
    seed: int = 0,
    count: int = 10,
    mpp: float = 0.5,
    *,
    extras: bool = False,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    progress: Callable[[int, int, str], None] | None = None,
    seeds: list[int] | None = None,
) -> Path:
    """Generate ``count`` slides (seeds ``seed .. seed+count-1``) with splits and a manifest.

    The manifest (``manifest.json``, ``manifest.csv``) is written once, after
    the last slide, so an interrupted run never leaves one listing part of the
    slides, nor replaces the manifest of a folder it writes into before it is done.

    Parameters
    ----------
    out_dir
        Dataset folder; slides go to ``out_dir/slides``.
    kind, size, mpp, extras
        As in :func:`histoscope.synthetic.generate`.
    seed
        First slide seed; also shuffles the split assignment.
    count
        Number of slides.
    fractions
        Train / val / test fractions.
    progress
        ``progress(done, total, name)`` after each slide.
    seeds
        Generate the slides of these seeds instead (any order; ``seed`` and
        ``count`` are then ignored): the splits are shuffled by the first seed
        and the manifest also lists ``seeds``.

    Returns
    -------
    pathlib.Path
        ``manifest.json`` (the same rows are in ``manifest.csv``).
    """
    if seeds is not None:
        seed_list = [int(v) for v in seeds]
        if not seed_list or any(v < 0 for v in seed_list):
            raise ValueError(
                f"seeds must be a non-empty list of non-negative integers, got {seeds!r}"
            )
        seed, count = seed_list[0], len(seed_list)
    elif not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    else:
        seed_list = list(range(seed, seed + count))
    out = Path(out_dir)
    slides_dir = out / "slides"
    splits = assign_splits(count, seed, fractions)
    rows = []
    for k in range(count):
        s: SyntheticSlide = generate(slides_dir, kind, size, seed_list[k], mpp, extras=extras)
        label = s.read_label()
        row = {
            "name": s.slide.stem,
            "split": splits[k],
            "kind": kind,
            "seed": seed_list[k],
            "slide": str(s.slide.relative_to(out)),
            "label_json": str(s.label.relative_to(out)),
            "cells_geojson": str(s.cells_geojson.relative_to(out)),
            "cells_csv": str(s.cells_csv.relative_to(out)),
            "tumour_mask": str(s.tumour_mask.relative_to(out)),
            "label": label["label"],
            "organ": label["organ"],
            "tumour_extent": label["tumour_extent"],
            "tumour_fraction": round(label["tumour_fraction"], 5),
            "mpp": mpp,
        }
        if kind == "ihc":
            ihc = label["ihc"]
            row.update({t: ihc[t] for t in ("intensity", "location", "quantity", "tissue",
                                            "malignancy")})  # fmt: skip
            row["antibody"] = label["params"]["antibody"]
        row.update({name: str(path.relative_to(out)) for name, path in s.extras})
        rows.append(row)
        if progress is not None:
            progress(k + 1, count, row["name"])
    manifest = {
        "kind": kind,
        "size": [int(v) for v in size],
        "mpp": mpp,
        "first_seed": seed,
        "count": count,
        **({"seeds": seed_list} if seeds is not None else {}),
        "splits": {sp: [r["name"] for r in rows if r["split"] == sp] for sp in SPLITS},
        "slides": rows,
    }
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO(newline="")
    wr = csv.DictWriter(buf, fieldnames=fields)
    wr.writeheader()
    wr.writerows(rows)
    atomic_write_text(out / "manifest.csv", buf.getvalue())
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1))
    if kind == "ihc":
        _merge_hpa(out, rows)
    if extras:
        _merge_reports(out, rows)
    return out / "manifest.json"


def _merge_reports(out: Path, rows: list[dict]) -> None:
    """HistGen/R2Gen-style ``reports.json``: ``{split: [{id, report, image_path}]}``."""
    merged: dict[str, list] = {sp: [] for sp in SPLITS}
    for r in rows:
        rep = json.loads((out / r["report"]).read_text())
        merged[r["split"]].append({"id": r["name"], "report": rep["report"],
                                   "image_path": r["slide"], "split": r["split"]})  # fmt: skip
    (out / "reports.json").write_text(json.dumps(merged, indent=1))


def _merge_hpa(out: Path, rows: list[dict]) -> None:
    """All slides' HPA-style rows in one table with a split column."""
    table = []
    for r in rows:
        path = out / "slides" / f"{r['name']}.hpa.csv"
        with open(path, newline="") as fh:
            (row,) = list(csv.DictReader(fh))
        row["image_path"] = r["slide"]
        row["split"] = r["split"]
        table.append(row)
    with open(out / "hpa.csv", "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=list(table[0]))
        wr.writeheader()
        wr.writerows(table)
