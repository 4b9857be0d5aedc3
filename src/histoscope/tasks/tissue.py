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
from histoscope.tissue import EditedTissue, TissueMask, TissueParams, mask_sha256, mask_shape

#: How the tissue mask is drawn: an outline in a colour that stands out on H&E and IHC.
MASK_COLOR = (0.0, 1.0, 0.4, 1.0)
#: Outline width of the tissue layer in mask pixels (the widget sets it; 0 fills).
MASK_CONTOUR = 2
#: Key under which a tissue layer's metadata asks for :data:`MASK_CONTOUR` once it is in a
#: viewer (napari's layer data tuple cannot carry a contour); see :func:`outline_tissue_layer`.
CONTOUR_KEY = "histoscope_contour"


def tissue_colormap() -> dict:
    """The tissue layer's labels colours: 0 clear, every other label :data:`MASK_COLOR`.

    Any nonzero label counts as tissue (:func:`use_edited_mask`), so any label
    the user paints with is drawn as tissue too.
    """
    return {None: MASK_COLOR, 0: (0.0, 0.0, 0.0, 0.0), 1: MASK_COLOR}


def tissue_display(kwargs: dict) -> dict:
    """Layer ``kwargs`` of a tissue labels layer with the mask's colours and outline request.

    Used for a fresh mask and for a restored session's tissue layer (whose
    saved settings lost the colour dictionary and the contour).
    """
    meta = {**(kwargs.get("metadata") or {}), CONTOUR_KEY: MASK_CONTOUR}
    return {**kwargs, "colormap": tissue_colormap(), "metadata": meta}


def outline_tissue_layer(layer) -> None:
    """Draw a tissue labels layer as its outline when its metadata asks for it (once)."""
    meta = getattr(layer, "metadata", None) or {}
    if getattr(layer, "_type_string", "") == "labels" and CONTOUR_KEY in meta:
        layer.contour = int(meta.pop(CONTOUR_KEY))


@dataclass(frozen=True, kw_only=True)
class TissueResult(Result):
    """A tissue mask as a labels layer aligned over the slide."""

    mask: TissueMask
    slide_mpp: float

    def to_layers(self) -> list:
        m = self.mask
        off = (m.mpp - self.slide_mpp) / 2  # mask pixel centres over level-0 pixel centres
        data = m.mask.astype(np.uint8)
        meta = {"histoscope": self.provenance.to_dict(), "histoscope_task": "tissue",
                "mask_sha256": mask_sha256(data), "mask_mpp": m.mpp}  # fmt: skip
        kwargs = {"name": "tissue", "scale": (m.mpp, m.mpp), "translate": (off, off),
                  "units": ("um", "um"), "opacity": 0.9, "metadata": meta}  # fmt: skip
        return [(data, tissue_display(kwargs), "labels")]

    def summary(self) -> dict[str, Any]:
        m = self.mask
        edited = not np.isfinite(m.threshold)  # a user's edit has no threshold
        return {"tissue_fraction": m.fraction, "mask_mpp": m.mpp,
                "threshold": None if edited else m.threshold, "edited": edited,
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


def use_edited_mask(session, mask: np.ndarray, base: TissueParams | None = None) -> EditedTissue:
    """Make a mask the user edited the session's tissue in force.

    Later tile grids (the tumour map, MIL, every task that needs tissue) use
    ``mask`` as it is; the ``tissue`` task run with the returned parameters
    shows it again.

    Parameters
    ----------
    session
        The :class:`~histoscope.session.Session` of the slide the mask covers.
    mask
        ``(H, W)`` mask, nonzero on tissue, at ``base.mpp`` µm/px over the
        whole slide (the shape :func:`histoscope.tissue.tissue_mask` gives).
    base
        The detection settings the mask was made with (default: the session's).

    Returns
    -------
    EditedTissue
        The key the edited mask is kept under; it is also set as
        ``session.tissue_params``.

    Raises
    ------
    ValueError
        When the mask is not 2-D or its shape does not cover the slide at ``base.mpp``.
    """
    from dataclasses import asdict, fields

    b = base if base is not None else session.tissue_params
    m = np.asarray(mask)
    want = mask_shape(session.slide, b.mpp)
    if m.ndim != 2 or m.shape != want:
        raise ValueError(f"{session.slide.path}: an edited tissue mask at {b.mpp:g} µm/px must be "
                         f"{want[0]} x {want[1]} pixels, got shape {m.shape}")  # fmt: skip
    plain_base = {f.name: asdict(b)[f.name] for f in fields(TissueParams)}
    key = EditedTissue(**plain_base, edit_sha256=mask_sha256(m))
    edited = TissueMask(mask=m != 0, mpp=float(b.mpp), threshold=float("nan"))
    session.product("tissue", key, lambda: edited)
    session.tissue_params = key
    return key


def _run(session, checkpoint, params: TissueParams, *, region=None, near=None, engine=None):
    yield Step(0, 1, "tissue")
    session.tissue_params = params
    mask = session.tissue(params)
    prov = Provenance(task="tissue", slide=str(session.slide.path), params=plain(params),
                      mpp=params.mpp)  # fmt: skip
    yield Step(1, 1, "tissue")
    return TissueResult(provenance=prov, mask=mask, slide_mpp=float(session.slide.mpp))


SPEC = register(TaskSpec(name="tissue", title="Tissue mask", params=TissueParams, run=_run))
