"""prepare(): a LUNA16-format folder written here is discovered, indexed and prepared; resume; LIDC."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from conftest import NODULE_XYZ, UID_FLIPPED, UID_PLAIN
from nodulesynth.data import prepare as prep
from nodulesynth.data.prepare import PrepareConfig, add_arguments, prepare, resample_slice, run
from nodulesynth.data.slices import SliceDataset
from nodulesynth.errors import NoduleSynthError
from nodulesynth.masks.classes import MaskClass

# the synthetic scans have 2 mm pixels; keep them (size 128) so expected positions stay simple
NOD_COL, NOD_ROW = (NODULE_XYZ[0] + 127) / 2, (NODULE_XYZ[1] + 127) / 2


def test_prepare_luna16(luna16_root, tmp_path):
    out = prepare(PrepareConfig(out=tmp_path / "ds", luna16=luna16_root, size=128, spacing_mm=2.0, negatives=1.0, preview=True))
    ds = SliceDataset(out)
    assert (out / "preview.png").stat().st_size > 1000
    assert not (tmp_path / ".ds.shards").exists()  # consolidated, shards cleaned up
    assert ds.images.shape[1:] == (128, 128) and ds.images.dtype == np.int16 and ds.masks.dtype == np.uint8
    assert ds.meta["scans"]["scans_skipped_no_nodules"] == 1 and ds.meta["n_nodules"] == 2
    pos = [r for r in ds.records if r.has_nodule]
    # sphere r = 6 mm, slices 2.5 mm apart: 5 slices per scan have a cross-section ≥ 1 mm radius
    assert sorted({r.series_uid for r in pos}) == [UID_PLAIN, UID_FLIPPED] and len(pos) == 10
    assert len(ds) > len(pos)  # nodule-free slices were added
    for i, r in enumerate(ds.records):
        item = ds[i]
        m = item["mask"]
        assert r.spacing_mm == (2.0, 2.0) and r.source == "luna16" and r.scan_path.endswith(".mhd")
        if r.has_nodule:
            assert abs(r.z_mm - NODULE_XYZ[2]) <= 6.0
            (box,) = r.boxes
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            assert abs(cx - NOD_COL) <= 1.5 and abs(cy - NOD_ROW) <= 1.5  # same place in both orientations
            assert item["image_hu"][int(cy), int(cx)] > -300
        else:
            assert abs(r.z_mm - NODULE_XYZ[2]) >= 6.0 + 5.0 and len(r.boxes) == 0
        # patient-left lung on the image right, whatever the stored orientation
        assert np.nonzero(m == MaskClass.LEFT_LUNG)[1].mean() > 64 > np.nonzero(m == MaskClass.RIGHT_LUNG)[1].mean()
        assert (m == MaskClass.TRACHEA).any()
    # the flipped scan (no seg file → masks from HU) and the plain one (seg file) agree
    a = next(i for i, r in enumerate(ds.records) if r.series_uid == UID_PLAIN and r.z_mm == NODULE_XYZ[2])
    b = next(i for i, r in enumerate(ds.records) if r.series_uid == UID_FLIPPED and r.z_mm == NODULE_XYZ[2])
    np.testing.assert_array_equal(ds[a]["image_hu"], ds[b]["image_hu"])
    assert (ds[a]["mask"] == ds[b]["mask"]).mean() > 0.97
    # an existing dataset is not overwritten by accident
    with pytest.raises(NoduleSynthError, match="--overwrite"):
        prepare(PrepareConfig(out=out, luna16=luna16_root, size=128, spacing_mm=2.0))


def test_prepare_resumes_from_shards(luna16_root, tmp_path, monkeypatch, interrupt_second_job):
    cfg = PrepareConfig(out=tmp_path / "ds", luna16=luna16_root, size=64, spacing_mm=4.0, negatives=0.0)
    real, calls = interrupt_second_job(prep, "process_scan")
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg)
    assert not cfg.out.exists() and len(list((tmp_path / ".ds.shards").glob("*.json"))) == 2  # settings + 1 scan
    calls.clear()
    monkeypatch.setattr(prep, "process_scan", lambda job, c: (calls.append(job.key), real(job, c))[1])
    out = prepare(cfg)
    assert len(calls) == 1  # only the unfinished scan was processed again
    assert len(SliceDataset(out)) == 10


def test_resample_geometry():
    hu = np.full((100, 100), -1000, np.int16)
    hu[40:60, 20:30] = 50
    mask = (hu > 0).astype(np.uint8) * MaskClass.NODULE
    img, m = resample_slice(hu, mask, (0.5, 0.5), (49.5, 49.5), 64, 1.0)  # half resolution, padded
    ys, xs = np.nonzero(m)
    assert ys.min() == 32 - 25 + 20 and xs.min() == 32 - 25 + 10 and len(ys) == 10 * 5
    assert img[0, 0] == -1024 and img[30, 20] == 50


def test_cli_args_and_errors(tmp_path):
    p = argparse.ArgumentParser()
    add_arguments(p)
    with pytest.raises(NoduleSynthError, match="--size"):
        run(p.parse_args(["--luna16", str(tmp_path), "--out", str(tmp_path / "o"), "--size", "3"]))
    src = tmp_path / "src"  # --out must lie outside the input
    src.mkdir()
    with pytest.raises(NoduleSynthError, match="annotations.csv"):
        run(p.parse_args(["--luna16", str(src), "--out", str(tmp_path / "o")]))
    with pytest.raises(NoduleSynthError, match="no DICOM"):
        run(p.parse_args(["--lidc", str(src), "--out", str(tmp_path / "o")]))


def test_prepare_real_lidc(lidc_sample, tmp_path, capsys):
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert run(p.parse_args(["--lidc", str(lidc_sample), "--out", str(tmp_path / "lidc"), "--size", "256", "--spacing", "1.6"])) == 0
    assert "prepared" in capsys.readouterr().out
    ds = SliceDataset(tmp_path / "lidc")
    meta = json.loads((tmp_path / "lidc" / "index.json").read_text())["meta"]
    assert meta["source"] == "lidc" and meta["n_nodules"] == 2 and meta["scans"]["scans_with_xml"] == 2
    pos = [r for r in ds.records if r.has_nodule]
    assert len(pos) >= 12 and all(len(r.boxes) == 1 for r in pos)
    for i, r in enumerate(ds.records):
        if r.has_nodule:
            x0, y0, x1, y1 = r.boxes[0]
            assert 128 < (x0 + x1) / 2 < 200  # both nodules are in the patient's left (image right) lung
            assert 2 <= x1 - x0 <= 30  # ≤ ~4.8 cm at 1.6 mm pixels


def test_subset_and_series_split(tmp_path):
    """Slices picked (and repeated) from a dataset are written with their records; a series split
    never puts one patient on both sides."""
    from nodulesynth.data.slices import SliceDataset, SliceRecord, split_by_series, write_slice_dataset, write_slice_subset

    rng = np.random.default_rng(0)
    recs = [
        SliceRecord(f"uid{i // 3}", float(i), i, (0.8, 0.8), np.zeros((0, 4), np.float32), "phantom", False)
        for i in range(9)
    ]
    imgs = rng.integers(-1000, 400, (9, 16, 16)).astype(np.int16)
    masks = rng.integers(0, 6, (9, 16, 16)).astype(np.uint8)
    ds = SliceDataset(write_slice_dataset(tmp_path / "a", imgs, masks, recs))
    train, held = split_by_series(ds, holdout_series=1, seed=0)
    assert sorted(train + held) == list(range(9)) and len(held) == 3
    assert not {ds.records[i].series_uid for i in train} & {ds.records[i].series_uid for i in held}
    sub = SliceDataset(write_slice_subset(tmp_path / "b", [(ds, [held[0], held[0]]), (ds, train[:2])]))
    assert len(sub) == 4
    assert np.array_equal(sub.images[1], imgs[held[0]]) and np.array_equal(sub.masks[3], masks[train[1]])
    assert sub.records[2].series_uid == ds.records[train[0]].series_uid


def test_luna16_seg_labels_taken_by_position(luna16_root, tmp_path, caplog):
    """A seg-lungs file whose 3/4 values are the other way round still gives the patient's left lung
    on the image right (the sides come from the anatomy, with a warning), the same masks as stored."""
    import shutil

    from conftest import write_mhd
    from nodulesynth.data.luna16 import LUNA16_SEG_LEFT, LUNA16_SEG_RIGHT, read_lung_seg

    root = tmp_path / "swapped"
    shutil.copytree(luna16_root, root)
    seg_path = root / "seg-lungs-LUNA16" / f"{UID_PLAIN}.mhd"
    seg = read_lung_seg(seg_path)
    swapped = np.where(seg == LUNA16_SEG_LEFT, LUNA16_SEG_RIGHT, np.where(seg == LUNA16_SEG_RIGHT, LUNA16_SEG_LEFT, seg))
    seg_path.unlink(), seg_path.with_suffix(".raw").unlink(missing_ok=True)
    write_mhd(seg_path, swapped.astype(np.uint8))
    kw = dict(size=128, spacing_mm=2.0, negatives=0.0)
    a = SliceDataset(prepare(PrepareConfig(out=tmp_path / "a", luna16=luna16_root, **kw)))
    with caplog.at_level("WARNING"):
        b = SliceDataset(prepare(PrepareConfig(out=tmp_path / "b", luna16=root, **kw)))
    assert "taking the sides by position" in caplog.text
    for i, r in enumerate(b.records):
        if r.series_uid == UID_PLAIN:
            np.testing.assert_array_equal(b[i]["mask"], a[i]["mask"])
            m = b[i]["mask"]
            assert np.nonzero(m == MaskClass.LEFT_LUNG)[1].mean() > 64 > np.nonzero(m == MaskClass.RIGHT_LUNG)[1].mean()
