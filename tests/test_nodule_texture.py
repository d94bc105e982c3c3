"""Nodule texture model: the hole-only redraw, per-row purity, TSGAN layout, pipeline, trainer."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nodulesynth.errors import NoduleSynthError
from nodulesynth.masks.classes import MaskClass
from nodulesynth.models.nodule_texture import LIDC_TEXTURE_RANKS, NoduleInpainter, NoduleTextureConfig, hole_of
from nodulesynth.train.nodule_texture import (NoduleTextureTrainConfig, NoduleTextureTrainer, gaussian_blur, hole_std,
                                              nodule_cuts, train_nodule_texture)

from test_train import assert_same_state, final_state, synth_slices

SMALL = dict(window=32, channels=(8, 8, 8), noise_channels=2, area_bins=2)


def model(**kw) -> NoduleInpainter:
    torch.manual_seed(0)
    g = NoduleInpainter(NoduleTextureConfig(**{**SMALL, **kw})).eval()
    with torch.no_grad():  # the noise weights start at 0: make the noise count, as after training
        for n in g.noise:
            n.weight.fill_(0.5)
    return g


def slices(n: int = 3, size: int = 64):
    images, masks, _ = synth_slices(n, size, nodule_every=1)
    return torch.from_numpy(images.astype(np.float32)), torch.from_numpy(masks.astype(np.int64))


def test_forward_redraws_only_the_hole():
    g = model()
    ctx = torch.rand(2, 1, 32, 32) * 2 - 1
    outline = torch.zeros(2, 1, 32, 32)
    outline[:, :, 12:18, 10:20] = 1
    with torch.no_grad():
        y = g(ctx, outline, torch.tensor([-0.5, 0.5]), g.noise_inputs(2, 32, [1, 2]))
        z = g(ctx, outline, torch.tensor([0.5, 0.5]), g.noise_inputs(2, 32, [1, 2]))
    hole = hole_of(outline[:, 0] > 0, g.cfg.ring_px)[:, None]
    assert torch.equal(y[~hole], ctx[~hole])
    assert not torch.equal(y[hole], ctx[hole])
    assert float(y.abs().max()) <= 1
    assert torch.equal(y[1], z[1]) and not torch.equal(y[0], z[0])  # the density is an input
    # densities drawn from the stored quantiles: seeded, within their range
    g.density_quantiles.copy_(torch.linspace(-0.6, 0.2, 101))
    d = g.draw_density(list(range(200)))
    assert torch.equal(d, g.draw_density(list(range(200)))) and -0.6 <= float(d.min()) < float(d.max()) <= 0.2


def test_render_touches_only_nodules_and_their_rim_and_is_pure_per_row():
    g = model()
    hu, masks = slices(3)
    masks[1][masks[1] == MaskClass.NODULE] = MaskClass.LEFT_LUNG  # a row without nodules
    out = g.render(hu, masks, [5, 6, 7])
    near = hole_of(masks == MaskClass.NODULE, g.cfg.ring_px + 1)
    assert torch.equal(out[~near], hu[~near])
    assert torch.equal(out[1], hu[1])
    assert not torch.equal(out[0][near[0]], hu[0][near[0]])
    # a row's result depends on (its pixels, its seed), not on the other rows or their order
    alone = g.render(hu[2:], masks[2:], [7])
    mixed = g.render(hu[[2, 0]], masks[[2, 0]], [7, 5])
    assert torch.equal(alone[0], out[2]) and torch.equal(mixed[0], out[2]) and torch.equal(mixed[1], out[0])
    assert not torch.equal(g.render(hu[:1], masks[:1], [9])[0], out[0])  # another seed, another draw


def test_render_leaves_nodules_too_big_for_the_window():
    g = model()
    hu, masks = slices(1, 128)  # a 23-px nodule; the 32-px window holds ≤ 20
    assert g.cfg.max_extent == 20
    assert torch.equal(g.render(hu, masks, [0]), hu)
    assert not g.redrawn(masks).any()
    small = slices(1, 64)[1]
    assert torch.equal(g.redrawn(small), small == MaskClass.NODULE)


def test_config_refuses_a_window_off_the_unet_grid():
    with pytest.raises(NoduleSynthError, match="window=30"):
        NoduleTextureConfig(window=30, channels=(8, 8, 8))


def test_nodule_cuts_centre_each_fitting_nodule():
    images, masks, _ = synth_slices(1, 64, nodule_every=1)
    cuts = nodule_cuts(images[0].astype(np.float32), masks[0], 40, 20)
    assert cuts.shape == (1, 2, 40, 40)
    ys, xs = np.nonzero(cuts[0, 1])
    assert abs(ys.mean() - 19.5) < 2 and abs(xs.mean() - 19.5) < 2  # centred (no slice edge near)
    assert nodule_cuts(images[0].astype(np.float32), masks[0], 40, 4).shape[0] == 0  # too big: none
    assert nodule_cuts(images[0].astype(np.float32), np.zeros_like(masks[0]), 40, 20).shape[0] == 0


@pytest.fixture(scope="module")
def nodule_data(tmp_path_factory):
    from nodulesynth.data.slices import write_slice_dataset

    images, masks, records = synth_slices(4, 64, nodule_every=1)
    return str(write_slice_dataset(tmp_path_factory.mktemp("noduleslices"), images, masks, records))


def nt_cfg(data, out, **kw) -> NoduleTextureTrainConfig:
    base = dict(data=data, out=str(out), model=NoduleTextureConfig(**SMALL), steps=4, batch_size=4, jitter=4,
                checkpoint_every=100, log_every=1, num_samples=2, device="cpu")
    return NoduleTextureTrainConfig(**{**base, **kw})


def test_views_keep_the_hole_inside(nodule_data, tmp_path):
    t = NoduleTextureTrainer(nt_cfg(nodule_data, tmp_path / "run", batch_size=64))
    t.setup()
    assert len(t.bank) == 4
    torch.manual_seed(0)
    views = t.real_batch()
    hole = hole_of(views[:, 1] > 0, t.cfg.model.ring_px)
    assert hole.flatten(1).any(1).all()
    assert not hole[:, :2].any() and not hole[:, -2:].any() and not hole[:, :, :2].any() and not hole[:, :, -2:].any()
    centres = hole.float().nonzero()[:, 1].float()
    assert centres.std() > 0.5  # views sit at different offsets: no centre prior to learn


def test_trainer_resumes_bit_identical_exports_and_ships(nodule_data, tmp_path):
    from nodulesynth.models.export import export_tsgan
    from nodulesynth.models.tsgan import TSGAN
    from nodulesynth.synth.pipeline import GenerationConfig, Synthesizer

    full = train_nodule_texture(nt_cfg(nodule_data, tmp_path / "full"))
    train_nodule_texture(nt_cfg(nodule_data, tmp_path / "part", max_steps=2))
    part = train_nodule_texture(nt_cfg(nodule_data, tmp_path / "part", resume=True))
    assert_same_state(final_state(full), final_state(part))
    assert json.loads((full / "run.json").read_text())["windows"] == 4
    assert list((full / "samples").glob("step-*.png"))

    out = export_tsgan("pretrained", "pretrained", tmp_path / "w", nodule_texture=full, spacing_mm=0.8)
    w = TSGAN.from_pretrained(out)
    shipped = TSGAN.from_pretrained("pretrained")
    assert isinstance(w.nodule_texture, NoduleInpainter) and w.revision != shipped.revision
    assert json.loads((out / "tsgan.json").read_text())["meta"]["nodule_texture_training"]["windows"] == 4
    (out / "nodule_texture.json").unlink()
    with pytest.raises(NoduleSynthError, match="nodule_texture.safetensors without nodule_texture.json"):
        TSGAN.from_pretrained(out)
    with pytest.raises(NoduleSynthError, match="--nodule-texture"):
        export_tsgan("pretrained", "pretrained", tmp_path / "w2", nodule_texture=tmp_path / "nothing", spacing_mm=0.8)

    # in the pipeline: only nodules, their rim and the lung texture's margin around them change;
    # recorded in the provenance
    w.nodule_texture, w.lung_texture = model(window=32), shipped.lung_texture
    masks = torch.from_numpy(synth_slices(2, 512, nodule_every=1)[1].astype(np.int64))
    masks[masks == MaskClass.NODULE] = MaskClass.LEFT_LUNG
    masks[:, 250:258, 140:150] = MaskClass.NODULE
    cfg = dict(nodules="stylegan", block=2, background="translator", body="translator")
    with Synthesizer(w, GenerationConfig(**cfg)) as on, Synthesizer(w, GenerationConfig(nodule_texture=False, **cfg)) as off:
        a, b = on.translate(masks), off.translate(masks)
        nod = masks == MaskClass.NODULE
        near = hole_of(nod, w.nodule_texture.cfg.ring_px + 1)
        margin = hole_of(nod, 3 + 4 + 1) & ~near  # lung_alpha's nodule margin and ramp
        assert torch.equal(a.images_hu[~(near | margin)], b.images_hu[~(near | margin)])
        assert not torch.equal(a.images_hu[near], b.images_hu[near])
        assert not torch.equal(a.images_hu[margin], b.images_hu[margin])  # textured lung up to the hole
        assert a.provenance[0]["nodule_texture"] is True and b.provenance[0]["nodule_texture"] is False


def test_init_weights_starts_from_a_trained_inpainter(nodule_data, tmp_path):
    from nodulesynth.models.io import load_module, save_module

    torch.manual_seed(3)
    init = model(window=32)
    save_module(init, init.cfg, tmp_path / "init", "nodule_texture")
    t = NoduleTextureTrainer(nt_cfg(nodule_data, tmp_path / "run", init_weights=str(tmp_path / "init")))
    t.setup()
    t.build()
    start = {k: v for k, v in t.G.state_dict().items() if k not in ("density_quantiles", "area_edges_mm2")}
    assert all(torch.equal(v, init.state_dict()[k]) for k, v in start.items())  # the init's weights, not fresh ones
    run = train_nodule_texture(nt_cfg(nodule_data, tmp_path / "run2", steps=2, init_weights=str(tmp_path / "init")))
    trained = load_module(NoduleInpainter, NoduleTextureConfig, run / "export", "nodule_texture")
    assert not torch.equal(trained.state_dict()["out.weight"], init.state_dict()["out.weight"])  # it trained
    with pytest.raises(NoduleSynthError, match="differs from --model"):
        train_nodule_texture(nt_cfg(nodule_data, tmp_path / "bad", init_weights=str(tmp_path / "init"),
                                    model=NoduleTextureConfig(**{**SMALL, "ring_px": 3})))
    with pytest.raises(NoduleSynthError, match="no nodule_texture.safetensors"):
        train_nodule_texture(nt_cfg(nodule_data, tmp_path / "bad2", init_weights=str(tmp_path)))
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad2").exists()  # refused before anything is written


def test_fine_band_loss_splits_shape_from_texture(nodule_data, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(gaussian_blur(x, 0), x)
    assert torch.allclose(gaussian_blur(torch.full((1, 1, 16, 16), 0.3), 1.5), torch.full((1, 1, 16, 16), 0.3))
    fine = x - gaussian_blur(x, 1.5)
    assert fine.std() > 0.5 and gaussian_blur(x, 1.5).std() < 0.3  # white noise lives in the fine band
    hole = torch.zeros(2, 1, 32, 32)
    hole[:, :, 8:24, 8:24] = 1
    y = x.clone()
    y[0, :, :8] = 100  # outside the hole: no effect
    assert torch.allclose(hole_std(x, hole), hole_std(y, hole))
    assert torch.allclose(hole_std(2 * x, hole), 2 * hole_std(x, hole), atol=1e-4)
    run = train_nodule_texture(nt_cfg(nodule_data, tmp_path / "run", steps=2, l1_blur=1.0, lambda_band=5.0))
    head = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"band", "fake_band_std", "real_band_std"} <= set(head)
    with pytest.raises(NoduleSynthError, match="needs a blur"):
        train_nodule_texture(nt_cfg(nodule_data, tmp_path / "bad", lambda_band=1.0))


def test_real_slices_get_new_nodules_redrawn_from_the_scan_around_them():
    """add_nodules_to_real: the new nodules are redrawn from the real pixels; the scan's own nodule
    and everything away from the new ones stay the scan's."""
    from scenes import scene_mask
    from scipy.ndimage import binary_dilation

    from nodulesynth.models.pix2pix import TranslatorConfig
    from nodulesynth.models.stylegan import MaskGANConfig
    from nodulesynth.models.tsgan import TSGAN
    from nodulesynth.synth.pipeline import GenerationConfig, Synthesizer

    torch.manual_seed(4)
    tsgan = TSGAN.from_configs(
        MaskGANConfig(resolution=16, z_dim=32, w_dim=32, mapping_layers=2, fmap_base=256, fmap_max=32),
        TranslatorConfig(ngf=8, ndf=8, num_downs=6, dwmh_depth=3, dwmh_window=4, dwmh_heads=2), image_size=64).eval()
    real_mask = scene_mask([(20, 30, 2)])
    real_hu = np.where(real_mask == MaskClass.BODY, 40, np.where(real_mask == 0, -1024, -850)).astype(np.float32)
    real_hu[real_mask == MaskClass.NODULE] = 60
    cfg = dict(seed=2, block=4, spacing_mm=3.0, max_attempts=64, num_nodules=1, min_size_mm=6)
    runs = {}
    for on in (False, True):
        tsgan.nodule_texture = model() if on else None
        runs[on] = Synthesizer(tsgan, GenerationConfig(**cfg)).add_nodules_to_real(real_hu[None], real_mask[None], ["r"])
    a, b = runs[True], runs[False]
    assert torch.equal(a.masks, b.masks)
    fresh = (a.masks[0].numpy() == MaskClass.NODULE) & (real_mask != MaskClass.NODULE)
    keep = ~binary_dilation(fresh, iterations=4)
    np.testing.assert_array_equal(a.images_hu[0].numpy()[keep], real_hu[keep])
    assert keep[real_mask == MaskClass.NODULE].all()  # the scan's own nodule is among the kept pixels
    assert not np.array_equal(a.images_hu[0].numpy()[fresh], b.images_hu[0].numpy()[fresh])


def test_placed_texture_picks_its_density_ranks():
    """A placed nodule's LIDC texture class picks the ranks of the density table it draws from: the
    measured rank deciles of its class (ground-glass mostly low, never the top), or, in weights
    without them, its band of the shares (ground-glass the lowest 8 %); a component without a placed
    nodule draws from all of them."""
    g = model()
    g.density_quantiles.copy_(torch.linspace(-1, 1, 101))
    seeds = list(range(200))
    gg, solid, anyone = (g.draw_density(seeds, [t] * 200) for t in (0, 2, None))
    assert float(gg.median()) < float(solid.median()) - 0.3 and float(gg.max()) < 1  # ranks, not a band
    assert float(gg.quantile(0.9)) > -1 + 2 * 0.08  # ground-glass reaches past the old 8 % band
    assert abs(float(anyone.median())) < 0.2  # any: the whole table
    r = torch.rand(500, generator=torch.Generator().manual_seed(0)).tolist()
    ranks = torch.tensor([g.texture_rank(0, x) for x in r])
    assert abs(float(ranks.median()) - float(g.texture_rank_deciles[0, 5])) < 0.03  # the class's median rank
    shares = model(texture_ranks=False)
    shares.density_quantiles.copy_(torch.linspace(-1, 1, 101))
    assert shares.texture_band(0) == (0.0, pytest.approx(0.08)) and shares.texture_band(2)[1] == 1.0
    assert float(shares.draw_density(seeds, [0] * 200).max()) <= -1 + 2 * 0.08 + 1e-6
    d = torch.tensor(LIDC_TEXTURE_RANKS).reshape(3, 11)
    assert bool((d.diff(dim=1) >= 0).all()) and float(d.min()) >= 0 and float(d.max()) <= 1
    hu, masks = slices(2)
    seen = []
    orig = g.draw_density
    g.draw_density = lambda seeds, textures=None, areas=None: (seen.append(textures), orig(seeds, textures, areas))[1]
    ys, xs = (masks[0] == MaskClass.NODULE).nonzero(as_tuple=True)
    g.render(hu, masks, [1, 2], textures=[[(int(xs.float().mean()), int(ys.float().mean()), 0)], None])
    assert seen[0][:2] == [0, None]


def test_density_is_drawn_at_the_nodules_size():
    """With area bins a nodule's density comes from real nodules of its size: a table fitted where
    density rises with area draws small nodules darker than big ones; with no size given, a bin at
    random (the overall distribution)."""
    g = model(area_bins=4)
    area = torch.linspace(1, 100, 400)
    dens = area / 100 - 0.5 + 0.05 * torch.randn(400, generator=torch.Generator().manual_seed(0))
    g.fit_density(dens, area)
    assert bool((g.area_edges_mm2.diff() > 0).all()) and abs(float(g.area_edges_mm2[1]) - 50.5) < 1
    seeds = list(range(200))
    small, big = (g.draw_density(seeds, areas_mm2=[a] * 200) for a in (5.0, 95.0))
    assert float(small.max()) < float(big.min())
    anyone = g.draw_density(seeds)
    assert float(anyone.min()) < float(small.max()) and float(anyone.max()) > float(big.min())
    with pytest.raises(NoduleSynthError, match="--area-bins 4"):
        g.fit_density(dens[:7], area[:7])


def test_render_looks_up_each_nodule_by_its_area_in_mm2():
    g = model()
    hu, masks = slices(1)
    masks[masks == MaskClass.NODULE] = MaskClass.LEFT_LUNG
    masks[0, 10:14, 10:14] = MaskClass.NODULE  # 16 px
    masks[0, 40:46, 30:36] = MaskClass.NODULE  # 36 px
    seen = []
    orig = g.draw_density
    g.draw_density = lambda seeds, textures=None, areas=None: (seen.append(areas), orig(seeds, textures, areas))[1]
    g.render(hu, masks, [1], spacing_mm=0.5)
    assert seen[0][:2] == [16 * 0.25, 36 * 0.25]


def test_weights_written_before_area_bins_still_load(tmp_path):
    """A config without ``area_bins`` / ``texture_ranks`` means one density distribution for every size
    (the (101,) table older weights hold) and the shares' bands, not today's defaults."""
    from nodulesynth.models.io import load_module, save_module

    old = model(area_bins=1, texture_ranks=False)
    save_module(old, old.cfg, tmp_path, "nodule_texture")
    meta = json.loads((tmp_path / "nodule_texture.json").read_text())
    del meta["config"]["area_bins"], meta["config"]["texture_ranks"]
    (tmp_path / "nodule_texture.json").write_text(json.dumps(meta))
    back = load_module(NoduleInpainter, NoduleTextureConfig, tmp_path, "nodule_texture")
    assert back.cfg.area_bins == 1 and back.density_quantiles.shape == (101,)
    assert back.cfg.texture_ranks is False  # and the texture classes draw from the shares' bands, as then
    assert NoduleTextureConfig().area_bins > 1  # new weights draw by size


def test_steps_0_refits_only_the_density_table(nodule_data, tmp_path):
    from nodulesynth.models.io import load_module, save_module

    init = model(area_bins=1)
    save_module(init, init.cfg, tmp_path / "init", "nodule_texture")
    run = train_nodule_texture(nt_cfg(nodule_data, tmp_path / "run", steps=0, init_weights=str(tmp_path / "init")))
    out = load_module(NoduleInpainter, NoduleTextureConfig, run / "export", "nodule_texture")
    assert out.cfg.area_bins == 2 and out.area_edges_mm2.shape == (1,)  # the run's bins, not the init's
    table = ("density_quantiles", "area_edges_mm2")
    assert all(torch.equal(v, init.state_dict()[k]) for k, v in out.state_dict().items() if k not in table)
    assert not torch.equal(out.density_quantiles[0], init.density_quantiles)  # refitted on the data
    with pytest.raises(NoduleSynthError, match="needs --init-weights"):
        train_nodule_texture(nt_cfg(nodule_data, tmp_path / "bad", steps=0))
