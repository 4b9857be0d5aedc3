"""RoIAlign in plain torch, equal to ``torchvision.ops.roi_align(..., aligned=True)``.

torchvision's operator imports ``torch._dynamo`` and with it Triton, whose
bundled LLVM crashes a process that has already loaded Mesa's (napari's
canvas under software OpenGL). This version samples with
:func:`torch.nn.functional.grid_sample` ("border" padding, then torchvision's
zero beyond one pixel outside), so it runs in any process and thread, and
its gradient flows to the feature map (Grad-CAM needs it).
"""

from __future__ import annotations

import torch


def roi_align(
    fmap: torch.Tensor,
    rois: torch.Tensor,
    output_size: int,
    spatial_scale: float,
    sampling_ratio: int = 2,
) -> torch.Tensor:
    """Average of bilinear samples in ``output_size x output_size`` bins of each box.

    Parameters
    ----------
    fmap
        ``(B, C, H, W)`` feature map.
    rois
        ``(K, 5)``: batch index, ``x1, y1, x2, y2`` in input pixels.
    output_size
        Bins per side.
    spatial_scale
        Feature-map pixels per input pixel.
    sampling_ratio
        Samples per bin per side.

    Returns
    -------
    torch.Tensor
        ``(K, C, output_size, output_size)``.
    """
    b, c, h, w = fmap.shape
    k = rois.shape[0]
    g, s = int(output_size), int(sampling_ratio)
    if k == 0:
        return fmap.new_zeros((0, c, g, g))
    idx = rois[:, 0].long()
    x1, y1 = rois[:, 1] * spatial_scale - 0.5, rois[:, 2] * spatial_scale - 0.5
    x2, y2 = rois[:, 3] * spatial_scale - 0.5, rois[:, 4] * spatial_scale - 0.5
    steps = torch.arange(g * s, device=fmap.device, dtype=fmap.dtype)
    t = torch.div(steps, s, rounding_mode="floor") + (steps % s + 0.5) / s  # in bins
    xs = x1[:, None] + t[None] * ((x2 - x1) / g)[:, None]  # (K, G*s)
    ys = y1[:, None] + t[None] * ((y2 - y1) / g)[:, None]
    # torchvision samples at index coordinates, clamps to the border within one pixel
    # outside and gives 0 further out: grid_sample's "border" padding times that mask
    valid = ((xs >= -1.0) & (xs <= w))[:, None, :] & ((ys >= -1.0) & (ys <= h))[:, :, None]
    gx = (xs + 0.5) / w * 2.0 - 1.0  # align_corners=False: pixel i spans [i - .5, i + .5]
    gy = (ys + 0.5) / h * 2.0 - 1.0
    n = g * s
    mask = None if bool(valid.all()) else valid.to(fmap.dtype)
    parts, order = [], []
    for i in [0] if b == 1 else torch.unique(idx).tolist():
        sel = None if b == 1 else torch.nonzero(idx == i).flatten()
        kk = k if sel is None else len(sel)
        sx, sy = (gx, gy) if sel is None else (gx[sel], gy[sel])
        grid = torch.stack(
            [sx[:, None, :].expand(kk, n, n), sy[:, :, None].expand(kk, n, n)], dim=-1
        ).reshape(1, kk * n, n, 2)
        sampled = torch.nn.functional.grid_sample(
            fmap[i : i + 1].contiguous(memory_format=torch.channels_last),
            grid,
            mode="bilinear",
            padding_mode="border",
            align_corners=False,
        )  # (1, C, kk * n, n)
        if mask is not None:
            sampled = sampled * (mask if sel is None else mask[sel]).reshape(1, 1, kk * n, n)
        pooled = torch.nn.functional.avg_pool2d(sampled, s)  # the mean of each bin's samples
        parts.append(pooled.reshape(c, kk, g, g))
        order.append(sel)
    if b == 1:
        return parts[0].permute(1, 0, 2, 3).contiguous()
    out = fmap.new_zeros((k, c, g, g))
    for sel, part in zip(order, parts, strict=True):
        out[sel] = part.permute(1, 0, 2, 3)
    return out
