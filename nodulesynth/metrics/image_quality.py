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
