"""``histoscope evaluate CHECKPOINT --data DATASET --out DIR``: a family's held-out metrics."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="measure a checkpoint on a labelled dataset and write metrics.json"
    )
    p.add_argument("checkpoint", help="a .safetensors checkpoint; its card names the family")
    p.add_argument("--data", required=True, help="dataset folder (e.g. from `histoscope synth`)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--split", default=None,
                   help="which slides of the dataset (family default, usually 'test'; 'all')")  # fmt: skip
    p.add_argument("-O", "--option", action="append", default=[], metavar="KEY=VALUE",
                   help="option of the family's evaluate, e.g. -O stain_norm=true (repeatable)")  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from histoscope.training import apply_overrides, evaluate

    kw = apply_overrides({}, args.option)  # YAML values; keys must be plain names
    nested = [k for k, v in kw.items() if isinstance(v, dict)]
    if nested:
        raise SystemExit(f"histoscope evaluate: -O takes plain names, got {nested}")
    if args.split:
        kw["split"] = args.split
    metrics = evaluate(args.checkpoint, args.data, args.out, **kw)
    print(json.dumps(metrics, indent=2, default=str))
    table = _table(args.checkpoint, metrics)
    if table:
        print(table)
    print(f"wrote {args.out / 'metrics.json'}")
    return 0


def _table(checkpoint: str, metrics: dict) -> str | None:
    """The family's Markdown table of these metrics (as RESULTS.md shows it), if it has one."""
    from histoscope.checkpoints import read_card
    from histoscope.training import family_module

    fn = getattr(family_module(read_card(checkpoint).family), "markdown_table", None)
    return fn(metrics) if callable(fn) else None
