"""Report data in the HistGen (R2Gen) layout, and a synthetic set written in it.

The layout the authors' code reads: one report JSON ``{"train": [...], "val":
[...], "test": [...]}`` whose entries are ``{"id": ..., "report": ...}``, and
one CLAM/TRIDENT feature file ``<features_dir>/<id>.h5`` per slide
(``features`` N x D, ``coords`` N x 2). :func:`read_report_json` and
:func:`load_split` read exactly that, so real HistGen data trains unchanged.

:func:`write_synthetic_reports` writes such a set from
:mod:`histoscope.synthetic` slides: each slide's report and its ground-truth
findings (``<id>.report.json``, as ``histoscope synth --extras`` writes), the
slide's tissue-tile features from the encoder the CLAM default uses, and the
merged report JSON. Only the slide, its tumour mask, label and report are
written (no cell tables or expression), which keeps a few hundred slides
within minutes of CPU.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histoscope.atomic import atomic_write_text
from histoscope.reports import ReportDataError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ReportSample:
    """One slide: its id, report text, tile features and (synthetic) findings."""

    id: str
    report: str
    features: np.ndarray
    coords: np.ndarray
    findings: dict[str, Any] = field(default_factory=dict)


def read_report_json(path: str | os.PathLike) -> dict[str, list[dict[str, Any]]]:
    """The ``{split: [{id, report, ...}]}`` report JSON, checked.

    Raises
    ------
    ReportDataError
        If the file is missing, not JSON, not a mapping of split lists, or an
        entry lacks a string ``id`` or ``report`` (naming file, split and index).
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportDataError(f"report file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportDataError(f"report file {path} is not readable JSON: {exc}") from None
    if not isinstance(doc, dict) or not any(s in doc for s in SPLITS):
        raise ReportDataError(f"report file {path}: expected an object with "
                              f"'train'/'val'/'test' lists, got {type(doc).__name__}")  # fmt: skip
    out: dict[str, list[dict[str, Any]]] = {}
    for split in SPLITS:
        rows = doc.get(split, [])
        if not isinstance(rows, list):
            raise ReportDataError(f"report file {path}: {split!r} is not a list")
        for i, r in enumerate(rows):
            if not isinstance(r, dict):
                raise ReportDataError(f"report file {path}: {split}[{i}] is not an object")
            for key in ("id", "report"):
                if not isinstance(r.get(key), str) or not r[key].strip():
                    raise ReportDataError(f"report file {path}: {split}[{i}] has no "
                                          f"{key!r} string")  # fmt: skip
        out[split] = rows
    return out


def read_findings(path: str | os.PathLike) -> dict[str, Any]:
    """The ``findings`` of a per-slide ``<id>.report.json`` (synthetic truth).

    Raises
    ------
    ReportDataError
        If the file is not JSON or has no ``findings`` object.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportDataError(f"findings file {path} is not readable JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("findings"), dict):
        raise ReportDataError(f"findings file {path} has no 'findings' object")
    return doc["findings"]


def load_split(
    report_json: str | os.PathLike,
    features_dir: str | os.PathLike,
    split: str,
    *,
    findings_dir: str | os.PathLike | None = None,
) -> list[ReportSample]:
    """Every slide of one split with its features (and findings when ``findings_dir`` is given).

    Raises
    ------
    ReportDataError
        From :func:`read_report_json`, or when the split is empty.
    histoscope.features.FeatureFileError
        When a feature file is missing or lacks ``features``/``coords`` (naming the file).
    """
    from histoscope.features import read_features

    if split not in SPLITS:
        raise ReportDataError(f"split must be one of {SPLITS}, got {split!r}")
    rows = read_report_json(report_json)[split]
    if not rows:
        raise ReportDataError(f"report file {report_json} has no slides in split {split!r}")
    out = []
    for r in rows:
        feats, xy, _ = read_features(Path(features_dir) / f"{r['id']}.h5")
        facts = {}
        if findings_dir is not None:
            facts = read_findings(Path(findings_dir) / f"{r['id']}.report.json")
        out.append(ReportSample(r["id"], r["report"], feats, xy, facts))
    return out


# ------------------------------------------------------------------ synthetic set
def write_synthetic_slide(slides_dir: Path, seed: int, size: tuple[int, int], mpp: float) -> Path:
    """One H&E slide with its tumour mask, label and ``<id>.report.json``; skipped when present.

    Returns
    -------
    pathlib.Path
        The slide's ``.report.json``.
    """
    from histoscope.synthetic._cells import make_context
    from histoscope.synthetic._params import sample_params
    from histoscope.synthetic._report import findings, write_report
    from histoscope.synthetic._tiles import write_slide
    from histoscope.synthetic._truth import collect_cells, slide_label, write_masks

    stem = f"he_{seed:05d}"
    rep = slides_dir / f"{stem}.report.json"
    if rep.is_file():
        return rep
    slides_dir.mkdir(parents=True, exist_ok=True)
    params = sample_params("he", int(seed), tuple(size), float(mpp))
    ctx = make_context(params)
    slide = write_slide(slides_dir / f"{stem}.tif", params, ctx, workers=1)
    cells = collect_cells(ctx)
    mask, tmap = slides_dir / f"{stem}.tumour_mask.png", slides_dir / f"{stem}.tissue_map.png"
    write_masks(ctx, mask, tmap)
    files = {"slide": slide.name, "tumour_mask": mask.name, "tissue_map": tmap.name}
    label = slide_label(ctx, cells, files)
    atomic_write_text(slides_dir / f"{stem}.label.json", json.dumps(label, indent=1))
    facts = findings(ctx, cells)
    doc = {"id": stem, "report": write_report(facts, params.seed), "findings": facts}
    atomic_write_text(rep, json.dumps(doc, indent=1))
    return rep


def write_synthetic_reports(
    out_dir: str | os.PathLike,
    seeds: Sequence[int],
    *,
    size: tuple[int, int] = (2048, 2048),
    mpp: float = 1.0,
    fractions: tuple[float, float, float] = (0.75, 0.1, 0.15),
    feature_model=None,
    min_tissue: float = 0.5,
    progress: Callable[[int, int, str], Any] | None = None,
) -> Path:
    """A HistGen-layout set of synthetic slides: slides, features, report JSON.

    Slides already written (their ``.report.json`` exists) and feature files
    already cached are reused, so an interrupted run continues.

    Parameters
    ----------
    out_dir
        Receives ``slides/``, ``features/<id>.h5`` and ``reports.json``.
    seeds
        Slide seeds (slide ids are ``he_<seed:05d>``).
    size, mpp
        Level-0 size and µm/px of each slide.
    fractions
        Train / val / test shares (assigned by a shuffle of the seeds).
    feature_model
        :class:`histoscope.features.FeatureModel`; default: the encoder named
        by the CLAM default's card (so MIL and reports share a feature table).
    min_tissue
        Tissue fraction a tile needs.
    progress
        ``progress(done, total, id)`` after each slide.

    Returns
    -------
    pathlib.Path
        The ``reports.json`` written.
    """
    from histoscope.synthetic._dataset import assign_splits

    out = Path(out_dir)
    fm = feature_model if feature_model is not None else default_feature_model()
    seeds = [int(s) for s in seeds]
    rows: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    splits = assign_splits(len(seeds), seeds[0], fractions)
    for k, (seed, split) in enumerate(zip(seeds, splits, strict=True)):
        rep = write_synthetic_slide(out / "slides", seed, size, mpp)
        stem = rep.name.removesuffix(".report.json")
        slide_feature_file(out / "slides" / f"{stem}.tif", fm, out / "features", min_tissue)
        doc = json.loads(rep.read_text())
        rows[split].append({"id": stem, "report": doc["report"], "split": split,
                            "image_path": f"slides/{stem}.tif"})  # fmt: skip
        if progress is not None:
            progress(k + 1, len(seeds), stem)
    atomic_write_text(out / "reports.json", json.dumps(rows, indent=1) + "\n")
    atomic_write_text(out / "encoder.json", json.dumps(fm.descriptor, indent=1) + "\n")
    return out / "reports.json"


def default_feature_model():
    """The tile encoder the CLAM default's card names (the session's shared feature table)."""
    from histoscope._data import sample_data_path
    from histoscope.checkpoints import read_card
    from histoscope.features import feature_model_for

    path = sample_data_path("clam_default.safetensors")
    if path is None:
        from histoscope.errors import CheckpointError

        raise CheckpointError("sample_data/clam_default.safetensors is missing: it names the "
                              "feature encoder reports are trained on")  # fmt: skip
    return feature_model_for(read_card(path))


def slide_feature_file(slide_path: Path, fm, features_dir: Path, min_tissue: float = 0.5) -> Path:
    """``features_dir/<stem>.h5`` of a slide's tissue tiles (written once, then reused)."""
    from histoscope.training.clam_data import write_slide_features

    path = Path(features_dir) / f"{Path(slide_path).stem}.h5"
    if not path.is_file():
        write_slide_features(Path(slide_path), fm, path, min_tissue)
    return path
