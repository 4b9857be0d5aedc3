"""Gene expression per 2 µm bin from H&E, with multi-scale context (SYSTEMS.md section 3).

The model sees one patch of ``patch_bins x patch_bins`` bins and, around the
same centre, one crop per coarser scale. Views (all ``view_px`` square crops
centred on the patch centre):

- the 2 µm view: the patch and a margin of ``margin_um`` around it at
  ``image_mpp`` µm/px; a small CNN (stride 2 at 1 µm/px) gives a feature map
  with one vector per 2 µm bin, cropped to the patch (so no bin sees padding);
- a context view per scale ``s`` in ``scales_um[1:]`` (8, 32, 128 µm): a crop
  of ``view_px`` px at ``s / 8`` µm/px (so ``8 s`` µm across) through a
  stride-8 CNN: ``(view_px / 8)^2`` tokens, each summarising ``s`` µm.

Each scale is queried by the 2 µm map through its own cross-attention
(``heads`` heads); queries and keys carry a Fourier encoding of their
position in µm, so a bin attends to what lies around it physically. The
scale outputs are mixed by per-bin softmax weights, added to the 2 µm map
(residual) and layer-normalised, keeping the spatial shape; a convolutional
decoder then gives, for every bin and gene, a raw mean (``mu``, softplus
applied by the loss) and a zero-inflation logit (``pi``); ``log_theta`` is a
per-gene dispersion. With ``scales_um = [2]`` the same network runs without
context (the 2 µm-only baseline).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["ExpressionModel", "views"]

DEFAULT_SCALES = (2, 8, 32, 128)


def views(config: Mapping[str, Any]) -> list[dict[str, float]]:
    """The crops the model reads, in input order: ``{"size_px", "mpp", "field_um"}`` each.

    The first is the 2 µm view (the patch), then one per context scale.
    """
    field = config["patch_bins"] * config["bin_um"] + 2 * config["margin_um"]
    size = int(round(field / config["image_mpp"]))
    out = [{"size_px": size, "mpp": float(config["image_mpp"]), "field_um": float(field)}]
    for s in config["scales_um"][1:]:
        n = int(config["view_px"])
        out.append({"size_px": n, "mpp": float(s) / 8, "field_um": float(s) / 8 * n})
    return out


def _conv(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class _Fourier(nn.Module):
    """Positions in µm -> ``dim`` features (sines and cosines at fixed wavelengths)."""

    def __init__(self, dim: int, longest_um: float = 2048.0, shortest_um: float = 4.0) -> None:
        super().__init__()
        n = 16
        wl = torch.logspace(math.log10(shortest_um), math.log10(longest_um), n)
        self.register_buffer("freq", 2 * math.pi / wl, persistent=False)
        self.proj = nn.Linear(4 * n, dim)

    def forward(self, yx: torch.Tensor) -> torch.Tensor:  # (N, 2) -> (N, dim)
        a = yx[:, :, None] * self.freq  # (N, 2, n)
        return self.proj(torch.cat([a.sin(), a.cos()], 1).flatten(1))


class _CrossAttention(nn.Module):
    """Multi-head cross-attention written out (CPU's fused kernel is slow at 8-dim heads)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        b, n, d = q.shape
        h = self.heads
        qh = (self.q(q) / math.sqrt(d // h)).view(b, n, h, d // h).transpose(1, 2)  # (B, h, N, .)
        k, v = self.kv(kv).view(b, kv.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        att = torch.softmax(qh @ k.transpose(-1, -2), dim=-1)
        return self.out((att @ v).transpose(1, 2).reshape(b, n, d))


def _grid_um(n: int, step_um: float) -> torch.Tensor:
    """``(n * n, 2)`` (y, x) centres in µm of an ``n x n`` grid centred on 0."""
    c = (torch.arange(n, dtype=torch.float32) - (n - 1) / 2) * step_um
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([yy.flatten(), xx.flatten()], 1)


class ExpressionModel(nn.Module):
    """Multi-scale H&E -> counts per 2 µm bin and gene.

    Parameters
    ----------
    genes
        Gene names, in output order.
    scales_um
        ``[2, ...context scales]``; ``[2]`` alone is the 2 µm-only model.
    patch_bins
        Bins per patch edge.
    bin_um
        Bin edge in µm (2).
    image_mpp
        µm/px of the 2 µm view (1.0: two pixels per bin).
    margin_um
        Context read around the patch for the 2 µm map (a whole number of bins).
    view_px
        Edge of each context crop in pixels.
    dim
        Feature width (divisible by ``heads``).
    heads
        Attention heads per scale.
    widths
        Channels of the CNN stages before ``dim``.
    loss
        The loss it is trained with; decides how outputs become expected
        counts (:meth:`expected`).
    """

    def __init__(
        self,
        genes: Sequence[str],
        scales_um: Sequence[int] = DEFAULT_SCALES,
        patch_bins: int = 16,
        bin_um: float = 2.0,
        image_mpp: float = 1.0,
        margin_um: float = 8.0,
        view_px: int = 32,
        dim: int = 64,
        heads: int = 8,
        widths: Sequence[int] = (16, 32),
        loss: str = "zinb",
    ) -> None:
        super().__init__()
        scales = [int(s) for s in scales_um]
        if (
            not scales
            or scales[0] != 2
            or sorted(scales) != scales
            or len(set(scales)) != len(scales)
        ):
            raise ValueError(f"scales_um must start at 2 and increase, got {list(scales_um)}")
        from histoscope.expression.losses import LOSSES

        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, not {loss!r}")
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        if abs(bin_um / image_mpp - 2) > 1e-9:
            raise ValueError(f"the 2 µm view must have two pixels per bin, got bin_um={bin_um}, "
                             f"image_mpp={image_mpp}")  # fmt: skip
        if margin_um < 0 or (margin_um / bin_um) % 1:
            raise ValueError(f"margin_um must be a whole number of bins, got {margin_um}")
        self._margin = int(margin_um / bin_um)
        if view_px % 8:
            raise ValueError(f"view_px must be a multiple of 8, got {view_px}")
        self.config: dict[str, Any] = {
            "genes": list(genes), "scales_um": scales, "patch_bins": int(patch_bins),
            "bin_um": float(bin_um), "image_mpp": float(image_mpp),
            "margin_um": float(margin_um), "view_px": int(view_px),
            "dim": int(dim), "heads": int(heads), "widths": [int(w) for w in widths],
            "loss": str(loss),
        }  # fmt: skip
        w1, w2 = (int(w) for w in widths)
        n_genes = len(genes)
        # 2 µm map: stride 2 at 1 µm/px -> one vector per bin; receptive field ~ 21 µm
        self.local = nn.Sequential(_conv(3, w1), _conv(w1, w2, 2), _conv(w2, dim),
                                   _conv(dim, dim, dilation=2))  # fmt: skip
        self.context = nn.ModuleList(
            nn.Sequential(_conv(3, w1, 2), _conv(w1, w2, 2), _conv(w2, dim, 2), _conv(dim, dim))
            for _ in scales[1:]
        )
        self.attn = nn.ModuleList(_CrossAttention(dim, heads) for _ in scales[1:])
        self.q_norm = nn.LayerNorm(dim)
        self.kv_norm = nn.ModuleList(nn.LayerNorm(dim) for _ in scales[1:])
        self.pos = _Fourier(dim)
        self.mix = nn.Linear(dim, len(scales) - 1) if len(scales) > 1 else None
        self.norm = nn.LayerNorm(dim)
        self.decoder = nn.Sequential(_conv(dim, dim), nn.Conv2d(dim, 2 * n_genes, 1))
        self.log_theta = nn.Parameter(torch.zeros(n_genes))
        self.register_buffer("q_pos", _grid_um(patch_bins, bin_um), persistent=False)
        tok = view_px // 8
        for k, s in enumerate(scales[1:]):
            self.register_buffer(f"k_pos{k}", _grid_um(tok, float(s)), persistent=False)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ExpressionModel:
        """Build from a card's ``config``."""
        cfg = dict(config)
        return cls(cfg.pop("genes"), **cfg)

    @property
    def genes(self) -> list[str]:
        """Gene names in output order."""
        return list(self.config["genes"])

    def views(self) -> list[dict[str, float]]:
        """See :func:`views`."""
        return views(self.config)

    def expected(self, out: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Expected counts ``(B, G, P, P)``: ``(1 - pi) mu`` for ZINB, else ``mu``."""
        from histoscope.expression.losses import expected_counts

        return expected_counts(dict(out), self.config["loss"])

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Predict one patch per item.

        Parameters
        ----------
        x
            Normalised images, one ``(B, 3, S, S)`` per view of :meth:`views`
            (a tensor alone for the 2 µm-only model).

        Returns
        -------
        dict
            ``mu`` and ``pi``: ``(B, G, patch_bins, patch_bins)`` raw means and
            zero-inflation logits; ``log_theta``: ``(G,)``.
        """
        xs = [x] if isinstance(x, torch.Tensor) else list(x)
        if len(xs) != len(self.config["scales_um"]):
            raise ValueError(f"expected {len(self.config['scales_um'])} views, got {len(xs)}")
        m = self._margin
        f = self.local(xs[0])  # (B, D, P + 2m, P + 2m): the patch and its margin
        f = f[:, :, m : f.shape[2] - m, m : f.shape[3] - m] if m else f
        b, d, h, w = f.shape
        q = f.flatten(2).transpose(1, 2)  # (B, P*P, D)
        if self.mix is not None:
            qn = self.q_norm(q) + self.pos(self.q_pos)[None]
            outs = []
            for k, (enc, attn) in enumerate(zip(self.context, self.attn, strict=True)):
                t = enc(xs[k + 1]).flatten(2).transpose(1, 2)  # (B, T, D)
                kv = self.kv_norm[k](t) + self.pos(getattr(self, f"k_pos{k}"))[None]
                outs.append(attn(qn, kv))
            weights = torch.softmax(self.mix(q), dim=-1)  # (B, N, K) per-bin scale mixing
            q = q + (torch.stack(outs, -1) * weights[:, :, None, :]).sum(-1)
        fused = self.norm(q).transpose(1, 2).reshape(b, d, h, w)
        out = self.decoder(fused)
        g = len(self.config["genes"])
        return {"mu": out[:, :g], "pi": out[:, g:], "log_theta": self.log_theta}
