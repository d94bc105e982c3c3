"""Ultralytics (YOLO) export: images/{train,val}/*.png, labels/{train,val}/*.txt, data.yaml.

Labels are one line per nodule: ``0 cx cy w h`` normalised to [0,1]. Images are 8-bit lung-window
PNGs (ultralytics reads 8-bit images). The validation split holds real slices only, split by
patient (see synth.generate_cli); synthetic slices are always train. ``data.yaml`` holds the
folder's final absolute ``path`` so ``YOLO("yolov8n.yaml").train(data=".../data.yaml")`` works
unchanged, and comments with the pixel spacing and window; ``ultralytics_offline`` applies
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
from .coco import encode_image

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


def yolo_item(root: Path, item) -> dict:
    """Write one ``ExportItem`` (8-bit lung-window PNG + label file) into its split's folders."""
    if item.split not in SPLITS:
        raise ValueError(f"split {item.split!r} not in {SPLITS}")
    root = Path(root)
    H, W = np.asarray(item.hu).shape
    encode_image(root / "images" / item.split / f"{item.name}.png", item.hu, "png")
    (root / "labels" / item.split / f"{item.name}.txt").write_text(format_labels(item.boxes, W, H))
    return {"split": item.split}


def make_folders(root: Path) -> None:
    for s in SPLITS:
        (Path(root) / "images" / s).mkdir(parents=True, exist_ok=True)
        (Path(root) / "labels" / s).mkdir(parents=True, exist_ok=True)


def write_data_yaml(root: Path, final_root: Path, n_val: int, notes: list[str]) -> Path:
    """data.yaml pointing at ``final_root`` (where the folder lives after the atomic rename).

    With no validation images, ``val:`` still names the (empty) images/val folder, never
    images/train: ultralytics then stops with "no images found" instead of silently reporting
    metrics on its own training images. The comments say so, and what the pixels mean."""
    lines = ["# written by nodulesynth; train with YOLO('yolov8n.yaml').train(data='data.yaml')"]
    lines += [f"# {n}" for n in notes]
    if not n_val:
        lines += ["# NO VALIDATION SPLIT: images/val is empty on purpose (val holds only real slices, split",
                  "# by patient; this dataset has none). ultralytics will refuse to validate here: point",
                  "# val: at held-out real patients' slices. Never validate on images/train."]
    path = Path(root) / "data.yaml"
    with atomic_file(path, "w") as fh:
        fh.write("\n".join(lines) + "\n"
                 f"path: {json.dumps(Path(final_root).resolve().as_posix())}\ntrain: images/train\nval: images/val\n"
                 "nc: 1\nnames:\n  0: nodule\n")
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
