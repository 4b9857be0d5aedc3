"""Tumour probability heatmaps (HistoHelper): tissue mask, tiles, a patch classifier.

The heatmap is computed viewport-first: tiles nearest a point (the centre of
the user's view) are scored first and the array fills in as batches finish,
so a napari layer showing :attr:`HeatmapJob.values` updates live. Background
(no tissue) stays NaN and is drawn transparent, never as probability 0.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histoscope.engine import EngineParams, Provenance, Result, TileHeatmap
from histoscope.tissue import TissueMask, TissueParams, tile_grid, tissue_mask

#: Class names that count as "tumour" in a patch classifier's card.
TUMOUR_NAMES = ("tumour", "tumor", "cancer", "malignant")


def tumour_index(classes) -> int:
    """Index of the tumour class among ``classes`` (1 for an unnamed binary model)."""
    for i, c in enumerate(classes or ()):
        if str(c).lower() in TUMOUR_NAMES:
            return i
    if classes and len(classes) != 2:
        raise ValueError(f"no tumour class among {list(classes)}; name one of {TUMOUR_NAMES}")
    return 1


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

    def save(self, out_dir) -> list[Path]:
        import tifffile

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        res = 1e4 / self.mask.mpp
        part = out / "tissue_mask.tif.part"
        tifffile.imwrite(part, self.mask.mask.astype(np.uint8), resolution=(res, res),
                         resolutionunit="CENTIMETER")  # fmt: skip
        part.replace(out / "tissue_mask.tif")
        return [out / "tissue_mask.tif", self._write_provenance(out)]


def find_tissue(slide, params: TissueParams | None = None) -> TissueResult:
    """Tissue mask of ``slide`` as a :class:`TissueResult`."""
    p = params or TissueParams()
    mask = tissue_mask(slide, p)
    prov = Provenance(task="tissue", slide=str(slide.path), params=_plain(p), mpp=p.mpp)
    return TissueResult(provenance=prov, mask=mask, slide_mpp=float(slide.mpp))


def _plain(obj) -> dict[str, Any]:
    from dataclasses import asdict

    return {k: (v.value if hasattr(v, "value") else v) for k, v in asdict(obj).items()}


class HeatmapJob:
    """One heatmap run: its tile grid, the live value array, and :meth:`run`.

    Parameters
    ----------
    slide
        An open slide with known µm/px.
    model
        A tile classifier (logits ``(B, C)``) with an ``input_spec``.
    card
        Its checkpoint card (classes, hash) or ``None``.
    tissue
        A precomputed :class:`TissueMask` (computed here if ``None``).
    min_tissue
        Tiles with at most this tissue fraction are skipped (stay NaN).
    stain_norm
        Map the slide's stains onto Macenko's reference H&E before the model
        (fitted once on a 4 µm/px read of the slide's tissue). ``None`` (the
        default) follows the checkpoint: on when its card's ``input_spec``
        says it was trained on Macenko-normalised tiles. Forcing it on for a
        model trained without it changes its inputs and usually hurts.
    """

    def __init__(self, slide, model, card=None, *, tissue: TissueMask | None = None,
                 min_tissue: float = 0.5, stain_norm: bool | None = None) -> None:  # fmt: skip
        self.slide, self.model, self.card = slide, model, card
        self.spec = model.input_spec
        self.tissue = tissue if tissue is not None else tissue_mask(slide)
        self.grid = tile_grid(slide, self.tissue, self.spec.mpp, self.spec.tile_size, min_tissue)
        self.target = tumour_index(getattr(card, "classes", ()))
        self.values = np.full(self.grid.shape, np.nan, np.float32)
        if stain_norm is None:
            trained_on = (getattr(card, "input_spec", None) or {}).get("stain_norm")
            stain_norm = trained_on == "macenko"
        self.normalizer = fit_slide_stains(slide, self.tissue) if stain_norm else None
        self.provenance = Provenance(
            task="tumour_heatmap", slide=str(slide.path),
            checkpoint_sha256=getattr(card, "sha256", "") or "",
            params={"min_tissue": min_tissue, "target_class": self.target,
                    "stain_norm": "macenko" if stain_norm else None},
            mpp=self.spec.mpp, tile_grid=self.grid.to_dict(),
        )  # fmt: skip

    def heatmap(self) -> TileHeatmap:
        """The values so far as a :class:`TileHeatmap` (NaN where not scored)."""
        return TileHeatmap(provenance=self.provenance, values=self.values, grid=self.grid,
                           name="tumour probability")  # fmt: skip

    def layer(self) -> tuple:
        """Layer data for the live heatmap: probability 0-1, transparent background."""
        data, kwargs, kind = self.heatmap().to_layers()[0]
        kwargs.update(contrast_limits=(0.0, 1.0), colormap="magma", opacity=0.55)
        return data, kwargs, kind

    def run(
        self, near: tuple[float, float] | None = None, params: EngineParams | None = None
    ) -> Generator[tuple[int, int], bool | None, TileHeatmap]:
        """Score every tile (nearest ``near`` first); yields ``(done, total)``."""
        import torch

        from histoscope.engine import iter_tiles

        target, values, index = self.target, self.values, self.grid.index

        net = (
            self.model
            if self.normalizer is None
            else StainNormalized(self.model, self.spec, self.normalizer)
        )

        class _Prob(torch.nn.Module):
            def __init__(self, net) -> None:
                super().__init__()
                self.net = net

            def forward(self, x):
                return torch.softmax(self.net(x).float(), dim=1)[:, target]

        def on_batch(idx: np.ndarray, probs) -> None:
            values[index[idx, 0], index[idx, 1]] = np.asarray(probs, np.float32)

        yield from iter_tiles(_Prob(net), self.slide, self.grid, self.spec, params,
                              near=near, on_batch=on_batch)  # fmt: skip
        return self.heatmap()


def fit_slide_stains(slide, tissue: TissueMask, mpp: float = 4.0):
    """Macenko normaliser fitted on a low-resolution read of the slide's tissue."""
    from histoscope.stains import MacenkoNormalizer

    h0, w0 = slide.shape
    f = mpp / slide.mpp
    rgb = slide.read_region(0, 0, max(1, int(w0 / f)), max(1, int(h0 / f)), mpp=mpp)
    from PIL import Image

    mask = np.asarray(
        Image.fromarray(tissue.mask).resize(rgb.shape[1::-1], Image.Resampling.NEAREST)
    )
    pixels = rgb[mask] if mask.any() else rgb.reshape(-1, 3)
    try:
        return MacenkoNormalizer.fit(pixels[None])
    except ValueError as exc:
        raise ValueError(f"{slide.path}: stain normalisation failed: {exc}") from exc


def StainNormalized(model, spec, normalizer):  # noqa: N802 - a module factory
    """Wrap ``model`` so normalised input tiles are stain-normalised first (on any device)."""
    import torch

    class _Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1))
            self.register_buffer("od", torch.from_numpy(normalizer.od_matrix))

        def forward(self, x):
            rgb = (x * self.std + self.mean).clamp(1 / 255, 1.0)
            od = -torch.log10(rgb)
            rgb = torch.pow(10.0, -torch.einsum("bchw,cd->bdhw", od, self.od)).clamp(0, 1)
            return self.model((rgb - self.mean) / self.std)

    return _Wrapped()


def tile_gradcam(slide, model, spec, x_um: float, y_um: float, grid=None, target: int = 1):
    """Grad-CAM of the tile under the world point ``(x_um, y_um)``.

    Returns ``(cam, (x0, y0))``: the ``(T, T)`` map and the tile's level-0
    top-left corner (on ``grid`` when given, else centred on the point).
    """
    import torch

    from histoscope.models.gradcam import grad_cam

    t = spec.tile_size
    f = spec.mpp / slide.mpp
    px, py = x_um / slide.mpp, y_um / slide.mpp
    if grid is not None:
        s = grid.stride
        x0, y0 = int(np.floor(px / s) * s), int(np.floor(py / s) * s)
    else:
        x0, y0 = int(px - t * f / 2), int(py - t * f / 2)
    rgb = slide.read_region(x0, y0, t, t, mpp=spec.mpp)
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    x = (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    return grad_cam(model, x, target).numpy(), (x0, y0)
