"""The one worker every dock widget runs tasks with.

:func:`task_work` is the generator a napari ``thread_worker`` drives: it runs
one or more registry tasks in turn through :func:`histoscope.tasks.iter_run`
(so checkpoints load, with their family checked, off the GUI thread), passes
each :class:`~histoscope.progress.Step` up for the progress bar, and when the
cancel event is set asks the running task to stop: the task returns what it
finished (``result.cancelled``) and the tasks after it are skipped. A job with
``layers=True`` also has its result's layer data built in the worker
(:meth:`Outcome.layers`), so the GUI thread only adds the layers.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Job:
    """One registry task to run: name, target (session or slide), checkpoint and options."""

    name: str
    target: Any
    checkpoint: str | None = None
    params: Any = None
    region: tuple[int, int, int, int] | None = None
    near: tuple[float, float] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    #: Build the result's ``to_layers()`` in the worker thread too.
    layers: bool = False


@dataclass
class Outcome:
    """What a worker run ended with: the results in job order, and whether it was cancelled."""

    results: list[Any]
    cancelled: bool = False
    #: Layer data built in the worker, by job name (jobs run with ``layers=True``).
    built: dict[str, list] = field(default_factory=dict)

    def get(self, name: str) -> Any:
        """The result of the job named ``name``, or ``None``."""
        return next((r for n, r in self.results if n == name), None)

    def layers(self, name: str) -> list:
        """The layer data of job ``name``'s result: built in the worker when it asked for
        that, else built now (``[]`` when the job has no result)."""
        if name in self.built:
            return self.built[name]
        result = self.get(name)
        return [] if result is None else result.to_layers()


def task_work(jobs: list[Job], cancel: threading.Event):
    """Run ``jobs`` in turn; yields Steps, returns an :class:`Outcome`."""
    from histoscope.progress import Cancelled, tagged
    from histoscope.tasks import iter_run

    results: list[tuple[str, Any]] = []
    built: dict[str, list] = {}
    for job in jobs:
        if cancel.is_set():
            break
        gen = iter_run(job.name, job.target, job.checkpoint, params=job.params,
                       region=job.region, near=job.near, **job.options)  # fmt: skip
        try:
            results.append((job.name, (yield from tagged(gen, job.name, cancel=cancel))))
        except Cancelled:
            break
        if job.layers and results[-1][1] is not None:
            built[job.name] = results[-1][1].to_layers()  # here, not on the GUI thread
    cut = len(results) < len(jobs) or any(getattr(r, "cancelled", False) for _, r in results)
    return Outcome(results, cancelled=cut, built=built)
