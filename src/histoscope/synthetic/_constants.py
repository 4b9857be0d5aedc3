"""Names, colours and designed ambiguities of the synthetic tissue.

Everything a reader of the ground truth needs to interpret the labels lives
here, in one place, so the training code and the docs can import the lists
instead of copying them.
"""

from __future__ import annotations

import numpy as np

#: Tissue compartments of the low-resolution tissue map, index = map value.
TISSUE_TYPES: tuple[str, ...] = (
    "glass",
    "stroma",
    "mucosa",
    "tumour",
    "fat",
    "lymphoid",
    "necrosis",
    "muscle",
)
GLASS, STROMA, MUCOSA, TUMOUR, FAT, LYMPHOID, NECROSIS, MUSCLE = range(len(TISSUE_TYPES))

#: Cell classes written to the ground truth, index = class id.
CELL_CLASSES: tuple[str, ...] = (
    "tumour",
    "epithelial",
    "lymphocyte",
    "plasma_cell",
    "neutrophil",
    "macrophage",
    "fibroblast",
    "smooth_muscle",
    "endothelial",
)
(
    C_TUMOUR,
    C_EPITHELIAL,
    C_LYMPHOCYTE,
    C_PLASMA,
    C_NEUTROPHIL,
    C_MACROPHAGE,
    C_FIBROBLAST,
    C_SMOOTH_MUSCLE,
    C_ENDOTHELIAL,
) = range(len(CELL_CLASSES))

#: QuPath-style display colours ``[r, g, b]`` per class.
CLASS_COLORS: dict[str, list[int]] = {
    "tumour": [200, 0, 0],
    "epithelial": [255, 160, 0],
    "lymphocyte": [30, 60, 220],
    "plasma_cell": [150, 0, 200],
    "neutrophil": [0, 200, 200],
    "macrophage": [120, 80, 40],
    "fibroblast": [0, 150, 60],
    "smooth_muscle": [120, 200, 0],
    "endothelial": [240, 90, 200],
}

#: Class pairs drawn from *the same* per-cell morphology sampler: a crop of the
#: cell alone cannot separate them; only the neighbourhood can (fibroblasts lie
#: scattered in loose stroma, smooth-muscle cells in dense aligned bundles,
#: endothelial cells on the rim of vessels filled with red cells).
CONTEXT_ONLY_PAIRS: tuple[tuple[str, str], ...] = (
    ("fibroblast", "smooth_muscle"),
    ("fibroblast", "endothelial"),
    ("smooth_muscle", "endothelial"),
)

#: Class pairs placed by *the same* spatial process (an inflammatory cell is
#: put at a site first and its class drawn afterwards with fixed proportions,
#: everywhere on every slide): the neighbourhood carries no information, only
#: the cell's own morphology separates them.
MORPHOLOGY_ONLY_PAIRS: tuple[tuple[str, str], ...] = (
    ("lymphocyte", "plasma_cell"),
    ("lymphocyte", "neutrophil"),
    ("lymphocyte", "macrophage"),
    ("plasma_cell", "neutrophil"),
    ("plasma_cell", "macrophage"),
    ("neutrophil", "macrophage"),
)

#: Fixed class proportions of inflammatory cells, the same at every site.
IMMUNE_MIX: dict[str, float] = {
    "lymphocyte": 0.70,
    "plasma_cell": 0.14,
    "neutrophil": 0.08,
    "macrophage": 0.08,
}

# --- iSight label sets ------------------------------------------------------
INTENSITY_CLASSES: tuple[str, ...] = ("negative", "weak", "moderate", "strong")
LOCATION_CLASSES: tuple[str, ...] = (
    "none",
    "cytoplasmic/membranous",
    "nuclear",
    "cytoplasmic/membranous+nuclear",
)
QUANTITY_CLASSES: tuple[str, ...] = ("none", "<25%", "25-75%", ">75%")
MALIGNANCY_CLASSES: tuple[str, ...] = ("normal", "cancer")
#: Mean DAB optical density of positive cells separating weak|moderate|strong.
INTENSITY_EDGES: tuple[float, float] = (0.25, 0.5)
#: DAB compartments a slide's antibody stains.
COMPARTMENTS: tuple[str, ...] = ("nuclear", "cytoplasmic", "membranous", "nuclear+cytoplasmic")

#: Organs (the iSight "tissue" task) with a SNOMED-CT-like topography code and
#: the relative weight of each tissue compartment in their architecture.
ORGANS: dict[str, dict] = {
    "colon": {"snomed": "T-67000", "weights": {"mucosa": 1.0, "muscle": 0.6, "fat": 0.3}},
    "stomach": {"snomed": "T-57000", "weights": {"mucosa": 1.0, "muscle": 0.8, "lymphoid": 0.3}},
    "breast": {"snomed": "T-04000", "weights": {"fat": 1.0, "mucosa": 0.4, "stroma": 0.8}},
    "lymph node": {"snomed": "T-C4000", "weights": {"lymphoid": 1.4, "fat": 0.3}},
    "prostate": {"snomed": "T-92000", "weights": {"mucosa": 0.7, "muscle": 0.9}},
    "lung": {"snomed": "T-28000", "weights": {"stroma": 0.6, "lymphoid": 0.4, "mucosa": 0.4}},
    "skin": {"snomed": "T-01000", "weights": {"stroma": 1.0, "fat": 0.6}},
    "uterus": {"snomed": "T-83000", "weights": {"muscle": 1.4, "mucosa": 0.5}},
}

#: Antibodies per staining compartment (the metadata text of an HPA-style row).
ANTIBODIES: dict[str, tuple[str, ...]] = {
    "nuclear": ("Ki-67", "p53", "ER", "PR"),
    "cytoplasmic": ("CK20", "CDX2-cyto", "Vimentin"),
    "membranous": ("HER2", "E-cadherin", "PD-L1"),
    "nuclear+cytoplasmic": ("S100", "p16"),
}

#: Reference stain matrix (rows: haematoxylin, eosin, DAB), unit OD vectors as
#: in :data:`skimage.color.rgb_from_hed`.
REFERENCE_STAINS = np.array(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64
)
REFERENCE_STAINS = REFERENCE_STAINS / np.linalg.norm(REFERENCE_STAINS, axis=1, keepdims=True)


def class_index(name: str) -> int:
    """Index of a cell class name in :data:`CELL_CLASSES`."""
    return CELL_CLASSES.index(name)
