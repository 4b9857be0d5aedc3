"""``histoscope features SLIDE --checkpoint CKPT | --backbone NAME --out f.h5``: a feature table."""

from __future__ import annotations

import argparse
from pathlib import Path

from histoscope._cli_tasks import add_engine_options, engine_params


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "features",
        help="encode a slide's tissue tiles into a CLAM/TRIDENT feature file (.h5)",
        description="Tile features of one slide in CLAM/TRIDENT layout (features N x D, coords "
                    "N x 2 level-0 corners, patch size and µm/px as attributes).",
    )  # fmt: skip
    p.add_argument("slide", help="slide file, OME-Zarr directory or image")
    p.add_argument("--out", type=Path, required=True, help="feature file to write (.h5)")
    enc = p.add_mutually_exclusive_group(required=True)
    enc.add_argument("--checkpoint", default=None,
                     help="tile_classifier checkpoint (its backbone) or clam checkpoint (the "
                          "encoder its card names)")  # fmt: skip
    enc.add_argument("--backbone", default=None,
                     help="backbone name (registry, timm or open_clip:<model>)")  # fmt: skip
    p.add_argument("--weights", default=None, help="local weights for --backbone")
    p.add_argument("--seed", type=int, default=0,
                   help="--backbone without --weights: the random initialisation's seed")  # fmt: skip
    p.add_argument("--mpp", type=float, default=None, help="µm/px for images that carry none")
    p.add_argument("--min-tissue", type=float, default=0.5,
                   help="tissue fraction a tile needs (0-1)")  # fmt: skip
    p.add_argument("--session-dir", type=Path, default=None,
                   help="also keep the table in this session folder, where MIL reuses it")  # fmt: skip
    add_engine_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from histoscope.features import backbone_features, checkpoint_features
    from histoscope.params import ParamError
    from histoscope.progress import drive, tqdm_progress
    from histoscope.session import open_session

    if not 0 <= args.min_tissue <= 1:
        raise ParamError(f"--min-tissue {args.min_tissue}: must be a number from 0 to 1")
    if args.weights and not args.backbone:
        raise ParamError("--weights goes with --backbone")
    engine = engine_params(args)
    _check_out(args.out)
    if args.checkpoint:
        fm = checkpoint_features(args.checkpoint)
    else:
        fm = backbone_features(args.backbone, args.weights, seed=args.seed)
    kw = {"in_memory": True} if args.session_dir is None else {"folder": args.session_dir}
    progress, close = tqdm_progress("tiles")
    try:
        with open_session(args.slide, mpp=args.mpp, **kw) as session:
            grid = session.grid(fm.spec.mpp, fm.spec.tile_size, args.min_tissue)
            if len(grid) == 0:
                raise ParamError(f"{args.slide}: no tissue tiles (min_tissue={args.min_tissue})")
            table = drive(session.iter_features(fm, grid, engine), progress, what="tiles")
            session.save_manifest()
    finally:
        close()
    path = table.save(args.out)
    d = table.features.shape
    print(f"wrote {path}: {d[0]} tiles x {d[1]} features at {fm.spec.mpp:g} µm/px, "
          f"{fm.spec.tile_size} px")  # fmt: skip
    return 0


def _check_out(out: Path) -> None:
    """Refuse an --out that cannot be written before any tile is encoded."""
    import os

    from histoscope.params import ParamError

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ParamError(f"--out {out}: cannot create its folder ({exc.strerror})") from None
    if out.is_dir() or not os.access(out.parent, os.W_OK | os.X_OK):
        raise ParamError(f"--out {out}: not a writable file path")
