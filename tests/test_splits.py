"""Patient-level splits: deterministic, exact counts, disjoint, stable; old datasets still load."""
from __future__ import annotations

import json

import numpy as np
import pytest

from nodulesynth.data.slices import SliceDataset, SliceRecord, write_slice_dataset
from nodulesynth.data.splits import (assign_patients, assign_splits, check_disjoint, parse_fractions, split_counts,
                                     split_indices)
from nodulesynth.errors import NoduleSynthError


def _records(patients_slices: dict[str, int]) -> list[SliceRecord]:
    return [SliceRecord(f"uid-{p}", float(k), k, (1.0, 1.0), np.zeros((0, 4), np.float32), "test", False, patient=p)
            for p, n in patients_slices.items() for k in range(n)]


def test_counts_and_determinism():
    pats = [f"P{i:03d}" for i in range(50)]
    a = assign_patients(pats, (0.8, 0.1, 0.1), seed=0)
    assert [sum(v == s for v in a.values()) for s in ("train", "val", "test")] == [40, 5, 5]
    assert a == assign_patients(list(reversed(pats)), (0.8, 0.1, 0.1), seed=0)  # order of input is irrelevant
    assert a != assign_patients(pats, (0.8, 0.1, 0.1), seed=1)
    assert split_counts(7, (0.8, 0.1, 0.1)) == [5, 1, 1] and sum(split_counts(3, (1 / 3,) * 3)) == 3


def test_stable_when_patients_are_added():
    """Ranks come from a per-patient hash: adding patients never moves an old one from test to train
    unless the cut itself moves (here: 100 → 101 patients keeps the same cut counts for test)."""
    old = assign_patients([f"P{i}" for i in range(100)], (0.5, 0.0, 0.5), seed=7)
    new = assign_patients([f"P{i}" for i in range(100)] + ["NEW"], (0.5, 0.0, 0.5), seed=7)
    moved = [p for p in old if old[p] != new[p]]
    assert len(moved) <= 1


def test_records_disjoint_by_patient():
    recs = _records({"A": 5, "B": 1, "C": 3, "D": 2})
    summary = assign_splits(recs, (0.5, 0.25, 0.25), seed=0)
    check_disjoint(recs)
    assert summary["patients"] == {"train": 2, "val": 1, "test": 1} and sum(summary["slices"].values()) == 11
    recs[0].split = "test" if recs[1].split != "test" else "val"
    with pytest.raises(NoduleSynthError, match="patient A"):
        check_disjoint(recs)


def test_parse_fractions():
    assert parse_fractions("0.8,0.1,0.1") == (0.8, 0.1, 0.1)
    for bad in ("0.8,0.1", "0.5,0.5,0.5", "a,b,c", "1.2,-0.1,-0.1"):
        with pytest.raises(NoduleSynthError, match="--split-fractions"):
            parse_fractions(bad)


def test_split_indices_and_old_index(tmp_path):
    recs = _records({"A": 3, "B": 2, "C": 4})
    assign_splits(recs, (0.34, 0.33, 0.33), seed=0)
    imgs = np.zeros((9, 8, 8), np.int16)
    write_slice_dataset(tmp_path / "new", imgs, imgs.astype(np.uint8), recs, {"format": "x"})
    ds = SliceDataset(tmp_path / "new")
    assert ds.meta["n_patients"] == 3
    train, val, test = (split_indices(ds, s) for s in ("train", "val", "test"))
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(9))
    assert {ds.records[i].patient for i in train}.isdisjoint({ds.records[i].patient for i in test})
    assert len(split_indices(ds, None)) == 9 and len(split_indices(ds, ["val", "test"])) == len(val) + len(test)
    with pytest.raises(NoduleSynthError, match="unknown"):
        split_indices(ds, "holdout")
    # an index.json written before patients/splits existed: loads, splits by series on the fly
    index = json.loads((tmp_path / "new" / "index.json").read_text())
    for r in index["records"]:
        for k in ("patient", "split", "labelled"):
            r.pop(k)
    (tmp_path / "new" / "index.json").write_text(json.dumps(index))
    old = SliceDataset(tmp_path / "new")
    assert all(r.patient == "" and r.split == "" and r.labelled for r in old.records)
    parts = [split_indices(old, s) for s in ("train", "val", "test")]
    assert sum(len(p) for p in parts) == 9
    series = [{old.records[i].series_uid for i in p} for p in parts]
    assert not (series[0] & series[1]) and not (series[0] & series[2]) and not (series[1] & series[2])


def test_lidc_sample_records_patients(lidc_sample, tmp_path):
    from nodulesynth.data.prepare import PrepareConfig, prepare

    out = prepare(PrepareConfig(out=tmp_path / "ds", lidc=lidc_sample, size=128, spacing_mm=3.0, negatives=0.0,
                                split_fractions=(0.5, 0.0, 0.5)))
    ds = SliceDataset(out)
    assert {r.patient for r in ds.records} == {"LIDC-IDRI-0001", "LIDC-IDRI-0002"}
    assert ds.meta["split"]["patients"] == {"train": 1, "val": 0, "test": 1}
    check_disjoint(ds.records)


def test_real_mixing_uses_the_train_split(tmp_path):
    """SyntheticNoduleDataset(real=...) serves only the real TRAIN patients unless told otherwise."""
    from nodulesynth.synth.dataset import SyntheticNoduleDataset

    recs = _records({"A": 3, "B": 2, "C": 4, "D": 1})
    assign_splits(recs, (0.5, 0.25, 0.25), seed=0)
    imgs = np.full((10, 8, 8), -1000, np.int16)
    write_slice_dataset(tmp_path / "real", imgs, np.zeros((10, 8, 8), np.uint8), recs, {"format": "x"})
    train = {r.patient for r in recs if r.split == "train"}
    ds = SyntheticNoduleDataset(n=0, real=tmp_path / "real", device="cpu")
    assert len(ds) == sum(r.split == "train" for r in recs)
    assert {recs[int(i)].patient for i in ds.real_index} == train
    assert ds.raw(0)["source"] == "real" and ds.raw(0)["hu"].shape == (8, 8)
    assert len(SyntheticNoduleDataset(n=0, real=tmp_path / "real", device="cpu", real_split=None)) == 10
