"""Recompute a default checkpoint's training-data reference (``card.data["ood"]``).

The slides are regenerated with :mod:`histoscope.synthetic` from the seeds the
recipe (and the card's split lists) name; the features are computed by the
same code path the task uses on a user's slide, so a slide is compared with
the training slides feature for feature. Training slides fit the reference,
held-out training-like slides (the recipe's validation/test slides, topped up
with fresh seeds of the same generator settings) calibrate its threshold.

Run::

    python -m histoscope.training.ood_reference tumour_patch --n-train 14 --n-calib 20

which rewrites ``sample_data/tumour_patch_default.safetensors``'s card in place
(only ``data["ood"]``; the tensors and every other card key stay).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histoscope.ood import FeatureReference, OutsideTrainingDataWarning, fit_reference

SAMPLE_DATA = Path(__file__).resolve().parents[3] / "sample_data"

#: What each default's reference compares (stored in the reference as ``features``).
FEATURES = {
    "tile": "128-d tile features of the tumour patch classifier's backbone (hs_cnn_small, "
    "128 px tiles at 1 µm/px, tissue >= 0.5), the input of the classifier head, of CLAM and "
    "of HistGen",
    "nuclass": "NuClass local-trunk RoI features at each detected nucleus (the input of the "
    "local path's first learned layer after the trunk, local_norm)",
    "expression": "expression model's 2 µm local encoder output averaged over each 32 µm patch "
    "(with its margin)",
}


@dataclass(frozen=True)
class SlideSpec:
    """One synthetic H&E slide to regenerate."""

    seed: int
    size: tuple[int, int]
    mpp: float

    @property
    def name(self) -> str:
        return f"he_{self.seed:05d}"


@dataclass(frozen=True)
class Plan:
    """Which slides fit and which calibrate one default's reference."""

    default: str
    kind: str
    train: tuple[SlideSpec, ...]
    calib: tuple[SlideSpec, ...]


def _seeds(names: Sequence[str]) -> list[int]:
    return [int(re.sub(r"\D", "", n)) for n in names]


def plan(default: str, *, n_train: int | None = None, n_calib: int = 20) -> Plan:
    """The training and calibration slides of ``default`` (as named by its card).

    Parameters
    ----------
    default
        ``tumour_patch``, ``clam``, ``histgen``, ``nuclass`` or ``expression``.
    n_train
        Use at most this many training slides (evenly spaced over the list).
    n_calib
        Calibration slides: the recipe's held-out ones, topped up with fresh
        seeds after the recipe's range, or thinned to this many.
    """
    from histoscope.checkpoints import read_card

    card = read_card(SAMPLE_DATA / f"{default}_default.safetensors")
    data, rdata = card.data or {}, (card.recipe or {}).get("data", {})
    if default == "tumour_patch":
        g, kind = rdata["generate"], "tile"
        train, held = _seeds(data["train_slides"]), _seeds(data["val_slides"])
        held += [s for s in range(g["seed"], g["seed"] + g["count"])
                 if s not in train and s not in held]  # fmt: skip
        first, size, mpp = g["seed"] + g["count"], tuple(g["size"]), float(g["mpp"])
    elif default in ("clam", "histgen"):
        g, kind = rdata["generate"], "tile"
        sl = data["slides"]
        train = _seeds(sl["train"])
        held = _seeds(sl.get("val", [])) + _seeds(sl.get("test", []))
        start = g.get("seed", g.get("first_seed"))
        first, size, mpp = start + g["count"], tuple(g["size"]), float(g["mpp"])
    elif default == "nuclass":
        s, kind = rdata["synthetic"], "nuclass"
        train, held = list(s["train_seeds"]), list(s["val_seeds"])
        first, size, mpp = max(held) + 1, (s["size"], s["size"]), float(s["mpp"])
    elif default == "expression":
        g, kind = rdata["generate"], "expression"
        train = _seeds(data["train_slides"])
        held = _seeds(data["val_slides"]) + _seeds(data["test_slides"])
        first, size, mpp = g["seed"] + g["count"], tuple(g["size"]), float(g["mpp"])
    else:
        raise ValueError(f"no reference plan for {default!r}; known: tumour_patch, clam, "
                         "histgen, nuclass, expression")  # fmt: skip
    if n_train is not None and n_train < len(train):
        train = [train[i] for i in np.linspace(0, len(train) - 1, n_train).round().astype(int)]
    if len(held) >= n_calib:
        held = [held[i] for i in np.linspace(0, len(held) - 1, n_calib).round().astype(int)]
    else:
        held = held + list(range(first, first + n_calib - len(held)))
    return Plan(default, kind, tuple(SlideSpec(s, size, mpp) for s in train),
                tuple(SlideSpec(s, size, mpp) for s in held))  # fmt: skip


# ------------------------------------------------------------------ features
def tile_features(slide, checkpoint: str | Path | None = None) -> np.ndarray:
    """Tile features of the tumour classifier's backbone, as the tumour/MIL/report tasks see them."""
    from histoscope.features import patch_classifier_features
    from histoscope.progress import drive
    from histoscope.session import open_session

    fm = patch_classifier_features(checkpoint or SAMPLE_DATA / "tumour_patch_default.safetensors")
    with open_session(slide, in_memory=True) as session:
        grid = session.grid(fm.spec.mpp, fm.spec.tile_size, 0.5)
        if len(grid) == 0:
            return np.zeros((0, 128), np.float32)
        return drive(session.iter_features(fm, grid)).features


def _tapped_task(task: str, family: str, default: str, module: Callable, kind: str):
    def run(slide, checkpoint: str | Path | None = None) -> np.ndarray:
        import histoscope as hs
        from histoscope.ood import FeatureTap
        from histoscope.session import open_session

        path = Path(checkpoint or SAMPLE_DATA / default)
        with open_session(slide, in_memory=True) as session:
            model, _ = session.model(path, family)
            with FeatureTap(module(model), kind) as tap, warnings.catch_warnings():
                warnings.simplefilter("ignore", OutsideTrainingDataWarning)
                hs.tasks.run(task, session, checkpoint=path)
        x = tap.features()
        return x if x is not None else np.zeros((0, 1), np.float32)

    return run


#: The checkpoint whose weights make each kind of feature.
ENCODERS = {"tile": "tumour_patch_default.safetensors", "nuclass": "nuclass_default.safetensors",
            "expression": "expression_default.safetensors"}  # fmt: skip

#: slide -> (n_items, d) features, per reference kind.
EXTRACTORS: dict[str, Callable[..., np.ndarray]] = {
    "tile": tile_features,
    "nuclass": _tapped_task(
        "cells", "nuclass", "nuclass_default.safetensors", lambda m: m.local_norm, "input"
    ),  # fmt: skip
    "expression": _tapped_task(
        "expression", "expression", "expression_default.safetensors", lambda m: m.local, "output"
    ),  # fmt: skip
}


def slide_features(kind: str, spec: SlideSpec, work: Path) -> np.ndarray:
    """Regenerate ``spec`` under ``work`` (once) and return its features of ``kind``.

    The features are kept beside the slide (``<slide>.<kind>.npy``) and reused,
    so a refit at another rank or level does not encode the slides again.
    """
    from histoscope.synthetic import generate

    path = work / f"{spec.name}_{spec.size[0]}x{spec.size[1]}_{spec.mpp:g}.tif"
    from histoscope.checkpoints import read_card

    sha = read_card(SAMPLE_DATA / ENCODERS[kind]).sha256[:12]  # new weights: new features
    cache = path.with_suffix(f".{kind}_{sha}.npy")
    if cache.is_file():
        return np.load(cache)
    if not path.is_file():
        generate(work, "he", spec.size, spec.seed, spec.mpp, name=path.stem, workers=1)
    x = np.asarray(EXTRACTORS[kind](path), np.float32)
    np.save(cache, x)
    return x


def compute(p: Plan, work: Path, *, rank: int = 16, level: float = 0.99,
            log: Callable[[str], None] = print) -> FeatureReference:  # fmt: skip
    """Features of every slide of plan ``p``, fitted into a reference."""
    work.mkdir(parents=True, exist_ok=True)
    feats: dict[str, list[np.ndarray]] = {"train": [], "calib": []}
    for split, specs in (("train", p.train), ("calib", p.calib)):
        for i, spec in enumerate(specs):
            t = time.perf_counter()
            x = slide_features(p.kind, spec, work)
            feats[split].append(x)
            log(f"{p.default} {split} {i + 1}/{len(specs)} {spec.name}: {len(x)} items "
                f"({time.perf_counter() - t:.1f} s)")  # fmt: skip
    size = p.train[0].size
    desc = (f"{FEATURES[p.kind]}; fitted on {len(p.train)} training slides, calibrated on "
            f"{len(p.calib)} held-out synthetic slides ({size[0]} x {size[1]} px at "
            f"{p.train[0].mpp:g} µm/px; histoscope.training.ood_reference)")  # fmt: skip
    return fit_reference(feats["train"], feats["calib"], rank=rank, level=level, features=desc)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m histoscope.training.ood_reference DEFAULT [...]``."""
    from histoscope.ood import write_reference

    ap = argparse.ArgumentParser(prog="python -m histoscope.training.ood_reference",
                                 description=__doc__.split("\n\n")[0])  # fmt: skip
    ap.add_argument("default", choices=("tumour_patch", "clam", "histgen", "nuclass",
                                        "expression"))  # fmt: skip
    ap.add_argument("--n-train", type=int, default=None, help="training slides (default: all)")
    ap.add_argument("--n-calib", type=int, default=20, help="calibration slides")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--level", type=float, default=0.99)
    ap.add_argument("--work", type=Path, default=Path("out/ood_slides"))
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="card to write (default: sample_data/<default>_default.safetensors)")  # fmt: skip
    ap.add_argument("--dry-run", action="store_true", help="fit and print, do not write")
    ap.add_argument("--json", type=Path, default=None, help="also write the reference here")
    a = ap.parse_args(argv)
    p = plan(a.default, n_train=a.n_train, n_calib=a.n_calib)
    ref = compute(p, a.work / p.kind, rank=a.rank, level=a.level)
    print(f"threshold {ref.threshold:.4f}; calibration scores "
          f"{np.round(ref.calib_scores, 4).tolist()}")  # fmt: skip
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(ref.to_dict()) + "\n")
    if not a.dry_run:
        out = write_reference(a.checkpoint or SAMPLE_DATA / f"{a.default}_default.safetensors",
                              ref)  # fmt: skip
        print(f"wrote data['ood'] of {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
