"""``histoscope analyze SLIDE --tasks ... --out DIR``: run analyses headless."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

#: Tasks ``analyze`` can run, in the order they run.
TASKS = ("tissue", "ihc")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="run analyses on one slide and write their outputs")
    p.add_argument("slide", help="slide file, OME-Zarr directory or image")
    p.add_argument("--tasks", default="tissue", help=f"comma-separated, from: {', '.join(TASKS)}")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--mpp", type=float, default=None, help="µm/px for images that carry none")
    p.add_argument("--compartment", default="nucleus", help="IHC: nucleus|cytoplasm|membrane|cell")
    p.add_argument("--ihc-mpp", type=float, default=0.5, help="IHC: µm/px cells are measured at")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from histoscope.slide import open_slide

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
        raise SystemExit(f"histoscope analyze: unknown task(s) {unknown}; choose from {TASKS}")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    with open_slide(args.slide, mpp=args.mpp) as slide:
        written: list[Path] = []
        if "tissue" in tasks:
            written += _tissue(slide, out)
        if "ihc" in tasks:
            from histoscope.tasks.ihc_measure import IHCParams, iter_measure_slide

            gen = iter_measure_slide(
                slide, IHCParams(compartment=args.compartment), mpp=max(args.ihc_mpp, slide.mpp)
            )
            with tqdm(desc="IHC cells", unit="tile") as bar:
                while True:
                    try:
                        done, total = next(gen)
                    except StopIteration as stop:
                        result = stop.value
                        break
                    bar.total = total
                    bar.update(done - bar.n)
            written += list(result.save(out).values())
            print(json.dumps(result.summary(), indent=2))
    for path in written:
        print(f"wrote {path}")
    return 0


def _tissue(slide, out: Path) -> list[Path]:
    import tifffile
    from PIL import Image

    from histoscope.export import atomic_write_text
    from histoscope.tissue import tissue_mask

    mask = tissue_mask(slide)
    png = out / "tissue_mask.png"
    Image.fromarray(mask.mask.astype("uint8") * 255).save(png)
    tif = out / "tissue_mask.tif"
    res = 1e4 / mask.mpp  # pixels per cm, so the mask carries its µm/px
    part = tif.with_suffix(".tif.part")
    tifffile.imwrite(
        part, mask.mask.astype("uint8"), resolution=(res, res), resolutionunit="CENTIMETER"
    )
    part.replace(tif)
    doc = {"slide": str(slide.path), "mask_mpp": mask.mpp, "threshold": mask.threshold,
           "tissue_fraction": mask.fraction, "shape": list(mask.mask.shape)}  # fmt: skip
    js = atomic_write_text(out / "tissue.json", json.dumps(doc, indent=2) + "\n")
    return [png, tif, js]
