"""Word-overlap metrics of generated reports: BLEU-1..4, METEOR, ROUGE-L (Java-free).

The authors score with pycocoevalcap (BLEU and ROUGE-L in Python, METEOR
through the Java METEOR 1.5 jar). No Java is used here:

- **BLEU-n**: ``nltk.translate.bleu_score.corpus_bleu`` (corpus level, one
  reference per report, no smoothing) on the cleaned reports' tokens (the
  full stop is a token, as in the authors' data).
- **METEOR**: ``nltk.translate.meteor_score.meteor_score`` per report,
  averaged, with exact and Porter-stem matching only: the WordNet synonym
  stage is given an empty stand-in because WordNet's data cannot be
  downloaded here. This is not the Java METEOR 1.5 (which also has paraphrase
  tables and other parameters); numbers differ from the authors' scorer.
- **ROUGE-L**: ``rouge_score`` (Google's package) ``rougeL`` F1 per report,
  averaged (pycocoevalcap uses an F-measure with beta 1.2 instead).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from histoscope.reports.tokenizer import clean_report

METEOR_IMPLEMENTATION = ("nltk.translate.meteor_score (exact + Porter stem matching; "
                         "no WordNet synonyms; not the Java METEOR 1.5)")  # fmt: skip
BLEU_IMPLEMENTATION = "nltk.translate.bleu_score.corpus_bleu (no smoothing)"
ROUGE_IMPLEMENTATION = "rouge_score rougeL F1, averaged over reports"


class _NoSynonyms:
    """Stands in for nltk's WordNet reader: no word has synonyms."""

    @staticmethod
    def synsets(word: str) -> list:
        return []


def nlg_metrics(generated: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """BLEU-1..4, METEOR and ROUGE-L of ``generated`` against one reference each.

    Both sides are cleaned first (:func:`~histoscope.reports.tokenizer.clean_report`).

    Raises
    ------
    ValueError
        If the lists differ in length or are empty.
    """
    from nltk.translate.bleu_score import corpus_bleu
    from nltk.translate.meteor_score import meteor_score
    from rouge_score.rouge_scorer import RougeScorer

    if len(generated) != len(references) or not generated:
        raise ValueError(f"need as many generated reports as references (got {len(generated)} "
                         f"and {len(references)}), at least one")  # fmt: skip
    hyp = [clean_report(g).split() for g in generated]
    ref = [clean_report(r).split() for r in references]
    out = {}
    with warnings.catch_warnings():  # nltk warns when a BLEU-n is 0; 0 is the answer
        warnings.filterwarnings("ignore", category=UserWarning, module="nltk")
        for n in range(1, 5):
            w = tuple([1.0 / n] * n)
            out[f"bleu_{n}"] = float(corpus_bleu([[r] for r in ref], hyp, weights=w))
    wn = _NoSynonyms()
    out["meteor"] = float(sum(meteor_score([r], h, wordnet=wn) for r, h in zip(ref, hyp, strict=True))
                          / len(hyp))  # fmt: skip
    scorer = RougeScorer(["rougeL"])
    out["rouge_l"] = float(sum(scorer.score(" ".join(r), " ".join(h))["rougeL"].fmeasure
                               for r, h in zip(ref, hyp, strict=True)) / len(hyp))  # fmt: skip
    return out
