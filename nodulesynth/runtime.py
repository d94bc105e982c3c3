"""Device choice and mixed precision, decided in one place."""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys

import torch

from .errors import NoduleSynthError


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' → cuda when available else cpu; anything else is validated with a clear error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise NoduleSynthError(f"--device {device!r}: not a device (use auto, cpu, cuda or cuda:N)") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise NoduleSynthError(f"--device {device!r}: CUDA is not available on this machine (use cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise NoduleSynthError(f"--device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif dev.type not in ("cpu", "mps"):
        raise NoduleSynthError(f"--device {device!r}: unsupported device type {dev.type!r}")
    return dev


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA (no loss scaler needed); plain fp32 on CPU, where bf16 is slower."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


KEEP_HEAP_ENV = "NODULESYNTH_KEEP_HEAP"  # "0" leaves the C allocator as it is


def keep_heap() -> bool:
    """Keep freed memory in the process instead of handing it back to the kernel (glibc only).

    glibc serves every allocation above 32 MiB — each 512² activation of a CPU block — from a fresh
    mmap and unmaps it on free, so the kernel zero-fills every page of it again on the next block:
    a fifth of ``generate``'s CPU time was that system time (README "Performance", the "Heap" row). With
    mmap and trimming off the same pages are reused (``generate --n 2000``: 10 min 4.5 s → 8 min 35 s on
    2 cores, 0.7 GB more peak RSS, the same files). For processes the project starts (the CLI), never on
    import.
    Returns whether it took effect."""
    if os.environ.get(KEEP_HEAP_ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))
