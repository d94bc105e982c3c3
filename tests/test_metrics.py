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
    # size = longest in-plane extent (the one definition, metrics.nodules.nodule_size_mm)
    assert np.allclose(sorted(s.sizes_mm), [2.0, 5.0, 5.0])
    m[3, 50:52, 5:25] = 5  # a 2×20 px sliver: 10 mm long at 0.5 mm, whatever its area
    assert np.isclose(nodule_stats(m[3:], 0.5).sizes_mm[0], 10.0)
    # adjacent masks in the stack must never merge into one component
    assert len(nodule_stats(np.stack([m[1], m[1]]), 1.0).sizes_mm) == 2


# ---- the paper's definitions (eq. 12 MAX = 4095, eq. 13 L = 255) against scikit-image ----------------
def _real_slices():
    import pathlib

    import pytest

    root = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "tcga-chest-slices"
    files = sorted(root.glob("*/*.dcm"))[:3]
    if not files:
        pytest.skip(f"real slices absent ({root})")
    import pydicom

    out = []
    for f in files:
        d = pydicom.dcmread(f)
        out.append(d.pixel_array.astype(np.float32) * float(d.RescaleSlope) + float(d.RescaleIntercept))
    return torch.from_numpy(np.stack(out))


def test_paper_psnr_ssim_match_skimage_on_real_slices():
    import pytest

    skm = pytest.importorskip("skimage.metrics")
    from nodulesynth.metrics.image_quality import dilate, hu_to_8bit, hu_to_ct12, psnr_8bit, psnr_ct, ssim_8bit

    real = _real_slices()
    g = torch.Generator().manual_seed(0)
    fake = real + torch.randn(real.shape, generator=g) * 40 + 15
    for k in range(len(real)):
        r12, f12 = hu_to_ct12(real[k]).numpy(), hu_to_ct12(fake[k]).numpy()
        ref = skm.peak_signal_noise_ratio(r12, f12, data_range=4095)
        assert psnr_ct(fake[k : k + 1], real[k : k + 1]).item() == pytest.approx(ref, abs=1e-3)
        r8, f8 = hu_to_8bit(real[k]).numpy(), hu_to_8bit(fake[k]).numpy()
        assert psnr_8bit(fake[k : k + 1], real[k : k + 1]).item() == pytest.approx(
            skm.peak_signal_noise_ratio(r8, f8, data_range=255), abs=1e-3)
        ref_ssim, smap = skm.structural_similarity(r8, f8, data_range=255, gaussian_weights=True, sigma=1.5,
                                                   use_sample_covariance=False, full=True)
        assert ssim_8bit(fake[k : k + 1], real[k : k + 1]).item() == pytest.approx(ref_ssim, abs=1e-4)
        # masked: the SSIM map averaged over a dilated region (inside the 5 px border)
        region = torch.zeros(real.shape[-2:], dtype=torch.bool)
        region[200:210, 300:320] = True
        big = dilate(region[None], 8)[0]
        assert big.sum() == (10 + 16) * (20 + 16)
        got = ssim_8bit(fake[k : k + 1], real[k : k + 1], big[None]).item()
        assert got == pytest.approx(float(smap[big.numpy()].mean()), abs=1e-4)
        m = big.numpy()
        mse = float(((r12[m] - f12[m]) ** 2).mean())
        assert psnr_ct(fake[k : k + 1], real[k : k + 1], big[None]).item() == pytest.approx(
            10 * np.log10(4095**2 / mse), abs=1e-3)
    # an empty region gives NaN, not a number
    assert torch.isnan(ssim_8bit(fake[:1], real[:1], torch.zeros(1, *real.shape[-2:], dtype=torch.bool))).all()


def test_checkerboard_score_sees_a_period_2_grid_and_not_anatomy():
    """A faint periodic grid (a fixed 8×8 tile of ±15 HU, what a stack of stride-2 transposed convs
    leaves) on a textured body scores high; the same body without it, and white noise, stay near 0
    like real CT (0.02–0.28 on the prepared real sets, 0.44–0.56 for the weights shipped before)."""
    import torch.nn.functional as F

    from nodulesynth.metrics.artifacts import checkerboard_score

    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
    body = torch.where((yy - 128) ** 2 / 100**2 + (xx - 128) ** 2 / 120**2 < 1, 40.0, -1000.0)
    lungs = ((yy - 120) ** 2 / 60**2 + (xx - 80) ** 2 / 35**2 < 1) | ((yy - 120) ** 2 / 60**2 + (xx - 176) ** 2 / 35**2 < 1)
    clean = torch.where(lungs, -850.0, body)
    texture = F.avg_pool2d(torch.randn(1, 1, 256, 256, generator=g), 5, 1, 2)[0, 0] * 150
    clean = clean + texture + 20 * torch.randn(256, 256, generator=g)
    tile = 15 * torch.randn(8, 8, generator=g)
    grid = clean + tile.repeat(32, 32)
    s = checkerboard_score(torch.stack([clean, grid, 20 * torch.randn(256, 256, generator=g)]))
    assert s.shape == (3,)
    assert s[0] < 0.3 and abs(float(s[2])) < 0.3, s
    assert s[1] > 0.6, s
