"""The two attention blocks of DL-Pix2Pix (paper §3.2): LIA (eqs. 3–4) and DWMH (eqs. 5–7).

Plain PyTorch, no custom kernels, safe under bf16/fp16 autocast and channels_last.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NoduleSynthError


def soft_pool2d(x: torch.Tensor, kernel: int = 7, stride: int = 3) -> torch.Tensor:
    """SoftPool (eq. 4): AvgPool(x·eˣ) / AvgPool(eˣ) = Σ_win x·eˣ / Σ_win eˣ, computed stably.

    A naive ``exp`` overflows in bf16/fp16 (and in fp32 above ~88). The ratio is unchanged when
    every term of a window is multiplied by e^(−m), so we subtract each window's own max ``m``:
    all exponents are ≤ 0, the denominator is ≥ 1, nothing overflows or divides by zero. The
    windows are gathered with ``unfold`` (a view; k²/s² ≈ 5.4× the input once materialised),
    and the arithmetic runs in at least fp32 (fp16/bf16 inputs are upcast, then cast back).
    No padding (as PlainUSR's ``AvgPool2d(7, 3)``); callers handle maps smaller than ``kernel``.
    """
    h, w = x.shape[-2:]
    if h < kernel or w < kernel:
        raise ValueError(f"soft_pool2d: map {h}x{w} is smaller than the {kernel}x{kernel} window")
    xs = x.to(torch.promote_types(x.dtype, torch.float32)).unfold(2, kernel, stride).unfold(3, kernel, stride)  # (B, C, oh, ow, k, k)
    m = xs.detach().amax(dim=(-2, -1), keepdim=True)  # the result is invariant to m: no gradient
    e = torch.exp(xs - m)
    out = (xs * e).sum(dim=(-2, -1)) / e.sum(dim=(-2, -1))
    return out.to(x.dtype)


class SoftPool2d(nn.Module):
    """Module wrapper of :func:`soft_pool2d` (kernel 7, stride 3 in LIA)."""

    def __init__(self, kernel: int = 7, stride: int = 3):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return soft_pool2d(x, self.kernel, self.stride)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}, stride={self.stride}"


class LIA(nn.Module):
    """Local Importance-based Attention (eq. 3): ``out = X · W · g``.

    W: 1×1 conv (C→f) → SoftPool k7 s3 → 3×3 s2 conv → 3×3 conv (f→C) → sigmoid, bilinearly
    resized to H×W. g = sigmoid(X[:, :1]), a per-pixel gate from channel 0 broadcast over the
    channels — this is what the reference implementation (PlainUSR's ``LocalAttention``) does;
    the paper's text calls g a "channel gating factor", but its eq. 3 is that code.

    Small maps: SoftPool needs a 7×7 window. A map with H or W < 7 (the deep skips of a UNet:
    4×4, 2×2, 1×1) is first replicate-padded up to 7 in that dimension — replicate, because
    reflect needs a pad smaller than the size and zeros would bias the soft maximum. A 1×1 map
    thus pools to its own value; the heatmap is then resized back to H×W as usual. So LIA
    works for every H, W ≥ 1 and equals the plain formula whenever H, W ≥ 7.
    """

    def __init__(self, channels: int, f: int | None = None, pool_kernel: int = 7, pool_stride: int = 3):
        super().__init__()
        f = max(1, channels // 4) if f is None else int(f)
        self.channels, self.f = channels, f
        self.pool_kernel = pool_kernel
        self.reduce = nn.Conv2d(channels, f, 1)
        self.pool = SoftPool2d(pool_kernel, pool_stride)
        self.down = nn.Conv2d(f, f, 3, stride=2, padding=1)
        self.expand = nn.Conv2d(f, channels, 3, padding=1)

    def heatmap(self, x: torch.Tensor) -> torch.Tensor:
        """W ∈ [0,1]^(B,C,H,W): the spatial importance map, already resized to the input."""
        h, w = x.shape[-2:]
        y = self.reduce(x)
        k = self.pool_kernel
        if h < k or w < k:
            ph, pw = max(0, k - h), max(0, k - w)
            y = F.pad(y, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode="replicate")
        y = self.expand(self.down(self.pool(y)))
        return F.interpolate(torch.sigmoid(y), size=(h, w), mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(x[:, :1])
        return x * self.heatmap(x) * g


class DWMH(nn.Module):
    """Dynamically Weighted Multi-Head window attention (eqs. 5–7).

    Q, K, V from 1×1 convs (one fused conv with 3C outputs, identical to three separate ones);
    the map is cut into non-overlapping s×s windows; per head (d_k = C / heads) softmax(QKᵀ/√d_k)V
    via ``F.scaled_dot_product_attention`` (flash/memory-efficient kernels on GPU), each head
    scaled by its learnable weight W_h (init 1), an optional 1×1 output projection, and
    ``out = γ · heads + X`` with γ = 0 at init, so the block starts as the exact identity.

    Sizes: the window is min(s, H) × min(s, W), so a map smaller than s attends globally; if H
    or W is not a multiple of it, Q/K/V are zero-padded and the padded keys are masked out of
    the softmax (every window still holds a real pixel), and the output is cropped back.
    """

    def __init__(self, channels: int, heads: int = 8, window: int = 8, out_proj: bool = True):
        super().__init__()
        if heads < 1 or channels % heads:
            raise NoduleSynthError(f"DWMH: channels={channels} is not divisible by heads={heads}")
        if window < 1:
            raise NoduleSynthError(f"DWMH: window must be >= 1, got {window}")
        self.channels, self.heads, self.window = channels, heads, window
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.head_weight = nn.Parameter(torch.ones(heads))
        self.proj = nn.Conv2d(channels, channels, 1) if out_proj else nn.Identity()
        self.gamma = nn.Parameter(torch.zeros(1))

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """The weighted multi-head window attention Σ_h W_h·Attn_h V_h (before γ and the residual)."""
        b, c, h, w = x.shape
        nh, d = self.heads, c // self.heads
        sh, sw = min(self.window, h), min(self.window, w)
        ph, pw = (-h) % sh, (-w) % sw
        qkv = self.qkv(x)
        if ph or pw:
            qkv = F.pad(qkv, (0, pw, 0, ph))
        hp, wp = h + ph, w + pw
        gh, gw = hp // sh, wp // sw
        # (B, 3, heads, d, gh, sh, gw, sw) → (3, B·gh·gw, heads, sh·sw, d)
        qkv = qkv.reshape(b, 3, nh, d, gh, sh, gw, sw).permute(1, 0, 4, 6, 2, 5, 7, 3)
        q, k, v = qkv.reshape(3, b * gh * gw, nh, sh * sw, d).unbind(0)
        mask = None
        if ph or pw:
            valid = torch.zeros(hp, wp, dtype=torch.bool, device=x.device)
            valid[:h, :w] = True
            valid = valid.reshape(gh, sh, gw, sw).permute(0, 2, 1, 3).reshape(1, gh * gw, 1, 1, sh * sw)
            mask = valid.expand(b, -1, -1, -1, -1).reshape(b * gh * gw, 1, 1, sh * sw)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # scale = 1/sqrt(d)
        o = o * self.head_weight.to(o.dtype).view(1, nh, 1, 1)
        o = o.reshape(b, gh, gw, nh, sh, sw, d).permute(0, 3, 6, 1, 4, 2, 5).reshape(b, c, hp, wp)
        return self.proj(o[:, :, :h, :w])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gamma * self.attend(x) + x

    def extra_repr(self) -> str:
        return f"channels={self.channels}, heads={self.heads}, window={self.window}"
