"""Tissue detection as a task: the session's tissue mask as a labels layer and files.

Running it sets the session's tissue detection in force
(:attr:`histoscope.session.Session.tissue_params`), so the tumour map, MIL and
every later tile grid use the mask the user adjusted; the mask itself is a
session product, computed once.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histoscope.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from histoscope.progress import Step
from histoscope.results import Provenance, Result, plain
from histoscope.tasks._registry import TaskSpec, register
from histoscope.tissue import TissueMask, TissueParams


@dataclass(frozen=True, kw_only=True)
class TissueResult(Result):
    """A tissue mask as a labels layer aligned over the slide."""

    mask: TissueMask
    slide_mpp: float

    def to_layers(self) -> list:
        m = self.mask
        off = (m.mpp - self.slide_mpp) / 2  # mask pixel centres over level-0 pixel centres
        kwargs = {"name": "tissue", "scale": (m.mpp, m.mpp), "translate": (off, off), "units": ("um", "um"),
                  "opacity": 0.3, "metadata": {"histoscope": self.provenance.to_dict()}}  # fmt: skip
        return [(m.mask.astype(np.uint8), kwargs, "labels")]

    def summary(self) -> dict[str, Any]:
        m = self.mask
        return {"tissue_fraction": m.fraction, "mask_mpp": m.mpp, "threshold": m.threshold,
                "shape": list(m.mask.shape)}  # fmt: skip

    def save(self, out_dir) -> list[Path]:
        """Write the mask; return the paths.

        ``tissue_mask.tif`` (with its µm/px), ``tissue_mask.png``, ``tissue.json``
        and ``tissue_mask.ome.zarr`` (a folder: the mask as a pyramid, max
        downsampling, placed in µm as the labels layer).
        """
        import tifffile
        from PIL import Image

        from histoscope.export.omezarr import write_ome_zarr

        out = Path(out_dir)
        res = 1e4 / self.mask.mpp
        mask = self.mask.mask.astype(np.uint8)
        with atomic_path(out / "tissue_mask.tif", ".tif") as tmp:
            tifffile.imwrite(tmp, mask, resolution=(res, res), resolutionunit="CENTIMETER")
        png = io.BytesIO()
        Image.fromarray(mask * 255).save(png, format="PNG")
        files = [
            out / "tissue_mask.tif",
            atomic_write_bytes(out / "tissue_mask.png", png.getvalue()),
        ]
        doc = {**self.summary(), "provenance": self.provenance.to_dict()}
        files.append(atomic_write_text(out / "tissue.json", json.dumps(doc, indent=2) + "\n"))
        layer = self.to_layers()[0][1]  # placed exactly as the labels layer
        files.append(write_ome_zarr(out / "tissue_mask.ome.zarr", mask, layer["scale"],
                                    layer["translate"], method="max", name="tissue",
                                    attrs={"histoscope": doc}))  # fmt: skip
        return files


def find_tissue(slide, params: TissueParams | None = None) -> TissueResult:
    """Tissue mask of ``slide`` as a :class:`TissueResult` (without a session)."""
    from histoscope.tasks._registry import run

    return run("tissue", slide, params=params or TissueParams())


def _run(session, checkpoint, params: TissueParams, *, region=None, near=None, engine=None):
    yield Step(0, 1, "tissue")
    session.tissue_params = params
    mask = session.tissue(params)
    prov = Provenance(task="tissue", slide=str(session.slide.path), params=plain(params),
                      mpp=params.mpp)  # fmt: skip
    yield Step(1, 1, "tissue")
    return TissueResult(provenance=prov, mask=mask, slide_mpp=float(session.slide.mpp))


SPEC = register(TaskSpec(name="tissue", title="Tissue mask", params=TissueParams, run=_run))
