"""Generation pipeline and SyntheticNoduleDataset (CPU, tiny untrained TSGAN built here).

The tiny model is random (no trained weights exist in tests), so its masks are blobs of all six
classes; with init seed 4 about a third of them pass the full quality gate, which exercises
rejection sampling for real. Gate semantics are checked on hand-drawn masks.
"""
from __future__ import annotations

import numpy as np
from scenes import scene_mask
import pytest
import torch

from nodulesynth import SyntheticNoduleDataset
from nodulesynth.errors import NoduleSynthError
from nodulesynth.masks.boxes import mask_to_boxes
from nodulesynth.masks.classes import MaskClass as C
from nodulesynth.synth.dataset import collate_fn
from nodulesynth.synth.pipeline import GenerationConfig, Synthesizer, quality_gate

GATE = {"block": 8, "nodules": "stylegan"}  # the StyleGAN-nodule gate; a smaller forward block keeps the tests fast


def tiny_tsgan():
    from nodulesynth.models.pix2pix import TranslatorConfig
    from nodulesynth.models.stylegan import MaskGANConfig
    from nodulesynth.models.tsgan import TSGAN

    torch.manual_seed(4)
    return TSGAN.from_configs(
        MaskGANConfig(resolution=16, z_dim=32, w_dim=32, mapping_layers=2, fmap_base=256, fmap_max=32),
        TranslatorConfig(ngf=8, ndf=8, num_downs=6, dwmh_depth=3, dwmh_window=4, dwmh_heads=2),
        image_size=64,
    ).eval()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_tsgan().save_pretrained(tmp_path_factory.mktemp("w") / "tiny")


@pytest.fixture(scope="module")
def model(weights):
    from nodulesynth.models.tsgan import TSGAN

    return TSGAN.from_pretrained(weights)


def test_same_samples_for_any_batch_size_and_order(model):
    ref = Synthesizer(model, GenerationConfig(seed=7, batch_size=8, **GATE)).generate(range(10))
    other = Synthesizer(model, GenerationConfig(seed=7, batch_size=3, **GATE))
    for idx in ([9, 3, 0], [5], [7, 1, 8, 2]):
        b = other.generate(idx)
        assert torch.equal(b.images_hu, ref.images_hu[idx])
        assert torch.equal(b.masks, ref.masks[idx])
        assert [p["attempt"] for p in b.provenance] == [ref.provenance[i]["attempt"] for i in idx]
    assert any(p["attempt"] > 0 for p in ref.provenance), "rejection sampling was not exercised"
    assert ref.provenance[4] == {"source": "synthetic", "model": model.source, "revision": model.revision,
                                 "seed": 7, "index": 4, "attempt": ref.provenance[4]["attempt"], "block": 8,
                                 "truncation_psi": 1.0, "nodule_mode": "stylegan", "lung_texture": True,
                                 "lungs": ref.provenance[4]["lungs"], "body_texture": False, "nodule_texture": False,
                                 "background": ref.provenance[4]["background"], "body": ref.provenance[4]["body"]}
    assert ref.provenance[4]["lungs"]["mode"] == "library"  # real lung tiles need no model in the weights
    diff = Synthesizer(model, GenerationConfig(seed=8, **GATE)).generate([0])
    assert not torch.equal(diff.masks[0], ref.masks[0])


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_placement_workers_change_nothing(model, method, monkeypatch):
    """LIDC nodules placed on 2 worker processes (while the translator runs) give the samples, attempts
    and provenance of the in-process placement; a dead worker is one clear error, not a hang. Both
    start methods: forkserver is what a process holding a CUDA context gets."""
    import nodulesynth.masks.nodule_model as nm

    monkeypatch.setattr(nm, "placement_start_method", lambda: method)
    cfg = dict(seed=3, block=4, batch_size=4, max_size_mm=12)
    ref = Synthesizer(model, GenerationConfig(place_workers=0, **cfg)).generate(range(9))
    with Synthesizer(model, GenerationConfig(place_workers=2, **cfg)) as s:
        got = s.generate(range(9))
        assert s.lidc._pool is not None  # the workers really ran
        assert torch.equal(got.masks, ref.masks) and torch.equal(got.images_hu, ref.images_hu)
        assert got.provenance == ref.provenance and all(p["nodules"] for p in got.provenance)
        assert [b.tolist() for b in got.boxes] == [b.tolist() for b in ref.boxes]
        for proc in list(s.lidc._pool._processes.values()):
            proc.kill()
            proc.join()
        with pytest.raises(NoduleSynthError, match="placement worker process died"):
            s.generate(range(9, 13))
        assert s.generate([2]).provenance == [ref.provenance[2]]  # a fresh pool after the failure
    assert s.lidc._pool is None  # closed on leaving the block


def test_boxes_match_masks_and_gate_holds(model):
    s = Synthesizer(model, GenerationConfig(seed=1, **GATE))
    b = s.generate(range(8))
    assert b.images_hu.shape == (8, 64, 64) and b.images_hu.dtype == torch.float32
    assert -1024 <= b.images_hu.min() and b.images_hu.max() <= 1024
    for mask, boxes in zip(b.masks.numpy(), b.boxes):
        np.testing.assert_array_equal(boxes, mask_to_boxes(mask))
        assert len(boxes) >= 1
        for x0, y0, x1, y1 in boxes.astype(int):
            assert (mask[y0:y1, x0:x1] == C.NODULE).sum() >= 4
        assert (mask == C.LEFT_LUNG).any() and (mask == C.RIGHT_LUNG).any() and (mask == C.BODY).any()
    st = s.stats
    assert st.accepted == 8 and st.attempts == 8 + sum(st.rejected.values()) and st.attempts > 8
    assert "accepted" in st.summary()


@pytest.mark.parametrize(
    "mask, cfg, reason",
    [
        (scene_mask([(18, 30, 3)]), {}, None),  # inside the right lung
        (scene_mask([(29, 30, 3)]), {}, None),  # juxta-pleural: touches the right lung's edge
        (scene_mask([(32, 30, 2)]), {}, "invalid nodule"),  # in the mediastinum, touches no lung
        (scene_mask([(5, 30, 3)]), {}, "invalid nodule"),  # touches a lung but pokes out of the body
        (scene_mask([(18, 30, 1)]), {"min_nodule_pixels": 9}, "invalid nodule"),  # too small
        (scene_mask([(32, 30, 2)]), {"gate": False}, None),  # gate off (benchmarks of untrained weights only)
        (scene_mask([]), {}, "nodule count"),
        (scene_mask([]), {"min_nodules": 0}, None),  # negatives allowed
        (np.where(scene_mask() == C.LEFT_LUNG, C.BODY, scene_mask()).astype(np.uint8), {}, "missing lung"),
        (np.where(scene_mask() == C.BODY, 0, scene_mask()).astype(np.uint8), {}, "no body"),
        (scene_mask([(18, 20, 2), (46, 40, 2)]), {"num_nodules": 1}, "nodule count"),
        (scene_mask([(18, 20, 2), (46, 40, 2)]), {"num_nodules": (1, 2)}, None),
        (scene_mask([(18, 30, 3)]), {"min_size_mm": 10 * 7 * 0.8}, "nodule condition"),  # 7 px wide
        (scene_mask([(18, 30, 3)]), {"max_size_mm": 7 * 6.4 - 1}, "nodule condition"),
        (scene_mask([(18, 30, 3)]), {"min_size_mm": 7 * 6.4, "max_size_mm": 7 * 6.4}, None),
        (scene_mask([(18, 30, 3)]), {"lung": "left"}, "nodule condition"),
        (scene_mask([(18, 30, 3)]), {"lung": "right"}, None),
        (scene_mask([(18, 30, 3)]), {"region": (0.5, 0, 1, 1)}, "nodule condition"),
        (scene_mask([(18, 30, 3)]), {"region": (0, 0, 0.5, 1)}, None),
    ],
)
def test_quality_gate_on_drawn_masks(mask, cfg, reason):
    passed, reasons, boxes = quality_gate(torch.from_numpy(mask)[None], GenerationConfig(**cfg), spacing_mm=6.4)
    assert reasons == [reason] and bool(passed[0]) == (reason is None)


def test_unsatisfiable_conditions_fail_clearly(model):
    s = Synthesizer(model, GenerationConfig(min_size_mm=1000, max_attempts=5, **GATE))
    with pytest.raises(NoduleSynthError, match="5 attempts.*nodule condition"):
        s.generate([0])
    with pytest.raises(NoduleSynthError, match="min-size-mm"):
        GenerationConfig(min_size_mm=9, max_size_mm=3).validate()
    for psi in (-0.1, float("nan"), 3.0):
        with pytest.raises(NoduleSynthError, match="truncation_psi"):
            GenerationConfig(truncation_psi=psi).validate()


def test_mask_in_mode_translates_given_masks(model):
    s = Synthesizer(model, GenerationConfig())
    m = np.stack([scene_mask([(18, 30, 3)]), scene_mask([(18, 20, 2), (46, 40, 2)])])
    b = s.translate(m, names=["a", "b"])
    assert b.images_hu.shape == (2, 64, 64) and torch.equal(b.masks, torch.from_numpy(m))
    assert [len(x) for x in b.boxes] == [1, 2] and b.provenance[1]["mask"] == "b"
    np.testing.assert_array_equal(b.boxes[1], mask_to_boxes(m[1]))
    with pytest.raises(NoduleSynthError, match="values must be in 0..5"):
        s.translate(np.full((64, 64), 7, np.uint8))
    with pytest.raises(NoduleSynthError, match="32×32.*64×64"):
        s.translate(np.zeros((32, 32), np.uint8))


def _real_folder(tmp_path, n=5, size=64):
    from nodulesynth.data.slices import SliceRecord, write_slice_dataset

    masks = np.stack([scene_mask([(18, 30, 3)]) for _ in range(n)])
    images = np.where(masks == C.BODY, 40, np.where(masks == 0, -1024, -850)).astype(np.int16)
    recs = [SliceRecord(series_uid=f"1.2.{k}", z_mm=-100.0 + k, slice_index=k, spacing_mm=(6.4, 6.4),
                        boxes=mask_to_boxes(masks[k]), source="phantom", has_nodule=True) for k in range(n)]
    return write_slice_dataset(tmp_path / "real", images, masks, recs)


def test_dataset_items_collate_and_workers(weights):
    ds = SyntheticNoduleDataset(5, weights=weights, seed=3, device="cpu", batch_size=2, output="window",
                                conditions=GATE)
    assert len(ds) == 5
    it = ds[4]
    assert set(it) == {"image", "mask", "boxes", "labels", "source", "provenance"}
    assert it["image"].shape == (1, 64, 64) and 0 <= it["image"].min() and it["image"].max() <= 1
    assert it["boxes"].shape[1] == 4 and len(it["boxes"]) >= 1 and it["labels"].tolist() == [1] * len(it["boxes"])
    assert it["source"] == "synthetic" and it["provenance"]["index"] == 4
    assert ds[-1]["provenance"]["index"] == 4
    with pytest.raises(IndexError):
        ds[5]
    hu = SyntheticNoduleDataset(5, weights=weights, seed=3, device="cpu", batch_size=4, conditions=GATE)
    from nodulesynth.hu import window

    assert torch.allclose(window(hu[4]["image"]), it["image"], atol=1e-6)  # same sample, other batch size
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_fn,
                                         sampler=ds.block_sampler(shuffle=True, seed=0))
    seen = {}
    for images, targets in loader:
        assert images.shape[1:] == (1, 64, 64) and len(targets) == len(images)
        for im, t in zip(images, targets):
            seen[t["provenance"]["index"]] = im
    assert sorted(seen) == list(range(5))
    for i, im in seen.items():  # workers generate the very same samples as the main process
        assert torch.equal(im, ds[i]["image"])


def test_ratio_arithmetic_and_real_items(tmp_path, weights):
    real = _real_folder(tmp_path, n=5)
    kw = dict(weights=weights, real=real, device="cpu", real_split="all")  # the arithmetic over all 5 slices
    ds = SyntheticNoduleDataset(ratio=2.0, conditions=GATE, **kw)
    assert (ds.n_real, ds.n_synth, len(ds)) == (5, 10, 15)
    assert len(SyntheticNoduleDataset(ratio=0.5, **kw)) == 5 + 2  # round(2.5)=2
    assert len(SyntheticNoduleDataset(ratio=0.7, **kw)) == 5 + 4  # round(3.5)=4
    assert len(SyntheticNoduleDataset(3, **kw)) == 5 + 3  # all real + n
    assert len(SyntheticNoduleDataset(10, ratio=2.0, **kw)) == 15
    with pytest.raises(NoduleSynthError, match="contradicts"):
        SyntheticNoduleDataset(4, ratio=2.0, **kw)
    with pytest.raises(NoduleSynthError, match="needs real="):
        SyntheticNoduleDataset(4, weights=weights, ratio=2.0, device="cpu")
    with pytest.raises(NoduleSynthError, match="ratio: must be"):
        SyntheticNoduleDataset(weights=weights, real=real, ratio=-1, device="cpu")
    r, s = ds[0], ds[5]
    assert r["source"] == "real" and s["source"] == "synthetic"
    assert set(r) == set(s) and r["image"].shape == s["image"].shape and r["image"].dtype == s["image"].dtype
    assert r["provenance"]["series_uid"] == "1.2.0" and s["provenance"]["index"] == 0
    np.testing.assert_array_equal(r["boxes"].numpy(), mask_to_boxes(r["mask"].numpy()))
    assert r["image"][0, 0, 0] == -1024  # output="hu": real HU unchanged


def test_albumentations_moves_image_mask_and_boxes_together(weights):
    import albumentations as A

    plain = SyntheticNoduleDataset(3, weights=weights, device="cpu", output="window", conditions=GATE)
    flip = SyntheticNoduleDataset(3, weights=weights, device="cpu", output="window", conditions=GATE,
                                  transform=[A.HorizontalFlip(p=1.0)])
    a, b = plain[2], flip[2]
    assert torch.allclose(b["image"], a["image"].flip(-1), atol=1e-6)
    # a mirror swaps the lung labels: the patient's left lung stays on the image's right (issue 14)
    swapped = a["mask"].flip(-1).clone()
    swapped[a["mask"].flip(-1) == C.LEFT_LUNG], swapped[a["mask"].flip(-1) == C.RIGHT_LUNG] = C.RIGHT_LUNG, C.LEFT_LUNG
    assert torch.equal(b["mask"], swapped)
    expect = a["boxes"][:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) + torch.tensor([64, 0, 64, 0])
    got = b["boxes"][torch.argsort(b["boxes"][:, 0])]
    assert torch.allclose(got, expect[torch.argsort(expect[:, 0])], atol=1e-4)
    np.testing.assert_allclose(np.sort(b["boxes"].numpy(), 0), np.sort(mask_to_boxes(b["mask"].numpy()), 0), atol=1e-4)
    with pytest.raises(NoduleSynthError, match="bbox_params"):
        SyntheticNoduleDataset(3, weights=weights, device="cpu", transform=A.Compose([A.HorizontalFlip()]))


def test_bad_dataset_arguments(weights, tmp_path):
    with pytest.raises(NoduleSynthError, match="n: must be > 0"):
        SyntheticNoduleDataset(0, weights=weights, device="cpu")
    with pytest.raises(NoduleSynthError, match="output"):
        SyntheticNoduleDataset(2, weights=weights, device="cpu", output="jpeg")
    with pytest.raises(NoduleSynthError, match="not a TSGAN weights folder"):
        SyntheticNoduleDataset(2, weights=tmp_path, device="cpu")
    with pytest.raises(NoduleSynthError, match="device"):
        SyntheticNoduleDataset(2, weights=weights, device="tpu")
    with pytest.raises(NoduleSynthError, match="unknown key"):
        SyntheticNoduleDataset(2, weights=weights, device="cpu", conditions={"size": 3})
