"""Command line: ``histoscope <command> ...``.

Each command lives in its own module and registers itself with
``add_parser(subparsers)``; this file only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from histoscope import __version__
from histoscope.errors import HistoScopeError

#: ``command name -> module`` providing ``add_parser(subparsers)``; each
#: parser sets ``func(args) -> int`` as its default.
COMMANDS = {
    "info": "histoscope._cli_info",
    "demo": "histoscope._cli_demo",
    "analyze": "histoscope._cli_analyze",
    "synth": "histoscope.synthetic.cli",
    "train": "histoscope._cli_train",
    "evaluate": "histoscope._cli_evaluate",
    "cohort": "histoscope._cli_cohort",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="histoscope", description="Whole-slide pathology analysis, headless."
    )
    parser.add_argument("--version", action="version", version=f"histoscope {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``histoscope`` script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except HistoScopeError as exc:
        print(f"histoscope {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"histoscope {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
