"""One way to drive long work: generators that yield progress and return a result.

Every long computation in HistoScope (the engine, each task) is a generator
that yields :class:`Step` s (or plain ``(done, total)`` pairs) and returns its
result. Sending ``False`` into it asks it to stop soon and return what it has
(a partial result marked ``cancelled``). :func:`drive` runs such a generator
to the end for scripts, the CLI and tests, with an optional progress callback
and a cancel flag; the widgets' worker helper does the same in a thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator
from typing import Any, NamedTuple


class Step(NamedTuple):
    """One progress report.

    Attributes
    ----------
    done, total
        Units of work finished and in all (tiles, cells, ...).
    what
        What is being counted, e.g. ``"tumour tiles"``.
    partial
        The result so far, for live display (a ``Result``), or ``None``.
    """

    done: int
    total: int
    what: str = ""
    partial: Any = None


Cancel = threading.Event | Callable[[], bool]
ProgressFn = Callable[[Step], "bool | None"]


class Cancelled(Exception):  # noqa: N818 - a state, not an error
    """Work stopped on request before it had anything worth keeping."""


def is_cancelled(cancel: Cancel | None) -> bool:
    """Whether ``cancel`` (an Event or a callable) asks to stop."""
    if cancel is None:
        return False
    return cancel.is_set() if isinstance(cancel, threading.Event) else bool(cancel())


def as_step(value: Any, what: str = "") -> Step:
    """A :class:`Step` from what a generator yielded (a Step or a ``(done, total)`` pair)."""
    if isinstance(value, Step):
        return value
    done, total = value[-2:] if len(value) == 3 else value  # (phase, done, total) too
    return Step(int(done), int(total), what if len(value) != 3 else str(value[0]))


def tagged(
    gen: Generator,
    what: str,
    partial: Callable[[], Any] | None = None,
    cancel: Cancel | None = None,
) -> Generator:
    """Re-yield ``gen``'s progress as :class:`Step` s named ``what``; return its value.

    Values sent in (``False`` to stop) are passed through to ``gen``, and so is
    ``False`` once ``cancel`` is set. ``partial()``, when given, is attached to
    every step for live display.
    """
    reply = None
    while True:
        try:
            value = gen.send(reply)
        except StopIteration as stop:
            return stop.value
        step = as_step(value, what)
        if partial is not None:
            step = step._replace(partial=partial())
        reply = yield step
        if is_cancelled(cancel):
            reply = False


def drive(
    gen: Generator,
    progress: ProgressFn | None = None,
    cancel: Cancel | None = None,
    what: str = "",
) -> Any:
    """Run a progress generator to the end and return its value.

    Parameters
    ----------
    gen
        Yields :class:`Step` s or ``(done, total)``; returns the result. Without
        ``progress`` what it yields is not looked at (any generator runs).
    progress
        Called with each :class:`Step`; returning ``False`` asks to stop.
    cancel
        A :class:`threading.Event` or a callable; when set, ``False`` is sent
        into ``gen`` so it stops and returns what it has.
    what
        Name for bare ``(done, total)`` steps.
    """
    reply: bool | None = None
    while True:
        try:
            value = gen.send(reply)
        except StopIteration as stop:
            return stop.value
        stop_now = progress is not None and progress(as_step(value, what)) is False
        reply = False if stop_now or is_cancelled(cancel) else None


def tqdm_progress(desc: str = "") -> tuple[ProgressFn, Callable[[], None]]:
    """A progress callback drawing one tqdm bar per ``Step.what``, and a function closing them."""
    from tqdm import tqdm

    bars: dict[str, Any] = {}

    def update(step: Step) -> None:
        if step.total == 0:  # a phase without a count (loading, finding tissue): no bar
            return
        key = step.what or desc
        bar = bars.get(key)
        if bar is None:
            bar = bars[key] = tqdm(desc=key, total=step.total, unit="")
        bar.total = step.total
        bar.update(step.done - bar.n)

    def close() -> None:
        for bar in bars.values():
            bar.close()

    return update, close
