"""Nodule boxes = bounding boxes of the connected components (8-connected) of class NODULE.

Boxes are xyxy in pixel EDGE coordinates: x0 = min col, x1 = max col + 1, so x1 - x0 is the pixel
extent (COCO's w); sorted by (y0, x0, y1, x1) — an order of the boxes alone, so every labeller
gives the same list. Converters to COCO xywh and YOLO normalised cxcywh.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from .classes import MaskClass
from .components import STRUCT8, label8

__all__ = ["STRUCT8", "mask_to_boxes", "masks_to_boxes_batch", "label_components_torch",
           "xyxy_to_coco", "coco_to_xyxy", "xyxy_to_yolo", "yolo_to_xyxy"]


def _sort_boxes(b: np.ndarray) -> np.ndarray:
    order = np.lexsort((b[:, 2], b[:, 3], b[:, 0], b[:, 1]))  # y0, x0, y1, x1 (the last key leads)
    return b[order]


def mask_to_boxes(mask, cls: int = MaskClass.NODULE) -> np.ndarray:
    """(H, W) label mask (numpy or torch) → (K, 4) float32 xyxy boxes of class ``cls`` components."""
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask_to_boxes: expected (H, W), got shape {mask.shape}")
    lab, n = label8(mask == cls)
    if n == 0:
        return np.zeros((0, 4), dtype=np.float32)
    objs = ndi.find_objects(lab)
    b = np.array([[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in objs], dtype=np.float32)
    return _sort_boxes(b)


def label_components_torch(fg: torch.Tensor) -> torch.Tensor:
    """8-connected component labels (0 = background) of a boolean (B, H, W) tensor, on its own
    device; items never connect to each other. CPU uses scipy's one-pass labelling (far faster
    there); other devices use iterative max-pool propagation, which never leaves the device."""
    if fg.device.type == "cpu":
        lab, _ = label8(fg.numpy())
        return torch.from_numpy(lab.astype(np.int64))
    return _label_maxpool(fg)


def _label_maxpool(fg: torch.Tensor) -> torch.Tensor:
    """Every foreground pixel starts with a unique id and takes the max over its 3×3
    neighbourhood until nothing changes (the pooling is 2-D per item)."""
    b, h, w = fg.shape
    ids = torch.arange(1, b * h * w + 1, device=fg.device, dtype=torch.float64 if b * h * w > 2**24 else torch.float32)
    lab = torch.where(fg, ids.view(b, h, w), torch.zeros((), device=fg.device, dtype=ids.dtype))
    lab = lab.unsqueeze(1)
    fgf = fg.unsqueeze(1)
    while True:
        prev = lab
        for _ in range(8):
            lab = torch.where(fgf, F.max_pool2d(lab, 3, stride=1, padding=1), lab)
        if torch.equal(lab, prev):
            break
    return lab.squeeze(1).long()


def masks_to_boxes_batch(masks: torch.Tensor, cls: int = MaskClass.NODULE) -> list[torch.Tensor]:
    """(B, H, W) label masks on any device → per item (K_i, 4) float32 xyxy boxes on that device.
    On an accelerator the whole batch at once (max-pool labels, scatter min/max); on CPU through
    scipy, item by item inside each item's foreground box (:func:`_boxes_cpu`)."""
    if masks.ndim != 3:
        raise ValueError(f"masks_to_boxes_batch: expected (B, H, W), got shape {tuple(masks.shape)}")
    if masks.device.type == "cpu":
        return _boxes_cpu(masks.numpy() == cls)
    return _boxes_from_labels(label_components_torch(masks == cls))


def _boxes_from_labels(lab: torch.Tensor) -> list[torch.Tensor]:
    """Per item boxes of a (B, H, W) component label tensor (0 = background), on its device."""
    bsz, h, w = lab.shape
    dev = lab.device
    nz = lab > 0
    if not bool(nz.any()):
        return [torch.zeros((0, 4), dtype=torch.float32, device=dev) for _ in range(bsz)]
    bi, yi, xi = torch.nonzero(nz, as_tuple=True)
    uniq, inv = torch.unique(lab[bi, yi, xi], return_inverse=True)
    k = len(uniq)
    big = torch.full((k,), h + w + 1, dtype=torch.long, device=dev)
    small = torch.full((k,), -1, dtype=torch.long, device=dev)
    x0 = big.scatter_reduce(0, inv, xi, "amin")
    y0 = big.scatter_reduce(0, inv, yi, "amin")
    x1 = small.scatter_reduce(0, inv, xi, "amax") + 1
    y1 = small.scatter_reduce(0, inv, yi, "amax") + 1
    item = small.scatter_reduce(0, inv, bi, "amax")  # the batch item each component lies in
    boxes = torch.stack([x0, y0, x1, y1], dim=1)
    # sort by (item, y0, x0, y1, x1) with one composite key
    key = (((item * (h + 1) + y0) * (w + 1) + x0) * (h + 2) + y1) * (w + 2) + x1  # < 2⁶³ for B·H²·W² < 9e18
    order = torch.argsort(key)
    boxes, item = boxes[order].float(), item[order]
    counts = torch.bincount(item, minlength=bsz).tolist()
    return list(torch.split(boxes, counts))


def _boxes_cpu(fg: np.ndarray) -> list[torch.Tensor]:
    """CPU path of :func:`masks_to_boxes_batch`: each item is labelled only inside the bounding box
    of its foreground (nodules are a few hundred of 262k pixels) and ``find_objects`` gives the
    extents. Measured on 128 placed 512² masks: 0.14 vs 1.06 ms per mask for labelling the whole
    stack at once. Same boxes, same order."""
    rows, cols = fg.any(2), fg.any(1)
    out = []
    for b in range(fg.shape[0]):
        ys, xs = np.flatnonzero(rows[b]), np.flatnonzero(cols[b])
        if len(ys) == 0:
            out.append(torch.zeros((0, 4), dtype=torch.float32))
            continue
        y0, x0 = ys[0], xs[0]
        lab, _ = label8(fg[b, y0 : ys[-1] + 1, x0 : xs[-1] + 1])
        ext = np.array([[s[1].start + x0, s[0].start + y0, s[1].stop + x0, s[0].stop + y0]
                        for s in ndi.find_objects(lab)], dtype=np.float32)
        out.append(torch.from_numpy(_sort_boxes(ext)))
    return out


def _cat(parts, like):
    if isinstance(like, torch.Tensor):
        return torch.stack(parts, dim=-1)
    return np.stack(parts, axis=-1).astype(np.float32)


def _asarray(b):
    return b if isinstance(b, torch.Tensor) else np.asarray(b, dtype=np.float32).reshape(-1, 4)


def xyxy_to_coco(b):
    """xyxy → COCO [x, y, w, h] (numpy or torch)."""
    b = _asarray(b)
    return _cat([b[..., 0], b[..., 1], b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]], b)


def coco_to_xyxy(b):
    """COCO [x, y, w, h] → xyxy."""
    b = _asarray(b)
    return _cat([b[..., 0], b[..., 1], b[..., 0] + b[..., 2], b[..., 1] + b[..., 3]], b)


def xyxy_to_yolo(b, width: int, height: int):
    """xyxy pixels → YOLO [cx, cy, w, h] normalised to the image size."""
    b = _asarray(b)
    return _cat(
        [
            (b[..., 0] + b[..., 2]) / 2 / width,
            (b[..., 1] + b[..., 3]) / 2 / height,
            (b[..., 2] - b[..., 0]) / width,
            (b[..., 3] - b[..., 1]) / height,
        ],
        b,
    )


def yolo_to_xyxy(b, width: int, height: int):
    """YOLO normalised [cx, cy, w, h] → xyxy pixels."""
    b = _asarray(b)
    cx, cy, w, h = b[..., 0] * width, b[..., 1] * height, b[..., 2] * width, b[..., 3] * height
    return _cat([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], b)
