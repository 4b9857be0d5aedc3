"""A pathology-style report per slide, written from its ground truth.

The facts (``findings``) come from the tissue plan and the cell table; the
wording is drawn from several phrasings per fact and the sentence order
varies, so two reports can state the same findings in different words (high
factual agreement, low BLEU) or share most words while differing in one fact.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from histoscope.synthetic._cells import SlideContext
from histoscope.synthetic._constants import CELL_CLASSES, FAT, LYMPHOID, MUSCLE, NECROSIS

DIAGNOSIS = {
    "colon": "adenocarcinoma",
    "stomach": "adenocarcinoma",
    "breast": "invasive carcinoma of no special type",
    "lymph node": "metastatic carcinoma",
    "prostate": "acinar adenocarcinoma",
    "lung": "non-small cell carcinoma",
    "skin": "squamous cell carcinoma",
    "uterus": "endometrioid carcinoma",
}
_IMMUNE = [CELL_CLASSES.index(n) for n in ("lymphocyte", "plasma_cell", "neutrophil", "macrophage")]


def findings(ctx: SlideContext, cells: dict, label: dict | None = None) -> dict:
    """Facts a report should state, measured on the ground truth."""
    p, lay = ctx.params, ctx.layout
    map_mm = lay.map_px * p.mpp / 1000
    tum = lay.tumour_mask
    f = {
        "organ": p.organ,
        "malignant": p.malignant,
        "diagnosis": DIAGNOSIS[p.organ] if p.malignant else "no malignancy",
        "tumour_percent": round(100 * lay.tissue_fraction_tumour, 1),
        "necrosis": bool((lay.types == NECROSIS).any()),
        "fat": bool((lay.types == FAT).any()),
        "muscle": bool((lay.types == MUSCLE).any()),
        "lymphoid_aggregates": bool((lay.types == LYMPHOID).any()),
    }
    if p.malignant:
        ys, xs = np.nonzero(tum)
        f["tumour_size_mm"] = round(float(max(np.ptp(ys), np.ptp(xs)) + 1) * map_mm, 1)
        f["pattern"] = "solid" if p.nest_threshold == 0 else "nested"
        in_tum = lay.tumour_mask[
            np.clip((cells["y"] / lay.map_px).astype(int), 0, tum.shape[0] - 1),
            np.clip((cells["x"] / lay.map_px).astype(int), 0, tum.shape[1] - 1),
        ]
        dens = np.isin(cells["cls"][in_tum], _IMMUNE).sum() / max(1e-9, tum.sum() * map_mm**2)
        f["immune_per_mm2"] = round(float(dens), 0)
        f["immune_infiltration"] = "brisk" if dens > 900 else "moderate" if dens > 350 else "sparse"
        tissue = lay.types != 0
        edge = tissue & ~ndi.binary_erosion(tissue, iterations=1, border_value=0)
        d_edge = ndi.distance_transform_edt(~edge) * map_mm
        f["margin_mm"] = round(float(d_edge[tum].min()), 2)
        f["margin"] = "involved" if f["margin_mm"] < 0.1 else "clear"
    if label is not None and "ihc" in label:
        f["ihc"] = {k: label["ihc"][k] for k in ("intensity", "location", "quantity")}
        f["antibody"] = label["params"]["antibody"]
    return f


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def write_report(f: dict, seed: int) -> str:
    """Text of the report for findings ``f``, phrased by ``seed``."""
    rng = np.random.default_rng([seed, 0x2E])
    organ = f["organ"]
    head = _pick(rng, [f"{organ.capitalize()}, biopsy:", f"Specimen: {organ}.",
                       f"Sections of {organ} tissue are examined."])  # fmt: skip
    body: list[str] = []
    if f["malignant"]:
        dx = f["diagnosis"]
        body.append(_pick(rng, [
            f"The sections show {dx}.",
            f"Diagnosis: {dx}.",
            f"There is infiltrating {dx} with a {f['pattern']} growth pattern.",
            f"Findings are those of {dx}, growing in {f['pattern']} sheets and nests.",
        ]))  # fmt: skip
        pct, size = f["tumour_percent"], f["tumour_size_mm"]
        if pct < 5:
            ext = [f"Tumour forms a small focus of {size} mm, about {pct:.0f}% of the tissue.",
                   f"Only a single small focus is seen ({size} mm; {pct:.1f}% of the section).",
                   f"A minute focus of carcinoma measures {size} mm."]  # fmt: skip
        else:
            ext = [f"Tumour occupies approximately {pct:.0f}% of the tissue and spans {size} mm.",
                   f"The carcinoma involves about {pct:.0f}% of the examined tissue ({size} mm).",
                   f"Tumour extent: {pct:.0f}% of tissue, greatest dimension {size} mm."]  # fmt: skip
        body.append(_pick(rng, ext))
        til = f["immune_infiltration"]
        body.append(_pick(rng, [
            f"Tumour-infiltrating lymphocytes are {til}.",
            f"The inflammatory infiltrate within the tumour is {til}.",
            f"There is a {til} host immune response.",
        ]))  # fmt: skip
        body.append(_pick(rng, ["Tumour necrosis is present.", "Areas of necrosis are seen.",
                                "Comedo-type necrosis is identified."]  # fmt: skip
                          if f["necrosis"] else ["No necrosis is identified.",
                                                 "Necrosis is absent."]))  # fmt: skip
        if f["margin"] == "involved":
            body.append(_pick(rng, ["Tumour extends to the edge of the tissue.",
                                    "The margin is involved by tumour."]))  # fmt: skip
        else:
            mm = f["margin_mm"]
            body.append(_pick(rng, [f"The closest margin is clear by {mm} mm.",
                                    f"Margins are free of tumour (closest {mm} mm)."]))  # fmt: skip
    else:
        body.append(_pick(rng, ["No evidence of malignancy.", "Negative for malignancy.",
                                "There is no tumour in the sections examined.",
                                "Benign tissue; no carcinoma is seen."]))  # fmt: skip
        parts = [n for n, k in (("adipose tissue", "fat"), ("smooth muscle", "muscle"),
                                ("lymphoid aggregates", "lymphoid_aggregates")) if f[k]]  # fmt: skip
        if parts:
            body.append(_pick(rng, [f"The tissue includes {', '.join(parts)}.",
                                    f"Also present: {', '.join(parts)}."]))  # fmt: skip
    if "ihc" in f:
        ihc, ab = f["ihc"], f["antibody"]
        if ihc["intensity"] == "negative":
            body.append(_pick(rng, [f"{ab} immunostain is negative.",
                                    f"No {ab} staining is seen in the target cells."]))  # fmt: skip
        else:
            body.append(_pick(rng, [
                f"{ab} shows {ihc['intensity']} {ihc['location']} staining in {ihc['quantity']} "
                "of target cells.",
                f"Immunohistochemistry for {ab}: {ihc['intensity']}, {ihc['location']}, "
                f"{ihc['quantity']} of cells.",
            ]))  # fmt: skip
    order = [0, *list(rng.permutation(np.arange(1, len(body))))] if len(body) > 2 else None
    if order is not None and rng.random() < 0.5:
        body = [body[i] for i in order]
    return " ".join([head, *body])
