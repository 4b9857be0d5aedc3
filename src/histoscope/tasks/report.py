"""A draft report for the slide (HistGen), each sentence with the regions it attended to.

The task reads the session's feature table (the same encoder, grid and cached
table the CLAM task uses: the encoder is the one the checkpoint's card names),
runs the ``histgen`` model once over all tile features, and returns a
:class:`ReportResult`: the text, its sentences, per sentence the attention
over tiles (summing to 1) and its top regions in level-0 pixels and µm. The
report is machine-generated and says so everywhere it is shown or written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from histoscope.atomic import atomic_write_text
from histoscope.params import check, param
from histoscope.progress import Cancelled, Step, tagged
from histoscope.reports.store import MACHINE_GENERATED
from histoscope.results import Provenance, Result, TileHeatmap
from histoscope.tasks._registry import TaskSpec, register

if TYPE_CHECKING:
    from histoscope.results import LayerDataTuple
    from histoscope.tissue import TileGrid

__all__ = ["MACHINE_GENERATED", "NOT_SPECIFIC", "ReportParams", "ReportResult"]

#: Said (panel, ``report.md``, ``report.json``) where a sentence's evidence singles out nothing.
NOT_SPECIFIC = "evidence is not sentence-specific"
#: A map whose largest attention is under this times its smallest is near-uniform.
UNIFORM_RATIO = 1.01


@dataclass(frozen=True)
class ReportParams:
    """Settings of report generation."""

    beam_size: int = param(3, "beams of the beam search (1: greedy)", min=1, max=10)
    max_tokens: int = param(100, "most words (and full stops) written", min=1, max=300)
    block_trigrams: bool = param(True, "never repeat a three-word sequence")
    top_regions: int = param(5, "most-attended tiles listed per sentence", min=1, max=100)
    min_tissue: float | None = param(None, "tissue fraction a tile needs (none: the "
                                     "checkpoint's recipe, else 0.5)", min=0.0, max=1.0)  # fmt: skip

    def __post_init__(self) -> None:
        check(self, "report")


@dataclass(frozen=True, kw_only=True)
class ReportResult(Result):
    """A generated report and its evidence.

    Attributes
    ----------
    text
        The report as prose (sentences capitalised, full stops).
    sentences
        Its sentences, in order, written as in :attr:`text` (capitalised, full stops).
    attention
        ``(S, N)``: per sentence, attention over the grid's tiles (rows sum to 1).
    grid
        The tile grid the features were read on.
    trained_on
        What the model was trained on (from its card).
    top_regions
        How many tiles :meth:`evidence` lists per sentence.
    """

    text: str
    sentences: tuple[str, ...]
    attention: np.ndarray
    grid: TileGrid
    trained_on: str = ""
    top_regions: int = 5
    ood: Any = None  # OODReport: is the slide outside the training data?

    def evidence(self, sentence: int) -> list[dict[str, Any]]:
        """The most attended tiles of one sentence: rank, attention, level-0 box and µm box."""
        a = self.attention[sentence]
        mpp, size = self.grid.slide_mpp, self.grid.stride
        order = np.argsort(-a, kind="stable")[: self.top_regions]
        return [{"rank": r + 1, "attention": float(a[i]), "x": int(self.grid.coords[i, 0]),
                 "y": int(self.grid.coords[i, 1]), "width": float(size), "height": float(size),
                 "x_um": float(self.grid.coords[i, 0] * mpp),
                 "y_um": float(self.grid.coords[i, 1] * mpp), "width_um": float(size * mpp),
                 "height_um": float(size * mpp)} for r, i in enumerate(order)]  # fmt: skip

    def evidence_note(self, sentence: int) -> str:
        """``""`` when the sentence's attention singles out tiles of its own, else why not.

        Not specific: the slide has one tissue region, the map is near-uniform
        (max/min under :data:`UNIFORM_RATIO`), or it is the same map as another
        sentence's (its most attended tiles are then no evidence of this sentence).
        """
        att = np.asarray(self.attention, np.float64)
        a = att[sentence]
        if a.size <= 1:
            return f"{NOT_SPECIFIC}: the slide has one tissue region"
        lo, hi = float(a.min()), float(a.max())
        if hi < UNIFORM_RATIO * lo:
            return (f"{NOT_SPECIFIC}: attention is near-uniform over the {a.size} tiles "
                    f"(max/min {hi / lo:.3f})")  # fmt: skip
        for j, b in enumerate(att):
            if j != sentence and np.allclose(a, b, rtol=1e-3, atol=1e-3 * max(hi, b.max())):
                return f"{NOT_SPECIFIC}: the same attention as sentence {j + 1}"
        return ""

    def heatmap(self, sentence: int) -> TileHeatmap:
        """One sentence's attention as a heatmap over the slide (NaN off tissue)."""
        from histoscope.engine import TileOutputs

        if not 0 <= sentence < len(self.sentences):
            raise IndexError(f"sentence {sentence} out of range (report has {len(self.sentences)})")
        out = TileOutputs(self.grid, self.attention[sentence][:, None].astype(np.float32),
                          np.ones(len(self.grid), bool))  # fmt: skip
        name = f"report evidence: sentence {sentence + 1}"
        return TileHeatmap.from_outputs(out, self.provenance, name=name, channel=0)

    def to_layers(self, sentence: int = 0) -> list[LayerDataTuple]:
        """One sentence's evidence heatmap (placed in µm) and its top regions as points."""
        if not self.sentences:
            return []
        data, kwargs, kind = self.heatmap(sentence).to_layers()[0]
        note = self.evidence_note(sentence)
        kwargs["metadata"]["report"] = {"sentence": sentence, "text": self.sentences[sentence],
                                        "machine_generated": MACHINE_GENERATED,
                                        "evidence_note": note}  # fmt: skip
        # attention 0 is "none": a min-max stretch would make near-uniform noise look like signal
        top = float(np.max(self.attention[sentence]))
        kwargs["contrast_limits"] = (0.0, top if top > 0 else 1.0)
        kwargs["metadata"]["colorbar"] = {"visible": True,
                                          "label": f"attention of sentence {sentence + 1}"}  # fmt: skip
        ev = self.evidence(sentence)
        mpp, half = self.grid.slide_mpp, self.grid.stride / 2
        pts = np.array([[(e["y"] + half - 0.5) * mpp, (e["x"] + half - 0.5) * mpp] for e in ev])
        points = (pts, {"name": f"report evidence: top regions of sentence {sentence + 1}",
                        "properties": {"rank": np.array([e["rank"] for e in ev])},
                        "symbol": "square", "size": self.grid.stride * mpp, "units": ("um", "um"),
                        "face_color": "transparent", "border_color": "cyan",
                        "metadata": {"histoscope": self.provenance.to_dict()}}, "points")  # fmt: skip
        return [(data, kwargs, kind), points]

    def summary(self) -> dict[str, Any]:
        """The report, its sentences and per sentence the top regions, as plain data.

        Each sentence says whether its evidence is specific to it (``evidence_note``
        says why not); the top-level ``evidence_note`` sums that up.
        """
        notes = [self.evidence_note(i) for i in range(len(self.sentences))]
        return {
            "machine_generated": MACHINE_GENERATED,
            "trained_on": self.trained_on,
            "text": self.text,
            "sentences": [
                {
                    "index": i,
                    "text": s,
                    "top_regions": self.evidence(i),
                    "evidence_specific": not notes[i],
                    "evidence_note": notes[i],
                }
                for i, s in enumerate(self.sentences)
            ],  # fmt: skip
            "evidence_note": _overall(notes),
            "n_tiles": len(self.grid),
            "cancelled": self.cancelled,
        } | self._ood_keys()

    def _ood_keys(self) -> dict[str, Any]:
        from histoscope.ood import ood_summary

        return ood_summary(self.ood) if self.ood is not None else {}

    def to_markdown(self) -> str:
        """``report.md``: the label, the text and each sentence's top regions."""
        lines = [f"# Draft report: {Path(self.provenance.slide).name}", "",
                 f"> **{MACHINE_GENERATED}**", f"> Model trained on: {self.trained_on}", "",
                 self.text, "", "## Evidence per sentence", ""]  # fmt: skip
        notes = [self.evidence_note(i) for i in range(len(self.sentences))]
        if _overall(notes):
            lines += [f"> **{_overall(notes)}**", ""]
        for i, s in enumerate(self.sentences):
            lines.append(f"{i + 1}. {s}")
            if notes[i]:
                lines.append(f"   - **{notes[i]}**")
            for e in self.evidence(i):
                lines.append(f"   - region {e['rank']}: x={e['x']} y={e['y']} px "
                             f"({e['x_um']:.1f}, {e['y_um']:.1f} µm), {e['width']:.0f} px "
                             f"square, attention {e['attention']:.3f}")  # fmt: skip
        return "\n".join(lines) + "\n"

    def save_evidence(self, path: str | os.PathLike) -> Path:
        """Write everything :meth:`load_evidence` needs to show this report again (``.npz``).

        The text, sentences, attention, tile grid and provenance, written atomically.
        """
        import io

        from histoscope.atomic import atomic_write_bytes

        g = self.grid
        meta = {"text": self.text, "sentences": list(self.sentences),
                "trained_on": self.trained_on, "top_regions": self.top_regions,
                "grid": {"shape": list(g.shape), "tile_size": g.tile_size, "mpp": g.mpp,
                         "slide_mpp": g.slide_mpp},
                "provenance": self.provenance.to_dict()}  # fmt: skip
        buf = io.BytesIO()
        np.savez_compressed(buf, attention=self.attention.astype(np.float32), coords=g.coords,
                            index=g.index, tissue=g.tissue, meta=np.array(json.dumps(meta)))  # fmt: skip
        return atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load_evidence(cls, path: str | os.PathLike) -> ReportResult:
        """The report :meth:`save_evidence` wrote to ``path``.

        Raises
        ------
        ReportError
            If the file is missing or is not a saved report (the message says which).
        """
        from histoscope.reports.store import ReportError
        from histoscope.tissue import TileGrid

        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                att, coords, index, tissue = (z[k] for k in ("attention", "coords", "index",
                                                             "tissue"))  # fmt: skip
            g = meta["grid"]
            grid = TileGrid(coords=coords, index=index, shape=tuple(g["shape"]),
                            tile_size=int(g["tile_size"]), mpp=float(g["mpp"]),
                            slide_mpp=float(g["slide_mpp"]), tissue=tissue)  # fmt: skip
            res = cls(provenance=Provenance(**meta["provenance"]), text=meta["text"],
                      sentences=tuple(meta["sentences"]), attention=att, grid=grid,
                      trained_on=meta.get("trained_on", ""),
                      top_regions=int(meta.get("top_regions", 5)))  # fmt: skip
        except FileNotFoundError:
            raise ReportError(f"{path}: the report's evidence file is missing") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ReportError(f"{path}: not a saved report evidence file ({exc})") from None
        if att.shape != (len(res.sentences), len(grid)):
            raise ReportError(f"{path}: attention of shape {att.shape} does not match "
                              f"{len(res.sentences)} sentences over {len(grid)} tiles")  # fmt: skip
        return res

    def save(self, out_dir: str | os.PathLike) -> list[Path]:
        """Write ``report.json`` (text, sentences, evidence, attention, provenance) and ``report.md``."""
        out = Path(out_dir)
        doc = {**self.summary(), "attention": np.round(self.attention, 6).tolist(),
               "tile_coords": self.grid.coords.tolist(), "slide_mpp": float(self.grid.slide_mpp),
               "tile_size_level0": float(self.grid.stride),
               "provenance": self.provenance.to_dict()}  # fmt: skip
        return [atomic_write_text(out / "report.json", json.dumps(doc, indent=1) + "\n"),
                atomic_write_text(out / "report.md", self.to_markdown())]  # fmt: skip


def _overall(notes: list[str]) -> str:
    """One line on the sentences whose evidence is not specific, or ``""``."""
    which = [str(i + 1) for i, n in enumerate(notes) if n]
    if not which:
        return ""
    if len(which) == len(notes):
        return f"{NOT_SPECIFIC} (no sentence's attention singles out tiles of its own)"
    return f"{NOT_SPECIFIC} for sentence(s) {', '.join(which)}"


def _run(session, checkpoint, params: ReportParams, *, region=None, near=None, engine=None):
    from histoscope.features import feature_model_for

    model, card = checkpoint
    yield Step(0, 0, "finding tissue and the feature encoder")
    fm = session.product("feature_model", card.sha256, lambda: feature_model_for(card))
    if fm.feature_dim != model.in_dim:
        raise ValueError(f"feature encoder gives {fm.feature_dim}-d features, the report model "
                         f"expects {model.in_dim}")  # fmt: skip
    mt = params.min_tissue
    if mt is None:
        mt = float((card.data or {}).get("min_tissue", 0.5))
    grid = session.grid(fm.spec.mpp, fm.spec.tile_size, mt)
    if len(grid) == 0:
        raise ValueError(f"{session.slide.path}: no tissue tiles to report on (min_tissue={mt})")
    table = yield from tagged(session.iter_features(fm, grid, engine, near=near), "report tiles")
    if not table.complete:
        raise Cancelled("report stopped before every tile was encoded (a partial report would "
                        "mislead)")  # fmt: skip
    sent = yield Step(0, 1, "writing the report")
    if sent is False:
        raise Cancelled("report stopped before the text was written")
    from histoscope.reports.tokenizer import display

    g = model.generate(table.features, beam_size=params.beam_size, max_tokens=params.max_tokens,
                       block_trigrams=params.block_trigrams)  # fmt: skip
    prov = Provenance(task="report", slide=str(session.slide.path),
                      checkpoint_sha256=card.sha256 or "", params=params, mpp=fm.spec.mpp,
                      tile_grid=grid.to_dict())  # fmt: skip
    yield Step(1, 1, "writing the report")
    # each sentence written as the text writes it: capitalised, ended by a full stop
    sentences = tuple(display(s) or s for s in g.sentences)
    res = ReportResult(provenance=prov, text=display(g.text), sentences=sentences,
                       attention=g.attention.astype(np.float32), grid=grid,
                       trained_on=str((card.data or {}).get("trained_on", "")),
                       top_regions=params.top_regions)  # fmt: skip
    # outside training data (issue 11): the tile features against the card's reference
    from histoscope.ood import with_ood

    return with_ood(res, card, table.features, session.slide.path.name)


SPEC = register(TaskSpec(name="report", title="Draft report (HistGen)", params=ReportParams,
                         run=_run, family="histgen", default_checkpoint="histgen_default.safetensors",
                         needs=("tissue", "features")))  # fmt: skip
