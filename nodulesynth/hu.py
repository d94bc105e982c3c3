"""Hounsfield-unit conventions shared by data, models and export, defined once.

Networks see HU linearly mapped from [HU_MIN, HU_MAX] to [-1, 1] (air = -1; bone above HU_MAX
saturates, which costs nothing for lung nodules). People see a standard lung window.
"""
from __future__ import annotations

import numpy as np
import torch

HU_MIN, HU_MAX = -1024.0, 1024.0
AIR_HU = -1024
# A common lung display window. The paper states no window (only PSNR's MAX = 4095 on 12-bit CT,
# eq. 12); this one is our choice for previews, exports and the "window" dataset output.
LUNG_WINDOW = (-1000.0, 400.0)


def hu_to_unit(hu):
    """HU (array or tensor) → [-1, 1] network range."""
    scale = (HU_MAX - HU_MIN) / 2
    x = (hu - (HU_MAX + HU_MIN) / 2) / scale
    return x.clamp(-1, 1) if isinstance(x, torch.Tensor) else np.clip(x, -1, 1)


def unit_to_hu(x):
    """[-1, 1] network output → HU."""
    return x * ((HU_MAX - HU_MIN) / 2) + (HU_MAX + HU_MIN) / 2


def window(hu, lo: float = LUNG_WINDOW[0], hi: float = LUNG_WINDOW[1]):
    """HU → [0, 1] float in a display window (numpy or torch)."""
    x = (hu - lo) / (hi - lo)
    return x.clamp(0, 1) if isinstance(x, torch.Tensor) else np.clip(x, 0, 1)


def window_uint8(hu, lo: float = LUNG_WINDOW[0], hi: float = LUNG_WINDOW[1]) -> np.ndarray:
    """HU → uint8 image in a display window (the COCO/YOLO export and previews use this)."""
    if isinstance(hu, torch.Tensor):
        hu = hu.detach().float().cpu().numpy()
    return np.round(window(np.asarray(hu, dtype=np.float32), lo, hi) * 255).astype(np.uint8)
