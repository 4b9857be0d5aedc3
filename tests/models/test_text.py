"""Metadata text encoders: hashed words, and a CLIP text tower from open_clip."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import histoscope
from histoscope.checkpoints import ModelCard, save_checkpoint
from histoscope.errors import CheckpointError
from histoscope.models.isight import TASKS, ISight
from histoscope.models.text import HashedTextEncoder, create_text_encoder

pytest.importorskip("open_clip")  # in the test extra; the encoder says what to install

CLIP = "open_clip:ViT-S-32-alt"  # the smallest text tower whose tokenizer ships with open_clip
TISSUES = ("breast", "colon")
TEXTS = ["Tissue: breast. SNOMED: T-04000. Antibody: HER2.", "Tissue: colon. Antibody: CDX2."]


@pytest.fixture(scope="module")
def clip_model():
    torch.manual_seed(0)
    return ISight("test_cnn", TISSUES, dim=16, hidden=8, meta_encoder=CLIP).eval()


def test_hashed_encoder_keeps_the_state_dict_key_of_older_checkpoints():
    model = ISight("test_cnn", TISSUES, dim=16, hidden=8, meta_buckets=64)
    assert isinstance(model.meta, HashedTextEncoder)
    assert "meta.weight" in model.state_dict()
    assert "meta_encoder" not in model.config
    assert model.tokenize([None, ""]) is None
    assert model.tokenize(TEXTS).max() < 64
    with pytest.raises(ValueError, match="meta_encoder"):
        create_text_encoder("bert", 16)


def test_clip_text_tower_is_frozen_tokenised_and_per_sample(clip_model):
    model = clip_model
    assert model.config["meta_encoder"] == CLIP
    tokens = model.tokenize(TEXTS)
    assert tokens.shape == (2, 77) and tokens.dtype == torch.long
    frozen = [p.requires_grad for p in model.meta.clip.parameters()]
    assert frozen and not any(frozen)
    assert all(p.requires_grad for p in model.meta.proj.parameters())
    x = torch.randn(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        both = model(x, meta_tokens=tokens)
        alone = model(x[1:], meta_tokens=tokens[1:])
        swapped = model(x, meta_tokens=tokens.flip(0))
    for t in TASKS:
        torch.testing.assert_close(both[t][1:], alone[t], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(both["tissue"], swapped["tissue"])
    # a training step moves the projection, never the tower
    model.train()
    before = {k: v.clone() for k, v in model.meta.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out = model(x, meta_tokens=tokens)
    out["tissue"].sum().backward()
    opt.step()
    model.eval()
    after = model.meta.state_dict()
    assert torch.equal(before["clip.token_embedding.weight"], after["clip.token_embedding.weight"])
    assert not torch.equal(before["proj.weight"], after["proj.weight"])


def test_local_clip_weights_load_and_the_checkpoint_carries_them(clip_model, tmp_path):
    # an open_clip-style file: the whole CLIP, image tower included, under its own names
    source = {"visual.conv1.weight": torch.zeros(4, 3, 2, 2)}
    for k, v in clip_model.meta.clip.state_dict().items():
        source[k] = torch.randn_like(v) if v.is_floating_point() else v
    save_file({k: v.contiguous() for k, v in source.items()}, tmp_path / "clip.safetensors")
    torch.manual_seed(1)
    loaded = ISight("test_cnn", TISSUES, dim=16, hidden=8, meta_encoder=CLIP,
                    meta_weights=str(tmp_path / "clip.safetensors")).eval()  # fmt: skip
    emb = loaded.meta.clip.state_dict()["token_embedding.weight"]
    torch.testing.assert_close(emb, source["token_embedding.weight"])
    assert "meta_weights" not in loaded.config  # the checkpoint holds the tensors itself

    card = ModelCard(family="isight", config=loaded.config,
                     classes=tuple(f"{t}:{c}" for t, cs in loaded.classes.items() for c in cs),
                     input_spec=loaded.input_spec.to_dict())  # fmt: skip
    path = save_checkpoint(tmp_path / "isight_clip.safetensors", loaded, card)
    (tmp_path / "clip.safetensors").unlink()
    again, _ = histoscope.load_checkpoint(path)
    x = torch.randn(1, 2, 3, 32, 32)
    tokens = loaded.tokenize(TEXTS[:1])
    with torch.no_grad():
        for t in TASKS:
            torch.testing.assert_close(
                again(x, meta_tokens=tokens)[t], loaded(x, meta_tokens=tokens)[t]
            )

    bad = dict(source, **{"token_embedding.weight": torch.zeros(10, 3)})
    save_file({k: v.contiguous() for k, v in bad.items()}, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="token_embedding.weight"):
        ISight(
            "test_cnn", TISSUES, meta_encoder=CLIP, meta_weights=str(tmp_path / "bad.safetensors")
        )
    with pytest.raises(ValueError, match="meta_weights"):
        ISight("test_cnn", TISSUES, meta_weights=str(tmp_path / "bad.safetensors"))
