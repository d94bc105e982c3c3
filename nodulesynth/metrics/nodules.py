"""Nodule size (the one definition) and nodule statistics of label masks.

Nodule size, everywhere in nodulesynth (size conditions ``--min/--max-size-mm``, the quality gate's
3 mm minimum, these statistics, the model card and README): the **longest in-plane extent** of the
nodule's connected component, measured along the image axes — the longest side of its bounding box
(the detection label itself) × pixel spacing. This is the box analogue of the longest in-plane
diameter that LIDC-IDRI readers measure and LUNA16's ``diameter_mm`` reports; for an elongated
nodule lying diagonally it reads up to √2 shorter than the true longest chord.

The statistics check that the mask StyleGAN reproduces the training data's nodule rate and size
distribution (the model card reports both side by side).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from ..masks.classes import MaskClass
from ..masks.components import label8

# LIDC-IDRI's lower bound for a "nodule ≥ 3 mm" (smaller findings are only point-marked); the
# quality gate requires generated nodules to reach it.
MIN_NODULE_MM = 3.0


def nodule_size_mm(boxes, spacing_mm: float):
    """Size (mm) of nodules from their xyxy pixel-edge boxes (K, 4), numpy or torch: the longest
    box side × ``spacing_mm`` (see the module docstring: the one definition)."""
    if isinstance(boxes, torch.Tensor):
        b = boxes.reshape(-1, 4).float()
        return (b[:, 2:] - b[:, :2]).amax(1) * float(spacing_mm)
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return (b[:, 2:] - b[:, :2]).max(1, initial=0.0) * float(spacing_mm) if len(b) else np.zeros(0, np.float32)


@dataclass
class NoduleStats:
    n_masks: int
    nodule_rate: float  # fraction of masks with at least one nodule component
    nodules_per_mask: float
    sizes_mm: np.ndarray  # nodule_size_mm of every component (longest in-plane extent)

    def summary(self) -> dict:
        d = self.sizes_mm
        q = np.percentile(d, [10, 50, 90]).round(2).tolist() if len(d) else [None] * 3
        return {
            "masks": self.n_masks,
            "nodule_rate": round(self.nodule_rate, 4),
            "nodules_per_mask": round(self.nodules_per_mask, 3),
            "size_mm_p10_p50_p90": q,
        }


def nodule_stats(masks: np.ndarray, spacing_mm: float, min_pixels: int = 1) -> NoduleStats:
    """Stats over a (N,H,W) label stack at an isotropic in-plane spacing (mm/pixel)."""
    masks = np.asarray(masks)
    labels, k = label8(masks == MaskClass.NODULE)  # per mask, one call: never connects across the stack
    if k == 0:
        return NoduleStats(len(masks), 0.0, 0.0, np.zeros(0))
    areas = np.bincount(labels.ravel(), minlength=k + 1)[1:]
    objs = ndimage.find_objects(labels)
    owner = np.array([sl[0].start for sl in objs])  # mask index of each component
    boxes = np.array([[sl[2].start, sl[1].start, sl[2].stop, sl[1].stop] for sl in objs], np.float32)
    keep = areas >= min_pixels
    areas, owner, boxes = areas[keep], owner[keep], boxes[keep]
    return NoduleStats(len(masks), len(np.unique(owner)) / len(masks), len(areas) / len(masks),
                       nodule_size_mm(boxes, spacing_mm))
