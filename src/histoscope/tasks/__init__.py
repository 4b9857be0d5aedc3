"""Analyses, one registry: ``hs.tasks.available()``, ``hs.tasks.run(name, slide_or_session)``.

Every analysis registers a :class:`TaskSpec` (see :mod:`histoscope.tasks._registry`);
the widgets, ``histoscope analyze``, ``histoscope cohort`` and scripts all run
tasks through :func:`run` (or :func:`iter_run` in a worker thread), which
loads the checkpoint with its family checked and returns a
:class:`~histoscope.results.Result`.
"""

from histoscope.tasks._registry import (
    TaskSpec,
    available,
    get,
    iter_run,
    register,
    resolve_checkpoint,
    run,
)

__all__ = ["TaskSpec", "available", "get", "iter_run", "register", "resolve_checkpoint", "run"]
