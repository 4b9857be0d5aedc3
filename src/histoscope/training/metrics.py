"""Classification metrics on plain numpy arrays, plus temperature fitting.

Everything here takes integer class labels (``y_true``, ``y_pred``) or a
probability / logit matrix of shape ``(n_samples, n_classes)`` and returns
plain Python floats or numpy arrays, so the same functions serve training
loops, ``histoscope evaluate`` and the co-assessment agreement tables. The
definitions follow scikit-learn where it has one (balanced accuracy is the
mean recall over the classes present in ``y_true``; weighted F1 weights each
class's F1 by its support in ``y_true``; a class never predicted has precision
0), so numbers are comparable with the reference tools; scikit-learn itself is
not a dependency. Only :func:`fit_temperature` and :func:`fit_logit_affine` use
torch, imported inside them.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "TEMPERATURE_BOUNDS",
    "accuracy",
    "balanced_accuracy",
    "bootstrap_slides",
    "confusion_matrix",
    "ece",
    "fit_logit_affine",
    "fit_temperature",
    "nll",
    "reliability_table",
    "roc_auc",
    "softmax",
    "temperature_at_bound",
    "weighted_f1",
    "wilson",
]


def _labels(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(y_true)
    p = np.asarray(y_pred)
    if t.ndim != 1 or p.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shapes {t.shape} and {p.shape}")
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} labels but y_pred has {p.size}")
    if t.size == 0:
        raise ValueError("no samples")
    if not (np.issubdtype(t.dtype, np.integer) and np.issubdtype(p.dtype, np.integer)):
        raise ValueError("labels must be integer class indices")
    if t.min() < 0 or p.min() < 0:
        raise ValueError("labels must be non-negative class indices")
    return t.astype(np.int64), p.astype(np.int64)


def _probs(probs, y_true) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    t = np.asarray(y_true)
    if p.ndim != 2:
        raise ValueError(f"probabilities must be (n_samples, n_classes), got shape {p.shape}")
    if t.ndim != 1 or t.size != p.shape[0]:
        raise ValueError(f"{p.shape[0]} rows of probabilities but {t.size} labels")
    if t.size == 0:
        raise ValueError("no samples")
    if not np.issubdtype(t.dtype, np.integer) or t.min() < 0 or t.max() >= p.shape[1]:
        raise ValueError(f"labels must be integers in [0, {p.shape[1]})")
    return p, t.astype(np.int64)


def accuracy(y_true, y_pred) -> float:
    """Fraction of samples whose prediction equals the label.

    Parameters
    ----------
    y_true, y_pred
        1-D integer class indices of equal length.

    Returns
    -------
    float
        Accuracy in [0, 1].
    """
    t, p = _labels(y_true, y_pred)
    return float(np.mean(t == p))


def confusion_matrix(
    y_true, y_pred, n_classes: int | None = None, *, normalize: str | None = None
) -> np.ndarray:
    """Confusion matrix with true classes as rows and predictions as columns.

    Parameters
    ----------
    y_true, y_pred
        1-D integer class indices of equal length.
    n_classes
        Matrix size; default ``max(label) + 1`` over both arrays.
    normalize
        ``None`` for counts (int64); ``"true"`` divides each row by its total
        (recall per class on the diagonal), ``"pred"`` each column, ``"all"``
        the whole matrix. Empty rows or columns stay 0 rather than NaN.

    Returns
    -------
    numpy.ndarray
        ``(n_classes, n_classes)``.
    """
    t, p = _labels(y_true, y_pred)
    k = int(max(t.max(), p.max()) + 1) if n_classes is None else int(n_classes)
    if t.max() >= k or p.max() >= k:
        raise ValueError(f"labels exceed n_classes={k}")
    counts = np.bincount(t * k + p, minlength=k * k).reshape(k, k).astype(np.int64)
    if normalize is None:
        return counts
    c = counts.astype(np.float64)
    if normalize == "true":
        denom = c.sum(axis=1, keepdims=True)
    elif normalize == "pred":
        denom = c.sum(axis=0, keepdims=True)
    elif normalize == "all":
        denom = np.array(c.sum())
    else:
        raise ValueError(f"normalize must be None, 'true', 'pred' or 'all', not {normalize!r}")
    return np.divide(c, denom, out=np.zeros_like(c), where=denom > 0)


def balanced_accuracy(y_true, y_pred) -> float:
    """Mean recall over the classes that occur in ``y_true``.

    Parameters
    ----------
    y_true, y_pred
        1-D integer class indices of equal length.

    Returns
    -------
    float
        Balanced accuracy in [0, 1]; equals accuracy when classes are balanced.
    """
    cm = confusion_matrix(y_true, y_pred)
    support = cm.sum(axis=1)
    present = support > 0
    return float(np.mean(np.diag(cm)[present] / support[present]))


def weighted_f1(y_true, y_pred) -> float:
    """F1 per class, averaged with each class weighted by its support in ``y_true``.

    Parameters
    ----------
    y_true, y_pred
        1-D integer class indices of equal length.

    Returns
    -------
    float
        Weighted F1 in [0, 1]. A class with no predictions has precision 0 and
        so F1 0 (scikit-learn's ``zero_division=0``).
    """
    cm = confusion_matrix(y_true, y_pred).astype(np.float64)
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    denom = support + predicted  # F1 = 2 tp / (2 tp + fp + fn) = 2 tp / (support + predicted)
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(np.sum(f1 * support) / support.sum())


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` (numerically stable).

    Parameters
    ----------
    logits
        ``(n_samples, n_classes)``.
    temperature
        Positive divisor applied before the softmax.

    Returns
    -------
    numpy.ndarray
        Probabilities, rows summing to 1.
    """
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def nll(logits, y_true, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under ``softmax(logits / T)``.

    Parameters
    ----------
    logits
        ``(n_samples, n_classes)``.
    y_true
        1-D integer labels.
    temperature
        Positive divisor applied before the softmax.

    Returns
    -------
    float
        Cross-entropy in nats.
    """
    z, t = _probs(logits, y_true)
    z = z / float(temperature)
    m = z.max(axis=1, keepdims=True)
    logz = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
    return float(np.mean(logz - z[np.arange(t.size), t]))


def ece(probs, y_true, n_bins: int = 15) -> float:
    """Expected calibration error of the top-class confidence.

    Confidences (the largest probability per row) are put into ``n_bins``
    equal-width bins over (0, 1] (bin ``b`` holds ``b/n < conf <= (b+1)/n``,
    as in Guo et al. 2017); ECE is the sample-weighted mean of
    ``|accuracy - mean confidence|`` over non-empty bins.

    Parameters
    ----------
    probs
        ``(n_samples, n_classes)`` probabilities (after any temperature).
    y_true
        1-D integer labels.
    n_bins
        Number of bins (15 by default, the usual choice).

    Returns
    -------
    float
        ECE in [0, 1].
    """
    p, t = _probs(probs, y_true)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == t).astype(np.float64)
    # ceil(conf * n) - 1 puts conf exactly on an upper edge into that bin; 0 goes to bin 0.
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        sel = idx == b
        if sel.any():
            total += sel.sum() * abs(correct[sel].mean() - conf[sel].mean())
    return float(total / t.size)


def roc_auc(y_true, scores) -> float:
    """Area under the ROC curve for a binary problem (Mann-Whitney U).

    Tied scores get their average rank, so a tie between a positive and a
    negative counts one half, matching the trapezoidal ROC area.

    Parameters
    ----------
    y_true
        1-D labels in {0, 1} (or booleans); 1 is the positive class.
    scores
        1-D scores, larger meaning more likely positive.

    Returns
    -------
    float
        AUC in [0, 1].

    Raises
    ------
    ValueError
        If only one class is present (the AUC is undefined).
    """
    t = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if t.ndim != 1 or s.shape != t.shape:
        raise ValueError(f"y_true {t.shape} and scores {s.shape} must be 1-D of equal length")
    if not np.isin(t, [0, 1]).all():
        raise ValueError("roc_auc is binary: labels must be 0 or 1")
    t = t.astype(bool)
    n_pos = int(t.sum())
    n_neg = t.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("roc_auc needs both classes in y_true")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    # average 1-based rank within each run of equal scores
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], s.size]
    for a, b in zip(starts, ends, strict=True):
        ranks[order[a:b]] = (a + 1 + b) / 2.0
    u = ranks[t].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


#: Default range of :func:`fit_temperature` (every family): wide enough that a fit reaching
#: an end says something about the head (see :func:`temperature_at_bound`).
TEMPERATURE_BOUNDS = (0.01, 100.0)


def temperature_at_bound(
    temperature: float, bounds: tuple[float, float] = TEMPERATURE_BOUNDS
) -> bool:
    """Whether a fitted temperature sits at (within 0.1 % of) an end of its range.

    A fit at the upper end means the validation data could not set it (the
    head is no better than flat); at the lower end that the NLL kept falling as
    the head sharpened, which a head right on every validation sample also does.
    Record the flag next to the temperature and judge it with the head's
    accuracy.
    """
    return bool(temperature <= bounds[0] * 1.001 or temperature >= bounds[1] / 1.001)


def fit_temperature(
    logits,
    y_true,
    *,
    t_min: float = TEMPERATURE_BOUNDS[0],
    t_max: float = TEMPERATURE_BOUNDS[1],
    max_iter: int = 100,
) -> float:
    """Temperature ``T`` minimising the NLL of ``softmax(logits / T)`` on held-out data.

    A log-spaced grid over ``[t_min, t_max]`` finds the basin, then L-BFGS on
    ``log T`` refines it (the NLL is smooth in ``log T``); the result is
    clipped to the range and is never worse than the best grid point. Fit it
    on the validation split, never on the test split, and check the result with
    :func:`temperature_at_bound` (same range).

    Parameters
    ----------
    logits
        ``(n_samples, n_classes)`` validation logits.
    y_true
        1-D integer validation labels.
    t_min, t_max
        Range of admissible temperatures (default :data:`TEMPERATURE_BOUNDS`).
    max_iter
        L-BFGS iterations.

    Returns
    -------
    float
        The fitted temperature (1.0 leaves the model unchanged).
    """
    import torch

    z, t = _probs(logits, y_true)
    if not (0 < t_min < 1 < t_max):
        raise ValueError("need 0 < t_min < 1 < t_max")
    grid = np.exp(np.linspace(math.log(t_min), math.log(t_max), 61))
    losses = [nll(z, t, g) for g in grid]
    best_t = float(grid[int(np.argmin(losses))])
    best_loss = float(min(losses))

    zt = torch.as_tensor(z, dtype=torch.float64)
    tt = torch.as_tensor(t)
    log_t = torch.tensor(math.log(best_t), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(zt / log_t.exp(), tt)
        loss.backward()
        return loss

    opt.step(closure)
    refined = float(np.clip(math.exp(float(log_t.detach())), t_min, t_max))
    if math.isfinite(refined) and nll(z, t, refined) <= best_loss:
        return refined
    return best_t


def fit_logit_affine(
    logits, y_true, *, t_bounds: tuple[float, float] = (0.02, 50.0), max_iter: int = 200
) -> tuple[np.ndarray, np.ndarray]:
    """One temperature and a bias per output: ``softmax(logits / T + shift)`` fitted by NLL.

    For two classes this is Platt scaling of the logit margin
    (``p = sigmoid((z1 - z0) / T + shift1 - shift0)``); for more it is
    temperature scaling plus a bias per class. One shared temperature keeps
    the fit identified when the logits move together (a two-class head's
    logits are nearly each other's negatives, so separate scales per output
    are not). The shift is returned centred (mean 0), which the softmax
    ignores. Fit it on validation data, never on the test set.

    Parameters
    ----------
    logits
        ``(n_samples, n_classes)`` validation logits of the uncalibrated model.
    y_true
        1-D integer labels.
    t_bounds
        Range the temperature is kept in.
    max_iter
        L-BFGS iterations.

    Returns
    -------
    scale, shift
        ``(n_classes,)`` float64 arrays, applied as ``logits * scale + shift``
        (``scale`` is ``1/T`` for every output); ``(1, ..), (0, ..)`` leave the
        model unchanged.

    Raises
    ------
    ValueError
        If a class has no sample (its bias could grow without bound).
    """
    import torch

    z, t = _probs(logits, y_true)
    k = z.shape[1]
    missing = [c for c in range(k) if not (t == c).any()]
    if missing:
        raise ValueError(f"fit_logit_affine needs samples of every class; none of {missing}")
    t0 = fit_temperature(z, t, t_min=t_bounds[0], t_max=t_bounds[1])
    zt = torch.as_tensor(z, dtype=torch.float64)
    tt = torch.as_tensor(t)
    log_a = torch.tensor(-math.log(t0), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_a, b], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(zt * log_a.exp() + b, tt)
        loss.backward()
        return loss

    opt.step(closure)
    a = float(np.clip(math.exp(float(log_a.detach())), 1 / t_bounds[1], 1 / t_bounds[0]))
    shift = b.detach().numpy().astype(np.float64)
    shift = shift - shift.mean()
    if not (math.isfinite(a) and np.isfinite(shift).all()) or nll(z * a + shift, t) > nll(z, t, t0):
        return np.full(k, 1.0 / t0), np.zeros(k)  # never worse than one temperature
    return np.full(k, a), shift


def reliability_table(probs, y_true, n_bins: int = 15) -> list[dict[str, float | int | None]]:
    """Per confidence bin (the bins of :func:`ece`): range, count, mean confidence, accuracy.

    Parameters
    ----------
    probs
        ``(n_samples, n_classes)`` probabilities.
    y_true
        1-D integer labels.
    n_bins
        Number of equal-width bins over (0, 1].

    Returns
    -------
    list of dict
        ``{"lo", "hi", "n", "confidence", "accuracy"}`` per bin (``None`` when empty).
    """
    p, t = _probs(probs, y_true)
    conf = p.max(axis=1)
    correct = p.argmax(axis=1) == t
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        s = idx == b
        rows.append({"lo": round(b / n_bins, 4), "hi": round((b + 1) / n_bins, 4),
                     "n": int(s.sum()),
                     "confidence": float(conf[s].mean()) if s.any() else None,
                     "accuracy": float(correct[s].mean()) if s.any() else None})  # fmt: skip
    return rows


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of the proportion ``k / n`` (95 % by default).

    Raises
    ------
    ValueError
        If ``n < 1`` or ``k`` is outside ``[0, n]``.
    """
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"wilson needs 0 <= k <= n and n >= 1, got k={k}, n={n}")
    p = k / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_slides(
    labels, pred, slide, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> dict[str, object]:
    """Percentile bootstrap over slides of pooled sensitivity and specificity.

    Tiles of one slide are not independent (a Wilson interval over tiles treats
    them as if they were); here whole slides are resampled with replacement and
    the pooled proportions recomputed ``n_boot`` times.

    Parameters
    ----------
    labels, pred
        Per-tile truth and call (1 = positive / tumour).
    slide
        Per-tile slide index (any integers).
    n_boot, seed, level
        Resamples, their seed and the interval's coverage.

    Returns
    -------
    dict
        ``{"sensitivity": [lo, hi] | None, "specificity": [lo, hi] | None,
        "n_slides", "n_boot", "seed", "level"}``; an interval is None when no
        tile has that truth.

    Raises
    ------
    ValueError
        If the arrays differ in length, are empty, or ``n_boot`` < 1 or ``level``
        is not in (0, 1).
    """
    y = np.asarray(labels).astype(np.int64).ravel()
    c = np.asarray(pred).astype(np.int64).ravel()
    s = np.asarray(slide).ravel()
    if not (len(y) == len(c) == len(s)) or not len(y):
        raise ValueError(f"bootstrap_slides needs equal, non-empty arrays, got {len(y)}, "
                         f"{len(c)}, {len(s)}")  # fmt: skip
    if int(n_boot) < 1 or not 0 < float(level) < 1:
        raise ValueError(f"bootstrap_slides needs n_boot >= 1 and 0 < level < 1, got "
                         f"{n_boot!r}, {level!r}")  # fmt: skip
    ids, inv = np.unique(s, return_inverse=True)
    k = len(ids)
    # per slide: positives, true positives, negatives, true negatives
    pos = np.bincount(inv, weights=(y == 1), minlength=k)
    tp = np.bincount(inv, weights=(y == 1) & (c == 1), minlength=k)
    neg = np.bincount(inv, weights=(y == 0), minlength=k)
    tn = np.bincount(inv, weights=(y == 0) & (c == 0), minlength=k)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, k, size=(int(n_boot), k))
    counts = np.stack([np.bincount(d, minlength=k) for d in draws]).astype(np.float64)
    a = (1 - float(level)) / 2 * 100

    def interval(num, den):
        if den.sum() == 0:
            return None
        tot = counts @ den
        with np.errstate(invalid="ignore", divide="ignore"):
            r = np.where(tot > 0, (counts @ num) / np.where(tot > 0, tot, 1), np.nan)
        r = r[np.isfinite(r)]
        return [float(np.percentile(r, a)), float(np.percentile(r, 100 - a))]

    return {"sensitivity": interval(tp, pos), "specificity": interval(tn, neg), "n_slides": k,
            "n_boot": int(n_boot), "seed": int(seed), "level": float(level)}  # fmt: skip
