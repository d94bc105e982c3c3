"""Stage 2 of TSGAN (paper §3.2): DL-Pix2Pix, mask one-hot → 1-channel CT in [-1, 1].

Generator: the pix2pix UNet (Isola et al.; junyanz ``UnetGenerator`` shapes) written as an
explicit encoder/decoder list, with LIA on the skip connections and DWMH near the bottleneck.
Discriminator: the 70×70 PatchGAN on concat(mask one-hot, image).

Normalisation: ``InstanceNorm2d(affine=True)``. pix2pix trains with BatchNorm at batch size 1
and keeps it in train mode at test time, which *is* instance normalisation; making it explicit
keeps train and inference identical and independent of the batch size (the paper uses batch 1,
we train with larger batches on a GPU).

Texture options (not in the paper; all off by default, so configs written before they existed
load as the paper's network). A mask says nothing about where vessels run, so a deterministic
UNet trained with a large L1 regresses to a blurred mean:
- ``noise``: per-layer Gaussian noise in the decoder, one map per sample scaled by a learned
  per-channel weight (init 0), as StyleGAN's noise inputs and SPADE's noise give the generator a
  source of stochastic detail. Sampling stays a pure function of the inputs: outside training the
  maps come from per-sample CPU generators seeded by ``noise_seeds`` (default seed 0).
- ``upsample="nearest"|"bilinear"``: resize-convolution (upsample, then a 3×3 conv) instead of
  the 4×4 stride-2 transposed conv, whose uneven kernel overlap draws checkerboards (Odena et
  al., "Deconvolution and Checkerboard Artifacts", 2016).
- ``num_d`` > 1: pix2pixHD's multi-scale PatchGAN (the same PatchGAN on the pair downsampled
  by 1, 2, 4, ...), see :class:`MultiScaleDiscriminator`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NoduleSynthError
from .attention import DWMH, LIA

UPSAMPLE_MODES = ("transpose", "nearest", "bilinear")


@dataclass
class TranslatorConfig:
    """DL-Pix2Pix generator + PatchGAN. ``lia`` / ``dwmh`` are the paper's Table 4 ablation switches."""

    in_classes: int = 6
    out_channels: int = 1
    ngf: int = field(default=64, metadata={"help": "generator base channels (pix2pix: 64)"})
    ndf: int = field(default=64, metadata={"help": "PatchGAN base channels (pix2pix: 64)"})
    num_downs: int = field(default=8, metadata={"help": "UNet stride-2 downs (inputs: multiples of 2**num_downs)"})
    lia: bool = field(default=True, metadata={"help": "LIA on the skips (Table 4 ablation)"})
    dwmh: bool = field(default=True, metadata={"help": "DWMH attention (Table 4 ablation)"})
    dwmh_window: int = field(default=8, metadata={"help": "DWMH window size"})
    dwmh_heads: int = field(default=8, metadata={"help": "DWMH heads"})
    # DWMH after this many stride-2 downs: 512 → 16×16 map (see DLPix2PixGenerator)
    dwmh_depth: int = field(default=5, metadata={"help": "DWMH after this many downs (5: 16×16 at 512)"})
    lia_f: int | None = field(default=None, metadata={"help": "LIA squeeze width (default: channels // 4)"})
    # on the innermost decoder layers, as pix2pix (its only noise source)
    dropout: float = field(default=0.5, metadata={"help": "dropout on the inner decoder layers (pix2pix: 0.5)"})
    n_layers_d: int = field(default=3, metadata={"help": "PatchGAN layers (3: 70×70 receptive field)"})
    noise: bool = field(default=False, metadata={"help": "decoder noise inputs, learned per-channel scale "
                                                          "(not in the paper)"})
    upsample: str = field(default="transpose", metadata={
        "help": "decoder upsampling: transpose (paper) or resize-conv nearest/bilinear (against checkerboards)",
        "choices": ("transpose", "nearest", "bilinear")})
    num_d: int = field(default=1, metadata={"help": "PatchGAN scales (pix2pixHD: 2-3; paper: 1)"})

    def __post_init__(self) -> None:
        if self.upsample not in UPSAMPLE_MODES:
            raise NoduleSynthError(f"TranslatorConfig.upsample={self.upsample!r}: use one of {', '.join(UPSAMPLE_MODES)}")
        if not 1 <= self.num_d <= 4:
            raise NoduleSynthError(f"TranslatorConfig.num_d={self.num_d}: must be in 1..4")
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
                ups.append(nn.Sequential(nn.ReLU(), *self._up(2 * enc[0], cfg.out_channels, bias=True), nn.Tanh()))
                continue
            in_ch = enc[i] if i == n - 1 else 2 * enc[i]
            layers = [nn.ReLU(), *self._up(in_ch, enc[i - 1], bias=False), _norm(enc[i - 1])]
            if 4 <= i <= n - 2 and cfg.dropout > 0:
                layers.append(nn.Dropout(cfg.dropout))
            ups.append(nn.Sequential(*layers))
        self.ups = nn.ModuleList(ups)
        # noise after every decoder layer but the outermost (which emits the image), indexed like ups
        self.noises = nn.ModuleList([NoiseInjection(enc[i - 1]) for i in range(1, n)]) if cfg.noise else None
        self.skips = nn.ModuleList([LIA(enc[i], cfg.lia_f) if cfg.lia else nn.Identity() for i in range(n - 1)])
        self.dwmh = DWMH(enc[cfg.dwmh_depth - 1], cfg.dwmh_heads, cfg.dwmh_window) if cfg.dwmh else None
        init_pix2pix_weights(self)

    def _up(self, in_ch: int, out_ch: int, bias: bool) -> list[nn.Module]:
        """One ×2 upsampling conv: the paper's transposed 4×4 conv, or resize + 3×3 conv."""
        if self.cfg.upsample == "transpose":
            return [nn.ConvTranspose2d(in_ch, out_ch, 4, 2, 1, bias=bias)]
        up = (nn.Upsample(scale_factor=2, mode="nearest") if self.cfg.upsample == "nearest"
              else nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
        return [up, nn.Conv2d(in_ch, out_ch, 3, 1, 1, bias=bias)]

    def noise_maps(self, batch: int, height: int, width: int, seeds=None, device=None,
                   dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        """The decoder's noise maps for an input of ``height``×``width``, one (B, 1, h, w) per
        noise layer (``noises[k]`` acts at 1/2^(k+1) of the input size).

        Training (``seeds`` None and ``self.training``): drawn from the global torch RNG on the
        device (saved in checkpoints, so exact resume holds). Otherwise each sample's maps come
        from its own CPU generator seeded by ``seeds[b]`` (default 0 for every sample), so a
        sample's output depends only on (weights, mask, seed), never on batch composition or device."""
        sizes = [(height >> (k + 1), width >> (k + 1)) for k in range(len(self.noises or []))]
        if seeds is None and self.training:
            return [torch.randn(batch, 1, h, w, device=device, dtype=dtype) for h, w in sizes]
        seeds = [0] * batch if seeds is None else [int(s) for s in seeds]
        if len(seeds) != batch:
            raise NoduleSynthError(f"DLPix2PixGenerator: {len(seeds)} noise seeds for a batch of {batch}")
        g = torch.Generator(device="cpu")
        per_sample = []
        for s in seeds:
            g.manual_seed(s & 0xFFFFFFFFFFFFFFFF)
            per_sample.append([torch.randn(1, 1, h, w, generator=g) for h, w in sizes])
        return [torch.cat([p[k] for p in per_sample]).to(device=device, dtype=dtype) for k in range(len(sizes))]

    def forward(self, onehot: torch.Tensor, noise_seeds=None) -> torch.Tensor:
        """``noise_seeds``: one int per sample for the decoder noise (ignored without ``cfg.noise``)."""
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
        noise = (self.noise_maps(onehot.shape[0], onehot.shape[2], onehot.shape[3], noise_seeds, onehot.device)
                 if self.noises is not None else None)
        u = self.ups[-1](feats[-1])
        if noise is not None:
            u = self.noises[-1](u, noise[-1])
        for i in range(cfg.num_downs - 2, -1, -1):
            u = self.ups[i](torch.cat([self.skips[i](feats[i]), u], dim=1))
            if noise is not None and i > 0:
                u = self.noises[i - 1](u, noise[i - 1])
        return u


class NoiseInjection(nn.Module):
    """``x + w_c · n``: one noise map per sample shared by all channels, scaled per channel by a
    learned weight that starts at 0 (StyleGAN's noise input), so training decides how much
    stochastic detail each layer gets."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return x + self.weight.to(x.dtype).view(1, -1, 1, 1) * noise.to(x.dtype)


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


class MultiScaleDiscriminator(nn.Module):
    """pix2pixHD's multi-scale discriminator: ``num_d`` PatchGANs, the k-th sees the (mask, image)
    pair average-pooled k times (3×3, stride 2, as pix2pixHD), so coarse scales judge global
    structure and the finest judges texture. Returns a list with one PatchGAN output per scale."""

    def __init__(self, cfg: TranslatorConfig):
        super().__init__()
        self.cfg = cfg
        self.scales = nn.ModuleList([PatchDiscriminator(cfg) for _ in range(cfg.num_d)])

    def forward(self, onehot: torch.Tensor, image: torch.Tensor, return_features: bool = False) -> list:
        outs = []
        for k, d in enumerate(self.scales):
            if k:
                onehot = F.avg_pool2d(onehot, 3, 2, 1, count_include_pad=False)
                image = F.avg_pool2d(image, 3, 2, 1, count_include_pad=False)
            outs.append(d(onehot, image, return_features=return_features))
        return outs


def build_discriminator(cfg: TranslatorConfig) -> nn.Module:
    """The paper's single PatchGAN for ``num_d == 1`` (same weights layout as before), else multi-scale."""
    return PatchDiscriminator(cfg) if cfg.num_d == 1 else MultiScaleDiscriminator(cfg)


def discriminate(D: nn.Module, onehot: torch.Tensor, image: torch.Tensor,
                 return_features: bool = False) -> list:
    """Any discriminator's output as a list over scales (one entry for a single PatchGAN)."""
    out = D(onehot, image, return_features=return_features)
    return out if isinstance(out, list) else [out]


def min_input_size(cfg: TranslatorConfig) -> int:
    """Smallest training crop: the coarsest PatchGAN scale still needs 2^(n_layers_d + 2) pixels."""
    return 2 ** (cfg.n_layers_d + 2) * 2 ** (cfg.num_d - 1)
