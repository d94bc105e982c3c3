"""Stage 2 of TSGAN (paper §3.2): DL-Pix2Pix, mask one-hot → 1-channel CT in [-1, 1].

Generator: the pix2pix UNet (Isola et al.; junyanz ``UnetGenerator`` shapes) written as an
explicit encoder/decoder list, with LIA on the skip connections and DWMH near the bottleneck.
Discriminator: the 70×70 PatchGAN on concat(mask one-hot, image).

Normalisation: ``InstanceNorm2d(affine=True)``. pix2pix trains with BatchNorm at batch size 1
and keeps it in train mode at test time, which *is* instance normalisation; making it explicit
keeps train and inference identical and independent of the batch size (the paper uses batch 1,
we train with larger batches on a GPU).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NoduleSynthError
from .attention import DWMH, LIA


@dataclass
class TranslatorConfig:
    """DL-Pix2Pix generator + PatchGAN. ``lia`` / ``dwmh`` are the paper's Table 4 ablation switches."""

    in_classes: int = 6
    out_channels: int = 1
    ngf: int = 64
    ndf: int = 64
    num_downs: int = 8
    lia: bool = True
    dwmh: bool = True
    dwmh_window: int = 8
    dwmh_heads: int = 8
    dwmh_depth: int = 5  # DWMH after this many stride-2 downs: 512 → 16×16 map (see DLPix2PixGenerator)
    lia_f: int | None = None  # LIA squeeze width; None = channels // 4
    dropout: float = 0.5  # on the innermost decoder layers, as pix2pix (its only noise source)
    n_layers_d: int = 3  # 3 → 70×70 receptive field

    def __post_init__(self) -> None:
        if self.num_downs < 2:
            raise NoduleSynthError(f"TranslatorConfig.num_downs={self.num_downs}: need at least 2")
        if self.dwmh and not 1 <= self.dwmh_depth <= self.num_downs:
            raise NoduleSynthError(f"TranslatorConfig.dwmh_depth={self.dwmh_depth}: must be in 1..num_downs "
                                   f"({self.num_downs})")

    def enc_channels(self) -> list[int]:
        """Channels after each down: ngf, 2ngf, 4ngf, 8ngf, 8ngf, ..."""
        return [self.ngf * min(2**i, 8) for i in range(self.num_downs)]


def _norm(ch: int) -> nn.Module:
    return nn.InstanceNorm2d(ch, affine=True)


def one_hot(labels: torch.Tensor, num_classes: int = 6) -> torch.Tensor:
    """uint8/int labels (B, H, W) → float one-hot (B, C, H, W). Out-of-range labels raise."""
    if labels.ndim != 3:
        raise NoduleSynthError(f"one_hot: labels must be (B, H, W), got shape {tuple(labels.shape)}")
    labels = labels.long()
    if labels.numel():
        lo, hi = (int(v) for v in torch.aminmax(labels))
        if lo < 0 or hi >= num_classes:
            raise NoduleSynthError(f"one_hot: labels must be in 0..{num_classes - 1}, got {lo}..{hi}")
    return F.one_hot(labels, num_classes).permute(0, 3, 1, 2).float().contiguous()


def init_pix2pix_weights(module: nn.Module) -> None:
    """pix2pix init: conv weights ~ N(0, 0.02), norm scales ~ N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.InstanceNorm2d) and m.affine:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class DLPix2PixGenerator(nn.Module):
    """UNet: ``num_downs`` stride-2 4×4 convs down, transposed convs up, skips d_i → up_i.

    Encoder d_0..d_{n-1}: conv (d_0: no norm, no activation before it), then LeakyReLU(0.2) →
    conv → InstanceNorm (the innermost: no norm). Decoder from the innermost: ReLU → ConvT →
    InstanceNorm (+ Dropout on the 8·ngf layers between the innermost and the four outer ones,
    as pix2pix), the outermost: ReLU → ConvT → tanh. Each skip d_i goes through LIA (if enabled)
    before it is concatenated with the decoder features.

    DWMH placement: a 512 input after 8 downs is 2×2 at the innermost layer, where an 8×8
    window is meaningless (4 tokens). We apply DWMH to the encoder output after ``dwmh_depth``
    downs (default 5 → 16×16 at 512, 8·ngf channels): with window 8 that is four 8×8 windows
    of 64 tokens, each covering a quarter of the image, at the cheapest map that still has
    real windows; its output feeds both the deeper layers and that level's skip. Input H, W
    must be divisible by 2**num_downs.
    """

    def __init__(self, cfg: TranslatorConfig):
        super().__init__()
        self.cfg = cfg
        enc, n = cfg.enc_channels(), cfg.num_downs
        downs = [nn.Sequential(nn.Conv2d(cfg.in_classes, enc[0], 4, 2, 1, bias=False))]
        for i in range(1, n):
            inner = i == n - 1
            layers = [nn.LeakyReLU(0.2), nn.Conv2d(enc[i - 1], enc[i], 4, 2, 1, bias=inner)]
            downs.append(nn.Sequential(*layers) if inner else nn.Sequential(*layers, _norm(enc[i])))
        self.downs = nn.ModuleList(downs)
        ups = []
        for i in range(n):
            if i == 0:
                ups.append(nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(2 * enc[0], cfg.out_channels, 4, 2, 1),
                                         nn.Tanh()))
                continue
            in_ch = enc[i] if i == n - 1 else 2 * enc[i]
            layers = [nn.ReLU(), nn.ConvTranspose2d(in_ch, enc[i - 1], 4, 2, 1, bias=False), _norm(enc[i - 1])]
            if 4 <= i <= n - 2 and cfg.dropout > 0:
                layers.append(nn.Dropout(cfg.dropout))
            ups.append(nn.Sequential(*layers))
        self.ups = nn.ModuleList(ups)
        self.skips = nn.ModuleList([LIA(enc[i], cfg.lia_f) if cfg.lia else nn.Identity() for i in range(n - 1)])
        self.dwmh = DWMH(enc[cfg.dwmh_depth - 1], cfg.dwmh_heads, cfg.dwmh_window) if cfg.dwmh else None
        init_pix2pix_weights(self)

    def forward(self, onehot: torch.Tensor) -> torch.Tensor:
        # No in-place activations in the encoder: each d_i is also a skip (and LIA reads it again).
        cfg = self.cfg
        m = 2**cfg.num_downs
        if onehot.ndim != 4 or onehot.shape[1] != cfg.in_classes or onehot.shape[2] % m or onehot.shape[3] % m:
            raise NoduleSynthError(f"DLPix2PixGenerator: input must be (B, {cfg.in_classes}, H, W) with H, W "
                                   f"divisible by {m}, got {tuple(onehot.shape)}")
        feats = []
        x = onehot
        for i, down in enumerate(self.downs):
            x = down(x)
            if self.dwmh is not None and i == cfg.dwmh_depth - 1:
                x = self.dwmh(x)
            feats.append(x)
        u = self.ups[-1](feats[-1])
        for i in range(cfg.num_downs - 2, -1, -1):
            u = self.ups[i](torch.cat([self.skips[i](feats[i]), u], dim=1))
        return u


class PatchDiscriminator(nn.Module):
    """70×70 PatchGAN (n_layers=3) on concat(one-hot mask, image) → logits map (B, 1, h, w).

    ``return_features=True`` also returns the n_layers+1 intermediate activations for the
    pix2pixHD feature-matching loss.
    """

    def __init__(self, cfg: TranslatorConfig):
        super().__init__()
        self.cfg = cfg
        ndf, n = cfg.ndf, cfg.n_layers_d
        blocks = [nn.Sequential(nn.Conv2d(cfg.in_classes + cfg.out_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True))]
        prev = ndf
        for i in range(1, n + 1):
            ch = ndf * min(2**i, 8)
            stride = 2 if i < n else 1
            blocks.append(nn.Sequential(nn.Conv2d(prev, ch, 4, stride, 1, bias=False), _norm(ch),
                                        nn.LeakyReLU(0.2, True)))
            prev = ch
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Conv2d(prev, 1, 4, 1, 1)
        init_pix2pix_weights(self)

    def forward(self, onehot: torch.Tensor, image: torch.Tensor, return_features: bool = False):
        x = torch.cat([onehot, image.to(onehot.dtype)], dim=1)
        feats = []
        for block in self.blocks:
            x = block(x)
            feats.append(x)
        logits = self.head(x)
        return (logits, feats) if return_features else logits
