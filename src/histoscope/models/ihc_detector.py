"""A small learned nucleus-centre detector for IHC (haematoxylin + DAB) images.

:class:`IHCCentreNet` is a four-level U-Net of about 110k parameters on the RGB
optical density (``-log10(rgb / 255)``) at 0.5 µm/px. It predicts, at half
resolution (upsampled to the input's), two maps: a centre heatmap (a Gaussian
of σ = 2 µm at every nucleus centre, peak 1) and a nucleus-foreground
probability. Nuclei are the heatmap's local maxima above a threshold, grown by
watershed on the heatmap inside the foreground (:func:`nuclei_from_maps`), so
each detection has an outline and an area like the classical detectors'.

Trained on synthetic IHC slides only (``histoscope.training.ihc_detector``);
the shipped weights are ``sample_data/ihc_detector_default.safetensors``,
whose card says on what, with which seeds, and how it did on held-out slides.
Loaded with :func:`histoscope.checkpoints.load_checkpoint` (no pickles).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

FAMILY = "ihc_detector"
DEFAULT_CHECKPOINT = "ihc_detector_default.safetensors"
#: µm/px the detector works at.
MPP = 0.5
#: Centre heatmap σ (µm) of the training targets.
SIGMA_UM = 2.0
#: The input must be a multiple of this (three 2x downsamplings: enc1 has stride 2 after the
#: stride-1 stem, then two max-pools).
MULTIPLE = 8
#: Side (px) of the windows whose bottleneck features the training-data check scores (32 µm).
WINDOW = 64
#: Summed RGB optical density above which a pixel is tissue (as ``dab_pixel_counts``).
TISSUE_OD = 0.3
#: Side (px) of the chunks a larger image is run in, and the context read around each
#: (multiples of :data:`WINDOW`): memory stays bounded whatever the image's size.
CHUNK = 1024
CHUNK_OVERLAP = 64


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class IHCCentreNet(nn.Module):
    """U-Net: ``(B, 3, H, W)`` optical density -> ``(B, 2, H, W)`` logits (centre, foreground).

    Parameters
    ----------
    widths
        Channels at 1/2, 1/4 and 1/8 of the input resolution.
    stem
        Channels of the one full-resolution convolution.
    """

    def __init__(self, widths: tuple[int, int, int] = (24, 32, 48), stem: int = 16) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.config = {"widths": [int(w) for w in widths], "stem": int(stem)}
        self.stem = nn.Sequential(nn.Conv2d(3, stem, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(stem), nn.ReLU(inplace=True))  # fmt: skip
        self.enc1 = _block(stem, w1, stride=2)
        self.enc2 = _block(w1, w2)
        self.enc3 = _block(w2, w3)
        self.dec2 = _block(w3 + w2, w2)
        self.dec1 = _block(w2 + w1, w1)
        self.head = nn.Conv2d(w1, 2, 1)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> IHCCentreNet:
        """Build from a card's ``config``."""
        return cls(widths=tuple(config.get("widths", (24, 32, 48))),
                   stem=int(config.get("stem", 16)))  # fmt: skip

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(B, 2, H, W)`` and the 1/8-resolution bottleneck features ``(B, C, H/8, W/8)``."""
        e1 = self.enc1(self.stem(x))
        e2 = self.enc2(F.max_pool2d(e1, 2))
        e3 = self.enc3(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([F.interpolate(e3, size=e2.shape[-2:], mode="nearest"), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, size=e1.shape[-2:], mode="nearest"), e1], 1))
        out = self.head(d1)
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False), e3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(x)[0]


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """``(3, H, W)`` float32 optical density of an ``(H, W, 3)`` uint8 image."""
    x = np.clip(np.asarray(rgb[..., :3], np.float32), 1.0, 255.0) / 255.0
    return np.ascontiguousarray(-np.log10(x).transpose(2, 0, 1))


@torch.no_grad()
def _maps(model: IHCCentreNet, rgb: np.ndarray):
    """Probabilities ``(2, H, W)``, window features ``(C, gh, gw)`` and tissue share ``(gh, gw)``."""
    od = optical_density(rgb)
    h, w = od.shape[1:]
    ph, pw = (-h) % MULTIPLE, (-w) % MULTIPLE
    x = torch.from_numpy(od)[None]
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
    logits, bottleneck = model.forward_with_features(x)
    prob = torch.sigmoid(logits)[0, :, :h, :w].numpy()
    k = WINDOW // MULTIPLE
    if min(bottleneck.shape[-2:]) < k:  # smaller than one window: nothing to compare
        return prob, np.zeros((bottleneck.shape[1], 0, 0)), np.zeros((0, 0))
    feats = F.avg_pool2d(bottleneck, k)[0].numpy()
    tissue = F.avg_pool2d((x.sum(1, keepdim=True) > TISSUE_OD).float(), WINDOW)[0, 0].numpy()
    gh, gw = tissue.shape
    return prob, feats[:, :gh, :gw], tissue


def predict_maps(
    model: IHCCentreNet, rgb: np.ndarray, chunk: int = CHUNK, overlap: int = CHUNK_OVERLAP
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre heatmap, foreground probability and the tissue windows' features.

    ``rgb`` is at :data:`MPP`; it is padded (by reflection) to a multiple of
    :data:`MULTIPLE` and the maps are cropped back. The maps are ``(H, W)``
    float32 in [0, 1]; the features ``(n, C)`` are the bottleneck averaged over
    :data:`WINDOW` px windows that are mostly tissue (what the training-data
    check, :mod:`histoscope.ood`, compares with the training slides').

    An image larger than ``chunk + 2 * overlap`` px is run in ``chunk`` px
    pieces, each with ``overlap`` px of context around it (both multiples of
    :data:`WINDOW`, so the windows are the same as in one pass), and the pieces'
    maps and windows put together: memory stays that of one piece. The result
    differs from one pass only within a few px of the pieces' seams.
    """
    if chunk % WINDOW or overlap % WINDOW or chunk <= 0 or overlap < 0:
        raise ValueError(f"chunk and overlap must be multiples of {WINDOW}, got {chunk}, {overlap}")
    h, w = np.asarray(rgb).shape[:2]
    if max(h, w) <= chunk + 2 * overlap:
        prob, feats, tissue = _maps(model, rgb)
    else:
        prob = np.zeros((2, h, w), np.float32)
        c = model.config["widths"][-1]
        hp, wp = h + (-h) % MULTIPLE, w + (-w) % MULTIPLE
        feats = np.zeros((c, hp // WINDOW, wp // WINDOW))
        tissue = np.zeros((hp // WINDOW, wp // WINDOW))
        for y0 in range(0, h, chunk):
            for x0 in range(0, w, chunk):
                ry, rx = max(y0 - overlap, 0), max(x0 - overlap, 0)
                y1, x1 = min(y0 + chunk, h), min(x0 + chunk, w)
                p, f, t = _maps(model, rgb[ry : min(y1 + overlap, h), rx : min(x1 + overlap, w)])
                prob[:, y0:y1, x0:x1] = p[:, y0 - ry : y1 - ry, x0 - rx : x1 - rx]
                gy, gx = (y0 - ry) // WINDOW, (x0 - rx) // WINDOW  # the core's first window
                ny = min(chunk // WINDOW, t.shape[0] - gy) if t.size else 0
                nx = min(chunk // WINDOW, t.shape[1] - gx) if t.size else 0
                if ny > 0 and nx > 0:
                    oy, ox = y0 // WINDOW, x0 // WINDOW
                    feats[:, oy : oy + ny, ox : ox + nx] = f[:, gy : gy + ny, gx : gx + nx]
                    tissue[oy : oy + ny, ox : ox + nx] = t[gy : gy + ny, gx : gx + nx]
    keep = tissue.ravel() >= 0.5
    flat = feats.reshape(feats.shape[0], -1).T
    return prob[0], prob[1], flat[keep].astype(np.float64)


def find_peaks(heat: np.ndarray, threshold: float, mpp: float = MPP) -> np.ndarray:
    """``(k, 2)`` (row, col) of the heatmap's local maxima (1.5 µm apart at least) above ``threshold``."""
    from skimage import feature

    dist = max(1, int(round(1.5 / mpp)))
    return feature.peak_local_max(heat, min_distance=dist, threshold_abs=threshold,
                                  exclude_border=False)  # fmt: skip


def nuclei_from_maps(
    heat: np.ndarray, fg: np.ndarray, peaks: np.ndarray, mpp: float = MPP,
    max_area_um2: float = 400.0,
) -> np.ndarray:  # fmt: skip
    """Label image of nuclei grown from ``peaks`` by watershed on the heatmap.

    Each nucleus is the part of the foreground (probability >= 0.5) that its
    peak floods first, plus a 2 µm disc around the peak (so a nucleus the
    foreground misses still has a body to measure, 12.6 µm², above the IHC
    10 µm² floor unless a neighbour takes part of it); none reaches beyond the
    radius of a disc of area ``max_area_um2``.
    """
    from scipy import ndimage as ndi
    from skimage import segmentation

    markers = np.zeros(heat.shape, np.int32)
    if not len(peaks):
        return markers
    markers[tuple(np.asarray(peaks).T)] = np.arange(1, len(peaks) + 1)
    near = ndi.distance_transform_edt(markers == 0)
    reach = np.sqrt(max_area_um2 / np.pi) / mpp
    mask = ((fg >= 0.5) | (near <= 2.0 / mpp)) & (near <= reach)
    return segmentation.watershed(-heat, markers, mask=mask).astype(np.int32)


def check_card(card, path: str = "") -> None:
    """Raise :class:`~histoscope.errors.CheckpointError` for a card the detector cannot use.

    It needs ``config.threshold`` (the peak threshold, in (0, 1): the heatmap is
    a probability) and ``input_spec.mpp`` (the µm/px the network was trained at,
    0.1-4).
    """
    from histoscope.errors import CheckpointError

    where = f"{path}: " if path else ""
    config, spec = card.config or {}, card.input_spec or {}
    thr = config.get("threshold")
    if not isinstance(thr, (int, float)) or isinstance(thr, bool) or not 0 < thr < 1:
        raise CheckpointError(f"{where}ihc_detector card needs config.threshold, the peak "
                              f"threshold between 0 and 1 (the heatmap is a probability); "
                              f"got {thr!r}")  # fmt: skip
    mpp = spec.get("mpp")
    if not isinstance(mpp, (int, float)) or isinstance(mpp, bool) or not 0.1 <= mpp <= 4:
        raise CheckpointError(f"{where}ihc_detector card needs input_spec.mpp, the µm/px the "
                              f"network works at (0.1-4); got {mpp!r}")  # fmt: skip


@functools.lru_cache(maxsize=4)
def load_detector(path: str | None = None) -> tuple[IHCCentreNet, Any]:
    """The detector and its card; the shipped default when ``path`` is None (cached).

    Raises
    ------
    CheckpointError
        When the file is missing, is not an ``ihc_detector`` checkpoint, or its
        card lacks a usable peak threshold or µm/px (:func:`check_card`).
    """
    from histoscope._data import sample_data_path
    from histoscope.checkpoints import load_checkpoint
    from histoscope.errors import CheckpointError

    if path is None:
        found = sample_data_path(DEFAULT_CHECKPOINT)
        if found is None:
            raise CheckpointError(f"{DEFAULT_CHECKPOINT} is not in sample_data/")
        path = str(found)
    model, card = load_checkpoint(path, FAMILY)
    check_card(card, str(path))
    return model, card
