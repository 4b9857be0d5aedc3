"""``histoscope cohort SLIDES... --out DIR [--scheduler ADDRESS]``: analyze many slides."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cohort",
        help="run `analyze` over many slides on dask.distributed (one slide per task)",
    )
    p.add_argument("slides", nargs="+", help="slide files, OME-Zarr directories or images")
    p.add_argument(
        "--out", type=Path, required=True, help="output folder (one subfolder per slide)"
    )
    p.add_argument("--tasks", default="tissue", help="comma-separated analyze tasks")
    p.add_argument("--mpp", type=float, default=None, help="µm/px for images that carry none")
    p.add_argument("--scheduler", default=None,
                   help="address of a running dask scheduler (default: a LocalCluster on 127.0.0.1)")  # fmt: skip
    p.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes")
    p.add_argument("-a", "--analyze-option", action="append", default=[], metavar="OPTION",
                   help="extra option for analyze, e.g. -a=--compartment=membrane (repeatable)")  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from functools import partial

    from histoscope.cohort import _analyze_args, analyze_slide, run_cohort

    options = tuple(args.analyze_option)
    try:  # refuse bad tasks/options here, before any worker starts
        _analyze_args(args.slides[0], args.out, args.tasks, args.mpp, options)
    except ValueError as exc:
        print(f"histoscope cohort: error: {exc}", file=sys.stderr)
        return 2

    def progress(o, done: int, total: int) -> None:
        extra = f" ({o.error})" if o.error else ""
        print(f"[{done}/{total}] {o.name}: {o.status}{extra}", file=sys.stderr, flush=True)

    work = partial(analyze_slide, tasks=args.tasks, mpp=args.mpp, options=options)
    outcomes = run_cohort(args.slides, args.out, work, scheduler=args.scheduler,
                          n_workers=args.workers, progress=progress)  # fmt: skip
    failed = [o for o in outcomes if o.status == "failed"]
    counts = {s: sum(o.status == s for o in outcomes) for s in ("done", "skipped", "failed")}
    print(
        ", ".join(f"{v} {k}" for k, v in counts.items())
        + f"; summary in {args.out / 'cohort.json'}"
    )
    for o in failed:
        print(f"FAILED {o.slide}: {o.error}")
    return 1 if failed else 0
