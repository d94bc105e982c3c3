"""LIDC nodule model: conditions exact by construction, LIDC statistics of 2,000 placed nodules,
determinism per (seed, index), impossible conditions refused, negatives, real masks. No translator
runs here except in one tiny-model pipeline test, so everything stays cheap on CPU."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scenes import scene_mask

from nodulesynth.errors import NoduleSynthError
from nodulesynth.masks.boxes import mask_to_boxes
from nodulesynth.masks.classes import MaskClass as C
from nodulesynth.masks.nodule_model import (TEXTURES, LidcPlacer, NoduleConditions, NoduleModel, PlacementError,
                                            compare_to_lidc, load_library, measure, placement_rng, rasterise,
                                            remove_nodules)
from nodulesynth.metrics.nodules import nodule_size_mm
from nodulesynth.synth.pipeline import GenerationConfig, Synthesizer

SPACING = 0.8
TCGA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tcga-chest-slices"


@pytest.fixture(scope="module")
def anatomy() -> np.ndarray:
    """16 anatomy masks drawn by the shipped weights' mask StyleGAN (its nodules given back to lung)."""
    from nodulesynth.models.tsgan import TSGAN

    s = Synthesizer(TSGAN.from_pretrained("pretrained"), GenerationConfig(seed=0, block=16, nodules="stylegan"))
    m = s._masks([(i, 0) for i in range(16)]).numpy()
    return np.stack([remove_nodules(x) for x in m])


def _real_masks(n: int = 4) -> np.ndarray:
    """Real anatomy: TCGA chest slices through the project's mask builder, 0.8 mm, body-centred."""
    from nodulesynth.data.prepare import dicom_slice_mask

    out = []
    for f in sorted(TCGA.rglob("*.dcm")):
        m = dicom_slice_mask(f, 3000, 512, SPACING)
        if m is None:
            continue
        out.append(m)
        if len(out) == n:
            break
    return np.stack(out)


def _check(mask: np.ndarray, prov: list[dict], cond: NoduleConditions, before: np.ndarray) -> None:
    """Every condition exactly, on the mask itself (not on the provenance alone)."""
    boxes = mask_to_boxes(mask)
    assert len(boxes) == len(prov) == cond.count
    sizes = nodule_size_mm(boxes, SPACING)
    if cond.min_size_mm is not None:
        assert (sizes >= cond.min_size_mm - 1e-4).all(), sizes
    if cond.max_size_mm is not None:
        assert (sizes <= cond.max_size_mm + 1e-4).all(), sizes
    got = measure(mask, SPACING)
    if cond.lung is not None:
        assert (got["side"] == ("right", "left").index(cond.lung)).all()
    if cond.texture is not None:
        assert all(p["texture"] == cond.texture for p in prov)
    if cond.min_readers is not None:
        lib = load_library()
        for p in prov:  # the provenance's count, checked against the library's own annotations
            ann = lib.nodule[lib.annotation == p["lidc_annotation"]][0]
            assert p["readers"] >= cond.min_readers
            assert len(np.unique(lib.annotation[lib.nodule == ann])) >= cond.min_readers
    if cond.region is not None:
        x0, y0, x1, y1 = cond.region
        for p in prov:
            cx, cy = p["centre_px"]
            assert x0 * 512 <= cx + 0.5 <= x1 * 512 and y0 * 512 <= cy + 0.5 <= y1 * 512
    # nodules only replace lung (or, juxta-pleural, body) of their own side; anatomy elsewhere unchanged
    changed = mask != before
    assert (mask[changed] == C.NODULE).all()
    assert np.isin(before[changed], (C.LEFT_LUNG, C.RIGHT_LUNG, C.BODY)).all()
    for p in prov:
        assert p["lidc_annotation"] >= 0 and p["patient"].startswith("LIDC-IDRI-") and p["texture"] in TEXTURES


@pytest.mark.parametrize("cond", [
    NoduleConditions(count=1),
    NoduleConditions(count=3, min_size_mm=5, max_size_mm=12),
    NoduleConditions(count=2, lung="left", texture="ground-glass"),
    NoduleConditions(count=1, lung="right", min_size_mm=20),
    NoduleConditions(count=2, texture="part-solid", region=(0.0, 0.3, 0.5, 0.7)),
    NoduleConditions(count=2, min_readers=3, max_size_mm=8),
])
def test_conditions_exact_on_many_seeds(anatomy, cond):
    model = NoduleModel(cond)
    for seed in range(24):
        before = anatomy[seed % len(anatomy)]
        mask, prov = model.place(before, SPACING, placement_rng(seed, 0, 0))
        _check(mask, prov, cond, before)


def test_statistics_of_2000_nodules_match_lidc(anatomy):
    """The issue's goal rows, on 2,000 nodules placed into the shipped weights' anatomy."""
    model = NoduleModel(NoduleConditions(count=2))
    meas, tex = [], []
    for i in range(1000):
        mask, prov = model.place(anatomy[i % len(anatomy)], SPACING, placement_rng(0, i, 0))
        meas.append(measure(mask, SPACING))
        tex += [p["texture"] for p in prov]
    g = {k: np.concatenate([m[k] for m in meas]) for k in meas[0]}
    r = compare_to_lidc(g, tex)
    assert r["n_generated"] >= 2000
    assert r["extent_ks"] <= 0.1, r
    assert r["dx_ks"] <= 0.15 and r["dy_ks"] <= 0.15, r
    assert r["lung_tv"] <= 0.1, r
    assert abs(r["juxta_pleural_share"][0] - r["juxta_pleural_share"][1]) <= 0.05, r
    for t, (a, b) in r["texture_share"].items():
        assert abs(a - b) <= 0.05, (t, a, b)


@pytest.mark.skipif(not TCGA.is_dir(), reason="../shared/data/tcga-chest-slices not present")
def test_real_masks_get_nodules_too():
    """Placement on real anatomy (a user's real slice): existing nodules kept and avoided."""
    real = _real_masks(3)
    real[0][240:246, 100:106] = np.where(real[0][240:246, 100:106] > 0, C.NODULE, 0)  # a "real" nodule
    model = NoduleModel(NoduleConditions(count=3, min_size_mm=4))
    for k, m in enumerate(real):
        out, prov = model.place(m, SPACING, placement_rng(5, k, 0))
        assert len(prov) == 3 and len(mask_to_boxes(out)) == len(mask_to_boxes(m)) + 3
        assert (out[m == C.NODULE] == C.NODULE).all()


def test_determinism_per_seed_and_index(anatomy):
    cfg = GenerationConfig(seed=3, num_nodules=(1, 3), min_nodule_mm=0)
    masks = torch.from_numpy(anatomy[:6].copy())
    keys = [(10 + k, 0) for k in range(6)]
    a = LidcPlacer(cfg, SPACING)
    ma, pa, _, _ = a.gate_and_place(masks.clone(), keys)
    b = LidcPlacer(cfg, SPACING)  # other batch composition and order: the same samples
    mb, pb, _, _ = b.gate_and_place(masks[[4, 2]].clone(), [keys[4], keys[2]])
    assert torch.equal(mb, ma[[4, 2]]) and b.placed[keys[4]] == a.placed[keys[4]]
    counts = {len(a.placed[k]) for k in keys}
    assert counts <= {1, 2, 3} and len(counts) > 1  # the count range is drawn per sample
    c = LidcPlacer(GenerationConfig(seed=4, num_nodules=(1, 3)), SPACING)
    mc, _, _, _ = c.gate_and_place(masks.clone(), keys)
    assert not torch.equal(mc, ma)


def test_impossible_conditions_refused_at_once(anatomy):
    with pytest.raises(NoduleSynthError, match="no LIDC cross-section.*70"):
        NoduleModel(NoduleConditions(min_size_mm=70))
    with pytest.raises(NoduleSynthError, match="ground-glass"):
        NoduleModel(NoduleConditions(min_size_mm=45, texture="ground-glass"))
    with pytest.raises(NoduleSynthError, match="40 nodules"):
        NoduleModel(NoduleConditions(count=40, min_size_mm=20))
    with pytest.raises(NoduleSynthError, match="texture"):
        NoduleModel(NoduleConditions(texture="calcified"))
    # 3 nodules of ≥ 8 mm into a 1 cm lung: the user's mask is named, nothing is returned
    tiny = scene_mask(size=512)
    tiny[(tiny == C.LEFT_LUNG) | (tiny == C.RIGHT_LUNG)] = C.BODY
    tiny[250:263, 100:113] = C.RIGHT_LUNG
    placer = LidcPlacer(GenerationConfig(num_nodules=3, min_size_mm=8, lung="right"), SPACING)
    with pytest.raises(NoduleSynthError, match="mask small.png: nodule 1 of 3 does not fit"):
        placer.add_to(torch.from_numpy(tiny[None]), ["small.png"])
    with pytest.raises(PlacementError):
        NoduleModel(NoduleConditions(count=1, min_size_mm=8)).place(tiny, SPACING, placement_rng(0, 0, 0))
    with pytest.raises(NoduleSynthError, match="texture: needs nodules='lidc'"):
        GenerationConfig(nodules="stylegan", texture="solid").validate()


def test_zero_nodules_gives_negatives(anatomy):
    placer = LidcPlacer(GenerationConfig(num_nodules=0), SPACING)
    scene = np.kron(scene_mask([(12, 25, 2)]), np.ones((8, 8), np.uint8))  # a drawn nodule in the right lung
    m = torch.from_numpy(np.stack([scene, anatomy[0]]))
    out, passed, reasons, boxes = placer.gate_and_place(m, [(0, 0), (1, 0)])
    assert passed.all() and not (out == C.NODULE).any() and all(len(b) == 0 for b in boxes)
    assert placer.placed[(0, 0)] == [] and out[0, 200, 100] == C.RIGHT_LUNG  # the drawn nodule became lung


def test_rasterised_outline_keeps_lidc_size():
    """At the output spacing the nodule spans what LIDC's outline encloses: the outline points' box
    less one scan pixel (half a pixel each side), never more, give or take one output pixel."""
    lib = load_library()
    rng = np.random.default_rng(0)
    d = []
    for i in rng.choice(len(lib), 200, replace=False):
        off = rasterise(lib.outline_mm(i), SPACING, lib.spacing[i])
        if len(off):
            d.append((np.ptp(off, axis=0).max() + 1) * SPACING - (lib.box_mm[i] - lib.spacing[i]))
    d = np.array(d)
    assert len(d) >= 195 and d.max() <= SPACING + 1e-6 and np.mean(np.abs(d) <= 1.5 * SPACING) >= 0.95


def test_outline_pixels_lie_outside_the_nodule():
    """The outline's own pixels are not nodule (pylidc's rule); a hole's outline is not either; at
    the scan's spacing a square outline of side 10 px encloses the 9 × 9 centres strictly inside."""
    from nodulesynth.masks.outlines import outline_pixels

    sq = np.array([[0, 0], [10, 0], [10, 10], [0, 10]], float)
    yx = outline_pixels([(sq, True)], 0.5)
    assert len(yx) == 81 and yx.min() == 1 and yx.max() == 9
    hole = np.array([[4, 4], [6, 4], [6, 6], [4, 6]], float)
    yx = {tuple(v) for v in outline_pixels([(sq, True), (hole, False)], 0.5)}
    assert len(yx) == 81 - 9 and (5, 5) not in yx and (4, 4) not in yx and (3, 3) in yx
    assert len(outline_pixels([(np.array([[0, 0], [1, 0], [1, 1]], float), True)], 0.5)) == 0  # encloses no centre
    # at half the spacing (2 output px per scan px) the boundary stays half a scan pixel inside
    yx = outline_pixels([(sq * 2, True)], 1.0)
    assert yx.min() == 1 and yx.max() == 19 and len(yx) == 19 * 19


def test_pipeline_lidc_mode_tiny_model(tmp_path):
    """Synthesizer end to end (tiny random TSGAN): LIDC provenance, same samples for any batch size."""
    from nodulesynth.models.pix2pix import TranslatorConfig
    from nodulesynth.models.stylegan import MaskGANConfig
    from nodulesynth.models.tsgan import TSGAN

    torch.manual_seed(4)
    model = TSGAN.from_configs(
        MaskGANConfig(resolution=16, z_dim=32, w_dim=32, mapping_layers=2, fmap_base=256, fmap_max=32),
        TranslatorConfig(ngf=8, ndf=8, num_downs=6, dwmh_depth=3, dwmh_window=4, dwmh_heads=2), image_size=64).eval()
    cfg = dict(seed=2, block=4, spacing_mm=3.0, max_size_mm=15, max_attempts=64)
    s = Synthesizer(model, GenerationConfig(batch_size=4, **cfg))
    a = s.generate(range(4))
    for mask, boxes, prov in zip(a.masks.numpy(), a.boxes, a.provenance):
        assert prov["nodule_mode"] == "lidc" and len(prov["nodules"]) == 1 == len(boxes)
        assert nodule_size_mm(boxes, 3.0).max() <= 15
        np.testing.assert_array_equal(boxes, mask_to_boxes(mask))
    b = Synthesizer(model, GenerationConfig(batch_size=1, **cfg)).generate([3, 1])
    assert torch.equal(b.masks, a.masks[[3, 1]]) and b.provenance[0] == a.provenance[3]
    added = Synthesizer(model, GenerationConfig(add_nodules=True, num_nodules=1, **cfg)).translate(
        scene_mask(size=64), names=["mine"])
    assert added.provenance[0]["nodules"][0]["lidc_annotation"] >= 0 and len(added.boxes[0]) == 1

    # real slices + LIDC nodules: only the new nodules (and their soft rim) change the real HU
    real_mask = scene_mask([(20, 30, 2)])
    real_hu = np.where(real_mask == C.BODY, 40, np.where(real_mask == 0, -1024, -850)).astype(np.float32)
    s2 = Synthesizer(model, GenerationConfig(num_nodules=1, min_size_mm=6, **{**cfg, "max_size_mm": None}))
    r = s2.add_nodules_to_real(real_hu[None], real_mask[None], ["r0"])
    fresh = (r.masks[0].numpy() == C.NODULE) & (real_mask != C.NODULE)
    assert fresh.any() and len(r.boxes[0]) == 2 and r.provenance[0]["source"] == "real+lidc-nodules"
    from scipy.ndimage import binary_dilation

    far = ~binary_dilation(fresh, iterations=3)
    np.testing.assert_array_equal(r.images_hu[0].numpy()[far], real_hu[far])
    assert not np.array_equal(r.images_hu[0].numpy()[fresh], real_hu[fresh])

    # the dataset's real= slices get them too (conditions add_nodules)
    from nodulesynth import SyntheticNoduleDataset
    from nodulesynth.data.slices import SliceRecord, write_slice_dataset

    recs = [SliceRecord(series_uid=f"1.2.{k}", z_mm=float(k), slice_index=k, spacing_mm=(3.0, 3.0),
                        boxes=mask_to_boxes(real_mask), source="phantom", has_nodule=True) for k in range(3)]
    folder = write_slice_dataset(tmp_path / "real", np.stack([real_hu.astype(np.int16)] * 3),
                                 np.stack([real_mask] * 3), recs)
    ds = SyntheticNoduleDataset(0, weights=model, real=folder, device="cpu", batch_size=4, seed=2,
                                conditions={"add_nodules": True, "num_nodules": 1, **cfg})
    item = ds[1]
    assert item["source"] == "real" and len(item["boxes"]) == 2 and item["provenance"]["nodules"]
    with pytest.raises(NoduleSynthError, match="add_nodules needs real="):
        SyntheticNoduleDataset(1, weights=model, device="cpu", seed=2, conditions={"add_nodules": True, **cfg})


def test_min_readers_keeps_consensus_nodules_and_refuses_nonsense():
    """min_readers=3 (LUNA16's rule) leaves out the single- and two-reader nodules; bad values and the
    StyleGAN mode are refused with the argument's name."""
    lib = load_library()
    rows = NoduleModel(NoduleConditions(min_readers=3)).rows
    assert (lib.readers[rows] >= 3).all() and (lib.readers[np.setdiff1d(np.flatnonzero(lib.weight > 0), rows)] <= 2).all()
    share = lib.weight[lib.readers <= 2].sum() / lib.weight.sum()
    assert 0.3 < share < 0.45  # by section, 1- and 2-reader nodules are 37 % of LIDC's
    for bad in (0, 5, 2.5):
        with pytest.raises(NoduleSynthError, match="min_readers"):
            NoduleModel(NoduleConditions(min_readers=bad))
        with pytest.raises(NoduleSynthError, match="min_readers"):
            GenerationConfig(min_readers=bad).validate()
    with pytest.raises(NoduleSynthError, match="min_readers: needs nodules='lidc'"):
        GenerationConfig(nodules="stylegan", min_readers=3).validate()
