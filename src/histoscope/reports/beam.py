"""Beam search with trigram blocking, over any step function (HistGen decodes with beam 3).

``step(prefixes)`` takes a ``(K, T)`` tensor of token prefixes (each starting
with the begin token) and returns ``(log_probs (K, V), attention (K, P))``:
the next-token log-probabilities and the attention over ``P`` patches that
produced them. Scores are sums of log-probabilities; a hypothesis ends with
the end token; search stops when the best finished hypothesis scores at least
the best open one (scores only fall) or after ``max_len`` tokens. With
trigram blocking a token that would repeat a trigram already in the
hypothesis is never chosen (R2Gen's ``block_trigrams``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

Step = Callable[["torch.Tensor"], tuple["torch.Tensor", "torch.Tensor"]]


@dataclass(frozen=True)
class Hypothesis:
    """A decoded sequence (without the begin token), its score and per-token attention."""

    tokens: tuple[int, ...]
    score: float
    attention: np.ndarray  # (len(tokens), P)
    finished: bool


def blocked(tokens: Sequence[int]) -> set[int]:
    """Tokens that would repeat a trigram of ``tokens`` if appended next."""
    if len(tokens) < 2:
        return set()
    a, b = tokens[-2], tokens[-1]
    return {tokens[i + 2] for i in range(len(tokens) - 2) if tokens[i] == a and tokens[i + 1] == b}


def beam_search(
    step: Step,
    *,
    bos: int,
    eos: int,
    beam_size: int = 3,
    max_len: int = 100,
    block_trigrams: bool = True,
) -> Hypothesis:
    """The best hypothesis of a beam search.

    Parameters
    ----------
    step
        See the module docstring.
    bos, eos
        Begin and end token ids.
    beam_size
        Open hypotheses kept per step (1: greedy).
    max_len
        Most tokens generated (the end token included).
    block_trigrams
        Never repeat a trigram within a hypothesis.

    Returns
    -------
    Hypothesis
        Tokens exclude the begin token and include the end token when finished.

    Raises
    ------
    ValueError
        If ``beam_size`` or ``max_len`` is below 1.
    """
    import torch

    if int(beam_size) < 1 or int(max_len) < 1:
        raise ValueError(f"beam_size and max_len must be >= 1, got {beam_size}, {max_len}")
    open_: list[tuple[list[int], float, list[np.ndarray]]] = [([], 0.0, [])]
    done: list[Hypothesis] = []
    for _ in range(int(max_len)):
        prefixes = torch.tensor([[bos, *t] for t, _, _ in open_], dtype=torch.long)
        with torch.no_grad():
            logp, attn = step(prefixes)
        logp = logp.float().clone()
        attn_np = attn.float().numpy()
        cands = []
        for k, (toks, score, _) in enumerate(open_):
            if block_trigrams:
                for v in blocked(toks):
                    logp[k, v] = float("-inf")
            vals, idx = logp[k].topk(min(beam_size, logp.shape[1]))
            cands += [(score + float(v), k, int(i)) for v, i in zip(vals, idx, strict=True)
                      if np.isfinite(float(v))]  # fmt: skip
        cands.sort(key=lambda c: -c[0])
        nxt = []
        for score, k, i in cands:
            toks, _, att = open_[k]
            item = ([*toks, i], score, [*att, attn_np[k]])
            if i == eos:
                done.append(Hypothesis(tuple(item[0]), score, np.stack(item[2]), True))
            else:
                nxt.append(item)
            if len(nxt) == beam_size:
                break
        open_ = nxt
        best_done = max((h.score for h in done), default=float("-inf"))
        if not open_ or (len(done) >= beam_size and best_done >= open_[0][1]):
            break
        if beam_size == 1 and done:
            break
    if not done:
        done = [Hypothesis(tuple(t), s, np.stack(a), False) for t, s, a in open_]
    return max(done, key=lambda h: h.score)
