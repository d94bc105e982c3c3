"""Lung library (synth.lung_library): real TRAIN lung tiles quilted into the generated lungs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from nodulesynth.errors import NoduleSynthError
from nodulesynth.masks.classes import MaskClass as C
from nodulesynth.synth.lung_library import LIBRARY, OVERLAP, POOL_PATIENTS, TILE, LungLibrary, _seam

ROOT = Path(__file__).resolve().parents[1]


def save_library(path: Path, hu: np.ndarray, src: np.ndarray) -> LungLibrary:
    """A library file of these tiles; each patient's pool is every patient, itself first."""
    n = len(np.unique(src))
    pool = np.array([[p] + [q for q in range(n) if q != p] for p in range(n)])[:, :POOL_PATIENTS]
    np.savez_compressed(path, hu=hu, source=src, spacing_mm=np.float32(0.8), pool=pool.astype(np.int16))
    return LungLibrary(path)


def tiny_library(path: Path, patients: int = 3, per: int = 6) -> LungLibrary:
    """Tiles whose HU say which patient and tile they are: patient p, tile t → −900 + 10·p + t."""
    hu = np.stack([np.full((TILE, TILE), -900 + 10 * p + t, np.int16) for p in range(patients) for t in range(per)])
    return save_library(path, hu, np.array([f"x:p{p}" for p in range(patients) for _ in range(per)]))


def test_seam_follows_the_cheapest_path():
    err = np.ones((6, 5))
    path = [1, 1, 2, 3, 3, 2]
    for r, c in enumerate(path):
        err[r, c] = 0
    new = _seam(err)
    assert [int(np.argmax(row)) for row in new] == path  # new pixels start on the path, old ones left of it
    assert all(row[c:].all() and not row[:c].any() for row, c in zip(new, path))


def test_quilt_is_a_pure_function_of_the_seed_and_uses_only_its_pool(tmp_path):
    lib = tiny_library(tmp_path / "t.npz")
    a, b = lib.quilt(70, 90, 5), lib.quilt(70, 90, 5)
    assert a.shape == (70, 90) and np.array_equal(a, b) and not np.array_equal(a, lib.quilt(70, 90, 6))
    rec = lib.record(5)
    assert rec["library"] == lib.revision and len(rec["patients"]) == min(POOL_PATIENTS, 3)


def laid_bases(f: np.ndarray, hu: np.ndarray, cells: int) -> list[list[int]]:
    """Which of the tiles ``hu`` lies in each of the first cells² grid cells of the quilt ``f``
    (identified by each cell's interior, beyond the seams, in any of the 8 orientations)."""
    n = len(hu)
    orient = [np.rot90(t, k) for t in hu.astype(np.float32) for k in range(4)]
    orient = np.stack(orient + [o[:, ::-1] for o in orient])  # base tile b at rows b·4+k and 4n+b·4+k
    step, inner = TILE - OVERLAP, slice(OVERLAP, TILE - OVERLAP)

    def base(y: int, x: int) -> int:
        cell = f[y * step:y * step + TILE, x * step:x * step + TILE][inner, inner]
        d = orient[:, inner, inner] - cell
        j = int(np.argmin(np.abs(d).max((1, 2))))
        assert np.abs(d[j]).max() < 1.0  # the cell's interior is that tile, at its own HU
        return (j % (4 * n)) // 4

    return [[base(y, x) for x in range(cells)] for y in range(cells)]


def random_tiles(n: int) -> np.ndarray:
    return (-850 + 60 * np.random.default_rng(0).standard_normal((n, TILE, TILE))).astype(np.int16)


def test_no_tile_lies_beside_its_own_copy(tmp_path):
    """A tile's own flip continues it almost exactly (mirror images): neighbours are other tiles, even
    when the pool (10 tiles for 25 cells) must repeat."""
    hu = random_tiles(10)
    f = save_library(tmp_path / "r.npz", hu, np.array(["x:p0"] * 10)).quilt(TILE * 5, TILE * 5, 0)
    grid = laid_bases(f, hu, 5)
    for y in range(5):
        for x in range(5):
            for dy, dx in ((0, 1), (1, -1), (1, 0), (1, 1)):
                if 0 <= y + dy < 5 and 0 <= x + dx < 5:
                    assert grid[y][x] != grid[y + dy][x + dx], (y, x, grid)


def test_no_tile_repeats_while_the_pool_lasts(tmp_path):
    """Real lung never repeats itself: with 30 tiles for 25 cells, every cell holds another tile."""
    hu = random_tiles(30)
    f = save_library(tmp_path / "r.npz", hu, np.array(["x:p0"] * 30)).quilt(TILE * 5, TILE * 5, 3)
    grid = laid_bases(f, hu, 5)
    assert len({b for row in grid for b in row}) == 25, grid


def test_other_pixel_sizes_and_boxes(tmp_path):
    lib = tiny_library(tmp_path / "t.npz")
    boxes = torch.tensor([[10, 20, 60, 80], [0, 0, 0, 0]])
    f = lib.sample_hu(96, 96, [1, 2], boxes=boxes)
    assert f.shape == (2, 96, 96) and (f[1] == -850).all() and (f[0, :10] == -850).all()
    assert torch.equal(f[0, 10:60, 20:80], torch.from_numpy(lib.quilt(50, 60, 1)))
    g = lib.sample_hu(96, 96, [1], spacing_mm=1.2, boxes=boxes[:1])
    assert g.shape == (1, 96, 96) and torch.isfinite(g).all()


def test_bad_library_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, hu=np.zeros((2, 8, 8), np.int16))
    with pytest.raises(NoduleSynthError, match="bad.npz: not a lung library"):
        LungLibrary(bad).quilt(40, 40, 0)
    odd = tmp_path / "odd.npz"
    np.savez(odd, hu=np.zeros((2, 8, 8), np.int16), source=np.array(["a", "b"]), spacing_mm=np.float32(0.8),
             pool=np.zeros((2, 1), np.int16))
    with pytest.raises(NoduleSynthError, match="odd.npz: inconsistent lung library"):
        len(LungLibrary(odd))
    nopool = tmp_path / "nopool.npz"
    np.savez(nopool, hu=np.zeros((2, TILE, TILE), np.int16), source=np.array(["a", "b"]), spacing_mm=np.float32(0.8),
             pool=np.array([[0], [5]], np.int16))
    with pytest.raises(NoduleSynthError, match=r"nopool.npz: inconsistent lung library \(pool"):
        len(LungLibrary(nopool))


def test_quilt_runs_the_same_on_worker_processes(tmp_path):
    """What the pipeline hands the LIDC placement workers (``LidcPlacer.map``) gives the same fields."""
    from concurrent.futures import ProcessPoolExecutor

    lib = tiny_library(tmp_path / "t.npz")
    boxes = torch.tensor([[3, 5, 60, 70], [10, 0, 40, 30]])
    with ProcessPoolExecutor(1) as pool:
        far = lib.sample_hu(64, 80, [4, 9], boxes=boxes, run=lambda fn, jobs: list(pool.map(fn, *zip(*jobs))))
    assert torch.equal(far, lib.sample_hu(64, 80, [4, 9], boxes=boxes))


def test_shipped_library_holds_train_lung_only():
    with np.load(LIBRARY, allow_pickle=False) as z:
        hu, sources = z["hu"], sorted({str(s) for s in z["source"]})
        pool = z["pool"]
    assert pool.shape == (len(sources), POOL_PATIENTS) and all(p in row for p, row in enumerate(pool))  # itself included
    assert hu.dtype == np.int16 and hu.shape[1:] == (TILE, TILE) and len(hu) >= 1000 and len(sources) >= 100
    assert all(s.startswith("lidc-crops:LIDC-IDRI-") for s in sources)
    assert (np.median(hu.reshape(len(hu), -1), axis=1) <= -700).all()  # parenchyma, not consolidation
    # no dense blob ≥ 6 mm across (chest wall the crop's mask called lung, a calcification): it could read
    # as a nodule no label marks
    dense = np.pad(hu > -300, ((0, 0), (1, 1), (1, 1)))
    assert max(ndi.distance_transform_edt(d).max() for d in dense) * 0.8 < 3.0
    held = json.loads((ROOT / "benchmarks/results/heldout_realism_lung_library_seed1.json").read_text())["heldout_crop_patients"]
    assert len(held) > 100 and not set(sources) & set(held), "a held-out patient's lung is in the shipped library"


def test_generate_changes_only_the_lungs_and_records_the_tiles():
    from scenes import scene_mask
    from test_synth import GATE, tiny_tsgan

    from nodulesynth.synth.pipeline import GenerationConfig, Synthesizer

    model = tiny_tsgan()
    cfg = dict(seed=3, nodule_texture=False, **GATE)
    lib = Synthesizer(model, GenerationConfig(lungs="library", **cfg))
    tex = Synthesizer(model, GenerationConfig(lungs="texture", **cfg))
    m = torch.from_numpy(np.stack([scene_mask([(18, 30, 3)]), scene_mask([(18, 20, 2)])]))
    a, t = lib._translate(m, [(0, 0), (1, 0)]), tex._translate(m, [(0, 0), (1, 0)])
    lung = (m == C.LEFT_LUNG) | (m == C.RIGHT_LUNG)
    assert torch.equal(a[~lung], t[~lung]) and not torch.equal(a[lung], t[lung])
    from nodulesynth.models.lung_texture import lung_alpha

    deep = lung_alpha(m) == 1  # where the field replaces the translator's lungs entirely
    assert deep.any() and a[deep].median() < -700  # real parenchyma
    # a sample's lungs depend on (seed, index, attempt), not on the batch it was drawn in
    assert torch.equal(lib._translate(m[1:], [(1, 0)])[0], a[1])
    rec = lib.generate([0]).provenance[0]["lungs"]
    assert rec["mode"] == "library" and rec["library"] == LungLibrary().revision and len(rec["patients"]) == POOL_PATIENTS
    # the tiny weights hold no lung texture model: "texture" keeps the translator's lungs, and says so
    assert tex.generate([0]).provenance[0]["lungs"] == "translator" and not tex.textured
    off = Synthesizer(model, GenerationConfig(lungs="translator", **cfg))
    assert off.generate([0]).provenance[0]["lungs"] == "translator" and not off.textured
    with pytest.raises(NoduleSynthError, match="lungs: must be one of library, texture, translator"):
        GenerationConfig(lungs="glass").validate()
