"""Paired image-quality metrics (PSNR, SSIM) for translator outputs against the real slice.

Computed on the lung window mapped to [0, 1] (what a reader sees and what the paper reports on),
batched in torch so a held-out set is scored in one pass.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..hu import window


def psnr(fake_hu: torch.Tensor, real_hu: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB on the lung window, (B,H,W) or (B,1,H,W) → (B,)."""
    a, b = window(fake_hu.float()), window(real_hu.float())
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


def _gaussian(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(fake_hu: torch.Tensor, real_hu: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004, 11×11 Gaussian σ=1.5) on the lung window → (B,)."""
    a = window(fake_hu.float()).reshape(-1, 1, *fake_hu.shape[-2:])
    b = window(real_hu.float()).reshape(-1, 1, *real_hu.shape[-2:])
    k = _gaussian().to(a.device)
    mu_a, mu_b = F.conv2d(a, k), F.conv2d(b, k)
    va = F.conv2d(a * a, k) - mu_a**2
    vb = F.conv2d(b * b, k) - mu_b**2
    cov = F.conv2d(a * b, k) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))
    return s.flatten(1).mean(1)


# ---- the paper's Table 1 definitions: full image and the nodule region -------------------------------
CT_MAX = 4095.0  # eq. (12): MAX_I = 4095 for CT (12-bit stored values)
NODULE_DILATION_PX = 8  # masked metrics: nodule pixels dilated by 8 px (6.4 mm at 0.8 mm/px), a square


def hu_to_ct12(hu: torch.Tensor) -> torch.Tensor:
    """HU → 12-bit stored CT values: HU + 1024 clipped to [0, 4095] (the range eq. 12's MAX refers to)."""
    return (hu.float() + 1024.0).clamp(0.0, CT_MAX)


def hu_to_8bit(hu: torch.Tensor) -> torch.Tensor:
    """HU → the 8-bit lung-window image (0…255, rounded) a reader sees; eq. (13) uses L = 255."""
    return torch.round(window(hu.float()) * 255.0)


def dilate(mask: torch.Tensor, px: int = NODULE_DILATION_PX) -> torch.Tensor:
    """Square (Chebyshev) dilation of a boolean (B,H,W) mask by ``px`` pixels."""
    m = mask.float().reshape(-1, 1, *mask.shape[-2:])
    return (F.max_pool2d(m, 2 * px + 1, stride=1, padding=px) > 0).reshape(mask.shape)


def _as_b1hw(x: torch.Tensor) -> torch.Tensor:
    return x.float().reshape(-1, 1, *x.shape[-2:])


def _masked_mean(v: torch.Tensor, region: torch.Tensor | None) -> torch.Tensor:
    """Mean over (H, W) per image, over ``region`` only when given (NaN where the region is empty)."""
    v = v.flatten(1)
    if region is None:
        return v.mean(1)
    r = region.reshape(v.shape).float()
    n = r.sum(1)
    return torch.where(n > 0, (v * r).sum(1) / n.clamp_min(1), torch.full_like(n, float("nan")))


def psnr_max(a: torch.Tensor, b: torch.Tensor, max_value: float, region: torch.Tensor | None = None) -> torch.Tensor:
    """PSNR = 10·log10(MAX² / MSE) (eq. 12) per image, MSE over ``region`` when given → (B,)."""
    mse = _masked_mean((_as_b1hw(a) - _as_b1hw(b)).pow(2), region).clamp_min(1e-10)
    return 10 * torch.log10(max_value**2 / mse)


def psnr_ct(fake_hu: torch.Tensor, real_hu: torch.Tensor, region: torch.Tensor | None = None) -> torch.Tensor:
    """The paper's PSNR: MAX = 4095 on 12-bit CT values (HU + 1024)."""
    return psnr_max(hu_to_ct12(fake_hu), hu_to_ct12(real_hu), CT_MAX, region)


def psnr_8bit(fake_hu: torch.Tensor, real_hu: torch.Tensor, region: torch.Tensor | None = None) -> torch.Tensor:
    """PSNR of the 8-bit lung-window images, MAX = 255."""
    return psnr_max(hu_to_8bit(fake_hu), hu_to_8bit(real_hu), 255.0, region)


def ssim_8bit(fake_hu: torch.Tensor, real_hu: torch.Tensor, region: torch.Tensor | None = None) -> torch.Tensor:
    """The paper's SSIM (eq. 13) on the 8-bit lung window, L = 255 (C1 = (0.01L)², C2 = (0.03L)²),
    11×11 Gaussian σ = 1.5 windows (Wang et al. 2004; scikit-image ``gaussian_weights=True,
    use_sample_covariance=False, data_range=255`` gives the same numbers). The SSIM map covers the
    window centres at least 5 px from the border; with ``region`` it is averaged over the region's
    pixels there (NaN where none)."""
    a, b = _as_b1hw(hu_to_8bit(fake_hu)), _as_b1hw(hu_to_8bit(real_hu))
    k = _gaussian().to(a.device)
    mu_a, mu_b = F.conv2d(a, k), F.conv2d(b, k)
    va = F.conv2d(a * a, k) - mu_a**2
    vb = F.conv2d(b * b, k) - mu_b**2
    cov = F.conv2d(a * b, k) - mu_a * mu_b
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))
    if region is not None:
        p = k.shape[-1] // 2
        region = region.reshape(-1, *region.shape[-2:])[:, p:-p, p:-p]
    return _masked_mean(s, region)
