"""Nodule statistics of label masks: how often a mask holds a nodule, and how big nodules are.

Used to check that the mask StyleGAN reproduces the training data's nodule rate and size
distribution (the model card reports both side by side).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..masks.classes import MaskClass


@dataclass
class NoduleStats:
    n_masks: int
    nodule_rate: float  # fraction of masks with at least one nodule component
    nodules_per_mask: float
    diameters_mm: np.ndarray  # equivalent-circle diameter of every component

    def summary(self) -> dict:
        d = self.diameters_mm
        q = np.percentile(d, [10, 50, 90]).round(2).tolist() if len(d) else [None] * 3
        return {
            "masks": self.n_masks,
            "nodule_rate": round(self.nodule_rate, 4),
            "nodules_per_mask": round(self.nodules_per_mask, 3),
            "diameter_mm_p10_p50_p90": q,
        }


def nodule_stats(masks: np.ndarray, spacing_mm: float, min_pixels: int = 1) -> NoduleStats:
    """Stats over a (N,H,W) label stack at an isotropic in-plane spacing (mm/pixel)."""
    masks = np.asarray(masks)
    # 3-D labelling with a structure that never connects across the stack axis: one call, no loop.
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = ndimage.generate_binary_structure(2, 2)
    labels, k = ndimage.label(masks == MaskClass.NODULE, structure=structure)
    if k == 0:
        return NoduleStats(len(masks), 0.0, 0.0, np.zeros(0))
    areas = np.bincount(labels.ravel(), minlength=k + 1)[1:]
    owner = np.array([sl[0].start for sl in ndimage.find_objects(labels)])  # mask index of each component
    keep = areas >= min_pixels
    areas, owner = areas[keep], owner[keep]
    diam = 2 * np.sqrt(areas / np.pi) * spacing_mm
    return NoduleStats(len(masks), len(np.unique(owner)) / len(masks), len(areas) / len(masks), diam)
