"""Backbone registry: names, shapes, input specs and local weights."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import FrozenInstanceError

import pytest
import torch
from safetensors.torch import save_file

from histoscope.errors import CheckpointError
from histoscope.models import InputSpec, create_backbone, list_backbones, register_backbone

TINY = ["test_cnn", "test_resnet", "test_vit"]


@pytest.mark.parametrize("name", [*TINY, "hs_cnn_small"])
def test_registered_backbone_gives_pooled_features(name):
    torch.manual_seed(0)
    bb = create_backbone(name)
    size = bb.input_spec.tile_size
    with torch.inference_mode():
        out = bb.module(torch.randn(2, 3, size, size))
    assert out.shape == (2, bb.feature_dim)
    assert torch.isfinite(out).all()
    assert not bb.module.training


def test_registry_lists_tiny_variants_and_default():
    names = list_backbones()
    assert set(TINY) <= set(names)
    assert "hs_cnn_small" in names
    assert list_backbones("test_*") == sorted(n for n in names if n.startswith("test_"))


def test_timm_architecture_by_name_without_download():
    bb = create_backbone("resnet18")
    assert bb.feature_dim == 512
    assert bb.input_spec.tile_size == 224
    assert bb.input_spec.mean == pytest.approx((0.485, 0.456, 0.406))


def test_timm_tag_selects_its_pretrained_config():
    bb = create_backbone("test_vit.r160_in1k")
    assert bb.input_spec.tile_size == 160
    assert bb.input_spec.mean == (0.5, 0.5, 0.5)


def test_tile_size_and_mpp_override_reach_spec_and_vit():
    bb = create_backbone("test_vit", tile_size=48, mpp=1.0)
    assert bb.input_spec == InputSpec(48, 1.0, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    with torch.inference_mode():
        assert bb.module(torch.zeros(1, 3, 48, 48)).shape == (1, bb.feature_dim)


def test_input_spec_is_frozen_and_round_trips():
    spec = InputSpec(224, 0.5)
    with pytest.raises(FrozenInstanceError):
        spec.tile_size = 1  # type: ignore[misc]
    assert InputSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="mpp"):
        InputSpec(224, 0.0)


def test_unknown_name_and_hub_id_offline_are_refused():
    with pytest.raises(ValueError, match="unknown backbone 'no_such_net'"):
        create_backbone("no_such_net")
    with pytest.raises(ValueError, match="online=True"):
        create_backbone("hf-hub:MahmoodLab/UNI")


def test_open_clip_name_without_open_clip_says_what_to_install(monkeypatch):
    from histoscope.models.text import create_text_encoder

    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if not installed
    with pytest.raises(ImportError, match="open_clip_torch"):
        create_backbone("open_clip:ViT-B-32")
    with pytest.raises(ImportError, match="open_clip_torch"):
        create_text_encoder("open_clip:ViT-B-32", 16)


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is None, reason="needs open_clip")
def test_open_clip_image_tower_with_clip_normalisation():
    bb = create_backbone("open_clip:ViT-S-32-alt", tile_size=64, mpp=1.0)
    assert bb.input_spec.tile_size == 64 and bb.input_spec.mean[0] == pytest.approx(
        0.4815, abs=1e-3
    )
    with torch.inference_mode():
        out = bb.module(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, bb.feature_dim)


def test_duplicate_registration_is_refused():
    def test_cnn():  # same name as the built-in
        raise AssertionError

    with pytest.raises(ValueError, match="already registered"):
        register_backbone(test_cnn)


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_local_weights_give_identical_outputs(tmp_path, fmt):
    torch.manual_seed(1)
    src = create_backbone("test_resnet")
    # as a fine-tuning run would save it: wrapped names plus a classifier head
    sd = {f"module.{k}": v.clone() for k, v in src.module.state_dict().items()}
    sd["module.fc.weight"] = torch.zeros(5, src.feature_dim)
    path = tmp_path / f"w.{fmt}"
    if fmt == "safetensors":
        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd}, path)
    torch.manual_seed(2)
    dst = create_backbone("test_resnet", weights=path)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(src.module.eval()(x), dst.module(x))


def test_weights_with_wrong_shape_or_missing_tensor_are_named(tmp_path):
    sd = create_backbone("test_cnn").module.state_dict()
    bad = dict(sd)
    bad["features.0.weight"] = torch.zeros(4, 3, 3, 3)
    save_file(bad, str(tmp_path / "shape.safetensors"))
    with pytest.raises(CheckpointError, match=r"shape.safetensors.*features\.0\.weight"):
        create_backbone("test_cnn", weights=tmp_path / "shape.safetensors")
    partial = {k: v for k, v in sd.items() if k != "features.1.bias"}
    save_file(partial, str(tmp_path / "m.safetensors"))
    with pytest.raises(CheckpointError, match="missing"):
        create_backbone("test_cnn", weights=tmp_path / "m.safetensors")


class _Payload:
    def __reduce__(self):
        return (print, ("executed",))


def test_pickled_code_in_weights_file_is_not_executed(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"x": _Payload()}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pth"):
        create_backbone("test_cnn", weights=path)
    assert "executed" not in capsys.readouterr().out


def test_weights_directory_and_missing_path(tmp_path):
    src = create_backbone("test_cnn")
    save_file(src.module.state_dict(), str(tmp_path / "model.safetensors"))
    create_backbone("test_cnn", weights=tmp_path)  # finds model.safetensors
    with pytest.raises(CheckpointError, match="does not exist"):
        create_backbone("test_cnn", weights=tmp_path / "nope.safetensors")


def test_cnn_avgmax_pool_adds_the_maximum_beside_the_mean():
    torch.manual_seed(0)
    avg = create_backbone("test_cnn")
    both = create_backbone("test_cnn", pool="avgmax")
    assert both.feature_dim == 2 * avg.feature_dim
    assert both.config["pool"] == "avgmax" and "pool" not in avg.config
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fmap = both.module.forward_features(x)
        out = both.module(x)
    c = avg.feature_dim
    torch.testing.assert_close(out[:, :c], fmap.mean(dim=(2, 3)))
    torch.testing.assert_close(out[:, c:], fmap.amax(dim=(2, 3)))
    with pytest.raises(ValueError, match="pool"):
        create_backbone("test_cnn", pool="median")


def test_whole_clip_file_gives_the_image_towers_tensors(tmp_path):
    from histoscope.models.backbones import read_state_dict

    clip = {
        "transformer.resblocks.0.attn.in_proj_weight": torch.zeros(6, 2),  # text tower first
        "visual.transformer.resblocks.0.attn.in_proj_weight": torch.ones(12, 4),
        "visual.conv1.weight": torch.ones(4, 3, 2, 2),
        "token_embedding.weight": torch.zeros(10, 2),
    }
    save_file(clip, tmp_path / "clip.safetensors")
    sd = read_state_dict(tmp_path / "clip.safetensors")
    assert sd["transformer.resblocks.0.attn.in_proj_weight"].shape == (12, 4)
    assert sd["conv1.weight"].shape == (4, 3, 2, 2) and "token_embedding.weight" in sd
    # a torch file keeps its order: the text tower's tensor comes after the image tower's
    torch.save(dict(reversed(list(clip.items()))), tmp_path / "clip.pt")
    sd = read_state_dict(tmp_path / "clip.pt")
    assert sd["transformer.resblocks.0.attn.in_proj_weight"].shape == (12, 4)
