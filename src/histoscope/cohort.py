"""Cohorts on ``dask.distributed``: one slide per task, atomic per-slide outputs.

Each slide's outputs are written into ``OUT/.partial/<name>.<random>/`` and,
once complete (``done.json`` written last), renamed to ``OUT/<name>/`` in one
step, so a killed worker or an interrupted run never leaves a half result
under a slide's name. A rerun skips every slide whose ``OUT/<name>/done.json``
exists. A slide that raises, or whose worker dies more often than the
scheduler allows (``distributed.scheduler.allowed-failures``), is reported as
failed at the end while the other slides carry on. The summary of a run is
``OUT/cohort.json``.

By default a :class:`distributed.LocalCluster` on loopback runs the slides;
``scheduler`` connects to an existing cluster instead (its workers need
HistoScope installed and the slides and ``OUT`` on a shared path).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

DONE = "done.json"
PARTIAL = ".partial"
SUMMARY = "cohort.json"

#: ``work(slide_path, out_dir) -> dict | None`` writes one slide's outputs into ``out_dir``.
Work = Callable[[Path, Path], Any]


@dataclass(frozen=True)
class SlideOutcome:
    """What happened to one slide in a cohort run.

    Attributes
    ----------
    name
        Output folder name under ``OUT``.
    slide
        Slide path.
    status
        ``"done"`` (this run), ``"skipped"`` (done before) or ``"failed"``.
    seconds
        Time spent on the slide by the worker (0 if skipped or failed).
    error
        Why it failed (``""`` otherwise).
    """

    name: str
    slide: str
    status: str
    seconds: float = 0.0
    error: str = ""


def slide_names(slides: Iterable[str | os.PathLike]) -> dict[str, Path]:
    """Output folder name per slide: its stem, plus a path hash where stems repeat."""
    paths = [Path(s) for s in slides]
    stems = [p.name.split(".")[0] or p.name for p in paths]
    out: dict[str, Path] = {}
    for p, stem in zip(paths, stems, strict=True):
        name = stem
        if stems.count(stem) > 1:
            name = f"{stem}-{hashlib.sha1(str(p.resolve()).encode()).hexdigest()[:8]}"
        if name in out:  # the same file given twice
            continue
        out[name] = p
    return out


def is_done(out: str | os.PathLike, name: str) -> bool:
    """Whether ``OUT/<name>`` holds a finished slide."""
    return (Path(out) / name / DONE).is_file()


def process_slide(slide: str, out: str, name: str, work: Work) -> dict[str, Any]:
    """Run ``work`` on one slide into a private folder, then publish it as ``OUT/<name>``.

    Runs on a worker. The folder appears under its final name only when
    ``work`` has returned and ``done.json`` is written; on an exception the
    private folder is removed and the exception propagates.

    Returns
    -------
    dict
        The ``done.json`` contents.
    """
    root = Path(out)
    final = root / name
    if (final / DONE).is_file():
        return json.loads((final / DONE).read_text())
    tmp = root / PARTIAL / f"{name}.{uuid.uuid4().hex}"
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    try:
        info = work(Path(slide), tmp) or {}
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        doc = {"slide": str(slide), "name": name, "seconds": round(time.perf_counter() - t0, 3),
               "host": os.uname().nodename, "pid": os.getpid(), "files": files,
               "info": info}  # fmt: skip
        (tmp / DONE).write_text(json.dumps(doc, indent=1, default=str))
        if (final / DONE).is_file():  # another attempt finished first: keep its result
            return json.loads((final / DONE).read_text())
        if final.exists():  # a folder without done.json was never ours to keep
            shutil.rmtree(final)
        os.replace(tmp, final)
        return doc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    tb = traceback.extract_tb(exc.__traceback__)
    if tb:
        text += f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})"
    return text


def run_cohort(
    slides: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    work: Work,
    *,
    scheduler: str | None = None,
    n_workers: int = 2,
    progress: Callable[[SlideOutcome, int, int], Any] | None = None,
) -> list[SlideOutcome]:
    """Run ``work`` on every slide not finished yet, one task per slide.

    Parameters
    ----------
    slides
        Slide paths.
    out
        Output folder; slide ``s`` goes to ``out/<name>`` (see :func:`slide_names`).
    work
        ``work(slide, folder)``; must be picklable (a module-level function or
        a :func:`functools.partial` of one).
    scheduler
        Address of a running ``dask.distributed`` scheduler; ``None`` starts a
        LocalCluster on 127.0.0.1 with ``n_workers`` single-threaded processes.
    n_workers
        Workers of the LocalCluster.
    progress
        ``progress(outcome, done, total)`` as each slide finishes.

    Returns
    -------
    list of SlideOutcome
        In the order of ``slides``; also written to ``out/cohort.json``.
    """
    from distributed import Client, LocalCluster, as_completed

    from histoscope.export import atomic_write_text

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(root / PARTIAL, ignore_errors=True)  # left by killed workers of earlier runs
    names = slide_names(slides)
    outcomes: dict[str, SlideOutcome] = {}
    todo = {}
    for name, path in names.items():
        if is_done(root, name):
            outcomes[name] = SlideOutcome(name, str(path), "skipped")
        else:
            todo[name] = path
    total, count = len(names), len(outcomes)
    if progress is not None:
        for o in list(outcomes.values()):
            progress(o, count, total)
    if todo:
        cluster = None
        if scheduler is None:
            cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                   host="127.0.0.1", dashboard_address=None)  # fmt: skip
        client = Client(scheduler if scheduler is not None else cluster)
        try:
            run_id = uuid.uuid4().hex[:8]
            futures = {
                client.submit(
                    process_slide,
                    str(p),
                    str(root),
                    n,
                    work,
                    pure=False,
                    key=f"histoscope-cohort-{n}-{run_id}",
                ): n  # fmt: skip
                for n, p in todo.items()
            }
            for fut in as_completed(futures):
                name = futures[fut]
                try:
                    doc = fut.result()
                    o = SlideOutcome(name, str(todo[name]), "done", float(doc["seconds"]))
                except Exception as exc:  # a failing slide or a dead worker: report it
                    o = SlideOutcome(name, str(todo[name]), "failed", error=_error_text(exc))
                outcomes[name] = o
                count += 1
                if progress is not None:
                    progress(o, count, total)
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
    ordered = [outcomes[n] for n in names]
    summary = {"out": str(root), "counts": {s: sum(o.status == s for o in ordered)
               for s in ("done", "skipped", "failed")},
               "slides": [asdict(o) for o in ordered]}  # fmt: skip
    atomic_write_text(root / SUMMARY, json.dumps(summary, indent=1) + "\n")
    # every task has ended: what is left in .partial belongs to attempts whose worker died
    shutil.rmtree(root / PARTIAL, ignore_errors=True)
    return ordered


def analyze_work(slide: Path, out: Path, **kwargs: Any) -> dict[str, Any]:
    """The default cohort work: :func:`histoscope.analyze.analyze_slide` into ``out``.

    Returns the per-task summaries (what ``done.json`` records).
    """
    from histoscope.analyze import analyze_slide

    doc = analyze_slide(slide, out, **kwargs)
    return {"tasks": doc["tasks"], "computed": doc["computed"]}
