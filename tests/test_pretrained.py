"""The shipped default weights (pretrained/): they load offline, are small, carry a model card,
and generate valid, CT-like samples on CPU. These tests fail — never skip — if the weights are
missing, because `nodulesynth generate` depends on them."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nodulesynth.masks.classes import MaskClass as C
from nodulesynth.models.tsgan import DEFAULT_WEIGHTS_DIR, TSGAN
from nodulesynth.synth.pipeline import GenerationConfig, Synthesizer


@pytest.fixture(scope="module")
def shipped() -> TSGAN:
    return TSGAN.from_pretrained("pretrained")


@pytest.fixture(scope="module")
def samples(shipped):
    return Synthesizer(shipped, GenerationConfig(seed=0, block=4, batch_size=4)).generate(range(4))


def test_shipped_folder_is_small_safetensors_with_a_model_card(shipped):
    files = {p.name: p.stat().st_size for p in DEFAULT_WEIGHTS_DIR.iterdir()}
    assert {"mask_generator.safetensors", "translator.safetensors", "tsgan.json", "README.md"} <= set(files)
    assert sum(files.values()) <= 32 * 2**20
    assert not any(n.endswith((".pt", ".pth", ".pkl", ".bin")) for n in files)
    card = (DEFAULT_WEIGHTS_DIR / "README.md").read_text(encoding="utf-8")
    for must in ("LIDC-IDRI", "phantom", "steps", "not for diagnosis"):
        assert must.lower() in card.lower(), must
    meta = json.loads((DEFAULT_WEIGHTS_DIR / "tsgan.json").read_text(encoding="utf-8"))
    assert meta["image_size"] == 512 and meta["meta"]["spacing_mm"] > 0
    assert shipped.source.startswith("local:") and len(shipped.revision) == 12


def test_generated_masks_pass_the_gate_with_nodules_in_lungs(samples):
    for mask, boxes, prov in zip(samples.masks.numpy(), samples.boxes, samples.provenance):
        assert len(boxes) >= 1
        assert (mask == C.LEFT_LUNG).any() and (mask == C.RIGHT_LUNG).any() and (mask == C.BODY).any()
        # patient's left lung on the image's right
        ys, xs = np.nonzero(mask == C.LEFT_LUNG)
        yr, xr = np.nonzero(mask == C.RIGHT_LUNG)
        assert xs.mean() > xr.mean()
        assert prov["seed"] == 0 and prov["revision"]


def test_generated_slices_have_ct_like_hu(samples):
    hu, masks = samples.images_hu, samples.masks
    lungs = (masks == C.LEFT_LUNG) | (masks == C.RIGHT_LUNG)
    lung_median = hu[lungs].median().item()
    assert -950 < lung_median < -700, lung_median
    # soft tissue: the densest mode of the body's HU histogram between fat and bone (bone and contrast
    # above 200 HU are left out, not clamped into the top bin: clamped, half of the real TRAIN slices
    # would read 195)
    body = hu[masks == C.BODY]
    hist = torch.histc(body, bins=40, min=-200, max=200)
    soft_peak = -200 + 10 * (int(torch.argmax(hist[17:])) + 17) + 5  # search −30 … 200 HU
    assert -20 < soft_peak < 110, soft_peak
    assert hu[masks == C.BACKGROUND].median().item() < -900
    nodule = hu[masks == C.NODULE].median().item()
    assert nodule > lung_median + 200, (nodule, lung_median)


def test_same_seed_same_samples(shipped, samples):
    again = Synthesizer(shipped, GenerationConfig(seed=0, block=4, batch_size=2)).generate([2, 3])
    assert torch.equal(again.masks, samples.masks[2:]) and torch.equal(again.images_hu, samples.images_hu[2:])


def test_default_weights_are_package_data():
    """`pip install .` (not -e) must carry the weights: they live inside the package and
    pyproject's package-data globs cover every file of the folder."""
    import fnmatch
    import tomllib
    from pathlib import Path

    import nodulesynth

    pkg = Path(nodulesynth.__file__).resolve().parent
    assert DEFAULT_WEIGHTS_DIR.resolve().parent == pkg
    root = pkg.parent
    globs = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["package-data"]["nodulesynth"]
    files = [p.relative_to(pkg).as_posix() for p in DEFAULT_WEIGHTS_DIR.iterdir() if p.is_file()]
    assert files and all(any(fnmatch.fnmatch(f, g) for g in globs) for f in files), (files, globs)
    top = root / "pretrained"  # the design card's shipped folder: a link to the package data
    if top.exists():
        assert top.resolve() == DEFAULT_WEIGHTS_DIR.resolve()


@pytest.mark.slow
def test_wheel_ships_the_default_weights(tmp_path):
    """Build the wheel (no network: the installed setuptools) and check the weights are inside."""
    import shutil
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    import nodulesynth

    pytest.importorskip("setuptools")
    pkg = Path(nodulesynth.__file__).resolve().parent
    src = tmp_path / "src"
    shutil.copytree(pkg, src / "nodulesynth", ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(pkg.parent / f, src / f)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(tmp_path / "whl")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    names = set(zipfile.ZipFile(next((tmp_path / "whl").glob("*.whl"))).namelist())
    shipped = {f"nodulesynth/pretrained/{p.name}" for p in DEFAULT_WEIGHTS_DIR.iterdir() if p.is_file()}
    assert shipped and shipped <= names, shipped - names


def test_shipped_lung_texture_fills_only_the_lungs(shipped, samples):
    """The shipped weights hold the lung texture model, every sample says it was used, and turning it
    off changes the lungs only (same masks, same translator pixels everywhere else; the nodules,
    redrawn from the lungs around them, and their rim change with it)."""
    from nodulesynth.models.nodule_texture import hole_of

    assert shipped.lung_texture is not None
    assert all(p["lung_texture"] for p in samples.provenance)
    off = Synthesizer(shipped, GenerationConfig(seed=0, block=4, batch_size=4, lung_texture=False)).generate(range(4))
    assert torch.equal(off.masks, samples.masks)
    lungs = (samples.masks == C.LEFT_LUNG) | (samples.masks == C.RIGHT_LUNG)
    lungs |= hole_of(samples.masks == C.NODULE, shipped.nodule_texture.cfg.ring_px + 1)
    assert torch.equal(off.images_hu[~lungs], samples.images_hu[~lungs])
    assert not torch.equal(off.images_hu[lungs], samples.images_hu[lungs])


def test_shipped_nodule_texture_redraws_only_nodules_and_their_lung_margin(shipped, samples):
    """The shipped weights hold the nodule texture model; off, the slices are the previous revision's:
    only the nodules, their 2-px rim and the lung texture's margin around them differ."""
    from nodulesynth.models.nodule_texture import hole_of

    assert shipped.nodule_texture is not None
    assert all(p["nodule_texture"] for p in samples.provenance)
    off = Synthesizer(shipped, GenerationConfig(seed=0, block=4, batch_size=4, nodule_texture=False)).generate(range(4))
    assert torch.equal(off.masks, samples.masks)
    nod = samples.masks == C.NODULE
    near = hole_of(nod, shipped.nodule_texture.cfg.ring_px + 1)
    margin = hole_of(nod, 3 + 4 + 1)  # lung_alpha's nodule margin and ramp
    assert torch.equal(off.images_hu[~margin], samples.images_hu[~margin])
    assert not torch.equal(off.images_hu[near], samples.images_hu[near])


def test_shipped_slices_show_no_strong_grid(samples):
    """Checkerboard guard for whatever ships in pretrained/: the spectral-peak score of the generated
    slices stays below 0.6 (real CT 0.02–0.28; these weights 0.47–0.60 on these 4 samples; the two
    whole-slice fine-tunes of README "Retraining on the real corpus", not shipped, give 0.69–1.05)."""
    from nodulesynth.metrics.artifacts import checkerboard_score

    scores = checkerboard_score(samples.images_hu)
    assert float(scores.median()) < 0.6, scores


# Share of lung pixels above −700 HU (vessels, bronchial walls, fissures) per real 512² slice, over the
# 117 slices of the prepared TCGA, pyradiomics and LIDC sets with > 2,000 lung pixels (2026-11-26):
# min 5.8 %, 5th percentile 6.4 %, median 12.4 %, 95th percentile 46.9 %. An empty lung reads near 0.
REAL_LUNG_SHARE_P5, REAL_LUNG_SHARE_P95 = 0.064, 0.469


def test_generated_lungs_hold_vessel_like_structure(samples):
    """Issue 13's vessel check: the generated lungs' share of pixels above −700 HU lies within what
    real slices show (their 5th to 95th percentile). Every weights before revision bd1739aae563
    failed it (4.8 % on these samples); its lung texture, trained on past its padding's reach,
    gives 13.1 %."""
    hu, masks = samples.images_hu, samples.masks
    lungs = (masks == C.LEFT_LUNG) | (masks == C.RIGHT_LUNG)
    share = float((hu[lungs] > -700).float().mean())
    assert REAL_LUNG_SHARE_P5 <= share <= REAL_LUNG_SHARE_P95, share
