"""iSight calibration per case (with and without clinical text) and the text decision.

Every head is calibrated twice on the validation slides: once on the logits it
gives with the clinical text (case ``"text"``) and once on the image alone
(case ``"image"``, no text: the metadata adds nothing). The model divides by
the temperature of the case each sample is in
(:meth:`histoscope.models.isight.ISight.set_temperatures`).

The rules below were fixed before any number was looked at, except the
lower-bound exception (issue 17), added after the tissue head with text, right
on all 144 validation slides, was hidden by the at-a-bound clause; the card
records the rules (:data:`ACCEPTABLE_RULE`, :data:`TEXT_RULE`) next to the numbers.

Acceptable (the panel shows the head's bars in that case) when all hold on the
validation slides, after temperature:

- the temperature fit is inside its bounds (:data:`BOUNDS`), not at one: a fit
  that runs to a bound means the validation slides could not set it. One
  exception: a fit at the *lower* bound of a head that is right on (nearly)
  every validation slide (at most :data:`SHARP_ERRORS_MAX` of them wrong) with
  ECE at most :data:`ECE_MAX` is acceptable: the NLL keeps falling as the
  temperature drops because every answer is right, so the bound reflects a
  sharp, correct head, not a failed fit. A fit at the upper bound, or at the
  lower bound with more errors, stays unacceptable;
- ECE (15 bins) is at most :data:`ECE_MAX`;
- the Wilson 95 % lower bound of accuracy is above chance, the share of the
  most frequent class among the same slides.

Text: a head uses the clinical text only when its ``"text"`` case is
acceptable and the paired bootstrap 95 % interval (over slides) of accuracy
with text minus accuracy without lies above 0. Otherwise the head ignores the
text, and a model whose heads all ignore it is never given text by default.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from histoscope.models.isight import CASES, TASKS
from histoscope.training import metrics as M
from histoscope.training.isight_data import MISSING
from histoscope.training.metrics import wilson

__all__ = [
    "ACCEPTABLE_RULE", "BOUNDS", "ECE_MAX", "SHARP_ERRORS_MAX", "TEXT_RULE", "bootstrap_ci",
    "calibrate_cases", "case_logits", "decide_text", "head_entry", "mcnemar", "wilson",
]  # fmt: skip

#: Range the temperature fit may use; a fit at either end is flagged (see the module docstring).
BOUNDS = M.TEMPERATURE_BOUNDS
#: Largest validation ECE (15 bins, after temperature) of an acceptable head.
ECE_MAX = 0.10
#: A fit at the lower bound is acceptable when at most this share of validation slides is wrong
#: (and ECE <= ECE_MAX): the head is sharp and right, not badly fitted.
SHARP_ERRORS_MAX = 0.01
#: Bootstrap resamples of the intervals.
N_BOOT = 2000
ACCEPTABLE_RULE = (
    f"acceptable when, on the validation slides after temperature: the temperature fit is "
    f"inside [{BOUNDS[0]}, {BOUNDS[1]}] (not at a bound; a fit at the lower bound is accepted "
    f"when at most {SHARP_ERRORS_MAX:.0%} of the slides are wrong: a sharp, correct head), "
    f"ECE (15 bins) <= {ECE_MAX}, and the Wilson 95 % lower bound of accuracy is above chance "
    "(the most frequent class's share)"
)
TEXT_RULE = (
    "a head uses the clinical text only when its with-text case is acceptable and the paired "
    "bootstrap 95 % interval over validation slides of accuracy(with text) - accuracy(image "
    "alone) lies above 0; otherwise it ignores the text"
)
CASE_WORDS = {"text": "with clinical text", "image": "without clinical text"}


def bootstrap_ci(
    stat: Callable[[np.ndarray], float], n: int, *, n_boot: int = N_BOOT, seed: int = 0
) -> tuple[float, float]:
    """Percentile 95 % interval of ``stat(indices)`` over slides drawn with replacement."""
    rng = np.random.default_rng(seed)
    vals = np.array([stat(rng.integers(0, n, n)) for _ in range(n_boot)])
    return float(np.quantile(vals, 0.025)), float(np.quantile(vals, 0.975))


def mcnemar(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """Exact McNemar test of two paired sets of right/wrong answers on the same slides.

    Returns ``only_a`` and ``only_b`` (slides only one of them got right) and the
    two-sided binomial ``p`` of that split under "no difference".
    """
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    m = only_a + only_b
    if m == 0:
        return {"only_a": 0, "only_b": 0, "p": 1.0}
    k = min(only_a, only_b)
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2.0**m
    return {"only_a": only_a, "only_b": only_b, "p": float(min(1.0, 2 * tail))}


def _probs(logits: np.ndarray, temperature: float) -> np.ndarray:
    return M.softmax(np.asarray(logits, np.float64), temperature)


def head_entry(
    logits: np.ndarray, y: np.ndarray, temperature: float, *, seed: int = 0, n_boot: int = N_BOOT
) -> dict[str, Any]:
    """Validation figures of one head in one case, and whether they are acceptable.

    Parameters
    ----------
    logits
        ``(n, k)`` raw logits (before any temperature) of the labelled slides.
    y
        ``(n,)`` class indices.
    temperature
        The fitted temperature.
    seed, n_boot
        Seed and number of resamples of the ECE's bootstrap interval.
    """
    n, k = logits.shape
    p = _probs(logits, temperature)
    right = p.argmax(axis=1) == y
    acc = float(right.mean())
    ece = float(M.ece(p, y))
    chance = float(np.bincount(y, minlength=k).max() / n)
    at_bound = M.temperature_at_bound(temperature, BOUNDS)
    at_lower = at_bound and temperature < 1.0
    errors = int(n - right.sum())
    sharp = at_lower and errors <= SHARP_ERRORS_MAX * n + 1e-9 and ece <= ECE_MAX
    lo, hi = wilson(int(right.sum()), n)
    e_lo, e_hi = bootstrap_ci(lambda i: M.ece(p[i], y[i]), n, seed=seed, n_boot=n_boot)
    why = []
    if at_bound and not sharp:
        side = "lower" if at_lower else "upper"
        wrong = f", with {errors / n:.0%} of the slides wrong" if at_lower else ""
        why.append(f"temperature fit at its {side} bound ({temperature:.3g}{wrong})")
    if ece > ECE_MAX:
        why.append(f"ECE above {ECE_MAX}")
    if lo <= chance:
        why.append(f"accuracy not clearly above chance ({chance:.2f})")
    return {
        "n": int(n), "temperature": float(temperature), "at_bound": at_bound,
        "sharp_at_lower_bound": sharp,
        "accuracy": acc, "accuracy_ci": [lo, hi], "ece": ece, "ece_ci": [e_lo, e_hi],
        "chance": chance, "acceptable": not why, "failed": why,
    }  # fmt: skip


def hidden_line(head: str, case: str, entry: Mapping[str, Any]) -> str:
    """The panel's line for a head hidden in ``case`` (uses the entry's figures)."""
    line = (f"{head} head hidden {CASE_WORDS[case]}: validation accuracy "
            f"{entry['accuracy']:.2f}, ECE {entry['ece']:.2f}")  # fmt: skip
    return line + (f" ({'; '.join(entry['failed'])})" if entry.get("failed") else "")


def calibrate_cases(
    raw: Mapping[str, Mapping[str, np.ndarray]],
    y: np.ndarray,
    *,
    seed: int = 0,
    n_boot: int = N_BOOT,
) -> dict[str, Any]:
    """Fit one temperature per head and case on validation logits and judge each.

    Parameters
    ----------
    raw
        ``case -> task -> (n, k)`` raw logits (temperature 1) of the same slides.
    y
        ``(n, n_tasks)`` class indices in :data:`TASKS` order (``MISSING`` unlabelled).
    seed, n_boot
        Of the bootstrap intervals.

    Returns
    -------
    dict
        ``rule``, ``bounds``, ``temperatures`` (``case -> task -> T``, what the
        model's config takes) and ``cases`` (``case -> task -> entry`` of
        :func:`head_entry`, plus ``hidden_line`` where not acceptable).
    """
    out: dict[str, Any] = {"rule": ACCEPTABLE_RULE, "bounds": list(BOUNDS),
                           "temperatures": {}, "cases": {}}  # fmt: skip
    for case in CASES:
        out["temperatures"][case], out["cases"][case] = {}, {}
        for j, task in enumerate(TASKS):
            keep = y[:, j] != MISSING
            if not keep.any():
                out["temperatures"][case][task] = 1.0
                continue
            z, t = raw[case][task][keep], y[keep, j]
            temp = M.fit_temperature(z, t)
            entry = head_entry(z, t, temp, seed=seed, n_boot=n_boot)
            if not entry["acceptable"]:
                entry["hidden_line"] = hidden_line(task, case, entry)
            out["temperatures"][case][task] = temp
            out["cases"][case][task] = entry
    return out


def decide_text(
    raw: Mapping[str, Mapping[str, np.ndarray]],
    y: np.ndarray,
    calibration: Mapping[str, Any],
    *,
    seed: int = 0,
    n_boot: int = N_BOOT,
) -> dict[str, Any]:
    """Per head, whether the clinical text is used (:data:`TEXT_RULE`), with its numbers."""
    heads = {}
    for j, task in enumerate(TASKS):
        keep = y[:, j] != MISSING
        if not keep.any():
            continue
        t = y[keep, j]
        with_text = raw["text"][task][keep].argmax(axis=1) == t
        alone = raw["image"][task][keep].argmax(axis=1) == t
        gain = with_text.astype(np.float64) - alone
        diff = bootstrap_ci(lambda i, g=gain: float(g[i].mean()), len(t), seed=seed,
                            n_boot=n_boot)  # fmt: skip
        ok = bool(calibration["cases"]["text"][task]["acceptable"])
        heads[task] = {
            "n": int(len(t)), "accuracy_text": float(with_text.mean()),
            "accuracy_image": float(alone.mean()),
            "difference": float(with_text.mean() - alone.mean()), "difference_ci": list(diff),
            "mcnemar": mcnemar(with_text, alone), "text_case_acceptable": ok,
            "use_text": bool(ok and diff[0] > 0),
        }  # fmt: skip
    return {"rule": TEXT_RULE, "heads": heads,
            "uses_text": sorted(t for t, h in heads.items() if h["use_text"])}  # fmt: skip


def case_logits(
    model, bags: Sequence[np.ndarray], metadata: Sequence[str | None]
) -> dict[str, dict[str, np.ndarray]]:
    """Raw logits (temperature 1) per case: ``{"text": ..., "image": ...}``.

    The model's temperatures are put back afterwards.
    """
    from histoscope.training.isight_report import predict

    saved = dict(model.config.get("temperatures") or {}) or None
    buffer = model.temperature.clone()
    ones = {case: dict.fromkeys(TASKS, 1.0) for case in CASES}
    model.set_temperatures(ones)
    try:
        return {"text": predict(model, bags, list(metadata)),
                "image": predict(model, bags, [None] * len(bags))}  # fmt: skip
    finally:
        model.set_temperatures(saved)
        model.temperature.copy_(buffer)
