"""Paired (mask, CT) augmentation for the translator, with albumentations.

Rules, and why:
- Geometry is applied to image and mask together; masks use nearest interpolation (labels stay
  labels) and fill with background (0), the image fills with air.
- No plain left-right flip: class 2 is the patient's LEFT lung, drawn on the image's right. A
  horizontal flip is only correct if classes 2 and 3 are swapped too, which :func:`swap_lungs`
  does — so the flip we use is anatomically consistent (a mirrored patient). No vertical flip
  (patients are not scanned upside down; anterior/posterior is anatomy too).
- Small affine only (scale 0.9-1.1, rotation ±10°, shift ±5%): CT slices are acquired in a fixed
  pose, so large transforms would teach implausible anatomy.
- Intensity transforms (brightness/contrast, Gaussian noise) act on the image normalised to
  [0, 1] (HU window [HU_MIN, HU_MAX]): albumentations clips float images to [0, 1], so feeding HU
  or [-1, 1] would silently destroy values. They are mild: HU values carry meaning (air, tissue).
- Elastic deformation is optional (off by default): it helps little on slices and costs CPU.
Randomness comes from a per-sample seed (see engine.IndexStream), so runs are reproducible and
exact-resumable whatever the DataLoader worker count.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from ..hu import HU_MAX, HU_MIN
from ..masks.classes import MaskClass

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # before the import: it phones home otherwise
import albumentations as A  # noqa: E402
import cv2  # noqa: E402  (albumentations depends on it)


@dataclasses.dataclass
class AugmentConfig:
    p_flip: float = 0.5            # mirrored patient (flip + left/right lung swap)
    p_affine: float = 0.5
    scale: tuple[float, float] = (0.9, 1.1)
    rotate: float = 10.0
    shift: float = 0.05
    p_intensity: float = 0.3
    brightness: float = 0.05
    contrast: float = 0.05
    p_noise: float = 0.2
    noise_std: float = 0.01        # in [0, 1] image units (0.01 ≈ 20 HU)
    p_elastic: float = 0.0


def swap_lungs(mask: np.ndarray) -> np.ndarray:
    """Exchange left/right lung labels (after a horizontal flip the anatomy is mirrored)."""
    out = mask.copy()
    out[mask == MaskClass.LEFT_LUNG] = MaskClass.RIGHT_LUNG
    out[mask == MaskClass.RIGHT_LUNG] = MaskClass.LEFT_LUNG
    return out


class PairAugment:
    """Callable: ``(image_hu float32 (H,W), mask uint8 (H,W), seed) -> (image_hu, mask)``."""

    def __init__(self, cfg: AugmentConfig | None = None) -> None:
        self.cfg = cfg = cfg or AugmentConfig()
        air = (-1024.0 - HU_MIN) / (HU_MAX - HU_MIN)
        geo = [
            A.Affine(scale=cfg.scale, rotate=(-cfg.rotate, cfg.rotate), translate_percent=(-cfg.shift, cfg.shift),
                     interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST,
                     border_mode=cv2.BORDER_CONSTANT, fill=air, fill_mask=0, p=cfg.p_affine),
        ]
        if cfg.p_elastic > 0:
            geo.append(A.ElasticTransform(alpha=30, sigma=6, interpolation=cv2.INTER_LINEAR,
                                          mask_interpolation=cv2.INTER_NEAREST, border_mode=cv2.BORDER_CONSTANT,
                                          fill=air, fill_mask=0, p=cfg.p_elastic))
        pix = [
            A.RandomBrightnessContrast(brightness_limit=cfg.brightness, contrast_limit=cfg.contrast, p=cfg.p_intensity),
            A.GaussNoise(std_range=(cfg.noise_std * 0.5, cfg.noise_std), p=cfg.p_noise),
        ]
        self.tf = A.Compose(geo + pix, seed=0)

    def __call__(self, image_hu: np.ndarray, mask: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        if rng.random() < self.cfg.p_flip:
            image_hu, mask = image_hu[:, ::-1], swap_lungs(mask[:, ::-1])
        unit = ((np.asarray(image_hu, np.float32) - HU_MIN) / (HU_MAX - HU_MIN)).clip(0, 1)
        self.tf.set_random_seed(int(rng.integers(2**31 - 1)))
        r = self.tf(image=np.ascontiguousarray(unit), mask=np.ascontiguousarray(mask))
        return r["image"] * (HU_MAX - HU_MIN) + HU_MIN, r["mask"]
