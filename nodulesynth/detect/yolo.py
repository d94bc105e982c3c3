"""YOLO (ultralytics) training, validation and prediction for the detection benchmark.

ultralytics is AGPL-3.0 and an optional extra (``pip install -e ".[detect]"``, included in
``.[dev]``): this module and nothing else in the package imports it, and only inside functions,
so ``import nodulesynth`` never needs it.

Offline settings (measured, ../shared/setup.md): YOLO_OFFLINE=1 before import, a run-owned
YOLO_CONFIG_DIR with a pre-placed font, sync off, ``amp=False`` (its AMP check downloads a model).
Small-data pitfall: ultralytics accumulates gradients up to ``nbs`` (64) images per optimiser
step; the benchmark sets ``nbs = batch`` so every batch is one step and "equal optimiser steps"
means what it says.
"""
from __future__ import annotations

import contextlib
import io
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..errors import NoduleSynthError
from ..export.yolo import format_labels
from ..hu import window_uint8

DETECTORS = {"yolov8n": "yolov8n.yaml", "yolov5nu": "yolov5nu.yaml"}


@dataclass
class YoloConfig:
    """One training run. Defaults are the CPU-sized `patches` settings; the paper trains at 512²."""

    model: str = "yolov8n.yaml"  # architecture yaml (from scratch) or a local .pt to start from
    epochs: int = 10
    imgsz: int = 64
    batch: int = 32
    device: str = "cpu"
    seed: int = 0
    workers: int = 0
    lr0: float = 0.01
    warmup_epochs: float = 0.0
    mosaic: float = 0.0  # mosaic of 48² windows would invent nodules at window seams' scale
    fliplr: float = 0.5
    close_mosaic: int = 0

    def train_kwargs(self) -> dict:
        return dict(epochs=self.epochs, imgsz=self.imgsz, batch=self.batch, nbs=self.batch, device=self.device,
                    seed=self.seed, deterministic=True, workers=self.workers, lr0=self.lr0,
                    warmup_epochs=self.warmup_epochs, mosaic=self.mosaic, fliplr=self.fliplr,
                    close_mosaic=self.close_mosaic, amp=False, plots=False, val=False, verbose=False,
                    pretrained=self.starts_from_weights, exist_ok=True, cache=False)

    @property
    def starts_from_weights(self) -> bool:
        """A .pt starts from its weights; a yaml from scratch. ultralytics (8.4) builds the model anew
        and drops a loaded .pt's weights when ``pretrained=False``, so this must follow the model."""
        return not str(self.model).endswith((".yaml", ".yml"))


def offline(run_dir: str | os.PathLike) -> None:
    """Apply the offline settings before ultralytics is imported (see module docstring)."""
    from ..export.yolo import ultralytics_offline

    os.environ.setdefault("YOLO_VERBOSE", "False")  # progress comes from the benchmark's own lines
    try:
        ultralytics_offline(run_dir)
    except ModuleNotFoundError as e:
        raise NoduleSynthError(
            "the detection benchmark needs ultralytics (AGPL-3.0, optional): pip install -e \".[detect]\""
        ) from e


def write_images(root: Path, name: str, images_hu: np.ndarray, boxes: Sequence[np.ndarray]) -> list[str]:
    """Write windows as 8-bit lung-window PNGs + YOLO label files in ultralytics' layout
    (``root/images/<name>/i.png`` ↔ ``root/labels/<name>/i.txt``) → list of image paths."""
    im_dir, lb_dir = root / "images" / name, root / "labels" / name
    im_dir.mkdir(parents=True, exist_ok=True)
    lb_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (hu, b) in enumerate(zip(images_hu, boxes)):
        h, w = hu.shape
        p = im_dir / f"{i:06d}.png"
        Image.fromarray(window_uint8(hu)).save(p, compress_level=1)
        (lb_dir / f"{i:06d}.txt").write_text(format_labels(b, w, h))
        paths.append(str(p.resolve()))
    return paths


def write_data_yaml(path: Path, train: Sequence[str], val: Sequence[str]) -> Path:
    """data.yaml whose train/val are image-list files (so arms share one pool of written images)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tl, vl = path.with_name(path.stem + "_train.txt"), path.with_name(path.stem + "_val.txt")
    tl.write_text("\n".join(train) + "\n")
    vl.write_text("\n".join(val) + "\n")
    path.write_text(f"train: {tl.resolve()}\nval: {vl.resolve()}\nnc: 1\nnames:\n  0: nodule\n")
    return path


@contextlib.contextmanager
def _quiet(enabled: bool = True):
    if not enabled:
        yield
        return
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        yield


def train(data_yaml: Path, run_dir: Path, cfg: YoloConfig, quiet: bool = True) -> Path:
    """Train one model; returns the path of the final weights (last.pt: no selection on any test set)."""
    offline(run_dir)
    from ultralytics import YOLO

    run_dir.mkdir(parents=True, exist_ok=True)
    model = YOLO(cfg.model)
    with _quiet(quiet):
        model.train(data=str(data_yaml), project=str(run_dir), name="train", **cfg.train_kwargs())
    last = run_dir / "train" / "weights" / "last.pt"
    if not last.is_file():
        raise NoduleSynthError(f"{run_dir}: ultralytics finished without {last.name}")
    return last


def validate(weights: Path, data_yaml: Path, cfg: YoloConfig, quiet: bool = True) -> dict:
    """Ultralytics' own P, R, mAP50, mAP50-95 of ``weights`` on the val split of ``data_yaml``
    (only this benchmark's own checkpoints are loaded: ultralytics .pt files are pickles)."""
    from ultralytics import YOLO

    model = YOLO(str(weights))
    with _quiet(quiet):
        r = model.val(data=str(data_yaml), split="val", imgsz=cfg.imgsz, batch=cfg.batch, device=cfg.device,
                      plots=False, verbose=False, workers=cfg.workers, project=str(Path(weights).parents[2]),
                      name="val", exist_ok=True)
    return {"precision": float(r.box.mp), "recall": float(r.box.mr), "map50": float(r.box.map50),
            "map50_95": float(r.box.map)}


def predict(weights: Path, images_hu: Sequence[np.ndarray], cfg: YoloConfig, conf: float = 0.001,
            batch: int = 64) -> list[tuple[np.ndarray, np.ndarray]]:
    """Detections per image: (boxes xyxy (K,4) float32, scores (K,)) at a low confidence floor
    (FROC sweeps the threshold itself)."""
    from ultralytics import YOLO

    model = YOLO(str(weights))
    out: list[tuple[np.ndarray, np.ndarray]] = []
    for s in range(0, len(images_hu), batch):
        ims = [np.repeat(window_uint8(h)[..., None], 3, axis=2) for h in images_hu[s : s + batch]]
        for r in model.predict(ims, imgsz=cfg.imgsz, conf=conf, device=cfg.device, verbose=False):
            out.append((r.boxes.xyxy.cpu().numpy().astype(np.float32), r.boxes.conf.cpu().numpy().astype(np.float32)))
    return out


def versions() -> dict:
    """Versions of what the detection numbers depend on (for the result JSON)."""
    import platform

    import torch

    v = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
         "nodulesynth_git": git_revision()}
    # ultralytics reads, resizes and augments through OpenCV and PIL, and the windows are resampled with
    # SciPy, so these are recorded too (2026-12-07: after the environment was rebuilt with the same four
    # versions above, the same real-only fold gave 0.113 mAP50-95 instead of 0.096)
    for name, module in (("ultralytics", "ultralytics"), ("opencv", "cv2"), ("pillow", "PIL"), ("scipy", "scipy")):
        try:
            v[name] = __import__(module).__version__
        except ModuleNotFoundError:
            v[name] = None
    return v


def git_revision() -> str | None:
    """Commit of the checkout the benchmark runs from (+ "-dirty" with uncommitted changes), or None."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if rev.returncode:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev.stdout.strip()[:12] + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def config_dict(cfg: YoloConfig) -> dict:
    return asdict(cfg)
