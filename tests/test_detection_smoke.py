"""Detection benchmark: window cutting (no centre prior, never a labelled half-nodule), patient
folds, and both protocols end to end on tiny data (YOLO for one epoch on 64² images)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nodulesynth.data.slices import SliceRecord, write_slice_dataset
from nodulesynth.detect.windows import WindowConfig, consensus, patient_folds, windows_from_crops, windows_from_slices
from nodulesynth.errors import NoduleSynthError
from nodulesynth.masks.classes import MaskClass

ROOT = Path(__file__).resolve().parents[1]


def _crops(n=24, size=128, seed=0):
    """Crops in the shared npz format: a bright disc at the centre, outlined by 2–3 readers."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images = np.full((n, size, size), 20, np.uint8)  # ≈ −820 HU lung
    masks = np.zeros((n, size, size), np.uint8)
    for k in range(n):
        r = rng.integers(3, 9)
        disc = (yy - size // 2) ** 2 + (xx - size // 2) ** 2 <= r * r
        images[k][disc] = 130
        masks[k][disc] = 0b0011 | (0b0100 if k % 2 else 0)
        masks[k][(yy - size // 2) ** 2 + (xx - size // 2) ** 2 <= (r + 1) ** 2] |= 0b1000  # a generous 4th reader
    return images, masks, np.repeat(np.arange(n // 4) + 1, 4).astype(np.int16)


def test_windows_from_crops_random_position_and_clean_negatives():
    images, masks, pats = _crops()
    w = windows_from_crops(images, masks, pats, WindowConfig(size=48), seed=0)
    pos = [i for i, b in enumerate(w.boxes) if len(b)]
    neg = [i for i, b in enumerate(w.boxes) if not len(b)]
    assert len(pos) == len(images) and len(neg) == len(images)
    centres = np.array([(w.boxes[i][0, :2] + w.boxes[i][0, 2:]) / 2 for i in pos])
    assert centres.std(0).min() > 4  # the nodule is not always in the middle of the window
    for i in pos:  # the labelled box holds the bright disc, wholly inside the window
        x0, y0, x1, y1 = w.boxes[i][0].astype(int)
        assert 0 <= x0 and x1 <= 48 and w.images[i][y0:y1, x0:x1].max() > 0
    for i in neg:  # a negative never shows nodule intensity
        assert w.images[i].max() < 0
    # consensus: ≥ 2 readers; the 4th reader's wider ring alone is not nodule
    c = consensus(masks[:1])
    assert c.sum() == ((masks[0] & 0b0011) > 0).sum()
    assert set(w.group.tolist()) == set(pats.tolist())


def test_resampling_keeps_the_fine_texture_and_the_range():
    """Generated 0.8-mm slices go to the crops' 0.7 mm by cubic spline: a noise texture keeps most of
    its contrast and fine detail (linear keeps 67 % of the std and 44 % of the Laplacian), nothing
    overshoots the slice's range, and labels stay labels."""
    from scipy import ndimage as ndi

    from nodulesynth.detect.windows import resample_slice

    x = np.random.default_rng(0).normal(-800, 100, (128, 128)).astype(np.float32)
    m = (np.arange(128)[None, :] > 64).repeat(128, 0).astype(np.uint8) * MaskClass.NODULE
    y, ym = resample_slice(x, m, 0.8, 0.7)
    assert y.shape == ym.shape == (146, 146)
    assert y.std() > 0.85 * x.std()
    assert np.abs(ndi.laplace(y)).mean() > 0.6 * np.abs(ndi.laplace(x)).mean()
    assert x.min() <= y.min() and y.max() <= x.max() and set(np.unique(ym)) == {0, MaskClass.NODULE}


def test_windows_from_slices_and_folds():
    m = np.full((2, 96, 96), MaskClass.BODY, np.uint8)
    m[:, 10:86, 10:45] = MaskClass.RIGHT_LUNG
    m[:, 10:86, 50:86] = MaskClass.LEFT_LUNG
    m[0, 30:36, 20:26] = MaskClass.NODULE
    hu = np.where(m == MaskClass.NODULE, 40, -800).astype(np.float32)
    w = windows_from_slices(hu, m, spacing_mm=0.8, target_mm=0.8, cfg=WindowConfig(size=32), seed=1)
    assert w.n_positive == 1 and len(w) == 3  # one nodule → one positive; one negative per slice
    assert all(w.images[i].max() < 0 for i, b in enumerate(w.boxes) if not len(b))
    folds = patient_folds(np.array([1, 1, 2, 3, 4, 5]), 2, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == [1, 2, 3, 4, 5]
    with pytest.raises(NoduleSynthError):
        patient_folds(np.array([1, 2]), 3)


def _run(args, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "detection.py"), *args], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, "YOLO_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                            "NO_ALBUMENTATIONS_UPDATE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_detection_patches_smoke(tmp_path):
    pytest.importorskip("ultralytics")
    images, masks, pats = _crops(n=24)
    npz = tmp_path / "crops.npz"
    np.savez(npz, images=images, reader_masks=masks, patient=pats, nodule=np.zeros(24, np.int16),
             slice=np.zeros(24, np.int16))
    out = tmp_path / "out"
    _run(["--protocol", "patches", "--smoke", "--crops", str(npz), "--n-synth", "0", "1", "--out", str(out),
          "--eval", str(npz), "--synth-source", "generated", "inserted", "--insert-into", str(_backgrounds(tmp_path)),
          "--synth-use", "mix", "pretrain", "--min-readers", "3"], tmp_path)
    doc = json.loads((out / "results.json").read_text())
    arms = {(r["arm"], r["test"]) for r in doc["rows"]}
    assert doc["synthetic"]["min_readers"] == 3  # generate's condition reached the generated arm
    assert list(out.rglob("synthetic-*-readers3.npz"))  # and keyed its cache
    assert {("real", "fold"), ("real+1", "fold"), ("real+1 inserted", "fold"), ("real", "external"),
            ("real+1 pretrain", "fold"), ("real+1 inserted pretrain", "fold")} <= arms
    # the pretrain arm trained twice (synthetic windows, then real from those weights), as many steps as mixing
    pre, mix = ({r["arm"]: r for r in doc["rows"] if r["test"] == "fold"}[k] for k in ("real+1 pretrain", "real+1"))
    assert (out / "work/fold0/yolov8n/real+1-pretrain/synthetic/train/weights/last.pt").is_file()
    assert pre["train_images"] == mix["train_images"] and pre["optimizer_steps"] >= mix["optimizer_steps"]
    # the inserted nodules went into the one TRAIN slice without a nodule, and are paired with the generated arm too
    assert doc["sources"] == ["generated", "inserted"] and doc["inserted"]["backgrounds"] == 1
    assert doc["n_inserted_windows"] >= 1 and doc["n_synthetic_windows"] >= 1  # smoke windows (24 px) drop large nodules
    assert {"real", "real+1"} <= {q["against"] for q in doc["paired"] if q["arm"] == "real+1 inserted"} or \
        doc["run_folds"] == 1  # one fold: nothing to pair
    assert any(a.startswith("real (equal steps") for a, _ in arms)
    assert doc["finished"] and doc["versions"]["ultralytics"] and "detection.py" in doc["command"]
    # folds are by patient: no patient in two folds
    assert doc["run_folds"] == 1 and doc["folds"] == 2
    f0, f1 = (set(f) for f in doc["fold_patients"])  # folds by patient: disjoint, covering all
    assert not (f0 & f1) and f0 | f1 == set(pats.tolist())
    for r in doc["rows"]:
        assert 0 <= r["map50_95"] <= r["map50"] <= 1
    assert (out / "results.csv").is_file() and (out / "map_vs_n.png").is_file()


def _backgrounds(tmp_path) -> Path:
    """A prepared 512² set: a TRAIN slice without a nodule (the one to insert into), a TRAIN slice with
    one and a TEST slice (both never used)."""
    from scenes import scene_mask

    m = np.kron(scene_mask(), np.ones((8, 8), np.uint8))
    hu = np.where(m == MaskClass.BODY, 40, np.where(m == 0, -1000, -850)).astype(np.int16)
    with_nodule = m.copy()
    with_nodule[150:160, 120:130] = MaskClass.NODULE
    recs = [SliceRecord("a", 0.0, 0, (0.8, 0.8), np.zeros((0, 4), np.float32), "tcga", False, patient="p1", split="train"),
            SliceRecord("b", 0.0, 0, (0.8, 0.8), np.array([[120, 150, 130, 160]], np.float32), "tcga", True,
                        patient="p2", split="train"),
            SliceRecord("c", 0.0, 0, (0.8, 0.8), np.zeros((0, 4), np.float32), "tcga", False, patient="p3", split="test")]
    return write_slice_dataset(tmp_path / "bg", np.stack([hu, hu, hu]), np.stack([m, with_nodule, m]), recs)


@pytest.mark.slow
def test_detection_slices_smoke_with_froc(tmp_path):
    pytest.importorskip("ultralytics")
    rng = np.random.default_rng(0)
    n, s = 16, 64
    images = np.full((n, s, s), -800, np.int16)
    masks = np.full((n, s, s), MaskClass.LEFT_LUNG, np.uint8)
    recs = []
    for k in range(n):
        series = f"s{k // 4}"
        x, y = rng.integers(8, 48, 2)
        images[k, y : y + 6, x : x + 6] = 40
        masks[k, y : y + 6, x : x + 6] = MaskClass.NODULE
        recs.append(SliceRecord(series, float(k), k % 4, (0.8, 0.8), np.array([[x, y, x + 6, y + 6]], np.float32),
                                "phantom", True))
    write_slice_dataset(tmp_path / "ds", images, masks, recs)
    out = tmp_path / "out"
    _run(["--protocol", "slices", "--smoke", "--data", str(tmp_path / "ds"), "--n-synth", "0", "--out", str(out)],
         tmp_path)
    doc = json.loads((out / "results.json").read_text())
    assert all(r["froc"]["n_scans"] >= 1 and 0 <= r["cpm"] <= 1 for r in doc["rows"])
    # --control-only: the real arm and the control alone (to complete a --no-control run of the same folds);
    # the real rows are the first run's to the digit, so the two merge with --from-json
    _run(["--protocol", "slices", "--smoke", "--data", str(tmp_path / "ds"), "--n-synth", "1", "--control-only",
          "--out", str(tmp_path / "ctrl")], tmp_path)
    ctrl = json.loads((tmp_path / "ctrl" / "results.json").read_text())
    assert [r["arm"] for r in ctrl["rows"]] == ["real", "real (equal steps as +1)"]
    assert ctrl["rows"][1]["epochs"] >= ctrl["rows"][0]["epochs"]
    assert ctrl["rows"][0]["map50_95"] == doc["rows"][0]["map50_95"]


def test_detection_bad_input_one_clear_error(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "detection.py"), "--crops", str(tmp_path / "no.npz"),
                        "--out", str(tmp_path / "o"), "--n-synth", "0"], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "YOLO_OFFLINE": "1"})
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "no.npz" in r.stderr
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import detection

    assert detection.main(["--out", str(tmp_path / "o"), "--n-synth", "200", "--control-only", "--no-control"]) == 2
    assert detection.main(["--out", str(tmp_path / "o"), "--n-synth", "0", "--control-only"]) == 2


def test_test_folds_hold_only_patients_the_generators_never_saw(tmp_path):
    """--test-unseen-by: the patients a prepared crops dataset trained on (its TRAIN split) never test,
    and --max-patients takes the unseen ones first."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import detection

    recs = [{"patient": f"LIDC-IDRI-{p:04d}", "split": "train" if p <= 4 else "test"} for p in (1, 2, 3, 4, 5, 6)]
    (tmp_path / "index.json").write_text(json.dumps({"meta": {}, "records": recs}))
    seen = detection.train_patients(str(tmp_path))
    assert seen == {1, 2, 3, 4}
    images, masks, pats = _crops(n=24)  # patients 1..6
    npz = tmp_path / "crops.npz"
    np.savez(npz, images=images, reader_masks=masks, patient=pats)
    _, _, kept = detection.load_crops(str(npz), 3, seed=0, first={5, 6})
    assert {5, 6} <= set(kept.tolist()) and len(set(kept.tolist())) == 3
    folds = detection.fold_patients(pats.astype(np.int64), 2, 0, seen)
    assert sorted(np.concatenate(folds).tolist()) == [5, 6]
    assert len(detection.fold_patients(pats.astype(np.int64), 2, 0)) == 2
    (tmp_path / "bad").mkdir()
    with pytest.raises(NoduleSynthError, match="--test-unseen-by"):
        detection.train_patients(str(tmp_path / "bad"))


def test_paired_differences_and_one_row_per_arm():
    """The gain is read paired over folds (folds differ more than arms); the control, whose epochs
    are rounded per fold, stays one row with its epochs as a range."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import detection

    rows = []
    for f, (real, mixed, ctrl, ep) in enumerate([(0.10, 0.13, 0.09, 9), (0.20, 0.21, 0.22, 10), (0.15, 0.17, 0.12, 9)]):
        for arm, n, v, e in (("real", 0, real, 6), ("real+200", 200, mixed, 6), ("real (equal steps as +200)", 0, ctrl, ep)):
            rows.append({"fold": f, "detector": "yolov8n", "arm": arm, "n_synth": n, "epochs": e, "test": "fold",
                         "map50_95": v})
    table = detection.summarise(rows)
    assert [r["arm"] for r in table] == ["real", "real+200", "real (equal steps as +200)"]
    assert table[2]["epochs"] == "9-10" and table[2]["folds"] == 3
    pairs = {p["against"]: p for p in detection.paired(rows)}
    d = np.array([0.03, 0.01, 0.02])
    assert pairs["real"]["mean_diff"] == pytest.approx(d.mean())
    assert pairs["real"]["se"] == pytest.approx(d.std(ddof=1) / np.sqrt(3)) and pairs["real"]["ahead"] == 3
    assert pairs["real (equal steps as +200)"]["ahead"] == 2
    assert pairs["real (equal steps as +200)"]["per_fold"] == pytest.approx([0.04, -0.01, 0.05])


def test_pretrain_arms_pair_with_their_mixed_arm():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import detection

    arms = ["real", "real+200", "real+200 pretrain", "real+200 crops", "real+200 crops pretrain",
            "real+200 backgrounds pretrain"]
    rows = [{"fold": f, "detector": "yolov8n", "arm": a, "n_synth": 0, "epochs": 6, "test": "fold",
             "map50_95": 0.1 + 0.01 * i + 0.001 * f * i} for f in range(3) for i, a in enumerate(arms)]
    against = {}
    for q in detection.paired(rows):
        against.setdefault(q["arm"], []).append(q["against"])
    assert against["real+200 pretrain"] == ["real", "real+200"]
    assert against["real+200 crops pretrain"] == ["real", "real+200", "real+200 crops", "real+200 backgrounds pretrain"]
    assert detection.arm_name("crops", 5, "pretrain") == "real+5 crops pretrain"


def test_train_fraction_keeps_whole_patients_the_same_for_every_arm():
    """--train-fraction: a fold's real training set made scarce by whole patients, the same draw for
    every arm of the fold (seeded by seed and fold alone), and at least one patient."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import detection

    groups = np.repeat(np.arange(20), 3)  # 20 patients, 3 windows each
    idx = np.nonzero(groups >= 4)[0]  # patients 0–3 test this fold
    sub = detection.subsample_patients(idx, groups, 0.25, seed=7)
    kept = np.unique(groups[sub])
    assert len(kept) == 4 and set(kept) <= set(range(4, 20))
    assert all((groups[sub] == g).sum() == 3 for g in kept)  # whole patients
    assert np.array_equal(sub, detection.subsample_patients(idx, groups, 0.25, seed=7))
    assert not np.array_equal(sub, detection.subsample_patients(idx, groups, 0.25, seed=8))
    assert len(np.unique(groups[detection.subsample_patients(idx, groups, 0.001, seed=0)])) == 1
    assert detection.subsample_patients(idx, groups, 1.0, seed=0) is idx
    with pytest.raises(SystemExit):
        detection.main(["--out", "x", "--train-fraction", "nan?"])
    assert detection.main(["--out", "x", "--n-synth", "0", "--train-fraction", "0"]) == 2


def test_runs_of_the_same_folds_merge_and_disagreeing_rows_are_refused(tmp_path):
    """--from-json A B: a run with the control and one with the inserted arm, merged so every arm pairs
    with every other; a shared row that differs (other code or machine) or other folds are refused.
    --pool: runs of other seeds pooled over all their folds."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import detection

    def doc(arms, real=(0.10, 0.20, 0.15)):
        rows = [{"fold": f, "detector": "yolov8n", "arm": arm, "n_synth": n, "epochs": 6, "test": "fold",
                 "precision": 0.5, "recall": 0.5, "map50": 0.3, "map50_95": v[f] if arm != "real" else real[f]}
                for f in range(3) for arm, n, v in arms]
        return {"rows": rows, "note": "protocol patches: 3 of 3 patient folds run, 6 patients", "folds": 3, "seed": 0,
                "protocol": "patches", "fold_patients": [[1, 2], [3, 4], [5, 6]]}

    a = doc([("real", 0, None), ("real+200", 200, (0.12, 0.22, 0.16))])
    b = doc([("real", 0, None), ("real+200 inserted", 200, (0.15, 0.21, 0.19))])
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    assert detection.main(["--from-json", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "m")]) == 0
    merged = json.loads((tmp_path / "m" / "results.json").read_text())
    assert [r["arm"] for r in merged["table"]] == ["real", "real+200", "real+200 inserted"]
    pairs = {(q["arm"], q["against"]): q for q in merged["paired"]}
    assert pairs[("real+200 inserted", "real+200")]["per_fold"] == pytest.approx([0.03, -0.01, 0.03])
    assert pairs[("real+200 inserted", "real")]["ahead"] == 3
    assert "real+200 inserted" in (tmp_path / "m" / "table.txt").read_text()
    # --arm-suffix: a second run of the same arm (other backgrounds) stays beside the first and pairs with it
    (tmp_path / "b2.json").write_text(json.dumps(doc([("real", 0, None), ("real+200 inserted", 200, (0.13, 0.25, 0.17))])))
    assert detection.main(["--from-json", *(str(tmp_path / f) for f in ("a.json", "b.json", "b2.json")),
                           "--arm-suffix", "", "", " (clean)", "--out", str(tmp_path / "r")]) == 0
    renamed = json.loads((tmp_path / "r" / "results.json").read_text())
    assert [r["arm"] for r in renamed["table"]] == ["real", "real+200", "real+200 inserted", "real+200 inserted (clean)"]
    pairs = {(q["arm"], q["against"]): q["per_fold"] for q in renamed["paired"]}
    assert pairs[("real+200 inserted (clean)", "real+200 inserted")] == pytest.approx([-0.02, 0.04, -0.02])
    assert pairs[("real+200 inserted (clean)", "real+200")] == pytest.approx([0.01, 0.03, 0.01])
    assert detection.main(["--from-json", str(tmp_path / "a.json"), "--arm-suffix", "", "x", "--out", str(tmp_path / "s")]) == 2
    (tmp_path / "c.json").write_text(json.dumps(doc([("real", 0, None)], real=(0.10, 0.21, 0.15))))
    assert detection.main(["--from-json", str(tmp_path / "a.json"), str(tmp_path / "c.json"), "--out", str(tmp_path / "n")]) == 2
    (tmp_path / "d.json").write_text(json.dumps({**b, "fold_patients": [[1], [2], [3]]}))
    with pytest.raises(NoduleSynthError, match="fold_patients"):
        detection.summarise_json([tmp_path / "a.json", tmp_path / "d.json"], tmp_path / "o")
    # --pool: runs with other seeds pool their paired differences over all folds; one seed twice is refused
    (tmp_path / "s1.json").write_text(json.dumps({**a, "seed": 1, "rows": [
        {**r, "map50_95": r["map50_95"] + (0.01 if r["arm"] == "real+200" else 0)} for r in a["rows"]]}))
    assert detection.main(["--pool", str(tmp_path / "a.json"), str(tmp_path / "s1.json"), "--out", str(tmp_path / "p")]) == 0
    pooled = json.loads((tmp_path / "p" / "pooled.json").read_text())["pooled"]
    q = next(q for q in pooled if q["arm"] == "real+200" and q["against"] == "real")
    d = np.array([0.02, 0.02, 0.01, 0.03, 0.03, 0.02])
    assert q["per_seed"]["0"]["mean_diff"] == pytest.approx(d[:3].mean()) and q["all"]["folds"] == 6
    assert q["all"]["mean_diff"] == pytest.approx(d.mean()) and q["all"]["se"] == pytest.approx(d.std(ddof=1) / np.sqrt(6))
    assert q["all"]["ahead"] == 6 and "all: +0.022" in (tmp_path / "p" / "pooled.txt").read_text()
    assert (tmp_path / "p" / "pooled.png").stat().st_size > 1000
    assert detection.main(["--pool", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "q")]) == 2


@pytest.mark.slow
def test_training_from_a_pt_starts_from_its_weights(tmp_path):
    """``--detector-weights`` and the pretrain arm start from a .pt: ultralytics drops a loaded
    checkpoint's weights when told ``pretrained=False``, which would silently train from scratch."""
    pytest.importorskip("ultralytics")
    import torch

    from nodulesynth.detect import yolo as Y

    Y.offline(tmp_path)
    from ultralytics import YOLO

    ims = np.full((8, 64, 64), -850, np.float32)
    ims[:, 20:30, 20:30] = 30
    paths = Y.write_images(tmp_path / "pool", "w", ims, [np.array([[20, 20, 30, 30]], np.float32)] * 8)
    data = Y.write_data_yaml(tmp_path / "d.yaml", paths, paths)
    m = YOLO("yolov8n.yaml")
    name, p = next((n, p) for n, p in m.model.named_parameters() if p.ndim == 4)
    with torch.no_grad():
        p.fill_(0.25)  # a mark no initialisation makes
    m.save(str(tmp_path / "marked.pt"))
    dev = {}
    for model in (str(tmp_path / "marked.pt"), "yolov8n.yaml"):
        cfg = Y.YoloConfig(model=model, epochs=1, batch=8, seed=0)
        w = dict(YOLO(str(Y.train(data, tmp_path / Path(model).stem, cfg))).model.named_parameters())[name]
        dev[cfg.starts_from_weights] = float((w.detach().float() - 0.25).abs().mean())
    assert dev[True] < 0.02 < 0.2 < dev[False]  # one epoch moved the marked weights a little; scratch is elsewhere
