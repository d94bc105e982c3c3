"""benchmarks/device_pack.py: what a GPU session carries must come back bit-identical, and a
truncated or altered copy must fail loudly rather than train on garbage."""
from __future__ import annotations

import lzma
import sys
from pathlib import Path

import numpy as np
import pytest
from test_train import synth_slices

from nodulesynth.data.slices import SliceDataset, write_slice_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import device_pack  # noqa: E402


@pytest.fixture
def prepared(tmp_path):
    import dataclasses

    for k, name in enumerate(device_pack.SETS):
        images, masks, records = synth_slices(4, 32, seed=k)
        records = [dataclasses.replace(r, split="test" if j == 1 else "train", patient=f"{name}{j}")
                   for j, r in enumerate(records)]
        write_slice_dataset(tmp_path / "prepared" / name, images, masks, records)
    return tmp_path / "prepared"


def test_pack_unpack_round_trip_and_refuses_altered_copies(prepared, tmp_path):
    m = device_pack.pack(prepared, tmp_path / "pack")
    assert set(m["sets"]) == set(device_pack.SETS) and m["bytes"] > 0
    device_pack.unpack(tmp_path / "pack", tmp_path / "there")
    for name in device_pack.SETS:
        a, b = SliceDataset(prepared / name), SliceDataset(tmp_path / "there" / name)
        train = [0, 2, 3]  # what the trainers read; the held-out patient's slice stays here
        assert [r.split for r in b.records] == ["train"] * 3
        assert np.array_equal(np.asarray(a.images)[train], np.asarray(b.images))
        assert np.array_equal(np.asarray(a.masks)[train], np.asarray(b.masks))
        assert [a.records[j].series_uid for j in train] == [r.series_uid for r in b.records]
    victim = tmp_path / "pack" / "tcga" / "images.npy.xz"
    with lzma.open(victim, "rb") as fh:
        arr = np.load(fh)
    arr[0, 0, 0] += 1
    with lzma.open(victim, "wb") as fh:
        np.save(fh, arr)
    with pytest.raises(SystemExit, match="does not match MANIFEST"):
        device_pack.unpack(tmp_path / "pack", tmp_path / "again")


def test_pack_names_a_missing_set(tmp_path):
    with pytest.raises(SystemExit, match="index.json missing"):
        device_pack.pack(tmp_path / "nothing", tmp_path / "pack")


def test_pack_carries_only_train_crops_evenly_spaced(prepared, tmp_path):
    import dataclasses

    images, masks, records = synth_slices(12, 32, seed=9)
    records = [dataclasses.replace(r, split="train" if k % 3 else "test", patient=f"p{k}") for k, r in enumerate(records)]
    write_slice_dataset(prepared / device_pack.CROP_SET, images, masks, records)
    m = device_pack.pack(prepared, tmp_path / "pack", max_crops=4)
    assert m["crops_subset"]["n"] == 4 and device_pack.CROP_SET in m["sets"]
    assert not (tmp_path / "pack" / ".train").exists()
    device_pack.unpack(tmp_path / "pack", tmp_path / "there")
    got = SliceDataset(tmp_path / "there" / device_pack.CROP_SET)
    assert [r.split for r in got.records] == ["train"] * 4  # never a held-out patient's crop
    train = [k for k in range(12) if k % 3]
    picked = [int(r.patient[1:]) for r in got.records]
    assert picked[0] == train[0] and picked[-1] == train[-1]  # spread over the whole index
    for r, k in zip(got.records, picked):
        assert np.array_equal(np.asarray(got.images[got.records.index(r)]), images[k])
    assert device_pack.pack(prepared, tmp_path / "none", max_crops=0).get("crops_subset") is None


def test_pack_sizes_the_crops_to_the_budget_and_keeps_foreign_folders(prepared, tmp_path):
    images, masks, records = synth_slices(12, 32, seed=3)
    write_slice_dataset(prepared / device_pack.CROP_SET, images, masks, records)
    slices = device_pack.pack(prepared, tmp_path / "pack", max_crops=0)["bytes"]
    m = device_pack.pack(prepared, tmp_path / "pack", max_crops=None, budget=slices + 3 * device_pack.CROP_BYTES + 10)
    assert m["crops_subset"]["n"] == 3  # what the budget leaves, at the estimated bytes a crop
    assert "crops_subset" not in device_pack.pack(prepared, tmp_path / "pack", max_crops=None, budget=slices)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(SystemExit, match="not a device pack"):
        device_pack.pack(prepared, mine)
    assert (mine / "notes.txt").read_text() == "keep"
