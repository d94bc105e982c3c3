"""Body atlas (synth.atlas): registration lands an atlas body on the generated one; only body pixels change."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nodulesynth.errors import NoduleSynthError
from nodulesynth.masks.classes import MaskClass as C
from nodulesynth.synth.atlas import LIBRARY, AtlasConfig, BodyAtlas, register, warp

ROOT = Path(__file__).resolve().parents[1]


def thorax(size: int = 64, cx: float = 32, cy: float = 32, rx: float = 26, ry: float = 20) -> np.ndarray:
    """An elliptic body with two elliptic lungs (patient's right on the image left)."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    m = np.zeros((size, size), np.uint8)
    m[((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1] = C.BODY
    for side, lab in ((-1, C.RIGHT_LUNG), (1, C.LEFT_LUNG)):
        m[((xx - cx - side * 0.45 * rx) / (0.3 * rx)) ** 2 + ((yy - cy) / (0.65 * ry)) ** 2 <= 1] = lab
    return m


def tiny_atlas(path: Path, config: AtlasConfig = AtlasConfig()) -> BodyAtlas:
    """Two entries: a wide and a narrow thorax; body HU 100 (entry 0) / 200 (entry 1), a 'spine' of
    700 HU under the lungs, nothing stored outside the body."""
    masks = np.stack([thorax(), thorax(rx=18, ry=22)])
    hu = np.where(masks == C.BODY, np.array([100, 200])[:, None, None], 0).astype(np.int16)
    hu[:, 44:48, 30:34] = 700
    np.savez_compressed(path, hu=hu, masks=masks, source=np.array(["a:p1", "a:p2"]), spacing_mm=np.float32(0.8))
    return BodyAtlas(path, config)


def dice(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_registration_lands_lungs_and_body_on_the_target():
    src = torch.from_numpy(thorax(cx=28, cy=30, rx=20, ry=16))[None]
    dst = torch.from_numpy(thorax(cx=34, cy=33, rx=26, ry=21))[None]
    theta, field = register(src, dst)
    onehot = torch.stack([(src == c) for c in (C.BODY, C.RIGHT_LUNG, C.LEFT_LUNG)], 1).float()
    moved = warp(onehot, theta, field, (64, 64)) > 0.5
    for k, c in enumerate((C.BODY, C.RIGHT_LUNG, C.LEFT_LUNG)):
        before = dice(src[0] == c, dst[0] == c)
        after = dice(moved[0, k], dst[0] == c)
        assert after > 0.85 and after > before + 0.2, (c, before, after)


def test_paste_changes_only_body_pixels(tmp_path):
    atlas = tiny_atlas(tmp_path / "a.npz")
    m = torch.from_numpy(np.stack([thorax(cx=30, rx=24), np.zeros((64, 64), np.uint8)]))
    m[0, 30:33, 14:17] = C.NODULE
    hu = torch.full((2, 64, 64), -50.0)
    out, entries = atlas.apply(hu, m, [0, 1], 0.8)
    body = m == C.BODY
    assert torch.equal(out[~body], hu[~body])  # lungs, nodule, background and the empty mask untouched
    inner = body[0] & (out[0] != -50)
    assert inner.sum() > 0.8 * body[0].sum()  # the atlas covers nearly all of the body
    # the 2-px feather: deep inside the body the atlas HU come through whole
    deep = out[0, 15:17, 27:33]  # above the mediastinum, ≥ 3 px from lungs and skin
    assert torch.allclose(deep, torch.full_like(deep, 100.0 if entries[0] == 0 else 200.0), atol=1)
    assert (out[0] > 600).any()  # the spine came along


def test_entries_are_nearest_seeded_and_can_avoid_a_patient(tmp_path):
    atlas = tiny_atlas(tmp_path / "a.npz", AtlasConfig(top_k=1))
    narrow = torch.from_numpy(thorax(rx=18, ry=22))[None]
    assert atlas.entries(narrow, [5], 0.8) == [1]  # the nearest shape
    assert atlas.entries(narrow, [5], 0.8, avoid=["a:p2"]) == [0]  # never the patient's own body
    atlas = tiny_atlas(tmp_path / "a.npz", AtlasConfig(top_k=2))
    picks = {atlas.entries(narrow, [s], 0.8)[0] for s in range(20)}
    assert picks == {0, 1}  # each seed draws among the TOP_K nearest
    assert atlas.entries(narrow, [7], 0.8) == atlas.entries(narrow, [7], 0.8)


def test_other_pixel_sizes_register_too(tmp_path):
    atlas = tiny_atlas(tmp_path / "a.npz")
    m = torch.from_numpy(thorax(size=32, cx=16, cy=16, rx=13, ry=10))[None]  # half the pixels, 1.6 mm
    out, _ = atlas.apply(torch.zeros(1, 32, 32), m, [0], 1.6)
    body = m[0] == C.BODY
    assert out.shape == (1, 32, 32) and (out[0][body] != 0).float().mean() > 0.7 and (out[0][~body] == 0).all()


def test_bad_atlas_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, hu=np.zeros((2, 8, 8), np.int16))
    with pytest.raises(NoduleSynthError, match="bad.npz: not a body atlas"):
        BodyAtlas(bad).apply(torch.zeros(1, 8, 8), torch.ones(1, 8, 8, dtype=torch.uint8), [0], 0.8)
    odd = tmp_path / "odd.npz"
    np.savez(odd, hu=np.zeros((2, 8, 8), np.int16), masks=np.zeros((2, 4, 4), np.uint8),
             source=np.array(["a", "b"]), spacing_mm=np.float32(0.8))
    with pytest.raises(NoduleSynthError, match="odd.npz: inconsistent body atlas"):
        len(BodyAtlas(odd))


def test_shipped_atlas_holds_train_bodies_only():
    with np.load(LIBRARY, allow_pickle=False) as z:
        hu, masks, sources = z["hu"], z["masks"], [str(s) for s in z["source"]]
    assert hu.dtype == np.int16 and hu.shape[1:] == (512, 512) and masks.shape == hu.shape and len(hu) >= 50
    held = json.loads((ROOT / "benchmarks/results/heldout_realism_scanner_background.json").read_text())["heldout_patients"]
    assert not set(sources) & set(held), "a held-out patient's body is in the shipped atlas"
    assert len(set(sources)) >= 20
    from scipy import ndimage as ndi

    for k in range(0, len(hu), 9):  # only the body (and a 2-px rim) is stored: no lung, no background
        far = ~ndi.binary_dilation(masks[k] == C.BODY, iterations=3)
        assert not hu[k][far].any(), sources[k]


def test_generate_records_and_repeats_the_atlas_body():
    from scenes import scene_mask
    from test_synth import GATE, tiny_tsgan

    from nodulesynth.synth.pipeline import GenerationConfig, Synthesizer

    model = tiny_tsgan()
    syn = Synthesizer(model, GenerationConfig(seed=3, **GATE))
    off = Synthesizer(model, GenerationConfig(seed=3, body="translator", **GATE))
    m = torch.from_numpy(np.stack([scene_mask([(18, 30, 3)]), scene_mask([(18, 20, 2)])]))
    a, o = syn._translate(m, [(0, 0), (1, 0)]), off._translate(m, [(0, 0), (1, 0)])
    body = m == C.BODY
    assert torch.equal(a[~body], o[~body]) and not torch.equal(a[body], o[body])
    # a sample's body depends on (seed, index, attempt), not on the batch it was drawn in
    assert torch.equal(syn._translate(m[1:], [(1, 0)])[0], a[1])
    rec = syn.generate([0]).provenance[0]["body"]
    atlas = BodyAtlas()
    assert rec["atlas"] == atlas.revision and atlas.source(rec["entry"]) == rec["source"]
    assert off.generate([0]).provenance[0]["body"] == "translator"
    assert syn.translate(m).provenance[1]["body"]["atlas"] == atlas.revision
    with pytest.raises(NoduleSynthError, match="body: must be one of atlas, translator"):
        GenerationConfig(body="wax").validate()
    with pytest.raises(NoduleSynthError, match="atlas config: grid ≥ 2"):
        AtlasConfig(grid=1)
