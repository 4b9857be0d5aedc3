"""Expert-AI co-assessment: the pathologist's final calls, kept safe and compared.

Every call is appended as one JSON line to ``calls.jsonl`` in the slide's
session folder (:func:`calls_path`; for an image without a writable folder,
a file in the user's cache named by the image's content) and fsynced before
the call returns, so a crash loses nothing that was confirmed. The last call for a (slide, region,
task) wins; earlier ones stay in the file as history. A torn last line (power
cut mid-write) is skipped with a warning when the file is read back.
"""

from __future__ import annotations

import csv
import io
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from histoscope.atomic import append_line
from histoscope.errors import HistoScopeWarning

SESSION_SUFFIX = ".histoscope-calls.jsonl"
#: Columns of the exported call table, in order.
CALL_COLUMNS = ("time", "slide", "region", "task", "call", "model", "model_confidence",
                "measurement", "comment", "user", "checkpoint_sha256")  # fmt: skip


CALLS_FILE = "calls.jsonl"


def session_path(slide_path: str | os.PathLike) -> Path:
    """The calls file older versions kept beside a slide (still read when it exists)."""
    p = Path(slide_path)
    return p.with_name(p.name + SESSION_SUFFIX)


def calls_dir() -> Path:
    """``$HISTOSCOPE_CACHE/calls`` or ``~/.cache/histoscope/calls``."""
    root = os.environ.get("HISTOSCOPE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "histoscope"
    )
    return Path(root) / "calls"


def calls_path(session) -> Path:
    """Where the calls on a :class:`histoscope.session.Session`'s slide are kept.

    ``<session folder>/calls.jsonl``; a file kept beside the slide by an older
    version is used as it is; a session without a folder (an image with no
    file, or a read-only one) keeps its calls in the user's cache under the
    image's content hash, so images of the same name never share one and the
    working directory is never written.
    """
    legacy = session_path(session.slide.path)
    if legacy.is_file():
        return legacy
    if session.folder is not None:
        return session.folder / CALLS_FILE
    return calls_dir() / f"{session.slide.path.name}.{session.fingerprint}.jsonl"


@dataclass(frozen=True)
class Call:
    """One final call by the pathologist for one task.

    ``model`` and ``measurement`` record what the AI and the measurement said
    when the call was made, so agreement can be computed later without them.
    """

    slide: str
    task: str
    call: str
    region: str = "slide"
    model: str | None = None
    model_confidence: float | None = None
    model_probabilities: dict[str, float] = field(default_factory=dict)
    measurement: str | None = None
    comment: str = ""
    user: str = ""
    time: str = ""
    checkpoint_sha256: str = ""

    def __post_init__(self) -> None:
        if not self.task or not self.call:
            raise ValueError("a call needs a task and a value (no call is made by default)")
        if not self.time:
            object.__setattr__(
                self, "time", datetime.now(timezone.utc).isoformat(timespec="seconds")
            )


class Session:
    """Append-only record of calls for one or more slides."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.calls: list[Call] = list(read_calls(self.path)) if self.path.exists() else []

    @classmethod
    def for_slide(cls, slide_path: str | os.PathLike) -> Session:
        """The calls kept beside a slide file (older layout)."""
        return cls(session_path(slide_path))

    @classmethod
    def for_session(cls, session) -> Session:
        """The calls of a :class:`histoscope.session.Session`'s slide (see :func:`calls_path`)."""
        return cls(calls_path(session))

    def record(self, call: Call) -> Call:
        """Append ``call`` to the file (flushed and fsynced) and to memory."""
        append_line(self.path, json.dumps(asdict(call), ensure_ascii=False))
        self.calls.append(call)
        return call

    def latest(self) -> dict[tuple[str, str, str], Call]:
        """The last call per ``(slide, region, task)``."""
        out: dict[tuple[str, str, str], Call] = {}
        for c in self.calls:
            out[(c.slide, c.region, c.task)] = c
        return out

    def agreement(self) -> dict[str, dict[str, Any]]:
        """Per task: pathologist vs model and vs measurement (n, accuracy, Cohen's kappa)."""
        by_task: dict[str, list[Call]] = {}
        for c in self.latest().values():
            by_task.setdefault(c.task, []).append(c)
        out = {}
        for task, calls in sorted(by_task.items()):
            row: dict[str, Any] = {"n": len(calls)}
            for other in ("model", "measurement"):
                pairs = [(c.call, getattr(c, other)) for c in calls if getattr(c, other)]
                row[other] = agreement_stats([a for a, _ in pairs], [b for _, b in pairs])
            out[task] = row
        return out

    def disagreements(self) -> list[Call]:
        """Latest calls where the pathologist differs from the model or the measurement."""
        return [
            c for c in self.latest().values()
            if (c.model and c.model != c.call) or (c.measurement and c.measurement != c.call)
        ]  # fmt: skip

    def to_csv(self) -> str:
        """The latest calls as CSV (opens in Excel)."""
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=CALL_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for c in self.latest().values():
            w.writerow(asdict(c))
        return buf.getvalue()

    def export(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """Write ``calls.csv``, ``calls.json`` (latest calls + agreement) atomically."""
        from histoscope.export import atomic_write_text

        out = Path(out_dir)
        doc = {"calls": [asdict(c) for c in self.latest().values()], "agreement": self.agreement(),
               "disagreements": [asdict(c) for c in self.disagreements()]}  # fmt: skip
        return {
            "csv": atomic_write_text(out / "calls.csv", self.to_csv()),
            "json": atomic_write_text(out / "calls.json", json.dumps(doc, indent=2) + "\n"),
        }


def read_calls(path: Path) -> Iterable[Call]:
    """Calls from a session file; a torn or foreign line is skipped with one warning."""
    bad = 0
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                yield Call(**json.loads(line))
            except (ValueError, TypeError):
                bad += 1
    if bad:
        warnings.warn(
            f"{path}: skipped {bad} unreadable line(s) (a write interrupted by a crash?)",
            HistoScopeWarning,
            stacklevel=2,
        )


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> float | None:
    """Cohen's kappa of two raters over the same items (``None`` if undefined)."""
    if len(a) != len(b):
        raise ValueError(f"raters rated different numbers of items: {len(a)} vs {len(b)}")
    n = len(a)
    if n == 0:
        return None
    labels = sorted(set(a) | set(b))
    po = sum(x == y for x, y in zip(a, b, strict=True)) / n
    pe = sum((a.count(k) / n) * (b.count(k) / n) for k in labels)
    if pe >= 1.0:
        return 1.0 if po == 1.0 else None
    return (po - pe) / (1 - pe)


def agreement_stats(a: Sequence[str], b: Sequence[str]) -> dict[str, Any]:
    """``n``, ``accuracy`` and ``kappa`` of two label lists."""
    n = len(a)
    acc = sum(x == y for x, y in zip(a, b, strict=True)) / n if n else None
    return {"n": n, "accuracy": acc, "kappa": cohen_kappa(a, b)}
