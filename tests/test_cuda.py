"""CUDA against CPU (issue 11): what only a GPU can show. Skipped without CUDA, so the CPU suite and
CI skip every test here.

``NODULESYNTH_TEST_DEVICE=cpu pytest tests/test_cuda.py`` runs the same code with the CPU standing in
for the GPU (bf16 autocast included), to check the tests themselves before a GPU session spends
device time on them.

Tolerances (stated once, here): pipeline masks under bf16 autocast agree with CPU fp32 on ≥ 99 % of
pixels per sample (a boundary pixel may flip the argmax; bf16 vs fp32 on the CPU flips 0.2 %);
translated HU agree within mean |Δ| ≤ 5 HU and 99th percentile ≤ 25 HU (bf16 vs fp32 on the CPU:
mean 0.9, p99 2.7, max 15 HU on the shipped weights).
"""
from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
import torch

from nodulesynth.masks.boxes import mask_to_boxes, masks_to_boxes_batch
from nodulesynth.models.tsgan import TSGAN
from nodulesynth.synth.pipeline import GenerationConfig, Synthesizer

_FORCED = os.environ.get("NODULESYNTH_TEST_DEVICE")
DEVICE = torch.device(_FORCED) if _FORCED else (torch.device("cuda") if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(DEVICE is None, reason="no CUDA device (NODULESYNTH_TEST_DEVICE=cpu dry-runs these)")

MASK_AGREE = 0.99
HU_MEAN, HU_P99 = 5.0, 25.0


def bf16(device: torch.device):
    """The pipeline's precision on ``device`` (runtime.autocast: bf16 on CUDA); on a CPU standing in
    for the GPU, bf16 autocast too, so the dry-run exercises the same tolerance."""
    if device.type == "cuda":
        return contextlib.nullcontext()  # the pipeline autocasts itself
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def pair():
    cfg = GenerationConfig(seed=0, block=8, batch_size=8)
    cpu = Synthesizer(TSGAN.from_pretrained("pretrained", device="cpu"), cfg)
    dev = Synthesizer(TSGAN.from_pretrained("pretrained", device=str(DEVICE)), GenerationConfig(seed=0, block=8, batch_size=8))
    return cpu, dev


def test_masks_and_boxes_agree_with_cpu(pair):
    cpu, dev = pair
    keys = [(i, 0) for i in range(8)]
    m_cpu = cpu._masks(keys)
    with bf16(DEVICE):
        m_dev = dev._masks(keys)
    assert m_dev.device.type == DEVICE.type and m_dev.dtype == torch.uint8
    agree = (m_dev.cpu() == m_cpu).flatten(1).float().mean(1)
    assert (agree >= MASK_AGREE).all(), agree.tolist()
    # boxes of the same masks: the device's max-pool labeller vs scipy on the CPU, exactly
    from nodulesynth.masks.classes import MaskClass

    m = m_cpu.clone()
    m[:, 100:110, 120:135] = MaskClass.NODULE  # at least one component per sample, some touching others
    m[:, 300:301, 300:340] = MaskClass.NODULE
    got = masks_to_boxes_batch(m.to(DEVICE))
    for k in range(len(m)):
        assert got[k].device.type == DEVICE.type
        np.testing.assert_array_equal(got[k].cpu().numpy(), mask_to_boxes(m[k].numpy()))


def test_bf16_translation_within_stated_hu_tolerance(pair):
    cpu, dev = pair
    masks = cpu.generate(range(4)).masks
    hu_cpu = cpu._translate(masks)
    with bf16(DEVICE):
        hu_dev = dev._translate(masks).cpu()
    assert torch.isfinite(hu_dev).all()
    d = (hu_dev - hu_cpu).abs()
    p99 = torch.quantile(d.flatten()[::13], 0.99).item()
    assert d.mean().item() <= HU_MEAN and p99 <= HU_P99, (d.mean().item(), p99, d.max().item())


def test_generate_on_device_matches_cpu_samples(pair):
    """Rejection sampling on the device accepts the same attempts as on the CPU (the gate sees
    nearly the same masks), and those samples' anatomy agrees."""
    cpu, dev = pair
    a = cpu.generate(range(8))
    with bf16(DEVICE):
        b = dev.generate(range(8))
    same = [pa["attempt"] == pb["attempt"] for pa, pb in zip(a.provenance, b.provenance)]
    assert sum(same) >= 6, [(pa["attempt"], pb["attempt"]) for pa, pb in zip(a.provenance, b.provenance)]
    for k in np.flatnonzero(same):
        assert (a.masks[k] == b.masks[k]).float().mean().item() >= MASK_AGREE
        assert len(b.boxes[k]) >= 1


def test_samples_do_not_depend_on_batch_size_on_device(pair):
    """A caller's batch size decides which indices share a forward pass (always `block` rows, padded):
    one at a time and six together must give the same bits, and a rerun too (no nondeterministic kernels)."""
    _, dev = pair
    syn = Synthesizer(dev.tsgan, GenerationConfig(seed=3, block=8, batch_size=8))
    with bf16(DEVICE):
        one = [syn.generate([i]) for i in (5, 0, 2)]
        many = syn.generate(range(6))
        again = syn.generate(range(6))
    assert torch.equal(many.images_hu, again.images_hu) and torch.equal(many.masks, again.masks)
    for b, i in zip(one, (5, 0, 2)):
        assert torch.equal(b.masks[0], many.masks[i])
        assert torch.equal(b.images_hu[0], many.images_hu[i])
        np.testing.assert_array_equal(b.boxes[0], many.boxes[i])


def test_cli_generate_on_device(pair, tmp_path):
    from nodulesynth.cli import main

    out = tmp_path / "coco"
    assert main(["generate", "--n", "4", "--out", str(out), "--device", str(DEVICE), "--batch-size", "4"]) == 0
    import json

    coco = json.loads((out / "annotations.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(coco["images"]) == 4 and len(coco["annotations"]) >= 4
    assert manifest["n_synthetic"] == 4 and manifest["revision"] == pair[0].tsgan.revision


def test_both_trainers_step_on_device(tmp_path):
    """A few bf16-autocast training steps of each stage: finite losses, a loadable export."""
    from test_train import mask_cfg, synth_slices, tr_cfg

    from nodulesynth.data.slices import write_slice_dataset
    from nodulesynth.train import train_masks, train_translator

    images, masks, records = synth_slices(8, 64)
    data = str(write_slice_dataset(tmp_path / "data", images, masks, records))
    m = train_masks(mask_cfg(data, tmp_path / "m", device=str(DEVICE), max_steps=6))
    t = train_translator(tr_cfg(data, tmp_path / "t", device=str(DEVICE), max_steps=4))
    for run in (m, t):
        rows = (run / "metrics.csv").read_text().splitlines()
        assert len(rows) >= 2 and "nan" not in "".join(rows[1:]).lower()
        assert (run / "export").is_dir()


def test_lung_texture_trainer_and_field_on_device(tmp_path):
    """The lung texture trainer steps on the device, and the batched whole-field path the pipeline
    takes there agrees with the CPU's per-sample lung boxes inside the boxes (fp32 both)."""
    from test_lung_texture import tex_cfg
    from test_train import synth_slices

    from nodulesynth.data.slices import write_slice_dataset
    from nodulesynth.models.tsgan import TSGAN as _T
    from nodulesynth.train.lung_texture import train_lung_texture

    images, masks, records = synth_slices(4, 128)
    data = str(write_slice_dataset(tmp_path / "data", images, masks, records))
    run = train_lung_texture(tex_cfg(data, tmp_path / "tex", device=str(DEVICE), steps=4))
    assert (run / "export" / "lung_texture.safetensors").is_file()
    tex = _T.from_pretrained("pretrained").lung_texture
    boxes = torch.tensor([[100, 60, 400, 460], [150, 90, 380, 420]])
    cpu = tex.sample_hu(512, 512, [11, 12], boxes=boxes)
    dev = tex.to(DEVICE).sample_hu(512, 512, [11, 12]).cpu()
    for k, (y0, x0, y1, x1) in enumerate(boxes.tolist()):
        d = (dev[k, y0:y1, x0:x1] - cpu[k, y0:y1, x0:x1]).abs()
        assert d.mean().item() <= HU_MEAN and torch.quantile(d.flatten()[::7], 0.99).item() <= HU_P99
