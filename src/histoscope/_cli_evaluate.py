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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from histoscope.training import evaluate

    kw = {"split": args.split} if args.split else {}
    metrics = evaluate(args.checkpoint, args.data, args.out, **kw)
    print(json.dumps(metrics, indent=2, default=str))
    print(f"wrote {args.out / 'metrics.json'}")
    return 0
