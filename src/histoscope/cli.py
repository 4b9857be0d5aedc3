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
    "features": "histoscope._cli_features",
    "synth": "histoscope.synthetic.cli",
    "train": "histoscope._cli_train",
    "evaluate": "histoscope._cli_evaluate",
    "cohort": "histoscope._cli_cohort",
}


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``prog: error: ...``) and exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="histoscope", description="Whole-slide pathology analysis, headless.")
    parser.add_argument("--version", action="version", version=f"histoscope {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error")  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``histoscope`` script."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"histoscope {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(f"histoscope {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _one_line(exc: BaseException) -> str:
    """The error as one line; errors that are not HistoScope's own also name their type."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, HistoScopeError | OSError | ValueError):
        return text
    return f"{type(exc).__name__}: {text} (run with --debug for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
