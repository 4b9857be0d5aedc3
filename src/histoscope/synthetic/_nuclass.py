"""NuClass's per-dataset trio: ``annotations.json`` and two HDF5 patch files.

The layout follows the NuClass training code: ``annotations.json`` maps each
``cell_id`` to its record (``class_id``, ``tissue_type``, ...; read with
``pandas.read_json(orient="index")``), and each HDF5 file holds a merged
``images`` array with a parallel ``keys`` array of cell ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from histoscope.synthetic._cells import SlideContext
from histoscope.synthetic._constants import CELL_CLASSES, TISSUE_TYPES

SIZES = (224, 1024)


def pick_cells(ctx: SlideContext, cells: dict, per_class: int) -> np.ndarray:
    """Indices of up to ``per_class`` cells of every class, chosen by the slide seed."""
    rng = np.random.default_rng([ctx.params.seed, 0x2C])
    chosen = []
    for c in range(len(CELL_CLASSES)):
        idx = np.flatnonzero(cells["cls"] == c)
        if len(idx):
            chosen.append(rng.choice(idx, size=min(per_class, len(idx)), replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def write_nuclass(
    ctx: SlideContext, cells: dict, slide_path: Path, out: Path, stem: str, per_class: int = 8
) -> dict[str, Path]:
    """Write the trio for a class-balanced sample of the slide's cells.

    Patches are read back from the written slide (its JPEG tiles), centred on
    each cell, with white beyond the slide's edge.

    Returns
    -------
    dict
        ``annotations``, ``patches_224`` and ``patches_1024`` paths.
    """
    import h5py

    from histoscope.slide import open_slide

    out.mkdir(parents=True, exist_ok=True)
    idx = pick_cells(ctx, cells, per_class)
    keys = [f"{stem}_{int(cells['uid'][i])}" for i in idx]
    p = ctx.params
    ann = {
        key: {
            "class_id": CELL_CLASSES[cells["cls"][i]],
            "label_id": int(cells["cls"][i]),
            "tissue_type": p.organ,
            "compartment": TISSUE_TYPES[cells["tissue"][i]],
            "x": round(float(cells["x"][i]), 2),
            "y": round(float(cells["y"][i]), 2),
            "mpp": p.mpp,
            "slide": f"{stem}.tif",
        }
        for key, i in zip(keys, idx, strict=True)
    }
    paths = {"annotations": out / "annotations.json"}
    paths["annotations"].write_text(json.dumps(ann, indent=1))
    slide = open_slide(slide_path)
    for size in SIZES:
        path = out / f"patches_{size}x{size}.h5"
        with h5py.File(path, "w") as f:
            images = f.create_dataset(
                "images",
                shape=(len(idx), size, size, 3),
                dtype=np.uint8,
                chunks=(1, size, size, 3) if len(idx) else None,
                compression="lzf" if len(idx) else None,
            )
            for n, i in enumerate(idx):
                y0 = int(round(cells["y"][i])) - size // 2
                x0 = int(round(cells["x"][i])) - size // 2
                images[n] = slide.read_region(x0, y0, size, size)
            f.create_dataset("keys", data=np.array(keys, dtype="S"))
            f.attrs["mpp"] = p.mpp
        paths[f"patches_{size}"] = path
    slide.close()
    return paths
