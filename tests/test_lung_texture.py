"""Lung texture model: seeded fields, the lung-only composite, TSGAN layout, pipeline, trainer."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nodulesynth.errors import NoduleSynthError
from nodulesynth.masks.classes import MaskClass
from nodulesynth.models.lung_texture import (LungTextureConfig, LungTextureGenerator, composite, lung_alpha)
from nodulesynth.train import engine
from nodulesynth.train.lung_texture import LungTextureTrainConfig, lung_patches, train_lung_texture

from test_train import assert_same_state, final_state, synth_slices

SMALL = dict(z_local=4, z_global=4, channels=(8, 8, 4))


def chest(size: int = 64, nodule: bool = True) -> torch.Tensor:
    images, masks, _ = synth_slices(1 if nodule else 2, size, nodule_every=1 if nodule else 99)
    return torch.from_numpy(masks[-1:].copy())


def test_field_is_a_pure_function_of_seed_and_size():
    torch.manual_seed(0)
    g = LungTextureGenerator(LungTextureConfig(**SMALL)).eval()
    a = g.sample_hu(32, 48, [7, 8, 9])
    assert a.shape == (3, 32, 48)
    # the same noise whatever the batch (the pipeline's fixed block shape makes it bit-exact)
    assert torch.allclose(g.sample_hu(32, 48, [8])[0], a[1], atol=1e-3)
    assert not torch.equal(a[0], a[1])
    lo, hi = g.cfg.hu_low, g.cfg.hu_high
    assert float(a.min()) >= lo - 1e-3 and float(a.max()) <= hi + 1e-3
    # finer pixels than the model's: drawn at its spacing, resampled to the asked size
    assert g.sample_hu(40, 40, [1], spacing_mm=0.4).shape == (1, 40, 40)
    with pytest.raises(NoduleSynthError, match="multiple of 4"):
        g.noise(1, 30, 32, [0])
    with pytest.raises(NoduleSynthError, match="2 seeds for a batch of 3"):
        g.noise(3, 32, 32, [0, 1])


def test_composite_changes_only_the_lung_interior():
    m = chest(64)
    hu = torch.full((1, 64, 64), 40.0)
    field = torch.full((1, 64, 64), -900.0)
    out = composite(hu, m, field)
    lung = (m == MaskClass.LEFT_LUNG) | (m == MaskClass.RIGHT_LUNG)
    assert torch.equal(out[~lung], hu[~lung])  # body, trachea, nodule, background: the translator's
    assert torch.equal(out[m == MaskClass.NODULE], hu[m == MaskClass.NODULE])
    a = lung_alpha(m)
    assert float(a.max()) == 1.0 and float(a.min()) == 0.0
    deep = a == 1
    assert torch.equal(out[deep], field[deep]) and int(deep.sum()) > 50
    # a ring next to the nodule keeps the translator's rim
    near = torch.nn.functional.max_pool2d((m == MaskClass.NODULE).float()[:, None], 5, 1, 2)[:, 0] > 0
    assert torch.equal(out[near], hu[near])


def test_lung_patches_keep_to_lung_and_away_from_nodules():
    images, masks, _ = synth_slices(1, 128, nodule_every=1)
    rng = np.random.default_rng(0)
    p = lung_patches(images[0].astype(np.float32), masks[0], 16, 4, 1.0, 2, 1000, rng)
    assert len(p) > 0 and float(p.mean()) < -700  # lung HU (−850 ± 20), no body, no nodule (+30)
    assert float(p.max()) < -700
    assert len(lung_patches(images[0].astype(np.float32), masks[0], 16, 4, 1.0, 2, 3, rng)) == 3
    none = lung_patches(images[0].astype(np.float32), np.zeros_like(masks[0]), 16, 4, 0.98, 2, 10, rng)
    assert none.shape == (0, 16, 16)


@pytest.fixture(scope="module")
def big_data(tmp_path_factory):
    from nodulesynth.data.slices import write_slice_dataset

    images, masks, records = synth_slices(4, 128)
    return str(write_slice_dataset(tmp_path_factory.mktemp("lungslices"), images, masks, records))


def tex_cfg(data, out, **kw) -> LungTextureTrainConfig:
    base = dict(data=data, out=str(out), model=LungTextureConfig(**SMALL), steps=6, batch_size=4, patch_size=16,
                margin=4, stride=8, nodule_margin_px=2, checkpoint_every=100, log_every=1, num_samples=2, device="cpu")
    return LungTextureTrainConfig(**{**base, **kw})


def test_trainer_resumes_bit_identical_and_exports(big_data, tmp_path):
    full = train_lung_texture(tex_cfg(big_data, tmp_path / "full"))
    train_lung_texture(tex_cfg(big_data, tmp_path / "part", max_steps=3))
    part = train_lung_texture(tex_cfg(big_data, tmp_path / "part", resume=True))
    assert_same_state(final_state(full), final_state(part))
    assert (full / "export" / "lung_texture.safetensors").is_file()
    run = json.loads((full / "run.json").read_text())
    assert run["patches"] > 0 and run["step"] == 6
    assert list((full / "samples").glob("step-*.png"))


def no_lung_data(tmp_path) -> str:
    """A prepared dataset whose lungs are relabelled body: no lung patch at all."""
    from nodulesynth.data.slices import write_slice_dataset

    images, masks, records = synth_slices(2, 64)
    masks[:] = np.where(np.isin(masks, (2, 3)), MaskClass.BODY, masks)
    return str(write_slice_dataset(tmp_path / "nolung", images, masks, records))


def test_trainer_refuses_data_without_lung_patches(tmp_path):
    data = no_lung_data(tmp_path)
    with pytest.raises(NoduleSynthError, match="no 16² window"):
        train_lung_texture(tex_cfg(data, tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # bad input leaves nothing behind
    with pytest.raises(NoduleSynthError, match="multiple of 4"):
        train_lung_texture(tex_cfg(data, tmp_path / "run2", margin=3))


def test_trainer_warns_when_the_critic_would_see_the_padded_border(tmp_path, caplog):
    """A margin below the generator's reach shows the critic the field's zero-padded border (the
    first shipped texture's fault, README "Vessels and translation fidelity"): said, not refused."""
    data = no_lung_data(tmp_path)  # no lung: fails right after the check
    reach = LungTextureConfig(**SMALL).reach
    for margin, warned in ((4, True), (reach + 1, False)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="nodulesynth.train"), pytest.raises(NoduleSynthError, match="no 16²"):
            train_lung_texture(tex_cfg(data, tmp_path / f"run{margin}", margin=margin))
        assert ("below the generator's reach" in caplog.text) is warned, (margin, reach)


def test_tsgan_round_trip_with_and_without_lung_texture(big_data, tmp_path):
    from nodulesynth.models.tsgan import TSGAN
    from nodulesynth.synth.pipeline import GenerationConfig, Synthesizer

    from test_train import MASK_MODEL, TR_MODEL
    from nodulesynth.models.pix2pix import TranslatorConfig
    from nodulesynth.models.stylegan import MaskGANConfig

    torch.manual_seed(0)
    plain = TSGAN.from_configs(MaskGANConfig(**MASK_MODEL), TranslatorConfig(**TR_MODEL), image_size=64,
                               meta={"spacing_mm": 0.8})
    plain.save_pretrained(tmp_path / "plain")
    textured = TSGAN(plain.mask_generator, plain.translator, plain.meta,
                     lung_texture=LungTextureGenerator(LungTextureConfig(**SMALL)))
    textured.save_pretrained(tmp_path / "tex")
    a, b = TSGAN.from_pretrained(tmp_path / "plain"), TSGAN.from_pretrained(tmp_path / "tex")
    assert a.lung_texture is None and b.lung_texture is not None and a.revision != b.revision
    # a texture file without its config is refused, naming the folder
    (tmp_path / "tex" / "lung_texture.json").unlink()
    with pytest.raises(NoduleSynthError, match="lung_texture.safetensors without lung_texture.json"):
        TSGAN.from_pretrained(tmp_path / "tex")

    masks = chest(64).repeat(2, 1, 1)
    cfg = dict(nodules="stylegan", block=2)
    with Synthesizer(b, GenerationConfig(**cfg)) as syn, Synthesizer(b, GenerationConfig(lung_texture=False, **cfg)) as off:
        t, o = syn.translate(masks), off.translate(masks)
        lung = (masks == MaskClass.LEFT_LUNG) | (masks == MaskClass.RIGHT_LUNG)
        assert torch.equal(t.images_hu[~lung], o.images_hu[~lung])
        assert not torch.equal(t.images_hu[lung], o.images_hu[lung])
        assert syn.textured and not off.textured
        # a sample's lungs depend on (weights, seed, index), not on the batch it was drawn in
        one = syn._translate(masks[1:], [(1, 0)])
        both = syn._translate(masks[[1, 0]], [(1, 0), (0, 0)])
        assert torch.equal(one[0], both[0])


def test_train_export_adds_the_lung_texture_run(big_data, tmp_path):
    from nodulesynth.models.export import export_tsgan
    from nodulesynth.models.tsgan import TSGAN

    run = train_lung_texture(tex_cfg(big_data, tmp_path / "tex", steps=2))
    out = export_tsgan("pretrained", "pretrained", tmp_path / "w", lung_texture=run, spacing_mm=0.8)
    w = TSGAN.from_pretrained(out)
    assert w.lung_texture is not None
    assert json.loads((out / "tsgan.json").read_text())["meta"]["lung_texture_training"]["patches"] > 0
    with pytest.raises(NoduleSynthError, match="--lung-texture"):
        export_tsgan("pretrained", "pretrained", tmp_path / "w2", lung_texture=tmp_path / "nothing", spacing_mm=0.8)


def test_field_cut_to_boxes_equals_the_whole_field_inside_them():
    """The CPU path evaluates each field only around its lungs (box + reach): same values inside."""
    torch.manual_seed(1)
    g = LungTextureGenerator(LungTextureConfig(**SMALL)).eval()
    whole = g.sample_hu(96, 80, [3, 4, 5])
    boxes = torch.tensor([[10, 20, 50, 60], [0, 0, 96, 80], [0, 0, 0, 0]])
    cut = g.sample_hu(96, 80, [3, 4, 5], boxes=boxes)
    assert torch.allclose(cut[0, 10:50, 20:60], whole[0, 10:50, 20:60], atol=1e-3)
    assert torch.allclose(cut[1], whole[1], atol=1e-3)
    assert float(cut[2].max()) == g.cfg.hu_low  # nothing asked, nothing drawn
    # the shipped architecture (noise grid 1/8): its reach, 3·8 − 1 px, is exactly enough
    g = LungTextureGenerator(LungTextureConfig()).eval()
    whole, cut = g.sample_hu(160, 160, [2]), g.sample_hu(160, 160, [2], boxes=torch.tensor([[41, 47, 97, 90]]))
    assert torch.allclose(cut[0, 41:97, 47:90], whole[0, 41:97, 47:90], atol=1e-3)
    from nodulesynth.models.lung_texture import alpha_boxes

    a = torch.zeros(2, 8, 8)
    a[0, 2:5, 3:7] = 0.5
    assert alpha_boxes(a).tolist() == [[2, 3, 5, 7], [0, 0, 0, 0]]


def test_lung_conditions_say_where_in_the_lung():
    from nodulesynth.models.lung_texture import LUNG_CONDITIONS, lung_conditions

    _, masks, _ = synth_slices(1, 128, nodule_every=1)
    m = torch.from_numpy(masks[-1:].copy()).long()
    c = lung_conditions(m)
    assert c.shape == (1, LUNG_CONDITIONS, 128, 128)
    lung = (m == MaskClass.LEFT_LUNG) | (m == MaskClass.RIGHT_LUNG) | (m == MaskClass.NODULE)
    assert torch.equal(c[:, 0] > 0, lung) and float(c[:, 1:][~lung[:, None].expand(-1, 2, -1, -1)].abs().max()) == 0
    # depth runs 0 → 1 down each lung; the mediastinum's nearness fades away from it
    for side in (MaskClass.LEFT_LUNG, MaskClass.RIGHT_LUNG):
        rows = torch.nonzero(m[0] == side)[:, 0]
        col = c[0, 2][m[0] == side]
        assert float(col[rows == rows.min()].max()) == 0 and float(col[rows == rows.max()].min()) == 1
    r, l = m[0] == MaskClass.RIGHT_LUNG, m[0] == MaskClass.LEFT_LUNG  # the patient's right: the image's left
    inner = c[0, 1][r][torch.nonzero(r)[:, 1] == torch.nonzero(r)[:, 1].max()].mean()
    outer = c[0, 1][r][torch.nonzero(r)[:, 1] == torch.nonzero(r)[:, 1].min()].mean()
    assert float(inner) > float(outer) and bool(l.any())


def test_conditioned_lung_texture_fine_tunes_from_an_unconditional_one(tmp_path):
    """``--init-weights`` with ``--cond-channels 3``: the widened generator draws the old field until
    trained (its new inputs start at zero), trains on 512²-class slices with their conditions, and the
    pipeline feeds it the masks' lung conditions."""
    from nodulesynth.data.slices import write_slice_dataset
    from nodulesynth.models.io import load_module, save_module
    from nodulesynth.models.lung_texture import LUNG_CONDITIONS

    torch.manual_seed(2)
    g = LungTextureGenerator(LungTextureConfig(**SMALL)).eval()
    wide = g.with_conditions(LUNG_CONDITIONS)
    assert torch.equal(g.sample_hu(32, 32, [5]), wide.sample_hu(32, 32, [5], cond=torch.rand(1, 3, 32, 32)))
    with pytest.raises(NoduleSynthError, match="already takes 3"):
        wide.with_conditions(3)
    save_module(g, g.cfg, tmp_path / "init", "lung_texture")
    images, masks, records = synth_slices(2, 256)
    data = str(write_slice_dataset(tmp_path / "d", images, masks, records))
    model = LungTextureConfig(**SMALL, cond_channels=LUNG_CONDITIONS)
    run = train_lung_texture(tex_cfg(data, tmp_path / "run", model=model, steps=2, init_weights=str(tmp_path / "init")))
    trained = load_module(LungTextureGenerator, LungTextureConfig, run / "export", "lung_texture")
    assert trained.cfg.cond_channels == LUNG_CONDITIONS and json.loads((run / "run.json").read_text())["patches"] > 0
    with pytest.raises(NoduleSynthError, match="0 or 3 condition maps"):
        train_lung_texture(tex_cfg(data, tmp_path / "bad", model=LungTextureConfig(**SMALL, cond_channels=2)))
    with pytest.raises(NoduleSynthError, match="differs from --model"):
        train_lung_texture(tex_cfg(data, tmp_path / "bad2", init_weights=str(tmp_path / "init"),
                                   model=LungTextureConfig(z_local=4, z_global=4, channels=(8, 4, 4))))
    assert not (tmp_path / "bad2").exists()  # refused before anything is written

    from nodulesynth.models.tsgan import TSGAN
    from nodulesynth.synth.pipeline import GenerationConfig, Synthesizer
    from test_train import MASK_MODEL, TR_MODEL
    from nodulesynth.models.pix2pix import TranslatorConfig
    from nodulesynth.models.stylegan import MaskGANConfig

    torch.manual_seed(0)
    plain = TSGAN.from_configs(MaskGANConfig(**MASK_MODEL), TranslatorConfig(**TR_MODEL), image_size=64,
                               meta={"spacing_mm": 0.8})
    tex = TSGAN(plain.mask_generator, plain.translator, plain.meta, lung_texture=trained.eval())
    m = chest(64).repeat(2, 1, 1)
    with Synthesizer(tex, GenerationConfig(nodules="stylegan", block=2)) as syn:
        one = syn._translate(m[1:], [(1, 0)])
        both = syn._translate(m[[1, 0]], [(1, 0), (0, 0)])
        assert torch.equal(one[0], both[0]) and torch.isfinite(one).all()
