"""``histoscope train RECIPE.yaml [-o key.sub=value ...]``: run a training recipe."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model family from a YAML recipe")
    p.add_argument("recipe", help="recipe file (see training/*.yaml)")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="set a recipe key, e.g. -o train.epochs=3 (repeatable)")  # fmt: skip
    p.add_argument("--no-resume", action="store_true",
                   help="start over even if the output folder holds a saved state")  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from histoscope.training import run as run_recipe

    result = run_recipe(args.recipe, args.override, resume=not args.no_resume)
    print(json.dumps({"checkpoint": result["checkpoint"], "metrics": result["metrics"]},
                     indent=2, default=str))  # fmt: skip
    return 0
