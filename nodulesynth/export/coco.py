"""COCO export: images/ + one annotations.json (category "nodule", bbox xywh, RLE segmentation).

Image formats: "png" = 8-bit lung window [-1000, 400] HU (what the paper's detectors saw);
"png16" = 16-bit PNG of HU + 1024 (lossless integer HU, 0 = -1024 HU); "npy" = int16 HU arrays.
Each annotation is one nodule component: bbox from its box, segmentation = exactly that component's
pixels (RLE, counts as str so the JSON loads anywhere), area = that pixel count.
Images are encoded on a thread pool (PNG compression runs in C without the GIL) using all cores.
"""
from __future__ import annotations

import datetime as _dt
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from ..hu import LUNG_WINDOW, window_uint8
from ..io import write_json
from ..masks.boxes import STRUCT8, xyxy_to_coco
from ..masks.classes import MaskClass

IMAGE_FORMATS = ("png", "png16", "npy")
SUFFIX = {"png": ".png", "png16": ".png", "npy": ".npy"}
CATEGORY = {"id": 1, "name": "nodule", "supercategory": "lesion"}


def encode_image(path: Path, hu: np.ndarray, image_format: str = "png", compress_level: int = 1) -> None:
    """Write one HU slice in the chosen format (see module docstring)."""
    hu = np.asarray(hu)
    if image_format == "png":
        Image.fromarray(window_uint8(hu)).save(path, format="PNG", compress_level=compress_level)
    elif image_format == "png16":
        v = np.clip(np.round(hu.astype(np.float32)) + 1024, 0, 65535).astype(np.uint16)
        Image.fromarray(v).save(path, format="PNG", compress_level=compress_level)
    elif image_format == "npy":
        np.save(path, np.round(hu).astype(np.int16))
    else:
        raise ValueError(f"image format {image_format!r} not in {IMAGE_FORMATS}")


class ParallelEncoder:
    """Bounded thread pool for image encoding; raises the first worker error at ``wait``."""

    def __init__(self, workers: int | None = None):
        self.workers = workers or os.cpu_count() or 1
        self.pool = ThreadPoolExecutor(max_workers=self.workers)
        self.futures: list[Future] = []

    def submit(self, fn, *args) -> None:
        self.futures.append(self.pool.submit(fn, *args))
        if len(self.futures) > 4 * self.workers:  # bound memory held by queued images
            done, self.futures = self.futures[: self.workers], self.futures[self.workers :]
            for f in done:
                f.result()

    def wait(self) -> None:
        futures, self.futures = self.futures, []
        for f in futures:
            f.result()

    def close(self) -> None:
        for f in self.futures:
            f.cancel()
        self.pool.shutdown(wait=True)


def nodule_annotations(mask: np.ndarray, boxes: np.ndarray) -> list[dict]:
    """COCO annotation bodies (no ids) for the nodule components of one mask: each box's
    segmentation is exactly its own component, even where boxes of two components overlap."""
    from pycocotools import mask as mask_utils
    from scipy import ndimage

    H, W = mask.shape
    lab, _ = ndimage.label(mask == MaskClass.NODULE, structure=STRUCT8)
    extent_to_label = {(s[1].start, s[0].start, s[1].stop, s[0].stop): k + 1
                       for k, s in enumerate(ndimage.find_objects(lab))}
    out = []
    for box in np.asarray(boxes, np.float32).reshape(-1, 4):
        key = tuple(int(round(v)) for v in box)
        if key not in extent_to_label:
            raise ValueError(f"box {key} is not the extent of a nodule component of its mask")
        seg = np.asfortranarray((lab == extent_to_label[key])[:, :, None].astype(np.uint8))
        rle = mask_utils.encode(seg)[0]
        rle["counts"] = rle["counts"].decode("ascii")
        out.append({
            "category_id": CATEGORY["id"],
            "bbox": [float(v) for v in xyxy_to_coco(box[None])[0]],
            "area": float(seg.sum()),
            "iscrowd": 0,
            "segmentation": {"size": [int(H), int(W)], "counts": rle["counts"]},
        })
    return out


class CocoWriter:
    """Collects images and annotations; ``close()`` waits for the encoders and writes annotations.json."""

    def __init__(self, root: str | os.PathLike, image_format: str = "png", info: dict | None = None,
                 encoder: ParallelEncoder | None = None):
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image format {image_format!r} not in {IMAGE_FORMATS}")
        from .. import __version__

        self.root = Path(root)
        (self.root / "images").mkdir(parents=True, exist_ok=True)
        self.image_format = image_format
        self.encoder = encoder or ParallelEncoder()
        self._own_encoder = encoder is None
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.info = {
            "description": "nodulesynth synthetic lung-nodule CT slices",
            "version": __version__,
            "date_created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "image_format": image_format,
            "lung_window_hu": list(LUNG_WINDOW) if image_format == "png" else None,
            "png16_offset_hu": 1024 if image_format == "png16" else None,
            **(info or {}),
        }

    def add(self, name: str, hu: np.ndarray, mask: np.ndarray, boxes: np.ndarray, extra: dict | None = None) -> int:
        """Queue one slice; returns its image id. ``extra`` (seed, index, provenance, source) is stored
        on the image entry."""
        image_id = len(self.images) + 1
        file_name = name + SUFFIX[self.image_format]
        self.encoder.submit(encode_image, self.root / "images" / file_name, hu, self.image_format)
        H, W = np.asarray(mask).shape
        self.images.append({"id": image_id, "file_name": file_name, "width": int(W), "height": int(H), **(extra or {})})
        for ann in nodule_annotations(np.asarray(mask), boxes):
            self.annotations.append({"id": len(self.annotations) + 1, "image_id": image_id, **ann})
        return image_id

    def close(self, info: dict | None = None) -> Path:
        self.encoder.wait()
        if self._own_encoder:
            self.encoder.close()
        path = self.root / "annotations.json"
        write_json(path, {
            "info": {**self.info, **(info or {})},
            "licenses": [],
            "categories": [CATEGORY],
            "images": self.images,
            "annotations": self.annotations,
        })
        return path
