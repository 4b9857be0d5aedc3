"""Class names shared by models, tasks and widgets (no heavy imports here)."""

from __future__ import annotations

#: iSight's staining tasks and their classes, in the paper's order.
INTENSITY = ("negative", "weak", "moderate", "strong")
LOCATION = ("none", "cytoplasmic/membranous", "nuclear", "cytoplasmic/membranous+nuclear")
QUANTITY = ("none", "<25%", "25-75%", ">75%")
MALIGNANCY = ("normal", "cancer")
#: The five iSight tasks in output order; ``tissue`` classes come from the checkpoint.
ISIGHT_TASKS = ("intensity", "location", "quantity", "tissue", "malignancy")
