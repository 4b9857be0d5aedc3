"""``histoscope synth OUT_DIR``: a synthetic dataset with splits and ground truth."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``synth`` command."""
    p = sub.add_parser(
        "synth",
        help="generate synthetic H&E / IHC slides with ground truth and train/val/test splits",
    )
    p.add_argument("out_dir", help="dataset folder (created)")
    p.add_argument("--kind", choices=("he", "ihc"), default="he")
    p.add_argument("--size", nargs=2, type=int, metavar=("H", "W"), default=(4096, 4096),
                   help="level-0 height and width in pixels")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="first slide seed")
    p.add_argument("--count", type=int, default=1, help="number of slides")
    p.add_argument("--mpp", type=float, default=0.5, help="µm per level-0 pixel")
    p.add_argument("--extras", action="store_true",
                   help="also write 2 µm expression, NuClass patches and a report per slide")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the dataset and print where its manifest is."""
    from histoscope.synthetic._dataset import write_dataset

    def progress(done: int, total: int, name: str) -> None:
        if not args.quiet:
            print(f"[{done}/{total}] {name}", file=sys.stderr, flush=True)

    try:
        manifest = write_dataset(
            args.out_dir,
            kind=args.kind,
            size=tuple(args.size),
            seed=args.seed,
            count=args.count,
            mpp=args.mpp,
            extras=args.extras,
            progress=progress,
        )
    except ValueError as exc:
        print(f"histoscope synth: error: {exc}", file=sys.stderr)
        return 2
    print(manifest)
    return 0
