"""``histoscope info SLIDE``: what a slide file holds."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print a slide's size, levels, µm/px and vendor properties")
    p.add_argument("slide", help="slide file or OME-Zarr directory")
    p.add_argument("--mpp", type=float, default=None, help="µm/px for images that carry none")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from histoscope.slide import open_slide

    with open_slide(args.slide, mpp=args.mpp) as slide:
        meta = slide.metadata
        meta["levels"] = [list(map(int, lvl.shape[:2])) for lvl in slide.levels]
        meta["tile"] = [list(map(int, lvl.chunksize[:2])) for lvl in slide.levels]
        meta["associated_images"] = sorted(slide.associated_images)
        if args.json:
            print(json.dumps(meta, indent=2, default=str))
        else:
            for k, v in meta.items():
                print(f"{k:>18}: {v}")
    return 0
