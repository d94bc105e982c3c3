"""Checkerboard artefacts, measured: the spectral peaks stride-2 upsampling leaves behind.

A transposed convolution of stride 2 (and a stack of them) adds a pattern of period 2, 4, 8 px
(Odena et al., "Deconvolution and Checkerboard Artifacts", 2016). In the Fourier domain that is
power concentrated at the frequencies N/2, N/4, N/8 (and their sums) along each axis, where real
CT — whose noise and anatomy have a smooth, broad spectrum — has none. The score compares the power
at those bins with the power of their neighbourhood, so it reads about 0 on real slices and grows
with a visible grid, whatever the image's contrast.
"""
from __future__ import annotations

import torch

from ..hu import window

_PERIODS = (2, 4, 8)


def _peak_bins(n: int) -> list[int]:
    """Frequency indices (0 … n−1) of periods 2, 4, 8 px and their harmonics, DC included."""
    return sorted({(k * n) // p for p in _PERIODS for k in range(p)})


def checkerboard_score(hu: torch.Tensor) -> torch.Tensor:
    """Per image, (B,H,W) HU → (B,): mean over the period-2/4/8 frequency bins (DC excluded) of
    log10(power in the 3×3 bins at the peak / median power of the 9×9 neighbourhood around it).

    Computed on the lung window with a Hann taper (no leakage from the image border). Around 0:
    no periodic pattern; ≥ 1: peaks ten times their surroundings, a grid a reader sees.
    """
    x = window(hu.float()).reshape(-1, *hu.shape[-2:])
    b, h, w = x.shape
    taper = torch.hann_window(h, periodic=False)[:, None] * torch.hann_window(w, periodic=False)[None, :]
    x = (x - x.mean(dim=(1, 2), keepdim=True)) * taper
    power = torch.fft.fft2(x).abs().pow(2)
    scores = []
    for fy in _peak_bins(h):
        for fx in _peak_bins(w):
            if fy == 0 and fx == 0:
                continue
            ys = [(fy + d) % h for d in range(-4, 5)]
            xs = [(fx + d) % w for d in range(-4, 5)]
            hood = power[:, ys][:, :, xs]                      # (B, 9, 9) around the bin
            peak = hood[:, 3:6, 3:6].flatten(1).sum(1)
            ring = torch.cat([hood[:, :3].flatten(1), hood[:, 6:].flatten(1),
                              hood[:, 3:6, :3].flatten(1), hood[:, 3:6, 6:].flatten(1)], 1)
            scores.append(torch.log10(peak / (9 * ring.median(1).values).clamp_min(1e-20)))
    return torch.stack(scores, 1).mean(1)
