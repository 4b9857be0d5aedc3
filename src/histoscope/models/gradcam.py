"""Grad-CAM (Selvaraju et al. 2017) at a model's last convolutional block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def last_conv_block(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """The last module (in execution order) that outputs a 4-D feature map.

    Found with one dry run on ``x``, so it works for any registry backbone
    (ResNet ``layer4``, our CNN's last stage, a ConvNeXt stage...). Raises
    ``ValueError`` for models with no convolutional feature map (a ViT).
    """
    seen: list[nn.Module] = []
    hooks = []
    for m in model.modules():
        if m is model or len(list(m.children())) == 0 and not isinstance(m, nn.Conv2d):
            continue

        def hook(mod, _inp, out, _seen=seen):
            if isinstance(out, torch.Tensor) and out.ndim == 4:
                _seen.append(mod)

        hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in hooks:
            h.remove()
    if not seen:
        raise ValueError(f"{type(model).__name__} has no convolutional feature map for Grad-CAM")
    # the last block to finish that is not nested inside another 4-D block finishing later
    return seen[-1]


def grad_cam(
    model: nn.Module, x: torch.Tensor, target: int, layer: nn.Module | None = None
) -> torch.Tensor:
    """Class activation map for logit ``target`` of a single normalised tile.

    Parameters
    ----------
    model
        Returns logits ``(1, C)`` for ``x``.
    x
        ``(1, 3, H, W)`` input.
    target
        Class index whose evidence is mapped.
    layer
        Module whose output is weighted (default :func:`last_conv_block`).

    Returns
    -------
    torch.Tensor
        ``(H, W)`` map in ``[0, 1]`` (all zeros when nothing supports the class).
    """
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"grad_cam takes one tile (1, 3, H, W), got {tuple(x.shape)}")
    layer = layer or last_conv_block(model, x)
    acts: list[torch.Tensor] = []

    def keep(_m, _i, out):
        out.retain_grad()
        acts.append(out)

    handle = layer.register_forward_hook(keep)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            logits = model(x)
            if not 0 <= target < logits.shape[-1]:
                raise ValueError(
                    f"target {target} is not a class of a {logits.shape[-1]}-class model"
                )
            model.zero_grad(set_to_none=True)
            logits[0, target].backward()
    finally:
        handle.remove()
        model.train(was_training)
    a = acts[-1]
    weights = a.grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * a).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    peak = cam.max()
    return (cam / peak if peak > 0 else cam).detach()
