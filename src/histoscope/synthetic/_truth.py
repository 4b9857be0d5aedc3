"""Collect a slide's ground truth and write it in the formats real datasets use."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from histoscope.synthetic._cells import (
    SlideContext,
    cells_in_window,
    nucleus_polygon,
    target_classes,
)
from histoscope.synthetic._constants import (
    CELL_CLASSES,
    CLASS_COLORS,
    INTENSITY_CLASSES,
    INTENSITY_EDGES,
    LOCATION_CLASSES,
    MALIGNANCY_CLASSES,
    ORGANS,
    QUANTITY_CLASSES,
    TISSUE_TYPES,
)
from histoscope.synthetic._layout import MAP_UM

N_VERTICES = 16
_BLOCK = 2048


def collect_cells(ctx: SlideContext) -> dict[str, np.ndarray]:
    """Every cell of the slide (red cells and debris excluded), block by block.

    Returns
    -------
    dict
        Columns ``uid``, ``x``, ``y`` (level-0 px), ``cls``, ``tissue`` (type
        index under the centroid), ``polygon`` ``(n, N_VERTICES, 2)`` as
        ``(x, y)``, ``a``, ``b``, ``dab``.
    """
    h, w = ctx.params.shape
    out: dict[str, list] = {k: [] for k in ("uid", "x", "y", "cls", "tissue", "polygon", "dab")}
    for y0 in range(0, h, _BLOCK):
        for x0 in range(0, w, _BLOCK):
            c = cells_in_window(ctx, y0, x0, min(h, y0 + _BLOCK), min(w, x0 + _BLOCK))
            keep = c["cls"] >= 0
            c = {k: v[keep] for k, v in c.items() if k not in ("glands", "vessels")}
            out["uid"].append(c["uid"])
            out["x"].append(c["x"])
            out["y"].append(c["y"])
            out["cls"].append(c["cls"])
            out["tissue"].append(ctx.layout.type_at(c["y"], c["x"]))
            out["polygon"].append(nucleus_polygon(c, N_VERTICES))
            out["dab"].append(c["dab"])
    cells = {k: np.concatenate(v) for k, v in out.items()}
    cells["polygon"] = np.clip(cells["polygon"], 0, [w - 1, h - 1])
    return cells


def polygon_area(poly: np.ndarray) -> np.ndarray:
    """Shoelace area of polygons ``(n, v, 2)``."""
    x, y = poly[..., 0], poly[..., 1]
    return 0.5 * np.abs(np.sum(x * np.roll(y, -1, -1) - np.roll(x, -1, -1) * y, axis=-1))


def ihc_labels(ctx: SlideContext, cells: dict) -> dict:
    """The five iSight labels, measured on the cells actually drawn."""
    p = ctx.params
    target = np.isin(cells["cls"], target_classes(p))
    pos = target & (cells["dab"] > 0)
    frac = float(pos.sum() / max(1, target.sum()))
    inten = float(cells["dab"][pos].mean()) if pos.any() else 0.0
    if not pos.any():
        q, i, loc = 0, 0, 0
    else:
        q = 1 if frac < 0.25 else (2 if frac <= 0.75 else 3)
        i = 1 + int(np.searchsorted(INTENSITY_EDGES, inten, side="right"))
        loc = {"nuclear": 2, "cytoplasmic": 1, "membranous": 1, "nuclear+cytoplasmic": 3}[
            p.compartment
        ]
    return {
        "intensity": INTENSITY_CLASSES[i],
        "location": LOCATION_CLASSES[loc],
        "quantity": QUANTITY_CLASSES[q],
        "tissue": p.organ,
        "malignancy": MALIGNANCY_CLASSES[int(p.malignant)],
        "positive_fraction": frac,
        "mean_dab_od": inten,
        "n_target_cells": int(target.sum()),
        "near_boundary": p.near_boundary,
    }


def write_cells(cells: dict, mpp: float, csv_path: Path, geojson_path: Path) -> None:
    """Cells as CSV (one row per cell) and as a QuPath-compatible GeoJSON."""
    area = polygon_area(cells["polygon"]) * mpp * mpp
    with open(csv_path, "w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(["id", "x", "y", "x_um", "y_um", "class_id", "class", "tissue",
                     "area_um2", "dab_od"])  # fmt: skip
        for k in range(len(cells["uid"])):
            x, y = float(cells["x"][k]), float(cells["y"][k])
            wr.writerow([int(cells["uid"][k]), f"{x:.2f}", f"{y:.2f}", f"{x * mpp:.2f}",
                         f"{y * mpp:.2f}", int(cells["cls"][k]), CELL_CLASSES[cells["cls"][k]],
                         TISSUE_TYPES[cells["tissue"][k]], f"{area[k]:.2f}",
                         f"{cells['dab'][k]:.4f}"])  # fmt: skip
    polys = np.round(cells["polygon"], 2)
    # streamed in chunks: a slide's worth of feature dicts never sits in memory at once
    with open(geojson_path, "w") as fh:
        fh.write('{"type":"FeatureCollection","features":[')
        for start in range(0, len(polys), 5000):
            chunk = []
            for k in range(start, min(start + 5000, len(polys))):
                ring = polys[k].tolist()
                ring.append(ring[0])
                name = CELL_CLASSES[cells["cls"][k]]
                chunk.append({
                    "type": "Feature",
                    "id": str(int(cells["uid"][k])),
                    "geometry": {"type": "Polygon", "coordinates": [ring]},
                    "properties": {
                        "objectType": "detection",
                        "classification": {"name": name, "color": CLASS_COLORS[name]},
                        "measurements": {"DAB OD mean": round(float(cells["dab"][k]), 4)},
                    },
                })  # fmt: skip
            text = json.dumps(chunk, separators=(",", ":"))[1:-1]  # C encoder, ~10x json.dump
            fh.write(("," if start else "") + text)
        fh.write("]}")


def write_masks(ctx: SlideContext, tumour_path: Path, tissue_path: Path) -> None:
    """Tumour mask (0/255) and tissue-type map (type index) as PNG at MAP_UM µm/px."""
    from PIL import Image

    dpi = 25400.0 / MAP_UM  # pixels per inch, so readers get the µm/px too
    mask = ctx.layout.tumour_mask.astype(np.uint8) * 255
    Image.fromarray(mask).save(tumour_path, dpi=(dpi, dpi))
    Image.fromarray(ctx.layout.types).save(tissue_path, dpi=(dpi, dpi))


def slide_label(ctx: SlideContext, cells: dict, files: dict[str, str]) -> dict:
    """The slide-level truth: diagnosis, extent, organ, counts, stain, files."""
    p = ctx.params
    counts = np.bincount(cells["cls"], minlength=len(CELL_CLASSES))
    tissue_px = ctx.layout.types != 0
    label = {
        "kind": p.kind,
        "seed": p.seed,
        "organ": p.organ,
        "snomed": ORGANS[p.organ]["snomed"],
        "malignant": p.malignant,
        "label": int(p.malignant),
        "tumour_extent": p.tumour_extent,
        "tumour_fraction": ctx.layout.tissue_fraction_tumour,
        "tissue_area_mm2": float(tissue_px.sum() * (MAP_UM / 1000) ** 2),
        "tissue_fractions": {
            name: float((ctx.layout.types == i).sum() / max(1, tissue_px.sum()))
            for i, name in enumerate(TISSUE_TYPES)
            if i
        },
        "mpp": p.mpp,
        "shape": list(p.shape),
        "mask_um_per_px": MAP_UM,
        "cell_counts": {n: int(v) for n, v in zip(CELL_CLASSES, counts, strict=True)},
        "stain_vectors": {"hematoxylin": list(p.stains[0]), "eosin": list(p.stains[1]),
                          "dab": list(p.stains[2])},  # fmt: skip
        "params": p.to_dict(),
        "files": files,
    }  # fmt: skip
    if p.kind == "ihc":
        label["ihc"] = ihc_labels(ctx, cells)
    return label


def write_hpa_row(label: dict, slide_name: str, path: Path) -> None:
    """One HPA/iSight-style CSV row: image, metadata text and the five labels."""
    ihc = label["ihc"]
    p = label["params"]
    meta = f"Tissue: {label['organ']}. SNOMED: {label['snomed']}. Antibody: {p['antibody']}."
    with open(path, "w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(["image_path", "metadata", "tissue", "snomed", "antibody", "intensity",
                     "location", "quantity", "malignancy", "positive_fraction"])  # fmt: skip
        wr.writerow([slide_name, meta, label["organ"], label["snomed"], p["antibody"],
                     ihc["intensity"], ihc["location"], ihc["quantity"], ihc["malignancy"],
                     f"{ihc['positive_fraction']:.4f}"])  # fmt: skip
