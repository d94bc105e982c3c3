"""Stage 1 of TSGAN (paper §3.1, §4.2): a StyleGAN that draws 6-class semantic lung masks.

Generator: z ~ N(0, I) → pixel-norm → mapping MLP (equalized lr, lr multiplier 0.01) → w;
synthesis from a learned 4×4 constant, per resolution two 3×3 *StyleGAN2 modulated /
demodulated* convolutions (weight demodulation instead of AdaIN: no droplet artefacts, and it is
one grouped conv per layer in plain PyTorch), per-layer noise with a learned per-channel
strength, bias + LeakyReLU(0.2). Progressive growing (as the paper trains it): each level has
its own 1×1 ``to_logits`` and the output at (level, alpha) fades the upsampled previous level's
logits into the new one. Masks are the argmax of the 6 logits.

Discriminator (ProGAN/StyleGAN layout): per-level 1×1 ``from_rgb`` on the one-hot / softmax
mask, conv–conv–avgpool blocks, fade-in of the downsampled input path, minibatch-stddev
(group 4) before the final 4×4 block, linear score. All layers use the equalized learning rate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NoduleSynthError

_LRELU_GAIN = math.sqrt(2.0)  # keeps activation variance ≈ 1 after LeakyReLU(0.2) (StyleGAN2)


@dataclass
class MaskGANConfig:
    """Both networks of the mask StyleGAN. Channels at resolution r: min(fmap_max, max(fmap_min, fmap_base // r))."""

    resolution: int = field(default=512, metadata={"help": "final mask size (4·2^k; paper: 512)"})
    num_classes: int = 6
    z_dim: int = field(default=512, metadata={"help": "latent size (paper: 512)"})
    w_dim: int | None = field(default=None, metadata={"help": "style size (default: --z-dim)"})
    mapping_layers: int = field(default=8, metadata={"help": "mapping network depth (StyleGAN: 8)"})
    fmap_base: int = field(default=8192, metadata={"help": "channel budget: channels at res r = base / r"})
    fmap_max: int = field(default=512, metadata={"help": "most channels at any resolution"})
    fmap_min: int = field(default=16, metadata={"help": "fewest channels at any resolution"})
    mapping_lr_mul: float = field(default=0.01, metadata={"help": "mapping network LR multiplier (StyleGAN)"})
    w_avg_beta: float = field(default=0.995, metadata={"help": "decay of the tracked mean w (truncation)"})
    mbstd_group: int = field(default=4, metadata={"help": "minibatch-stddev group size of D"})

    def __post_init__(self) -> None:
        if self.w_dim is None:
            self.w_dim = self.z_dim
        r = self.resolution
        if r < 4 or r & (r - 1):
            raise NoduleSynthError(f"MaskGANConfig.resolution={r}: must be a power of two >= 4")
        if self.num_classes < 2:
            raise NoduleSynthError(f"MaskGANConfig.num_classes={self.num_classes}: need at least 2 classes")

    @property
    def num_levels(self) -> int:
        """Levels 0..num_levels-1; level 0 is 4×4, the last is ``resolution``."""
        return int(math.log2(self.resolution)) - 1

    def channels(self, res: int) -> int:
        return min(self.fmap_max, max(self.fmap_min, self.fmap_base // res))


def _check_level(cfg: MaskGANConfig, level: int | None) -> int:
    if level is None:
        return cfg.num_levels - 1
    if not 0 <= level < cfg.num_levels:
        raise NoduleSynthError(f"level={level}: must be in 0..{cfg.num_levels - 1} for resolution {cfg.resolution}")
    return int(level)


class EqLinear(nn.Module):
    """Fully connected layer with the equalized learning rate: weights ~ N(0, 1/lr_mul), scaled at run time."""

    def __init__(self, in_f: int, out_f: int, lr_mul: float = 1.0, bias_init: float = 0.0, act: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_f, in_f) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_f,), float(bias_init)))
        self.w_gain, self.b_gain, self.act = lr_mul / math.sqrt(in_f), lr_mul, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.linear(x, self.weight * self.w_gain, self.bias * self.b_gain)
        return F.leaky_relu(x, 0.2) * _LRELU_GAIN if self.act else x


class EqConv2d(nn.Module):
    """Conv (stride 1, 'same' padding) with the equalized learning rate, optional LeakyReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, act: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.gain, self.act, self.pad = 1.0 / math.sqrt(in_ch * kernel * kernel), act, kernel // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight * self.gain, self.bias, padding=self.pad)
        return F.leaky_relu(x, 0.2) * _LRELU_GAIN if self.act else x


class ModulatedConv(nn.Module):
    """StyleGAN2 layer: 3×3 conv modulated by the style of w, demodulated, + noise + bias + LeakyReLU.

    The per-sample weights run as one grouped convolution (groups = batch). ``res`` fixes the
    size of the constant noise buffer used by noise_mode="const".
    """

    def __init__(self, in_ch: int, out_ch: int, w_dim: int, res: int, kernel: int = 3):
        super().__init__()
        self.affine = EqLinear(w_dim, in_ch, bias_init=1.0)  # styles start at 1 (identity modulation)
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.noise_strength = nn.Parameter(torch.zeros(out_ch))
        self.register_buffer("noise_const", torch.randn(1, 1, res, res))
        self.gain, self.pad = 1.0 / math.sqrt(in_ch * kernel * kernel), kernel // 2

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "random") -> torch.Tensor:
        b, c, h, wd = x.shape
        s = self.affine(w)  # (B, in)
        weight = self.weight[None] * self.gain * s[:, None, :, None, None]  # (B, out, in, k, k)
        weight = weight * torch.rsqrt(weight.square().sum(dim=(2, 3, 4), keepdim=True) + 1e-8)
        out_ch = weight.shape[1]
        y = F.conv2d(x.reshape(1, b * c, h, wd), weight.reshape(b * out_ch, c, *weight.shape[3:]),
                     padding=self.pad, groups=b).reshape(b, out_ch, h, wd)
        if noise_mode == "random":
            y = y + torch.randn(b, 1, h, wd, device=y.device, dtype=y.dtype) * self.noise_strength.view(1, -1, 1, 1)
        elif noise_mode == "const":
            y = y + self.noise_const.to(y.dtype) * self.noise_strength.view(1, -1, 1, 1)
        elif noise_mode != "none":
            raise NoduleSynthError(f"noise_mode={noise_mode!r}: use 'random', 'const' or 'none'")
        return F.leaky_relu(y + self.bias.view(1, -1, 1, 1), 0.2) * _LRELU_GAIN


class MaskGenerator(nn.Module):
    """z (B, z_dim) → class logits (B, num_classes, r, r), r = 4·2**level."""

    def __init__(self, cfg: MaskGANConfig):
        super().__init__()
        self.cfg = cfg
        layers = [EqLinear(cfg.z_dim if i == 0 else cfg.w_dim, cfg.w_dim, lr_mul=cfg.mapping_lr_mul, act=True)
                  for i in range(cfg.mapping_layers)]
        self.mapping_net = nn.Sequential(*layers)
        self.register_buffer("w_avg", torch.zeros(cfg.w_dim))
        self.const = nn.Parameter(torch.randn(1, cfg.channels(4), 4, 4))
        self.convs = nn.ModuleList()
        self.to_logits = nn.ModuleList()
        prev = cfg.channels(4)
        for level in range(cfg.num_levels):
            res = 4 * 2**level
            ch = cfg.channels(res)
            self.convs.append(nn.ModuleList([ModulatedConv(prev, ch, cfg.w_dim, res),
                                             ModulatedConv(ch, ch, cfg.w_dim, res)]))
            self.to_logits.append(EqConv2d(ch, cfg.num_classes, 1, act=False))
            prev = ch

    @property
    def num_levels(self) -> int:
        return self.cfg.num_levels

    @property
    def num_ws(self) -> int:
        """Number of style inputs (two per level), for style mixing with per-layer ``ws``."""
        return 2 * self.cfg.num_levels

    def mapping(self, z: torch.Tensor, truncation_psi: float = 1.0, update_w_avg: bool | None = None) -> torch.Tensor:
        """z → w. In training mode the running mean ``w_avg`` (the truncation centre) is updated."""
        if z.ndim != 2 or z.shape[1] != self.cfg.z_dim:
            raise NoduleSynthError(f"z: expected shape (B, {self.cfg.z_dim}), got {tuple(z.shape)}")
        z = z * torch.rsqrt(z.square().mean(dim=1, keepdim=True) + 1e-8)  # pixel norm
        w = self.mapping_net(z)
        update = self.training if update_w_avg is None else update_w_avg
        if update:
            with torch.no_grad():
                self.w_avg.copy_(w.detach().float().mean(0).lerp(self.w_avg, self.cfg.w_avg_beta))
        if truncation_psi != 1.0:
            w = self.w_avg.to(w.dtype).lerp(w, truncation_psi)
        return w

    def synthesis(self, ws: torch.Tensor, level: int | None = None, alpha: float = 1.0,
                  noise_mode: str = "random") -> torch.Tensor:
        """ws: (B, w_dim) shared by all layers, or (B, num_ws, w_dim) per layer (style mixing)."""
        level = _check_level(self.cfg, level)
        if ws.ndim == 2:
            ws = ws[:, None].expand(-1, self.num_ws, -1)
        x = self.const.to(ws.dtype).repeat(ws.shape[0], 1, 1, 1)  # not a view: FlopCounterMode-safe
        prev_logits = None
        for lv in range(level + 1):
            if lv > 0:
                x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            c0, c1 = self.convs[lv]
            x = c1(c0(x, ws[:, 2 * lv], noise_mode), ws[:, 2 * lv + 1], noise_mode)
            if lv == level - 1 and alpha < 1.0:
                prev_logits = self.to_logits[lv](x)
        logits = self.to_logits[level](x)
        if prev_logits is not None:
            prev_logits = F.interpolate(prev_logits, scale_factor=2, mode="bilinear", align_corners=False)
            # under CUDA autocast the upsample runs in fp32 and the 1×1 conv in bf16: one dtype for lerp
            logits = torch.lerp(prev_logits.to(logits.dtype), logits, float(alpha))
        return logits

    def forward(self, z: torch.Tensor, level: int | None = None, alpha: float = 1.0, truncation_psi: float = 1.0,
                noise_mode: str = "random") -> torch.Tensor:
        return self.synthesis(self.mapping(z, truncation_psi), level, alpha, noise_mode)

    @torch.no_grad()
    def sample(self, z: torch.Tensor, truncation_psi: float = 1.0, noise_mode: str = "const",
               size: int | None = None) -> torch.Tensor:
        """uint8 label masks (B, S, S): argmax of the full-resolution logits (resized to ``size`` first)."""
        w = self.mapping(z, truncation_psi, update_w_avg=False)
        logits = self.synthesis(w, None, 1.0, noise_mode)
        if size is not None and size != logits.shape[-1]:
            logits = F.interpolate(logits.float(), size=(size, size), mode="bilinear", align_corners=False)
        # argmax over a contiguous last dim: the same result, ~4x faster on CPU than over strided dim 1
        return logits.permute(0, 2, 3, 1).contiguous().argmax(dim=-1).to(torch.uint8)


def minibatch_stddev(x: torch.Tensor, group: int = 4) -> torch.Tensor:
    """Append one channel: the std over groups of samples, averaged (ProGAN). The group shrinks to
    the largest divisor of the batch that is <= ``group``, so any batch size works."""
    b, c, h, w = x.shape
    g = min(group, b)
    while b % g:
        g -= 1
    y = x.float().reshape(g, -1, c, h, w)
    y = (y.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # (B/g,)
    y = y.reshape(-1, 1, 1, 1).repeat(g, 1, h, w).to(x.dtype)
    return torch.cat([x, y], dim=1)


class MaskDiscriminator(nn.Module):
    """(B, num_classes, r, r) one-hot (real) / softmax (fake) masks → (B,) WGAN scores."""

    def __init__(self, cfg: MaskGANConfig):
        super().__init__()
        self.cfg = cfg
        self.from_rgb = nn.ModuleList()
        self.blocks = nn.ModuleList()  # blocks[level] maps r → r/2; blocks[0] is unused (final block)
        for level in range(cfg.num_levels):
            res = 4 * 2**level
            ch = cfg.channels(res)
            self.from_rgb.append(EqConv2d(cfg.num_classes, ch, 1, act=True))
            if level == 0:
                self.blocks.append(nn.Identity())
            else:
                self.blocks.append(nn.Sequential(EqConv2d(ch, ch, 3), EqConv2d(ch, cfg.channels(res // 2), 3),
                                                 nn.AvgPool2d(2)))
        c4 = cfg.channels(4)
        self.final_conv = EqConv2d(c4 + 1, c4, 3)
        self.final_fc = EqLinear(c4 * 16, c4, act=True)
        self.out = EqLinear(c4, 1)

    @property
    def num_levels(self) -> int:
        return self.cfg.num_levels

    def forward(self, x: torch.Tensor, level: int | None = None, alpha: float = 1.0) -> torch.Tensor:
        level = _check_level(self.cfg, level)
        res = 4 * 2**level
        if x.ndim != 4 or x.shape[1] != self.cfg.num_classes or x.shape[-2:] != (res, res):
            raise NoduleSynthError(f"MaskDiscriminator at level {level}: expected (B, {self.cfg.num_classes}, "
                                   f"{res}, {res}), got {tuple(x.shape)}")
        h = self.from_rgb[level](x)
        if level > 0:
            h = self.blocks[level](h)
            if alpha < 1.0:
                h = torch.lerp(self.from_rgb[level - 1](F.avg_pool2d(x, 2)), h, float(alpha))
            for lv in range(level - 1, 0, -1):
                h = self.blocks[lv](h)
        h = self.final_conv(minibatch_stddev(h, self.cfg.mbstd_group))
        return self.out(self.final_fc(h.flatten(1))).squeeze(1)
