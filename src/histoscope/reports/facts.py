"""Read the findings a report states, and score them against the synthetic truth.

:func:`parse_findings` reads organ, diagnosis, malignant, necrosis, margin
status, immune infiltration, tumour percent and tumour size from a report
(raw or cleaned; the phrasings are those of :mod:`histoscope.synthetic`'s
report writer and close variants). A finding the report does not state is
``None``.

:func:`score_findings` compares with the truth: tumour percent counts as right
within 10 points, size within 0.5 mm, the rest when equal; a finding missing
from the report is wrong. Which findings are scored follows what the
slide's reference report states (the parser run on it): a benign slide's
report says nothing of necrosis, margins, infiltrate or size, and a small
focus is sometimes given by its size alone. Values are compared with the
truth, not with the reference's wording (text is compared after the same
cleaning, so "non-small" and "non small" agree).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from histoscope.reports.tokenizer import clean_report, split_sentences

ORGANS = ("lymph node", "colon", "stomach", "breast", "prostate", "lung", "skin", "uterus")
DIAGNOSES = (
    "invasive carcinoma of no special type",
    "non small cell carcinoma",
    "acinar adenocarcinoma",
    "squamous cell carcinoma",
    "endometrioid carcinoma",
    "metastatic carcinoma",
    "adenocarcinoma",
)  # fmt: skip  (longest first)
NEGATIVE = ("no evidence of malignancy", "negative for malignancy", "no tumour in the sections",
            "no carcinoma is seen", "benign tissue", "no malignancy")  # fmt: skip
FINDINGS = ("organ", "diagnosis", "malignant", "necrosis", "margin", "immune_infiltration",
            "tumour_percent", "tumour_size_mm")  # fmt: skip
BENIGN_FINDINGS = ("organ", "diagnosis", "malignant", "tumour_percent")
PERCENT_TOLERANCE = 10.0
SIZE_TOLERANCE_MM = 0.5
_NUM = r"(\d+(?:\.\d+)?)"
_PCT = re.compile(_NUM + r" of the (?:examined )?(?:tissue|section)|" + _NUM + r" of tissue")
_MM = re.compile(_NUM + r" mm")


def _words(sentence: str) -> str:
    return f" {sentence} "


def parse_findings(text: str) -> dict[str, Any]:
    """The findings a report states (``None`` where it states none)."""
    cleaned = clean_report(text)
    sents = split_sentences(cleaned)
    whole = _words(cleaned.replace(" . ", " "))
    out: dict[str, Any] = dict.fromkeys(FINDINGS)
    for organ in ORGANS:
        if f" {organ} " in whole:
            out["organ"] = organ
            break
    negative = any(f" {n} " in whole for n in NEGATIVE)
    for dx in DIAGNOSES:
        if f" {dx} " in whole:
            out["diagnosis"] = dx
            break
    if out["diagnosis"] is not None:
        out["malignant"] = True
    elif negative:
        out["diagnosis"], out["malignant"], out["tumour_percent"] = "no malignancy", False, 0.0
    for s in sents:
        w = _words(s)
        if " necrosis " in w:
            out["necrosis"] = not (" no necrosis " in w or " absent " in w)
        if " margin " in w or " margins " in w or " edge of the tissue " in w:
            if " involved " in w or " extends to the edge " in w:
                out["margin"] = "involved"
            elif " clear " in w or " free " in w:
                out["margin"] = "clear"
        if any(k in w for k in (" lymphocytes ", " infiltrate ", " immune ")):
            for level in ("brisk", "moderate", "sparse"):
                if f" {level} " in w:
                    out["immune_infiltration"] = level
        m = _PCT.search(s)
        if m:
            out["tumour_percent"] = float(m.group(1) or m.group(2))
        if " margin " not in w and " margins " not in w and " closest " not in w:
            mm = _MM.search(s)
            if mm:
                out["tumour_size_mm"] = float(mm.group(1))
    return out


def applicable(reference: str | None, truth: Mapping[str, Any]) -> tuple[str, ...]:
    """The findings scored for a slide: those its reference report states.

    Without a reference: all eight for a malignant slide, organ, diagnosis,
    malignant and tumour percent for a benign one.
    """
    if reference is None:
        return FINDINGS if truth.get("malignant") else BENIGN_FINDINGS
    ref = parse_findings(reference)
    return tuple(k for k in FINDINGS if ref[k] is not None and truth.get(k) is not None)


def _norm(v: Any) -> Any:
    return clean_report(v).rstrip(" .") if isinstance(v, str) else v


def score_findings(stated: Mapping[str, Any], truth: Mapping[str, Any],
                   reference: str | None = None) -> dict[str, bool]:  # fmt: skip
    """Right or wrong per scored finding (a missing finding is wrong)."""
    out = {}
    for k in applicable(reference, truth):
        got, want = stated.get(k), truth.get(k)
        if got is None or want is None:
            out[k] = False
        elif k == "tumour_percent":
            out[k] = abs(float(got) - float(want)) <= PERCENT_TOLERANCE
        elif k == "tumour_size_mm":
            out[k] = abs(float(got) - float(want)) <= SIZE_TOLERANCE_MM
        else:
            out[k] = _norm(got) == _norm(want)
    return out


def factual_accuracy(texts: Sequence[str], truths: Sequence[Mapping[str, Any]],
                     references: Sequence[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Accuracy per finding (over the slides where it is scored) and over all scored findings.

    ``references`` (the slides' own reports) choose which findings are scored
    per slide (see :func:`applicable`).

    Returns
    -------
    dict
        ``{"per_finding": {name: {"accuracy", "n"}}, "overall": float, "n_slides": int}``.
    """
    refs = list(references) if references is not None else [None] * len(texts)
    if not len(texts) == len(truths) == len(refs):
        raise ValueError(f"{len(texts)} reports, {len(truths)} truths, {len(refs)} references")
    hits: dict[str, list[bool]] = {k: [] for k in FINDINGS}
    for text, truth, ref in zip(texts, truths, refs, strict=True):
        for k, ok in score_findings(parse_findings(text), truth, ref).items():
            hits[k].append(ok)
    per = {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in hits.items() if v}
    every = [ok for v in hits.values() for ok in v]
    return {"per_finding": per, "overall": sum(every) / len(every) if every else float("nan"),
            "n_slides": len(texts)}  # fmt: skip
