"""Plain-torch RoIAlign: torchvision's numbers without loading Triton into the process."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

from histoscope.models._roi import roi_align


def test_bin_means_of_a_linear_map_are_the_bin_centres():
    h, w = 16, 20
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32),
                            torch.arange(w, dtype=torch.float32), indexing="ij")  # fmt: skip
    fmap = torch.stack([xx, yy])[None]  # channel 0 = x, channel 1 = y (index coordinates)
    rois = torch.tensor([[0.0, 16.0, 8.0, 40.0, 32.0]])  # x1, y1, x2, y2 in input px, stride 4
    out = roi_align(fmap, rois, output_size=2, spatial_scale=0.25)
    # box in map px: [3.5, 9.5] x [1.5, 7.5] after the half-pixel shift; bins 3 px wide
    torch.testing.assert_close(out[0, 0], torch.tensor([[5.0, 8.0], [5.0, 8.0]]))
    torch.testing.assert_close(out[0, 1], torch.tensor([[3.0, 3.0], [6.0, 6.0]]))


def test_far_outside_is_zero_and_gradients_reach_the_map():
    fmap = torch.ones(2, 3, 8, 8, requires_grad=True)
    rois = torch.tensor([[1.0, 200.0, 200.0, 240.0, 240.0], [0.0, 0.0, 0.0, 16.0, 16.0]])
    out = roi_align(fmap, rois, output_size=3, spatial_scale=0.5)
    assert out.shape == (2, 3, 3, 3)
    assert out[0].abs().max() == 0 and torch.allclose(out[1], torch.ones(3, 3, 3))
    out.sum().backward()
    assert fmap.grad[0].abs().sum() > 0 and fmap.grad[1].abs().sum() == 0


def test_equals_torchvision_in_a_separate_process():
    script = textwrap.dedent("""
        import torch
        from torchvision.ops import roi_align as tv
        from histoscope.models._roi import roi_align
        torch.manual_seed(0)
        f = torch.randn(3, 8, 20, 27)
        k = 64
        c = torch.rand(k, 2) * torch.tensor([128.0, 100.0]) - 10
        box = torch.rand(k, 1) * 60 + 4
        rois = torch.cat([torch.randint(0, 3, (k, 1)).float(), c - box / 2, c + box / 2], 1)
        worst = max((tv(f, rois, output_size=g, spatial_scale=0.25, sampling_ratio=2,
                        aligned=True) - roi_align(f, rois, g, 0.25, 2)).abs().max().item()
                    for g in (1, 2, 3))
        print(worst)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert float(run.stdout.strip().splitlines()[-1]) < 1e-4
