"""The recipe runner and the shared epoch loop: recipes, overrides, determinism, resume."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from histoscope.cli import main
from histoscope.training import RecipeError, apply_overrides, evaluate, load_recipe, resolve_recipe
from histoscope.training import run as run_recipe
from histoscope.training._loop import STATE_FILE, TrainSettings, fit, lr_at


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one torch thread avoids OpenMP waits on a busy shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


BASE = {"family": "tile_classifier", "data": {"path": "x"}, "model": {}, "train": {}, "out": "o"}


# ------------------------------------------------------------------- recipes
def test_yaml_recipe_with_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "family: tile_classifier\ndata: {path: d}\nmodel: {}\ntrain: {lr: 0.1}\nout: o\n"
    )
    doc = resolve_recipe(path, ["train.epochs=3", "train.lr=1e-3", "model.backbone_kwargs.widths=[8, 16]",
                                "name=run one"])  # fmt: skip
    assert doc["train"] == {"lr": 1e-3, "epochs": 3}
    assert doc["model"]["backbone_kwargs"]["widths"] == [8, 16]
    assert doc["name"] == "run one"


def test_load_recipe_copies_the_mapping():
    doc = load_recipe(BASE)
    doc["train"]["epochs"] = 9
    assert BASE["train"] == {}


@dataclass(frozen=True)
class Bad:
    id: str
    change: dict
    overrides: tuple[str, ...]
    message: str


BAD = [
    Bad("missing-section", {"train": None}, (), "missing required key(s): train"),
    Bad("unknown-top-level", {"optimizer": "sgd"}, (), "unknown recipe key(s) optimizer"),
    Bad("unknown-train-key", {}, ("train.epochz=3",), "train.epochz"),
    Bad("bad-family-name", {"family": "tile-classifier"}, (), "'family' must be a module name"),
    Bad("override-no-equals", {}, ("train.epochs",), "must look like key.sub=value"),
    Bad("override-through-value", {}, ("out.sub=1",), "'out' is a value, not a section"),
    Bad("section-not-mapping", {"model": "resnet"}, (), "section 'model' must be a mapping"),
]


@pytest.mark.parametrize("case", BAD, ids=[c.id for c in BAD])
def test_bad_recipes_name_the_key(case):
    doc = {**BASE, **case.change}
    doc = {k: v for k, v in doc.items() if v is not None}
    with pytest.raises(RecipeError, match=case.message.replace("(", r"\(").replace(")", r"\)")):
        resolve_recipe(doc, case.overrides)


def test_missing_recipe_file_and_unknown_family(tmp_path):
    with pytest.raises(RecipeError, match="nope.yaml does not exist"):
        resolve_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="no training code for family 'nosuch'.*tile_classifier"):
        run_recipe({**BASE, "family": "nosuch", "out": str(tmp_path / "o")})


def test_bad_train_values_name_the_key():
    with pytest.raises(RecipeError, match="train.optimiser"):
        TrainSettings.from_recipe({"optimiser": "adamx"})
    with pytest.raises(RecipeError, match="train.epochs"):
        TrainSettings.from_recipe({"epochs": 0})
    with pytest.raises(RecipeError, match="train.lr"):
        TrainSettings.from_recipe({"lr": -1})


def test_cli_reports_recipe_errors(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("family: nosuch\ndata: {}\nmodel: {}\ntrain: {}\nout: o\n")
    assert main(["train", str(path)]) == 2
    assert "no training code for family 'nosuch'" in capsys.readouterr().err
    assert main(["train", str(path), "-o", "train.epochz=1"]) == 2
    assert "train.epochz" in capsys.readouterr().err


def test_evaluate_refuses_a_family_without_training_code(tmp_path, capsys):
    from histoscope.checkpoints import save_checkpoint
    from histoscope.models import create_backbone

    bb = create_backbone("test_cnn")
    ckpt = save_checkpoint(tmp_path / "bb", bb.module, {"family": "backbone", "config": {
        "name": "test_cnn", **bb.config}})  # fmt: skip
    with pytest.raises(RecipeError, match="family 'backbone'"):
        evaluate(ckpt, tmp_path, tmp_path / "ev")
    rc = main(["evaluate", str(ckpt), "--data", str(tmp_path), "--out", str(tmp_path / "ev")])
    assert rc == 2 and "family 'backbone'" in capsys.readouterr().err


# ---------------------------------------------------------------- the loop
X = torch.linspace(-1, 1, 48).view(-1, 1).repeat(1, 4) * torch.tensor([1.0, -2.0, 0.5, 3.0])
Y = (X.sum(1) > 0).long()


def _model() -> nn.Module:
    torch.manual_seed(123)
    return nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.ReLU(), nn.Linear(8, 2))


def _batches(epoch: int, gen: torch.Generator):
    order = torch.randperm(len(X), generator=gen)
    for i in range(0, len(X), 8):
        j = order[i : i + 8]
        yield X[j] + 0.05 * torch.randn(len(j), 4, generator=gen), Y[j]


def _loss(m: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(m(x), y)


def _fit(out: Path, epochs=4, **kw):
    model = _model()
    settings = TrainSettings(**{"epochs": epochs, "lr": 0.05, "seed": 7, **kw.pop("settings", {})})
    res = fit(model, _batches, _loss, settings, out, steps_per_epoch=6, **kw)
    return model, res


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def test_fit_is_deterministic_logs_and_saves_state(tmp_path):
    a, ra = _fit(tmp_path / "a")
    b, _ = _fit(tmp_path / "b")
    assert _same(a, b)
    lines = (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in lines]
    assert [r["epoch"] for r in recs] == [1, 2, 3, 4] == [r["epoch"] for r in ra.history]
    assert recs[-1]["train_loss"] < recs[0]["train_loss"]
    assert [r["lr"] for r in recs] == pytest.approx([lr_at(e, TrainSettings(epochs=4, lr=0.05))
                                                    for e in range(4)])  # fmt: skip
    state = torch.load(tmp_path / "a" / STATE_FILE, weights_only=True)
    assert state["epoch"] == 4
    c, _ = _fit(tmp_path / "c", settings={"seed": 8})
    assert not _same(a, c)


class Stop(Exception):
    pass


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    full, _ = _fit(tmp_path / "full")

    def crash(step: int, total: int) -> None:
        if step == 15:  # in the third epoch
            raise Stop

    with pytest.raises(Stop):
        _fit(tmp_path / "cut", progress=crash)
    assert torch.load(tmp_path / "cut" / STATE_FILE, weights_only=True)["epoch"] == 2
    resumed, res = _fit(tmp_path / "cut")
    assert res.resumed_from == 2
    assert _same(full, resumed)
    log = [json.loads(x) for x in (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]
    fresh, res = _fit(tmp_path / "cut", resume=False)
    assert res.resumed_from == 0 and _same(full, fresh)


def test_resume_refuses_another_recipe(tmp_path):
    _fit(tmp_path, epochs=1, fingerprint="aaa")
    with pytest.raises(RecipeError, match="different recipe"):
        _fit(tmp_path, epochs=2, fingerprint="bbb")


def test_monitor_keeps_the_best_epoch(tmp_path):
    scores = iter([0.5, 0.9, 0.7, 0.6, 0.1])
    seen = {}

    def validate(m: nn.Module) -> dict:
        v = next(scores)
        seen[v] = {k: t.clone() for k, t in m.state_dict().items()}
        return {"val_score": v}

    model, res = _fit(tmp_path, validate=validate, settings={"monitor": "val_score"})
    assert res.best_epoch == 2 and res.best_value == 0.9
    assert all(torch.equal(model.state_dict()[k], seen[0.9][k]) for k in seen[0.9])
    with pytest.raises(RecipeError, match="'val_nope' is not a logged metric"):
        _fit(tmp_path / "b", validate=validate, settings={"monitor": "val_nope"})


def test_apply_overrides_parses_yaml_values():
    doc = apply_overrides({}, ["a.b=true", "a.c=null", "d=0.5", "e=[1, 2]", "f=text"])
    assert doc == {"a": {"b": True, "c": None}, "d": 0.5, "e": [1, 2], "f": "text"}
