"""The procedural phantom: LUNA16 files that the real data layer reads back, nodules where the CSV
says, lung masks that agree with the threshold-based semantic mask, byte-exact determinism."""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from nodulesynth.data import phantom_cli
from nodulesynth.data.ct import load_ct
from nodulesynth.data.luna16 import discover_luna16, read_annotations, read_lung_seg
from nodulesynth.data.phantom import (
    ANNOTATION_HEADER,
    PhantomConfig,
    make_phantom,
    sample_diameters,
    series_uid,
    write_phantom_dataset,
)
from nodulesynth.errors import NoduleSynthError
from nodulesynth.masks.classes import MaskClass
from nodulesynth.masks.semantic import semantic_mask

# small phantoms: 128² (~3 mm pixels) × 32 slices of 2.5 mm; nodules ≥ 8 mm so they span pixels
SMALL = PhantomConfig(size=128, slices=32, thickness_choices_mm=(2.5,), diameter_range_mm=(8.0, 20.0),
                      nodules_min=1, nodules_max=3)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("ph") / "luna", 3, seed=7, cfg=SMALL, progress=False)


def test_layout_and_csv_header(root: Path):
    assert sorted(p.name for p in root.iterdir()) == [".nodulesynth", "annotations.csv", "phantom.json",
                                                       "seg-lungs-LUNA16", "subset0"]
    with open(root / "annotations.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert tuple(rows[0]) == ANNOTATION_HEADER
    uids = {p.stem for p in (root / "subset0").glob("*.mhd")}
    assert len(uids) == 3 and {p.stem for p in (root / "seg-lungs-LUNA16").glob("*.mhd")} == uids
    assert all((root / "subset0" / f"{u}.raw").is_file() for u in uids)
    assert {r[0] for r in rows[1:]} <= uids and len(rows) >= 4
    assert all(u.startswith("1.3.6.1.4.1.14519.5.2.1.6279.6001.") and len(u) <= 64 for u in uids)


def test_nodules_read_back_where_csv_says(root: Path):
    index = discover_luna16(root)
    ann = read_annotations(root / "annotations.csv")
    kinds = {uid: [n["type"] for n in s["nodules"]]
             for s in json.loads((root / "phantom.json").read_text())["scans"] for uid in [s["seriesuid"]]}
    assert len(index.scans) == 3 and index.n_nodules == sum(len(v) for v in ann.values())
    for scan in index.scans:
        ct = load_ct(scan.mhd)
        assert ct.hu.dtype == np.int16 and ct.hu.shape == (32, 128, 128)
        assert np.allclose(ct.direction, np.eye(3)) and ct.origin[0] < 0  # LUNA16-like: z negative
        assert ct.hu.min() == -1024  # air outside the body, clipped like LUNA16
        for nod, kind in zip(scan.nodules, kinds[scan.series_uid]):
            zyx = np.rint(ct.world_to_voxel(nod.center_xyz_mm)).astype(int)
            assert np.all((zyx >= 0) & (zyx < ct.hu.shape)), nod
            z, y, x = zyx
            centre = float(ct.hu[z, y, x])
            if kind == "ground-glass":  # hazy: about -600
                assert -800 < centre < -400, (kind, centre)
            elif kind == "part-solid":  # solid core inside a ground-glass halo
                assert centre > -700, (kind, centre)
            else:
                assert centre > -300, (kind, centre)
            # the nodule is inside a lung (or touching its wall) in the LUNA16 seg mask
            seg = read_lung_seg(scan.seg)
            r = max(1, int(nod.radius_mm / ct.spacing[1]))
            assert np.isin(seg[z, y - r:y + r + 1, x - r:x + r + 1], (3, 4)).any()


def test_seg_labels_follow_luna16_convention(root: Path):
    for scan in discover_luna16(root).scans:
        seg = read_lung_seg(scan.seg)
        assert set(np.unique(seg)) <= {0, 3, 4, 5} and {3, 4} <= set(np.unique(seg))
        xs = np.arange(seg.shape[2])
        left_x = (xs * (seg == 3).sum(axis=(0, 1))).sum() / (seg == 3).sum()
        right_x = (xs * (seg == 4).sum(axis=(0, 1))).sum() / (seg == 4).sum()
        assert left_x > right_x  # patient's left lung = larger x index = image right


def test_seg_lungs_agree_with_semantic_mask(root: Path):
    """A's threshold-based lungs (no lung_seg given) must match our ground truth per side."""
    scan = discover_luna16(root).scans[0]
    ct = load_ct(scan.mhd)
    seg = read_lung_seg(scan.seg)
    dice, px_mm2 = [], ct.spacing[1] * ct.spacing[2]
    for k in range(0, ct.hu.shape[0], 2):
        m = semantic_mask(ct.hu[k], (ct.spacing[1], ct.spacing[2]))
        for lv, cls in ((3, MaskClass.LEFT_LUNG), (4, MaskClass.RIGHT_LUNG)):
            a, b = seg[k] == lv, m == cls
            if a.sum() * px_mm2 >= 1000:  # lung section of at least 10 cm²
                dice.append(2 * (a & b).sum() / (a.sum() + b.sum()))
    assert len(dice) >= 10
    assert min(dice) > 0.9, dice


def test_same_seed_same_bytes(tmp_path: Path):
    cfg = PhantomConfig(size=64, slices=12, diameter_range_mm=(6.0, 12.0))
    a = write_phantom_dataset(tmp_path / "a", 2, seed=3, cfg=cfg, progress=False)
    b = write_phantom_dataset(tmp_path / "b", 2, seed=3, cfg=cfg, progress=False)
    c = write_phantom_dataset(tmp_path / "c", 2, seed=4, cfg=cfg, progress=False)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    raws = lambda r: sorted((p.read_bytes() for p in (r / "subset0").glob("*.raw")))  # noqa: E731
    assert raws(a) != raws(c)


def test_phantom_anatomy_hu_ranges():
    s = make_phantom(11, PhantomConfig(size=128, slices=24, thickness_choices_mm=(2.5,)))
    lungs = s.hu[np.isin(s.lung_seg, (3, 4))]
    assert -920 < np.median(lungs) < -800  # aerated lung
    assert (lungs > -500).mean() > 0.005  # vessels
    airway = s.hu[s.lung_seg == 5]
    assert np.median(airway) < -700 and np.percentile(airway, 25) < -900  # air lumen (edges blurred at 3 mm pixels)
    assert (s.hu > 400).sum() > 0.005 * s.hu.size  # bone
    assert 0.55 <= s.spacing[1] * 128 / 512 <= 0.95
    assert s.nodules and all(3.0 <= n.diameter_mm <= 30.0 for n in s.nodules)


def test_diameter_distribution_is_luna16_like():
    d = sample_diameters(np.random.default_rng(0), 20000, PhantomConfig())
    assert d.min() >= 3 and d.max() <= 30
    assert 5.5 < np.median(d) < 8.0 and 0.65 < (d < 10).mean() < 0.9 and (d > 20).mean() < 0.05


def test_bad_input_errors(tmp_path: Path):
    with pytest.raises(NoduleSynthError, match="--size"):
        PhantomConfig(size=8)
    with pytest.raises(NoduleSynthError, match="--scans"):
        write_phantom_dataset(tmp_path / "x", 0)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(NoduleSynthError, match="--overwrite"):
        write_phantom_dataset(tmp_path / "full", 1, cfg=PhantomConfig(size=64, slices=8), progress=False)
    assert series_uid(1, 0) != series_uid(1, 1) == series_uid(1, 1)


def test_cli_writes_dataset(tmp_path: Path, capsys):
    p = argparse.ArgumentParser()
    phantom_cli.add_arguments(p)
    out = tmp_path / "cli"
    assert phantom_cli.run(p.parse_args(["--scans", "1", "--out", str(out), "--size", "64", "--slices", "10"])) == 0
    assert len(list((out / "subset0").glob("*.mhd"))) == 1 and "wrote 1" in capsys.readouterr().out
    with pytest.raises(NoduleSynthError, match="--seed"):
        phantom_cli.run(p.parse_args(["--scans", "1", "--out", str(tmp_path / "y"), "--seed", "-1"]))


@pytest.mark.slow
def test_prepare_on_phantom_counts_every_nodule(root: Path, tmp_path: Path):
    from nodulesynth.data.prepare import PrepareConfig, prepare
    from nodulesynth.data.slices import SliceDataset

    n_rows = sum(len(v) for v in read_annotations(root / "annotations.csv").values())
    out = prepare(PrepareConfig(out=tmp_path / "slices", luna16=root, size=128, spacing_mm=3.0, negatives=0.2))
    ds = SliceDataset(out)
    assert ds.meta["n_nodules"] == n_rows
    pos = [r for r in ds.records if r.has_nodule]
    assert len(pos) >= n_rows and all(r.source == "luna16" for r in ds.records)
    assert {r.series_uid for r in pos} == set(read_annotations(root / "annotations.csv"))
    assert all(len(r.boxes) >= 1 for r in pos)
