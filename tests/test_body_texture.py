"""Body texture model: condition maps, the body-only composite, cut fields, trainer, TSGAN layout, pipeline."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nodulesynth.errors import NoduleSynthError
from nodulesynth.masks.classes import MaskClass
from nodulesynth.models.body_texture import BodyTextureConfig, body_alpha, body_conditions
from nodulesynth.models.lung_texture import LungTextureGenerator, composite
from nodulesynth.train.body_texture import BodyTextureTrainConfig, train_body_texture

from test_train import assert_same_state, final_state, synth_slices

SMALL = dict(z_local=4, z_global=4, channels=(8, 8, 4))


def chest_masks(size: int = 64, n: int = 1) -> torch.Tensor:
    _, masks, _ = synth_slices(n, size, nodule_every=1)
    return torch.from_numpy(masks.copy())


def test_conditions_say_where_in_the_body():
    m = torch.zeros((1, 64, 96), dtype=torch.uint8)
    m[0, 8:56, 8:88] = MaskClass.BODY
    m[0, 16:48, 16:40] = MaskClass.RIGHT_LUNG  # the patient's right lung: the image's left
    m[0, 16:48, 56:80] = MaskClass.LEFT_LUNG
    c = body_conditions(m)[0]
    assert c.shape == (4, 64, 96)
    assert torch.equal(c[0], (m[0] == MaskClass.BODY).float())
    assert float(c[1, 32, 48]) > float(c[1, 32, 12]) and float(c[1, 0, 0]) == 0  # deeper inside, larger; 0 outside
    assert float(c[2, 32, 44]) < float(c[2, 10, 48])  # nearer the lungs, smaller
    assert c[3, 32, 44] == 1 and c[3, 32, 48] == 1  # the mediastinum lies between the lungs
    assert c[3, 32, 12] == 0 and c[3, 32, 84] == 0 and c[3, 10, 48] == 0  # chest walls, above the lungs
    mirrored = m.clone()  # lungs on the wrong sides: nothing lies "between" them
    mirrored[m == MaskClass.LEFT_LUNG], mirrored[m == MaskClass.RIGHT_LUNG] = MaskClass.RIGHT_LUNG, MaskClass.LEFT_LUNG
    assert float(body_conditions(mirrored)[0, 3].sum()) == 0


def test_composite_changes_only_the_body_away_from_nodules():
    m = chest_masks(64)
    hu = torch.full(m.shape, 40.0)
    out = composite(hu, m, torch.full(m.shape, -500.0), alpha=body_alpha)
    a = body_alpha(m)
    body = m == MaskClass.BODY
    assert torch.equal(out[~body], hu[~body])  # lungs, nodules, trachea, background: untouched
    assert bool((a[body] == 1).any()) and float(out[a == 1].max()) == -500.0
    near = torch.nn.functional.max_pool2d((m == MaskClass.NODULE).float()[:, None], 7, 1, 3)[:, 0] > 0
    assert float(a[near].max()) == 0


def test_conditional_field_cut_to_boxes_equals_the_whole_field():
    torch.manual_seed(2)
    g = LungTextureGenerator(BodyTextureConfig(**SMALL)).eval()
    m = chest_masks(96)
    cond = body_conditions(m.repeat(2, 1, 1))
    whole = g.sample_hu(96, 96, [3, 4], cond=cond)
    cut = g.sample_hu(96, 96, [3, 4], cond=cond, boxes=torch.tensor([[12, 20, 70, 60], [0, 0, 0, 0]]))
    assert torch.allclose(cut[0, 12:70, 20:60], whole[0, 12:70, 20:60], atol=1e-3)
    assert not torch.allclose(whole[0], g.sample_hu(96, 96, [3], cond=torch.zeros_like(cond[:1]))[0], atol=1e-3)
    with pytest.raises(NoduleSynthError, match="4 condition channels expected, got none"):
        g.sample_hu(96, 96, [3])


@pytest.fixture(scope="module")
def body_data(tmp_path_factory):
    from nodulesynth.data.slices import write_slice_dataset

    images, masks, records = synth_slices(4, 256)
    return str(write_slice_dataset(tmp_path_factory.mktemp("bodyslices"), images, masks, records))


def body_cfg(data, out, **kw) -> BodyTextureTrainConfig:
    base = dict(data=data, out=str(out), model=BodyTextureConfig(**SMALL), steps=6, batch_size=4, patch_size=16,
                margin=4, stride=16, checkpoint_every=100, log_every=1, num_samples=2, device="cpu")
    return BodyTextureTrainConfig(**{**base, **kw})


def test_trainer_resumes_bit_identical_exports_and_ships(body_data, tmp_path):
    from nodulesynth.models.export import export_tsgan
    from nodulesynth.models.tsgan import TSGAN

    full = train_body_texture(body_cfg(body_data, tmp_path / "full"))
    train_body_texture(body_cfg(body_data, tmp_path / "part", max_steps=3))
    part = train_body_texture(body_cfg(body_data, tmp_path / "part", resume=True))
    assert_same_state(final_state(full), final_state(part))
    run = json.loads((full / "run.json").read_text())
    assert run["patches"] > 0 and run["step"] == 6
    assert list((full / "samples").glob("step-*.png"))
    out = export_tsgan("pretrained", "pretrained", tmp_path / "w", body_texture=full, spacing_mm=0.8)
    w = TSGAN.from_pretrained(out)
    assert w.body_texture is not None and w.body_texture.cfg.cond_channels == 4
    assert w.revision != TSGAN.from_pretrained("pretrained").revision  # the body file counts in the revision
    (out / "body_texture.json").unlink()
    with pytest.raises(NoduleSynthError, match="body_texture.safetensors without body_texture.json"):
        TSGAN.from_pretrained(out)


def test_trainer_refuses_data_without_body_patches(tmp_path):
    from nodulesynth.data.slices import write_slice_dataset

    images, masks, records = synth_slices(2, 256)
    masks[:] = np.where(masks == MaskClass.BODY, MaskClass.BACKGROUND, masks)
    data = write_slice_dataset(tmp_path / "nobody", images, masks, records)
    with pytest.raises(NoduleSynthError, match="is ≥ 40% body"):
        train_body_texture(body_cfg(str(data), tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    with pytest.raises(NoduleSynthError, match="--min-body 0"):
        train_body_texture(body_cfg(str(data), tmp_path / "run", min_body=0.0))


def test_pipeline_draws_the_body_per_sample_and_can_turn_it_off():
    from nodulesynth.models.tsgan import TSGAN
    from nodulesynth.synth.pipeline import GenerationConfig, Synthesizer

    from test_synth import tiny_tsgan

    plain = tiny_tsgan()
    torch.manual_seed(0)
    model = TSGAN(plain.mask_generator, plain.translator, plain.meta,
                  body_texture=LungTextureGenerator(BodyTextureConfig(**SMALL)).eval())
    m = chest_masks(64, 2)
    cfg = dict(nodules="stylegan", block=2, background="translator")
    with Synthesizer(model, GenerationConfig(**cfg)) as on, Synthesizer(model, GenerationConfig(body_texture=False, **cfg)) as off:
        a, b = on._translate(m, [(0, 0), (1, 0)]), off._translate(m, [(0, 0), (1, 0)])
        body = m == MaskClass.BODY
        assert torch.equal(a[~body], b[~body]) and not torch.equal(a[body], b[body])
        assert torch.equal(on._translate(m[1:], [(1, 0)])[0], a[1])  # per sample, not per batch
        assert on.body_textured and not off.body_textured
