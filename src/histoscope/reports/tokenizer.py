"""The report vocabulary, as HistGen builds it: lowercased, punctuation stripped, a threshold.

Reports are cut into sentences at ``". "`` (and a final ``"."``), lowercased
and stripped of punctuation, then joined as ``"sentence . sentence ."`` so the
full stop is a token of its own and marks where a sentence ends (as in the
authors' ``clean_report_pathology``). One deliberate difference: a point
between two digits is kept (``"1.9 mm"`` stays ``1.9``; the authors' cleaner
turns it into ``19``), because sizes are findings we score.

Id 0 is the begin/end/padding token (as in the authors' code); words of the
training reports seen at least ``threshold`` times get ids from 1 in sorted
order, and every other word maps to ``<unk>``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

UNK = "<unk>"
BOS = EOS = PAD = 0
_PUNCT = re.compile(r"[,?;:*!%^&_+()\[\]{}\"'/\\<>=@#$|~`-]")
_SENT = re.compile(r"\.(?:\s+|$)")
_DOT = re.compile(r"(?<!\d)\.|\.(?!\d)")


def clean_report(text: str) -> str:
    """``"sentence one . sentence two ."``: lowercased, punctuation stripped."""
    out = []
    for sent in _SENT.split(text.replace("\n", " ").lower()):
        s = _DOT.sub(" ", _PUNCT.sub(" ", sent))
        words = s.split()
        if words:
            out.append(" ".join(words))
    return " . ".join(out) + " ." if out else ""


def split_sentences(cleaned: str) -> list[str]:
    """Sentences of a cleaned report (without their ``" ."``)."""
    return [s.strip(" .") for s in cleaned.split(" . ") if s.strip(" .")] if cleaned else []


def display(cleaned: str) -> str:
    """A cleaned report written as prose: each sentence capitalised and ended by a full stop."""
    return " ".join(s[:1].upper() + s[1:] + "." for s in split_sentences(cleaned))


@dataclass(frozen=True)
class Tokenizer:
    """Word-level vocabulary (``idx2token[i - 1]`` is the word of id ``i``)."""

    words: tuple[str, ...]
    threshold: int = 1

    def __post_init__(self) -> None:
        if UNK not in self.words:
            raise ValueError(f"a vocabulary needs the {UNK} token")
        if len(set(self.words)) != len(self.words):
            raise ValueError("vocabulary words must be unique")
        object.__setattr__(self, "_index", {w: i + 1 for i, w in enumerate(self.words)})

    @classmethod
    def build(cls, reports: Iterable[str], threshold: int = 10) -> Tokenizer:
        """Words of ``reports`` seen at least ``threshold`` times, plus ``<unk>``.

        Raises
        ------
        ValueError
            If ``threshold`` is below 1.
        """
        if int(threshold) < 1:
            raise ValueError(f"threshold must be at least 1, got {threshold}")
        counts = Counter(w for r in reports for w in clean_report(r).split())
        words = sorted([w for w, n in counts.items() if n >= threshold] + [UNK])
        return cls(tuple(words), int(threshold))

    @property
    def vocab_size(self) -> int:
        """Number of ids, including 0 (begin/end)."""
        return len(self.words) + 1

    @property
    def stop_id(self) -> int:
        """Id of the full stop (``.``) that ends each sentence."""
        return self._index.get(".", -1)

    def id_of(self, word: str) -> int:
        """The id of ``word`` (``<unk>``'s when it is not in the vocabulary)."""
        return self._index.get(word, self._index[UNK])

    def encode(self, report: str) -> list[int]:
        """``[0, ids..., 0]`` of a raw report."""
        return [BOS, *[self.id_of(w) for w in clean_report(report).split()], EOS]

    def decode(self, ids: Sequence[int]) -> str:
        """Words of ``ids`` up to the first end token (a leading 0 is skipped)."""
        out = []
        for k, i in enumerate(int(v) for v in ids):
            if i == EOS:
                if k == 0:
                    continue
                break
            if not 0 < i <= len(self.words):
                raise ValueError(f"token id {i} is outside the vocabulary (1..{len(self.words)})")
            out.append(self.words[i - 1])
        return " ".join(out)

    def to_dict(self) -> dict:
        """Plain data for a model card."""
        return {"words": list(self.words), "threshold": self.threshold}

    @classmethod
    def from_dict(cls, d: dict) -> Tokenizer:
        """Rebuild from :meth:`to_dict`."""
        return cls(tuple(d["words"]), int(d.get("threshold", 1)))
