"""Final-test figures recorded in a checkpoint's card, and the claims documents make of them.

A *final test* is one evaluation on slides that were never used for a choice;
:func:`record` writes its figures into the card of the checkpoint (under
``metrics.<key>``, with the data folder and the slides' seeds), keeping the
tensors, and every other key of the card, as they are.

A *claim* is a machine-readable line next to a human table in a Markdown file
(``benchmarks/RESULTS.md``, ``README.md``)::

    <!-- claim tumour_patch_default.safetensors metrics/final_test/test/sensitivity = 0.934 -->

naming a checkpoint in ``sample_data/``, a ``/``-separated path into its card
(list items by index) and the value as printed: the card's value rounded to the
printed number of decimals must equal it (:func:`check_claim`), and the value
must be shown, as written, in the table or paragraph just above the claim's
block (:func:`check_shown`; with ``in "ROW"`` after the value, on the line of that
table holding ROW, for a figure a table shows in more than one row), so the visible figure and the card cannot drift
apart. A claim may not stand in a section whose heading says it is
"superseded by" a later one (:func:`check_current`): a figure that no longer
holds is not claimed. Any family can add claims; ``tests/test_claims.py``
checks every one.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

#: ``<!-- claim FILE PATH = VALUE -->`` or ``<!-- claim FILE PATH = VALUE in "ROW" -->``
CLAIM_RE = re.compile(r'<!--\s*claim\s+(\S+)\s+(\S+)\s*=\s*(\S+)(?:\s+in\s+"([^"]+)")?\s*-->')


def manifest_seeds(data: str | os.PathLike, split: str = "all") -> list[int]:
    """Seeds of the slides of ``split`` in one or more ``os.pathsep``-joined synth folders."""
    seeds = []
    for folder in str(data).split(os.pathsep):
        doc = json.loads((Path(folder) / "manifest.json").read_text())
        seeds += [
            int(r["seed"]) for r in doc["slides"] if split == "all" or r.get("split") == split
        ]
    return seeds


def check_record(
    checkpoint: str | os.PathLike, key: str, *, data: str | os.PathLike, split: str,
    overwrite: bool = False,
) -> None:  # fmt: skip
    """Refuse a :func:`record` before anything is evaluated.

    Call it before the (long) evaluation: the key must be a plain name, every
    data folder must have a synth ``manifest.json`` with slides in ``split``
    (their seeds are recorded), and the card must not hold ``metrics.<key>``
    already unless ``overwrite``.

    Raises
    ------
    RecipeError
        If ``key`` is not a plain name, a folder has no readable manifest or no
        slides in ``split``, or ``metrics.<key>`` exists and ``overwrite`` is false.
    """
    from histoscope.checkpoints import read_card
    from histoscope.training._recipe import RecipeError

    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(key)):
        raise RecipeError(f"record key must be a plain name, got {key!r}")
    for folder in str(data).split(os.pathsep):
        manifest = Path(folder) / "manifest.json"
        try:
            doc = json.loads(manifest.read_text())
            rows = [r for r in doc["slides"] if split == "all" or r.get("split") == split]
            [int(r["seed"]) for r in rows]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RecipeError(
                f"record={key}: {manifest} is not a readable synth manifest with slide "
                f"seeds ({exc}); the card records which slides were tested"
            ) from exc
        if not rows:
            raise RecipeError(f"record={key}: {folder} has no slides in split {split!r}")
    if key in read_card(checkpoint).metrics and not overwrite:
        raise RecipeError(
            f"{checkpoint}: the card already records metrics.{key}; "
            "pass -O overwrite=true to replace it"
        )


def record(
    checkpoint: str | os.PathLike, key: str, metrics: Mapping[str, Any], *,
    data: str | os.PathLike, split: str, overwrite: bool = False,
) -> Path:  # fmt: skip
    """Write ``metrics`` into the card of ``checkpoint`` at ``metrics.<key>``.

    The current file is read, only ``metrics.<key>`` changes (with ``data``,
    ``split`` and the ``seeds`` of the slides added), and the file is rewritten
    atomically with the same tensors. An existing ``metrics.<key>`` is replaced
    only with ``overwrite``.

    Raises
    ------
    RecipeError
        As :func:`check_record`.
    RuntimeError
        If the rewritten file's tensor hash differs (it never should).
    """
    from histoscope.checkpoints import load_checkpoint, save_checkpoint

    check_record(checkpoint, key, data=data, split=split, overwrite=overwrite)
    model, card = load_checkpoint(checkpoint)
    entry = {**metrics, "data": str(data), "split": split, "seeds": manifest_seeds(data, split)}
    new = replace(card, metrics={**card.metrics, key: json.loads(json.dumps(entry, default=float))})
    path = save_checkpoint(checkpoint, model, new)
    from histoscope.checkpoints import read_card

    if read_card(path).sha256 != card.sha256:
        raise RuntimeError(f"{path}: tensors changed while rewriting the card")
    return path


def write_metrics_first(
    out_dir: str | os.PathLike, checkpoint: str | os.PathLike, data: str | os.PathLike,
    metrics: Mapping[str, Any],
) -> Path:  # fmt: skip
    """Write ``out_dir/metrics.json`` (as ``histoscope.training.evaluate`` does) before a record.

    So an evaluation's figures are on disk even when writing them into the card fails.
    """
    from histoscope.atomic import atomic_write_text
    from histoscope.checkpoints import read_card

    card = read_card(checkpoint)
    doc = {"checkpoint": str(checkpoint), "family": card.family, "sha256": card.sha256,
           "data": str(data), **metrics}  # fmt: skip
    path = Path(out_dir) / "metrics.json"
    atomic_write_text(path, json.dumps(doc, indent=2, default=float) + "\n")
    return path


@dataclass(frozen=True)
class Claim:
    """One ``<!-- claim ... -->`` line: where it is and what it says."""

    source: str
    line: int
    checkpoint: str
    path: str
    value: str
    row: str | None = None  # the value must be shown on the table row (line) holding this text


def find_claims(paths: Sequence[str | os.PathLike]) -> list[Claim]:
    """Every claim in the given Markdown files, in order."""
    out = []
    for p in paths:
        for i, text in enumerate(Path(p).read_text().splitlines(), 1):
            out += [Claim(str(p), i, *m.groups()) for m in CLAIM_RE.finditer(text)]
    return out


def card_value(card: Mapping[str, Any], path: str) -> Any:
    """The value at a ``/``-separated ``path`` in a card dict (list items by index).

    Raises
    ------
    KeyError
        Naming the first part of the path that is missing.
    """
    node: Any = card
    for part in path.split("/"):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, Mapping) and part in node:
            node = node[part]
        else:
            raise KeyError(f"card has no {part!r} on the path {path!r}")
    return node


def check_claim(card: Mapping[str, Any], claim: Claim) -> str | None:
    """``None`` when the card backs the claim, else why not (one line)."""
    try:
        got = card_value(card, claim.path)
    except KeyError as exc:
        return f"{claim.source}:{claim.line}: {exc.args[0]}"
    text = claim.value
    if isinstance(got, bool) or not isinstance(got, int | float):
        ok = str(got) == text
    else:
        decimals = len(text.split(".")[1]) if "." in text else 0
        try:
            ok = round(float(got), decimals) == round(float(text), decimals)
        except ValueError:
            ok = False
    if ok:
        return None
    return (f"{claim.source}:{claim.line}: {claim.checkpoint} {claim.path} is {got!r}, "
            f"the document says {text}")  # fmt: skip


def annotated_text(source: str | os.PathLike, line: int) -> str:
    """The table or paragraph a claim on ``line`` (1-based) annotates.

    That is the nearest block of non-blank lines above it, skipping the other
    claim lines of its own block and blank lines.
    """
    lines = Path(source).read_text().splitlines()
    i = line - 2
    while i >= 0 and (not lines[i].strip() or CLAIM_RE.search(lines[i])):
        i -= 1
    j = i
    while j >= 0 and lines[j].strip() and not CLAIM_RE.search(lines[j]):
        j -= 1
    return "\n".join(lines[j + 1 : i + 1])


def check_shown(claim: Claim, text: str | None = None) -> str | None:
    """``None`` when the claim's value is shown, as written, in the text it annotates.

    The value must stand as a number of its own there (``0.96`` is not found in
    ``0.960`` or ``10.96``; a whole number of four or more digits may be printed
    with thousands commas, ``1663`` as ``1,663``), so a figure changed in the
    table but not in its claim (or the other way round) is caught. ``text``
    defaults to :func:`annotated_text` of the claim's line.
    """
    if text is None:
        text = annotated_text(claim.source, claim.line)
    if claim.row is not None:
        rows = [ln for ln in text.splitlines() if claim.row in ln]
        if not rows:
            return (f"{claim.source}:{claim.line}: {claim.path}: no row holding "
                    f"{claim.row!r} in the text above it")  # fmt: skip
        text = "\n".join(rows)
    forms = [claim.value]
    if re.fullmatch(r"-?\d{4,}", claim.value):  # 1663 may be printed 1,663
        forms.append(f"{int(claim.value):,}")
    if any(re.search(rf"(?<![\w.,]){re.escape(v)}(?![\w]|[.,]\d)", text) for v in forms):
        return None
    first = text.strip().splitlines()[0][:80] if text.strip() else "(nothing)"
    return (f"{claim.source}:{claim.line}: {claim.path} = {claim.value} is not shown in the "
            f"text above it (starting {first!r})")  # fmt: skip


#: A section a later one replaces says so in its heading: ``## X (superseded by "Y" below)``.
SUPERSEDED_RE = re.compile(r"\bsuperseded by\b", re.IGNORECASE)


def heading_of(source: str | os.PathLike, line: int) -> str:
    """The Markdown heading of the section that holds ``line`` (1-based), or ``""``.

    Lines inside fenced code blocks (shell comments start with ``#`` too) are not headings.
    """
    heading, fenced = "", False
    for text in Path(source).read_text().splitlines()[: max(line - 1, 0)]:
        if text.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6}\s", text):
            heading = text.strip()
    return heading


def check_current(claim: Claim) -> str | None:
    """``None`` unless the claim stands in a section marked "superseded by" a later one."""
    heading = heading_of(claim.source, claim.line)
    if not SUPERSEDED_RE.search(heading):
        return None
    return (f"{claim.source}:{claim.line}: {claim.path} is claimed in a superseded section "
            f"({heading[:80]!r}); claim the figure where it is current")  # fmt: skip
