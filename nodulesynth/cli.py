"""`nodulesynth` command line: one entry point, one module per subcommand.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``; this file only
wires them up and turns user errors into one clear line and a non-zero exit.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import NoduleSynthError

# name → (module, one-line help). Modules are imported lazily so `--help` stays fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("nodulesynth.synth.generate_cli", "generate synthetic nodule CT slices (COCO/YOLO)"),
    "prepare": ("nodulesynth.data.prepare", "turn LUNA16 / LIDC-IDRI CT into a training slice dataset"),
    "phantom": ("nodulesynth.data.phantom_cli", "write procedural chest-CT phantoms in LUNA16 format"),
    "train": ("nodulesynth.train.cli", "train the mask StyleGAN or the DL-Pix2Pix translator"),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    from . import __version__

    parser = argparse.ArgumentParser(prog="nodulesynth", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"nodulesynth {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    modules = {}
    for name, (modname, help_) in COMMANDS.items():
        mod = importlib.import_module(modname)
        p = sub.add_parser(name, help=help_, description=(mod.__doc__ or help_).strip().splitlines()[0])
        mod.add_arguments(p)
        modules[name] = mod
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(modules[args.command].run(args) or 0)
    except NoduleSynthError as e:
        print(f"nodulesynth {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nodulesynth {args.command}: interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
