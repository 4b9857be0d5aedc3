"""Cells: nuclei found tile by tile, typed by NuClass, as one points layer and QuPath cells.

:func:`iter_cells` walks the tissue tile by tile (the tiles nearest ``near``
first, so the view fills in before the rest of the slide), finds the nuclei
of each tile with :func:`histoscope.nuclei.iter_detect` and types them with
:func:`histoscope.celltypes.iter_classify` as soon as the tile is done. The
:class:`CellsResult` holds one row per cell: centroid, nucleus outline,
QuPath-style nucleus measurements and, when typed, the class, every class's
probability, the gate weight ``g`` (0: the local morphology decided, 1: the
context did), the confidence and the local and global paths' own calls.

It becomes one napari Points layer (not Shapes: a million points still pan),
coloured by class with a fixed palette, and saves as QuPath cells
(``cells.geojson``, each with its ``nucleusGeometry``), ``cells.csv``,
``cells.h5ad`` (AnnData, ``obsm["spatial"]`` in µm) and ``cells.json``
(counts and densities per mm² of tissue, provenance).
"""

from __future__ import annotations

import colorsys
import json
import math
import time
from collections.abc import Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from histoscope.atomic import atomic_write_text
from histoscope.nuclei import METHODS, NucleiParams
from histoscope.params import ParamError, check, param
from histoscope.progress import Step, drive
from histoscope.results import Provenance, Result, plain
from histoscope.tasks._registry import TaskSpec, register

if TYPE_CHECKING:
    import pandas as pd

    from histoscope.celltypes import CellTypes
    from histoscope.nuclei import Nuclei
    from histoscope.results import LayerDataTuple

__all__ = ["CellsParams", "CellsResult", "class_palette", "iter_cells", "outline_labels"]

#: The first colours of the class palette (distinct on dark and light backgrounds);
#: more classes continue with evenly spread hues, so any number of classes colours.
BASE_PALETTE = (
    (200, 0, 0), (255, 160, 0), (30, 60, 220), (150, 0, 200), (0, 200, 200), (120, 80, 40),
    (0, 150, 60), (120, 200, 0), (240, 90, 200), (255, 230, 0), (0, 110, 130), (180, 180, 180),
    (255, 120, 120), (90, 170, 255), (170, 110, 255), (0, 255, 140),
)  # fmt: skip
#: Colour of cells found but not typed (detection only).
UNTYPED = (230, 230, 230)
#: Point diameter (µm): inside a nucleus, so its rim and chromatin stay visible.
POINT_UM = 3.5
#: Seconds between live updates sent to a panel (each costs a copy of the cells so far).
LIVE_EVERY_S = 1.5
#: Find the next tile's nuclei in a second thread while this tile's are typed.
PREFETCH = True
#: The detector's defaults, which the cells task starts from.
_ND = {f.name: f.default for f in fields(NucleiParams)}


def class_palette(classes: Sequence[str], colors: dict[str, Sequence[int]] | None = None):
    """``(n, 3)`` uint8 RGB per class: ``colors`` where given, else the fixed palette.

    The palette is fixed (class ``i`` always gets the same colour whatever
    the slide holds); past its 16 colours the hues continue by the golden
    angle, so 40 classes still get 40 distinct colours.
    """
    out = np.zeros((len(classes), 3), np.uint8)
    for i, name in enumerate(classes):
        if colors and name in colors:
            out[i] = colors[name]
        elif i < len(BASE_PALETTE):
            out[i] = BASE_PALETTE[i]
        else:
            k = i - len(BASE_PALETTE)
            hue = (0.11 + 0.618034 * k) % 1.0
            sat, val = (0.65, 0.95) if k % 2 == 0 else (0.9, 0.7)
            out[i] = np.round(255 * np.array(colorsys.hsv_to_rgb(hue, sat, val)))
    return out


@dataclass(frozen=True)
class CellsParams:
    """What the cells task does: detection settings, then typing settings."""

    detector: str = param("classical", "nucleus detector: classical (no weights), stardist or "
                          "cellpose (need their package and local weights)", choices=METHODS)  # fmt: skip
    detector_weights: str = param("", "local weights file or folder for stardist / cellpose")
    threshold: float = param(_ND["threshold"], "haematoxylin optical density a nucleus pixel "
                             "exceeds (0: Otsu per tile)", min=0.0, max=5.0)  # fmt: skip
    min_area_um2: float = param(_ND["min_area_um2"], "smallest nucleus kept, µm²", min=0.0,
                                max=1e4)  # fmt: skip
    max_area_um2: float = param(_ND["max_area_um2"], "largest nucleus kept, µm²", min=0.1,
                                max=1e4)  # fmt: skip
    classify: bool = param(True, "type the cells with the NuClass checkpoint (off: detect only)")
    path: str = param("fast", "typing path: fast (one backbone pass per tile, pooled at each "
                      "nucleus) or crops (one 224 px crop and one context crop per cell)",
                      choices=("fast", "crops"))  # fmt: skip
    organ: str = param("unknown", "organ the slide comes from, for the tissue conditioning "
                       "(unknown: the checkpoint's organ-agnostic token)")  # fmt: skip
    batch: int = param(256, "cells per batch when typing", min=1, max=65536)
    threads: int = param(2, "tiles searched for nuclei at once (threads)", min=1, max=64)

    def __post_init__(self) -> None:
        check(self, "cells")
        if self.max_area_um2 <= self.min_area_um2:
            raise ParamError(f"cells: max_area_um2 ({self.max_area_um2}) must be larger than "
                             f"min_area_um2 ({self.min_area_um2})")  # fmt: skip

    def nuclei_params(self):
        """The :class:`histoscope.nuclei.NucleiParams` these settings give."""
        # tiles overlap by more than the largest nucleus is long
        diameter = 2 * math.sqrt(self.max_area_um2 / math.pi)
        return NucleiParams(method=self.detector, weights=self.detector_weights,
                            threshold=self.threshold, min_area_um2=self.min_area_um2,
                            max_area_um2=self.max_area_um2,
                            overlap_um=max(_ND["overlap_um"], math.ceil(diameter + 2)))  # fmt: skip


def _no_provenance() -> Provenance:
    return Provenance(task="cells", slide="")


@dataclass(frozen=True, kw_only=True)
class CellsResult(Result):
    """The cells of a slide or region: positions, outlines, measurements, types.

    Attributes
    ----------
    nuclei
        :class:`histoscope.nuclei.Nuclei`: centroids and outlines in level-0
        px, QuPath measurements.
    types
        :class:`histoscope.celltypes.CellTypes` row for row, or ``None``
        (detection only).
    slide_mpp
        The slide's level-0 µm/px.
    tissue_um2
        Tissue area the cells were looked for in (µm²), for densities.
    trained_on
        One line on what the typing checkpoint was trained on ("" untyped).
    colors
        Class name -> RGB from the checkpoint's card (else the fixed palette).
    """

    provenance: Provenance = field(default_factory=_no_provenance)
    nuclei: Nuclei
    types: CellTypes | None = None
    slide_mpp: float
    tissue_um2: float = 0.0
    trained_on: str = ""
    colors: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    ood: Any = field(default=None, compare=False)  # OODReport: outside the training data?
    _calls: Any = field(default=None, init=False, repr=False, compare=False)

    @property
    def n_cells(self) -> int:
        return len(self.nuclei)

    def calls(self) -> dict[str, np.ndarray]:
        """Per-cell ``pred``, ``confidence``, ``local_pred``, ``global_pred`` and ``disagree``.

        Worked out once per result (each is a reduction over every cell's
        probabilities: about 0.1 s per million cells) and kept; the result is
        frozen, so they cannot go stale. Empty arrays when untyped.
        """
        if self._calls is None:
            t = self.types
            if t is None:
                empty = np.zeros(0, np.int64)
                calls = {"pred": np.full(self.n_cells, -1, np.int64), "confidence": empty,
                         "local_pred": empty, "global_pred": empty,
                         "disagree": np.zeros(0, bool)}  # fmt: skip
            else:
                calls = {"pred": np.asarray(t.pred, np.int64),
                         "confidence": np.asarray(t.confidence, np.float32),
                         "local_pred": np.asarray(t.local_pred, np.int64),
                         "global_pred": np.asarray(t.global_pred, np.int64)}  # fmt: skip
                calls["disagree"] = calls["local_pred"] != calls["global_pred"]
            for a in calls.values():
                a.flags.writeable = False
            object.__setattr__(self, "_calls", calls)  # a cache on a frozen dataclass
        return self._calls

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.types.classes) if self.types is not None else ()

    def palette(self) -> np.ndarray:
        """``(n_classes, 3)`` uint8 colours, class order."""
        return class_palette(self.classes, self.colors)

    def class_index(self) -> np.ndarray:
        """Per-cell class index (``-1`` when untyped)."""
        return self.calls()["pred"]

    def rgba(self) -> np.ndarray:
        """``(n, 4)`` float32 face colour per cell, by class."""
        idx = self.class_index()
        lut = np.concatenate([self.palette(), np.array([UNTYPED], np.uint8)]).astype(np.float32)
        rgba = np.ones((self.n_cells, 4), np.float32)
        rgba[:, :3] = lut[idx] / 255.0  # -1 picks the last row: untyped
        return rgba

    # ------------------------------------------------------------------ tables
    def table(self, *, um: bool = True) -> pd.DataFrame:
        """One row per cell: position (level-0 px and µm), class, probabilities, gate, measurements.

        ``um=False`` leaves out ``x_um`` and ``y_um`` (a points layer has them as its data)
        and gives a table whose columns may share memory with this result's arrays (napari
        copies a layer's features; building the table once more would take ~0.2 s per
        million cells).
        """
        import pandas as pd

        n, mpp = self.nuclei, self.slide_mpp
        cols: dict[str, Any] = {"x": np.asarray(n.x, np.float64), "y": np.asarray(n.y, np.float64)}
        if um:
            cols["x_um"], cols["y_um"] = cols["x"] * mpp, cols["y"] * mpp
        t = self.types
        if t is not None:
            c = self.calls()
            names = np.asarray(self.classes, dtype=object)
            cols["class"] = pd.Categorical.from_codes(c["pred"], categories=names)
            cols["confidence"] = c["confidence"].copy()
            cols["gate"] = np.asarray(t.g, np.float32)
            cols["local_class"] = pd.Categorical.from_codes(c["local_pred"], names)
            cols["global_class"] = pd.Categorical.from_codes(c["global_pred"], names)
            cols["disagree"] = c["disagree"].copy()
            for j, name in enumerate(self.classes):
                cols[f"prob: {name}"] = np.asarray(t.prob[:, j], np.float32)
        m = n.measurements
        for name in m.columns:
            cols[name] = m[name].to_numpy()
        return pd.DataFrame(cols, copy=um)  # (um=False: no copy, see above)

    def summary(self) -> dict[str, Any]:
        """Counts and densities per class per mm² of tissue, gate and agreement, provenance.

        ``tissue_mm2`` is the tissue of the slide or region asked for; after a
        Cancel only part of it was searched, so the densities are ``None``.
        """
        # a cancelled run covered part of the tissue: no density from the whole area
        mm2 = self.tissue_um2 / 1e6 if not self.cancelled else 0.0
        out: dict[str, Any] = {
            "n_cells": self.n_cells,
            "tissue_mm2": round(self.tissue_um2 / 1e6, 4),
            "cells_per_mm2": round(self.n_cells / mm2, 1) if mm2 > 0 else None,
            "typed": self.types is not None,
            "cancelled": self.cancelled,
        }
        if self.types is not None:
            idx = self.class_index()
            counts = np.bincount(idx, minlength=len(self.classes)) if self.n_cells else (
                np.zeros(len(self.classes), np.int64))  # fmt: skip
            out["classes"] = {
                name: {"count": int(c), "per_mm2": round(c / mm2, 1) if mm2 > 0 else None,
                       "fraction": round(c / self.n_cells, 4) if self.n_cells else 0.0}
                for name, c in zip(self.classes, counts.tolist(), strict=True)
            }  # fmt: skip
            t = self.types
            some = self.n_cells > 0
            out["mean_gate"] = round(float(np.mean(t.g)), 4) if some else None
            c = self.calls()
            out["mean_confidence"] = round(float(np.mean(c["confidence"])), 4) if some else None
            disagree = c["disagree"]
            out["local_global_disagree"] = round(float(disagree.mean()), 4) if some else None
            out["trained_on"] = self.trained_on
        if self.ood is not None:
            from histoscope.ood import ood_summary

            out.update(ood_summary(self.ood))
        return out

    # ------------------------------------------------------------------ napari
    def to_layers(self, name: str = "cells") -> list[LayerDataTuple]:
        """One points layer at the centroids (µm), coloured by class, the table as features."""
        n = self.nuclei
        coords = np.stack([np.asarray(n.y) * self.slide_mpp, np.asarray(n.x) * self.slide_mpp],
                          axis=1) if self.n_cells else np.zeros((0, 2))  # fmt: skip
        table = self.table(um=False)
        meta = {
            "histoscope_task": "cells",
            "summary": self.summary(),
            "histoscope": self.provenance.to_dict(),
            "classes": list(self.classes),
            "palette": self.palette().tolist(),
        }
        kwargs = {
            "name": name,
            "features": table,
            "face_color": self.rgba(),
            "border_width": 0,
            "size": POINT_UM,
            "units": ("um", "um"),
            "metadata": meta,
        }
        return [(coords, kwargs, "points")]

    # ------------------------------------------------------------------ files
    def geojson_table(self) -> pd.DataFrame:
        """The QuPath table: nucleus outlines as both cell ROI and ``nucleusGeometry``.

        No cell boundary is estimated, so QuPath shows each cell as its nucleus.
        """
        import pandas as pd

        n = self.nuclei
        polys = _polygons(n.outlines)
        table = pd.DataFrame({"geometry": polys, "nucleus": polys})
        if self.types is not None:
            pal = self.palette()
            idx = self.class_index()
            names = np.asarray(self.classes, dtype=object)
            table["classification"] = names[idx] if self.n_cells else []
            table["color"] = [tuple(int(v) for v in pal[i]) for i in idx]
            t = self.types
            for j, cname in enumerate(self.classes):
                table[f"Prob: {cname}"] = np.asarray(t.prob[:, j], np.float64)
            table["Gate g"] = np.asarray(t.g, np.float64)
            table["Confidence"] = np.asarray(t.confidence, np.float64)
            table["Local and global disagree"] = (
                np.asarray(t.local_pred) != np.asarray(t.global_pred)).astype(np.float64)  # fmt: skip
        for name in n.measurements.columns:
            table[name] = n.measurements[name].to_numpy(np.float64)
        return table

    def save(self, out_dir: str | Path) -> list[Path]:
        """Write ``cells.geojson`` (QuPath cells), ``cells.csv``, ``cells.h5ad`` and ``cells.json``."""
        from histoscope.atomic import atomic_path
        from histoscope.export.anndata import write_h5ad
        from histoscope.export.geojson import write_geojson

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = [write_geojson(out / "cells.geojson", self.geojson_table())]
        table = self.table()
        with atomic_path(out / "cells.csv") as tmp:  # 10 digits: level-0 px of any slide to 0.01
            table.to_csv(tmp, index_label="cell", float_format="%.10g")
        paths.append(out / "cells.csv")
        obs = {k: table[k].to_numpy() if k not in ("class", "local_class", "global_class")
               else table[k].array for k in table.columns if k not in ("x_um", "y_um")}  # fmt: skip
        spatial = table[["x_um", "y_um"]].to_numpy()
        doc = {"summary": self.summary(), "mpp": self.slide_mpp,
               "provenance": self.provenance.to_dict()}  # fmt: skip
        hexes = ["#{:02x}{:02x}{:02x}".format(*(int(v) for v in c)) for c in self.palette()]
        # scanpy colours a categorical obs column from uns["<column>_colors"]
        paths.append(write_h5ad(out / "cells.h5ad", obs, spatial,
                                {**doc, "spatial_unit": "um", "class_colors": hexes,
                                 "local_class_colors": hexes, "global_class_colors": hexes}))  # fmt: skip
        paths.append(atomic_write_text(out / "cells.json", json.dumps(doc, indent=2) + "\n"))
        return paths


#: Outline simplification for the GeoJSON (level-0 px): a contour traced at pixel
#: corners keeps its shape with about half its vertices.
SIMPLIFY_PX = 0.3


def _polygons(outlines: Sequence[np.ndarray]):
    """Shapely polygons from ``(k, 2)`` ``[x, y]`` rings, in one vectorised call.

    Vertices are rounded to 0.01 px and the rings simplified by
    :data:`SIMPLIFY_PX`, which keeps a million cells' GeoJSON to a size QuPath
    opens.
    """
    import shapely

    if not len(outlines):
        return np.array([], dtype=object)
    sizes = np.fromiter((len(o) for o in outlines), np.int64, len(outlines))
    if (sizes < 3).any():
        bad = int(np.flatnonzero(sizes < 3)[0])
        raise ValueError(f"cell {bad}: a nucleus outline needs 3 or more vertices")
    # close each ring: repeat its first vertex
    idx = np.repeat(np.arange(len(outlines)), sizes + 1)
    coords = np.concatenate([np.concatenate([o, o[:1]]) for o in outlines]).astype(np.float64)
    rings = shapely.linearrings(np.round(coords, 2), indices=idx)
    return shapely.simplify(shapely.polygons(rings), SIMPLIFY_PX, preserve_topology=True)


def outline_labels(
    result: CellsResult, region: tuple[int, int, int, int], mpp: float | None = None
):
    """Nucleus outlines inside a level-0 ``region`` as a labels image (label = row + 1).

    Returns ``(labels, (y0_um, x0_um), mpp)``: a ``uint32`` image at ``mpp``
    µm/px (default the slide's), its corner in µm, and the µm/px — placed with
    ``scale=(mpp, mpp)`` and ``translate`` it sits on the slide.
    """
    from skimage.draw import polygon as fill

    um = result.slide_mpp
    mpp = um if mpp is None else float(mpp)
    x, y, w, h = (float(v) for v in region)
    f = um / mpp  # output px per level-0 px
    shape = (max(1, int(np.ceil(h * f))), max(1, int(np.ceil(w * f))))
    labels = np.zeros(shape, np.uint32)
    n = result.nuclei
    cx, cy = np.asarray(n.x), np.asarray(n.y)
    # a nucleus whose centroid is just outside still reaches in: pad by the largest one
    area = n.measurements.get("Nucleus: Area µm^2")
    biggest = float(np.nanmax(area)) if area is not None and len(area) else 0.0
    pad = max(64.0, 2.0 * math.sqrt(biggest / math.pi) / um + 2.0)
    inside = np.flatnonzero((cx >= x - pad) & (cx < x + w + pad) & (cy >= y - pad)
                            & (cy < y + h + pad))  # fmt: skip
    for i in inside:
        ring = n.outlines[i]
        rr, cc = fill((ring[:, 1] - y) * f, (ring[:, 0] - x) * f, shape)
        labels[rr, cc] = i + 1
    return labels, (y * um, x * um), mpp


# ---------------------------------------------------------------------- the run
def _tissue_area_um2(session, region) -> float:
    """Tissue area (µm²) of the slide or of a level-0 region, from the session's mask."""
    mask = session.tissue()
    m = mask.mask
    if region is not None:
        f = session.slide.mpp / mask.mpp  # mask px per level-0 px
        x, y, w, h = region
        m = m[int(y * f) : int(np.ceil((y + h) * f)), int(x * f) : int(np.ceil((x + w) * f))]
    return float(m.sum()) * mask.mpp**2


def iter_cells(
    session,
    checkpoint,
    params: CellsParams | None = None,
    *,
    region: tuple[int, int, int, int] | None = None,
    near: tuple[float, float] | None = None,
) -> Generator[Step, bool | None, CellsResult]:
    """Find and type the cells of a session's slide (or a level-0 region), tile by tile.

    Yields :class:`~histoscope.progress.Step` s over tiles whose ``partial``
    is the :class:`CellsResult` so far (every :data:`LIVE_EVERY_S` seconds);
    sending ``False`` stops after the current tile and returns the cells of
    the finished tiles, marked ``cancelled``.
    """
    from histoscope.celltypes import iter_classify
    from histoscope.nuclei import Nuclei, iter_detect

    params = params or CellsParams()
    slide = session.slide
    if slide.mpp is None:
        from histoscope.errors import SlideError

        raise SlideError(f"{slide.path}: µm/px is unknown; pass mpp= when opening the slide "
                         "(CLI: --mpp)")  # fmt: skip
    model = card = None
    if params.classify:
        if checkpoint is None:
            raise ParamError("cells: typing needs a NuClass checkpoint (or classify=False)")
        model, card = checkpoint
    if model is not None and params.organ != "unknown":
        known = [t for t in model.config.get("tissues", ()) if t != "unknown"]
        if params.organ not in known:
            raise ParamError(f"cells.organ={params.organ!r}: the checkpoint knows "
                             f"{', '.join(known) or 'no organ'} (or unknown)")  # fmt: skip
    yield Step(0, 0, "tissue")
    tissue = session.tissue()
    tissue_um2 = _tissue_area_um2(session, region)
    nparams = params.nuclei_params()
    det = iter_detect(slide, nparams, region=region, tissue=tissue, near=near,
                      workers=params.threads)  # fmt: skip
    parts_n: list[Nuclei] = []
    parts_t: list = []
    cancelled = False
    done = total = 0
    last_live = time.monotonic()

    def result(final: bool) -> CellsResult:
        nuc = Nuclei.concat(parts_n, float(slide.mpp))
        types = None
        if params.classify:
            from histoscope.celltypes import CellTypes

            types = CellTypes.concat(parts_t) if parts_t else _empty_types(card)
        prov = Provenance(
            task="cells", slide=str(slide.path), mpp=float(slide.mpp),
            params=plain(params), checkpoint_sha256=card.sha256 if card is not None else "",
            tile_grid={"region": list(region) if region else None, "tiles_done": done,
                       "tiles": total, "detector": plain(nparams)},
            cancelled=cancelled if final else True,
        )  # fmt: skip
        return CellsResult(provenance=prov, nuclei=nuc, types=types, slide_mpp=float(slide.mpp),
                           tissue_um2=tissue_um2, trained_on=_trained_on(card),
                           colors=_card_colors(card))  # fmt: skip

    organ = None if params.organ == "unknown" else params.organ
    # the next tile's nuclei are found in a second thread while this tile's are typed
    # (scikit-image and torch both release the GIL); a stop discards that tile
    pool = ThreadPoolExecutor(1, thread_name_prefix="histoscope-nuclei") if PREFETCH else None
    ahead = _Ahead(det, pool)
    # outside training data (issue 11): the local-path features NuClass pools at each cell
    from histoscope.ood import FeatureTap, with_ood

    tap = FeatureTap(model.local_norm, "input") if model is not None else None
    try:
        if tap is not None:
            tap.attach()
        while True:
            try:
                step = ahead.take()
            except StopIteration:  # the detector finished (or stopped, after a stop)
                break
            if not cancelled:
                ahead.start_next()
            done, total, nuc = step
            if len(nuc) and params.classify:
                cls = iter_classify(slide, nuc.x, nuc.y, model, card, path=params.path,
                                    organ=organ, batch=params.batch)  # fmt: skip
                parts_t.append(drive(cls))
            parts_n.append(nuc)
            partial = None
            now = time.monotonic()
            if now - last_live >= LIVE_EVERY_S:
                partial, last_live = result(final=False), now
            if (yield Step(done, total, "cell tiles", partial=partial)) is False:
                cancelled = True
                ahead.stop()
    finally:
        ahead.close()
        if tap is not None:
            tap.detach()
    cancelled = cancelled or done < total
    res = result(final=True)  # the registry keeps it as session.results["cells"]
    if tap is None:
        return res
    return with_ood(res, card, tap.features(), slide.path.name, items="cells")


class _Ahead:
    """Drives the detector generator one tile ahead in a worker thread (or inline)."""

    def __init__(self, gen: Generator, pool: ThreadPoolExecutor | None) -> None:
        self.gen, self.pool = gen, pool
        self.next: Future | None = None
        self.stopped = False
        self.start_next()

    def start_next(self) -> None:
        if self.pool is not None:
            self.next = self.pool.submit(next, self.gen)

    def take(self):
        """The next ``(done, total, nuclei)``; StopIteration when the detector has ended."""
        if self.stopped:
            raise StopIteration
        if self.next is None:
            return next(self.gen)
        fut, self.next = self.next, None
        return fut.result()  # re-raises the detector's StopIteration or error

    def stop(self) -> None:
        """Discard the tile in flight and end the detector."""
        if self.next is not None:
            try:
                self.next.result()
            except StopIteration:
                pass
            self.next = None
        self.gen.close()
        self.stopped = True

    def close(self) -> None:
        if self.next is not None:  # an error on this side: let the worker finish its tile
            try:
                self.next.result()
            except BaseException:  # noqa: BLE001 - only waiting; the first error is raised
                pass
        self.gen.close()
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def _empty_types(card):
    from histoscope.celltypes import CellTypes

    c = len(card.classes)
    z = np.zeros((0, c), np.float32)
    return CellTypes(classes=tuple(card.classes), prob=z, p_local=z, p_global=z,
                     g=np.zeros(0, np.float32))  # fmt: skip


def _trained_on(card) -> str:
    if card is None:
        return ""
    from histoscope.checkpoints import describe_card

    return describe_card(card)


def _card_colors(card) -> dict[str, tuple[int, int, int]]:
    colors = ((card.config or {}).get("class_colors") or (card.data or {}).get("class_colors")
              if card is not None else None)  # fmt: skip
    return {str(k): tuple(int(c) for c in v) for k, v in (colors or {}).items()}


def _run(session, checkpoint, params: CellsParams, *, region=None, near=None, engine=None):
    return (yield from iter_cells(session, checkpoint, params, region=region, near=near))


SPEC = register(TaskSpec(name="cells", title="Cells (NuClass)", params=CellsParams, run=_run,
                         family="nuclass", default_checkpoint="nuclass_default.safetensors",
                         needs=("tissue",), region=True))  # fmt: skip
