import numpy as np
import torch

from nodulesynth.metrics.image_quality import psnr, ssim
from nodulesynth.metrics.nodules import nodule_stats


def test_ssim_psnr_order_by_degradation():
    g = torch.Generator().manual_seed(0)
    real = torch.rand(2, 64, 64, generator=g) * 1400 - 1000
    slight = real + torch.randn(2, 64, 64, generator=g) * 20
    heavy = real + torch.randn(2, 64, 64, generator=g) * 300
    assert torch.allclose(ssim(real, real), torch.ones(2), atol=1e-5)
    assert (ssim(slight, real) > ssim(heavy, real)).all()
    assert (psnr(slight, real) > psnr(heavy, real) + 10).all()
    # PSNR of a known constant error: 140 HU in a 1400 HU window → 0.1 → 20 dB
    assert torch.allclose(psnr(real.clamp(-900, 200) + 140, real.clamp(-900, 200)), torch.full((2,), 20.0), atol=1e-3)


def test_nodule_stats_counts_and_sizes():
    m = np.zeros((4, 64, 64), np.uint8)
    m[0, 10:20, 10:20] = 5  # 100 px
    m[0, 40:44, 40:44] = 5  # 16 px
    m[1, 30:40, 30:40] = 5
    m[2, 30:40, 30:40] = 2  # lung only: no nodule
    s = nodule_stats(m, spacing_mm=0.5)
    assert s.nodule_rate == 0.5 and s.nodules_per_mask == 0.75
    expected = sorted(2 * np.sqrt(np.array([100, 16, 100]) / np.pi) * 0.5)
    assert np.allclose(sorted(s.diameters_mm), expected)
    # adjacent masks in the stack must never merge into one component
    assert len(nodule_stats(np.stack([m[1], m[1]]), 1.0).diameters_mm) == 2
