"""``histoscope cohort SLIDES... --out DIR [--scheduler ADDRESS]``: analyze many slides."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from histoscope._cli_tasks import add_engine_options, add_task_options, engine_params, task_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cohort",
        help="run tasks over many slides on dask.distributed (one slide per task)",
        description="Run the same tasks, with the same options as `analyze`, on every slide.",
    )
    p.add_argument("slides", nargs="+", help="slide files, OME-Zarr directories or images")
    p.add_argument(
        "--out", type=Path, required=True, help="output folder (one subfolder per slide)"
    )
    p.add_argument("--mpp", type=float, default=None, help="µm/px for images that carry none")
    p.add_argument("--scheduler", default=None,
                   help="address of a running dask scheduler (default: a LocalCluster on 127.0.0.1)")  # fmt: skip
    p.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes")
    add_task_options(p)
    add_engine_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from functools import partial

    from histoscope.analyze import check_tasks
    from histoscope.cohort import run_cohort

    # refuse bad tasks and options here, before any worker starts
    tasks = check_tasks(args.tasks.split(","))
    params, checkpoints = task_options(args, tasks)
    _check_up_front(args, tasks, params, checkpoints)
    engine = engine_params(args)

    def progress(o, done: int, total: int) -> None:
        extra = f" ({o.error})" if o.error else ""
        print(f"[{done}/{total}] {o.name}: {o.status}{extra}", file=sys.stderr, flush=True)

    work = partial(_quiet_work, tasks=tasks, mpp=args.mpp, params=params,
                   checkpoints=checkpoints, engine=engine)  # fmt: skip
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


def _quiet_work(*args, **kwargs):
    """``histoscope.cohort.analyze_work`` without the outside-training-data warning lines.

    Each slide's flag is kept in its ``analyze.json`` and in ``cohort.json``; a
    raw Python warning in the middle of the progress lines says nothing more.
    """
    import warnings

    from histoscope.cohort import analyze_work
    from histoscope.ood import OutsideTrainingDataWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OutsideTrainingDataWarning)
        return analyze_work(*args, **kwargs)


def _check_up_front(args, tasks, params, checkpoints) -> None:
    """Refuse what would fail every slide: parameters, µm/px, checkpoints, missing slides."""
    from histoscope import tasks as registry
    from histoscope.checkpoints import read_card
    from histoscope.errors import CheckpointError, SlideError
    from histoscope.params import ParamError

    if args.mpp is not None and not args.mpp > 0:
        raise ParamError(f"--mpp {args.mpp}: must be a positive number of µm per pixel")
    missing = [s for s in args.slides if not Path(s).exists()]
    if missing:
        raise SlideError(f"no such slide(s): {', '.join(missing)}")
    for name in tasks:
        spec = registry.get(name)
        spec.make_params(params.get(name, {}))
        path = registry.resolve_checkpoint(spec, checkpoints.get(name))
        if path is not None:
            card = read_card(path)
            if card.family != spec.family:
                raise CheckpointError(f"{path}: checkpoint for family {card.family!r}, "
                                      f"expected {spec.family!r} for task {name!r}")  # fmt: skip
