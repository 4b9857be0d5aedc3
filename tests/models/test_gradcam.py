"""Grad-CAM peaks where a toy model looks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from histoscope.models.gradcam import grad_cam, last_conv_block


class ColourDetector(nn.Module):
    """Class 0 = "there is red" (mean red response), class 1 = "there is blue"."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU())
        with torch.no_grad():
            self.features[0].weight.copy_(
                torch.tensor([[1.0, -1, -1], [-1, -1, 1]])[..., None, None]
            )
            self.features[0].bias.zero_()

    def forward(self, x):
        return self.features(x).mean(dim=(2, 3))


def two_patches() -> torch.Tensor:
    x = torch.full((1, 3, 32, 32), 0.5)
    x[0, :, 2:10, 2:10] = torch.tensor([1.0, 0, 0])[:, None, None]  # red, top left
    x[0, :, 20:30, 20:30] = torch.tensor([0.0, 0, 1.0])[:, None, None]  # blue, bottom right
    return x


def test_cam_peaks_where_the_evidence_for_the_class_is():
    model = ColourDetector()
    red, blue = grad_cam(model, two_patches(), 0), grad_cam(model, two_patches(), 1)
    assert red.shape == (32, 32) and float(red.max()) == pytest.approx(1.0)
    assert red[2:10, 2:10].min() > 0.9 and red[20:30, 20:30].max() < 0.1
    assert blue[20:30, 20:30].min() > 0.9 and blue[2:10, 2:10].max() < 0.1


def test_cam_finds_the_last_block_of_registry_models():
    from histoscope.models import TileClassifier

    model = TileClassifier("test_cnn", num_classes=2).eval()
    x = torch.rand(1, 3, 64, 64)
    layer = last_conv_block(model, x)
    assert layer is model.backbone.features
    cam = grad_cam(model, x, target=0)
    assert cam.shape == (64, 64) and torch.isfinite(cam).all()
    assert not model.training


def test_bad_target_and_batch_are_refused():
    model = ColourDetector()
    with pytest.raises(ValueError, match="not a class"):
        grad_cam(model, torch.rand(1, 3, 8, 8), target=5)
    with pytest.raises(ValueError, match="one tile"):
        grad_cam(model, torch.rand(2, 3, 8, 8), target=0)
