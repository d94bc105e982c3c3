"""Nodules inserted into real lung crops (benchmarks/insert_crops.py) and the paired windows the detection
benchmark cuts from them: only the new nodule's pixels change, the crop's own nodule is never in a
window, and the background arm is the same windows without the nodule."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nodulesynth.data.slices import SliceDataset, SliceRecord, write_slice_dataset
from nodulesynth.detect.windows import WindowConfig, paired_windows
from nodulesynth.masks.classes import MaskClass

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _crops_set(tmp_path, patients=(7, 8, 9), per=2, split="train") -> Path:
    """A prepared crops set (``prepare --lidc-crops``' format): 128² crops of a right lung with a small
    nodule at the centre, lung noise so a change shows, TRAIN patients 7–9 (test: 1)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:128, :128]
    n = len(patients) * per + 1
    m = np.full((n, 128, 128), MaskClass.RIGHT_LUNG, np.uint8)
    m[:, :, :12] = MaskClass.BODY  # chest wall on the left
    centre = (yy - 64) ** 2 + (xx - 64) ** 2 <= 16
    m[:, centre] = MaskClass.NODULE
    hu = np.where(m == MaskClass.BODY, 40, -850 + rng.normal(0, 30, (n, 128, 128))).astype(np.int16)
    hu[:, centre] = 30
    recs = [SliceRecord(f"s{k}", 0.0, 0, (0.7, 0.7), np.array([[60, 60, 69, 69]], np.float32), "lidc-crops", True,
                        patient=f"LIDC-IDRI-{p:04d}", split=split, n_nodules=1)
            for k, p in enumerate(p for p in patients for _ in range(per))]
    recs.append(SliceRecord("t", 0.0, 0, (0.7, 0.7), np.array([[60, 60, 69, 69]], np.float32), "lidc-crops", True,
                            patient="LIDC-IDRI-0001", split="test", n_nodules=1))
    return write_slice_dataset(tmp_path / "crops", hu, m, recs, meta={"source": "lidc-crops", "native_spacing": True})


def test_paired_windows_differ_only_by_the_inserted_nodule():
    bg = np.full((3, 96, 96), -850, np.float32)
    own = np.zeros((3, 96, 96), bool)
    own[:, 44:52, 44:52] = True  # the crop's own nodule, at the centre
    bg[own] = 30
    new = np.zeros_like(own)
    new[0, 10:16, 10:16] = True  # room for a window clear of the own nodule
    new[1, 40:43, 53:56] = True  # right beside it: no window without the own nodule
    ins = bg.copy()
    ins[new] = 60
    w_ins, w_bg = paired_windows(ins, bg, new, own, np.array([5, 6, 7]), WindowConfig(size=32), seed=0)
    assert len(w_ins) == len(w_bg) and w_ins.n_positive == 1 and w_bg.n_positive == 0
    assert w_ins.group.tolist() == w_bg.group.tolist() and set(w_ins.group.tolist()) <= {5, 6, 7}
    for i in range(len(w_ins)):
        assert w_ins.images[i].max() < 0 or len(w_ins.boxes[i])  # the own nodule (30 HU) is in no window
        assert w_bg.images[i].max() < 0
        d = w_ins.images[i] != w_bg.images[i]
        if len(w_ins.boxes[i]):
            x0, y0, x1, y1 = w_ins.boxes[i][0].astype(int)
            assert d.sum() == 36 and d[y0:y1, x0:x1].all()  # the pair differs by the nodule, labelled exactly
        else:
            assert not d.any()


def test_nodules_go_into_the_crop_and_nothing_else_changes(tmp_path):
    import insert_crops as I

    bg = I.load_crop_backgrounds(SliceDataset(_crops_set(tmp_path)))
    assert len(bg["index"]) == 6 and set(bg["patient"]) == {"LIDC-IDRI-0007", "LIDC-IDRI-0008", "LIDC-IDRI-0009"}
    order = I.crop_order(bg, seed=0)
    assert len({bg["patient"][k] for k in order[:3]}) == 3  # one crop per patient before any second
    arr, meta = I.insert_into_crops(str(ROOT / "pretrained"), bg, 3, 0, tmp_path / "cache", "cpu")
    assert meta["background_patients"] == 3 and arr["inserted"].shape == (3, 128, 128)
    for k in range(3):
        changed = arr["inserted"][k] != arr["background"][k]
        assert arr["new"][k].sum() >= 9 and not (arr["new"][k] & arr["own"][k]).any()
        assert changed[arr["new"][k]].mean() > 0.9
        from scipy import ndimage as ndi

        far = ~ndi.binary_dilation(arr["new"][k], iterations=6)
        assert not changed[far].any()  # beyond the nodule's rim every pixel is the scan's
    again, _ = I.insert_into_crops(str(ROOT / "pretrained"), bg, 3, 0, tmp_path / "cache", "cpu")  # from the cache
    assert np.array_equal(again["new"], arr["new"])
    assert np.allclose(again["inserted"], arr["inserted"])


def _run(args, tmp_path):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "detection.py"), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "YOLO_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"})


@pytest.mark.slow
def test_detection_with_nodules_in_crops_and_their_backgrounds(tmp_path):
    pytest.importorskip("ultralytics")
    from test_detection_smoke import _crops

    images, masks, pats = _crops(n=24)  # patients 1..6
    npz = tmp_path / "crops.npz"
    np.savez(npz, images=images, reader_masks=masks, patient=pats)
    cs = str(_crops_set(tmp_path))
    out = tmp_path / "out"
    common = ["--protocol", "patches", "--smoke", "--crops", str(npz), "--n-synth", "0", "2", "--out", str(out),
              "--synth-source", "crops", "backgrounds", "--insert-into", cs]
    r = _run(common, tmp_path)  # background patients could land in a test fold: refused
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--test-unseen-by" in r.stderr and cs in r.stderr
    r = _run([*common, "--test-unseen-by", cs], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert doc["sources"] == ["crops", "backgrounds"]
    assert doc["crops"]["background_patients"] == 2 and doc["backgrounds"]["nodules_inserted"] is False
    assert doc["n_crops_windows"] == doc["n_backgrounds_windows"] >= 2
    assert {"real", "real+2 crops", "real+2 backgrounds"} <= {r["arm"] for r in doc["rows"]}
    r = _run(["--out", str(tmp_path / "o2"), "--crops", str(npz), "--synth-source", "backgrounds",
              "--insert-into", str(ROOT / "no-such")], tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1


def test_paired_crops_arm_is_read_against_its_backgrounds():
    import detection

    rows = [{"fold": f, "detector": "yolov8n", "arm": a, "n_synth": n, "epochs": 6, "test": "fold", "map50_95": v}
            for f in range(3) for a, n, v in (("real", 0, 0.1 + f / 100), ("real+200 crops", 200, 0.14),
                                              ("real+200 backgrounds", 200, 0.11))]
    against = {p["against"] for p in detection.paired(rows) if p["arm"] == "real+200 crops"}
    assert against == {"real", "real+200 backgrounds"}
