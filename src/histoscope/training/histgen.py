"""Family ``histgen``: draft reports from slide patch features (SYSTEMS.md section 4).

Recipe sections (defaults in :data:`DEFAULTS`):

``data``
    ``path``: a folder in the HistGen layout (``reports.json`` with
    ``train``/``val``/``test`` lists of ``{id, report}``, ``features/<id>.h5``)
    and, for synthetic data, ``slides/<id>.report.json`` with the true
    findings; ``generate`` (``{first_seed, count, size, mpp, fractions}``):
    written by :func:`histoscope.reports.data.write_synthetic_reports` when
    ``reports.json`` is missing, with the CLAM default's feature encoder;
    ``features_dir`` / ``findings_dir`` when they live elsewhere (real data:
    ``findings_dir: null`` and no factual accuracy).
``model``
    :class:`histoscope.models.histgen.HistGen` settings and ``threshold``
    (the vocabulary's word-frequency threshold).
``eval``
    ``beam_size``, ``max_tokens``, ``block_trigrams``; ``val_slides``: how
    many validation slides pick the best epoch (``null``: all).

``train.batch`` slides per step (the authors train one slide per step; a
batch of padded slides gives the same per-slide computation and is several
times faster on a CPU); the epoch with the best validation BLEU-4 (beam
search) is kept. Held-out metrics on the test split:
BLEU-1..4, METEOR, ROUGE-L and factual accuracy for HistGen and, always in the
same table, the retrieval and template baselines
(:mod:`histoscope.reports.baselines`) and the reference reports themselves
(the factual parser's ceiling).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histoscope.atomic import atomic_path, atomic_write_text
from histoscope.reports.data import ReportSample, load_split
from histoscope.training._loop import TrainSettings, fit
from histoscope.training._recipe import RecipeError, check_keys, fingerprint

FAMILY = "histgen"
MODEL_KEYS = ("d_model", "n_heads", "n_layers", "d_ff", "dropout", "region_size", "memory_slots",
              "top_k", "prototypes", "max_len", "threshold")  # fmt: skip
DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {"path": None, "generate": None, "features_dir": None, "findings_dir": None},
    "model": {"d_model": 512, "n_heads": 8, "n_layers": 3, "d_ff": 512, "dropout": 0.1,
              "region_size": 96, "memory_slots": 2048, "top_k": 512, "prototypes": 512,
              "max_len": 120, "threshold": 10},
    "eval": {"beam_size": 3, "max_tokens": 100, "block_trigrams": True, "val_slides": None},
}  # fmt: skip
GENERATE_KEYS = ("first_seed", "count", "size", "mpp", "fractions")
TRAINED_ON = ("synthetic H&E slides from histoscope.synthetic with generated report text "
              "(small vocabulary); not trained on real tissue or real reports")  # fmt: skip


def settings(recipe: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The family's sections with defaults filled in; unknown keys are refused."""
    out = {}
    for section, defaults in DEFAULTS.items():
        given = recipe.get(section) or {}
        check_keys(given, defaults, section)
        out[section] = {**defaults, **given}
    if not out["data"]["path"]:
        raise RecipeError("recipe key data.path is required (a HistGen-layout report folder)")
    if out["data"]["generate"] is not None:
        check_keys(out["data"]["generate"], GENERATE_KEYS, "data.generate")
    return out


def ensure_data(data: Mapping[str, Any]) -> Path:
    """The data folder, written from ``data.generate`` when its ``reports.json`` is missing."""
    from histoscope.reports.data import write_synthetic_reports

    root = Path(data["path"])
    if (root / "reports.json").is_file():
        return root
    g = data.get("generate")
    if g is None:
        raise RecipeError(f"data folder {root} has no reports.json and no data.generate")
    first, count = int(g.get("first_seed", 0)), int(g.get("count", 10))
    write_synthetic_reports(root, range(first, first + count),
                            size=tuple(int(v) for v in g.get("size", (2048, 2048))),
                            mpp=float(g.get("mpp", 1.0)),
                            fractions=tuple(g.get("fractions", (0.75, 0.1, 0.15))))  # fmt: skip
    return root


def load_data(root: Path, data: Mapping[str, Any], split: str) -> list[ReportSample]:
    """One split of the folder, with findings when the folder has them."""
    feats = Path(data.get("features_dir") or root / "features")
    facts = data.get("findings_dir") or (root / "slides" if (root / "slides").is_dir() else None)
    return load_split(root / "reports.json", feats, split, findings_dir=facts)


# ----------------------------------------------------------------- evaluation
def generate_all(
    model, samples: Sequence[ReportSample], ev: Mapping[str, Any]
) -> tuple[list[str], float]:
    """HistGen's reports for ``samples`` and the mean seconds per slide."""
    texts, t0 = [], time.perf_counter()
    for s in samples:
        g = model.generate(s.features, beam_size=int(ev["beam_size"]),
                           max_tokens=int(ev["max_tokens"]),
                           block_trigrams=bool(ev["block_trigrams"]))  # fmt: skip
        texts.append(g.text)
    return texts, (time.perf_counter() - t0) / max(1, len(samples))


def score(texts: Sequence[str], samples: Sequence[ReportSample]) -> dict[str, Any]:
    """Word-overlap metrics and (with findings) factual accuracy of ``texts``."""
    from histoscope.reports.facts import factual_accuracy
    from histoscope.reports.metrics import nlg_metrics

    refs = [s.report for s in samples]
    out: dict[str, Any] = nlg_metrics(texts, refs)
    if all(s.findings for s in samples):
        fa = factual_accuracy(texts, [s.findings for s in samples], refs)
        out["factual_accuracy"] = fa["overall"]
        out["factual"] = {k: v["accuracy"] for k, v in fa["per_finding"].items()}
    return out


def compare(model, train: Sequence[ReportSample], test: Sequence[ReportSample],
            ev: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, list[str]]]:  # fmt: skip
    """HistGen, retrieval, template + classifier and the references, scored on ``test``."""
    from histoscope.reports.baselines import Retrieval, TemplateClassifier

    texts: dict[str, list[str]] = {}
    texts["histgen"], sec = generate_all(model, test, ev)
    retrieval = Retrieval(train)
    texts["retrieval"] = [retrieval(s.features) for s in test]
    if all(s.findings for s in train):
        template = TemplateClassifier(train)
        texts["template"] = [template(s.features) for s in test]
    texts["reference"] = [s.report for s in test]
    table = {name: score(t, test) for name, t in texts.items()}
    table["histgen"]["seconds_per_slide"] = sec
    return table, texts


def metric_table(table: Mapping[str, Mapping[str, Any]]) -> str:
    """The comparison as a Markdown table."""
    from histoscope.reports.facts import FINDINGS

    cols = ["bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "factual_accuracy"]
    facts = [f for f in FINDINGS if any(f in (r.get("factual") or {}) for r in table.values())]
    head = "| method | " + " | ".join(cols + facts) + " |"
    rows = [head, "|" + " --- |" * (len(cols) + len(facts) + 1)]
    for name, r in table.items():
        vals = [r.get(c) for c in cols] + [(r.get("factual") or {}).get(f) for f in facts]
        rows.append(
            f"| {name} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in vals) + " |"
        )
    return "\n".join(rows) + "\n"


def _write_outputs(out: Path, table: Mapping[str, Any], texts: Mapping[str, list[str]],
                   test: Sequence[ReportSample]) -> None:  # fmt: skip
    rows = [{"id": s.id, **{k: v[i] for k, v in texts.items()}} for i, s in enumerate(test)]
    atomic_write_text(out / "generated.json", json.dumps(rows, indent=1) + "\n")
    atomic_write_text(out / "metrics_table.md", metric_table(table))


# ----------------------------------------------------------------- train
def _build(cfg: Mapping[str, Any], in_dim: int, train: Sequence[ReportSample], seed: int):
    from histoscope.models.histgen import HistGen
    from histoscope.reports.tokenizer import Tokenizer

    m = dict(cfg["model"])
    tok = Tokenizer.build([s.report for s in train], int(m.pop("threshold")))
    torch.manual_seed(seed)
    return HistGen(in_dim, tok.to_dict(), **m)


def train(
    recipe: Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    resume: bool = True,
    progress: Callable[[int, int], Any] | None = None,
) -> dict[str, Any]:
    """Train HistGen and compare it with both baselines on the test split.

    Returns
    -------
    dict
        ``{"checkpoint": path, "metrics": {...}, "history": [...]}``.
    """
    from histoscope.checkpoints import ModelCard, save_checkpoint
    from histoscope.reports.metrics import (
        BLEU_IMPLEMENTATION,
        METEOR_IMPLEMENTATION,
        ROUGE_IMPLEMENTATION,
        nlg_metrics,
    )

    cfg = settings(recipe)
    ts = TrainSettings.from_recipe(recipe["train"])
    data, ev = cfg["data"], cfg["eval"]
    out = Path(out_dir)
    root = ensure_data(data)
    splits = {s: load_data(root, data, s) for s in ("train", "val", "test")}
    in_dim = int(splits["train"][0].features.shape[1])
    model = _build(cfg, in_dim, splits["train"], ts.seed)
    model.set_feature_stats([s.features for s in splits["train"]])
    feats = [torch.from_numpy(np.asarray(s.features, np.float32)) for s in splits["train"]]
    toks = [model.encode_report(s.report) for s in splits["train"]]
    n = len(feats)

    def batches(epoch: int, gen: torch.Generator):
        order = torch.randperm(n, generator=gen).tolist()
        for i in range(0, n, ts.batch):
            idx = order[i : i + ts.batch]
            yield [feats[j] for j in idx], [toks[j] for j in idx]

    def loss_fn(m, batch) -> torch.Tensor:
        return m.loss_batch(*batch)

    def validate(m) -> dict[str, float]:
        val = splits["val"][: ev["val_slides"] or None]
        texts, _ = generate_all(m, val, ev)
        r = nlg_metrics(texts, [s.report for s in val])
        return {f"val_{k}": v for k, v in r.items()}

    if ts.monitor is None:
        ts = replace(ts, monitor="val_bleu_4", monitor_mode="max")
    fp = fingerprint({**recipe, "_model": model.config})
    fitted = fit(model, batches, loss_fn, ts, out, steps_per_epoch=-(-n // ts.batch), validate=validate,
                 resume=resume, progress=progress, fingerprint=fp)  # fmt: skip
    model.eval()
    table, texts = compare(model, splits["train"], splits["test"], ev)
    _write_outputs(out, table, texts, splits["test"])
    descriptor = _encoder(root)
    metrics = {"best_epoch": fitted.best_epoch, "split": "test", "n_test": len(splits["test"]),
               "table": table,
               "implementations": {"bleu": BLEU_IMPLEMENTATION, "meteor": METEOR_IMPLEMENTATION,
                                   "rouge_l": ROUGE_IMPLEMENTATION}}  # fmt: skip
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    card = ModelCard(
        family=FAMILY, config=model.config, input_spec=(descriptor or {}).get("input_spec", {}),
        recipe=dict(recipe),
        data={"path": str(root), "trained_on": TRAINED_ON, "synthetic": True,
              "features": descriptor, "machine_generated_text": True,
              "slides": {s: [x.id for x in v] for s, v in splits.items()}},
        metrics=metrics,
    )  # fmt: skip
    ckpt = save_checkpoint(out / f"{recipe.get('name') or FAMILY}.safetensors", model, card)
    if recipe.get("export"):
        with atomic_path(recipe["export"]) as tmp:
            shutil.copyfile(ckpt, tmp)
    return {"checkpoint": str(ckpt), "metrics": metrics, "history": fitted.history}


def _encoder(root: Path) -> dict[str, Any] | None:
    """The feature encoder a data folder names (``encoder.json``), if it says."""
    p = root / "encoder.json"
    return json.loads(p.read_text()) if p.is_file() else None


# ----------------------------------------------------------------- evaluate
def evaluate(
    checkpoint_path: str | os.PathLike,
    data_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    split: str = "test",
    beam_size: int | None = None,
) -> dict[str, Any]:
    """HistGen against retrieval and template baselines on one split of a HistGen-layout folder.

    Writes ``generated.json`` (every method's report per slide) and
    ``metrics_table.md``.

    Raises
    ------
    histoscope.CheckpointError
        If the checkpoint is not a ``histgen`` one, or the folder's features
        come from another encoder than the one the card names.
    """
    from histoscope.checkpoints import load_checkpoint
    from histoscope.errors import CheckpointError

    model, card = load_checkpoint(checkpoint_path, family=FAMILY)
    root = Path(data_path)
    want = (card.data.get("features") or {}).get("weights_sha256")
    got = (_encoder(root) or {}).get("weights_sha256")
    if want and got and want != got:
        raise CheckpointError(f"{root}: features from encoder {got[:12]}..., the report model "
                              f"expects {want[:12]}...")  # fmt: skip
    data = {"features_dir": None, "findings_dir": None}
    ev = {**DEFAULTS["eval"], **((card.recipe or {}).get("eval") or {})}
    if beam_size is not None:
        ev["beam_size"] = int(beam_size)
    test = load_data(root, data, split)
    table, texts = compare(model, load_data(root, data, "train"), test, ev)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_outputs(out, table, texts, test)
    return {"split": split, "n": len(test), "table": table, "beam_size": ev["beam_size"]}
