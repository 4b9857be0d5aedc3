"""The two baselines every report evaluation shows next to HistGen.

- :class:`Retrieval`: the report of the training slide whose mean patch
  feature is nearest (Euclidean, after standardising each feature with the
  training slides' statistics). Strong on word-overlap metrics, because it
  copies a real report's wording.
- :class:`TemplateClassifier`: a fixed report template whose blanks are filled
  by a slide classifier: ridge classifiers (organ, malignant, necrosis,
  margin, immune infiltration) and ridge regressors (tumour percent, size) on
  each slide's pooled features (mean and max over patches, log patch count),
  trained on the training slides' findings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from histoscope.reports.data import ReportSample

DIAGNOSIS = {"colon": "adenocarcinoma", "stomach": "adenocarcinoma",
             "breast": "invasive carcinoma of no special type",
             "lymph node": "metastatic carcinoma", "prostate": "acinar adenocarcinoma",
             "lung": "non-small cell carcinoma", "skin": "squamous cell carcinoma",
             "uterus": "endometrioid carcinoma"}  # fmt: skip


def pooled(features: np.ndarray) -> np.ndarray:
    """``[mean, max, log(n)]`` of one slide's ``(N, D)`` patch features."""
    f = np.asarray(features, np.float64)
    return np.concatenate([f.mean(0), f.max(0), [np.log(len(f))]])


class _Scaler:
    def __init__(self, x: np.ndarray) -> None:
        self.mu, self.sd = x.mean(0), x.std(0) + 1e-6

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mu) / self.sd


class Retrieval:
    """Nearest training slide by standardised mean patch feature; its report."""

    name = "retrieval"

    def __init__(self, train: Sequence[ReportSample]) -> None:
        if not train:
            raise ValueError("retrieval needs at least one training slide")
        means = np.stack([np.asarray(s.features, np.float64).mean(0) for s in train])
        self.scale = _Scaler(means)
        self.bank = self.scale(means)
        self.reports = [s.report for s in train]
        self.ids = [s.id for s in train]

    def nearest(self, features: np.ndarray) -> int:
        """Index of the nearest training slide."""
        q = self.scale(np.asarray(features, np.float64).mean(0))
        return int(((self.bank - q) ** 2).sum(1).argmin())

    def __call__(self, features: np.ndarray) -> str:
        """The nearest training slide's report."""
        return self.reports[self.nearest(features)]


def _ridge(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    xb = np.hstack([x, np.ones((len(x), 1))])
    reg = lam * np.eye(xb.shape[1])
    reg[-1, -1] = 0.0
    return np.linalg.solve(xb.T @ xb + reg, xb.T @ y)


def _apply(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.hstack([x, np.ones((len(x), 1))]) @ w


class TemplateClassifier:
    """A fixed template filled by ridge classifiers and regressors on pooled features.

    Parameters
    ----------
    train
        Training slides with their ``findings``.
    lam
        Ridge penalty (on standardised features).
    """

    name = "template + classifier"
    CATEGORICAL = ("organ", "malignant", "necrosis", "margin", "immune_infiltration")
    NUMERIC = ("tumour_percent", "tumour_size_mm")

    def __init__(self, train: Sequence[ReportSample], lam: float = 10.0) -> None:
        if not train or any(not s.findings for s in train):
            raise ValueError("the template classifier needs training slides with findings")
        x = np.stack([pooled(s.features) for s in train])
        self.scale = _Scaler(x)
        x = self.scale(x)
        self.heads: dict[str, tuple[list[Any], np.ndarray]] = {}
        for k in self.CATEGORICAL:
            rows = [i for i, s in enumerate(train) if s.findings.get(k) is not None]
            labels = [train[i].findings[k] for i in rows]
            classes = sorted(set(labels), key=str)
            y = np.eye(len(classes))[[classes.index(v) for v in labels]]
            self.heads[k] = (classes, _ridge(x[rows], y, lam))
        self.reg: dict[str, np.ndarray] = {}
        for k in self.NUMERIC:
            rows = [i for i, s in enumerate(train) if s.findings.get("malignant")
                    and s.findings.get(k) is not None]  # fmt: skip
            y = np.array([float(train[i].findings[k]) for i in rows])
            self.reg[k] = _ridge(x[rows], y, lam)

    def predict(self, features: np.ndarray) -> dict[str, Any]:
        """Predicted findings of one slide."""
        x = self.scale(pooled(features)[None])
        out: dict[str, Any] = {}
        for k, (classes, w) in self.heads.items():
            out[k] = classes[int(_apply(w, x)[0].argmax())]
        for k, w in self.reg.items():
            out[k] = float(_apply(w, x)[0])
        return out

    def __call__(self, features: np.ndarray) -> str:
        """The filled template."""
        return fill_template(self.predict(features))


def fill_template(f: Mapping[str, Any]) -> str:
    """The baseline's fixed report for findings ``f``."""
    organ = str(f["organ"])
    if not f["malignant"]:
        return f"{organ.capitalize()}, biopsy: Negative for malignancy."
    pct = min(100.0, max(0.0, float(f["tumour_percent"])))
    size = max(0.1, float(f["tumour_size_mm"]))
    nec = "Tumour necrosis is present." if f["necrosis"] else "No necrosis is identified."
    margin = ("The margin is involved by tumour." if f["margin"] == "involved"
              else "Margins are free of tumour.")  # fmt: skip
    return (
        f"{organ.capitalize()}, biopsy: Diagnosis: {DIAGNOSIS[organ]}. Tumour occupies "
        f"approximately {pct:.0f}% of the tissue and spans {size:.1f} mm. "
        f"Tumour-infiltrating lymphocytes are {f['immune_infiltration']}. {nec} {margin}"
    )
