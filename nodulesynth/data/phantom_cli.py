"""Write procedural chest-CT phantoms in the LUNA16 layout (subset0/*.mhd, annotations.csv, seg-lungs-LUNA16/)."""
from __future__ import annotations

import argparse

from ..errors import NoduleSynthError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scans", type=int, required=True, help="number of phantom scans to write")
    parser.add_argument("--out", required=True, help="output LUNA16-style root folder")
    parser.add_argument("--seed", type=int, default=0, help="master seed; same seed, same bytes (default 0)")
    parser.add_argument("--size", type=int, default=512, help="in-plane pixels per side (default 512)")
    parser.add_argument("--slices", type=int, default=100, help="slices per scan (default 100)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")


def run(args: argparse.Namespace) -> int:
    from .phantom import PhantomConfig, write_phantom_dataset

    if args.scans < 1:
        raise NoduleSynthError(f"--scans {args.scans}: must be at least 1")
    if args.seed < 0:
        raise NoduleSynthError(f"--seed {args.seed}: must be a non-negative integer")
    cfg = PhantomConfig(size=args.size, slices=args.slices)
    out = write_phantom_dataset(args.out, args.scans, seed=args.seed, cfg=cfg, overwrite=args.overwrite)
    print(f"wrote {args.scans} phantom scan(s) in LUNA16 layout to {out}")
    return 0
