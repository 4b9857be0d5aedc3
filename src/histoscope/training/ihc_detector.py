"""Train the IHC nucleus-centre detector (:mod:`histoscope.models.ihc_detector`).

Run from the repository root (one thread; ~30 min on a shared 2-core machine)::

    OMP_NUM_THREADS=1 .venv/bin/python -m histoscope.training.ihc_detector \\
        --out sample_data/ihc_detector_default.safetensors

Data: synthetic IHC slides (``histoscope.synthetic.generate(kind="ihc")``),
2048 x 2048 px at 0.5 µm/px, drawn into ``out/data/ihc_detector/`` (reused):
the first 14 seeds from 81000 whose design is strong and >75 % positive and
the first 14 others (all intensities and fractions, DAB-negative designs
too). Targets come from the generator's truth: a Gaussian of σ = 2 µm at every
cell's nucleus centre (``stem.cells.csv``) and the nucleus outlines
(``stem.cells.geojson``) as the foreground. Crops of 160 px, 80 % centred
near a random cell, flips / quarter turns and a per-channel optical-density
gain of ±15 % as augmentation; loss = 5 x centre-weighted squared error on the
heatmap + binary cross-entropy on the foreground; Adam, cosine schedule.

The peak threshold is chosen on tuning slides never trained on (the 12
strong >75 % seeds from 80000 that tuned ``detection="classical"``): the
threshold with the best pooled F1 of peaks matched to true centres within
4 µm. Last, the training-data reference (:mod:`histoscope.ood`) of the
network's tissue-window features is fitted on every other training slide and
calibrated on those tuning slides and on :data:`OOD_TUNE_N` more slides of every design
(strong and weak, any positive fraction) from seed :data:`OOD_TUNE_FIRST_SEED`, each
whole, in 1024 px tiles with a 20 µm margin as the measurement reads them
(``--reference-only`` redoes just that step, then scores the held-out slides, the app's
synthetic IHC sample and two images that must stay outside and records them in the card's
``metrics.ood_check``). Held-out slides (90000+, 95000+, 97000+) are never fitted or tuned
on; their recall is measured by ``benchmarks/bench_ihc_recall.py --rules learned``.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

DATA = Path("out/data/ihc_detector")
TRAIN_FIRST_SEED = 81000
TUNE_SEEDS = (80003, 80010, 80072, 80091, 80103, 80110, 80148, 80150, 80176, 80186, 80193, 80199)
SIZE = 2048
CROP = 160
MATCH_UM = 4.0
#: More tuning slides for the training-data check's threshold (every design; never trained on).
OOD_TUNE_FIRST_SEED = 82000
OOD_TUNE_N = 24
#: Fewest tissue windows (32 µm) a tuning slide needs to calibrate the threshold.
CALIB_MIN_WINDOWS = 32
#: Held-out slides scored for the training-data check's false alarms (never fitted or tuned on).
HELDOUT_DIR = Path("benchmarks/_data/ihc_recall")
#: Peak thresholds tried on the tuning slides (0.70 is the top of this grid).
THRESHOLDS = tuple(round(0.15 + 0.05 * i, 2) for i in range(12))


def is_strong(seed: int, size: int = SIZE) -> bool:
    """Whether the seed's IHC design is strong (DAB >= 0.5) and >75 % positive."""
    from histoscope.synthetic._params import sample_params

    p = sample_params("ihc", seed, (size, size), 0.5)
    return p.positive_fraction > 0.75 and p.dab_intensity >= 0.5


def training_seeds(n_strong: int = 14, n_other: int = 14, first: int = TRAIN_FIRST_SEED):
    """The first ``n_strong`` strong >75 % seeds from ``first`` and the first ``n_other`` others."""
    strong: list[int] = []
    other: list[int] = []
    seed = first
    while len(strong) < n_strong or len(other) < n_other:
        pick = strong if is_strong(seed) else other
        if len(pick) < (n_strong if pick is strong else n_other):
            pick.append(seed)
        seed += 1
    return strong, other


def load_slide(seed: int, out: Path = DATA, size: int = SIZE):
    """RGB ``(H, W, 3)`` uint8, centres ``(n, 2)`` (row, col px) and the nucleus mask of a slide."""
    import histoscope as hs
    from histoscope.synthetic import generate

    stem = f"ihc_{seed:05d}_{size}"
    if not (out / f"{stem}.tif").exists():
        generate(out, kind="ihc", size=(size, size), seed=seed, name=stem, workers=1)
    rgb = hs.open_slide(out / f"{stem}.tif").read_region(0, 0, size, size, mpp=0.5)
    with open(out / f"{stem}.cells.csv") as fh:
        rows = list(csv.DictReader(fh))
    # the table's x, y are continuous pixel coordinates (pixel i spans [i, i + 1))
    centres = np.array([[float(r["y"]) - 0.5, float(r["x"]) - 0.5] for r in rows]).reshape(-1, 2)
    positive = np.array([float(r["dab_od"]) > 0 for r in rows], bool)
    return np.asarray(rgb)[..., :3], centres, positive, nucleus_mask(out / f"{stem}.cells.geojson",
                                                                     (size, size))  # fmt: skip


def nucleus_mask(geojson: Path, shape: tuple[int, int]) -> np.ndarray:
    """The generator's nucleus outlines (level-0 px) filled, as a bool mask."""
    from skimage.draw import polygon

    mask = np.zeros(shape, bool)
    for feat in json.loads(Path(geojson).read_text())["features"]:
        geom = feat["geometry"]
        rings = [geom["coordinates"][0]] if geom["type"] == "Polygon" else \
            [p[0] for p in geom["coordinates"]]  # fmt: skip
        for ring in rings:
            xy = np.asarray(ring, np.float64)
            rr, cc = polygon(xy[:, 1] - 0.5, xy[:, 0] - 0.5, shape)
            mask[rr, cc] = True
    return mask


def centre_heatmap(centres: np.ndarray, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Max over cells of a unit-peak Gaussian at each centre, float32."""
    heat = np.zeros(shape, np.float32)
    r = int(np.ceil(3 * sigma_px))
    for y, x in centres:
        iy, ix = int(round(y)), int(round(x))
        y0, y1, x0, x1 = (
            max(iy - r, 0),
            min(iy + r + 1, shape[0]),
            max(ix - r, 0),
            min(ix + r + 1, shape[1]),
        )
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        g = np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * sigma_px**2)).astype(np.float32)
        np.maximum(heat[y0:y1, x0:x1], g, out=heat[y0:y1, x0:x1])
    return heat


class Crops:
    """Random training crops (OD input, heatmap and foreground targets) from loaded slides."""

    def __init__(self, slides, crop: int, sigma_px: float, seed: int) -> None:
        from histoscope.models.ihc_detector import optical_density

        self.rng = np.random.default_rng(seed)
        self.crop = crop
        self.items = []
        for rgb, centres, _pos, fg in slides:
            heat = centre_heatmap(centres, rgb.shape[:2], sigma_px).astype(np.float16)
            self.items.append((optical_density(rgb).astype(np.float16), heat, fg, centres))

    def batch(self, n: int):
        import torch

        xs, ts = [], []
        c = self.crop
        for _ in range(n):
            od, heat, fg, centres = self.items[self.rng.integers(len(self.items))]
            h, w = heat.shape
            if len(centres) and self.rng.random() < 0.8:
                cy, cx = centres[self.rng.integers(len(centres))] + self.rng.uniform(
                    -c / 2, c / 2, 2
                )
            else:
                cy, cx = self.rng.uniform(0, h), self.rng.uniform(0, w)
            y0 = int(np.clip(cy - c / 2, 0, h - c))
            x0 = int(np.clip(cx - c / 2, 0, w - c))
            x = od[:, y0 : y0 + c, x0 : x0 + c].astype(np.float32)
            t = np.stack([heat[y0 : y0 + c, x0 : x0 + c], fg[y0 : y0 + c, x0 : x0 + c]]).astype(
                np.float32
            )
            x = x * self.rng.uniform(0.85, 1.15, (3, 1, 1)).astype(np.float32)
            k = int(self.rng.integers(4))
            x, t = np.rot90(x, k, (1, 2)), np.rot90(t, k, (1, 2))
            if self.rng.random() < 0.5:
                x, t = x[:, :, ::-1], t[:, :, ::-1]
            xs.append(np.ascontiguousarray(x))
            ts.append(np.ascontiguousarray(t))
        return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ts))


def loss_fn(logits, target):
    """5 x centre-weighted squared error on the heatmap + BCE on the foreground."""
    from torch.nn import functional as F

    p = logits[:, 0].sigmoid()
    t = target[:, 0]
    heat = ((1 + 9 * t) * (p - t) ** 2).mean()
    return 5 * heat + F.binary_cross_entropy_with_logits(logits[:, 1], target[:, 1])


def train(model, crops: Crops, steps: int, batch: int, lr: float, log_every: int = 50):
    """Adam with a cosine schedule; returns the loss history (per ``log_every`` steps)."""
    import torch

    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    model.train()
    history, running, t0 = [], 0.0, time.time()
    for step in range(1, steps + 1):
        x, t = crops.batch(batch)
        loss = loss_fn(model(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        running += float(loss.detach())
        if step % log_every == 0:
            history.append(running / log_every)
            print(f"step {step}/{steps} loss {running / log_every:.4f} "
                  f"{time.time() - t0:.0f}s", flush=True)  # fmt: skip
            running = 0.0
    model.eval()
    return history


def match(truth: np.ndarray, found: np.ndarray, radius: float) -> np.ndarray:
    """Per truth point, whether a found point was matched to it (greedy, nearest pairs first)."""
    from scipy.spatial import cKDTree

    hit = np.zeros(len(truth), bool)
    if not len(truth) or not len(found):
        return hit
    k = min(3, len(truth))
    d, idx = cKDTree(truth).query(found, k=k, distance_upper_bound=radius)
    d, idx = d.reshape(len(found), k).ravel(), idx.reshape(len(found), k).ravel()
    det = np.repeat(np.arange(len(found)), k)
    ok = np.isfinite(d)
    used = np.zeros(len(found), bool)
    for j in np.argsort(d[ok], kind="stable"):
        a, t = det[ok][j], idx[ok][j]
        if not used[a] and not hit[t]:
            used[a], hit[t] = True, True
    return hit


def choose_threshold(model, seeds, thresholds=THRESHOLDS):
    """Pooled peak recall (DAB+ / DAB-) and precision on ``seeds`` per threshold; the best-F1 one."""
    from histoscope.models.ihc_detector import find_peaks, predict_maps

    acc = {float(t): np.zeros(5) for t in thresholds}  # hit+, n+, hit-, n-, found
    for seed in seeds:
        rgb, centres, pos, _fg = load_slide(seed)
        heat, _fg, _feats = predict_maps(model, rgb)
        for t in thresholds:
            peaks = find_peaks(heat, float(t)).astype(np.float64)
            hit = match(centres, peaks, MATCH_UM / 0.5)
            acc[float(t)] += [hit[pos].sum(), pos.sum(), hit[~pos].sum(), (~pos).sum(), len(peaks)]
        print(f"tuning slide {seed} done", flush=True)
    rows = {}
    for t, (hp, n_p, hn, n_n, found) in acc.items():
        rec = (hp + hn) / max(n_p + n_n, 1)
        prec = (hp + hn) / max(found, 1)
        rows[t] = {"recall_pos": hp / max(n_p, 1), "recall_neg": hn / max(n_n, 1),
                   "precision": prec, "f1": 2 * rec * prec / max(rec + prec, 1e-9)}  # fmt: skip
    best = max(rows, key=lambda t: rows[t]["f1"])
    return best, rows


def slide_features(model, rgb: np.ndarray, tile: int = 1024, margin: int = 40) -> np.ndarray:
    """Tissue-window features of a whole image at 0.5 µm/px, tile by tile as the measurement.

    ``iter_measure_slide`` reads 1024 px tiles with a 20 µm (40 px) margin,
    white beyond the slide's edge, and the network scores each; so do these.
    """
    from histoscope.models.ihc_detector import predict_maps

    h, w = rgb.shape[:2]
    padded = np.pad(rgb, ((margin, tile + margin), (margin, tile + margin), (0, 0)),
                    constant_values=255)  # fmt: skip
    side = tile + 2 * margin
    parts = [predict_maps(model, padded[y : y + side, x : x + side])[2]
             for y in range(0, h, tile) for x in range(0, w, tile)]  # fmt: skip
    return np.concatenate(parts) if parts else np.zeros((0, model.config["widths"][-1]))


def ood_tune_seeds(first: int = OOD_TUNE_FIRST_SEED, n: int = OOD_TUNE_N) -> list[int]:
    """The calibration seeds added for the training-data check: ``n`` consecutive, every design."""
    return list(range(first, first + n))


def fit_ood_reference(model, fit_seeds, calib_seeds):
    """The training-data reference of the network's tissue-window features (:mod:`histoscope.ood`).

    Fitted on training slides, its threshold calibrated on tuning slides
    (never trained on), each slide whole (:func:`slide_features`); tuning slides
    with fewer than :data:`CALIB_MIN_WINDOWS` tissue windows are left out of the
    calibration (one with 8 windows, the fewest the measurement judges, scored
    2.2 and alone would have set the threshold above a synthetic H&E's). A slide
    unlike the synthetic IHC it learned from is flagged ``outside training data``.
    """
    from histoscope.models.ihc_detector import WINDOW
    from histoscope.ood import fit_reference

    def feats(seeds):
        out = []
        for s in seeds:
            out.append(slide_features(model, load_slide(s)[0]))
            print(f"features of slide {s}: {len(out[-1])} windows", flush=True)
        return out

    # the threshold is set by slides whose score (a median over windows) is stable
    calib = [f for f in feats(calib_seeds) if len(f) >= CALIB_MIN_WINDOWS]
    return fit_reference(feats(fit_seeds), calib,
                         features=f"IHC centre network bottleneck, mean over {WINDOW} px "
                         "(32 µm) tissue windows at 0.5 µm/px")  # fmt: skip


def ood_check(model, ref) -> dict:
    """Slide scores of held-out slides, the app's IHC sample and two images that are not like it.

    Held-out: every slide in :data:`HELDOUT_DIR` (the recall benchmark's, never
    fitted or tuned on); the flagged share of those with enough tissue windows
    to be judged is the check's false-alarm rate.
    The synthetic IHC sample (File > Open Sample, seed 41, 4096 px) must be
    within; scikit-image's real IHC image and a synthetic H&E slide outside.
    """
    import histoscope as hs
    from histoscope.ood import MIN_ITEMS, slide_score
    from histoscope.synthetic import generate, sample_slide

    def score(rgb):  # None: too few tissue windows to judge (the measurement says so too)
        f = slide_features(model, np.asarray(rgb)[..., :3])
        return round(float(slide_score(ref, f)), 4) if len(f) >= MIN_ITEMS["patches"] else None

    held = {}
    for path in sorted(HELDOUT_DIR.glob("ihc_*_2048.tif")):
        held[path.name.split("_")[1]] = score(hs.open_slide(path).read_region(0, 0, 2048, 2048,
                                                                            mpp=0.5))  # fmt: skip
    sample = hs.open_slide(sample_slide("ihc").slide)
    w, h = sample.dimensions
    from skimage import data

    he = generate(DATA, kind="he", size=(2048, 2048), seed=7, name="he_00007_2048", workers=1)
    judged = {k: v for k, v in held.items() if v is not None}
    flagged = sorted(k for k, v in judged.items() if v > ref.threshold)
    return {
        "threshold": round(float(ref.threshold), 4),
        "heldout_scores": held,
        "heldout_judged": len(judged),
        "heldout_flagged": flagged,
        "heldout_false_alarm_rate": round(len(flagged) / max(len(judged), 1), 4),
        "sample_ihc_seed41": score(sample.read_region(0, 0, w, h, mpp=0.5)),
        "skimage_ihc_real": score(data.immunohistochemistry()),
        "synthetic_he_seed7": score(
            hs.open_slide(he.slide).read_region(0, 0, 2048, 2048, mpp=0.5)
        ),  # fmt: skip
        "command": "python -m histoscope.training.ihc_detector --reference-only "
        "--out sample_data/ihc_detector_default.safetensors",
    }


def record_ood_check(path: Path, check: dict) -> None:
    """Set the card's ``metrics.ood_check`` (load-modify-save; tensors unchanged)."""
    from safetensors.torch import load_file, save_file

    from histoscope.atomic import atomic_path
    from histoscope.checkpoints import CARD_KEY, FORMAT, FORMAT_KEY, read_card, tensor_hash

    card = read_card(path)
    state = load_file(str(path))
    if card.sha256 and tensor_hash(state) != card.sha256:
        raise SystemExit(f"{path}: tensors do not match the card's sha256; not rewriting it")
    d = card.to_dict()
    d["metrics"] = {**d["metrics"], "ood_check": check}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(state, str(tmp), metadata={FORMAT_KEY: FORMAT,
                                             CARD_KEY: json.dumps(d, sort_keys=True)})  # fmt: skip


def add_reference(path: Path, check: bool = True) -> None:
    """Fit and write the training-data reference of an existing checkpoint (load-modify-save).

    With ``check``, also score :func:`ood_check`'s slides and record them in the card.
    """
    from histoscope.checkpoints import load_checkpoint
    from histoscope.models.ihc_detector import FAMILY
    from histoscope.ood import write_reference

    model, card = load_checkpoint(path, FAMILY)
    fit = card.data["train_seeds_strong"][::2] + card.data["train_seeds_other"][::2]
    calib = list(card.data["threshold_chosen_on"]) + ood_tune_seeds()
    ref = fit_ood_reference(model, fit, calib)
    write_reference(path, ref)
    print(f"training-data reference: threshold {ref.threshold:.4g}, calibration scores "
          f"{[round(v, 3) for v in ref.calib_scores]}", flush=True)  # fmt: skip
    if check:
        result = ood_check(model, ref)
        record_ood_check(path, result)
        print(json.dumps(result), flush=True)


def main(argv: list[str] | None = None) -> int:
    import torch

    from histoscope.checkpoints import save_checkpoint
    from histoscope.models.ihc_detector import FAMILY, MPP, SIGMA_UM, IHCCentreNet

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out", type=Path, default=Path("out/runs/ihc_detector/ihc_detector.safetensors")
    )
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reference-only", action="store_true",
                    help="only (re)fit the training-data reference of the checkpoint at --out")  # fmt: skip
    args = ap.parse_args(argv)
    if args.reference_only:
        add_reference(args.out)
        return 0
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    t0 = time.time()
    strong, other = training_seeds()
    train_seeds = strong + other
    slides = [load_slide(s) for s in train_seeds]
    crops = Crops(slides, CROP, SIGMA_UM / MPP, args.seed)
    del slides
    print(f"{len(train_seeds)} training slides loaded in {time.time() - t0:.0f}s", flush=True)
    model = IHCCentreNet()
    history = train(model, crops, args.steps, args.batch, args.lr)
    train_s = time.time() - t0
    best, rows = choose_threshold(model, TUNE_SEEDS)
    print(json.dumps({"threshold": best, "tuning": rows[best]}), flush=True)
    card = {
        "family": FAMILY,
        "config": {**model.config, "threshold": best},
        "input_spec": {
            "mpp": MPP,
            "input": "RGB optical density -log10(rgb/255), no normalisation",
            "multiple": 8,
        },  # fmt: skip
        "recipe": {
            "command": "python -m histoscope.training.ihc_detector",
            "steps": args.steps,
            "batch": args.batch,
            "crop_px": CROP,
            "lr": args.lr,
            "seed": args.seed,
            "optimizer": "Adam, one-cycle cosine",
            "sigma_um": SIGMA_UM,
            "loss": "5 x (1 + 9 t)-weighted squared error on the centre heatmap + BCE on "
            "the nucleus foreground",
            "augment": "flips, quarter turns, OD gain +-15 % per channel",
            "train_seconds": round(train_s),
            "threads": 1,
            "loss_history": [round(v, 5) for v in history],
        },  # fmt: skip
        "data": {
            "trained_on": "synthetic IHC (haematoxylin + DAB) slides only, "
            "histoscope.synthetic generator; never a real slide",
            "train_seeds_strong": strong,
            "train_seeds_other": other,
            "slide_px": SIZE,
            "mpp": MPP,
            "threshold_chosen_on": list(TUNE_SEEDS),
        },  # fmt: skip
        "metrics": {
            "tuning": {
                "seeds": list(TUNE_SEEDS),
                "threshold": best,
                "peaks_matched_within_um": MATCH_UM,
                "per_threshold": {str(t): r for t, r in rows.items()},
            }
        },  # fmt: skip
    }
    path = save_checkpoint(args.out, model, card)
    add_reference(path)
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
