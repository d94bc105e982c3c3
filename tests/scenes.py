"""Hand-drawn label masks shared by the synthesis and export tests."""
from __future__ import annotations

import numpy as np

from nodulesynth.masks.classes import MaskClass as C


def scene_mask(nodules: list[tuple[int, int, int]] = (), size: int = 64) -> np.ndarray:
    """Body with both lungs (patient's right lung on the image left) and disc nodules (cx, cy, r)."""
    m = np.zeros((size, size), np.uint8)
    m[8:56, 4:60] = C.BODY
    m[14:50, 8:28] = C.RIGHT_LUNG
    m[14:50, 36:56] = C.LEFT_LUNG
    yy, xx = np.mgrid[:size, :size]
    for cx, cy, r in nodules:
        m[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = C.NODULE
    return m
