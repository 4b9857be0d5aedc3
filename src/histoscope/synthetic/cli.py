"""``histoscope synth OUT_DIR``: a synthetic dataset with splits and ground truth."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

#: ``--tumour-extent`` choices; ``any`` keeps every seed (the generator's own mix).
EXTENT_CHOICES = ("any", "none", "focus", "moderate", "extensive")
#: Seeds looked at per slide asked for before giving up on an extent.
MAX_SEEDS_PER_SLIDE = 200


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``synth`` command."""
    p = sub.add_parser(
        "synth",
        help="generate synthetic H&E / IHC slides with ground truth and train/val/test splits",
    )
    p.add_argument("out_dir", help="dataset folder (created)")
    p.add_argument("--kind", choices=("he", "ihc"), default="he")
    p.add_argument("--size", nargs=2, type=int, metavar=("H", "W"), default=(4096, 4096),
                   help="level-0 height and width in pixels")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="first slide seed")
    p.add_argument("--count", type=int, default=1, help="number of slides")
    p.add_argument("--mpp", type=float, default=0.5, help="µm per level-0 pixel")
    p.add_argument("--tumour-extent", choices=EXTENT_CHOICES, default="any",
                   help="keep only seeds (from --seed upwards) whose slide has this tumour "
                        "extent: none (benign), focus (1-4.5%% of the tissue), moderate "
                        "(10-35%%), extensive (40-75%%); 'any' takes consecutive seeds")  # fmt: skip
    p.add_argument("--extras", action="store_true",
                   help="also write 2 µm expression, NuClass patches and a report per slide")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run)


def seeds_with_extent(
    kind: str, extent: str, first: int, count: int, size: tuple[int, int], mpp: float,
    *, progress: Callable[[int, int, str], None] | None = None,
) -> list[int]:  # fmt: skip
    """The first ``count`` seeds from ``first`` up whose slide has tumour ``extent``.

    Only the slide-level parameters are drawn (no pixels), so this is cheap.
    ``kind``, ``size``, ``mpp`` and the rest are checked before any seed is
    looked at; ``progress(found, count, "seed N")`` is called per seed found.

    Raises
    ------
    ValueError
        If ``extent`` is unknown, or ``count`` slides of it are not found among
        ``count * MAX_SEEDS_PER_SLIDE`` seeds.
    """
    from histoscope.synthetic._generate import _check
    from histoscope.synthetic._params import TUMOUR_EXTENTS, sample_params

    _check(kind, size, 0, mpp)
    if extent not in TUMOUR_EXTENTS:
        raise ValueError(f"tumour extent must be one of {TUMOUR_EXTENTS}, got {extent!r}")
    if count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    if first < 0:
        raise ValueError(f"seed must be a non-negative integer, got {first!r}")
    seeds: list[int] = []
    for s in range(first, first + count * MAX_SEEDS_PER_SLIDE):
        if sample_params(kind, s, size, mpp).tumour_extent == extent:
            seeds.append(s)
            if progress is not None:
                progress(len(seeds), count, f"seed {s} ({extent})")
            if len(seeds) == count:
                return seeds
    raise ValueError(f"only {len(seeds)} of {count} {kind} slides with tumour extent {extent!r} "
                     f"among seeds {first}-{first + count * MAX_SEEDS_PER_SLIDE - 1}")  # fmt: skip


def write_selected(
    out_dir: str | Path,
    kind: str,
    size: tuple[int, int],
    seeds: list[int],
    mpp: float,
    *,
    extras: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
) -> Path:
    """A dataset of the slides of ``seeds`` (any order), laid out as ``write_dataset`` does.

    :func:`histoscope.synthetic.write_dataset` with ``seeds``: each slide's files
    and manifest row are exactly those of a consecutive dataset, the splits are
    drawn over the whole list (seeded by its first seed), and the manifest
    (which also lists ``seeds``), ``hpa.csv`` (IHC) and ``reports.json``
    (extras) are written once, after the last slide.
    """
    from histoscope.synthetic._dataset import write_dataset

    return write_dataset(out_dir, kind, size, mpp=mpp, extras=extras, progress=progress,
                         seeds=list(seeds))  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Write the dataset and print where its manifest is."""
    from histoscope.synthetic._dataset import write_dataset

    def progress(done: int, total: int, name: str) -> None:
        if not args.quiet:
            print(f"[{done}/{total}] {name}", file=sys.stderr, flush=True)

    size = tuple(args.size)
    try:
        if args.tumour_extent == "any":
            manifest = write_dataset(args.out_dir, kind=args.kind, size=size, seed=args.seed,
                                     count=args.count, mpp=args.mpp, extras=args.extras,
                                     progress=progress)  # fmt: skip
        else:

            def scanned(found: int, total: int, what: str) -> None:
                if not args.quiet:
                    print(f"[scan {found}/{total}] {what}", file=sys.stderr, flush=True)

            seeds = seeds_with_extent(args.kind, args.tumour_extent, args.seed, args.count,
                                      size, args.mpp, progress=scanned)  # fmt: skip
            manifest = write_selected(args.out_dir, args.kind, size, seeds, args.mpp,
                                      extras=args.extras, progress=progress)  # fmt: skip
    except ValueError as exc:
        print(f"histoscope synth: error: {exc}", file=sys.stderr)
        return 2
    print(manifest)
    return 0
