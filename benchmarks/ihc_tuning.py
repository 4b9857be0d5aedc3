"""IHC nucleus detection: the tuning runs behind ``detection="classical"`` (issue 16).

Measures candidate nucleus-detection rules on whole synthetic IHC slides with
``measure_region`` and scores them against the generator's cell table with
:func:`bench_ihc_recall.match` (one-to-one within 4 µm). Run from the repository
root, on tuning seeds only (80000+; the held-out 90000+ and 95000+ seeds are for
``bench_ihc_recall.py``)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ihc_tuning.py \\
        --rules blobs,cl_h,cl_sum,cl_sum_half --seeds 80003,80010,80072,80091,80103,80110
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ihc_tuning.py \\
        --rules cl_h_t10,cl_h_t20,cl_h_bg8,cl_h_split5,cl_h_lf2,union,adaptive \\
        --seeds 80148,80150,80176,80186,80193,80199

Slides are generated (or reused) in ``benchmarks/_data/ihc_recall/`` at ``--size`` px and
0.5 µm/px. Per slide and rule it prints recall of DAB-positive and negative cells,
precision and percent positive (measured and true), and what percent positive each
compartment would give; then the pooled figures per rule. The rules (``cl`` = the H&E
nucleus detector's segmentation, :func:`histoscope.nuclei._classical.segment`):

``blobs``        the ``blobs`` detection (multi-scale LoG on haematoxylin)
``cl_h``         classical on haematoxylin, the detector's default settings
``cl_sum``       classical on haematoxylin + DAB OD
``cl_sum_half``  classical on haematoxylin + 0.5 DAB OD
``cl_h_t10``     classical on haematoxylin at threshold 0.10 OD (the shipped default)
``cl_h_t20``     ... threshold 0.20; ``cl_h_bg8`` an 8 µm top-hat; ``cl_h_split5`` a 0.5 µm
                 split depth; ``cl_h_lf2`` local fraction 0.2
``cl_sum_t10``   classical on haematoxylin + DAB at threshold 0.10
``union``        classical nuclei plus the blob nuclei that touch none of them
``adaptive``     ``cl_h_t10``, then ``cl_sum_t10`` when the first pass calls the stain nuclear
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import bench_ihc_recall as bench  # noqa: E402

MPP = 0.5


def classical(image: np.ndarray, params, **settings) -> np.ndarray:
    """The H&E detector's segmentation of ``image`` with ``settings``, IHC size limits applied."""
    from histoscope.nuclei._classical import segment
    from histoscope.nuclei._params import NucleiParams
    from histoscope.tasks import ihc_measure as M

    labels = segment(image.astype(np.float32), MPP, NucleiParams(**settings))
    return M._keep_sizes(labels, MPP, params)


def union(hema: np.ndarray, params) -> np.ndarray:
    """Classical nuclei plus the blob nuclei that touch none of them."""
    from skimage import segmentation

    from histoscope.tasks import ihc_measure as M

    a = classical(hema, params)
    b = M._blob_nuclei(hema, MPP, params)
    touch = np.zeros(int(b.max()) + 1, bool)
    touch[np.unique(b[(a > 0) & (b > 0)])] = True
    touch[0] = True
    add = ~touch[b]
    out = a.copy()
    out[add] = b[add] + int(a.max())
    return segmentation.relabel_sequential(out)[0]


def _rules() -> dict[str, Callable]:
    from histoscope.tasks import ihc_measure as M

    return {
        "blobs": lambda h, d, p: M._blob_nuclei(h, MPP, p),
        "cl_h": lambda h, d, p: classical(h, p),
        "cl_sum": lambda h, d, p: classical(h + d, p),
        "cl_sum_half": lambda h, d, p: classical(h + 0.5 * d, p),
        "cl_h_t10": lambda h, d, p: classical(h, p, threshold=0.10),
        "cl_h_t20": lambda h, d, p: classical(h, p, threshold=0.20),
        "cl_h_bg8": lambda h, d, p: classical(h, p, background_um=8.0),
        "cl_h_split5": lambda h, d, p: classical(h, p, split_um=0.5),
        "cl_h_lf2": lambda h, d, p: classical(h, p, local_fraction=0.2),
        "cl_sum_t10": lambda h, d, p: classical(h + d, p, threshold=0.10),
        "union": lambda h, d, p: union(h, p),
    }


RULE_NAMES = ("blobs", "cl_h", "cl_sum", "cl_sum_half", "cl_h_t10", "cl_h_t20", "cl_h_bg8",
              "cl_h_split5", "cl_h_lf2", "cl_sum_t10", "union", "adaptive")  # fmt: skip


def measure(rule: str, rgb: np.ndarray):
    """``measure_region`` of ``rgb`` with its nuclei found by ``rule``."""
    from histoscope.tasks import ihc_measure as M

    if rule == "adaptive":
        first = measure("cl_h_t10", rgb)
        return first if first.location() != "nuclear" else measure("cl_sum_t10", rgb)
    detect = _rules()[rule]
    original = M.find_nuclei
    M.find_nuclei = lambda hema, dab, mpp, params, rgb=None: detect(hema, dab, params)
    try:
        return M.measure_region(rgb, MPP)
    finally:
        M.find_nuclei = original


def compartment_errors(m, true_pct: float) -> dict[str, float]:
    """Percent positive each compartment's DAB would give, minus the truth (points)."""
    c, thr = m.cells, np.asarray(m.params.thresholds)
    out = {}
    for name, key in (("nuc", "dab_nucleus"), ("cell", "dab_cell"), ("memb", "dab_membrane"),
                      ("cyto", "dab_cytoplasm")):  # fmt: skip
        pos = np.searchsorted(thr, c[key], side="right") > 0
        out[name] = (100 * float(pos.mean()) if m.n_cells else 0.0) - true_pct
    return out


def main(argv: list[str] | None = None) -> int:
    import histoscope as hs

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rules", required=True, help=f"comma-separated, of {', '.join(RULE_NAMES)}")
    ap.add_argument("--seeds", required=True, help="comma-separated generator seeds (80000+)")
    ap.add_argument("--size", type=int, default=2048, help="slide edge in px (default 2048)")
    ap.add_argument("--out", type=Path, default=ROOT / "_data" / "ihc_recall")
    args = ap.parse_args(argv)
    rules = args.rules.split(",")
    unknown = [r for r in rules if r not in RULE_NAMES]
    if unknown:
        ap.error(f"unknown rule(s) {unknown}; choose from {RULE_NAMES}")
    seeds = [int(s) for s in args.seeds.split(",")]
    acc = {r: {"hp": 0, "np": 0, "hn": 0, "nn": 0, "det": 0, "hit": 0, "err": [], "alt": []}
           for r in rules}  # fmt: skip
    for seed in seeds:
        path, xy, pos = bench.slide_and_truth(seed, args.size, args.out)
        rgb = hs.open_slide(path).read_region(0, 0, args.size, args.size, mpp=MPP)
        true_pct = 100 * float(pos.mean())
        for r in rules:
            t = time.time()
            m = measure(r, rgb)
            hit = bench.match(xy, np.stack([m.cells["x_um"], m.cells["y_um"]], 1))
            pct = m.summary()["percent_positive"]
            a = acc[r]
            a["hp"] += int(hit[pos].sum())
            a["np"] += int(pos.sum())
            a["hn"] += int(hit[~pos].sum())
            a["nn"] += int((~pos).sum())
            a["det"] += m.n_cells
            a["hit"] += int(hit.sum())
            a["err"].append(pct - true_pct)
            alt = compartment_errors(m, true_pct)
            a["alt"].append(alt)
            rec_pos = float(hit[pos].mean()) if pos.any() else float("nan")
            print(f"{seed} {r:12s} rec+ {rec_pos:.3f} rec- {hit[~pos].mean():.3f} "
                  f"prec {hit.sum() / max(m.n_cells, 1):.3f} %pos {pct:.1f} true {true_pct:.1f} "
                  f"loc={m.location()} compartment %pos-true "
                  + " ".join(f"{k}:{v:+.1f}" for k, v in alt.items())
                  + f" {time.time() - t:.1f}s", flush=True)  # fmt: skip
    for r, a in acc.items():
        rp, rn = a["hp"] / max(a["np"], 1), a["hn"] / max(a["nn"], 1)
        e = np.asarray(a["err"])
        alt_mae = " ".join(f"{k}:{np.mean([abs(d[k]) for d in a['alt']]):.1f}" for k in a["alt"][0])
        print(f"POOLED {r:12s} rec+ {rp:.3f} rec- {rn:.3f} gap {rp - rn:+.3f} "
              f"prec {a['hit'] / max(a['det'], 1):.3f} MAE {np.abs(e).mean():.1f} "
              f"bias {e.mean():+.1f} compartment MAE {alt_mae}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
