"""Optional per-slide outputs: 2 µm expression, NuClass patches, report."""

from __future__ import annotations

import json
from pathlib import Path

from histoscope.synthetic._cells import SlideContext


def write_extras(
    ctx: SlideContext, cells: dict, slide: Path, out: Path, stem: str
) -> dict[str, Path]:
    """Write the Visium HD-style expression, the NuClass trio and the report JSON.

    Parameters
    ----------
    ctx
        Slide context.
    cells
        Ground-truth cells from :func:`histoscope.synthetic._truth.collect_cells`.
    slide
        The written slide (NuClass patches are read from it).
    out
        Folder of the slide.
    stem
        Slide file stem.

    Returns
    -------
    dict
        Output name -> path (``visium_matrix``, ``visium_positions``,
        ``visium_scalefactors``, ``nuclass_annotations``, ``nuclass_patches_224``,
        ``nuclass_patches_1024``, ``report``).
    """
    from histoscope.synthetic._expression import write_visium_hd
    from histoscope.synthetic._nuclass import write_nuclass
    from histoscope.synthetic._report import findings, write_report
    from histoscope.synthetic._truth import ihc_labels

    paths: dict[str, Path] = {}
    for k, v in write_visium_hd(ctx, cells, out / f"{stem}_visium").items():
        paths[f"visium_{k}"] = v
    for k, v in write_nuclass(ctx, cells, slide, out / f"{stem}_nuclass", stem).items():
        paths[f"nuclass_{k}"] = v
    label = None
    if ctx.params.kind == "ihc":
        label = {"ihc": ihc_labels(ctx, cells), "params": ctx.params.to_dict()}
    facts = findings(ctx, cells, label)
    report = {"id": stem, "report": write_report(facts, ctx.params.seed), "findings": facts}
    paths["report"] = out / f"{stem}.report.json"
    paths["report"].write_text(json.dumps(report, indent=1))
    return paths
