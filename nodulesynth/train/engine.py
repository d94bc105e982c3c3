"""What both trainers share: the training loop (:class:`Trainer`), run folders, exact checkpoints,
data order, metrics, stop signals, DDP.

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

Never train on garbage: a checkpoint whose tensors hold NaN/inf is neither written nor resumed
from, and a non-finite loss stops the run with one clear error, keeping the last good checkpoint.
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
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save as st_save
from tqdm.auto import tqdm

from ..errors import NoduleSynthError
from ..io import atomic_dir, atomic_file, check_out_dir, mark_dir, write_json
from ..runtime import resolve_device

log = logging.getLogger("nodulesynth.train")

CKPT_DIR = "checkpoints"
_STEP_RE = re.compile(r"^step-(\d{8})$")


# ----------------------------------------------------------------------------- distributed
def opt(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING,  # noqa: A002
        **cli: Any) -> Any:
    """A config field with its CLI help (``train.cli`` builds each flag from the field, so every
    default is written once, here). ``cli`` keys: ``flag`` (name other than ``--field-name``),
    ``choices``, ``none_if`` (a CLI value meaning None), ``append`` (repeatable flag), ``cli=False``."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"help": help, **cli})


@dataclasses.dataclass
class RunConfig:
    """What every training run has: where data and run folder are, when to checkpoint and stop."""

    data: str | list[str] = opt(help="prepared slice dataset folder (nodulesynth prepare); repeat for several",
                                append=True)
    out: str = opt(help="run folder (checkpoints, samples, metrics.csv, export/)")
    split: str = opt("train", "which split of each dataset to train on (train, val, test or all); datasets "
                     "prepared without splits are split by patient here", choices=("train", "val", "test", "all"))
    data_weights: str | None = opt(None, "share of the draws per --data folder, e.g. 1,3 (default: by size)")
    checkpoint_every: int = opt(1000, "steps between checkpoints")
    log_every: int = opt(50, "steps between metrics rows")
    seed: int = opt(0, "seed of weights, data order and augmentation")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")
    amp: bool = opt(True, "bf16 autocast on CUDA (no-op on CPU)")
    max_steps: int | None = opt(None, "stop (checkpoint + export) at this global step")
    time_budget_s: float | None = opt(None, "stop (checkpoint + export) after this many seconds", flag="--time-budget")
    keep_checkpoints: int = opt(3, "newest checkpoints kept")
    resume: bool = opt(False, "continue from the latest checkpoint in --out")
    overwrite: bool = opt(False, "replace an existing non-empty --out")


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


# ----------------------------------------------------------------------------- fine-tuning
def init_folder(init_weights: str, name: str) -> Path:
    """``--init-weights``: the weights folder holding network ``name`` ("pretrained": the shipped one;
    a TSGAN folder or a run's export/)."""
    from ..models.tsgan import DEFAULT_WEIGHTS_DIR

    folder = Path(DEFAULT_WEIGHTS_DIR) if init_weights == "pretrained" else Path(init_weights).expanduser()
    if not (folder / f"{name}.safetensors").is_file():
        raise NoduleSynthError(f"--init-weights {init_weights}: no {name}.safetensors in {folder}")
    return folder


def init_config(init_weights: str, config_cls, name: str):
    """``--init-weights``: the config of network ``name`` in a weights folder (to check or adopt its
    architecture before anything is written)."""
    from ..models.io import read_config

    return read_config(config_cls, init_folder(init_weights, name), name)


def load_init_module(init_weights: str, cls, config_cls, name: str):
    """``--init-weights``: network ``name`` of a weights folder, safetensors only, fp32, in training mode."""
    from ..models.io import load_module

    return load_module(cls, config_cls, init_folder(init_weights, name), name).float().train()


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


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating tensors that hold NaN or inf."""
    return [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def save_checkpoint(out: Path, step: int, state: dict[str, Any], keep: int = 3) -> Path:
    """Write ``state`` (nested, with tensors) atomically as step-XXXXXXXX; keep the newest ``keep``.
    Refuses (NoduleSynthError) state with NaN/inf tensors: it would replace a good checkpoint."""
    tensors: dict[str, torch.Tensor] = {}
    structure = pack_state(state, tensors)
    bad = non_finite(tensors)
    if bad:
        raise NoduleSynthError(f"step {step}: training diverged (NaN/inf in {_brief(bad)}); not checkpointed, the "
                               f"last good checkpoint is {latest_checkpoint(out) or 'none'}")
    path = checkpoint_path(out, step)
    with atomic_dir(path, overwrite=True, arg="checkpoint",  # checkpoints from before the marker count as ours
                    ours=lambda p: (p / "state.json").is_file()) as tmp:
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
    if not isinstance(meta, dict) or meta.get("format") != "nodulesynth-checkpoint" or "state" not in meta:
        raise NoduleSynthError(f"checkpoint {path}: not a nodulesynth checkpoint (no format/state in state.json)")
    bad = non_finite(tensors)
    if bad:
        raise NoduleSynthError(f"checkpoint {path}: NaN/inf in {_brief(bad)}; refusing to train on (and overwrite "
                               "the export with) diverged weights — start over or resume from an earlier run")
    try:
        return unpack_state(meta["state"], tensors)
    except (KeyError, TypeError, ValueError) as e:
        raise NoduleSynthError(f"checkpoint {path}: state.json does not match state.safetensors ({e})") from e


def _brief(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


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
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            raise NoduleSynthError(f"--out {out}: folder exists and is not empty (pass --resume or --overwrite)")
        data = getattr(cfg, "data", None)
        data = [data] if data is None or isinstance(data, (str, os.PathLike)) else list(data)
        # refuses an --out that is/holds/lies inside a --data folder, one it cannot write, and (with
        # --overwrite) a non-empty folder the project did not write
        check_out_dir(out, overwrite, inputs=[("--data", d) for d in data])
        if out.is_dir() and any(out.iterdir()):
            shutil.rmtree(out)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        mark_dir(out)
        write_json(out / "config.json", cfg_dict)
    if info.enabled:
        dist.barrier()
    return out, ckpt


# ----------------------------------------------------------------------------- data order
class IndexStream:
    """An endless, resumable stream of dataset indices; the state is just ``(epoch, pos)``.

    Epoch ``e`` is a permutation, seeded by ``(seed, e)``, of the epoch's index list, dealt to the
    ranks round-robin (each rank gets ``len // world_size``; the rest is dropped, as DistributedSampler
    with drop_last). Without ``groups`` the list is ``indices``. With ``groups`` (the source dataset of
    each index) and ``weights``, the list holds ``len(indices)`` draws with group ``g``'s share
    ``weights[g] / sum(weights)``: each group's indices in a fresh seeded order, repeated as often as
    needed (a small dataset is over-sampled, a large one sub-sampled, differently each epoch).
    Each index comes with a per-sample seed derived from (seed, epoch, position in the epoch), so
    random crops and augmentations are reproducible independent of DataLoader workers."""

    def __init__(self, indices: np.ndarray, seed: int, info: DistInfo, groups: np.ndarray | None = None,
                 weights: list[float] | None = None) -> None:
        self.indices = np.asarray(indices, dtype=np.int64)
        if len(self.indices) < info.world_size:
            raise NoduleSynthError(f"--data: {len(self.indices)} training slices, fewer than {info.world_size} processes")
        self.groups = None if groups is None else np.asarray(groups, dtype=np.int64)
        if self.groups is not None and len(self.groups) != len(self.indices):
            raise ValueError("IndexStream: groups must be as long as indices")
        self.weights = None if weights is None else [float(w) for w in weights]
        self.seed, self.rank, self.world = seed, info.rank, info.world_size
        self.epoch, self.pos = 0, 0
        self._order, self._slot = self._epoch_order(0)

    def _epoch_list(self, epoch: int) -> np.ndarray:
        if self.groups is None or self.weights is None:
            return self.indices
        n, total = len(self.indices), sum(self.weights)
        present = [g for g in range(len(self.weights)) if (self.groups == g).any() and self.weights[g] > 0]
        raw = np.array([self.weights[g] / total * n for g in present])
        counts = np.floor(raw).astype(int)
        for k in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
            counts[k] += 1
        parts = []
        for g, k in zip(present, counts):
            members = self.indices[self.groups == g]
            rng = np.random.default_rng([self.seed, epoch, g, 7])
            reps = -(-int(k) // len(members))
            parts.append(np.concatenate([members[rng.permutation(len(members))] for _ in range(reps)])[:k])
        return np.concatenate(parts)

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        items = self._epoch_list(epoch)
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(items))
        per_rank = len(items) // self.world
        slots = perm[: per_rank * self.world][self.rank::self.world]
        return items[slots], slots

    @property
    def per_epoch(self) -> int:
        return len(self._order)

    def take(self, n: int) -> list[tuple[int, int]]:
        """Next ``n`` (dataset index, sample seed) pairs, crossing epoch boundaries."""
        out = []
        while len(out) < n:
            if self.pos >= len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order, self._slot = self._epoch_order(self.epoch)
            idx, slot = int(self._order[self.pos]), int(self._slot[self.pos])
            out.append((idx, int(np.random.SeedSequence([self.seed, self.epoch, slot]).generate_state(1)[0])))
            self.pos += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order, self._slot = self._epoch_order(self.epoch)


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


# ----------------------------------------------------------------------------- the loop
class Trainer:
    """The training loop both stages share (shaped like ultralytics' ``BaseTrainer``): run folder,
    resume, stop signals, time budget, finiteness checks, metrics, checkpoints, export.

    A stage subclasses it and supplies small hooks, each testable alone:

    - ``setup()``: open and check the data. Runs before the run folder is touched, so bad input
      leaves nothing behind.
    - ``build()``: models and optimisers. Runs right after seeding RNG stream 0 (the same initial
      weights on every rank); training then draws from stream 1 (per rank).
    - ``total_steps()``: length of the whole schedule.
    - ``batches(step, stop_at)``: an iterable of the batches for steps ``step .. stop_at-1``.
    - ``train_step(batch)``: one optimisation step → ``{name: loss tensor}`` (not synced).
    - ``state_dict()`` / ``load_state_dict(state)``: what a checkpoint holds besides step and RNG;
      its data position must be the one after the last batch ``train_step`` consumed.
    - ``log_values(losses)``: the metrics row (floats) at a logging step.
    - ``evaluate()`` (every ``eval_every`` steps, optional) and ``preview()`` (at each checkpoint,
      optional) run inside :func:`rng_neutral`, so they never change training randomness.
    - ``export()``, ``run_meta()``: final weights under ``out/export``; what ``run.json`` records.

    ``self.step`` is the number of finished steps; ``self.device``, ``self.info``, ``self.out``
    are set before ``setup``/``build`` run.
    """

    name = "train"
    metric_fields: tuple[str, ...] = ()
    eval_every: int | None = None

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.info, self.device = DistInfo(), torch.device("cpu")
        self.out = Path(cfg.out)
        self.step = 0
        self.last_eval: dict[str, float] = {}

    # ---- hooks (stages override)
    def setup(self) -> None:
        raise NotImplementedError

    def build(self) -> None:
        raise NotImplementedError

    def total_steps(self) -> int:
        raise NotImplementedError

    def batches(self, step: int, stop_at: int) -> Iterable[Any]:
        raise NotImplementedError

    def train_step(self, batch: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def batch_images(self, batch: Any) -> int:
        """Images in ``batch`` on this rank (for the images/s metric)."""
        return len(batch[0])

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def wrap(self) -> None:
        """After resume, before the loop: wrap models for DDP (nothing when not distributed)."""

    def log_values(self, losses: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {k: v.item() for k, v in losses.items()}

    def evaluate(self) -> dict[str, float]:
        return {}

    def preview(self) -> None:
        pass

    def export(self) -> None:
        raise NotImplementedError

    def run_meta(self) -> dict[str, Any]:
        return {"trainer": self.name, "world_size": self.info.world_size, "device": str(self.device)}

    # ---- the loop
    def rng_neutral(self):
        """Context in which random draws do not advance the training RNG streams."""
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])

    def fit(self) -> Path:
        """Train until the schedule, ``max_steps`` or the time budget ends (checkpoint + export) or a
        signal arrives (checkpoint only); returns the run folder."""
        cfg = self.cfg
        self.info, self.device = init_distributed(cfg.device)
        self.setup()
        self.out, ckpt = prepare_run(cfg.out, cfg, cfg.resume, cfg.overwrite, self.info)
        seed_everything(cfg.seed)
        self.build()
        seed_everything(cfg.seed, self.info.rank, stream=1)
        if ckpt is not None:
            self.resume_from(ckpt)
        self.wrap()
        total = self.total_steps()
        stop_at = min(total, cfg.max_steps) if cfg.max_steps is not None else total
        main = self.info.is_main
        metrics = Metrics(self.out, [*self.metric_fields, "imgs_per_s"], resume_step=self.step if ckpt else None,
                          enabled=main)
        bar = tqdm(total=stop_at, initial=self.step, disable=not main, desc=self.name, dynamic_ncols=True)
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        checked = self.step
        t0 = t_last = time.monotonic()
        n_img, stopped = 0, False
        try:
            with StopSignal() as stop:
                for batch in self.batches(self.step, stop_at):
                    losses = self.train_step(batch)
                    self.step += 1
                    step = self.step
                    n_img += self.batch_images(batch) * self.info.world_size
                    finite &= torch.stack([torch.isfinite(v.detach().float()).all() for v in losses.values()]).all()
                    bar.update(1)
                    evaluated = bool(self.eval_every) and (step % self.eval_every == 0 or step == stop_at)
                    logged = evaluated or step % cfg.log_every == 0 or step == stop_at
                    out_of_time = any_rank(cfg.time_budget_s is not None and time.monotonic() - t0 > cfg.time_budget_s,
                                           self.info, self.device)
                    stopped = any_rank(stop.requested, self.info, self.device)
                    saving = stopped or out_of_time or step % cfg.checkpoint_every == 0 or step == stop_at
                    if logged or saving:  # one sync: .item() of the flag
                        self._check_finite(finite, checked, losses)
                        checked = step
                    if evaluated and main:
                        with self.rng_neutral(), torch.no_grad():
                            self.last_eval = self.evaluate()
                    if logged and main:
                        now = time.monotonic()
                        values = self.log_values(losses)
                        metrics.log(step, {**values, **(self.last_eval if evaluated else {}),
                                           "imgs_per_s": n_img / max(now - t_last, 1e-9)})
                        bar.set_postfix({k: f"{v:.3g}" for k, v in values.items() if k in losses})
                        t_last, n_img = now, 0
                    if saving:
                        self.save()
                    if stopped or out_of_time:
                        break
        finally:
            bar.close()
            metrics.close()
        if main and not stopped:
            self.export()
            write_json(self.out / "run.json", {**self.run_meta(), "step": self.step})
        log.info("%s training stopped at step %d/%d (%s)", self.name, self.step, total, self.out)
        return self.out

    def resume_from(self, ckpt: Path) -> None:
        """Load a checkpoint (finite tensors only, see :func:`load_checkpoint`) into the stage."""
        st = load_checkpoint(ckpt)
        try:
            self.load_state_dict(st)
            set_rng_state(st["rng"])
            self.step = int(st["step"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise NoduleSynthError(f"--resume: checkpoint {ckpt} does not fit this run ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0] if str(e) else ''})") from e
        log.info("resumed from %s (step %d)", ckpt, self.step)

    def _check_finite(self, finite: torch.Tensor, since: int, losses: dict[str, torch.Tensor]) -> None:
        if not any_rank(not bool(finite), self.info, self.device):
            return
        names = [k for k, v in losses.items() if not bool(torch.isfinite(v.detach()).all())] or list(losses)
        raise NoduleSynthError(
            f"{self.name} training diverged: loss NaN/inf between steps {since} and {self.step} (now: {', '.join(names)}); "
            f"stopped without checkpointing — the last good checkpoint is {latest_checkpoint(self.out) or 'none'} "
            "(resume from it with a lower --lr, or start over)")

    def save(self) -> None:
        """Checkpoint (exact state + RNG), preview and run.json, on the main process."""
        if not self.info.is_main:
            return
        save_checkpoint(self.out, self.step, {"step": self.step, **self.state_dict(), "rng": rng_state()},
                        keep=self.cfg.keep_checkpoints)
        with self.rng_neutral(), torch.no_grad():
            self.preview()
        write_json(self.out / "run.json", {**self.run_meta(), "step": self.step})


# ----------------------------------------------------------------------------- export
# Assembling a TSGAN folder (and its model card) lives in the models package; re-exported here
# for `train export` and old imports.
from ..models.export import export_tsgan  # noqa: E402,F401
