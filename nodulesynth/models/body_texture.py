"""Body texture: the lung-texture GAN, conditioned on where in the body it draws.

Why it exists: measured on held-out patients, the translated body (soft tissue, bones) holds most of
what still separates generated slices from real ones (benchmarks/results/heldout_regions.txt:
putting the real body back into translated real masks takes the KID×1000 from 207 to 80). The
translator paints the body as a smooth mean, because a mask says where the body is, not where fat,
muscle and ribs lie. Much of that is a function of the geometry, though: subcutaneous fat under the
skin, ribs and intercostal muscle along the lungs, the mediastinum between them. So the same spatial
GAN as the lungs' (``models.lung_texture``) draws the body, given four condition maps at every block:

1. the body itself (classes 1 and 4; the trachea is then drawn as the translator drew it);
2. the distance into the body from outside the patient; 3. the distance to the nearest lung (both
   in ``QUANT``-px steps up to ``REACH`` steps, so 0…1 over 256 px at 0.8 mm);
4. whether the pixel lies between the two lungs along its row (the mediastinum and the spine).

The pipeline composites its field over the body (:func:`body_alpha`); nodules, 3 px around them,
the lungs and everything outside the patient stay as they were.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..masks.classes import MaskClass
from .lung_texture import LungTextureConfig

NAME = "body_texture"
CONDITIONS = 4
REACH = 16  # distance steps (each QUANT px); beyond that a distance reads 1
QUANT = 4


@dataclass
class BodyTextureConfig(LungTextureConfig):
    """The body's texture generator: HU up to cortical bone, four condition maps."""

    hu_low: float = -1024.0
    hu_high: float = 1476.0
    cond_channels: int = CONDITIONS


def _distance(src: torch.Tensor) -> torch.Tensor:
    """(B, H, W) distance from ``src`` pixels in QUANT-px steps, / REACH, clipped at 1: computed at
    1/QUANT resolution by repeated 3×3 max pooling (batched, the same on any device), then upsampled."""
    h, w = src.shape[1:]
    x = F.max_pool2d(src.float()[:, None], QUANT, QUANT, ceil_mode=True)
    d = torch.full_like(x, float(REACH))
    for k in range(REACH):
        d = torch.where((x > 0) & (d >= REACH), torch.full_like(d, float(k)), d)
        x = F.max_pool2d(x, 3, 1, 1)
    return F.interpolate(d / REACH, size=(h, w), mode="bilinear", align_corners=False)[:, 0]


def body_conditions(masks: torch.Tensor) -> torch.Tensor:
    """(B, 4, H, W) float condition maps of (B, H, W) masks (see the module docstring)."""
    m = masks.long()
    body = (m == MaskClass.BODY) | (m == MaskClass.TRACHEA)
    lung = (m == MaskClass.LEFT_LUNG) | (m == MaskClass.RIGHT_LUNG) | (m == MaskClass.NODULE)
    into = _distance(~body & ~lung)
    to_lung = _distance(lung)
    # the patient's right lung lies on the image's left: between = a right-lung pixel to the left
    # along the row and a left-lung pixel to the right
    after_right = (m == MaskClass.RIGHT_LUNG).int().cummax(2).values.bool()
    before_left = (m == MaskClass.LEFT_LUNG).flip(2).int().cummax(2).values.flip(2).bool()
    between = after_right & before_left & body
    b = body.float()
    return torch.stack([b, into * b, to_lung * b, between.float()], 1)


def body_alpha(masks: torch.Tensor, ramp_px: int = 2, nodule_margin_px: int = 3) -> torch.Tensor:
    """(B, H, W) blend weight of the body field: 1 inside the body (class 1), 0 elsewhere and within
    ``nodule_margin_px`` of nodules, ramping over ~``ramp_px`` pixels inside its edges (skin, pleura)."""
    m = masks.long()
    k = 2 * nodule_margin_px + 1
    near_nodule = F.max_pool2d((m == MaskClass.NODULE).float()[:, None], k, 1, nodule_margin_px)[:, 0] > 0
    region = ((m == MaskClass.BODY) & ~near_nodule).float()
    w = 2 * ramp_px + 1
    inside = F.avg_pool2d(region[:, None], w, 1, ramp_px, count_include_pad=True)[:, 0]
    return ((inside - 0.5) / 0.49).clamp(0, 1) * region
