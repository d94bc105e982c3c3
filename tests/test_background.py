"""Scanner backgrounds (synth.background): only background pixels change, aligned to the body, per seed."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from nodulesynth.errors import NoduleSynthError
from nodulesynth.masks.classes import MaskClass
from nodulesynth.synth.background import LIBRARY, ScannerBackgrounds, body_geometry

ROOT = Path(__file__).resolve().parents[1]
TABLE_HU = 500.0


def tiny_library(path: Path, spacing: float = 0.8) -> ScannerBackgrounds:
    """Two 64² entries: air −1000 with a one-row 'table' 5 rows below each body bottom (rows 40, 30)."""
    hu = np.full((2, 64, 64), -1000, np.int16)
    hu[0, 45, 10:54] = TABLE_HU
    hu[1, 35, 10:54] = TABLE_HU
    tile = np.full((2, 4, 4), -990, np.int16)
    np.savez_compressed(path, hu=hu, tile=tile, bottom=np.array([40, 30], np.int16),
                        centre_x=np.array([31.5, 31.5], np.float32), source=np.array(["a:p1", "a:p2"]),
                        spacing_mm=np.float32(spacing))
    return ScannerBackgrounds(path)


def body_masks() -> torch.Tensor:
    m = torch.zeros((3, 64, 64), dtype=torch.uint8)
    m[0, 20:50, 16:48] = MaskClass.BODY  # bottom row 49
    m[0, 25:40, 20:30] = MaskClass.RIGHT_LUNG
    m[1, 10:30, 30:60] = MaskClass.BODY  # bottom 29, centre 44.5
    return m  # m[2]: no body at all


def test_paste_changes_only_background_and_meets_the_body(tmp_path):
    lib = tiny_library(tmp_path / "b.npz")
    m = body_masks()
    hu = torch.full((3, 64, 64), 40.0)
    out = lib.paste(hu, m, seeds=[0, 1, 1], spacing_mm=0.8)
    body = m != MaskClass.BACKGROUND
    assert torch.equal(out[body], hu[body])  # the patient is never touched
    assert torch.equal(out[2], hu[2])  # no body: nothing to align to, the translator's background stays
    # entry 0 (table 5 rows under its body) under sample 0's body, bottom 49 → table row 54
    assert (out[0, 54, 10:54] == TABLE_HU).all() and (out[0, 45] != TABLE_HU).all()
    # entry 1 under sample 1: bottom 29 → row 34, shifted right by 44.5 − 31.5 = 13 columns
    assert (out[1, 34, 23:64] == TABLE_HU).all() and (out[1, 34, :23] != TABLE_HU).all()
    # what the shift brings in from beyond the entry is the entry's air tile, not a constant
    assert (out[1, 0:2, 0:13] == -990).all()


def test_coarser_pixels_resample_the_library(tmp_path):
    lib = tiny_library(tmp_path / "b.npz", spacing=0.8)
    m = torch.zeros((1, 32, 32), dtype=torch.uint8)
    m[0, 5:20, 8:24] = MaskClass.BODY  # bottom 19
    out = lib.paste(torch.zeros((1, 32, 32)), m, [0], spacing_mm=1.6)
    # at 1.6 mm the entry's bottom is row 20 and its table (rows 44–45 → 22, area-averaged to −250 HU)
    # lies 2 px under it, not 5; the generated body's bottom is row 19, so the table lands on row 21
    rows = out[0, :, 16]
    assert rows[21] == -250 and rows[22:].max() < -900 and rows[20] < -900 and rows[5:20].eq(0).all()


def test_body_geometry_of_batches():
    bottom, centre, has = body_geometry(body_masks())
    assert bottom[:2].tolist() == [49, 29] and centre[:2].tolist() == [31.5, 44.5] and has.tolist() == [True, True, False]


def test_bad_library_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, hu=np.zeros((2, 8, 8), np.int16))
    with pytest.raises(NoduleSynthError, match="bad.npz: not a scanner-background library"):
        ScannerBackgrounds(bad).paste(torch.zeros(1, 8, 8), torch.ones(1, 8, 8, dtype=torch.uint8), [0], 0.8)


def test_shipped_library_holds_no_held_out_patient_and_no_anatomy():
    with np.load(LIBRARY, allow_pickle=False) as z:
        hu, sources, bottom = z["hu"], [str(s) for s in z["source"]], z["bottom"]
    assert hu.dtype == np.int16 and hu.shape[1:] == (512, 512) and len(hu) >= 50
    held = json.loads((ROOT / "benchmarks/results/heldout_realism_scanner_background.json").read_text())["heldout_patients"]
    assert not set(sources) & set(held), "a held-out patient's background is in the shipped library"
    assert len(set(sources)) >= 20
    for k in range(0, len(hu), 7):  # no arm or other body part beside the table
        lab, n = ndi.label(hu[k] > -300)
        assert n == 0 or np.bincount(lab.ravel())[1:].max() <= 3000, sources[k]
        assert (hu[k, : bottom[k]] > -300).mean() < 0.02  # above the table: air and thin cloth only


def test_generate_records_and_repeats_the_background():
    from scenes import scene_mask
    from test_synth import GATE, tiny_tsgan

    from nodulesynth.synth.pipeline import GenerationConfig, Synthesizer

    model = tiny_tsgan()
    syn = Synthesizer(model, GenerationConfig(seed=3, **GATE))
    off = Synthesizer(model, GenerationConfig(seed=3, background="translator", **GATE))
    m = torch.from_numpy(np.stack([scene_mask([(18, 30, 3)]), scene_mask([(18, 20, 2)])]))
    a, o = syn._translate(m, [(0, 0), (1, 0)]), off._translate(m, [(0, 0), (1, 0)])
    body = m != MaskClass.BACKGROUND
    assert torch.equal(a[body], o[body]) and not torch.equal(a[~body], o[~body])
    # a sample's background depends on (seed, index, attempt), not on the batch it was drawn in
    assert torch.equal(syn._translate(m[1:], [(1, 0)])[0], a[1])
    rec = syn.generate([0]).provenance[0]["background"]
    lib = ScannerBackgrounds()
    assert rec["library"] == lib.revision and lib.source(rec["entry"]) == rec["source"]
    assert off.generate([0]).provenance[0]["background"] == "translator"
    assert Synthesizer(model, GenerationConfig(seed=4, **GATE)).generate([0]).provenance[0]["background"] != rec
    with pytest.raises(NoduleSynthError, match="background: must be one of scanner, translator"):
        GenerationConfig(background="table").validate()
