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


# ---------------------------------------------------------------- texture options (not in the paper)

@pytest.mark.parametrize("upsample,noise", [("transpose", True), ("nearest", False), ("bilinear", True)])
def test_translator_texture_options_forward_backward(upsample, noise):
    torch.manual_seed(0)
    cfg = TranslatorConfig(ngf=4, ndf=4, num_downs=5, dwmh_depth=2, dwmh_window=4, dwmh_heads=2, upsample=upsample,
                           noise=noise, num_d=2)
    G = DLPix2PixGenerator(cfg)
    x = one_hot(torch.randint(0, 6, (2, 64, 64)))
    y = G(x)
    assert y.shape == (2, 1, 64, 64) and y.abs().max() <= 1
    y.mean().backward()
    assert all(p.grad is not None for n, p in G.named_parameters() if "noises" not in n or noise)
    assert (G.noises is not None) == noise
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in G.modules()) or upsample == "transpose"
    if noise:  # learned per-channel scales, starting at 0 (identity), get a gradient
        assert all(float(n.weight.detach().abs().sum()) == 0 and n.weight.grad is not None for n in G.noises)


def test_translator_noise_is_seeded_per_sample_outside_training():
    torch.manual_seed(0)
    G = DLPix2PixGenerator(TranslatorConfig(ngf=4, ndf=4, num_downs=4, dwmh_depth=2, dwmh_window=4, dwmh_heads=2,
                                            noise=True, dropout=0.0))
    with torch.no_grad():
        for n in G.noises:
            n.weight.fill_(1.0)
    G.eval()
    x = one_hot(torch.randint(0, 6, (3, 32, 32)))
    a = G(x, noise_seeds=[5, 6, 7])
    torch.testing.assert_close(G(x[1:2], noise_seeds=[6]), a[1:2])  # independent of the batch around it
    assert not torch.allclose(G(x, noise_seeds=[8, 6, 7])[0], a[0])  # another seed, another texture
    assert torch.equal(G(x), G(x))  # no seeds: seed 0 for every sample, still deterministic
    G.train()
    assert not torch.equal(G(x), G(x))  # training: fresh noise from the global RNG
    with pytest.raises(NoduleSynthError, match="2 noise seeds for a batch of 3"):
        G.eval()(x, noise_seeds=[1, 2])


def test_multiscale_discriminator_shapes_and_losses():
    from nodulesynth.models.losses import multiscale_feature_matching_loss, multiscale_gan_loss
    from nodulesynth.models.pix2pix import (MultiScaleDiscriminator, build_discriminator, discriminate,
                                            min_input_size)

    cfg = TranslatorConfig(ngf=4, ndf=4, num_d=3)
    D = build_discriminator(cfg)
    assert isinstance(D, MultiScaleDiscriminator) and min_input_size(cfg) == 128
    assert isinstance(build_discriminator(TranslatorConfig(ndf=4)), PatchDiscriminator)  # paper: one PatchGAN
    x, img = one_hot(torch.randint(0, 6, (2, 128, 128))), torch.rand(2, 1, 128, 128) * 2 - 1
    outs = discriminate(D, x, img, return_features=True)
    assert [o[0].shape[-1] for o in outs] == [14, 6, 2]  # each scale halves the input
    assert all(len(o[1]) == cfg.n_layers_d + 1 for o in outs)
    fake = discriminate(D, x, img.flip(-1), return_features=True)
    assert multiscale_feature_matching_loss(outs, outs) == 0 < multiscale_feature_matching_loss(outs, fake)
    assert multiscale_gan_loss(outs, True).ndim == 0
    single = discriminate(PatchDiscriminator(TranslatorConfig(ndf=4)), x, img)
    assert len(single) == 1 and single[0].shape == (2, 1, 14, 14)
    with pytest.raises(NoduleSynthError, match="num_d"):
        TranslatorConfig(num_d=0)
    with pytest.raises(NoduleSynthError, match="upsample"):
        TranslatorConfig(upsample="pixelshuffle")


def test_lowpass_l1_ignores_fine_texture():
    from nodulesynth.models.losses import lowpass_l1_loss

    real = torch.zeros(1, 1, 16, 16)
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None]) % 2 * 0.5 - 0.25  # zero-mean 2-px texture
    assert lowpass_l1_loss(checker[None, None], real, 1) == pytest.approx(0.25)
    assert lowpass_l1_loss(checker[None, None], real, 2) == 0  # texture below the pooling scale is free
    assert lowpass_l1_loss(real + 0.1, real, 4) == pytest.approx(0.1)  # region levels are still pinned


def test_lung_terms_ask_for_how_much_structure_not_where():
    """A vessel moved inside the lung costs pixel L1 but neither the lung-statistics loss nor the
    lungs' coarse density L1; an empty lung costs all of them. Outside ``keep`` nothing counts."""
    from nodulesynth.models.losses import (feature_matching_loss, lowpass_l1_loss, region_l1_loss,
                                           region_stats_loss)

    lung = torch.zeros(1, 1, 64, 64, dtype=torch.bool)
    lung[..., 8:56, 8:56] = True
    base = torch.where(lung, -0.8, 0.0)
    real, moved = base.clone(), base.clone()
    real[..., 20:22, 14:30] = -0.3  # a bright 2 × 16 px "vessel"
    moved[..., 36:38, 26:42] = -0.3  # the same vessel elsewhere in the lung
    assert lowpass_l1_loss(moved, real, 1) > 0.001
    assert float(region_stats_loss(moved, real, lung)) == pytest.approx(0, abs=1e-6)
    assert float(region_stats_loss(base, real, lung)) > 0.001  # no vessel at all
    assert float(region_l1_loss(base, real, lung, 64)) > 1e-3 > 1e-6 > float(region_l1_loss(moved, real, lung, 64))
    keep = ~lung
    assert float(region_l1_loss(moved, real, keep, 1)) == 0 < float(region_l1_loss(moved + 0.1, real, keep, 4))
    feats = [torch.randn(1, 3, 32, 32), torch.randn(1, 3, 8, 8)]
    changed = [f + torch.where(F.interpolate(lung.float(), f.shape[-2:]) > 0, 1.0, 0.0) for f in feats]
    assert feature_matching_loss(feats, changed) > 0
    assert float(feature_matching_loss(feats, changed, keep)) == 0  # keep is area-pooled to each map
    with pytest.raises(ValueError, match="does not match"):
        region_stats_loss(moved, real, lung[..., :32, :32])


def test_translator_config_without_texture_fields_loads_as_the_paper(tmp_path):
    """Weights saved before the texture options existed (their JSON lacks the fields) still load."""
    import json

    from nodulesynth.models.io import load_module, save_module

    cfg = TranslatorConfig(ngf=4, ndf=4, num_downs=4, dwmh_depth=2, dwmh_window=4, dwmh_heads=2)
    G = DLPix2PixGenerator(cfg)
    save_module(G, cfg, tmp_path, "translator")
    meta = json.loads((tmp_path / "translator.json").read_text())
    for key in ("noise", "upsample", "num_d"):
        del meta["config"][key]
    (tmp_path / "translator.json").write_text(json.dumps(meta))
    back = load_module(DLPix2PixGenerator, TranslatorConfig, tmp_path, "translator")
    assert (back.cfg.noise, back.cfg.upsample, back.cfg.num_d) == (False, "transpose", 1)
    x = one_hot(torch.randint(0, 6, (1, 32, 32)))
    torch.testing.assert_close(back(x), G.eval()(x))


def test_generate_with_noise_translator_stays_a_pure_function_of_seed_and_index():
    from nodulesynth.models.tsgan import TSGAN
    from nodulesynth.synth.pipeline import GenerationConfig, Synthesizer

    torch.manual_seed(1)
    model = TSGAN.from_configs(
        MaskGANConfig(resolution=16, z_dim=16, w_dim=16, mapping_layers=1, fmap_base=64, fmap_max=16),
        TranslatorConfig(ngf=4, ndf=4, num_downs=4, dwmh_depth=2, dwmh_window=4, dwmh_heads=2, noise=True,
                         upsample="bilinear"), image_size=32).eval()
    with torch.no_grad():
        for n in model.translator.noises:
            n.weight.fill_(2.0)
    cfg = dict(seed=3, block=4, gate=False, min_nodules=0)
    ref = Synthesizer(model, GenerationConfig(**cfg)).generate(range(6))
    part = Synthesizer(model, GenerationConfig(**cfg, batch_size=2)).generate([5, 1])
    assert torch.equal(part.images_hu, ref.images_hu[[5, 1]])
    with torch.no_grad():
        for n in model.translator.noises:
            n.weight.zero_()
    quiet = Synthesizer(model, GenerationConfig(**cfg)).generate([5])
    assert torch.equal(quiet.masks[0], ref.masks[5]) and not torch.equal(quiet.images_hu[0], ref.images_hu[5])
