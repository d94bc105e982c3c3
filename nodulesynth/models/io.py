"""Network weights on disk: ``<name>.safetensors`` (tensors) + ``<name>.json`` (dataclass config).

No pickles: a weights file can only hold tensors, and the JSON says how to rebuild the module.
Every failure (missing, corrupt, wrong architecture) is a NoduleSynthError naming the file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from ..errors import NoduleSynthError
from ..io import atomic_file, write_json

FORMAT = "nodulesynth-module"
FORMAT_VERSION = 1
M = TypeVar("M", bound=nn.Module)


def _brief(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


# Float fields with a closed range; every int field of a network config is a size or count (≥ 1).
FLOAT_RANGES = {"w_avg_beta": (0.0, 1.0), "dropout": (0.0, 1.0), "mapping_lr_mul": (1e-8, 1e3)}
INT_MINIMUMS = {"cond_channels": 0}  # the int fields that may be 0 (an unconditional texture model)


def check_config_values(config_cls: type, values: dict, where: str | Path) -> None:
    """Types and ranges of a JSON config against the dataclass annotations, before any network is
    built: a hand-edited ``"ngf": -3`` or ``"resolution": "big"`` gets one error naming the field
    instead of a traceback from deep inside torch."""
    for f in dataclasses.fields(config_cls):
        if f.name not in values:
            continue
        v, kind = values[f.name], str(f.type)
        what = f"{where}: {config_cls.__name__}.{f.name}={v!r}"
        if v is None:
            if "None" not in kind:
                raise NoduleSynthError(f"{what}: must not be null")
            continue
        base = kind.split("|")[0].strip()
        if base == "bool":
            if not isinstance(v, bool):
                raise NoduleSynthError(f"{what}: must be true or false")
        elif base == "int":
            if isinstance(v, bool) or not isinstance(v, int):
                raise NoduleSynthError(f"{what}: must be an integer")
            if v < INT_MINIMUMS.get(f.name, 1):
                raise NoduleSynthError(f"{what}: must be ≥ {INT_MINIMUMS.get(f.name, 1)}")
        elif base == "float":
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise NoduleSynthError(f"{what}: must be a finite number")
            lo, hi = FLOAT_RANGES.get(f.name, (-math.inf, math.inf))
            if not lo <= v <= hi:
                raise NoduleSynthError(f"{what}: must be in [{lo:g}, {hi:g}]")


def check_finite(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """NaN/inf weights make blank or garbage images that would still be labelled: refuse them."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise NoduleSynthError(f"{path}: {len(bad)} tensor(s) hold NaN or inf values ({_brief(sorted(bad))}); "
                               "the weights are broken (a diverged or damaged training run)")


def save_module(module: nn.Module, config: Any, folder: str | Path, name: str,
                dtype: torch.dtype | None = None) -> Path:
    """Write ``folder/name.safetensors`` and ``folder/name.json`` atomically; returns the weights path.

    ``dtype`` (e.g. torch.float16 for shipping) casts floating tensors only; ``load_module``
    brings them back to the module's own dtype (fp32).
    """
    from safetensors.torch import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {}
    for k, v in module.state_dict().items():
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        state[k] = v.clone().contiguous()  # own storage: safetensors refuses shared tensors
    weights = folder / f"{name}.safetensors"
    with atomic_file(weights, "wb") as fh:
        fh.write(save(state, metadata={"format": "pt", "producer": "nodulesynth"}))
    write_json(folder / f"{name}.json", {
        "format": FORMAT, "version": FORMAT_VERSION, "class": type(module).__name__,
        "config_class": type(config).__name__, "config": dataclasses.asdict(config),
        "dtype": str(dtype or "as-trained").removeprefix("torch."),
        "num_parameters": sum(p.numel() for p in module.parameters()),
    })
    return weights


def read_config(config_cls: type, folder: str | Path, name: str) -> Any:
    """Rebuild the dataclass config saved beside ``name.safetensors``."""
    path = Path(folder) / f"{name}.json"
    if not path.is_file():
        raise NoduleSynthError(f"{path}: config file not found (expected beside {name}.safetensors)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NoduleSynthError(f"{path}: not a readable JSON config ({e})") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise NoduleSynthError(f"{path}: no 'config' object (not written by nodulesynth save_module)")
    if meta.get("config_class") not in (None, config_cls.__name__):
        raise NoduleSynthError(f"{path}: holds a {meta['config_class']}, expected a {config_cls.__name__}")
    known = {f.name for f in dataclasses.fields(config_cls)}
    # fields added since the file was written: what their absence means (else the dataclass default)
    values = {**getattr(config_cls, "ABSENT_MEANS", {}), **meta["config"]}
    unknown = sorted(set(values) - known)
    if unknown:
        raise NoduleSynthError(f"{path}: unknown {config_cls.__name__} fields {_brief(unknown)} "
                               "(written by a newer nodulesynth?)")
    check_config_values(config_cls, values, path)
    try:
        return config_cls(**values)
    except (TypeError, ValueError, NoduleSynthError) as e:
        raise NoduleSynthError(f"{path}: invalid {config_cls.__name__}: {e}") from e


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file to CPU tensors, with one clear error for missing / corrupt files."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise NoduleSynthError(f"{path}: weights file not found")
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # SafetensorError, OSError, ValueError, ...: all mean "not a valid file"
        raise NoduleSynthError(f"{path}: corrupt or not a safetensors file ({type(e).__name__}: {e})") from e


def load_module(cls: type[M], config_cls: type, folder: str | Path, name: str, device: str | torch.device = "cpu") -> M:
    """Rebuild ``cls(config)`` from ``folder/name.{json,safetensors}``; returned in eval mode on ``device``.

    Keys and shapes must match the architecture the config describes exactly; mismatches are
    listed briefly in the error. The architecture is first built on the "meta" device (no memory),
    so a config describing a huge network fails on the comparison, not on allocation. Every float
    tensor must be finite.
    """
    folder = Path(folder)
    weights = folder / f"{name}.safetensors"
    config = read_config(config_cls, folder, name)
    state = load_state(weights)
    try:
        with torch.device("meta"):
            own = cls(config).state_dict()
    except (NoduleSynthError, ValueError, TypeError, RuntimeError, AssertionError, ZeroDivisionError) as e:
        raise NoduleSynthError(f"{folder / f'{name}.json'}: the config does not describe a buildable "
                               f"{cls.__name__} ({type(e).__name__}: {e})") from e
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)}≠{tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"missing {_brief(missing)}" if missing else "", f"unexpected {_brief(unexpected)}" if unexpected else "",
                 f"wrong shapes {_brief(shapes)}" if shapes else ""]
        raise NoduleSynthError(f"{weights}: does not match the {cls.__name__} described by {name}.json: "
                               + "; ".join(p for p in parts if p))
    check_finite(state, weights)
    module = cls(config)
    own = module.state_dict()
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    return module.to(device).eval()


def sha256_files(paths: list[Path]) -> str:
    """Hex sha256 over the files' names and bytes (sorted by name): a content revision id."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        h.update(p.name.encode())
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
