"""Ultralytics (YOLO) export: images/{train,val}/*.png, labels/{train,val}/*.txt, data.yaml.

Labels are one line per nodule: ``0 cx cy w h`` normalised to [0,1]. Images are 8-bit lung-window
PNGs (ultralytics reads 8-bit images). ``data.yaml`` holds the folder's final absolute ``path`` so
``YOLO("yolov8n.yaml").train(data=".../data.yaml")`` works unchanged; ``ultralytics_offline`` applies
the settings that let ultralytics run with no network (see /work/shared/setup.md).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from ..io import atomic_file
from ..masks.boxes import xyxy_to_yolo, yolo_to_xyxy
from .coco import ParallelEncoder, encode_image

SPLITS = ("train", "val")


def format_labels(boxes: np.ndarray, width: int, height: int) -> str:
    """YOLO label text (class 0) for xyxy pixel boxes."""
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    if not len(b):
        return ""
    y = np.clip(np.asarray(xyxy_to_yolo(b, width, height), np.float64), 0, 1)
    return "".join(f"0 {cx:.7f} {cy:.7f} {w:.7f} {h:.7f}\n" for cx, cy, w, h in y)


def read_labels(path: str | os.PathLike, width: int, height: int) -> np.ndarray:
    """YOLO label file → xyxy pixel boxes (K,4) float32 (inverse of ``format_labels``)."""
    rows = [line.split() for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows:
        return np.zeros((0, 4), np.float32)
    a = np.array([[float(v) for v in r[1:5]] for r in rows], np.float32)
    return np.asarray(yolo_to_xyxy(a, width, height), np.float32).reshape(-1, 4)


class YoloWriter:
    """Writes an ultralytics detection dataset; ``close()`` writes data.yaml pointing at ``final_root``
    (where the folder will live after the atomic rename)."""

    def __init__(self, root: str | os.PathLike, final_root: str | os.PathLike | None = None,
                 encoder: ParallelEncoder | None = None):
        self.root = Path(root)
        self.final_root = Path(final_root or root).resolve()
        for s in SPLITS:
            (self.root / "images" / s).mkdir(parents=True, exist_ok=True)
            (self.root / "labels" / s).mkdir(parents=True, exist_ok=True)
        self.encoder = encoder or ParallelEncoder()
        self._own_encoder = encoder is None
        self.counts = {s: 0 for s in SPLITS}

    def add(self, name: str, hu: np.ndarray, boxes: np.ndarray, split: str = "train") -> None:
        if split not in SPLITS:
            raise ValueError(f"split {split!r} not in {SPLITS}")
        H, W = np.asarray(hu).shape
        self.encoder.submit(encode_image, self.root / "images" / split / f"{name}.png", hu, "png")
        (self.root / "labels" / split / f"{name}.txt").write_text(format_labels(boxes, W, H))
        self.counts[split] += 1

    def close(self) -> Path:
        self.encoder.wait()
        if self._own_encoder:
            self.encoder.close()
        val = "images/val" if self.counts["val"] else "images/train"  # ultralytics requires a val set
        path = self.root / "data.yaml"
        with atomic_file(path, "w") as fh:
            fh.write(
                "# written by nodulesynth; train with YOLO('yolov8n.yaml').train(data='data.yaml')\n"
                f"path: {json.dumps(self.final_root.as_posix())}\ntrain: images/train\nval: {val}\n"
                "nc: 1\nnames:\n  0: nodule\n"
            )
        return path


def ultralytics_offline(run_dir: str | os.PathLike):
    """Make ultralytics run offline and inside ``run_dir``: YOLO_OFFLINE=1 (before import),
    YOLO_CONFIG_DIR=run_dir/ultralytics-config with a pre-placed font (matplotlib's DejaVuSans as
    Arial.ttf, so no font download), and settings sync off. Returns ultralytics' settings object."""
    run_dir = Path(run_dir)
    cfg = run_dir / "ultralytics-config"
    (cfg / "Ultralytics").mkdir(parents=True, exist_ok=True)
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_CONFIG_DIR"] = str(cfg)
    font = cfg / "Ultralytics" / "Arial.ttf"
    if not font.exists():
        import matplotlib

        shutil.copyfile(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf", font)
    from ultralytics import settings

    settings.update({"sync": False})
    return settings
