"""``histoscope analyze SLIDE --tasks ... --out DIR``: run analyses headless."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

from histoscope._cli_tasks import (
    add_engine_options,
    add_task_options,
    engine_params,
    parse_ints,
    task_options,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="run analyses on one slide and write their outputs",
                       description="Run tasks from the registry on one slide; each task's "
                                   "options are listed under its name.")  # fmt: skip
    p.add_argument("slide", help="slide file, OME-Zarr directory or image")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--mpp", type=float, default=None,
                   help="µm/px for images that carry none (overrides a slide's own, with a note)")  # fmt: skip
    p.add_argument("--region", default=None, metavar="X,Y,W,H",
                   help="level-0 region for the tasks that take one (ihc, isight)")  # fmt: skip
    p.add_argument("--near", default=None, metavar="X,Y",
                   help="level-0 point: tiles nearest it first; the tile gradcam explains")  # fmt: skip
    p.add_argument("--session-dir", type=Path, default=None,
                   help="keep the slide's session (feature tables) here and reuse it on reruns")  # fmt: skip
    add_task_options(p)
    add_engine_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from histoscope.analyze import analyze_slide, check_tasks
    from histoscope.ood import OutsideTrainingDataWarning
    from histoscope.progress import tqdm_progress

    tasks = check_tasks(args.tasks.split(","))
    params, checkpoints = task_options(args, tasks)
    region = parse_ints(args.region, 4, "--region")
    near = parse_ints(args.near, 2, "--near")
    if args.mpp is not None and not args.mpp > 0:
        from histoscope.params import ParamError

        raise ParamError(f"--mpp {args.mpp}: must be a positive number of µm per pixel")
    if args.mpp is not None:
        _note_mpp_override(args.slide, args.mpp)
    progress, close = tqdm_progress()
    try:
        with warnings.catch_warnings():  # the flag is printed below, once, as a plain line
            warnings.simplefilter("ignore", OutsideTrainingDataWarning)
            doc = analyze_slide(args.slide, args.out, tasks, mpp=args.mpp, params=params,
                                checkpoints=checkpoints, region=region, near=near,
                                engine=engine_params(args), session_dir=args.session_dir,
                                progress=progress)  # fmt: skip
    finally:
        close()
    for name, summary in doc["tasks"].items():
        brief = {k: v for k, v in summary.items()
                 if k not in ("top_tiles", "percent_by_score", "ood")}  # fmt: skip
        print(f"{name}: {json.dumps(brief)}")
        _print_training_data(name, summary)
    for path in doc["paths"]:
        print(f"wrote {path}")
    return 0


def _note_mpp_override(slide: str, mpp: float) -> None:
    """Say on stderr when --mpp replaces the µm/px the slide itself records."""
    import sys

    from histoscope.errors import SlideError
    from histoscope.slide import open_slide

    try:
        with open_slide(slide) as s:
            own = s.mpp
    except SlideError:
        return  # reported properly when the analysis opens it
    if own and abs(own - mpp) > 1e-6 * own:
        print(f"histoscope analyze: note: {slide} records {own:g} µm/px; using --mpp {mpp:g}",
              file=sys.stderr)  # fmt: skip


def _print_training_data(name: str, summary: dict) -> None:
    """One plain line on whether the slide is outside the model's training data (issue 11)."""
    ood = summary.get("ood")
    if not isinstance(ood, dict):
        return
    flag = summary.get("outside_training_data")
    head = {True: "OUTSIDE TRAINING DATA: treat calls as unreliable",
            False: "within training data"}.get(flag, ood.get("message", ""))  # fmt: skip
    if ood.get("score") is not None and ood.get("threshold") is not None:
        head += f" (distance {ood['score']:.3g} vs threshold {ood['threshold']:.3g})"
    print(f"{name}: {head}")
