"""Atomic writes: results appear complete under their final name, or not at all.

Output folders are only ever replaced when the project itself wrote them: every folder made by
``atomic_dir`` carries a ``.nodulesynth`` marker file, and ``--overwrite`` refuses a non-empty
folder without it (an unset shell variable, a typo or the input folder must never be deleted).
Temp folders carry the writer's pid in their name, so the next run can sweep those left by a
process that was killed (kill -9, power loss) without touching a live run's.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .errors import NoduleSynthError

MARKER = ".nodulesynth"  # "this folder was written by nodulesynth and may be replaced by it"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _public(path: str | os.PathLike, mode: int) -> None:
    """mkstemp/mkdtemp create owner-only entries; give the final result the usual umask permissions."""
    os.chmod(path, mode & ~_umask())


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temp file beside ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
        _public(tmp, 0o666)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (indented, UTF-8)."""
    with atomic_file(path, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False, default=str)
        fh.write("\n")


# ---------------------------------------------------------------- ownership marker


def mark_dir(folder: str | os.PathLike) -> None:
    """Mark ``folder`` as written by nodulesynth (so a later ``--overwrite`` may replace it)."""
    info = {"written_by": "nodulesynth", "host": socket.gethostname(), "pid": os.getpid()}
    (Path(folder) / MARKER).write_text(json.dumps(info) + "\n", encoding="utf-8")


def is_ours(folder: str | os.PathLike) -> bool:
    """True if ``folder`` carries the marker (only such folders are ever deleted or replaced)."""
    return (Path(folder) / MARKER).is_file()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, but another user's
    return True


def sweep_stale(out: str | os.PathLike) -> list[Path]:
    """Remove ``.OUT.tmp-PID-*`` / ``.OUT.old-PID-*`` folders beside ``out`` whose writer (same host)
    is dead. Only marked folders are touched; returns what was removed."""
    out = Path(out)
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(?:tmp|old)-(\d+)-")
    removed = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return removed
    host = socket.gethostname()
    for p in entries:
        m = pattern.match(p.name)
        if not m or not p.is_dir() or p.is_symlink() or not is_ours(p):
            continue
        try:
            owner = json.loads((p / MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            owner = {}
        if owner.get("host", host) != host or _pid_alive(int(m.group(1))):
            continue  # maybe another machine's (shared disk), or a live run's
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


# ---------------------------------------------------------------- output folder checks

PathLike = str | os.PathLike


def _named(inputs: Iterable[Any]) -> list[tuple[str, Path]]:
    out = []
    for item in inputs:
        name, path = item if isinstance(item, tuple) else ("input", item)
        if path is None or str(path) == "":
            continue
        out.append((name, Path(path).expanduser().resolve()))
    return out


def check_out_dir(out: PathLike, overwrite: bool, arg: str = "--out", inputs: Iterable[Any] = (),
                  reuse: bool = False, ours: Callable[[Path], bool] | None = None) -> Path:
    """Check an output folder before any work starts; returns it resolved.

    Refused: an empty path (an unset shell variable would name the current folder), the filesystem
    root, a folder that is, contains or lies inside one of ``inputs`` (paths or ``(arg, path)``
    pairs), a file, a non-empty folder without ``overwrite`` (unless ``reuse``: resume in place)
    and, with ``overwrite``, a non-empty folder nodulesynth did not write (no marker, and
    ``ours(folder)`` — a caller's own recognisable layout — is not true). Also probes that the
    parent can really be written, and sweeps temp folders of dead earlier runs."""
    if str(out).strip() == "":
        raise NoduleSynthError(f"{arg}: empty path (an unset shell variable?); name the output folder")
    out = Path(out).expanduser().resolve()  # "." has no name to put a temp sibling beside
    if out == Path(out.anchor):
        raise NoduleSynthError(f"{arg} {out}: is the filesystem root; name a folder for the output")
    for name, src in _named(inputs):
        if out == src:
            raise NoduleSynthError(f"{arg} {out}: is the input {name} itself; choose another output folder")
        if out in src.parents:
            raise NoduleSynthError(f"{arg} {out}: contains the input {name} {src}; choose another output folder")
        if src in out.parents:
            raise NoduleSynthError(f"{arg} {out}: lies inside the input {name} {src}; choose a folder outside it")
    if out.exists() and not out.is_dir():
        raise NoduleSynthError(f"{arg} {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not reuse:
        if not overwrite:
            raise NoduleSynthError(f"{arg} {out}: folder exists and is not empty (pass --overwrite to replace it)")
        if not (is_ours(out) or (ours is not None and ours(out))):
            raise NoduleSynthError(
                f"{arg} {out}: not replaced: this folder was not written by nodulesynth (no {MARKER} marker "
                "file); move or delete it yourself, or choose another output folder")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NoduleSynthError(f"{arg} {out}: {parent} is not a folder")
    try:  # really try: os.access says yes to root everywhere (even /proc)
        Path(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent)).rmdir()
    except OSError as e:
        raise NoduleSynthError(f"{arg} {out}: cannot write into {parent} ({e.strerror or e})") from e
    sweep_stale(out)
    return out


# ---------------------------------------------------------------- disk full


def tree_bytes(folder: PathLike) -> int:
    """Bytes of the regular files under ``folder`` (0 if it is gone)."""
    total = 0
    for dirpath, _, files in os.walk(folder):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def free_bytes(path: PathLike) -> int:
    p = Path(path)
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in DISK_FULL


def disk_full_error(e: OSError, where: PathLike, need_bytes: int | None) -> NoduleSynthError:
    """One line for a full disk: the path, the free space and (when the caller could estimate the
    total) the bytes missing."""
    free = free_bytes(where)
    what = e.filename or where
    msg = f"{what}: disk full ({e.strerror or os.strerror(e.errno)}); {free:,} bytes free on that disk"
    if need_bytes is not None and need_bytes > free:
        msg += f", about {need_bytes - free:,} more needed ({need_bytes:,} in all)"
    return NoduleSynthError(msg + "; nothing half-written was left behind")


@contextlib.contextmanager
def atomic_dir(out: PathLike, overwrite: bool = False, arg: str = "--out", inputs: Iterable[Any] = (),
               progress: Callable[[], float] | None = None, need_bytes: int | None = None,
               ours: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temp folder beside ``out``; on success it replaces ``out``, on any error (Ctrl-C,
    SIGTERM included) it is deleted, so no half-written dataset is ever left under ``out``.

    The result carries the marker. ``need_bytes`` (the expected size) or ``progress()`` (fraction
    of the work done, 0..1) lets a full disk be reported with the bytes still missing."""
    out = check_out_dir(out, overwrite, arg, inputs, ours=ours)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        mark_dir(tmp)
        yield tmp
        _public(tmp, 0o777)
        if out.exists():
            if any(out.iterdir()) and not (is_ours(out) or (ours is not None and ours(out))):
                raise NoduleSynthError(f"{arg} {out}: was filled by something else while this ran; not replaced")
            trash = out.with_name(f".{out.name}.old-{os.getpid()}-{os.urandom(4).hex()}")
            os.replace(out, trash)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException as e:
        written = tree_bytes(tmp) if is_disk_full(e) else 0
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            need = need_bytes
            with contextlib.suppress(Exception):
                frac = float(progress()) if progress is not None else 0.0
                if need is None and 0 < frac <= 1:
                    need = int(written / frac)
            raise disk_full_error(e, out.parent, need) from e
        raise


def out_path(value: str) -> Path:
    """argparse ``type`` for output folders: ``Path("")`` would silently mean the current folder."""
    import argparse

    if value.strip() == "":
        raise argparse.ArgumentTypeError("empty path (an unset shell variable?); name the output folder")
    return Path(value)
