"""Shapes, progressive growing, losses and a few optimisation steps of both TSGAN stages (tiny, CPU)."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from nodulesynth.errors import NoduleSynthError
from nodulesynth.models.losses import (PerceptualLoss, feature_matching_loss, gan_loss, gradient_penalty, l1_loss,
                                       wgan_d_loss, wgan_g_loss, wgan_gp_d_loss)
from nodulesynth.models.pix2pix import DLPix2PixGenerator, PatchDiscriminator, TranslatorConfig, one_hot
from nodulesynth.models.stylegan import MaskDiscriminator, MaskGANConfig, MaskGenerator


def tiny_mask_cfg(resolution: int = 64) -> MaskGANConfig:
    return MaskGANConfig(resolution=resolution, z_dim=16, w_dim=16, mapping_layers=2, fmap_base=128, fmap_max=16,
                         fmap_min=4)


# ---------------------------------------------------------------- stage 1

@pytest.mark.parametrize("resolution", [64, 512])
def test_mask_gan_shapes_all_levels(resolution):
    torch.manual_seed(0)
    cfg = tiny_mask_cfg(resolution)
    G, D = MaskGenerator(cfg), MaskDiscriminator(cfg)
    assert G.num_levels == cfg.num_levels == {64: 5, 512: 8}[resolution]
    z = torch.randn(3, cfg.z_dim)
    levels = range(cfg.num_levels) if resolution == 64 else [0, 3, cfg.num_levels - 1]
    for lv in levels:
        for alpha in (0.5, 1.0):
            logits = G(z, level=lv, alpha=alpha)
            r = 4 * 2**lv
            assert logits.shape == (3, 6, r, r) and torch.isfinite(logits).all()
            score = D(logits.softmax(1), level=lv, alpha=alpha)
            assert score.shape == (3,) and torch.isfinite(score).all()
    assert G(z).shape == (3, 6, resolution, resolution)
    masks = G.sample(z, size=2 * resolution if resolution == 64 else None)
    assert masks.dtype == torch.uint8 and masks.max() < 6
    assert masks.shape == (3, 128, 128) if resolution == 64 else (3, 512, 512)


def test_fade_in_alpha_zero_is_upsampled_previous_level():
    torch.manual_seed(0)
    G = MaskGenerator(tiny_mask_cfg(32)).eval()
    z = torch.randn(2, 16)
    for lv in (1, 2, 3):
        prev = G(z, level=lv - 1, noise_mode="const")
        up = F.interpolate(prev, scale_factor=2, mode="bilinear", align_corners=False)
        torch.testing.assert_close(G(z, level=lv, alpha=0.0, noise_mode="const"), up)
        assert not torch.allclose(G(z, level=lv, alpha=1.0, noise_mode="const"), up)


def test_noise_modes_truncation_and_w_avg():
    torch.manual_seed(0)
    G = MaskGenerator(tiny_mask_cfg(16))
    with torch.no_grad():
        for conv_pair in G.convs:
            for conv in conv_pair:
                conv.noise_strength.fill_(1.0)
    z = torch.randn(4, 16)
    G.eval()
    assert torch.equal(G(z, noise_mode="const"), G(z, noise_mode="const"))
    assert not torch.equal(G(z, noise_mode="random"), G(z, noise_mode="random"))
    with pytest.raises(NoduleSynthError, match="noise_mode"):
        G(z, noise_mode="bogus")
    # w_avg moves only in training mode, never in sample()
    before = G.w_avg.clone()
    G.sample(z)
    assert torch.equal(G.w_avg, before)
    G.train()
    G(z)
    assert not torch.equal(G.w_avg, before)
    # psi = 0 collapses every z to the mean w
    out = G.eval()(torch.randn(3, 16), truncation_psi=0.0, noise_mode="const")
    torch.testing.assert_close(out, out[:1].expand_as(out))


def test_mask_discriminator_bad_input_and_odd_batch():
    cfg = tiny_mask_cfg(16)
    D = MaskDiscriminator(cfg)
    assert D(torch.rand(3, 6, 16, 16)).shape == (3,)  # batch 3 not divisible by the mbstd group of 4
    with pytest.raises(NoduleSynthError, match="expected"):
        D(torch.rand(2, 6, 8, 8))  # level None = full resolution 16
    with pytest.raises(NoduleSynthError, match="level"):
        D(torch.rand(2, 6, 8, 8), level=9)
    with pytest.raises(NoduleSynthError, match="power of two"):
        MaskGANConfig(resolution=100)


def test_gradient_penalty_exact_on_linear_critic():
    a = torch.tensor([3.0, 4.0]).view(1, 2, 1, 1)  # ‖∇D‖ = 5 everywhere

    def D(x):
        return (x * a).flatten(1).sum(1)

    real, fake = torch.randn(4, 2, 1, 1), torch.randn(4, 2, 1, 1)
    assert gradient_penalty(D, real, fake).item() == pytest.approx(10 * (5 - 1) ** 2)
    d_real, d_fake = torch.tensor([1.0, 3.0]), torch.tensor([0.5, -0.5])
    assert wgan_d_loss(d_real, d_fake).item() == pytest.approx(0.0 - 2.0 + 0.001 * 5.0)
    assert wgan_g_loss(d_fake).item() == pytest.approx(0.0)


def test_wgan_gp_step_on_mask_gan():
    torch.manual_seed(0)
    cfg = tiny_mask_cfg(16)
    G, D = MaskGenerator(cfg), MaskDiscriminator(cfg)
    real = one_hot(torch.randint(0, 6, (4, 8, 8)))
    fake = G(torch.randn(4, 16), level=1, alpha=0.3).softmax(1)
    loss, parts = wgan_gp_d_loss(D, real, fake, level=1, alpha=0.3)
    loss.backward()
    assert set(parts) == {"d_real", "d_fake", "gp", "drift"}
    assert all(torch.isfinite(p.grad).all() for p in D.parameters() if p.grad is not None)
    assert G.const.grad is None  # fake was detached for the D step
    wgan_g_loss(D(fake, level=1, alpha=0.3)).backward()
    assert torch.isfinite(G.const.grad).all() and G.const.grad.abs().sum() > 0


# ---------------------------------------------------------------- stage 2

@pytest.mark.parametrize("size,num_downs", [(64, 6), (512, 8)])
def test_translator_shapes(size, num_downs):
    torch.manual_seed(0)
    cfg = TranslatorConfig(ngf=8, ndf=8, num_downs=num_downs)
    G, D = DLPix2PixGenerator(cfg), PatchDiscriminator(cfg)
    x = one_hot(torch.randint(0, 6, (1, size, size)))
    with torch.no_grad():
        y = G(x)
        assert y.shape == (1, 1, size, size) and y.abs().max() <= 1
        logits, feats = D(x, y, return_features=True)
    side = size // 8 - 2  # three stride-2 convs, then two 4×4 stride-1 convs with padding 1
    assert logits.shape == (1, 1, side, side) and len(feats) == cfg.n_layers_d + 1


def test_translator_rejects_bad_sizes_and_configs():
    G = DLPix2PixGenerator(TranslatorConfig(ngf=4, ndf=4, num_downs=4, dwmh_depth=3, dwmh_heads=4))
    with pytest.raises(NoduleSynthError, match="divisible by 16"):
        G(one_hot(torch.zeros(1, 24, 24, dtype=torch.long)))
    with pytest.raises(NoduleSynthError, match="dwmh_depth"):
        TranslatorConfig(num_downs=4, dwmh_depth=5)
    with pytest.raises(NoduleSynthError, match="0..5"):
        one_hot(torch.full((1, 2, 2), 6))


def test_ablation_switches():
    base = dict(ngf=8, ndf=8, num_downs=5, dwmh_depth=3, dwmh_heads=4)
    full = DLPix2PixGenerator(TranslatorConfig(**base))
    plain = DLPix2PixGenerator(TranslatorConfig(**base, lia=False, dwmh=False))
    assert full.dwmh is not None and plain.dwmh is None
    assert all(isinstance(s, torch.nn.Identity) for s in plain.skips)
    assert sum(p.numel() for p in plain.parameters()) < sum(p.numel() for p in full.parameters())
    x = one_hot(torch.randint(0, 6, (1, 32, 32)))
    assert plain(x).shape == full(x).shape == (1, 1, 32, 32)


def test_translator_channels_last_matches():
    torch.manual_seed(0)
    G = DLPix2PixGenerator(TranslatorConfig(ngf=8, ndf=8, num_downs=5, dwmh_depth=3, dwmh_heads=4)).eval()
    with torch.no_grad():
        G.dwmh.gamma.fill_(1.0)
        x = one_hot(torch.randint(0, 6, (2, 32, 32)))
        ref = G(x)
        G_cl = G.to(memory_format=torch.channels_last)
        out = G_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_pix2pix_steps_lower_l1():
    torch.manual_seed(0)
    cfg = TranslatorConfig(ngf=8, ndf=8, num_downs=5, dwmh_depth=3, dwmh_heads=4, dropout=0.0)
    G, D = DLPix2PixGenerator(cfg), PatchDiscriminator(cfg)
    labels = torch.randint(0, 6, (2, 32, 32))
    x = one_hot(labels)
    target = (labels.float() / 2.5 - 1).unsqueeze(1)  # a CT-like image that depends on the mask
    opt = torch.optim.Adam(G.parameters(), lr=5e-3, betas=(0.5, 0.999))
    losses = []
    for _ in range(25):
        fake = G(x)
        logits, fake_feats = D(x, fake, return_features=True)
        _, real_feats = D(x, target, return_features=True)
        l1 = l1_loss(fake, target)
        loss = gan_loss(logits, True) + 200 * l1 + feature_matching_loss(real_feats, fake_feats)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(l1.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_gan_and_feature_matching_losses():
    logits = torch.tensor([[[[0.5, 2.0]]]])
    assert gan_loss(logits, True).item() == pytest.approx(((0.5 - 1) ** 2 + 1) / 2)
    assert gan_loss(logits, False, mode="bce").item() == pytest.approx(
        F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits)).item())
    with pytest.raises(NoduleSynthError, match="lsgan"):
        gan_loss(logits, True, mode="hinge")
    f = [torch.ones(1, 2, 3, 3), torch.zeros(1, 4, 2, 2)]
    assert feature_matching_loss(f, f).item() == 0
    assert feature_matching_loss(f, [t + 0.5 for t in f]).item() == pytest.approx(1.0)


def _vgg_features_state() -> dict:
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    return {f"features.{k}": v for k, v in make_layers(cfgs["E"]).state_dict().items()}


def test_perceptual_loss_sources(tmp_path, monkeypatch, caplog):
    from safetensors.torch import save_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with caplog.at_level(logging.WARNING, logger="nodulesynth.models.losses"):
        assert PerceptualLoss.try_create() is None
    assert "feature-matching" in caplog.text
    state = _vgg_features_state()
    # 1) the torch hub cache file (torch.save state dict, read with weights_only=True)
    cache = tmp_path / "torch_home" / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth"
    cache.parent.mkdir(parents=True)
    torch.save(state, cache)
    loss = PerceptualLoss.try_create()
    assert loss is not None and loss.source == str(cache)
    # 2) a user safetensors file
    st = tmp_path / "vgg.safetensors"
    save_file(state, str(st))
    loss = PerceptualLoss.try_create(st)
    real = torch.rand(1, 1, 32, 32) * 2 - 1
    fake = (real + 0.3 * torch.randn_like(real)).clamp(-1, 1).requires_grad_(True)
    assert loss(real, real).item() == 0
    value = loss(fake, real)
    value.backward()
    assert value.item() > 0 and fake.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.parameters())
    # 3) bad user files fail clearly
    with pytest.raises(NoduleSynthError, match="not found"):
        PerceptualLoss.try_create(tmp_path / "nope.pth")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(NoduleSynthError, match="bad.safetensors"):
        PerceptualLoss.try_create(bad)
    save_file({"features.0.weight": torch.zeros(3)}, str(bad))
    with pytest.raises(NoduleSynthError, match="not torchvision VGG-19"):
        PerceptualLoss.try_create(bad)
