"""How often the outside-training-data flag fires (issue 11), per default checkpoint.

Run from the repository root::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ood.py --n-tile 20 --n-nuclass 8 \\
        --n-expression 4 --json benchmarks/_data/ood.json

For each kind of reference (tile features: the tumour, CLAM and HistGen cards;
NuClass cell features; expression patch features) the script generates fresh
synthetic H&E slides with seeds never used to fit or calibrate any reference
(60000 + i, at the size and µm/px of that kind's recipe), computes the slide's
features by the same code path the task uses
(:data:`histoscope.training.ood_reference.EXTRACTORS`) and reports the share
flagged as outside, by each card holding a reference of that kind. The same
slides restained out of the generator's stain range (H and E turned by 12°,
amounts times or over 1.45-1.7, as the tumour recipe's stain-shift
evaluation) give the stain-shifted rate; scikit-image's real images
(immunohistochemistry: real tissue but DAB, not H&E; astronaut, coffee,
chelsea: not tissue) give a score each. Nothing here tunes a threshold.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "_data" / "ood"
SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"

#: kind -> (cards whose reference compares these features, slide size, µm/px)
KINDS = {
    "tile": (("tumour_patch", "clam", "histgen"), (2048, 2048), 1.0),
    "nuclass": (("nuclass",), (1536, 1536), 0.5),
    "expression": (("expression",), (2048, 2048), 1.0),
}
#: scikit-image images, and the µm/px each is declared at per kind of feature
REAL = ("immunohistochemistry", "astronaut", "coffee", "chelsea")
REAL_MPP = {"tile": 1.0, "nuclass": 0.5, "expression": 1.0}
FIRST_SEED = 60000


def _fresh(kind: str, i: int) -> tuple[Path, Path]:
    """A held-out slide of ``kind`` and its stain-shifted copy (PNG with the same µm/px)."""
    from PIL import Image

    from histoscope.slide import open_slide
    from histoscope.synthetic import generate
    from histoscope.training._stain_aug import stain_shift

    _, size, mpp = KINDS[kind]
    seed = FIRST_SEED + i
    out = DATA / kind
    path = out / f"he_{seed:05d}.tif"
    if not path.is_file():
        generate(out, "he", size, seed, mpp, workers=1)
    shifted = out / f"he_{seed:05d}_shifted.png"
    if not shifted.is_file():
        label = json.loads((out / f"he_{seed:05d}.label.json").read_text())
        stains = label.get("params", {}).get("stains")
        with open_slide(path) as s:
            rgb = s.read_region(0, 0, size[1], size[0], mpp=mpp)
        rng = np.random.default_rng([0, i, 0x57A1])
        img = stain_shift(rgb[None], None if stains is None else np.asarray(stains), rng)[0]
        Image.fromarray(img).save(shifted)
    return path, shifted


def _real(name: str) -> Path:
    from PIL import Image
    from skimage import data

    path = DATA / "real" / f"{name}.png"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(getattr(data, name)()[..., :3]).save(path)
    return path


def _features(kind: str, path: Path, mpp: float | None) -> np.ndarray | str:
    """The slide's features, or why there are none."""
    from histoscope.ood import OutsideTrainingDataWarning
    from histoscope.slide import open_slide
    from histoscope.training.ood_reference import EXTRACTORS

    slide = open_slide(path, mpp=mpp) if mpp is not None else open_slide(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OutsideTrainingDataWarning)
            x = EXTRACTORS[kind](slide)
    except ValueError as exc:  # no tissue tiles, no cells
        return f"not scored: {exc}"
    return x if len(x) else "not scored: no items"


def main(argv=None) -> int:
    from histoscope.checkpoints import read_card
    from histoscope.ood import assess, reference_from_card

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-tile", type=int, default=20)
    ap.add_argument("--n-nuclass", type=int, default=8)
    ap.add_argument("--n-expression", type=int, default=4)
    ap.add_argument("--kinds", default="tile,nuclass,expression")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    doc: dict = {"command": " ".join(sys.argv), "machine": platform.processor() or
                 platform.machine(), "first_seed": FIRST_SEED, "kinds": {}}  # fmt: skip
    for kind in a.kinds.split(","):
        cards, size, mpp = KINDS[kind]
        refs = {c: reference_from_card(read_card(SAMPLE / f"{c}_default.safetensors"))
                for c in cards}  # fmt: skip
        refs = {c: r for c, r in refs.items() if r is not None}
        if not refs:
            print(f"{kind}: no card holds a reference; skipped", file=sys.stderr)
            continue
        n = getattr(a, f"n_{kind}")
        rows: dict[str, dict] = {c: {"heldout": [], "shifted": [], "real": {}} for c in refs}
        t0 = time.perf_counter()
        for i in range(n):
            path, shifted = _fresh(kind, i)
            for split, p, m in (("heldout", path, None), ("shifted", shifted, mpp)):
                x = _features(kind, p, m)
                for c, ref in refs.items():
                    r = assess(ref, x) if not isinstance(x, str) else None
                    rows[c][split].append(None if r is None else
                                          {"score": r.score, "outside": r.outside})  # fmt: skip
            print(f"{kind} {i + 1}/{n} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        for name in REAL:
            x = _features(kind, _real(name), REAL_MPP[kind])
            for c, ref in refs.items():
                rows[c]["real"][name] = (x if isinstance(x, str) else
                                         assess(ref, x).to_dict())  # fmt: skip
        out = {}
        for c, ref in refs.items():
            r = rows[c]
            res = {"threshold": ref.threshold, "features": ref.features}
            for split in ("heldout", "shifted"):
                got = [v for v in r[split] if v is not None]
                res[split] = {"n": len(got), "flagged": int(sum(v["outside"] for v in got)),
                              "rate": float(np.mean([v["outside"] for v in got])) if got else None,
                              "median_score": float(np.median([v["score"] for v in got]))
                              if got else None}  # fmt: skip
            res["real"] = r["real"]
            out[c] = res
            line = (f"{c}: threshold {ref.threshold:.3f}; held-out {res['heldout']['flagged']}/"
                    f"{res['heldout']['n']}; stain-shifted {res['shifted']['flagged']}/"
                    f"{res['shifted']['n']}; real: ")  # fmt: skip
            line += ", ".join(f"{k} " + (f"{v['score']:.2f}{' OUT' if v['outside'] else ''}"
                                         if isinstance(v, dict) else "n/a")
                              for k, v in r["real"].items())  # fmt: skip
            print(line)
        doc["kinds"][kind] = {"slide_size": list(size), "mpp": mpp, "n": n,
                              "seconds": round(time.perf_counter() - t0, 1), "cards": out}  # fmt: skip
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
