"""Gene expression at 2 µm over the slide: an OME-Zarr stack written tile by tile.

Patches of the model's bin grid covering tissue (the session's tissue mask)
are predicted in the order the engine reads them (the view first with
``near``), each batch written straight into the stack
(:class:`~histoscope.expression.stack.StackWriter`) in the session folder, so
memory stays flat whatever the slide's size; a stack of the same slide and
checkpoint is reused, so a later run fills in only what is missing. The
Result shows chosen genes as multiscale image layers at 2 µm per pixel over
the slide, exports AnnData of bins at 2, 8 and 16 µm, and gives per-cell
expression under nucleus centroids or outlines.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from histoscope.params import ParamError, check, param
from histoscope.progress import Cancelled, Step, tagged
from histoscope.results import Provenance, Result, plain
from histoscope.tasks._registry import TaskSpec, register

__all__ = ["ExpressionParams", "ExpressionResult", "cell_expression"]

#: Colour maps given to the genes shown, in order (additive blending mixes them).
COLORMAPS = ("magenta", "green", "cyan", "yellow", "red", "blue")
MAX_SHOWN = len(COLORMAPS)


def cell_expression(stack, x, y, *, radius_px=None, outlines=None) -> np.ndarray:
    """Mean predicted expression under each nucleus (see :func:`histoscope.expression.stack.cell_expression`)."""
    from histoscope.expression.stack import cell_expression as impl

    return impl(stack, x, y, radius_px=radius_px, outlines=outlines)


def _gene_list(text: str) -> tuple[str, ...]:
    return tuple(g.strip() for g in str(text).split(",") if g.strip())


@dataclass(frozen=True)
class ExpressionParams:
    """Settings of the expression map."""

    genes: str = param("", f"genes shown as layers, comma-separated (at most {MAX_SHOWN}; "
                       "default: the first two of the model)")  # fmt: skip
    min_tissue: float = param(0.1, "patches with at most this tissue fraction are skipped",
                              min=0.0, max=1.0)  # fmt: skip
    percentile: float = param(99.5, "upper contrast limit: this percentile of a gene's values",
                              min=50.0, max=100.0)  # fmt: skip

    def __post_init__(self) -> None:
        check(self, "expression")
        if len(_gene_list(self.genes)) > MAX_SHOWN:
            raise ParamError(f"expression.genes={self.genes!r}: at most {MAX_SHOWN} genes at once")


@dataclass(frozen=True, kw_only=True)
class ExpressionResult(Result):
    """Predicted expression per 2 µm bin, in an OME-Zarr stack.

    Attributes
    ----------
    stack
        The ``.ome.zarr`` folder (genes x bins).
    genes
        All genes of the stack.
    shown
        Genes :meth:`to_layers` shows.
    patches
        ``{"done", "total"}`` patches of this run (``done`` counts reused ones).
    percentile
        Upper contrast percentile.
    cells, cell_values
        The session's cells (:class:`~histoscope.tasks.cells.CellsResult`) when it had
        any, and the mean predicted expression under each nucleus, ``(n_cells, n_genes)``
        (NaN where no bin under it was predicted).
    limits
        Contrast limits of the shown genes, measured by the task (``None``:
        measured when asked, see :meth:`contrast`).
    scratch
        For a session without a folder, the :class:`ScratchFolder` holding the
        stack: the folder is deleted once no session or result holds it.
    """

    stack: Path
    genes: tuple[str, ...]
    shown: tuple[str, ...]
    patches: dict[str, int] = field(default_factory=dict)
    percentile: float = 99.5
    cells: Any = None
    cell_values: np.ndarray | None = None
    scratch: Any = field(default=None, repr=False, compare=False)
    limits: dict[str, tuple[float, float]] | None = field(default=None, repr=False)
    ood: Any = field(default=None, compare=False)  # OODReport: outside the training data?

    def meta(self) -> dict[str, Any]:
        from histoscope.expression.stack import read_stack_attrs

        return read_stack_attrs(self.stack)

    def placement(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """``(scale, translate)`` in µm of the full resolution: bins sit on their pixels."""
        m = self.meta()
        off = m["bin_um"] / 2 - m["slide_mpp"] / 2
        return (m["bin_um"], m["bin_um"]), (off, off)

    def contrast(self, gene: str) -> tuple[float, float]:
        """Contrast limits: the 1st and ``percentile``-th percentile of the top level.

        Taken from :attr:`limits` when the task measured them (in its worker,
        so a viewer never reads the stack on its GUI thread): ``(0, 1)`` for a
        gene not measured yet (nothing predicted).
        """
        if self.limits is not None:
            return self.limits.get(gene, (0.0, 1.0))
        return self._measure(gene) or (0.0, 1.0)

    def _measure(self, gene: str) -> tuple[float, float] | None:
        """Percentile contrast of ``gene`` read from the stack's top level (None: no values)."""
        from histoscope.expression.stack import open_levels

        top = np.asarray(open_levels(self.stack, gene)[-1])
        v = top[np.isfinite(top)]
        if not v.size:
            return None
        lo, hi = (float(q) for q in np.percentile(v, [1.0, self.percentile]))
        return lo, hi if hi > lo else lo + 1e-6

    def measured(self, keep: dict[str, tuple[float, float]] | None = None) -> ExpressionResult:
        """This result with the shown genes' contrast limits read from the stack now.

        Genes in ``keep`` take those limits instead (no read). Reads the stack:
        call it off the GUI thread.
        """
        limits = dict(keep or {})
        for gene in self.shown:
            if gene not in limits and (lim := self._measure(gene)) is not None:
                limits[gene] = lim
        return replace(self, limits=limits)

    def to_layers(self) -> list:
        """One multiscale image layer per shown gene, 2 µm per pixel, additive, own colour map."""
        from histoscope.expression.stack import open_levels

        scale, translate = self.placement()
        layers = []
        for k, gene in enumerate(self.shown):
            meta = {"histoscope": self.provenance.to_dict(), "gene": gene,
                    "stack": str(self.stack), "colorbar": {"visible": False, "label": gene}}  # fmt: skip
            kwargs = {"name": f"{gene} (2 µm)", "scale": scale, "translate": translate,
                      "units": ("um", "um"), "multiscale": True, "blending": "additive",
                      "colormap": COLORMAPS[k % len(COLORMAPS)],
                      "contrast_limits": self.contrast(gene), "metadata": meta}  # fmt: skip
            layers.append((open_levels(self.stack, gene), kwargs, "image"))
        return layers

    def summary(self) -> dict[str, Any]:
        m = self.meta()
        done = int(np.asarray(_open_done(self.stack)).sum())
        area = done * (m["patch_bins"] * m["bin_um"] / 1000) ** 2
        return {"genes": len(self.genes), "shown": list(self.shown), "stack": str(self.stack),
                "patches": dict(self.patches), "predicted_mm2": round(area, 4),
                "bin_um": m["bin_um"], "complete": bool(m.get("complete")),
                "cells": 0 if self.cell_values is None else len(self.cell_values),
                "cancelled": self.cancelled} | self._ood_keys()  # fmt: skip

    def _ood_keys(self) -> dict[str, Any]:
        from histoscope.ood import ood_summary

        return ood_summary(self.ood) if self.ood is not None else {}

    def save(self, out_dir) -> list[Path]:
        """``expression.ome.zarr`` (the stack), ``expression_bins_{002,008,016}um.h5ad``, ``expression.json``."""
        from histoscope.atomic import atomic_write_text
        from histoscope.export.omezarr import atomic_dir
        from histoscope.expression.bins_h5ad import write_bins_h5ad

        out = Path(out_dir)
        target = out / "expression.ome.zarr"
        files = []
        if target.resolve() != self.stack.resolve():
            with atomic_dir(target) as tmp:
                shutil.copytree(self.stack, tmp, dirs_exist_ok=True)
        files.append(target)
        uns = {"provenance": self.provenance.to_dict(), "summary": self.summary()}
        for b in (2, 8, 16):
            files.append(write_bins_h5ad(target, out / f"expression_bins_{b:03d}um.h5ad", b,
                                         uns=uns))  # fmt: skip
        if self.cells is not None and self.cell_values is not None:
            files.append(self.save_cells(out / "cells_expression.h5ad"))
        doc = {**self.provenance.to_dict(), "summary": self.summary()}
        files.append(atomic_write_text(out / "expression.json", json.dumps(plain(doc), indent=2)))
        return files

    def cell_table(self):
        """The cells' table with one ``expr: <gene>`` column per gene (NaN where unpredicted)."""
        import pandas as pd

        table = self.cells.table()
        expr = pd.DataFrame(self.cell_values, columns=[f"expr: {g}" for g in self.genes],
                            index=table.index)  # fmt: skip
        return pd.concat([table, expr], axis=1)

    def save_cells(self, path: Path) -> Path:
        """Cells x genes AnnData: ``X`` the mean predicted expression under each nucleus.

        ``obs`` holds the cells' table (class, probabilities, gate, nucleus
        measurements), ``obsm["spatial"]`` their centroids in µm, ``var`` the genes.
        """
        from histoscope.export.anndata import write_h5ad

        table = self.cells.table()
        spatial = table[["x_um", "y_um"]].to_numpy()
        obs = table.drop(columns=["x_um", "y_um"])
        uns = {"provenance": self.provenance.to_dict(),
               "cells_provenance": self.cells.provenance.to_dict(), "spatial_unit": "um",
               "X": "mean predicted expression of the 2 µm bins under each nucleus"}  # fmt: skip
        return write_h5ad(path, obs, spatial, uns, var=list(self.genes),
                          X=np.asarray(self.cell_values, np.float32))  # fmt: skip


def _open_done(stack: Path):
    from histoscope.expression.stack import _open_checked

    return _open_checked(stack)["done"][...]


class _Stash:
    """The model giving the engine a small output, keeping its full prediction for the writer.

    The engine keeps every output it is given; the stack is the only place the
    full prediction should live, so the batch's expected counts are stashed
    here for ``on_batch`` and the engine keeps one number per patch.
    """

    def __init__(self, model) -> None:
        import torch

        outer = self

        class _Net(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, x):
                e = self.model.expected(self.model(x))
                outer.last = e.float().cpu().numpy()
                return e.mean(dim=(1, 2, 3))

        self.net = _Net()
        self.last: np.ndarray | None = None


def _offset(gen, already: int, total: int):
    """The engine's ``(done, n)`` over this run's patches as ``(already + done, total)``."""
    reply = None
    while True:
        try:
            done, _ = gen.send(reply)
        except StopIteration as stop:
            return stop.value
        reply = yield already + done, total


class ScratchFolder:
    """A temporary folder, deleted when the last object holding this handle is dropped.

    A session without a folder keeps its stacks here: the session (its product
    cache) and every :class:`ExpressionResult` of the stack hold the handle, so
    the stack lives as long as something can show or save it, and is removed
    once both are gone (or when Python exits).
    """

    def __init__(self, prefix: str = "histoscope-expression-") -> None:
        self.path = Path(tempfile.mkdtemp(prefix=prefix))
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.path), True)

    @property
    def alive(self) -> bool:
        """Whether the folder has not been removed yet."""
        return self._finalizer.alive

    def remove(self) -> None:
        """Delete the folder now."""
        self._finalizer()

    def __deepcopy__(self, memo) -> ScratchFolder:
        return self  # one folder, one owner handle: copies (``dataclasses.asdict``) share it

    def __repr__(self) -> str:
        return f"ScratchFolder({str(self.path)!r})"


def _scratch(session) -> ScratchFolder | None:
    """The session's scratch folder for stacks when it has no folder of its own."""
    if session.folder is not None:
        return None
    return session.product("expression_tmp", None, ScratchFolder)


#: Beside the stack's arrays: the training-data check's patch features of every
#: run that wrote into it, so a rerun that predicts few or no patches is still judged.
OOD_FEATURES = "ood_features.npy"


def _keep_ood_features(stack: Path, new: np.ndarray | None, cap: int = 20_000):
    """The stack's stored patch features with ``new`` added (and stored), at most ``cap`` rows.

    A stored file that cannot be read (damaged) is replaced by ``new`` alone.
    """
    from histoscope.atomic import atomic_path

    file = Path(stack) / OOD_FEATURES
    old = None
    if file.is_file():
        try:
            old = np.load(file, allow_pickle=False)
        except (OSError, ValueError):
            old = None
    if old is not None and (old.ndim != 2 or (new is not None and old.shape[1] != new.shape[1])):
        old = None  # another encoder's features: not comparable
    parts = [a for a in (old, new) if a is not None and len(a)]
    if not parts:
        return None
    feats = np.concatenate(parts).astype(np.float32)
    if len(feats) > cap:  # evenly spread, old and new alike
        feats = feats[np.linspace(0, len(feats) - 1, cap).round().astype(int)]
    if new is not None and len(new) and Path(stack).is_dir():
        with atomic_path(file, suffix=".npy") as tmp:
            np.save(tmp, feats, allow_pickle=False)
    return feats


def stack_path(session, card) -> Path:
    """Where the session keeps this slide's stack for this checkpoint."""
    import hashlib

    from histoscope.results import safe_stem

    slide_key = hashlib.sha256(str(session.slide_id).encode()).hexdigest()[:8]
    name = (
        f"{safe_stem(session.slide.path.stem)}_{slide_key}_{(card.sha256 or 'model')[:12]}.ome.zarr"
    )
    scratch = _scratch(session)
    if scratch is None:
        return Path(session.folder) / "expression" / name
    return scratch.path / name


def _patches(session, cfg, params: ExpressionParams, region) -> np.ndarray:
    """Patch origins ``(N, 2)`` (bins) on tissue, within ``region`` if given."""
    p, b_um, mpp = cfg["patch_bins"], cfg["bin_um"], cfg["image_mpp"]
    grid = session.grid(mpp, int(round(p * b_um / mpp)), params.min_tissue)
    origins = grid.index * p
    if region is not None and len(origins):
        bin_px = b_um / session.slide.mpp
        x, y, w, h = region
        px = origins * bin_px  # (row, col) -> level-0 px
        size = p * bin_px
        keep = ((px[:, 1] + size > x) & (px[:, 1] < x + w) & (px[:, 0] + size > y)
                & (px[:, 0] < y + h))  # fmt: skip
        origins = origins[keep]
    return origins


def _run(session, checkpoint, params: ExpressionParams, *, region=None, near=None, engine=None):
    from types import SimpleNamespace

    from histoscope.engine import EngineParams, iter_samples
    from histoscope.expression.dataset import sampler_for
    from histoscope.expression.stack import StackWriter

    model, card = checkpoint
    cfg, slide = model.config, session.slide
    genes = tuple(cfg["genes"])
    shown = _gene_list(params.genes) or genes[:2]
    unknown = [g for g in shown if g not in genes]
    if unknown:
        raise ParamError(f"expression.genes: {', '.join(unknown)} not among the model's genes "
                         f"({', '.join(genes[:8])}, ...)")  # fmt: skip
    if not slide.mpp:
        raise ParamError(f"{slide.path}: expression needs the slide's µm/px (2 µm bins)")
    if (yield Step(0, 0, "finding tissue")) is False:
        raise Cancelled("expression stopped before any patch was predicted")
    origins = _patches(session, cfg, params, region)
    bin_px = cfg["bin_um"] / slide.mpp
    h0, w0 = slide.shape
    shape = (int(np.ceil(h0 / bin_px)), int(np.ceil(w0 / bin_px)))
    prov = Provenance(task="expression", slide=str(slide.path), checkpoint_sha256=card.sha256,
                      params={**plain(params), "region": list(region) if region else None},
                      mpp=cfg["image_mpp"],
                      tile_grid={"patch_bins": cfg["patch_bins"], "bin_um": cfg["bin_um"],
                                 "n_patches": len(origins)})  # fmt: skip
    path = stack_path(session, card)
    scratch = _scratch(session)
    chunk = cfg["patch_bins"] * max(1, 128 // cfg["patch_bins"])
    writer = StackWriter(path, genes, shape, cfg["bin_um"], slide.mpp, cfg["patch_bins"], chunk,
                         attrs={"checkpoint_sha256": card.sha256, "slide": str(slide.path)})  # fmt: skip
    todo = origins[~writer.is_done(origins)] if len(origins) else origins
    writer.expect(todo)
    counts = {"total": len(origins), "done": len(origins) - len(todo)}

    live: dict[str, tuple[float, float]] = {}  # contrast of the live results, once measurable

    def result(cancelled: bool = False) -> ExpressionResult:
        res = ExpressionResult(provenance=replace(prov, cancelled=cancelled), stack=path,
                               genes=genes, shown=shown, patches=dict(counts),
                               percentile=params.percentile, scratch=scratch)  # fmt: skip
        res = res.measured(keep=live)  # in the worker: a viewer only places layers
        live.update(res.limits)
        return res

    cancelled = False
    # outside training data (issue 11): the 2 µm encoder's output, averaged per patch
    from histoscope.ood import FeatureTap, with_ood

    tap = FeatureTap(model.local, "output")
    if len(todo):
        tap.attach()
        stash = _Stash(model)
        sampler = sampler_for(todo, cfg, bin_px)
        sampler.cell = max(8, int(chunk * bin_px))  # the engine's near-first squares = chunks

        def on_batch(idx: np.ndarray, _means) -> None:
            writer.write(todo[idx], stash.last)
            counts["done"] += len(idx)

        spec = SimpleNamespace(mean=tuple(card.input_spec.get("mean", (0.485, 0.456, 0.406))),
                               std=tuple(card.input_spec.get("std", (0.229, 0.224, 0.225))))  # fmt: skip
        ep = engine or EngineParams(batch_size=16, workers=2, prefetch=2)
        gen = iter_samples(stash.net, slide, sampler, [spec] * len(sampler.views), ep,
                           near=near, on_batch=on_batch)  # fmt: skip
        try:
            out = yield from tagged(_offset(gen, counts["done"], counts["total"]),
                                    "expression patches", result)  # fmt: skip
            cancelled = out.cancelled
        finally:
            writer.close(complete=False)
            tap.detach()
    complete = not cancelled and counts["done"] == counts["total"]
    if complete and region is not None:  # a region finishes the slide if the rest was there
        whole = _patches(session, cfg, params, None)
        complete = bool(writer.is_done(whole).all()) if len(whole) else True
    writer.close(complete=complete)
    yield Step(counts["done"], counts["total"], "expression patches")
    live.clear()  # the final contrast, from the whole stack
    feats = _keep_ood_features(path, tap.features())  # with those of earlier runs on the stack
    res = with_ood(result(cancelled), card, feats, slide.path.name, items="patches")
    cells = session.results.get("cells")
    if cancelled or cells is None or not getattr(cells, "n_cells", 0):
        return res
    # the session found cells: the mean expression under each nucleus
    if (yield Step(0, 0, "expression per cell")) is False:
        return replace(res, provenance=replace(res.provenance, cancelled=True))
    values = cell_expression(path, cells.nuclei.x, cells.nuclei.y,
                             outlines=cells.nuclei.outlines)  # fmt: skip
    return replace(res, cells=cells, cell_values=values)


SPEC = register(TaskSpec(name="expression", title="Gene expression (2 µm)",
                         params=ExpressionParams, run=_run, family="expression",
                         default_checkpoint="expression_default.safetensors",
                         needs=("tissue",), region=True))  # fmt: skip
