"""What both trainers share: run folders, exact checkpoints, data order, metrics, stop signals, DDP.

Checkpoint format (no pickles): ``out/checkpoints/step-XXXXXXXX/`` holds ``state.safetensors``
(every tensor: model weights, optimiser moments, RNG states) and ``state.json`` (everything else:
step counters, optimiser param groups, the data position, python/numpy RNG). Nested Python state
is flattened by :func:`pack_state`: each tensor is replaced in the JSON by ``{"__tensor__": key}``
and stored under that key, so an optimiser's ``state_dict`` round-trips exactly. The folder is
written atomically (temp folder + rename), so a crash never leaves a half checkpoint behind and
"latest checkpoint" is simply the highest complete step folder.

Exact resume rests on three rules: all randomness comes from the global torch/numpy/python RNGs
(saved) or from generators seeded by ``(seed, epoch, index)`` (recomputed); evaluation/sampling
runs inside ``torch.random.fork_rng`` so it never perturbs training randomness; and the data order
is a pure function of ``(seed, epoch)`` plus a saved position (:class:`IndexStream`).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save as st_save

from ..errors import NoduleSynthError
from ..io import atomic_dir, atomic_file, write_json
from ..runtime import resolve_device

log = logging.getLogger("nodulesynth.train")

CKPT_DIR = "checkpoints"
_STEP_RE = re.compile(r"^step-(\d{8})$")


# ----------------------------------------------------------------------------- distributed
@dataclasses.dataclass
class RunConfig:
    """What every training run has: where data and run folder are, when to checkpoint and stop."""

    data: str
    out: str
    checkpoint_every: int = 1000
    log_every: int = 50
    seed: int = 0
    device: str = "auto"
    amp: bool = True                  # bf16 autocast on CUDA (no-op on CPU)
    max_steps: int | None = None      # stop (checkpoint + export) at this global step
    time_budget_s: float | None = None
    keep_checkpoints: int = 3
    resume: bool = False
    overwrite: bool = False


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Process topology; world_size 1 when not launched by torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str) -> tuple[DistInfo, torch.device]:
    """Under torchrun (WORLD_SIZE>1) join the process group (NCCL on CUDA, gloo on CPU) and pin
    this rank to its local GPU; otherwise resolve ``device`` as usual."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), resolve_device(device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and str(device) != "cpu"
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local), torch.device(f"cuda:{local}" if use_cuda else "cpu")


def wrap_ddp(module: torch.nn.Module, info: DistInfo, device: torch.device, find_unused: bool = False):
    """DistributedDataParallel when distributed, the module itself otherwise."""
    if not info.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(module, device_ids=ids, find_unused_parameters=find_unused)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "module", module)


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank if it is true on any (so all ranks stop at the same step)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


# ----------------------------------------------------------------------------- stop signal
class StopSignal:
    """Context manager: the first SIGINT/SIGTERM sets ``requested`` (the loop then checkpoints and
    exits cleanly); a second one raises KeyboardInterrupt as usual."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame):  # noqa: ARG002
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stop requested (signal %d): checkpointing and exiting after this step", signum)

    def __enter__(self) -> "StopSignal":
        try:
            for s in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(s) is not signal.SIG_IGN:  # respect nohup / background jobs
                    self._old[s] = signal.signal(s, self._handler)
        except ValueError:  # not the main thread: no handlers, Ctrl-C behaves as usual
            self._old = {}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------- state packing
def pack_state(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "") -> Any:
    """Nested dict/list/tuple with tensors/ndarrays → JSON-able structure; tensors go to ``tensors``."""
    if isinstance(obj, torch.Tensor):
        key = _unique(prefix, tensors)
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = _unique(prefix, tensors)
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).copy())
        return {"__ndarray__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: pack_state(v, tensors, f"{prefix}.{k}" if prefix else k) for k, v in obj.items()}
        return {"__items__": [[k, pack_state(v, tensors, f"{prefix}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [pack_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [pack_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {prefix!r}")


def _unique(key: str, tensors: dict[str, torch.Tensor]) -> str:
    key = key or f"t{len(tensors)}"
    return key if key not in tensors else f"{key}#{len(tensors)}"


def unpack_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`pack_state`."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy()
        if "__tuple__" in obj:
            return tuple(unpack_state(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {(k if not isinstance(k, list) else tuple(k)): unpack_state(v, tensors) for k, v in obj["__items__"]}
        return {k: unpack_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unpack_state(v, tensors) for v in obj]
    return obj


def rng_state() -> dict[str, Any]:
    """Global RNG states of python, numpy, torch CPU and every CUDA device."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def seed_everything(seed: int, rank: int = 0, stream: int = 0) -> None:
    """Seed all global RNGs from (seed, stream, rank). Models are built with stream 0 on every rank
    (identical replicas); training then uses stream 1, which differs per rank (different latents,
    dropout) and does not replay the numbers drawn for the initial weights."""
    s = int(np.random.SeedSequence([seed, stream, rank]).generate_state(1)[0])
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


# ----------------------------------------------------------------------------- checkpoints
def checkpoint_path(out: Path, step: int) -> Path:
    return Path(out) / CKPT_DIR / f"step-{step:08d}"


def list_checkpoints(out: str | os.PathLike) -> list[Path]:
    root = Path(out) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_RE.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


def save_checkpoint(out: Path, step: int, state: dict[str, Any], keep: int = 3) -> Path:
    """Write ``state`` (nested, with tensors) atomically as step-XXXXXXXX; keep the newest ``keep``."""
    tensors: dict[str, torch.Tensor] = {}
    structure = pack_state(state, tensors)
    path = checkpoint_path(out, step)
    with atomic_dir(path, overwrite=True, arg="checkpoint") as tmp:
        with atomic_file(tmp / "state.safetensors", "wb") as fh:
            fh.write(st_save(tensors))
        write_json(tmp / "state.json", {"format": "nodulesynth-checkpoint", "version": 1, "step": step, "state": structure})
    for old in list_checkpoints(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint folder written by :func:`save_checkpoint` (clear error when damaged)."""
    path = Path(path)
    try:
        meta = json.loads((path / "state.json").read_text())
        tensors = st_load_file(str(path / "state.safetensors"))
    except (OSError, ValueError, json.JSONDecodeError) as e:  # safetensors raises SafetensorError(Exception)
        raise NoduleSynthError(f"checkpoint {path}: cannot be read ({e})") from e
    except Exception as e:  # noqa: BLE001 - safetensors' own error type
        raise NoduleSynthError(f"checkpoint {path}: corrupt safetensors file ({e})") from e
    if meta.get("format") != "nodulesynth-checkpoint":
        raise NoduleSynthError(f"checkpoint {path}: not a nodulesynth checkpoint")
    return unpack_state(meta["state"], tensors)


# ----------------------------------------------------------------------------- run folder
def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Dataclass config → JSON-able dict (Paths as str, tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def prepare_run(out: str | os.PathLike, cfg: Any, resume: bool, overwrite: bool, info: DistInfo,
                compare: Iterable[str] = ("model",)) -> tuple[Path, Path | None]:
    """Create/validate the run folder; returns (out, checkpoint to resume from or None).

    Resuming checks that the fields in ``compare`` (the architecture) match the saved config,
    since weights of another architecture cannot be loaded; other fields (max_steps, ...) may change."""
    out = Path(out)
    ckpt = latest_checkpoint(out) if resume else None
    if resume and ckpt is None:
        raise NoduleSynthError(f"--resume: no checkpoint found under {out / CKPT_DIR}")
    cfg_dict = config_to_dict(cfg)
    if ckpt is not None:
        saved = json.loads((out / "config.json").read_text()) if (out / "config.json").is_file() else {}
        for key in compare:
            if key in saved and saved[key] != cfg_dict.get(key):
                raise NoduleSynthError(f"--resume: {key} config differs from the one saved in {out / 'config.json'}")
    elif info.is_main:
        if out.is_dir() and any(out.iterdir()):
            if not overwrite:
                raise NoduleSynthError(f"--out {out}: folder exists and is not empty (pass --resume or --overwrite)")
            shutil.rmtree(out)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", cfg_dict)
    if info.enabled:
        dist.barrier()
    return out, ckpt


# ----------------------------------------------------------------------------- data order
class IndexStream:
    """An endless, resumable stream of dataset indices: epoch ``e`` is the DistributedSampler
    permutation for ``(seed, e)`` (this rank's share); the state is just ``(epoch, pos)``.
    Each index comes with a per-sample seed derived from (seed, epoch, index), so random crops and
    augmentations are reproducible independent of DataLoader workers."""

    def __init__(self, indices: np.ndarray, seed: int, info: DistInfo) -> None:
        from torch.utils.data import DistributedSampler

        self.indices = np.asarray(indices, dtype=np.int64)
        if len(self.indices) < info.world_size:
            raise NoduleSynthError(f"--data: {len(self.indices)} training slices, fewer than {info.world_size} processes")
        self.seed = seed
        self._sampler = DistributedSampler(range(len(self.indices)), num_replicas=info.world_size, rank=info.rank,
                                           shuffle=True, seed=seed, drop_last=True)
        self.epoch, self.pos = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        self._sampler.set_epoch(epoch)
        return self.indices[np.fromiter(iter(self._sampler), dtype=np.int64)]

    @property
    def per_epoch(self) -> int:
        return len(self._order)

    def take(self, n: int) -> list[tuple[int, int]]:
        """Next ``n`` (dataset index, sample seed) pairs, crossing epoch boundaries."""
        out = []
        while len(out) < n:
            if self.pos >= len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            idx = int(self._order[self.pos])
            out.append((idx, int(np.random.SeedSequence([self.seed, self.epoch, idx]).generate_state(1)[0])))
            self.pos += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._epoch_order(self.epoch)


# ----------------------------------------------------------------------------- metrics
class Metrics:
    """metrics.csv (one row per logged step; rows after a resumed checkpoint are dropped so the file
    matches an uninterrupted run) and TensorBoard scalars when tensorboard is installed."""

    def __init__(self, out: Path, fields: list[str], resume_step: int | None, enabled: bool = True) -> None:
        self.path, self.fields, self.enabled = Path(out) / "metrics.csv", ["step", *fields], enabled
        self._tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= resume_step]
        else:
            rows = []
        with atomic_file(self.path, "w") as fh:
            w = csv.DictWriter(fh, fieldnames=self.fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        try:
            import tensorboard  # noqa: F401  (the writer needs the package, not just torch)
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(out) / "tensorboard"), purge_step=resume_step)
        except Exception:  # noqa: BLE001 - optional
            self._tb = None

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in values.items()}}
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=self.fields, extrasaction="ignore").writerow(row)
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


# ----------------------------------------------------------------------------- export
def export_tsgan(mask_run: str | os.PathLike, translator_run: str | os.PathLike, out: str | os.PathLike,
                 model_card_extra: str | None = None, overwrite: bool = False) -> Path:
    """Assemble a TSGAN folder (``TSGAN.save_pretrained`` layout) from two finished runs' exports."""
    from ..models.io import load_module
    from ..models.pix2pix import DLPix2PixGenerator, TranslatorConfig
    from ..models.stylegan import MaskGANConfig, MaskGenerator
    from ..models.tsgan import TSGAN

    mask_run, translator_run, out = Path(mask_run), Path(translator_run), Path(out)
    for run, name, arg in ((mask_run, "mask_generator", "--masks"), (translator_run, "translator", "--translator")):
        if not (run / "export" / f"{name}.safetensors").is_file():
            raise NoduleSynthError(f"{arg} {run}: no export/{name}.safetensors (train it to the end or until max_steps first)")
    mask_g = load_module(MaskGenerator, MaskGANConfig, mask_run / "export", "mask_generator")
    translator = load_module(DLPix2PixGenerator, TranslatorConfig, translator_run / "export", "translator")
    meta: dict[str, Any] = {"mask_run": str(mask_run), "translator_run": str(translator_run)}
    for key, run in (("mask_training", mask_run), ("translator_training", translator_run)):
        if (run / "run.json").is_file():
            meta[key] = json.loads((run / "run.json").read_text())
    image_size = meta.get("translator_training", {}).get("image_size", 512)
    model = TSGAN(mask_g, translator, {**meta, "image_size": image_size})
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise NoduleSynthError(f"--out {out}: folder exists and is not empty (pass --overwrite to replace it)")
    model.save_pretrained(out, model_card=_model_card(meta, model_card_extra), overwrite=overwrite)
    return out


def _model_card(meta: dict[str, Any], extra: str | None) -> str:
    tr = meta.get("translator_training", {})
    mk = meta.get("mask_training", {})
    lines = [
        "# TSGAN (nodulesynth)",
        "",
        "Two-stage GAN for synthetic lung-nodule CT slices: a progressive StyleGAN draws 6-class semantic",
        "masks (background, body, left lung, right lung, trachea, nodule); DL-Pix2Pix (UNet + LIA + DWMH)",
        "translates a mask into a CT slice (HU mapped to [-1, 1]).",
        "",
        "## Training",
        f"- mask StyleGAN: steps {mk.get('step', '?')}, real nodule rate {mk.get('real_nodule_rate', '?')},"
        f" sampled nodule rate {mk.get('ema_nodule_rate', '?')}",
        f"- translator: steps {tr.get('step', '?')}, perceptual loss: {tr.get('perceptual', '?')}",
    ]
    if extra:
        lines += ["", extra.strip()]
    return "\n".join(lines) + "\n"
