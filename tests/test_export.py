"""COCO and YOLO writers: pycocotools/COCOeval accept the COCO output, YOLO labels round-trip,
ultralytics trains on the YOLO folder offline (1 epoch at 64 px, a few seconds on CPU)."""
from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np
from scenes import scene_mask
import pytest
import torch
from PIL import Image

from nodulesynth.export.writer import DatasetWriter, ExportItem, ExportSpec, finalize
from nodulesynth.export.yolo import read_labels, ultralytics_offline
from nodulesynth.hu import window_uint8
from nodulesynth.masks.boxes import mask_to_boxes
from nodulesynth.masks.classes import MaskClass as C
from nodulesynth.synth.pipeline import GenerationConfig, Synthesizer


@pytest.fixture(scope="module")
def batch():
    """Six samples from the real pipeline (tiny random TSGAN, mask-in mode so nodules are known)."""
    from nodulesynth.models.pix2pix import TranslatorConfig
    from nodulesynth.models.stylegan import MaskGANConfig
    from nodulesynth.models.tsgan import TSGAN

    torch.manual_seed(0)
    model = TSGAN.from_configs(MaskGANConfig(resolution=16, z_dim=16, w_dim=16, mapping_layers=1, fmap_base=64, fmap_max=16),
                               TranslatorConfig(ngf=8, ndf=8, num_downs=6, dwmh_depth=3, dwmh_window=4, dwmh_heads=2),
                               image_size=64).eval()
    rng = np.random.default_rng(0)
    masks = np.stack([scene_mask([(int(rng.integers(12, 24)), int(rng.integers(18, 44)), int(rng.integers(2, 5)))]
                             + ([(46, 30, 2)] if k % 2 else [])) for k in range(6)] + [scene_mask([])])
    return Synthesizer(model, GenerationConfig(block=8)).translate(masks)


def _item(batch, k: int, name: str | None = None, split: str = "train") -> ExportItem:
    return ExportItem(name or f"s{k}", batch.images_hu[k].numpy(), batch.masks[k].numpy(), batch.boxes[k], "mask-in",
                      (0.8, 0.8), {**batch.provenance[k], "seed": 5}, split, k)


def _write(root, fmt: str, items, image_format: str = "png", final_root=None, header=None):
    spec = ExportSpec((fmt,), image_format)
    w = DatasetWriter(root, spec, workers=0)
    for it in items:
        w.add(it)
    finalize(root, spec, w.drain(), header or {"seed": 5, "revision": "abc", "quality_gate": "n/a"},
             final_root or root)
    w.close()


def test_coco_loads_and_evaluates_to_ap_1(tmp_path, batch):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    from pycocotools import mask as mask_utils

    _write(tmp_path, "coco", [_item(batch, k) for k in range(len(batch))])
    path = tmp_path / "annotations.json"
    data = json.loads(path.read_text())
    assert data["categories"] == [{"id": 1, "name": "nodule", "supercategory": "lesion"}]
    assert {"version", "revision", "seed", "date_created", "quality_gate"} <= set(data["info"])
    assert data["images"][3]["index"] == 3 and data["images"][3]["provenance"]["source"] == "mask-in"
    assert len(data["annotations"]) == sum(len(b) for b in batch.boxes) == 9

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(path))
        dets = [{"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 1.0} for a in data["annotations"]]
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0) and ev.stats[1] == pytest.approx(1.0)

    for img in gt.loadImgs(gt.getImgIds()):
        k = img["index"]
        png = np.asarray(Image.open(tmp_path / "images" / img["file_name"]))
        np.testing.assert_array_equal(png, window_uint8(batch.images_hu[k].numpy()))
        anns = gt.loadAnns(gt.getAnnIds(imgIds=img["id"]))
        boxes = np.array([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
        np.testing.assert_array_equal(boxes[:, :2], batch.boxes[k][:, :2])
        np.testing.assert_array_equal(boxes[:, :2] + boxes[:, 2:], batch.boxes[k][:, 2:])
        union = np.zeros((64, 64), bool)
        for a in anns:
            seg = mask_utils.decode(gt.annToRLE(a)).astype(bool)
            assert seg.sum() == a["area"] > 0
            union |= seg
        np.testing.assert_array_equal(union, batch.masks[k].numpy() == C.NODULE)


@pytest.mark.parametrize("fmt", ["png16", "npy"])
def test_lossless_hu_formats(tmp_path, batch, fmt):
    _write(tmp_path, "coco", [_item(batch, 0, "a")], fmt)
    expect = np.round(batch.images_hu[0].numpy()).astype(np.int16)
    if fmt == "npy":
        got = np.load(tmp_path / "images" / "a.npy")
    else:
        got = np.asarray(Image.open(tmp_path / "images" / "a.png")).astype(np.int32) - 1024
    np.testing.assert_array_equal(got, expect)


@pytest.fixture(scope="module")
def yolo_dir(tmp_path_factory, batch):
    root = tmp_path_factory.mktemp("yolo")
    _write(root / "tmp-name", "yolo", [_item(batch, k, split="val" if k >= 5 else "train") for k in range(len(batch))],
           final_root=root / "final")
    os.replace(root / "tmp-name", root / "final")  # as the CLI's atomic rename does
    return root / "final"


def test_yolo_labels_round_trip(yolo_dir, batch):
    import yaml

    data = yaml.safe_load((yolo_dir / "data.yaml").read_text())
    assert data["path"] == str(yolo_dir.resolve()) and data["train"] == "images/train" and data["val"] == "images/val"
    assert data["names"] == {0: "nodule"}
    for k in range(len(batch)):
        split = "val" if k >= 5 else "train"
        assert (yolo_dir / "images" / split / f"s{k}.png").is_file()
        got = read_labels(yolo_dir / "labels" / split / f"s{k}.txt", 64, 64)
        np.testing.assert_allclose(got, batch.boxes[k], atol=1e-4)
        lines = (yolo_dir / "labels" / split / f"s{k}.txt").read_text().splitlines()
        assert all(line.split()[0] == "0" for line in lines) and len(lines) == len(batch.boxes[k])


def test_no_val_split_never_points_val_at_train(tmp_path, batch):
    """Without held-out real patients there is no val split: data.yaml says so and names the empty
    images/val, so ultralytics cannot silently validate on the training images."""
    import yaml

    _write(tmp_path, "yolo", [_item(batch, k) for k in range(3)])
    text = (tmp_path / "data.yaml").read_text()
    data = yaml.safe_load(text)
    assert data["val"] == "images/val" != data["train"] and not list((tmp_path / "images" / "val").iterdir())
    assert "NO VALIDATION SPLIT" in text


def test_ultralytics_refuses_to_validate_without_a_val_split(tmp_path, batch, monkeypatch):
    _write(tmp_path / "d", "yolo", [_item(batch, k) for k in range(3)])
    for k in ("YOLO_OFFLINE", "YOLO_CONFIG_DIR"):
        monkeypatch.setenv(k, os.environ.get(k, ""))
    ultralytics_offline(tmp_path / "run")
    from ultralytics import YOLO

    with pytest.raises(FileNotFoundError, match="images/val"), contextlib.redirect_stdout(io.StringIO()):
        YOLO("yolov8n.yaml").train(data=str(tmp_path / "d" / "data.yaml"), epochs=1, imgsz=64, batch=2, device="cpu",
                                   project=str(tmp_path / "run"), name="x", workers=0, plots=False, verbose=False,
                                   amp=False)


def test_ultralytics_trains_on_export_offline(yolo_dir, tmp_path_factory, monkeypatch):
    run = tmp_path_factory.mktemp("ultra")
    for k in ("YOLO_OFFLINE", "YOLO_CONFIG_DIR"):
        monkeypatch.setenv(k, os.environ.get(k, ""))  # restored after the test
    ultralytics_offline(run)
    assert os.environ["YOLO_OFFLINE"] == "1" and (run / "ultralytics-config" / "Ultralytics" / "Arial.ttf").is_file()
    from ultralytics import YOLO

    with contextlib.redirect_stdout(io.StringIO()):
        model = YOLO("yolov8n.yaml")
        model.train(data=str(yolo_dir / "data.yaml"), epochs=1, imgsz=64, batch=4, nbs=4, warmup_epochs=0, mosaic=0,
                    device="cpu", project=str(run), name="smoke", workers=0, plots=False, verbose=False, amp=False)
    assert (run / "smoke" / "weights" / "last.pt").is_file()


def test_segmentation_is_each_components_own_pixels_when_boxes_overlap():
    from pycocotools import mask as mask_utils

    from nodulesynth.export.coco import nodule_annotations

    m = np.zeros((32, 32), np.uint8)
    m[4:20, 4:6] = C.NODULE   # an L-shaped component whose box (4..20, 4..20) ...
    m[18:20, 4:20] = C.NODULE
    m[8:11, 10:13] = C.NODULE  # ... contains a second, separate 3×3 component
    anns = nodule_annotations(m, mask_to_boxes(m))
    areas = sorted(a["area"] for a in anns)
    assert areas == [9.0, float(16 * 2 + 2 * 16 - 4)]
    union = sum(mask_utils.decode({"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()})
                for a in anns)
    assert union.max() == 1 and np.array_equal(union.astype(bool), m == C.NODULE)



def test_writer_on_started_workers_equals_inline(tmp_path, batch):
    """start() brings up every export process before the first item; what they write (files and
    records, in order) equals the inline writer's."""
    spec = ExportSpec(("coco",), "png")
    items = [_item(batch, k) for k in range(len(batch))]
    recs = {}
    for workers in (0, 2):
        root = tmp_path / f"w{workers}"
        w = DatasetWriter(root, spec, workers=workers)
        w.start()
        if workers:
            assert len(w._pool._processes) == workers
        for it in items:
            w.add(it)
        recs[workers] = w.drain()
        w.close()
    assert recs[0] == recs[2]
    for f in sorted((tmp_path / "w0" / "images").iterdir()):
        assert f.read_bytes() == (tmp_path / "w2" / "images" / f.name).read_bytes()
