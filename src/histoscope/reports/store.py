"""The draft report and the pathologist's edits, kept append-only and crash-safe.

Every generated draft and every edit is appended as one JSON line to
``report_edits.jsonl`` in the slide's session folder (for a session without a
folder, a file in the user's cache named by the image's content) and fsynced
before the call returns, as the co-assessment calls are
(:mod:`histoscope.coassess`). Nothing is ever rewritten: the original draft
stays beside every edit, and the last edit after the last draft is the
pathologist's current text. A torn last line (a crash mid-write) is skipped
with a warning when the file is read back.

Each draft has a unique ``draft_id`` and each edit names the draft it revises
by that id (files written before ids existed are read by position: an edit
revises the draft written before it). A draft's per-tile attention is kept
beside the file (``<store>.<draft_id>.evidence.npz``) so its evidence can be
shown again after a restart.
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from histoscope.errors import HistoScopeError, HistoScopeWarning

EDITS_FILE = "report_edits.jsonl"
MACHINE_GENERATED = ("MACHINE-GENERATED DRAFT: written by a model, not by a pathologist; "
                     "every statement must be checked against the slide.")  # fmt: skip


class ReportError(HistoScopeError, ValueError):
    """A report store cannot be edited or its kept evidence cannot be read.

    The message names the file and the reason.
    """


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Entry:
    """One line of the store: a model's draft (``kind="draft"``) or an edit (``kind="edit"``).

    Attributes
    ----------
    kind
        ``"draft"`` or ``"edit"``.
    text
        The full report text of this version.
    slide
        Slide file name.
    sentences
        (Drafts) per sentence ``{"index", "text", "top_regions": [...]}`` with
        each region in level-0 pixels and µm.
    checkpoint_sha256, trained_on
        (Drafts) the model that wrote it and what it was trained on.
    user
        (Edits) who edited.
    draft_time
        (Edits) the time of the draft this edit revises.
    time
        UTC time of writing.
    draft_id
        (Drafts) the draft's unique id; (edits) the id of the draft revised.
        Empty in files written before ids existed.
    evidence
        (Drafts) file name, beside the store, of the draft's attention
        (:meth:`histoscope.tasks.report.ReportResult.save_evidence`), or ``""``.
    """

    kind: str
    text: str
    slide: str = ""
    sentences: list[dict[str, Any]] = field(default_factory=list)
    checkpoint_sha256: str = ""
    trained_on: str = ""
    user: str = ""
    draft_time: str = ""
    time: str = ""
    draft_id: str = ""
    evidence: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("draft", "edit"):
            raise ValueError(f"entry kind must be 'draft' or 'edit', got {self.kind!r}")
        if not self.time:
            object.__setattr__(self, "time", _now())


def store_path(session) -> Path:
    """``<session folder>/report_edits.jsonl``, or a per-image file in the user's cache."""
    from histoscope.coassess import calls_dir

    if session.folder is not None:
        return session.folder / EDITS_FILE
    return calls_dir().parent / "reports" / f"{session.slide.path.name}.{session.fingerprint}.jsonl"


class ReportStore:
    """Append-only drafts and edits of one slide's report."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.entries: list[Entry] = []
        if self.path.exists():
            for e in read_entries(self.path):
                self.entries.append(self._identified(e))

    def _identified(self, entry: Entry) -> Entry:
        """``entry`` with its draft id (files from before ids: by position in the file)."""
        from dataclasses import replace

        if entry.draft_id:
            return entry
        if entry.kind == "draft":
            n = sum(e.kind == "draft" for e in self.entries)
            return replace(entry, draft_id=f"legacy-{n}")
        before = next((e for e in reversed(self.entries) if e.kind == "draft"), None)
        return replace(entry, draft_id=before.draft_id if before is not None else "")

    @classmethod
    def for_session(cls, session) -> ReportStore:
        """The store of a :class:`histoscope.session.Session`'s slide (see :func:`store_path`)."""
        return cls(store_path(session))

    def append(self, entry: Entry) -> Entry:
        """Write ``entry`` as one line (flushed and fsynced), then keep it in memory."""
        from histoscope.atomic import append_line

        append_line(self.path, json.dumps(asdict(entry), ensure_ascii=False))
        self.entries.append(entry)
        return entry

    def evidence_path(self, draft: Entry) -> Path | None:
        """Where ``draft``'s attention is kept, or ``None`` when it was not kept."""
        return self.path.parent / draft.evidence if draft.evidence else None

    def add_draft(self, result) -> Entry:
        """Keep a :class:`histoscope.tasks.report.ReportResult` as the current draft.

        Its attention is written beside the store first (when the result can
        write it), so the draft line never names a file that is not there.
        """
        s = result.summary()
        draft_id = uuid.uuid4().hex
        evidence = ""
        if hasattr(result, "save_evidence"):
            name = f"{self.path.stem}.{draft_id}.evidence.npz"
            self.path.parent.mkdir(parents=True, exist_ok=True)
            evidence = result.save_evidence(self.path.parent / name).name
        return self.append(Entry(kind="draft", text=result.text,
                                 slide=Path(result.provenance.slide).name,
                                 sentences=s["sentences"],
                                 checkpoint_sha256=result.provenance.checkpoint_sha256,
                                 trained_on=result.trained_on, draft_id=draft_id,
                                 evidence=evidence))  # fmt: skip

    def add_edit(self, text: str, user: str = "") -> Entry:
        """Keep the pathologist's text as an edit of the current draft.

        Raises
        ------
        ReportError
            If there is no draft to edit.
        """
        draft = self.draft()
        if draft is None:
            raise ReportError(f"{self.path}: no draft to edit (generate a report first)")
        return self.append(Entry(kind="edit", text=text, slide=draft.slide, user=user,
                                 draft_time=draft.time, draft_id=draft.draft_id))  # fmt: skip

    def draft(self) -> Entry | None:
        """The latest draft."""
        return next((e for e in reversed(self.entries) if e.kind == "draft"), None)

    def edits(self) -> list[Entry]:
        """Edits of the latest draft, oldest first."""
        d = self.draft()
        if d is None:
            return []
        return [e for e in self.entries if e.kind == "edit" and e.draft_id == d.draft_id]

    def current(self) -> Entry | None:
        """The pathologist's latest text, else the draft."""
        ed = self.edits()
        return ed[-1] if ed else self.draft()

    def to_dict(self) -> dict[str, Any]:
        """Both versions with the evidence coordinates, as plain data."""
        d = self.draft()
        cur = self.current()
        return {"machine_generated": MACHINE_GENERATED,
                "draft": asdict(d) if d else None,
                "edited": asdict(cur) if cur is not None and cur.kind == "edit" else None,
                "n_edits": len(self.edits()),
                "evidence_note": evidence_note(d) if d else ""}  # fmt: skip

    def to_markdown(self) -> str:
        """Both versions and the evidence of each draft sentence as Markdown."""
        d = self.draft()
        if d is None:
            return "# Report\n\nNo draft yet.\n"
        cur = self.current()
        lines = [f"# Report: {d.slide}", "", "## Pathologist's version", ""]
        if cur is not None and cur.kind == "edit":
            lines += [cur.text, "", f"_Edited {cur.time}{' by ' + cur.user if cur.user else ''}; "
                      f"revises the draft of {d.time} ({d.draft_id})._"]  # fmt: skip
        else:
            lines += ["_Not edited: the draft below has not been revised._"]
        lines += ["", "## Machine-generated draft", "", f"> **{MACHINE_GENERATED}**",
                  f"> Model trained on: {d.trained_on}", "", d.text, "",
                  "### Evidence per draft sentence (level-0 px; µm)", ""]  # fmt: skip
        if evidence_note(d):
            lines += [f"> **{evidence_note(d)}**", ""]
        for s in d.sentences:
            lines.append(f"{s['index'] + 1}. {s['text']}")
            if s.get("evidence_note"):
                lines.append(f"   - **{s['evidence_note']}**")
            for r in s["top_regions"]:
                lines.append(f"   - x={r['x']} y={r['y']} w={r['width']:.0f} px; "
                             f"x={r['x_um']:.1f} y={r['y_um']:.1f} w={r['width_um']:.1f} µm; "
                             f"attention {r['attention']:.3f}")  # fmt: skip
        return "\n".join(lines) + "\n"

    def export(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """Write ``report_final.md`` and ``report_final.json`` (both versions) atomically."""
        from histoscope.atomic import atomic_write_text

        out = Path(out_dir)
        return {"md": atomic_write_text(out / "report_final.md", self.to_markdown()),
                "json": atomic_write_text(out / "report_final.json",
                                          json.dumps(self.to_dict(), indent=1) + "\n")}  # fmt: skip


def evidence_note(draft: Entry) -> str:
    """Which of a draft's sentences have evidence that is not specific to them, or ``""``."""
    which = [str(s["index"] + 1) for s in draft.sentences if s.get("evidence_note")]
    if not which:
        return ""
    return f"evidence is not sentence-specific for sentence(s) {', '.join(which)}"


def read_entries(path: Path):
    """Entries of a store file; a torn or foreign line is skipped with one warning."""
    bad = 0
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                yield Entry(**json.loads(line))
            except (ValueError, TypeError):
                bad += 1
    if bad:
        warnings.warn(f"{path}: skipped {bad} unreadable line(s) (a write interrupted by a "
                      "crash?)", HistoScopeWarning, stacklevel=2)  # fmt: skip
