"""Small checks on the iSight model (SYSTEMS.md section 1)."""

from __future__ import annotations

import pytest
import torch

from histoscope.models.isight import TASKS, ISight, encode_metadata

TISSUES = ("breast", "colon", "liver")


def make(pooling: str = "tile", **kw) -> ISight:
    torch.manual_seed(0)
    return ISight(
        "test_cnn", TISSUES, dim=32, hidden=16, pooling=pooling, n_cell_types=4, **kw
    ).eval()


def tiles(b: int = 2, n: int = 5, size: int = 32) -> torch.Tensor:
    return torch.randn(b, n, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("pooling", ["tile", "token"])
def test_head_shapes_and_attention_sums_to_one(pooling):
    model = make(pooling)
    x = tiles()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = model(x, mask, encode_metadata(["breast HER2", None]))
    sizes = {"intensity": 4, "location": 4, "quantity": 4, "tissue": 3, "malignancy": 2}
    assert {t: out[t].shape for t in TASKS} == {t: (2, n) for t, n in sizes.items()}
    att = out["attention"]
    torch.testing.assert_close(att.sum(dim=1), torch.ones(2))
    assert torch.all(att[0, 3:] == 0)  # padding tiles get no attention


@pytest.mark.parametrize("pooling", ["tile", "token"])
def test_tile_order_does_not_change_the_call(pooling):
    model = make(pooling)
    x = tiles(1, 6)
    perm = torch.tensor([4, 2, 0, 5, 1, 3])
    a, b = model(x), model(x[:, perm])
    for t in TASKS:
        torch.testing.assert_close(a[t], b[t], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a["attention"][:, perm], b["attention"], atol=1e-6, rtol=1e-5)


def test_metadata_and_cell_type_stay_per_sample():
    model = make()
    x = tiles(2, 4)
    meta = encode_metadata(["colon adenocarcinoma CDX2", "liver hepatocyte albumin"])
    cell = torch.tensor([1, 3])
    together = model(x, meta_tokens=meta, cell_type=cell)
    for i in range(2):
        alone = model(x[i : i + 1], meta_tokens=meta[i : i + 1], cell_type=cell[i : i + 1])
        for t in TASKS:
            torch.testing.assert_close(together[t][i : i + 1], alone[t], atol=1e-5, rtol=1e-4)
    # and the metadata does change the output (the encoder is wired in)
    swapped = model(x, meta_tokens=meta.flip(0), cell_type=cell)
    assert not torch.allclose(together["tissue"], swapped["tissue"])


def test_metadata_encoding_is_stable_and_padded():
    enc = encode_metadata(["Breast, HER2", "breast her2", None], buckets=100, max_tokens=8)
    assert torch.equal(enc[0], enc[1])
    assert enc[2].sum() == 0 and enc.max() < 100


def test_bad_configuration_is_named():
    with pytest.raises(ValueError, match="pooling"):
        ISight("test_cnn", TISSUES, pooling="max")
    with pytest.raises(ValueError, match="tissue_classes"):
        ISight("test_cnn", ())
    with pytest.raises(ValueError, match="input_space"):
        ISight("test_cnn", TISSUES, input_space="hsv")
    with pytest.raises(ValueError, match="token"):
        ISight("test_cnn", TISSUES, pooling="token", backbone_kwargs={"pool": "avgmax"})


def test_optical_density_input_is_what_the_backbone_sees():
    model = make(input_space="od", backbone_kwargs={"pool": "avgmax"})
    assert model.config["input_space"] == "od"
    assert model.config["backbone_kwargs"]["pool"] == "avgmax"
    spec = model.input_spec
    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)
    rgb = torch.rand(1, 3, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 0.9 + 0.05
    rgb[0, 0] = 1.0  # a tile of white glass
    x = (rgb - mean) / std
    with torch.no_grad():
        got = model.encode_tiles(x)
        od = -torch.log10(rgb[0])
        want = model.proj(model.backbone(od))
    torch.testing.assert_close(got[0], want, atol=1e-5, rtol=1e-4)
    assert torch.count_nonzero(od[0]) == 0  # white is no stain
    # and rebuilt from its config, with the weights, it computes the same
    twin = ISight.from_config(model.config).eval()
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(twin.encode_tiles(x), got)
    assert "input_space" not in ISight("test_cnn", TISSUES).config  # RGB, as older cards


def _temps(text: float, image: float) -> dict:
    return {"text": dict.fromkeys(TASKS, text), "image": dict.fromkeys(TASKS, image)}


def test_each_sample_is_divided_by_the_temperature_of_its_case():
    model = make()
    x = tiles(3, 4)
    meta = encode_metadata(["breast HER2", None, "colon CDX2"])
    raw = model(x, meta_tokens=meta)  # one buffer (all ones) for both cases
    model.set_temperatures({"text": dict.fromkeys(TASKS, 2.0), "image": dict.fromkeys(TASKS, 0.5)})
    got = model(x, meta_tokens=meta)
    for t in TASKS:
        torch.testing.assert_close(got[t][[0, 2]], raw[t][[0, 2]] / 2.0)  # with text
        torch.testing.assert_close(got[t][1], raw[t][1] / 0.5)  # the image alone
    alone = model(x)  # no tokens at all: every sample is on the image alone
    torch.testing.assert_close(alone["intensity"][1], got["intensity"][1])
    # the temperatures travel in the config (not the tensors) and come back with it
    twin = ISight.from_config(model.config).eval()
    twin.load_state_dict(model.state_dict())
    torch.testing.assert_close(twin(x, meta_tokens=meta)["quantity"], got["quantity"])
    assert set(model.state_dict()) == set(make().state_dict())


def test_without_per_case_temperatures_the_buffer_serves_both_cases():
    model = make()
    model.temperature.fill_(4.0)
    x, meta = tiles(2, 3), encode_metadata(["breast", None])
    out = model(x, meta_tokens=meta)
    model.temperature.fill_(1.0)
    raw = model(x, meta_tokens=meta)
    torch.testing.assert_close(out["location"], raw["location"] / 4.0)
    assert "temperatures" not in model.config


@pytest.mark.parametrize(
    "bad, match",
    [({"text": dict.fromkeys(TASKS, 1.0)}, "image"),
     ({"text": dict.fromkeys(TASKS, 1.0), "image": {"intensity": 1.0}}, "lacks head"),
     (_temps(1.0, 0.0), "positive"), (_temps(float("nan"), 1.0), "positive")],
    ids=["no-image-case", "missing-head", "zero", "nan"],
)  # fmt: skip
def test_bad_temperatures_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        make().set_temperatures(bad)
