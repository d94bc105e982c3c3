"""`nodulesynth` command line: one entry point, one module per subcommand.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``; this file only
wires them up and turns user errors into one clear line and a non-zero exit.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys

from .errors import NoduleSynthError
from .io import disk_full_error, is_disk_full


class Terminated(KeyboardInterrupt):
    """SIGTERM/SIGHUP (what `timeout`, schedulers and a closed terminal send), raised where the
    program is, so the same cleanup as Ctrl-C runs: temp folders removed, nothing half-written."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum, frame):  # noqa: ARG001
    raise Terminated(signum)


@contextlib.contextmanager
def _terminate_as_interrupt():
    old = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError, OSError):  # not the main thread: leave signals alone
            if signal.getsignal(sig) is not signal.SIG_IGN:  # respect nohup
                old[sig] = signal.signal(sig, _raise_terminated)
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)

# name → (module, one-line help). Modules are imported lazily so `--help` stays fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("nodulesynth.synth.generate_cli", "generate synthetic nodule CT slices (COCO/YOLO/NIfTI/MHA/DICOM/MONAI)"),
    "merge": ("nodulesynth.export.merge", "merge dataset shards (e.g. generate --start-index parts) into one dataset"),
    "prepare": ("nodulesynth.data.prepare", "turn real CT (LUNA16, LIDC, DICOM, NIfTI/NRRD, MSD, LIDC crops) into a training slice dataset"),
    "phantom": ("nodulesynth.data.phantom_cli", "write procedural chest-CT phantoms in LUNA16 format"),
    "train": ("nodulesynth.train.cli", "train the mask StyleGAN or the DL-Pix2Pix translator"),
}


def build_parser(only: str | None = None) -> tuple[argparse.ArgumentParser, dict[str, object]]:
    """The full parser; with ``only``, just that subcommand's module is imported (the others are
    listed by their one-line help), so `nodulesynth generate` never loads the DICOM/ITK readers."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="nodulesynth", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"nodulesynth {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    modules = {}
    for name, (modname, help_) in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=help_)
            continue
        mod = importlib.import_module(modname)
        p = sub.add_parser(name, help=help_, description=(mod.__doc__ or help_).strip().splitlines()[0])
        mod.add_arguments(p)
        modules[name] = mod
    return parser, modules


def _command(argv: list[str]) -> str:
    """The subcommand named on the command line ('' when none is: `--help`, `--version`)."""
    return next((a for a in argv if not a.startswith("-")), "")


def main(argv: list[str] | None = None) -> int:
    own_process = argv is None  # the console script, python -m nodulesynth
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, modules = build_parser(only=_command(argv))
    args = parser.parse_args(argv)
    if own_process:
        from .runtime import keep_heap

        keep_heap()
    try:
        with _terminate_as_interrupt():
            return int(modules[args.command].run(args) or 0)
    except NoduleSynthError as e:
        print(f"nodulesynth {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Terminated as e:
        print(f"nodulesynth {args.command}: terminated ({e}); nothing half-written was left behind", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print(f"nodulesynth {args.command}: interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130
    except OSError as e:
        if not is_disk_full(e):
            raise
        print(f"nodulesynth {args.command}: error: {disk_full_error(e, e.filename or '.', None)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
