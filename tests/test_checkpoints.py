"""Checkpoints: round trip, card contents, and every way a file can be wrong."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import histoscope as hs
from histoscope.checkpoints import (
    CARD_KEY,
    ModelCard,
    convert_torch_checkpoint,
    read_card,
    register_family,
    tensor_hash,
)
from histoscope.models import TileClassifier, create_backbone

CONFIG = {"backbone": "test_cnn", "num_classes": 3, "dropout": 0.0, "backbone_kwargs": {}}


def _card(**kw) -> dict:
    base = {
        "family": "tile_classifier",
        "config": CONFIG,
        "classes": ["stroma", "tumour", "necrosis"],
        "input_spec": {"tile_size": 32, "mpp": 2.0},
        "recipe": {"epochs": 1},
        "data": {"source": "synthetic"},
        "metrics": {"accuracy": 0.5},
    }
    return base | kw


@pytest.fixture
def saved(tmp_path) -> tuple[Path, TileClassifier]:
    torch.manual_seed(0)
    model = TileClassifier.from_config(CONFIG)
    with torch.no_grad():  # non-trivial running stats, so BN buffers matter
        model.train()(torch.randn(4, 3, 32, 32))
    model.eval()
    return hs.save_checkpoint(tmp_path / "tc.safetensors", model, _card()), model


def test_round_trip_gives_identical_outputs_and_full_card(saved):
    path, model = saved
    loaded, card = hs.load_checkpoint(path, family="tile_classifier")
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))
    assert card.classes == ("stroma", "tumour", "necrosis")
    assert card.config == CONFIG
    assert card.metrics == {"accuracy": 0.5}
    assert card.software["histoscope"] == hs.__version__
    assert card.software["torch"] == torch.__version__
    assert card.sha256 == tensor_hash(model.state_dict())
    assert read_card(path) == card
    assert not list(path.parent.glob(".*.part*"))  # no temporary file left


def test_directory_with_one_checkpoint_loads(saved):
    path, _ = saved
    _, card = hs.load_checkpoint(path.parent)
    assert card.family == "tile_classifier"


def test_backbone_family_round_trip(tmp_path):
    bb = create_backbone("test_vit")
    card = {"family": "backbone", "config": {"name": "test_vit", **bb.config}}
    path = hs.save_checkpoint(tmp_path / "bb", bb.module, card)
    assert path.name == "bb.safetensors"
    loaded, _ = hs.load_checkpoint(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(bb.module(x), loaded(x))


@dataclass(frozen=True)
class Bad:
    id: str
    match: str


def _other_family(path: Path, tmp: Path) -> Path:
    register_family("test_linear", lambda cfg: torch.nn.Linear(cfg["i"], cfg["o"]))
    return hs.save_checkpoint(
        tmp / "lin", torch.nn.Linear(2, 3), {"family": "test_linear", "config": {"i": 2, "o": 3}}
    )


def _rewrite(path: Path, tmp: Path, tensors=None, card_text=None) -> Path:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    state = tensors(state) if tensors else state
    if card_text is not None:
        meta[CARD_KEY] = card_text
    out = tmp / "bad.safetensors"
    save_file(state, str(out), metadata=meta)
    return out


def _missing(path, tmp):
    return _rewrite(path, tmp, tensors=lambda s: {k: v for k, v in s.items() if k != "head.bias"})


def _shape(path, tmp):
    return _rewrite(path, tmp, tensors=lambda s: s | {"head.weight": torch.zeros(2, 16)})


def _modified(path, tmp):
    return _rewrite(path, tmp, tensors=lambda s: s | {"head.bias": s["head.bias"] + 1})


def _truncated(path, tmp):
    data = path.read_bytes()
    out = tmp / "cut.safetensors"
    out.write_bytes(data[: len(data) - 100])
    return out


def _pickle_zip(path, tmp):
    out = tmp / "model.pt"
    torch.save(TileClassifier.from_config(CONFIG).state_dict(), out)
    return out


def _pickle_legacy(path, tmp):
    out = tmp / "model.ckpt"
    torch.save({"w": torch.zeros(2)}, out, _use_new_zipfile_serialization=False)
    return out


def _bad_json(path, tmp):
    return _rewrite(path, tmp, card_text='{"family": "tile_classifier", "config": ')


def _bad_card_keys(path, tmp):
    return _rewrite(path, tmp, card_text=json.dumps({"family": "tile_classifier", "cfg": {}}))


def _bad_header(path, tmp):
    out = tmp / "junk.safetensors"
    out.write_bytes(struct.pack("<Q", 5) + b"{oops")
    return out


def _no_card(path, tmp):
    out = tmp / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(out))
    return out


def _absent(path, tmp):
    return tmp / "nowhere.safetensors"


CASES = [
    (Bad("other-family", "family 'test_linear', expected 'tile_classifier'"), _other_family),
    (Bad("missing-tensor", "missing tensor 'head.bias'"), _missing),
    (Bad("wrong-shape", r"'head.weight' has shape \(2, 16\), the model expects \(3, 16\)"), _shape),
    (Bad("hash-mismatch", "sha256"), _modified),
    (Bad("truncated", "truncated"), _truncated),
    (Bad("pickle-zip", "torch pickle"), _pickle_zip),
    (Bad("pickle-legacy", "torch pickle"), _pickle_legacy),
    (Bad("malformed-card", "malformed card JSON"), _bad_json),
    (Bad("card-wrong-keys", "malformed card JSON"), _bad_card_keys),
    (Bad("bad-header", "header is not valid JSON"), _bad_header),
    (Bad("no-card", "without a HistoScope card"), _no_card),
    (Bad("missing-file", "does not exist"), _absent),
]


@pytest.mark.parametrize(("case", "make"), CASES, ids=[c.id for c, _ in CASES])
def test_bad_checkpoint_raises_checkpoint_error_naming_file(saved, tmp_path, case, make):
    path, _ = saved
    bad = make(path, tmp_path)
    with pytest.raises(hs.CheckpointError, match=case.match) as info:
        hs.load_checkpoint(bad, family="tile_classifier")
    assert str(bad) in str(info.value)


def test_pickle_converts_with_weights_only(saved, tmp_path):
    _, model = saved
    src = tmp_path / "legacy.pth"
    torch.save(model.state_dict(), src)
    out = convert_torch_checkpoint(src, tmp_path / "conv", _card())
    loaded, _ = hs.load_checkpoint(out)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))


def test_unknown_family_is_refused_on_save(tmp_path):
    with pytest.raises(ValueError, match="unknown family"):
        hs.save_checkpoint(tmp_path / "x", torch.nn.Linear(1, 1), {"family": "nope", "config": {}})


def test_card_dict_round_trip():
    card = ModelCard.from_dict(_card())
    assert ModelCard.from_dict(json.loads(json.dumps(card.to_dict()))) == card


def test_import_histoscope_does_not_import_torch():
    code = (
        "import sys, histoscope\n"
        "assert 'torch' not in sys.modules, 'eager torch'\n"
        "assert callable(histoscope.load_checkpoint)\n"
        "assert 'histoscope.checkpoints' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
