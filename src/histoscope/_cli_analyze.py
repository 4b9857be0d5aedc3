"""``histoscope analyze SLIDE --tasks ... --out DIR``: run analyses headless."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

#: Tasks ``analyze`` can run, in the order they run.
TASKS = ("tissue", "tumour", "mil", "ihc")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="run analyses on one slide and write their outputs")
    p.add_argument("slide", help="slide file, OME-Zarr directory or image")
    p.add_argument("--tasks", default="tissue", help=f"comma-separated, from: {', '.join(TASKS)}")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--mpp", type=float, default=None, help="µm/px for images that carry none")
    p.add_argument("--tumour-checkpoint", default=None,
                   help="tile classifier (default: the embedded tumour_patch_default)")  # fmt: skip
    p.add_argument(
        "--stain-norm",
        action="store_true",
        default=None,
        help="tumour: force Macenko normalisation (default: as the checkpoint was trained)",
    )
    p.add_argument("--mil-checkpoint", default=None,
                   help="CLAM model (default: the embedded clam_default)")  # fmt: skip
    p.add_argument("--compartment", default="auto",
                   help="IHC: auto|nucleus|cytoplasm|membrane|cell")  # fmt: skip
    p.add_argument("--ihc-mpp", type=float, default=0.5, help="IHC: µm/px cells are measured at")
    p.add_argument(
        "--isight-checkpoint",
        default=None,
        help="IHC: iSight model (default: the embedded isight_default; 'none' skips it)",
    )
    p.add_argument(
        "--metadata",
        default=None,
        help="IHC: clinical text for iSight, e.g. 'Tissue: breast. Antibody: HER2.'",
    )
    p.set_defaults(func=run)


def _drive(gen, desc: str):
    """Run a progress generator to the end under a tqdm bar; return its value."""
    from tqdm import tqdm

    with tqdm(desc=desc, unit="tile") as bar:
        while True:
            try:
                done, total = next(gen)
            except StopIteration as stop:
                return stop.value
            bar.total = total
            bar.update(done - bar.n)


def run(args: argparse.Namespace) -> int:
    from histoscope.slide import open_slide

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
        raise SystemExit(f"histoscope analyze: unknown task(s) {unknown}; choose from {TASKS}")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with open_slide(args.slide, mpp=args.mpp) as slide:
        tissue = None
        if "tissue" in tasks or "tumour" in tasks:
            from histoscope.tasks.tumour import find_tissue

            tissue = find_tissue(slide)
            if "tissue" in tasks:
                written += _save_tissue(tissue, out)
        if "tumour" in tasks:
            written += _tumour(slide, tissue.mask, args, out)
        if "mil" in tasks:
            written += _mil(slide, tissue.mask if tissue is not None else None, args, out)
        if "ihc" in tasks:
            written += _ihc(slide, args, out)
    for path in written:
        print(f"wrote {path}")
    return 0


def _save_tissue(tissue, out: Path) -> list[Path]:
    from PIL import Image

    from histoscope.export import atomic_write_text

    files = tissue.save(out)
    png = out / "tissue_mask.png"
    Image.fromarray(tissue.mask.mask.astype("uint8") * 255).save(png)
    m = tissue.mask
    doc = {"mask_mpp": m.mpp, "threshold": m.threshold, "tissue_fraction": m.fraction,
           "shape": list(m.mask.shape), "provenance": tissue.provenance.to_dict()}  # fmt: skip
    return [*files, png, atomic_write_text(out / "tissue.json", json.dumps(doc, indent=2) + "\n")]


def _tumour(slide, mask, args, out: Path) -> list[Path]:
    from histoscope._data import sample_data_path
    from histoscope.checkpoints import load_checkpoint
    from histoscope.errors import CheckpointError
    from histoscope.export.heatmap import write_heatmap_outputs
    from histoscope.tasks.tumour import HeatmapJob

    ckpt = args.tumour_checkpoint or sample_data_path("tumour_patch_default.safetensors")
    if ckpt is None:
        raise CheckpointError("no tumour checkpoint: pass --tumour-checkpoint PATH")
    model, card = load_checkpoint(ckpt)
    job = HeatmapJob(slide, model, card, tissue=mask, stain_norm=args.stain_norm)
    heat = _drive(job.run(), "tumour tiles")
    return write_heatmap_outputs(
        heat, slide, out, stem="tumour_heatmap", value="tumour_probability"
    )


def _mil(slide, mask, args, out: Path) -> list[Path]:
    from histoscope._data import sample_data_path
    from histoscope.checkpoints import load_checkpoint
    from histoscope.errors import CheckpointError
    from histoscope.tasks.mil import iter_mil

    ckpt = args.mil_checkpoint or sample_data_path("clam_default.safetensors")
    if ckpt is None:
        raise CheckpointError("no CLAM checkpoint: pass --mil-checkpoint PATH")
    model, card = load_checkpoint(ckpt, family="clam")
    result = _drive(iter_mil(slide, model, card, tissue=mask), "MIL tiles")
    print(json.dumps({k: v for k, v in result.summary().items() if k != "top_tiles"}, indent=2))
    return result.save(out)


def _ihc(slide, args, out: Path) -> list[Path]:
    """Measurement (cells CSV + summary) and, with a checkpoint, iSight's five calls in ihc.json."""
    from histoscope._data import sample_data_path
    from histoscope.tasks.ihc_measure import IHCParams, iter_measure_slide

    params = IHCParams(compartment=args.compartment)
    measured = _drive(
        iter_measure_slide(slide, params, mpp=max(args.ihc_mpp, slide.mpp)), "IHC cells"
    )
    files = list(measured.save(out).values())
    summary = measured.summary()
    ckpt = args.isight_checkpoint or sample_data_path("isight_default.safetensors")
    if ckpt and str(ckpt).lower() != "none":
        from histoscope.checkpoints import load_checkpoint
        from histoscope.tasks.isight import iter_isight

        model, card = load_checkpoint(ckpt, family="isight")
        calls = _drive(iter_isight(slide, model, card, metadata=args.metadata), "iSight tiles")
        files += calls.save(out, measurement=summary)
        summary = {
            "model": {t: c["call"] for t, c in calls.calls().items()},
            "measurement": summary,
        }
    print(json.dumps(summary, indent=2))
    return files
