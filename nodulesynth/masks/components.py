"""Connected components of binary masks, defined once: 8-connectivity in the slice plane.

Nodule boxes, COCO segments, lung/airway finding and nodule statistics must agree on what "one
component" is, or a nodule that touches another diagonally is one box here and two there.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

STRUCT8 = np.ones((3, 3), dtype=bool)


def label8(binary: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected labels of a 2-D mask (or of each slice of a (B, H, W) stack, never joining
    slices): (labels, number of components)."""
    binary = np.asarray(binary, dtype=bool)
    if binary.ndim == 3:
        structure = np.zeros((3, 3, 3), dtype=bool)
        structure[1] = STRUCT8
        return ndi.label(binary, structure=structure)
    if binary.ndim != 2:
        raise ValueError(f"label8: expected (H, W) or (B, H, W), got shape {binary.shape}")
    return ndi.label(binary, structure=STRUCT8)


def components(binary: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
    """(labels, n, sizes) with ``sizes[i]`` the pixel count of component i (``sizes[0] = 0``)."""
    lab, n = label8(binary)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    sizes[0] = 0
    return lab, n, sizes
