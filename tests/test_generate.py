"""`nodulesynth generate` end to end on CPU with a tiny TSGAN saved by the test (no shipped weights yet)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from scipy import ndimage as ndi
from scenes import scene_mask

from nodulesynth.cli import main


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from nodulesynth.models.pix2pix import TranslatorConfig
    from nodulesynth.models.stylegan import MaskGANConfig
    from nodulesynth.models.tsgan import TSGAN

    torch.manual_seed(4)  # ≈ a third of this random model's masks pass the default quality gate
    model = TSGAN.from_configs(
        MaskGANConfig(resolution=16, z_dim=32, w_dim=32, mapping_layers=2, fmap_base=256, fmap_max=32),
        TranslatorConfig(ngf=8, ndf=8, num_downs=6, dwmh_depth=3, dwmh_window=4, dwmh_heads=2), image_size=64)
    return str(model.save_pretrained(tmp_path_factory.mktemp("w") / "tiny"))


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, weights):
    out = tmp_path_factory.mktemp("runs") / "coco"
    rc = main(["generate", "--n", "6", "--out", str(out), "--weights", weights, "--device", "cpu",
               "--batch-size", "4", "--seed", "3", "--preview"])
    assert rc == 0
    return out


def test_generate_coco_with_preview(first_run, weights, capsys):
    out = first_run
    data = json.loads((out / "annotations.json").read_text())
    assert [im["file_name"] for im in data["images"]] == [f"synth_{k:06d}.png" for k in range(6)]
    assert all((out / "images" / im["file_name"]).is_file() for im in data["images"])
    assert data["info"]["seed"] == 3 and data["info"]["weights"].startswith("local:")
    assert "accepted" in data["info"]["quality_gate"]
    assert len(data["annotations"]) >= 6  # the gate guarantees ≥ 1 nodule per synthetic slice
    assert Image.open(out / "preview.png").size[0] > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [m["index"] for m in manifest["items"]] == list(range(6))
    assert not list(out.parent.glob(".coco.tmp-*"))


def test_both_formats_same_samples_other_batch_size(first_run, tmp_path, weights, capsys):
    out = tmp_path / "both"
    assert main(["generate", "--n", "3", "--out", str(out), "--weights", weights, "--device", "cpu",
                 "--batch-size", "3", "--seed", "3", "--format", "both", "--val-fraction", "0.34"]) == 0
    cap = capsys.readouterr()
    assert "weights: local:" in cap.out and "no validation split" in cap.err
    for k in range(3):  # identical bytes whatever the batch size
        assert (out / "coco" / "images" / f"synth_{k:06d}.png").read_bytes() == \
            (first_run / "images" / f"synth_{k:06d}.png").read_bytes()
    # no real data → no validation split (synthetic slices never validate), said in data.yaml and on stderr
    assert not list((out / "yolo" / "images" / "val").iterdir())
    assert len(list((out / "yolo" / "labels" / "train").glob("*.txt"))) == 3
    assert "NO VALIDATION SPLIT" in (out / "yolo" / "data.yaml").read_text()
    assert yaml.safe_load((out / "yolo" / "data.yaml").read_text())["path"] == (out / "yolo").resolve().as_posix()


def test_mixing_real_and_mask_in(tmp_path, weights):
    from nodulesynth.data.slices import SliceRecord, write_slice_dataset
    from nodulesynth.masks.boxes import mask_to_boxes

    masks = np.stack([scene_mask([(18, 30, 3)])] * 5)
    recs = [SliceRecord(series_uid="1.2.3", z_mm=float(k), slice_index=k, spacing_mm=(6.4, 6.4),
                        boxes=mask_to_boxes(masks[k]), source="phantom", has_nodule=True) for k in range(5)]
    real = write_slice_dataset(tmp_path / "real", np.full(masks.shape, -800, np.int16), masks, recs)
    out = tmp_path / "mixed"
    assert main(["generate", "--real", str(real), "--ratio", "0.4", "--out", str(out), "--weights", weights,
                 "--device", "cpu"]) == 0
    data = json.loads((out / "annotations.json").read_text())
    assert [im["source"] for im in data["images"]] == ["real"] * 5 + ["synthetic"] * 2  # round(0.4 · 5) = 2

    mdir = tmp_path / "masks"
    mdir.mkdir()
    Image.fromarray(scene_mask([(18, 30, 3), (46, 30, 2)])).save(mdir / "two.png")
    np.save(mdir / "none.npy", scene_mask([]))
    out = tmp_path / "maskin"
    assert main(["generate", "--masks", str(mdir), "--out", str(out), "--weights", weights, "--device", "cpu"]) == 0
    data = json.loads((out / "annotations.json").read_text())
    assert [im["file_name"] for im in data["images"]] == ["mask_none.png", "mask_two.png"]
    assert len(data["annotations"]) == 2


def test_mask_in_slices_do_not_depend_on_the_batch_size(tmp_path, weights):
    """--batch-size is speed only: a mask-in slice is seeded by its name, not by its place in a call
    (before, the 3rd mask of a run at --batch-size 2 drew the 1st one's background and body)."""
    mdir = tmp_path / "masks"
    mdir.mkdir()
    for k in range(5):
        np.save(mdir / f"m{k}.npy", scene_mask([(18 + k, 30, 2)]))
    outs = {}
    for bs in (2, 5):
        outs[bs] = tmp_path / f"b{bs}"
        assert main(["generate", "--masks", str(mdir), "--out", str(outs[bs]), "--weights", weights, "--device", "cpu",
                     "--batch-size", str(bs), "--image-format", "npy"]) == 0
    for k in range(5):
        assert np.array_equal(np.load(outs[2] / "images" / f"mask_m{k}.npy"), np.load(outs[5] / "images" / f"mask_m{k}.npy"))
    first = [np.load(outs[2] / "images" / f"mask_m{k}.npy") for k in (0, 2)]
    body = scene_mask([]) == 1
    assert not np.array_equal(first[0][body], first[1][body])  # each slice draws its own streams


def _real_set(tmp_path, spacing: float, splits: list[str]):
    from nodulesynth.data.slices import SliceRecord, write_slice_dataset
    from nodulesynth.masks.boxes import mask_to_boxes

    masks = np.stack([scene_mask([(18, 30, 2)] if k % 2 else []) for k in range(len(splits))])
    hu = np.where(masks == 1, 40, np.where(masks == 0, -1000, -850)).astype(np.int16)
    hu[masks == 5] = 30
    recs = [SliceRecord(series_uid=f"1.2.{k}", z_mm=float(k), slice_index=k, spacing_mm=(spacing, spacing),
                        boxes=mask_to_boxes(masks[k]), source="lidc", has_nodule=bool(k % 2), patient=f"P{k}",
                        split=splits[k]) for k in range(len(splits))]
    return write_slice_dataset(tmp_path / "real", hu, masks, recs), hu, masks


def test_real_slices_get_added_nodules_like_the_dataset(tmp_path, weights):
    """`generate --real --add-nodules`: each TRAIN slice gets LIDC nodules (its own kept; beyond the new
    nodules' rim every pixel is the scan's), validation slices stay as they were, and the files are
    the very slices SyntheticNoduleDataset(real=..., conditions={"add_nodules": True}) gives, at
    another batch size."""
    from scipy.ndimage import binary_dilation

    from nodulesynth import SyntheticNoduleDataset

    real, hu, masks = _real_set(tmp_path, 6.4, ["train", "train", "val", "train", "train", "train"])
    out = tmp_path / "o"
    assert main(["generate", "--real", str(real), "--n", "0", "--add-nodules", "--num-nodules", "1", "--out", str(out),
                 "--weights", weights, "--device", "cpu", "--image-format", "npy", "--batch-size", "4"]) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["n_real"] == 6 and man["n_real_nodules_added"] + man["n_real_no_room"] == 5
    assert man["n_real_nodules_added"] >= 3
    ds = SyntheticNoduleDataset(0, weights=weights, real=real, device="cpu", batch_size=2, real_split="all",
                                conditions={"add_nodules": True, "num_nodules": 1})
    for k, it in enumerate(man["items"]):
        img = np.load(out / it["files"]["coco"][0])
        own = masks[k] == 5
        if it["split"] == "val":
            assert np.array_equal(img, hu[k]) and "nodules" not in it["provenance"]
            continue
        prov = it["provenance"]
        assert prov["source"] == "real+lidc-nodules" and prov["real"] == f"real{k}" and prov["real_source"] == "lidc"
        assert prov["patient"] == f"P{k}" and prov["spacing_mm"] == [6.4, 6.4]
        if "no_room" in prov:
            assert np.array_equal(img, hu[k]) and prov["nodules"] == []
            continue
        assert len(prov["nodules"]) == 1 and len(it["boxes_xyxy_px"]) == 1 + int(own.any())
        raw = ds.raw(k)
        assert np.array_equal(img, raw["hu"]) and np.allclose(np.reshape(it["boxes_xyxy_px"], (-1, 4)), raw["boxes"])
        new = (raw["mask"] == 5) & ~own
        far = ~binary_dilation(new, iterations=3)
        assert new.any() and np.array_equal(img[far], hu[k][far]) and not np.array_equal(img[new], hu[k][new])


def test_inserted_copies_of_train_slices_without_a_nodule(tmp_path, weights):
    """`--synthetic inserted`: the real slices stay as they are, and the --n synthetic slices are copies of
    TRAIN slices without a nodule (never a validation patient's, never one with a nodule) with LIDC
    nodules inserted; the Dataset's synthetic="inserted" gives the same copies at another batch size.
    In DICOM they stay their patient's and say that the nodules are the model's."""
    import pydicom

    from nodulesynth import SyntheticNoduleDataset

    real, hu, masks = _real_set(tmp_path, 6.4, ["train", "train", "val", "train", "train", "train"])
    out = tmp_path / "o"
    assert main(["generate", "--real", str(real), "--synthetic", "inserted", "--n", "5", "--num-nodules", "1",
                 "--out", str(out), "--weights", weights, "--device", "cpu", "--image-format", "npy",
                 "--format", "coco,dicom", "--batch-size", "2"]) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert (man["n_real"], man["n_inserted"], man["n_synthetic"]) == (6, 5, 0)
    real_items = [it for it in man["items"] if it["source"] == "real"]
    for it in real_items:
        k = int(it["name"].split("_")[1])
        assert np.array_equal(np.load(out / it["files"]["coco"][0]), hu[k])
    ds = SyntheticNoduleDataset(5, weights=weights, real=real, device="cpu", batch_size=4, synthetic="inserted",
                                conditions={"num_nodules": 1})
    copies = [it for it in man["items"] if it["source"] == "inserted"]
    assert [it["name"] for it in copies] == [f"insert_{i:06d}" for i in range(5)]
    for i, it in enumerate(copies):
        p = it["provenance"]
        k = p["real_index"]
        assert k in (0, 4) and p["patient"] == f"P{k}" and p["source"] == "real+lidc-nodules" and len(p["nodules"]) == 1
        img = np.load(out / it["files"]["coco"][0])
        raw = ds.raw(ds.n_real + i)
        assert raw["source"] == "inserted" and np.array_equal(img, raw["hu"]) and raw["provenance"]["real_index"] == k
        new = raw["mask"] == 5
        assert new.any() and len(it["boxes_xyxy_px"]) >= 1
        np.testing.assert_array_equal(img[~ndi.binary_dilation(new, iterations=3)], hu[k][~ndi.binary_dilation(new, iterations=3)])
    ct = pydicom.dcmread(out / copies[0]["files"]["dicom"][0])
    assert str(ct.PatientName) == f"REAL^P{copies[0]['provenance']['real_index']}"
    assert "SYNTHETIC nodules" in ct.SeriesDescription and "SYNTHETIC nodules" in ct.DeidentificationMethod[0]
    if len(copies[0]["files"]["dicom"]) > 1:  # highdicom installed: the SEG says the nodules are the model's
        assert pydicom.dcmread(out / copies[0]["files"]["dicom"][1]).SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"


def test_inserted_needs_train_slices_without_a_nodule(tmp_path, weights, capsys):
    real, _, _ = _real_set(tmp_path, 6.4, ["val", "train", "val"])  # the nodule-free slices are validation's
    assert main(["generate", "--real", str(real), "--synthetic", "inserted", "--n", "2", "--out", str(tmp_path / "o"),
                 "--weights", weights, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "no TRAIN slice without a nodule" in err and len(err.splitlines()) == 1 and not (tmp_path / "o").exists()


def test_added_nodules_need_the_models_pixel_spacing(tmp_path, weights, capsys):
    real, _, _ = _real_set(tmp_path, 0.8, ["train", "train"])
    assert main(["generate", "--real", str(real), "--n", "0", "--add-nodules", "--out", str(tmp_path / "o"),
                 "--weights", weights, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "slice 0 has pixel spacing [0.8, 0.8] mm" in err and "--spacing 6.4" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_yolo_val_is_real_only_and_split_by_patient(tmp_path, weights):
    """Val holds whole real patients (SliceRecord.patient when present, else the series), never a
    synthetic slice; slices of one patient never straddle train and val."""
    from nodulesynth.data.slices import SliceRecord, write_slice_dataset
    from nodulesynth.masks.boxes import mask_to_boxes

    masks = np.stack([scene_mask([(18, 30, 3)])] * 8)
    has_patient = "patient" in SliceRecord.__dataclass_fields__  # older records lack the field
    recs = [SliceRecord(series_uid=f"1.2.{k % 4}", z_mm=float(k), slice_index=k, spacing_mm=(0.7, 0.75),
                        boxes=mask_to_boxes(masks[k]), source="lidc", has_nodule=True,
                        **({"patient": f"P{k % 2}"} if has_patient else {})) for k in range(8)]
    real = write_slice_dataset(tmp_path / "real", np.full(masks.shape, -800, np.int16), masks, recs)
    out = tmp_path / "y"
    assert main(["generate", "--real", str(real), "--n", "3", "--out", str(out), "--weights", weights,
                 "--device", "cpu", "--format", "yolo,monai", "--val-fraction", "0.5", "--seed", "1"]) == 0
    man = json.loads((out / "manifest.json").read_text())
    val = [m for m in man["items"] if m["split"] == "val"]
    assert val and all(m["source"] == "real" for m in val)
    owner = {m["name"]: m["provenance"].get("patient", m["provenance"]["series_uid"]) for m in man["items"]
             if m["source"] == "real"}
    val_p = {owner[m["name"]] for m in val}
    train_p = {owner[m["name"]] for m in man["items"] if m["source"] == "real" and m["split"] == "train"}
    assert val_p == set(man["validation"]["val_patients"]) and not val_p & train_p
    assert len(val_p | train_p) == (2 if has_patient else 4)
    assert sorted(p.stem for p in (out / "yolo" / "images" / "val").iterdir()) == sorted(m["name"] for m in val)
    dl = json.loads((out / "monai" / "datalist.json").read_text())
    assert [e["name"] for e in dl["validation"]] == [m["name"] for m in val]
    assert [m["pixel_spacing_mm"] for m in man["items"] if m["source"] == "real"] == [[0.7, 0.75]] * 8


def test_recorded_patient_split_is_used_and_test_patients_left_out(tmp_path, weights, capsys):
    """A real dataset that records its own patient split (prepare) keeps it: val patients validate,
    test patients' slices never enter the generated (training) dataset."""
    from nodulesynth.data.slices import SliceRecord, write_slice_dataset
    from nodulesynth.masks.boxes import mask_to_boxes

    if "split" not in SliceRecord.__dataclass_fields__:
        pytest.skip("SliceRecord records no split yet")
    masks = np.stack([scene_mask([(18, 30, 3)])] * 6)
    splits = ["train", "train", "val", "test", "train", "val"]
    recs = [SliceRecord(series_uid=f"1.2.{k}", z_mm=float(k), slice_index=k, spacing_mm=(0.8, 0.8),
                        boxes=mask_to_boxes(masks[k]), source="lidc", has_nodule=True, patient=f"P{k}",
                        split=splits[k]) for k in range(6)]
    real = write_slice_dataset(tmp_path / "real", np.full(masks.shape, -800, np.int16), masks, recs)
    out = tmp_path / "y"
    assert main(["generate", "--real", str(real), "--n", "0", "--out", str(out), "--weights", weights,
                 "--device", "cpu", "--format", "yolo"]) == 0
    assert "left out" in capsys.readouterr().err
    man = json.loads((out / "manifest.json").read_text())
    assert [(m["name"], m["split"]) for m in man["items"]] == [
        ("real_000000", "train"), ("real_000001", "train"), ("real_000002", "val"), ("real_000004", "train"),
        ("real_000005", "val")]
    assert man["validation"]["test_patients"] == ["P3"] and man["n_real"] == 5


def test_refuses_existing_out_unless_overwrite(tmp_path, weights, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["generate", "--n", "2", "--out", str(out), "--weights", weights, "--device", "cpu"]
    assert main(args) == 2
    assert "not empty" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    assert main(args + ["--overwrite"]) == 2  # a folder nodulesynth did not write is never replaced
    assert "not written by nodulesynth" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    (out / ".nodulesynth").write_text("{}")  # as every folder nodulesynth writes carries
    assert main(args + ["--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "annotations.json").is_file()


def test_interrupt_leaves_nothing_behind(tmp_path, weights, monkeypatch, capsys):
    from nodulesynth.export import writer

    real_add, calls = writer.DatasetWriter.add, []

    def add(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_add(self, *a, **k)

    monkeypatch.setattr(writer.DatasetWriter, "add", add)
    out = tmp_path / "new"
    assert main(["generate", "--n", "4", "--out", str(out), "--weights", weights, "--device", "cpu",
                 "--batch-size", "2"]) == 130
    assert not out.exists() and list(tmp_path.iterdir()) == []
    old = tmp_path / "old"  # an --overwrite that is interrupted keeps the previous dataset intact
    old.mkdir()
    (old / "a.txt").write_text("x")
    (old / ".nodulesynth").write_text("{}")
    calls.clear()
    assert main(["generate", "--n", "4", "--out", str(old), "--weights", weights, "--device", "cpu",
                 "--batch-size", "2", "--overwrite"]) == 130
    assert [p.name for p in tmp_path.iterdir()] == ["old"] and sorted(p.name for p in old.iterdir()) == [".nodulesynth", "a.txt"]


def test_placement_workers_change_no_file(tmp_path, weights):
    """--place-workers is a throughput knob: the manifest (config, items, provenance) and every image
    are the same with the nodules placed in process or on a worker."""
    runs = {}
    for w in (0, 1):
        out = tmp_path / f"w{w}"
        assert main(["generate", "--n", "4", "--out", str(out), "--weights", weights, "--device", "cpu",
                     "--batch-size", "2", "--seed", "5", "--place-workers", str(w)]) == 0
        runs[w] = out
    man = [json.loads((runs[w] / "manifest.json").read_text()) for w in (0, 1)]
    assert man[0]["config"] == man[1]["config"] and "place_workers" not in man[0]["config"]
    assert man[0]["items"] == man[1]["items"] and all(it["provenance"]["nodules"] for it in man[0]["items"])
    for f in sorted((runs[0] / "images").iterdir()):
        assert f.read_bytes() == (runs[1] / "images" / f.name).read_bytes()


def test_ctrl_c_in_a_terminal_is_one_line(tmp_path, weights):
    """A terminal's Ctrl-C reaches every process of its group, export and placement workers too: the
    run ends with status 130 and its one line, no worker traceback, and leaves nothing behind."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "o"
    p = subprocess.Popen(
        [sys.executable, "-m", "nodulesynth", "generate", "--n", "100000", "--out", str(out), "--weights", weights,
         "--device", "cpu", "--batch-size", "4", "--workers", "1", "--place-workers", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), env={**os.environ, "HF_HUB_OFFLINE": "1"})
    text, deadline = b"", time.time() + 120
    while not re.search(rb"\| *[1-9]\d*/100000 \[", text) and time.time() < deadline and p.poll() is None:
        text += p.stdout.read1(4096)  # until items are written: both kinds of worker are running
    os.killpg(p.pid, signal.SIGINT)
    try:
        text += p.communicate(timeout=60)[0]
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    text = text.decode(errors="replace")
    assert p.returncode == 130, text[-2000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-2000:]
    assert "interrupted; nothing half-written was left behind" in text
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra, message", [
    (["--n", "0"], "--n: must be"),
    (["--n", "-3"], "--n: must be"),
    (["--n", "2", "--device", "tpu"], "--device"),
    (["--n", "2", "--device", "cuda:7"], "--device"),
    (["--n", "2", "--weights", "/no/such/weights"], "--weights /no/such/weights"),
    (["--n", "2", "--out", "/proc/nodulesynth-out"], "--out"),
    (["--n", "2", "--ratio", "2"], "--ratio: needs --real"),
    (["--ratio", "-1", "--real", "."], "--ratio: must be > 0"),
    (["--n", "2", "--real", "/no/such/dir"], "--real"),
    (["--n", "2", "--format", "yolo", "--image-format", "png16"], "--image-format"),
    (["--n", "2", "--min-size-mm", "9", "--max-size-mm", "3"], "min-size-mm"),
    (["--n", "2", "--batch-size", "0"], "--batch-size"),
    (["--masks", "/no/such/masks"], "--masks"),
    (["--n", "2", "--format", "coco,nrrd"], "--format: unknown format 'nrrd'"),
    (["--n", "2", "--start-index", "-1"], "--start-index"),
    (["--n", "2", "--place-workers", "-1"], "--place-workers: must be ≥ 0"),
    (["--n", "2", "--start-index", "4", "--real", "."], "--start-index: shards synthetic samples only"),
    (["--n", "2", "--add-nodules"], "--add-nodules: needs --real DIR or --masks DIR"),
    (["--n", "2", "--synthetic", "inserted"], "--synthetic inserted: needs --real DIR"),
])
def test_bad_arguments_give_one_clear_line(tmp_path, weights, capsys, extra, message):
    args = ["generate", "--out", str(tmp_path / "o"), "--device", "cpu", "--weights", weights]
    args = args[:1] + [a for a in args[1:]] + extra  # later options win
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_bad_mask_files(tmp_path, weights, capsys):
    mdir = tmp_path / "m"
    mdir.mkdir()
    np.save(mdir / "bad.npy", np.full((64, 64), 9, np.uint8))
    assert main(["generate", "--masks", str(mdir), "--out", str(tmp_path / "o"), "--weights", weights, "--device", "cpu"]) == 2
    assert "bad.npy: label values must be in 0..5" in capsys.readouterr().err


def test_more_bad_arguments_fail_clearly(tmp_path, capsys):
    from nodulesynth.cli import main

    mdir = tmp_path / "m"
    mdir.mkdir()
    np.save(mdir / "a.npy", scene_mask([(18, 30, 3)]))
    Image.fromarray(scene_mask([(18, 30, 3)])).save(mdir / "a.png")
    for argv, needle in (
        (["generate", "--n", "1", "--out", str(tmp_path / "o1"), "--seed", "-1"], "--seed"),
        (["generate", "--masks", str(mdir), "--out", str(tmp_path / "o2")], "share the name"),
        (["generate", "--n", "1", "--out", str(tmp_path / "o3"), "--weights", "./no/such/run"], "no such folder"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err
        assert not (tmp_path / argv[argv.index("--out") + 1]).exists()


def test_cli_imports_only_the_chosen_subcommand():
    """`generate` must not load the readers of real CT (SimpleITK, pydicom): faster start-up, and a
    machine with the generation stack alone runs it. `--help` still lists every subcommand."""
    import subprocess
    import sys

    code = ("import sys\nfrom nodulesynth.cli import main\n"
            "for argv in (['generate', '--help'], ['--help']):\n"
            "    try: main(argv)\n    except SystemExit: pass\n"
            "print('LOADED', sorted(m for m in ('SimpleITK', 'pydicom', 'nodulesynth.data.prepare') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "LOADED []" in out.stdout, out.stdout[-300:]
    for name in ("generate", "merge", "prepare", "phantom", "train"):
        assert name in out.stdout
    with pytest.raises(SystemExit):  # a chosen subcommand still gets its full parser
        main(["prepare", "--help"])
