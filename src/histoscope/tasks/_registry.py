"""The task registry: one way to run any analysis.

Each analysis module defines a :class:`TaskSpec` and registers it. The spec
says which checkpoint family it loads (and its embedded default), its frozen
Params dataclass (whose field metadata gives the CLI flags and the widget
controls), what it needs upstream, and its ``run`` generator::

    run(session, checkpoint, params, *, region=None, near=None, engine=None)
        -> Generator[Step, bool | None, Result]

``checkpoint`` is ``(model, card)``, loaded and family-checked by the
registry (``None`` for tasks without one). Sending ``False`` into the
generator asks it to stop and return what it has (``result.cancelled``).
:func:`run` drives it to the end; :func:`iter_run` is the generator for a
napari ``thread_worker``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histoscope.errors import CheckpointError
from histoscope.params import ParamError, build, describe
from histoscope.progress import Cancel, Cancelled, ProgressFn, Step, drive

if TYPE_CHECKING:
    from histoscope.engine import EngineParams
    from histoscope.results import Result
    from histoscope.session import Session
    from histoscope.slide import Slide

Region = tuple[int, int, int, int]


@dataclass(frozen=True)
class TaskSpec:
    """What a task is and how to run it.

    Attributes
    ----------
    name
        Registry name (``"tumour"``), also the CLI's ``--tasks`` entry.
    title
        Human title for panels and ``--help``.
    params
        Frozen dataclass of its parameters (fields made with :func:`histoscope.params.param`).
    run
        The generator function (see the module docstring).
    family
        Checkpoint family it loads, or ``None``.
    default_checkpoint
        File name of its embedded default in ``sample_data/`` (or ``None``).
    needs
        Upstream session products it uses (``"tissue"``, ``"features"``, ...).
    region
        Whether it can run on a level-0 ``(x, y, w, h)`` region.
    needs_point
        Whether it needs ``near`` (a level-0 point, e.g. the clicked tile).
    """

    name: str
    title: str
    params: type
    run: Callable[..., Generator[Step, bool | None, Result]]
    family: str | None = None
    default_checkpoint: str | None = None
    needs: tuple[str, ...] = ()
    region: bool = False
    needs_point: bool = False

    def make_params(self, values: Mapping[str, Any] | None = None, **kw: Any) -> Any:
        """A checked Params instance from keyword values (unknown names refused)."""
        return build(self.params, {**(values or {}), **kw}, self.name)

    def fields(self):
        """:func:`histoscope.params.describe` of its Params."""
        return describe(self.params)

    def default_checkpoint_path(self) -> Path | None:
        """The embedded default checkpoint, if it ships."""
        if not self.default_checkpoint:
            return None
        from histoscope._data import sample_data_path

        return sample_data_path(self.default_checkpoint)


#: name -> spec, or the module that registers it (imported on first use).
_TASKS: dict[str, TaskSpec | str] = {
    "tissue": "histoscope.tasks.tissue",
    "tumour": "histoscope.tasks.tumour",
    "gradcam": "histoscope.tasks.tumour",
    "mil": "histoscope.tasks.mil",
    "ihc": "histoscope.tasks.ihc_measure",
    "isight": "histoscope.tasks.isight",
    "report": "histoscope.tasks.report",
    "cells": "histoscope.tasks.cells",
    "expression": "histoscope.tasks.expression",
}


def register(spec: TaskSpec) -> TaskSpec:
    """Add (or replace) a task; returns ``spec`` so a module can keep it."""
    _TASKS[spec.name] = spec
    return spec


def available() -> list[str]:
    """Registered task names, in the order ``analyze`` runs them."""
    return list(_TASKS)


def get(name: str) -> TaskSpec:
    """The spec of ``name``.

    Raises
    ------
    ParamError
        If no such task is registered (the message lists the known ones).
    """
    entry = _TASKS.get(name)
    if entry is None:
        raise ParamError(f"unknown task {name!r}; choose from {', '.join(available())}")
    if isinstance(entry, str):
        importlib.import_module(entry)
        entry = _TASKS[name]
        if isinstance(entry, str):  # pragma: no cover - a module that forgot to register
            raise RuntimeError(f"{entry} did not register task {name!r}")
    return entry


def _session(target: Slide | Session | str | os.PathLike) -> Session:
    from histoscope.session import Session, open_session

    if isinstance(target, Session):
        return target
    return open_session(target, in_memory=True)


def resolve_checkpoint(spec: TaskSpec, checkpoint: str | os.PathLike | None) -> Path | None:
    """The checkpoint file a run uses: the given one, else the embedded default.

    Raises
    ------
    CheckpointError
        If the task needs one and none is given or embedded.
    """
    if spec.family is None:
        if checkpoint is not None:
            raise ParamError(f"{spec.name}: takes no checkpoint (got {checkpoint})")
        return None
    if checkpoint is not None and str(checkpoint).strip():
        return Path(checkpoint)
    path = spec.default_checkpoint_path()
    if path is None:
        raise CheckpointError(f"{spec.name}: no checkpoint given and no embedded default "
                              f"({spec.default_checkpoint}); pass a {spec.family} checkpoint")  # fmt: skip
    return path


def clip_region(region: Region, slide) -> Region:
    """``region`` clipped to the slide; ParamError when it has no area or lies outside."""
    x, y, w, h = (int(v) for v in region)
    h0, w0 = slide.shape
    if w <= 0 or h <= 0:
        raise ParamError(f"region {tuple(region)}: width and height must be positive")
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, w0), min(y + h, h0)
    if x1 <= x0 or y1 <= y0:
        raise ParamError(f"region {tuple(region)} (x, y, w, h in level-0 px) lies outside the "
                         f"slide ({w0} x {h0} px)")  # fmt: skip
    return x0, y0, x1 - x0, y1 - y0


def iter_run(
    name: str,
    target: Slide | Session | str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    *,
    region: Region | None = None,
    near: tuple[float, float] | None = None,
    engine: EngineParams | None = None,
    params: Any = None,
    **values: Any,
) -> Generator[Step, bool | None, Result]:
    """:func:`run` as a generator: yields :class:`Step` s, returns the Result.

    The checkpoint is loaded (and its family checked) inside the generator,
    so a worker thread does it, never the GUI thread.
    """
    spec = get(name)
    if params is not None and values:
        raise ParamError(f"{name}: give params= or keyword parameters, not both")
    p = params if params is not None else spec.make_params(values)
    if not isinstance(p, spec.params):
        raise ParamError(f"{name}: params must be a {spec.params.__name__}, not {type(p).__name__}")
    if region is not None and not spec.region:
        raise ParamError(f"{name}: runs on the whole slide; it takes no region")
    if near is None and spec.needs_point:
        raise ParamError(f"{name}: needs a point (near=(x, y) in level-0 pixels; CLI: --near X,Y)")
    session = _session(target)
    if region is not None:
        region = clip_region(region, session.slide)
    if near is not None and spec.needs_point:
        h0, w0 = session.slide.shape
        if not (0 <= near[0] < w0 and 0 <= near[1] < h0):
            raise ParamError(f"{name}: point {tuple(near)} is outside the slide ({w0} x {h0} px)")
    ckpt = None
    path = resolve_checkpoint(spec, checkpoint)
    if path is not None:
        if (yield Step(0, 0, f"loading {path.name}")) is False:  # say what the wait is for
            raise Cancelled(f"{name}: stopped before it started")
        ckpt = session.model(path, spec.family)
    try:
        result = yield from spec.run(session, ckpt, p, region=region, near=near, engine=engine)
    except CheckpointError as exc:  # e.g. a card naming what cannot be rebuilt: name the file
        if path is None or str(path) in str(exc):
            raise
        raise CheckpointError(f"{path}: {exc}") from exc
    session.results[name] = result
    return result


def run(
    name: str,
    target: Slide | Session | str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    *,
    progress: ProgressFn | None = None,
    cancel: Cancel | None = None,
    region: Region | None = None,
    near: tuple[float, float] | None = None,
    engine: EngineParams | None = None,
    params: Any = None,
    **values: Any,
) -> Result:
    """Run task ``name`` on a slide or session and return its Result.

    Parameters
    ----------
    name
        A name from :func:`available`.
    target
        A :class:`~histoscope.session.Session` (products reused), an open
        slide or a path (wrapped in an in-memory session).
    checkpoint
        Checkpoint file; default: the task's embedded one. Its family is checked.
    progress
        ``progress(step)`` per :class:`~histoscope.progress.Step`; returning
        ``False`` stops the run (the Result holds what was done).
    cancel
        A :class:`threading.Event` (or callable) that stops the run when set.
    region
        Level-0 ``(x, y, w, h)`` for tasks that take one.
    near
        Level-0 ``(x, y)``: work nearest to it first (or the point a task needs).
    engine
        :class:`~histoscope.engine.EngineParams` (batch size, threads, device).
    params, **values
        A Params instance, or its fields by name (checked; unknown names refused).

    Raises
    ------
    ParamError
        Unknown task or parameter, or a value out of range.
    CheckpointError
        A checkpoint that is missing, unreadable or of another family.
    SlideError
        A slide that cannot be read.
    """
    gen = iter_run(name, target, checkpoint, region=region, near=near, engine=engine,
                   params=params, **values)  # fmt: skip
    return drive(gen, progress, cancel, what=name)
