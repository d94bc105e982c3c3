"""Device choice and mixed precision, decided in one place."""
from __future__ import annotations

import contextlib

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
