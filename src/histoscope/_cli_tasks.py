"""Command-line options generated from the task registry (shared by ``analyze`` and ``cohort``).

Every field of a task's Params becomes ``--<task>-<field>`` (``--tumour-min-tissue``),
a task with a checkpoint family gets ``--<task>-checkpoint``; ``--help`` lists
each with its help text and what values are allowed. Values arrive as text
and are parsed and checked by :mod:`histoscope.params`, so a bad one is
refused with one line naming the option and what it allows.
"""

from __future__ import annotations

import argparse
from typing import Any

#: Older spellings kept working.
ALIASES = {("ihc", "compartment"): "--compartment", ("isight", "metadata"): "--metadata"}


def flag(task: str, field: str) -> str:
    """``--<task>-<field>`` with dashes."""
    return f"--{task}-{field.replace('_', '-')}"


def dest(task: str, field: str) -> str:
    return f"task__{task}__{field}"


def add_task_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--tasks`` and one option per task field and checkpoint, grouped per task."""
    from histoscope import tasks as registry
    from histoscope.params import _plain

    names = registry.available()
    parser.add_argument("--tasks", default="tissue",
                        help=f"comma-separated, run in this order, from: {', '.join(names)}")  # fmt: skip
    for name in names:
        spec = registry.get(name)
        group = parser.add_argument_group(f"{name}: {spec.title}")
        if spec.family:
            group.add_argument(flag(name, "checkpoint"), dest=dest(name, "checkpoint"),
                               metavar="PATH", default=None,
                               help=f"{spec.family} checkpoint (default: the embedded "
                                    f"{spec.default_checkpoint})")  # fmt: skip
        for info in spec.fields():
            names_ = [flag(name, info.name)]
            alias = ALIASES.get((name, info.name))
            if alias and alias not in names_:
                names_.append(alias)
            default = _plain(info.default)
            if isinstance(default, tuple):
                default = ",".join(str(v) for v in default)
            group.add_argument(*names_, dest=dest(name, info.name), default=None, metavar="VALUE",
                               help=f"{info.help} [{info.allowed()}; default {default}]")  # fmt: skip


def task_options(
    args: argparse.Namespace, tasks: list[str]
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """``(params, checkpoints)`` per task from the parsed options.

    Raises
    ------
    ParamError
        A value not allowed, or an option for a task not in ``tasks``.
    """
    from histoscope import tasks as registry
    from histoscope.params import ParamError, parse_value

    params: dict[str, dict[str, Any]] = {}
    checkpoints: dict[str, str] = {}
    for name in registry.available():
        spec = registry.get(name)
        given = {}
        ckpt = getattr(args, dest(name, "checkpoint"), None)
        for info in spec.fields():
            text = getattr(args, dest(name, info.name), None)
            if text is not None:
                try:
                    given[info.name] = parse_value(info, text)
                except ParamError as exc:
                    why = str(exc).split(": ", 1)[-1]  # the reason, without the field's name
                    raise ParamError(f"{flag(name, info.name)} {text!r}: {why}") from None
        if (given or ckpt) and name not in tasks:
            opts = [flag(name, k) for k in given] + ([flag(name, "checkpoint")] if ckpt else [])
            raise ParamError(f"{', '.join(opts)} given but task {name!r} is not in --tasks "
                             f"({','.join(tasks)})")  # fmt: skip
        if given:
            params[name] = given
        if ckpt:
            checkpoints[name] = ckpt
    return params, checkpoints


def parse_ints(text: str | None, n: int, what: str) -> tuple[int, ...] | None:
    """``"x,y,w,h"`` as ``n`` integers (ParamError naming ``what`` otherwise)."""
    from histoscope.params import ParamError

    if text is None:
        return None
    try:
        values = tuple(int(round(float(v))) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != n:
        raise ParamError(f"{what} {text!r}: must be {n} comma-separated numbers")
    return values


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--batch-size``, ``--read-threads`` of the tile engine."""
    g = parser.add_argument_group("engine")
    g.add_argument("--device", default=None, choices=("cpu", "cuda", "mps"),
                   help="where models run (default: CUDA, then MPS, then CPU)")  # fmt: skip
    g.add_argument("--batch-size", type=int, default=32, help="tiles per forward pass")
    g.add_argument("--read-threads", type=int, default=2, help="tile reader threads")


def engine_params(args: argparse.Namespace):
    """:class:`~histoscope.engine.EngineParams` from :func:`add_engine_options`."""
    from histoscope.engine import EngineParams
    from histoscope.params import ParamError

    if args.batch_size < 1 or args.read_threads < 1:
        raise ParamError(f"--batch-size {args.batch_size} and --read-threads "
                         f"{args.read_threads}: must be at least 1")  # fmt: skip
    return EngineParams(batch_size=args.batch_size, workers=args.read_threads,
                        prefetch=max(4, args.read_threads), device=args.device)  # fmt: skip
