"""iSight staining calls for a slide or a region: five tasks with probabilities.

Tiles come from the tissue mask at the checkpoint's input spec; they are
encoded in batches by the engine (so reading overlaps compute), then pooled
by the model's gated attention, so the attention over tiles becomes a heatmap.

Each head is in one of two cases: with the clinical text or on the image
alone. Which one follows ``text`` (``auto``: the checkpoint's own validation
decision per head, ``card.metrics["text_decision"]``; ``always``; ``never``);
the model divides by the temperature fitted for that case, and a head whose
calibration in that case was not acceptable on validation slides
(``card.metrics["calibration"]``) is marked hidden, with the reason, in
:meth:`ISightCalls.summary` and in the panel.
"""

from __future__ import annotations

import json
import re
from collections.abc import Generator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from histoscope.errors import CheckpointError
from histoscope.params import check, param
from histoscope.progress import Cancelled, Step, tagged
from histoscope.results import Provenance, Result, TileHeatmap
from histoscope.tasks._registry import TaskSpec, register
from histoscope.tissue import TileGrid, TissueMask, TissueParams, tile_grid, tissue_mask


@dataclass(frozen=True, kw_only=True)
class ISightCalls(Result):
    """The model's five calls for one slide or region.

    Attributes
    ----------
    probabilities
        ``task -> {class: probability}`` (temperature-scaled softmax).
    attention
        Heatmap of attention over the tiles that were read.
    heads
        ``task -> {"case", "shown", "hidden"}``: the case the head ran in
        (``"text"`` or ``"image"``), whether its calibration in that case is
        acceptable, and otherwise the line saying why it is hidden.
    ood
        :class:`~histoscope.ood.OODReport`: how far the slide's tile features
        are from the training slides' (``None`` when not assessed).
    """

    probabilities: dict[str, dict[str, float]]
    attention: TileHeatmap
    heads: dict[str, dict[str, Any]] = field(default_factory=dict)
    ood: Any = field(default=None, compare=False)

    def shown(self, task: str) -> bool:
        """Whether ``task``'s bars are shown (its calibration is acceptable in its case)."""
        return bool(self.heads.get(task, {}).get("shown", True))

    def hidden(self) -> dict[str, str]:
        """``task -> why it is hidden`` for every hidden head."""
        return {t: h["hidden"] for t, h in self.heads.items() if not h.get("shown", True)}

    def call(self, task: str) -> tuple[str, float]:
        """The most probable class of ``task`` and its probability."""
        probs = self.probabilities[task]
        best = max(probs, key=probs.__getitem__)
        return best, probs[best]

    def calls(self) -> dict[str, dict[str, Any]]:
        """Per task: call, confidence and all probabilities (what ``ihc.json`` holds)."""
        out = {}
        for task, probs in self.probabilities.items():
            best, p = self.call(task)
            head = self.heads.get(task, {})
            out[task] = {"call": best, "confidence": p, "probabilities": probs,
                         "case": head.get("case"), "shown": self.shown(task),
                         "hidden": head.get("hidden")}  # fmt: skip
        return out

    def to_layers(self) -> list:
        """The attention heatmap (fades to transparent at low attention), calls in metadata."""
        from histoscope.results import HEATMAP_OPACITY, fading_colormap

        data, kwargs, kind = self.attention.to_layers()[0]
        kwargs.update(colormap=fading_colormap("turbo"), opacity=HEATMAP_OPACITY)
        kwargs["metadata"]["colorbar"] = {"visible": True, "label": "iSight attention (min - max)"}
        kwargs["metadata"]["calls"] = self.calls()
        return [(data, kwargs, kind)]

    def summary(self) -> dict[str, Any]:
        """Per task: the call, its confidence, all probabilities, its case and whether shown.

        ``hidden`` lists the heads whose bars the panel hides and why; ``text``
        says whether clinical text was given and which heads used it.
        """
        from histoscope.ood import ood_summary

        prm = self.provenance.params
        out = {"calls": self.calls(), "tiles": len(self.attention.grid),
               "warning": prm.get("warning"), "hidden": self.hidden(),
               "text": {"given": bool(prm.get("metadata")), "mode": prm.get("text", "auto"),
                        "used_by": sorted(t for t, h in self.heads.items()
                                          if h.get("case") == "text"),
                        "notes": list(prm.get("text_notes") or [])}}  # fmt: skip
        if self.ood is not None:
            out.update(ood_summary(self.ood))
        return out

    def save(self, out_dir) -> list[Path]:
        """Write ``isight.json`` (calls and provenance) and the attention heatmap."""
        from histoscope.atomic import atomic_write_text

        out = Path(out_dir)
        doc = {**self.summary(), "provenance": self.provenance.to_dict()}
        files = [atomic_write_text(out / "isight.json", json.dumps(doc, indent=2) + "\n")]
        return files + self.attention.save(out)


#: How the clinical text is used: as the card decided per head, for every head, or never.
TEXT_MODES = ("auto", "always", "never")


@dataclass(frozen=True)
class ISightParams:
    """Settings of iSight's staining calls."""

    metadata: str = param("", "clinical text for the metadata encoder, e.g. "
                          "'Tissue: breast. Antibody: HER2.'")  # fmt: skip
    max_tiles: int = param(64, "at most this many tiles (evenly spread) are read", min=1,
                           max=4096)  # fmt: skip
    text: str = param("auto", "use the clinical text: auto (per head, as the checkpoint's "
                      "validation decided), always, or never", choices=TEXT_MODES)  # fmt: skip

    def __post_init__(self) -> None:
        check(self, "isight")


def _subset(grid: TileGrid, keep: np.ndarray) -> TileGrid:
    return replace(grid, coords=grid.coords[keep], index=grid.index[keep], tissue=grid.tissue[keep])


#: Tissue detection of checkpoints whose card names none (Otsu on inverted grey).
LEGACY_TISSUE = TissueParams(channel="grey")


def card_tissue(card) -> TissueParams:
    """The tissue detection a checkpoint's bags were made with (``card.data["tissue"]``)."""
    given = ((card.data or {}) if card is not None else {}).get("tissue")
    if not given:
        return LEGACY_TISSUE
    try:
        return TissueParams(**given)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"the iSight card's data.tissue {given!r} is not valid: {exc}"
        ) from exc


_CASE_WORDS = {"text": "with clinical text", "image": "without clinical text"}


def _card_metric(card, key: str):
    metrics = getattr(card, "metrics", None) or {}
    return metrics.get(key)


def text_heads(card, tasks, *, given: bool, mode: str = "auto") -> set[str]:
    """The heads that are given the clinical text.

    None without text or with ``mode="never"``; all with ``"always"``; with
    ``"auto"`` the heads whose ``use_text`` the card's ``text_decision`` sets
    (a card without a decision, older than issue 17: every head, as trained).

    Raises
    ------
    CheckpointError
        The card's ``metrics.text_decision`` is malformed.
    """
    if mode not in TEXT_MODES:
        raise ValueError(f"text must be one of {', '.join(TEXT_MODES)}, not {mode!r}")
    if not given or mode == "never":
        return set()
    decision = _card_metric(card, "text_decision")
    if mode == "always" or decision is None:
        return set(tasks)
    try:
        return {t for t in tasks if decision["heads"][t]["use_text"]}
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"the iSight card's metrics.text_decision is malformed ({exc!r} "
                              "missing or of the wrong type)") from exc  # fmt: skip


def head_status(card, task: str, case: str) -> dict[str, Any]:
    """``{"case", "shown", "hidden"}`` of one head in one case, from the card's calibration.

    A card without ``metrics.calibration`` (older than issue 11) shows every
    head; a head the calibration has no entry for in ``case`` is hidden.

    Raises
    ------
    CheckpointError
        The card's ``metrics.calibration`` is malformed.
    """
    cal = _card_metric(card, "calibration")
    if cal is None:
        return {"case": case, "shown": True, "hidden": None}
    try:
        entry = cal["cases"].get(case, {}).get(task)
        if entry is None:
            return {"case": case, "shown": False,
                    "hidden": f"{task} head hidden {_CASE_WORDS[case]}: not calibrated "
                              "for this case"}  # fmt: skip
        if entry["acceptable"]:
            return {"case": case, "shown": True, "hidden": None}
        line = entry.get("hidden_line") or (
            f"{task} head hidden {_CASE_WORDS[case]}: validation accuracy "
            f"{entry['accuracy']:.2f}, ECE {entry['ece']:.2f}"
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"the iSight card's metrics.calibration is malformed ({exc!r} "
                              "missing or of the wrong type)") from exc  # fmt: skip
    return {"case": case, "shown": False, "hidden": line}


def isight_grid(
    slide, spec, *, region: tuple[int, int, int, int] | None = None, max_tiles: int = 64,
    min_tissue: float = 0.25, tissue: TissueParams | None = None, mask: TissueMask | None = None,
) -> TileGrid:  # fmt: skip
    """Tissue tiles at the model's input spec, inside ``region``, at most ``max_tiles``.

    When there are more, an evenly spaced subset (in raster order) is kept, so
    the whole extent is represented and the choice is deterministic. ``tissue``
    is the detection to use (default :data:`LEGACY_TISSUE`; a checkpoint's own
    is :func:`card_tissue`); ``mask``, when given, is that detection already made.
    """
    if mask is None:
        mask = tissue_mask(slide, tissue or LEGACY_TISSUE)
    grid = tile_grid(slide, mask, spec.mpp, spec.tile_size, min_tissue=min_tissue)
    if len(grid) == 0:  # faint or small tissue: fall back to every tile
        grid = tile_grid(slide, None, spec.mpp, spec.tile_size)
    if region is not None:
        x, y, w, h = region
        c = grid.coords + grid.stride / 2
        inside = (c[:, 0] >= x) & (c[:, 0] < x + w) & (c[:, 1] >= y) & (c[:, 1] < y + h)
        if not inside.any():  # a region smaller than a tile: the tissue tiles it overlaps
            o, s = grid.coords, grid.stride
            inside = ((o[:, 0] < x + w) & (x < o[:, 0] + s)
                      & (o[:, 1] < y + h) & (y < o[:, 1] + s))  # fmt: skip
            if not inside.any():
                raise ValueError(f"{slide.path}: no tissue in the region {tuple(region)} "
                                 "(x, y, w, h in level-0 px); draw it over tissue")  # fmt: skip
        grid = _subset(grid, inside)
    if len(grid) > max_tiles:
        grid = _subset(
            grid, np.unique(np.linspace(0, len(grid) - 1, max_tiles).round().astype(int))
        )
    return grid


def iter_isight(
    target,
    model,
    card=None,
    *,
    metadata: str | None = None,
    text: str = "auto",
    region: tuple[int, int, int, int] | None = None,
    max_tiles: int = 64,
    batch: int = 16,
    engine=None,
) -> Generator[Step, bool | None, ISightCalls]:
    """Run iSight on a slide or session; yields progress, returns :class:`ISightCalls`.

    Parameters
    ----------
    target
        An open slide with known µm/px, or a :class:`~histoscope.session.Session`.
    model
        An :class:`histoscope.models.isight.ISight` (e.g. from ``load_checkpoint``).
    card
        Its checkpoint card (tissue detection, provenance).
    metadata
        Clinical text (tissue, SNOMED, antibody) given to the metadata encoder.
    text
        Which heads get that text (:func:`text_heads`); the others, and every
        head without text, run on the image alone.
    region
        Level-0 ``(x, y, w, h)`` to assess instead of the whole slide.

    Raises
    ------
    Cancelled
        If stopped: calls made from part of the tiles would mislead.
    """
    import torch

    from histoscope.engine import EngineParams, iter_tiles
    from histoscope.ood import with_ood
    from histoscope.session import open_session

    session = open_session(target, in_memory=True)
    slide, spec = session.slide, model.input_spec
    tissue = card_tissue(card)
    grid = isight_grid(slide, spec, region=region, max_tiles=max_tiles, tissue=tissue,
                       mask=session.tissue(tissue))  # fmt: skip
    no_tissue = len(session.grid(spec.mpp, spec.tile_size, 0.25, tissue)) == 0
    warning = ("no tissue found: every tile was read, glass included; treat the calls as "
               "unreliable") if no_tissue else None  # fmt: skip

    class _Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model.encode_tiles(x[:, None])[:, 0]

    encoder = _Encoder().eval()
    params = engine or EngineParams(batch_size=batch)
    out = yield from tagged(iter_tiles(encoder, slide, grid, spec, params), "iSight tiles")
    if out.cancelled:
        raise Cancelled("iSight stopped before every tile was read; no calls made")
    model.eval()
    dev = next(model.parameters()).device  # where the engine put it
    use = text_heads(card, model.classes, given=bool(metadata), mode=text)
    tokens = model.tokenize([metadata]) if use else None
    use, notes = text_use(model, use, tokens, metadata)
    feats = np.asarray(out.outputs)
    runs = {}
    with torch.no_grad():
        h = torch.from_numpy(feats).to(dev)[None].float()
        if use:
            runs["text"] = model.classify(h, None, tokens.to(dev))
        if len(use) < len(model.classes):  # never given text: the image alone
            runs["image"] = model.classify(h, None, None)
    probs, heads = {}, {}
    for task, classes in model.classes.items():
        case = "text" if task in use else "image"
        p = torch.softmax(runs[case][task][0].float(), dim=0).tolist()
        probs[task] = dict(zip(classes, p, strict=True))
        heads[task] = head_status(card, task, case)
    out = next(iter(runs.values()))  # attention does not depend on the text
    att = out["attention"][0].float().cpu().numpy()
    rows, cols = grid.shape
    img = np.full((rows, cols), np.nan, np.float32)
    img[grid.index[:, 0], grid.index[:, 1]] = att / max(float(att.max()), 1e-12)
    prov = Provenance(
        task="isight", slide=str(slide.path),
        checkpoint_sha256=getattr(card, "sha256", "") if card is not None else "",
        params={"metadata": metadata, "text": text, "text_used_by": sorted(use),
                "text_notes": notes,
                "region": list(region) if region else None, "max_tiles": max_tiles,
                "tissue": asdict(tissue), "warning": warning},
        mpp=spec.mpp, tile_grid=grid.to_dict(),
    )  # fmt: skip
    heat = TileHeatmap(provenance=prov, values=img, grid=grid, name="iSight attention")
    calls = ISightCalls(provenance=prov, probabilities=probs, attention=heat, heads=heads)
    return with_ood(calls, card, tile_features(feats), slide.path.name)


_WORD = re.compile(r"[a-z0-9]+")

#: Why a head that was to get the clinical text ran on the image alone.
NOT_UNDERSTOOD = "clinical text not understood; image alone"
NO_TISSUE_NAMED = "tissue: text names no known tissue; image alone"


def names_class(text: str | None, classes) -> bool:
    """Whether ``text`` names one of ``classes`` (its words, in order, among the text's words)."""
    words = _WORD.findall((text or "").lower())
    for name in classes:
        want = _WORD.findall(str(name).lower().replace("_", " "))
        n = len(want)
        if n and any(words[i : i + n] == want for i in range(len(words) - n + 1)):
            return True
    return False


def text_use(model, use: set[str], tokens, metadata: str | None) -> tuple[set[str], list[str]]:
    """The heads that really get the clinical text, and lines saying why others do not.

    A text the model's encoder makes nothing of (no word it can hash, e.g.
    ``"?"``) is no text: every head runs on the image alone. The tissue head
    was calibrated with texts that name the organ, so it gets the text only
    when the text names one of its classes.
    """
    if not use:
        return set(), []
    if tokens is None or not bool(model.has_text(tokens, 1)[0]):
        return set(), [NOT_UNDERSTOOD]
    if "tissue" in use and not names_class(metadata, model.classes.get("tissue", ())):
        return use - {"tissue"}, [NO_TISSUE_NAMED]
    return set(use), []


def tile_features(encoded: np.ndarray) -> np.ndarray:
    """One row per tile of the model's encoded tiles (token positions averaged).

    These are what the card's training-data reference (``card.data["ood"]``)
    was fitted on.
    """
    return encoded.mean(axis=1) if encoded.ndim == 3 else encoded


def run_isight(slide, model, card=None, **kwargs) -> ISightCalls:
    """:func:`iter_isight` run to the end."""
    from histoscope.progress import drive

    return drive(iter_isight(slide, model, card, **kwargs))


def _run(session, checkpoint, params: ISightParams, *, region=None, near=None, engine=None):
    model, card = checkpoint
    return (yield from iter_isight(session, model, card, metadata=params.metadata or None,
                                   text=params.text, region=region, max_tiles=params.max_tiles,
                                   engine=engine))  # fmt: skip


SPEC = register(TaskSpec(name="isight", title="iSight IHC calls", params=ISightParams, run=_run,
                         family="isight", default_checkpoint="isight_default.safetensors",
                         needs=("tissue",), region=True))  # fmt: skip
