"""The six semantic classes of the paper's masks, and their display colours."""
from __future__ import annotations

from enum import IntEnum

import numpy as np


class MaskClass(IntEnum):
    """Label values. Left/right are the *patient's*: in the radiological convention used by CT
    viewers and by LUNA16/LIDC axial slices, the patient's left lung is on the image's right."""

    BACKGROUND = 0
    BODY = 1
    LEFT_LUNG = 2
    RIGHT_LUNG = 3
    TRACHEA = 4
    NODULE = 5


NUM_CLASSES = len(MaskClass)

# RGB per class: background black, body grey, left lung blue, right lung green, trachea yellow, nodule red.
PALETTE = np.array(
    [[0, 0, 0], [110, 110, 110], [60, 110, 230], [60, 200, 90], [240, 210, 40], [235, 40, 40]], dtype=np.uint8
)


def colorize(mask: np.ndarray) -> np.ndarray:
    """uint8 label mask (H, W) → RGB (H, W, 3) with PALETTE."""
    return PALETTE[np.clip(mask, 0, NUM_CLASSES - 1)]
