"""IHC positive-cell measurement: the classical counterpart to iSight's calls.

Colour deconvolution into haematoxylin and DAB, nucleus detection, cells by
expanding nuclei, per-cell DAB optical density in nucleus, cytoplasm and
membrane, 0/1+/2+/3+ by thresholds, and the slide-level numbers pathologists
report: percent positive, H-score (0-300), Allred score (0-8) and the
compartment where DAB sits. Units follow QuPath's "positive cell detection"
(DAB OD mean, thresholds 0.2 / 0.4 / 0.6 by default).
"""

from __future__ import annotations

import json
from collections.abc import Generator
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from histoscope.atomic import atomic_write_text
from histoscope.labels import INTENSITY, LOCATION, QUANTITY
from histoscope.params import ParamError, check, param
from histoscope.progress import Step
from histoscope.results import Provenance, Result, plain
from histoscope.stains import HDAB, deconvolve
from histoscope.tasks._registry import TaskSpec, register


class Compartment(str, Enum):
    """Where a cell's DAB is measured."""

    NUCLEUS = "nucleus"
    CYTOPLASM = "cytoplasm"
    MEMBRANE = "membrane"
    CELL = "cell"
    #: Follow the stain: nucleus, cytoplasm/membrane or both, by :meth:`IHCMeasurement.location`.
    AUTO = "auto"


#: iSight's classes, which the measurement's estimates use too.
LOCATIONS, INTENSITIES, QUANTITIES = LOCATION, INTENSITY, QUANTITY
SCORE_NAMES = ("0", "1+", "2+", "3+")
#: RGBA colours of 0 / 1+ / 2+ / 3+ points (QuPath's blue, yellow, orange, red).
SCORE_COLORS = ((0.44, 0.44, 1.0, 1.0), (1.0, 0.86, 0.0, 1.0), (1.0, 0.55, 0.0, 1.0),
                (0.86, 0.08, 0.08, 1.0))  # fmt: skip


#: Nucleus detection methods: ``learned`` (default; a small nucleus-centre network trained
#: on synthetic IHC only, :mod:`histoscope.models.ihc_detector`, which says when a slide is
#: outside that), ``classical`` (HistoScope's H&E nucleus detector, :mod:`histoscope.nuclei`,
#: on the haematoxylin of the IHC image), ``blobs`` (multi-scale Laplacian of Gaussian on
#: haematoxylin) and QuPath's thresholding on ``hematoxylin`` or ``od_sum`` (H + DAB). On 12
#: held-out strongly stained synthetic slides ``learned`` found 0.99 of DAB-positive and 0.97
#: of negative cells, ``classical`` 0.75 and 0.82, ``blobs`` 0.68 and 0.78
#: (benchmarks/RESULTS.md, "IHC detection, update: learned centre detector").
DETECTIONS = ("learned", "classical", "blobs", "hematoxylin", "od_sum")
#: Parameters a detection method does not use: setting one of them away from its default
#: with that method is refused, not silently ignored.
_UNUSED_BY = {"classical": ("background_radius", "smooth_sigma", "blob_threshold"),
              "learned": ("background_radius", "smooth_sigma", "blob_threshold",
                          "nucleus_threshold"),
              "blobs": ("background_radius", "nucleus_threshold"),
              "hematoxylin": ("blob_threshold",), "od_sum": ("blob_threshold",)}  # fmt: skip
#: Scales (σ, µm) the blob detector looks for nuclei at: lymphocytes (r ≈ 3 µm) to tumour (r ≈ 6 µm).
BLOB_SIGMAS_UM = (2.0, 3.0, 4.0, 5.0)
#: A DAB-stained image has at least this fraction of its tissue pixels at or above the 1+ OD.
MIN_DAB_FRACTION = 0.05
NO_DAB_WARNING = "little or no DAB staining found — is this an IHC image?"
#: Coarsest scan µm/px the learned detector is trusted on: it was trained and validated on
#: slides scanned at 0.5 µm/px (read at 0.75 or 1.0 µm/px from them it still finds 0.96-0.99);
#: a slide made at 1.0 µm/px draws nuclei with fewer pixels (they merge), where it found fewer
#: cells (benchmarks/RESULTS.md), so coarser scans carry :attr:`IHCMeasurement.resolution_warning`.
LEARNED_MAX_MPP = 0.75
#: Side (px, at the network's µm/px) the learned detector's input tile stays within: a slide
#: read coarser than the network is measured in smaller tiles, so memory does not grow with it.
LEARNED_MAX_INPUT = 2048


@dataclass(frozen=True)
class IHCParams:
    """Parameters of positive-cell detection (lengths in µm, densities in OD)."""

    compartment: Compartment = param(Compartment.AUTO, "where a cell's DAB is measured")
    thresholds: tuple[float, float, float] = param(
        (0.2, 0.4, 0.6), "DAB OD thresholds of 1+, 2+ and 3+ (increasing)", min=0.0, max=3.0
    )
    detection: str = param("learned", "find nuclei with a nucleus-centre network trained on "
                           "synthetic IHC only (learned: brown and blue nuclei alike; flags "
                           "slides unlike its training data), with the H&E nucleus detector on "
                           "haematoxylin (classical), as haematoxylin blobs at 2-5 µm (blobs), "
                           "or by thresholding haematoxylin (as QuPath) or haematoxylin + DAB "
                           "(od_sum)", choices=DETECTIONS)  # fmt: skip
    blob_threshold: float = param(0.03, "scale-normalised haematoxylin blob contrast (OD) a "
                                  "nucleus must reach (blobs detection)", min=1e-3, max=5.0)  # fmt: skip
    nucleus_threshold: float = param(0.1, "OD a nucleus must exceed its background by "
                                     "(classical, hematoxylin, od_sum)", min=1e-3, max=5.0)  # fmt: skip
    background_radius: float = param(8.0, "radius of the background subtracted under nuclei (µm; "
                                     "hematoxylin and od_sum detection only: classical "
                                     "subtracts its own 5 µm background)",
                                     min=0.5, max=100.0)  # fmt: skip
    nucleus_min_area: float = param(10.0, "smallest nucleus (µm²)", min=0.1, max=10_000.0)
    nucleus_max_area: float = param(400.0, "largest nucleus (µm²; also the largest hole "
                                    "classical detection fills)", min=0.1, max=10_000.0)  # fmt: skip
    cell_expansion: float = param(5.0, "cell = nucleus grown by this (µm)", min=0.0, max=50.0)
    membrane_width: float = param(1.0, "membrane band width (µm)", min=0.1, max=10.0)
    smooth_sigma: float = param(1.0, "Gaussian smoothing before detection (µm; blobs, "
                                "hematoxylin and od_sum detection: classical smooths by its "
                                "own 0.5 µm)", min=0.1, max=10.0)  # fmt: skip
    mpp: float = param(0.5, "µm/px a slide is read at (never finer than the slide's own)",
                       min=0.1, max=4.0)  # fmt: skip
    count_inside: str = param("", "QuPath GeoJSON of annotations (e.g. the tumour region, "
                              "level-0 px): percentages count the cells inside them only; "
                              "empty: all cells")  # fmt: skip

    def __post_init__(self) -> None:
        check(self, "ihc")
        t = tuple(float(v) for v in self.thresholds)
        if len(t) != 3 or not (0 <= t[0] < t[1] < t[2]):
            raise ValueError(f"thresholds must be three increasing ODs >= 0, got {self.thresholds}")
        if self.detection not in DETECTIONS:
            raise ValueError(f"detection must be one of {DETECTIONS}, not {self.detection!r}")
        for name in (
            "nucleus_min_area",
            "nucleus_max_area",
            "smooth_sigma",
            "membrane_width",
            "nucleus_threshold",
            "background_radius",
            "blob_threshold",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.nucleus_max_area <= self.nucleus_min_area:
            raise ValueError("nucleus_max_area must exceed nucleus_min_area")
        defaults = IHCParams.__dataclass_fields__
        for name in _UNUSED_BY[self.detection]:
            if getattr(self, name) != defaults[name].default:
                users = [d for d in DETECTIONS if name not in _UNUSED_BY[d]]
                raise ParamError(f"ihc.{name}={getattr(self, name)!r}: not used by "
                                 f"detection={self.detection!r} (only by {' / '.join(users)})")  # fmt: skip
        if self.cell_expansion < 0:
            raise ValueError(f"cell_expansion must be >= 0, got {self.cell_expansion}")
        object.__setattr__(self, "compartment", Compartment(self.compartment))
        object.__setattr__(self, "thresholds", t)


#: µm added to a nucleus's equivalent diameter for its ring (the nucleus stays visible inside).
RING_MARGIN_UM = 4.0
#: Ring line width as a fraction of the ring's diameter.
RING_WIDTH = 0.1

CELL_COLUMNS = ("x_um", "y_um", "area_um2", "dab_nucleus", "dab_cytoplasm", "dab_membrane",
                "dab_cell", "hematoxylin_nucleus", "score")  # fmt: skip


def _no_provenance() -> Provenance:
    return Provenance(task="ihc", slide="")


@dataclass(frozen=True, kw_only=True)
class IHCMeasurement(Result):
    """Cells and slide-level IHC numbers; becomes napari layers or files.

    Attributes
    ----------
    cells
        Per-cell columns (:data:`CELL_COLUMNS`), positions in slide µm.
    params
        The detection and scoring parameters.
    mpp
        µm/px the cells were measured at.
    origin_um
        ``(y, x)`` of the measured image's corner (a region measured alone).
    dab_pixels
        ``(tissue, stained)``: pixels with tissue and, of those, pixels with DAB
        OD at or above the 1+ threshold; :attr:`warning` is decided on them
        (``None``: not counted, no warning).
    inside
        Per cell, whether it lies in the region the percentages count (e.g.
        the tumour region; see :meth:`within`); ``None``: all cells count.
    region_name
        What that region is, as the summary's ``denominator`` names it.
    scan_mpp
        µm/px of the image as scanned (the slide's own); ``None``: :attr:`mpp`.
    features
        ``detection="learned"`` only: the network's features of the tissue
        windows (``(n, C)``), for the training-data check.
    ood
        ``detection="learned"`` on a slide: an :class:`~histoscope.ood.OODReport`,
        whether the slide is outside the synthetic IHC the network was trained
        on (the summary's ``outside_training_data`` and ``ood``); ``None``
        otherwise.
    """

    provenance: Provenance = field(default_factory=_no_provenance)
    cells: dict[str, np.ndarray]
    params: IHCParams
    mpp: float
    origin_um: tuple[float, float] = (0.0, 0.0)
    dab_pixels: tuple[int, int] | None = None
    inside: np.ndarray | None = None
    region_name: str = ""
    scan_mpp: float | None = None
    features: np.ndarray | None = field(default=None, compare=False, repr=False)
    ood: Any = field(default=None, compare=False)

    @property
    def n_cells(self) -> int:
        return len(self.cells["score"])

    @property
    def resolution_warning(self) -> str | None:
        """A sentence when learned detection ran on a scan coarser than :data:`LEARNED_MAX_MPP`."""
        scan = self.mpp if self.scan_mpp is None else self.scan_mpp
        if self.params.detection != "learned" or not scan > LEARNED_MAX_MPP:
            return None
        return (f"scanned at {scan:g} µm/px, coarser than the learned nucleus detector is "
                f"validated on (0.5 µm/px, up to {LEARNED_MAX_MPP:g}): nuclei may merge and "
                "cells be missed — treat the counts as unreliable, or use a finer scan")  # fmt: skip

    @property
    def warning(self) -> str | None:
        """:data:`NO_DAB_WARNING` when under :data:`MIN_DAB_FRACTION` of the tissue is DAB 1+."""
        return None if self.dab_pixels is None else dab_warning(*self.dab_pixels)

    def summary(self) -> dict[str, Any]:
        """Percent positive, H-score, Allred, and iSight-style class estimates.

        Percentages count all detected cells, or, after :meth:`within`, the
        cells inside a region (the tumour region, say); ``denominator`` says
        which, with its count, and ``n_cells`` stays the count of all cells.
        ``warning`` is a sentence when the image shows no DAB (e.g. H&E, or an
        IHC stain with no positive cells): do not report the H-score then;
        ``None`` otherwise. ``resolution_warning`` is a sentence when the learned
        detector ran on a scan coarser than :data:`LEARNED_MAX_MPP` µm/px
        (counts unreliable; the numbers are still given), else ``None``.
        """
        scores = self.cells["score"]
        if self.inside is not None:
            scores = scores[self.inside]
        n = len(scores)
        if self.inside is None:
            denominator = "all detected cells"
        else:
            denominator = f"cells inside the {self.region_name or 'region'} (n={n})"
        base = {"n_cells": self.n_cells, "n_counted": n, "location": self.location(),
                "denominator": denominator, "warning": self.warning,
                "resolution_warning": self.resolution_warning,
                "cancelled": self.cancelled}  # fmt: skip
        if self.ood is not None:
            from histoscope.ood import ood_summary

            base.update(ood_summary(self.ood))
        if n == 0 and self.inside is not None:
            # nothing to count: no number rather than a confident "0 % positive"
            warning = (f"no detected cell inside '{self.region_name or 'region'}' — is the "
                       "region over the measured image/area?")  # fmt: skip
            return {**base, "percent_by_score": dict.fromkeys(SCORE_NAMES),
                    "percent_positive": None, "h_score": None, "allred": None,
                    "intensity": None, "quantity": None,
                    "warning": warning if self.warning is None else f"{warning} {self.warning}"}  # fmt: skip
        pct = [100.0 * float(np.mean(scores == k)) if n else 0.0 for k in range(4)]
        positive = pct[1] + pct[2] + pct[3]
        hscore = pct[1] + 2 * pct[2] + 3 * pct[3]
        pos = scores > 0
        mean_pos_score = float(scores[pos].mean()) if pos.any() else 0.0
        intensity = int(round(mean_pos_score)) if pos.any() else 0
        return {
            **base,
            "percent_by_score": dict(zip(SCORE_NAMES, pct, strict=True)),
            "percent_positive": positive,
            "h_score": hscore,
            "allred": allred(positive, intensity),
            "intensity": INTENSITIES[intensity],
            "quantity": quantity_class(positive),
        }

    def within(self, inside: np.ndarray, name: str = "region") -> IHCMeasurement:
        """This measurement with percentages over the cells where ``inside`` is true.

        Parameters
        ----------
        inside
            ``(n_cells,)`` bool, e.g. from :func:`cells_in_geometry` or
            :func:`cells_in_mask`.
        name
            What the region is ("tumour region"); the summary's ``denominator``
            reads "cells inside the <name> (n=...)".
        """
        inside = np.asarray(inside, bool)
        if inside.shape != (self.n_cells,):
            raise ValueError(f"inside must have one value per cell ({self.n_cells}), "
                             f"got shape {inside.shape}")  # fmt: skip
        return replace(self, inside=inside, region_name=name)

    def compartment_values(self) -> np.ndarray:
        """Per-cell DAB OD in the compartment the scores use (``auto`` follows :meth:`location`)."""
        c, comp = self.cells, self.params.compartment
        if comp == Compartment.AUTO:
            loc = self.location()
            outer = np.maximum(c["dab_cytoplasm"], c["dab_membrane"])
            if loc == LOCATIONS[2]:
                return c["dab_nucleus"]
            return outer if loc == LOCATIONS[1] else np.maximum(outer, c["dab_nucleus"])
        key = {Compartment.NUCLEUS: "dab_nucleus", Compartment.CYTOPLASM: "dab_cytoplasm",
               Compartment.MEMBRANE: "dab_membrane", Compartment.CELL: "dab_cell"}[comp]  # fmt: skip
        return c[key]

    def scored(self) -> IHCMeasurement:
        """This measurement with 0 / 1+ / 2+ / 3+ recomputed from the cells' DAB."""
        values = self.compartment_values()
        score = np.searchsorted(np.asarray(self.params.thresholds), values, side="right")
        return replace(self, cells={**self.cells, "score": score.astype(np.int64)})

    def location(self) -> str:
        """The compartment where DAB sits among DAB-positive cells (iSight's classes).

        Each positive cell votes by its nucleus / (cytoplasm or membrane) DAB
        ratio: above 1.25 nuclear, below 0.8 cytoplasmic/membranous, else both.
        """
        c = self.cells
        outer = np.maximum(c["dab_cytoplasm"], c["dab_membrane"])
        positive = np.maximum(c["dab_nucleus"], outer) >= self.params.thresholds[0]
        if positive.sum() == 0 or positive.mean() < 0.01:
            return LOCATIONS[0]
        ratio = c["dab_nucleus"][positive] / np.maximum(outer[positive], 1e-3)
        votes = [
            (ratio < 0.8).sum(),
            (ratio > 1.25).sum(),
            ((ratio >= 0.8) & (ratio <= 1.25)).sum(),
        ]
        return LOCATIONS[1 + int(np.argmax(votes))]

    def to_layers(self, name: str = "IHC cells") -> list[tuple[Any, dict[str, Any], str]]:
        """One points layer at cell centroids (µm): hollow rings coloured 0 / 1+ / 2+ / 3+.

        Each ring is a little wider than its nucleus (equivalent diameter +
        :data:`RING_MARGIN_UM`), so the stained nucleus stays visible inside it.
        """
        c = self.cells
        coords = np.stack([c["y_um"], c["x_um"]], axis=1) if self.n_cells else np.zeros((0, 2))
        colors = np.asarray(SCORE_COLORS)[c["score"]] if self.n_cells else np.zeros((0, 4))
        diameter = 2 * np.sqrt(np.maximum(np.asarray(c["area_um2"], float), 0) / np.pi)
        sizes = diameter + RING_MARGIN_UM if self.n_cells else 8.0
        features = {k: c[k] for k in CELL_COLUMNS if k not in ("x_um", "y_um")}
        if self.inside is not None:
            features["counted"] = self.inside
        meta = {"histoscope_task": "ihc", "summary": self.summary(),
                "histoscope": self.provenance.to_dict()}  # fmt: skip
        kwargs = {
            "name": name,
            "features": features,
            "face_color": np.zeros((len(coords), 4)) if self.n_cells else "transparent",
            "border_color": colors if self.n_cells else "white",
            "border_width": RING_WIDTH,
            "size": sizes,
            "units": ("um", "um"),
            "metadata": meta,
        }
        return [(coords, kwargs, "points")]

    def save(self, out_dir: str | Path) -> list[Path]:
        """Write ``ihc_cells.csv`` (one row per cell), ``ihc_measure.json`` and ``ihc_cells.h5ad``.

        The ``.h5ad`` (AnnData) has one ``obs`` row per cell with the
        :data:`CELL_COLUMNS` (``score`` as the ordered categorical 0 / 1+ /
        2+ / 3+), ``obsm["spatial"]`` the centroids ``(x, y)`` in slide µm, and
        the summary, parameters, µm/px and provenance in ``uns``.
        """
        from histoscope.export.anndata import as_categorical, write_h5ad

        out = Path(out_dir)
        c = self.cells
        counted = (np.ones(self.n_cells, bool) if self.inside is None
                   else np.asarray(self.inside, bool))  # fmt: skip
        region = self.region_name if self.inside is not None else ""
        rows = [",".join((*CELL_COLUMNS, "counted", "region"))]
        for i in range(self.n_cells):
            values = [_fmt(c[k][i]) for k in CELL_COLUMNS]
            rows.append(",".join((*values, str(int(counted[i])), _csv_text(region))))
        cells_path = atomic_write_text(out / "ihc_cells.csv", "\n".join(rows) + "\n")
        doc = {
            "summary": self.summary(),
            "params": {**asdict(self.params), "compartment": self.params.compartment.value},
            "mpp": self.mpp,
            "provenance": self.provenance.to_dict(),
        }
        json_path = atomic_write_text(out / "ihc_measure.json", json.dumps(doc, indent=2) + "\n")
        table = {k: np.asarray(c[k]) for k in CELL_COLUMNS}
        table["score"] = as_categorical(c["score"], SCORE_NAMES)
        table["counted"] = counted
        table["region"] = np.asarray([region] * self.n_cells, dtype=object)
        spatial = np.stack([c["x_um"], c["y_um"]], axis=1) if self.n_cells else np.zeros((0, 2))
        uns = {**doc, "origin_um": list(self.origin_um), "spatial_unit": "um"}
        h5ad_path = write_h5ad(out / "ihc_cells.h5ad", table, spatial, uns)
        return [cells_path, json_path, h5ad_path]


def _csv_text(text: str) -> str:
    """``text`` as one CSV field (quoted when it holds a comma, quote or line break)."""
    if any(ch in text for ch in ',"\n\r'):
        return '"' + text.replace('"', '""') + '"'
    return text


def _fmt(v: Any) -> str:
    return str(int(v)) if isinstance(v, np.integer) else f"{float(v):.4f}"


def dab_warning(tissue_pixels: int, stained_pixels: int) -> str | None:
    """:data:`NO_DAB_WARNING` when under :data:`MIN_DAB_FRACTION` of tissue pixels are DAB 1+.

    Synthetic H&E slides reach up to 3.8 % (haematoxylin-dark debris and red
    cells project onto DAB) and negative IHC 0.2 %; positively stained IHC
    images are over 20 % (scikit-image's IHC image and the synthetic IHC
    slides), so the line sits at 5 %. A weakly positive IHC image under it is
    asked about too: the warning is a question, the numbers are still there.
    """
    if tissue_pixels <= 0 or stained_pixels < MIN_DAB_FRACTION * tissue_pixels:
        return NO_DAB_WARNING
    return None


def allred(percent_positive: float, intensity: int) -> int:
    """Allred score: proportion score (0-5) plus intensity score (0-3)."""
    p = percent_positive
    proportion = (
        0 if p <= 0 else 1 if p < 1 else 2 if p <= 10 else 3 if p <= 33.3 else 4 if p <= 66.7 else 5
    )
    return proportion + intensity if proportion else 0


def quantity_class(percent_positive: float) -> str:
    """iSight's quantity class from percent positive cells."""
    p = percent_positive
    return QUANTITIES[0 if p < 1 else 1 if p < 25 else 2 if p <= 75 else 3]


def cells_in_geometry(m: IHCMeasurement, geometry) -> np.ndarray:
    """Per cell of ``m``, whether its centroid lies in a shapely ``geometry`` given in slide µm."""
    import shapely

    return np.asarray(shapely.contains_xy(geometry, m.cells["x_um"], m.cells["y_um"]), bool)


def cells_in_mask(m: IHCMeasurement, mask: np.ndarray, scale: tuple[float, float],
                  translate: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:  # fmt: skip
    """Per cell of ``m``, whether its centroid falls on a nonzero pixel of ``mask``.

    ``mask`` is placed as a napari layer is: pixel ``(i, j)`` is centred at
    ``(translate[0] + i * scale[0], translate[1] + j * scale[1])`` µm ``(y, x)``;
    cells off the mask are outside.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a region mask must be 2-D, got shape {mask.shape}")
    i = np.floor((m.cells["y_um"] - translate[0]) / scale[0] + 0.5).astype(np.int64)
    j = np.floor((m.cells["x_um"] - translate[1]) / scale[1] + 0.5).astype(np.int64)
    ok = (i >= 0) & (i < mask.shape[0]) & (j >= 0) & (j < mask.shape[1])
    out = np.zeros(m.n_cells, bool)
    out[ok] = mask[i[ok], j[ok]] != 0
    return out


def geojson_region(path: str | Path, slide_mpp: float) -> tuple[Any, str]:
    """The union of a QuPath GeoJSON's polygon annotations in slide µm, and its name.

    The name is the annotations' classification ("tumor region") when they
    share one, else "region in <file name>".

    Raises
    ------
    GeoJSONError
        When the file cannot be read or holds no polygon annotation.
    """
    import shapely
    from shapely import affinity

    from histoscope.errors import GeoJSONError
    from histoscope.export.geojson import read_geojson

    table = read_geojson(path)
    polys = [g for g, kind in zip(table["geometry"], table["object_type"], strict=True)
             if kind == "annotation" and g is not None
             and g.geom_type in ("Polygon", "MultiPolygon")]  # fmt: skip
    if not polys:
        raise GeoJSONError(f"{path}: no polygon annotation to count cells inside")
    geom = affinity.scale(shapely.union_all(polys), slide_mpp, slide_mpp, origin=(0, 0))
    names = {str(c) for c, kind in zip(table["classification"], table["object_type"], strict=True)
             if kind == "annotation" and isinstance(c, str) and c}  # fmt: skip
    name = f"{names.pop().lower()} region" if len(names) == 1 else f"region in {Path(path).name}"
    return geom, name


def measure_region(
    rgb: np.ndarray, mpp: float, params: IHCParams | None = None, *, origin_um=(0.0, 0.0)
) -> IHCMeasurement:
    """Detect cells in an RGB region and measure their DAB.

    Parameters
    ----------
    rgb
        ``(H, W, 3)`` uint8 IHC image (haematoxylin + DAB).
    mpp
        µm per pixel of ``rgb``.
    params
        Detection and scoring parameters.
    origin_um
        ``(y, x)`` of the region's top-left corner in slide µm.
    """
    from scipy import ndimage as ndi
    from skimage import segmentation

    params = params or IHCParams()
    if not mpp > 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {rgb.shape}")
    conc = deconvolve(rgb[..., :3], HDAB)
    hema, dab = conc[..., 0], conc[..., 1]
    pixels = dab_pixel_counts(rgb, dab, params.thresholds[0])
    feats = None
    if params.detection == "learned":
        labels, feats = _learned_nuclei(rgb, mpp, params)
    else:
        labels = find_nuclei(hema, dab, mpp, params)
    n = int(labels.max())
    if n == 0:
        return replace(_empty(params, mpp, origin_um), dab_pixels=pixels, features=feats)
    cells = segmentation.expand_labels(labels, distance=params.cell_expansion / mpp)
    inner = ndi.grey_erosion(cells, size=max(3, int(round(2 * params.membrane_width / mpp)) | 1))
    membrane = (cells > 0) & (inner != cells)
    cyto = (cells > 0) & (labels == 0) & ~membrane
    idx = np.arange(1, n + 1)

    def mean_in(values: np.ndarray, lab: np.ndarray) -> np.ndarray:
        s = ndi.sum_labels(values, lab, idx)
        c = ndi.sum_labels(np.ones_like(values), lab, idx)
        return np.where(c > 0, s / np.maximum(c, 1), 0.0)

    dab_nuc = mean_in(dab, labels)
    dab_cyto = mean_in(dab, np.where(cyto, cells, 0))
    dab_mem = mean_in(dab, np.where(membrane, cells, 0))
    dab_cell = mean_in(dab, cells)
    hema_nuc = mean_in(hema, labels)
    cy, cx = np.asarray(ndi.center_of_mass(np.ones_like(labels), labels, idx)).T
    data = {
        "x_um": origin_um[1] + (cx + 0.5) * mpp,
        "y_um": origin_um[0] + (cy + 0.5) * mpp,
        "area_um2": np.bincount(labels.ravel(), minlength=n + 1)[1:] * mpp**2,
        "dab_nucleus": dab_nuc,
        "dab_cytoplasm": dab_cyto,
        "dab_membrane": dab_mem,
        "dab_cell": dab_cell,
        "hematoxylin_nucleus": hema_nuc,
        "score": np.zeros(n, np.int64),
    }
    return IHCMeasurement(cells=data, params=params, mpp=mpp, origin_um=tuple(origin_um),
                          dab_pixels=pixels, features=feats).scored()  # fmt: skip


def dab_pixel_counts(rgb: np.ndarray, dab: np.ndarray, threshold: float) -> tuple[int, int]:
    """``(tissue, stained)`` pixel counts: total RGB OD over 0.3, and of those DAB OD >= ``threshold``."""
    od = -np.log10(np.clip(np.asarray(rgb[..., :3], np.float32), 1, 255) / 255).sum(axis=-1)
    tissue = od > 0.3
    return int(tissue.sum()), int((tissue & (dab >= threshold)).sum())


def find_nuclei(hema: np.ndarray, dab: np.ndarray, mpp: float, params: IHCParams,
                rgb: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """Label image of nuclei (0 background, 1..n) from haematoxylin and DAB optical densities.

    ``classical`` runs the H&E nucleus detector's segmentation on the
    haematoxylin (see :func:`_classical_nuclei`); ``blobs`` looks for nuclei
    as blobs of haematoxylin at several scales; both find nuclei under DAB and
    in dense tissue. ``hematoxylin`` and ``od_sum`` threshold a background-subtracted image as
    QuPath does, which loses nuclei in dense tissue and under DAB. ``learned``
    needs the ``rgb`` image itself (see :func:`_learned_nuclei`).
    """
    if params.detection == "learned":
        if rgb is None:
            raise ValueError("detection='learned' needs the RGB image (rgb=)")
        return _learned_nuclei(rgb, mpp, params)[0]
    if params.detection == "blobs":
        return _blob_nuclei(hema, mpp, params)
    if params.detection == "classical":
        return _classical_nuclei(hema, mpp, params)
    return _threshold_nuclei(hema + dab if params.detection == "od_sum" else hema, mpp, params)


def _blob_markers(hema: np.ndarray, mpp: float, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Nucleus centres ``(k, 2)`` (row, col) and the strongest blob response per pixel.

    Peaks of the scale-normalised Laplacian of Gaussian over space and scale
    (:data:`BLOB_SIGMAS_UM`); a weaker peak within 0.8·√2·σ of a stronger one
    is the same nucleus seen at another scale and is dropped.
    """
    from scipy import ndimage as ndi
    from scipy.spatial import cKDTree
    from skimage import feature

    sigmas = np.asarray(BLOB_SIGMAS_UM) / mpp
    stack = np.stack([-ndi.gaussian_laplace(hema, s) * s**2 for s in sigmas], axis=-1)
    peaks = feature.peak_local_max(stack, threshold_abs=threshold, footprint=np.ones((3, 3, 3)),
                                   exclude_border=False)  # fmt: skip
    order = np.argsort(-stack[tuple(peaks.T)], kind="stable")
    peaks = peaks[order]
    radius = 0.8 * np.sqrt(2) * sigmas[peaks[:, 2]]
    keep = np.ones(len(peaks), bool)
    if len(peaks):
        tree = cKDTree(peaks[:, :2])
        for i in range(len(peaks)):
            if keep[i]:
                near = np.asarray(tree.query_ball_point(peaks[i, :2], radius[i]), dtype=np.int64)
                keep[near[near > i]] = False
    return peaks[keep, :2], stack.max(axis=-1)


def _classical_nuclei(hema: np.ndarray, mpp: float, params: IHCParams) -> np.ndarray:
    """Nuclei by the H&E detector's segmentation (:func:`histoscope.nuclei._classical.segment`).

    Haematoxylin here comes from the H-DAB deconvolution, so DAB over a
    nucleus does not hide it; the detector's 5 µm top-hat, local-peak rule and
    contrast-weighted watershed then find brown and blue nuclei alike, also in
    dense tissue. Its threshold is :attr:`IHCParams.nucleus_threshold`; the
    size limits are those of :class:`IHCParams`.
    """
    from histoscope.nuclei import NucleiParams
    from histoscope.nuclei._classical import segment

    # the detector's tile overlap is not used here, but must cover its largest nucleus
    overlap = max(24.0, float(np.ceil(2 * np.sqrt(params.nucleus_max_area / np.pi))))
    labels = segment(np.asarray(hema, np.float32), mpp,
                     NucleiParams(threshold=params.nucleus_threshold, overlap_um=overlap,
                                  max_area_um2=params.nucleus_max_area))  # fmt: skip
    return _keep_sizes(labels, mpp, params)


def _learned_nuclei(
    rgb: np.ndarray, mpp: float, params: IHCParams
) -> tuple[np.ndarray, np.ndarray]:
    """Nuclei from the learned centre detector (:mod:`histoscope.models.ihc_detector`).

    The shipped network (``sample_data/ihc_detector_default.safetensors``)
    predicts a centre heatmap and a nucleus foreground at its card's µm/px
    (``input_spec.mpp``, 0.5), in pieces of bounded size; its
    peaks above the card's threshold seed a watershed on the heatmap inside
    the foreground, so each nucleus has an outline and compartments work as
    for the other methods. An image at another µm/px is resampled to the
    network's and the labels back. Trained on synthetic IHC slides only: also
    returns the network's features of the image's tissue windows, which
    :func:`iter_measure_slide` compares with the training slides'.
    """
    from scipy import ndimage as ndi

    from histoscope.models import ihc_detector as D

    model, card = D.load_detector()  # the card is checked on load (threshold, µm/px)
    threshold = float(card.config["threshold"])
    net_mpp = float(card.input_spec["mpp"])
    f = mpp / net_mpp  # > 1: the image is coarser than the network's input
    image = np.asarray(rgb)[..., :3]
    if abs(f - 1) > 0.02:
        image = np.clip(ndi.zoom(image.astype(np.float32), (f, f, 1), order=1), 0, 255)
        image = image.astype(np.uint8)
    heat, fg, feats = D.predict_maps(model, image)
    peaks = D.find_peaks(heat, threshold, net_mpp)
    labels = D.nuclei_from_maps(heat, fg, peaks, net_mpp, params.nucleus_max_area)
    if abs(f - 1) > 0.02:
        shape = np.asarray(rgb).shape[:2]
        labels = ndi.zoom(labels, (shape[0] / labels.shape[0], shape[1] / labels.shape[1]),
                          order=0, grid_mode=True, mode="nearest")  # fmt: skip
    return _keep_sizes(labels, mpp, params), feats


def _blob_nuclei(hema: np.ndarray, mpp: float, params: IHCParams) -> np.ndarray:
    """Nuclei grown from blob centres over smoothed haematoxylin, inside the blobs."""
    from skimage import filters, segmentation

    peaks, response = _blob_markers(hema, mpp, params.blob_threshold)
    markers = np.zeros(hema.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    smooth = filters.gaussian(hema, sigma=params.smooth_sigma / mpp)
    labels = segmentation.watershed(-smooth, markers, mask=response > 0)
    return _keep_sizes(labels, mpp, params)


def _threshold_nuclei(det: np.ndarray, mpp: float, params: IHCParams) -> np.ndarray:
    """QuPath-style: smooth, subtract the background, threshold, split touching nuclei by shape."""
    from scipy import ndimage as ndi
    from skimage import feature, filters, measure, morphology, segmentation

    det = filters.gaussian(det, sigma=params.smooth_sigma / mpp)
    # White top-hat: subtract the local background (stained cytoplasm, stroma) under nuclei.
    size = max(3, int(round(2 * params.background_radius / mpp)) | 1)
    det = det - ndi.grey_opening(det, size=(size, size))
    nuclei = ndi.binary_fill_holes(det > params.nucleus_threshold)
    min_px = params.nucleus_min_area / mpp**2
    nuclei = morphology.remove_small_objects(nuclei, max_size=int(min_px))
    dist = ndi.distance_transform_edt(nuclei)
    min_dist = max(1, int(round(np.sqrt(params.nucleus_min_area / np.pi) / mpp)))
    peaks = feature.peak_local_max(dist, min_distance=min_dist, labels=measure.label(nuclei))
    markers = np.zeros(dist.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = _keep_sizes(segmentation.watershed(-dist, markers, mask=nuclei), mpp, params)
    n = int(labels.max())
    if n:  # trim each nucleus to its half-maximum contour, undoing the smoothing's spread
        peak = np.concatenate([[0.0], ndi.maximum(det, labels, np.arange(1, n + 1))])
        labels[det < 0.5 * peak[labels]] = 0
    return segmentation.relabel_sequential(labels)[0]


def _keep_sizes(labels: np.ndarray, mpp: float, params: IHCParams) -> np.ndarray:
    """Labels with nuclei outside ``[nucleus_min_area, nucleus_max_area]`` removed, renumbered."""
    from skimage import segmentation

    areas = np.bincount(labels.ravel()) * mpp**2
    bad = (areas < params.nucleus_min_area) | (areas > params.nucleus_max_area)
    bad[0] = False
    labels = np.where(bad[labels], 0, labels)
    return segmentation.relabel_sequential(labels)[0]


def _empty(params: IHCParams, mpp: float, origin_um) -> IHCMeasurement:
    cells = {k: np.zeros(0, np.int64 if k == "score" else np.float64) for k in CELL_COLUMNS}
    return IHCMeasurement(cells=cells, params=params, mpp=mpp, origin_um=tuple(origin_um))


def measure_slide(
    slide, params: IHCParams | None = None, *, progress=None, **kwargs
) -> IHCMeasurement:
    """Measure a slide tile by tile; see :func:`iter_measure_slide` for the parameters.

    ``progress(done, total)`` is called after each tile.
    """
    from histoscope.progress import drive

    report = None if progress is None else (lambda step: progress(step.done, step.total))
    return drive(iter_measure_slide(slide, params, **kwargs), report)


def _require_mpp(slide) -> None:
    """Raise :class:`~histoscope.errors.SlideError` when the slide's µm/px is unknown."""
    if slide.mpp is None:
        from histoscope.errors import SlideError

        raise SlideError(f"{slide.path}: µm/px is unknown; pass mpp= when opening the slide "
                         "(CLI: --mpp)")  # fmt: skip


def iter_measure_slide(
    slide,
    params: IHCParams | None = None,
    *,
    mpp: float | None = None,
    region: tuple[int, int, int, int] | None = None,
    tile: int = 1024,
    margin_um: float = 20.0,
) -> Generator[Step, bool | None, IHCMeasurement]:
    """Measure a slide (or a level-0 ``region=(x, y, w, h)``) tile by tile.

    A generator: yields :class:`~histoscope.progress.Step` s (tiles) and
    returns the :class:`IHCMeasurement`; sending ``False`` (cancel) stops after
    the current tile and returns the cells of the tiles finished, marked
    ``cancelled``. Tiles overlap by ``margin_um``; a cell belongs to the tile
    whose core holds its centroid, so no cell is counted twice. ``mpp``
    defaults to ``params.mpp``, never finer than the slide. With learned
    detection on a read coarser than the network's µm/px, tiles shrink so a
    tile upsampled for the network stays within :data:`LEARNED_MAX_INPUT` px.
    """
    params = params or IHCParams()
    _require_mpp(slide)
    mpp = max(params.mpp if mpp is None else mpp, slide.mpp)
    if not mpp > 0 or tile < 64:
        raise ValueError(f"mpp must be positive and tile >= 64 px, got mpp={mpp}, tile={tile}")
    x0, y0, w0, h0 = region if region is not None else (0, 0, *slide.dimensions)
    if w0 <= 0 or h0 <= 0:
        raise ValueError(f"region must have a positive size, got {region}")
    f = mpp / slide.mpp  # level-0 px per output px
    margin = round(margin_um / mpp)
    if params.detection == "learned":  # the tile upsampled to the network's µm/px stays bounded
        from histoscope.models.ihc_detector import load_detector

        up = mpp / float(load_detector()[1].input_spec["mpp"])
        if up > 1:
            tile = max(64, min(tile, int(LEARNED_MAX_INPUT / up) - 2 * margin))
    step = tile * f
    origins = [(x0 + i * step, y0 + j * step) for j in range(int(np.ceil(h0 / step)))
               for i in range(int(np.ceil(w0 / step)))]  # fmt: skip
    parts: list[dict[str, np.ndarray]] = []
    feats: list[np.ndarray] = []
    pixels = np.zeros(2, np.int64)
    cancelled = False
    for k, (tx, ty) in enumerate(origins):
        rx, ry = tx - margin * f, ty - margin * f
        size = tile + 2 * margin
        rgb = slide.read_region(round(rx), round(ry), size, size, mpp=mpp)
        m = measure_region(rgb, mpp, params, origin_um=(ry * slide.mpp, rx * slide.mpp))
        core_x = (tx * slide.mpp, min(tx + step, x0 + w0) * slide.mpp)
        core_y = (ty * slide.mpp, min(ty + step, y0 + h0) * slide.mpp)
        keep = ((m.cells["x_um"] >= core_x[0]) & (m.cells["x_um"] < core_x[1])
                & (m.cells["y_um"] >= core_y[0]) & (m.cells["y_um"] < core_y[1]))  # fmt: skip
        parts.append({key: v[keep] for key, v in m.cells.items()})
        if m.features is not None:
            feats.append(m.features)
        pixels += m.dab_pixels  # margins counted twice: a ratio, so it hardly matters
        if (yield Step(k + 1, len(origins), "IHC tiles")) is False and k + 1 < len(origins):
            cancelled = True
            break
    cells = {key: np.concatenate([p[key] for p in parts]) if parts else np.zeros(0)
             for key in CELL_COLUMNS}  # fmt: skip
    cells["score"] = cells["score"].astype(np.int64)
    dab_pixels = (int(pixels[0]), int(pixels[1]))
    prov = Provenance(task="ihc", slide=str(slide.path), mpp=mpp,
                      params={**plain(params), "warning": dab_warning(*dab_pixels)},
                      tile_grid={"tile": tile, "region": [x0, y0, w0, h0],
                                 "tiles_done": len(parts), "tiles": len(origins)},
                      cancelled=cancelled)  # fmt: skip
    if params.detection == "learned":  # which weights found the nuclei
        from histoscope.models.ihc_detector import DEFAULT_CHECKPOINT, FAMILY, load_detector

        card = load_detector()[1]
        prov = replace(prov, checkpoint_sha256=card.sha256 or "",
                       params={**prov.params, "detector": {"family": FAMILY,
                                                           "name": DEFAULT_CHECKPOINT,
                                                           "sha256": card.sha256 or ""}})  # fmt: skip
    result = IHCMeasurement(provenance=prov, cells=cells, params=params, mpp=mpp,
                            dab_pixels=dab_pixels, scan_mpp=float(slide.mpp)).scored()  # fmt: skip
    if params.detection != "learned":
        return result
    from histoscope.ood import MIN_ITEMS, with_ood

    windows = np.concatenate(feats) if feats else np.zeros((0, 0))
    need = MIN_ITEMS["patches"]
    missing = "too little tissue to judge (no 32 µm tissue window)"
    if 0 < len(windows) < need:  # said in the pathologist's words, not as "patches"
        missing = (f"too little tissue to judge ({len(windows)} tissue "
                   f"window{'s' if len(windows) > 1 else ''} of 32 µm, {need} needed)")  # fmt: skip
    return with_ood(result, card, windows if len(windows) >= need else None,
                    f"IHC learned nucleus detection on {Path(str(slide.path)).name}",
                    items="patches", missing=missing)  # fmt: skip


def _run(session, checkpoint, params: IHCParams, *, region=None, near=None, engine=None):
    counted = None
    _require_mpp(session.slide)  # before the region file, which is placed in µm
    if params.count_inside:  # read first: a bad file fails before any tile is measured
        counted = geojson_region(params.count_inside, session.slide.mpp)
    m = yield from iter_measure_slide(session.slide, params, region=region)
    return m if counted is None else m.within(cells_in_geometry(m, counted[0]), counted[1])


SPEC = register(TaskSpec(name="ihc", title="IHC measurement", params=IHCParams, run=_run,
                         region=True))  # fmt: skip
