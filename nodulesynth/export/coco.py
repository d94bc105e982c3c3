"""COCO export: images/ + one annotations.json (category "nodule", bbox xywh, RLE segmentation).

Image formats: "png" = 8-bit lung window [-1000, 400] HU; "png16" = 16-bit PNG of HU + 1024
(lossless integer HU, 0 = -1024 HU); "npy" = int16 HU arrays.
Each annotation is one nodule component: bbox from its box, segmentation = exactly that component's
pixels (RLE, counts as str so the JSON loads anywhere), area = that pixel count. ``info`` and every
image record carry the pixel spacing (mm, [row, col]) and the window used for 8-bit images.

Per-item work (``coco_item``: encode + RLE) runs on the export worker processes; ``write_coco``
assigns the ids once every record is in (so shards merge into exactly the single-run file).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..hu import LUNG_WINDOW, window_uint8
from ..io import write_json
from ..masks.boxes import xyxy_to_coco
from ..masks.classes import MaskClass
from ..masks.components import label8

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


def nodule_annotations(mask: np.ndarray, boxes: np.ndarray) -> list[dict]:
    """COCO annotation bodies (no ids) for the nodule components of one mask: each box's
    segmentation is exactly its own component, even where boxes of two components overlap."""
    from pycocotools import mask as mask_utils
    from scipy import ndimage

    H, W = mask.shape
    lab, _ = label8(mask == MaskClass.NODULE)  # the same components mask_to_boxes found
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


def coco_info(image_format: str, extra: dict | None = None) -> dict:
    """The ``info`` block: what the pixels mean (format, window, offset) plus run provenance."""
    from .. import __version__

    return {
        "description": "nodulesynth synthetic lung-nodule CT slices",
        "version": __version__,
        "date_created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "image_format": image_format,
        "window_hu": list(LUNG_WINDOW) if image_format == "png" else None,
        "png16_offset_hu": 1024 if image_format == "png16" else None,
        **(extra or {}),
    }


def coco_item(root: Path, item, image_format: str = "png") -> dict:
    """Encode one ``ExportItem`` under root/images; return its image record and annotations (no ids)."""
    file_name = item.name + SUFFIX[image_format]
    encode_image(Path(root) / "images" / file_name, item.hu, image_format)
    H, W = np.asarray(item.mask).shape
    image = {"file_name": file_name, "width": int(W), "height": int(H), "source": item.source,
             "seed": item.provenance.get("seed"), "index": item.provenance.get("index"),
             "pixel_spacing_mm": [float(v) for v in item.spacing_mm],
             "window_hu": list(LUNG_WINDOW) if image_format == "png" else None,
             "provenance": item.provenance}
    return {"image": image, "annotations": nodule_annotations(np.asarray(item.mask), item.boxes)}


def write_coco(root: Path, records: list[dict], info: dict) -> Path:
    """annotations.json from ``coco_item`` records in dataset order (ids 1..N assigned here)."""
    images, anns = [], []
    for k, r in enumerate(records, 1):
        images.append({"id": k, **r["image"]})
        for a in r["annotations"]:
            anns.append({"id": len(anns) + 1, "image_id": k, **a})
    path = Path(root) / "annotations.json"
    write_json(path, {"info": info, "licenses": [], "categories": [CATEGORY], "images": images, "annotations": anns})
    return path


def read_coco_records(root: str | os.PathLike) -> tuple[dict, list[dict]]:
    """(info, records) of a written annotations.json: the inverse of ``write_coco`` (used by merge)."""
    data = json.loads((Path(root) / "annotations.json").read_text())
    by_image: dict[int, list[dict]] = {im["id"]: [] for im in data["images"]}
    for a in data["annotations"]:
        by_image[a["image_id"]].append({k: v for k, v in a.items() if k not in ("id", "image_id")})
    records = [{"image": {k: v for k, v in im.items() if k != "id"}, "annotations": by_image[im["id"]]}
               for im in data["images"]]
    return data["info"], records
