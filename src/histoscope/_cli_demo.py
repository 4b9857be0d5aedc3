"""``histoscope demo``: generate a slide and show it in napari (or render it to a PNG)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="generate a synthetic slide and open it in napari")
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="working folder")
    p.add_argument("--slide", type=Path, default=None, help="show this slide instead")
    p.add_argument("--size", type=int, nargs=2, default=(6144, 8192), metavar=("H", "W"))
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--screenshot", type=Path, default=None, help="render to this PNG and exit")
    p.add_argument("--window", type=int, nargs=2, default=(1600, 1000), metavar=("W", "H"),
                   help="window size in pixels (e.g. 1366 768 for a laptop screen)")  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from histoscope._widgets.demo import show_slide

    slide_path = args.slide
    if slide_path is None:
        from tqdm import tqdm

        from histoscope.synthetic import generate

        args.out.mkdir(parents=True, exist_ok=True)
        with tqdm(desc="synthetic H&E slide", unit="tile") as bar:

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            sample = generate(
                args.out, kind="he", size=tuple(args.size), seed=args.seed, progress=progress
            )
        slide_path = sample.slide
    show_slide(slide_path, screenshot=args.screenshot, window=tuple(args.window))
    return 0
