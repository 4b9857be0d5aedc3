"""Several tasks on one slide, their outputs written to a folder: what ``analyze`` and ``cohort`` run.

:func:`analyze_slide` opens one session for the slide, runs each task
through the registry (so the tissue mask, tile grids and feature tables are
computed once and shared) and saves every Result into the output folder.
It knows nothing of the command line: the CLI and the cohort runner build its
arguments and call it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histoscope.params import ParamError

if TYPE_CHECKING:
    from histoscope.engine import EngineParams
    from histoscope.progress import ProgressFn


def check_tasks(tasks: Sequence[str]) -> list[str]:
    """``tasks`` as registry names, in order, each once.

    Raises
    ------
    ParamError
        An empty list or an unknown name (the message lists the known ones).
    """
    from histoscope import tasks as registry

    names = list(dict.fromkeys(t.strip() for t in tasks if t.strip()))
    known = registry.available()
    unknown = [t for t in names if t not in known]
    if unknown or not names:
        raise ParamError(f"unknown task(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(known)}")  # fmt: skip
    return names


def analyze_slide(
    slide: str | os.PathLike,
    out: str | os.PathLike,
    tasks: Sequence[str],
    *,
    mpp: float | None = None,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    checkpoints: Mapping[str, str | None] | None = None,
    region: tuple[int, int, int, int] | None = None,
    near: tuple[float, float] | None = None,
    engine: EngineParams | None = None,
    session_dir: str | os.PathLike | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Run ``tasks`` on one slide and write their outputs into ``out``.

    Parameters
    ----------
    slide
        Slide file, OME-Zarr folder or image.
    out
        Output folder (created).
    tasks
        Registry names, run in this order.
    mpp
        µm/px for images that carry none.
    params
        ``task -> {field: value}`` (checked against each task's Params).
    checkpoints
        ``task -> checkpoint path`` (default: each task's embedded one).
    region
        Level-0 ``(x, y, w, h)`` for the tasks that take one (others run on the slide).
    near
        Level-0 ``(x, y)``: the point tasks like ``gradcam`` need.
    engine
        Batch size, threads and device of the tile engine.
    session_dir
        Keep the session (feature tables) there; ``None`` keeps it in memory.
    progress
        ``progress(step)`` for every step of every task.

    Returns
    -------
    dict
        ``{"slide", "tasks": {task: summary}, "files": [...], "computed": {...}}``
        (also written to ``out/analyze.json``) plus ``"paths"``, the files written.
    """
    from histoscope import tasks as registry
    from histoscope.atomic import atomic_write_text
    from histoscope.results import plain
    from histoscope.session import open_session

    names = check_tasks(tasks)
    params, checkpoints = dict(params or {}), dict(checkpoints or {})
    stray = sorted((set(params) | {k for k, v in checkpoints.items() if v}) - set(names))
    if stray:
        raise ParamError(f"options given for task(s) {', '.join(stray)} not among --tasks "
                         f"({', '.join(names)})")  # fmt: skip
    specs = {n: registry.get(n) for n in names}
    if region is not None and not any(sp.region for sp in specs.values()):
        takers = [n for n in registry.available() if registry.get(n).region]
        raise ParamError(f"a region applies to {', '.join(takers)}; none of the tasks "
                         f"({', '.join(names)}) takes one")  # fmt: skip
    made = {n: specs[n].make_params(params.get(n, {})) for n in names}  # refuse bad values first
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    summaries: dict[str, Any] = {}
    kw: dict[str, Any] = {"in_memory": True} if session_dir is None else {"folder": session_dir}
    with open_session(slide, mpp=mpp, **kw) as session:
        for n in names:
            result = registry.run(n, session, checkpoints.get(n), params=made[n], progress=progress,
                                  region=region if specs[n].region else None, near=near,
                                  engine=engine)  # fmt: skip
            files += result.save(out)
            summaries[n] = result.summary()
        computed = dict(session.computed)
        session.save_manifest()
    doc = {"slide": str(slide), "tasks": plain(summaries), "computed": computed,
           "files": sorted(str(p.relative_to(out)) for p in files)}  # fmt: skip
    files.append(atomic_write_text(out / "analyze.json", json.dumps(doc, indent=2) + "\n"))
    doc["paths"] = files
    return doc
