"""LIA, SoftPool and DWMH against their equations (paper eqs. 3–7)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nodulesynth.errors import NoduleSynthError
from nodulesynth.models.attention import DWMH, LIA, soft_pool2d


def _softpool_formula(x: torch.Tensor, k: int = 7, s: int = 3) -> torch.Tensor:
    """Eq. (4) literally: AvgPool(X·e^X) / AvgPool(e^X), in fp64."""
    x = x.double()
    return F.avg_pool2d(x * x.exp(), k, s) / F.avg_pool2d(x.exp(), k, s)


def test_softpool_equals_formula_fp32():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 20, 17) * 3
    out = soft_pool2d(x)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 5, 4)
    torch.testing.assert_close(out.double(), _softpool_formula(x), rtol=1e-5, atol=1e-5)


def test_softpool_large_inputs_stay_finite_in_bf16():
    torch.manual_seed(0)
    x = (torch.randn(1, 4, 16, 16) * 1e4).bfloat16().requires_grad_(True)
    naive = F.avg_pool2d(x * x.exp(), 7, 3) / F.avg_pool2d(x.exp(), 7, 3)
    assert not torch.isfinite(naive).all()  # the formula as written overflows
    out = soft_pool2d(x, 7, 3)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    # with a spread of ~1e4 the soft maximum is the window maximum (up to bf16 rounding)
    torch.testing.assert_close(out.float(), F.max_pool2d(x.detach().float(), 7, 3), rtol=1e-2, atol=1.0)
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all()


def test_softpool_under_autocast_bf16():
    x = torch.randn(1, 2, 9, 9) * 50
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = soft_pool2d(x.bfloat16())
    torch.testing.assert_close(out.double(), _softpool_formula(x.bfloat16().float()), rtol=2e-2, atol=0.5)


def test_lia_equals_x_w_g_by_hand():
    torch.manual_seed(0)
    lia = LIA(12, f=4).double()
    x = torch.randn(2, 12, 23, 19, dtype=torch.float64)
    y = F.conv2d(x, lia.reduce.weight, lia.reduce.bias)
    y = _softpool_formula(y)
    y = F.conv2d(y, lia.down.weight, lia.down.bias, stride=2, padding=1)
    y = F.conv2d(y, lia.expand.weight, lia.expand.bias, padding=1)
    w = F.interpolate(torch.sigmoid(y), size=(23, 19), mode="bilinear", align_corners=False)
    g = torch.sigmoid(x[:, :1])
    torch.testing.assert_close(lia(x), x * w * g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("hw", [(1, 1), (2, 5), (4, 4), (6, 9), (7, 7), (64, 48)])
def test_lia_any_size(hw):
    lia = LIA(8)
    x = torch.randn(2, 8, *hw, requires_grad=True)
    out = lia(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_lia_small_map_is_replicate_padded():
    """A 3×3 map pools exactly like its replicate-padded 7×7 version."""
    torch.manual_seed(0)
    lia = LIA(4, f=2).double()
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    y = F.pad(F.conv2d(x, lia.reduce.weight, lia.reduce.bias), (2, 2, 2, 2), mode="replicate")
    y = lia.expand(lia.down(_softpool_formula(y)))
    w = F.interpolate(torch.sigmoid(y), size=(3, 3), mode="bilinear", align_corners=False)
    torch.testing.assert_close(lia.heatmap(x), w)


@pytest.mark.parametrize("hw", [(16, 16), (10, 13), (3, 5)])
def test_dwmh_is_identity_at_init(hw):
    torch.manual_seed(0)
    m = DWMH(16, heads=4, window=8)
    x = torch.randn(2, 16, *hw)
    assert torch.equal(m(x), x)
    m(x).sum().backward()
    assert m.gamma.grad is not None and m.gamma.grad.abs() > 0  # γ can learn away from 0


def _dwmh_reference(m: DWMH, x: torch.Tensor) -> torch.Tensor:
    """Eqs. 5–7 with explicit loops over windows and heads, only real pixels per window."""
    b, c, h, w = x.shape
    nh, d, s = m.heads, c // m.heads, m.window
    sh, sw = min(s, h), min(s, w)
    q, k, v = m.qkv(x).chunk(3, dim=1)
    out = torch.zeros_like(x)
    for i0 in range(0, h, sh):
        for j0 in range(0, w, sw):
            win = (slice(None), slice(None), slice(i0, i0 + sh), slice(j0, j0 + sw))
            qi, ki, vi = (t[win] for t in (q, k, v))
            hh, ww = qi.shape[-2:]
            for head in range(nh):
                ch = slice(head * d, (head + 1) * d)
                qq, kk, vv = (t[:, ch].flatten(2).transpose(1, 2) for t in (qi, ki, vi))  # (B, L, d)
                attn = torch.softmax(qq @ kk.transpose(1, 2) / math.sqrt(d), dim=-1)
                o = (attn @ vv) * m.head_weight[head]
                out[:, ch, i0:i0 + hh, j0:j0 + ww] = o.transpose(1, 2).reshape(b, d, hh, ww)
    return m.gamma * m.proj(out) + x


@pytest.mark.parametrize("hw", [(16, 16), (10, 13), (3, 5)])
def test_dwmh_matches_equations(hw):
    torch.manual_seed(0)
    m = DWMH(16, heads=4, window=8).double()
    with torch.no_grad():
        m.gamma.fill_(0.7)
        m.head_weight.copy_(torch.tensor([0.5, 1.0, -2.0, 3.0]))
    x = torch.randn(2, 16, *hw, dtype=torch.float64)
    torch.testing.assert_close(m(x), _dwmh_reference(m, x))


def test_dwmh_channels_last_and_bad_heads():
    m = DWMH(16, heads=4, window=4)
    with torch.no_grad():
        m.gamma.fill_(1.0)
    x = torch.randn(1, 16, 12, 12)
    torch.testing.assert_close(m(x.contiguous(memory_format=torch.channels_last)), m(x))
    with pytest.raises(NoduleSynthError, match="heads"):
        DWMH(10, heads=4)
