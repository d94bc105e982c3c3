"""Atomic writes: results appear complete under their final name, or not at all."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import NoduleSynthError


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


def check_out_dir(out: str | os.PathLike, overwrite: bool, arg: str = "--out") -> Path:
    """Refuse an existing non-empty output folder unless ``overwrite``; check it can be written."""
    out = Path(out).expanduser().resolve()  # "." has no name to put a temp sibling beside
    if out.exists() and not out.is_dir():
        raise NoduleSynthError(f"{arg} {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise NoduleSynthError(f"{arg} {out}: folder exists and is not empty (pass --overwrite to replace it)")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NoduleSynthError(f"{arg} {out}: {parent} is not a folder")
    try:  # really try: os.access says yes to root everywhere (even /proc)
        Path(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent)).rmdir()
    except OSError as e:
        raise NoduleSynthError(f"{arg} {out}: cannot write into {parent} ({e.strerror or e})") from e
    return out


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False, arg: str = "--out") -> Iterator[Path]:
    """Yield a temp folder beside ``out``; on success it replaces ``out``, on any error (Ctrl-C
    included) it is deleted, so no half-written dataset is ever left under ``out``."""
    out = check_out_dir(out, overwrite, arg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _public(tmp, 0o777)
        if out.exists():
            trash = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, trash)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
