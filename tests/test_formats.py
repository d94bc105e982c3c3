"""Every export format round-trips through its ecosystem's reader: HU, pixel spacing and boxes come
back equal (COCO json, YOLO labels, SimpleITK for NIfTI/MHA/DICOM, pydicom, highdicom SEG, MONAI's
datalist loader and box utilities), real slices keep their own spacing and provenance, DICOM is
unmistakably synthetic with fresh deterministic UIDs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scenes import scene_mask

from nodulesynth.export.writer import DatasetWriter, ExportItem, ExportSpec, finalize, parse_formats
from nodulesynth.export.dicom import DicomContext
from nodulesynth.errors import NoduleSynthError
from nodulesynth.masks.boxes import mask_to_boxes
from nodulesynth.masks.classes import MaskClass as C

REAL_SPACING = (0.7, 0.75)  # (row, col) mm, deliberately anisotropic: catches x/y swaps
SYNTH_SPACING = (0.8, 0.8)
ALL = ("coco", "yolo", "nifti", "mha", "dicom", "monai")


def _items() -> list[ExportItem]:
    rng = np.random.default_rng(0)
    out = []
    for k, nod in enumerate([[(18, 30, 3)], [(46, 30, 2), (20, 40, 2)], [], [(40, 20, 4)]]):
        m = scene_mask(nod)
        hu = rng.integers(-1024, 1500, m.shape).astype(np.int16)
        real = k == 3
        prov = ({"source": "lidc", "series_uid": "1.3.6.1.4.1.14519.5.2.1.6279.6001.1", "patient": "LIDC-IDRI-0001",
                 "z_mm": -120.5, "index": 0} if real else {"source": "synthetic", "seed": 7, "index": k, "revision": "abc"})
        out.append(ExportItem(f"{'real' if real else 'synth'}_{k:06d}", hu, m, mask_to_boxes(m),
                              "real" if real else "synthetic", REAL_SPACING if real else SYNTH_SPACING, prov,
                              "val" if real else "train", k))
    return out


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    base = tmp_path_factory.mktemp("formats")
    spec = ExportSpec(ALL, "png", DicomContext("rev-abc|seed-7", "local:tiny", "abc123", "0.1.0", "20261126"))
    w = DatasetWriter(base, spec, workers=0)
    items = _items()
    for it in items:
        w.add(it)
    header = {"weights": "local:tiny", "revision": "abc123", "seed": 7, "pixel_spacing_mm": list(SYNTH_SPACING),
              "validation": {"n_val": 1, "val_patients": ["LIDC-IDRI-0001"]}, "n_real": 1, "n_synthetic": 3,
              "n_mask_in": 0}
    finalize(base, spec, w.drain(), header, base)
    w.close()
    return base, items


def test_parse_formats():
    assert parse_formats("both") == ("coco", "yolo")
    assert parse_formats("monai, dicom,coco") == ("coco", "dicom", "monai")
    with pytest.raises(NoduleSynthError, match="unknown format 'nrrd'"):
        parse_formats("coco,nrrd")


def test_coco_and_manifest_carry_spacing_window_and_real_provenance(written):
    base, items = written
    data = json.loads((base / "coco" / "annotations.json").read_text())
    assert data["info"]["window_hu"] == [-1000.0, 400.0] and data["info"]["pixel_spacing_mm"] == [0.8, 0.8]
    assert [im["pixel_spacing_mm"] for im in data["images"]] == [list(it.spacing_mm) for it in items]
    assert data["images"][3]["provenance"]["patient"] == "LIDC-IDRI-0001"
    man = json.loads((base / "manifest.json").read_text())
    assert [m["pixel_spacing_mm"] for m in man["items"]] == [list(it.spacing_mm) for it in items]
    for m, it in zip(man["items"], items):
        np.testing.assert_array_equal(np.array(m["boxes_xyxy_px"]).reshape(-1, 4), it.boxes)
        assert all((base / f).is_file() for fs in m["files"].values() for f in fs)
    yaml_text = (base / "yolo" / "data.yaml").read_text()
    assert "lung window [-1000.0, 400.0] HU" in yaml_text and "synthetic [0.8, 0.8]" in yaml_text
    assert "[0.7, 0.75]" in yaml_text


@pytest.mark.parametrize("fmt, ext", [("nifti", ".nii.gz"), ("mha", ".mha")])
def test_simpleitk_images_round_trip(written, fmt, ext):
    import SimpleITK as sitk

    base, items = written
    for it in items:
        img = sitk.ReadImage(str(base / fmt / "images" / f"{it.name}{ext}"))
        lab = sitk.ReadImage(str(base / fmt / "labels" / f"{it.name}{ext}"))
        assert img.GetDimension() == 2 and img.GetPixelID() == sitk.sitkInt16
        assert img.GetSpacing() == pytest.approx((it.spacing_mm[1], it.spacing_mm[0]))  # ITK: (x, y)
        assert img.GetOrigin() == (0.0, 0.0) and img.GetDirection() == (1.0, 0.0, 0.0, 1.0)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img), it.hu)
        m = sitk.GetArrayFromImage(lab)
        np.testing.assert_array_equal(m, it.mask)
        np.testing.assert_array_equal(mask_to_boxes(m), it.boxes)


def test_dicom_reads_back_in_pydicom_simpleitk_and_is_synthetic(written):
    import pydicom
    import SimpleITK as sitk

    base, items = written
    uids = set()
    for it in items:
        path = base / "dicom" / "images" / f"{it.name}.dcm"
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(hu, it.hu)
        assert [float(v) for v in ds.PixelSpacing] == pytest.approx(list(it.spacing_mm))
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY"] and ds.BurnedInAnnotation == "NO"
        assert ds.PatientIdentityRemoved == "YES" and any("abc123" in v for v in ds.DeidentificationMethod)
        if it.source == "real":
            assert str(ds.PatientName) == "REAL^LIDC-IDRI-0001" and "z_mm=-120.5" in ds.ImageComments
            assert ds.SeriesInstanceUID != it.provenance["series_uid"]  # never the real series' UID
        else:
            assert str(ds.PatientName) == "SYNTHETIC^nodulesynth" and "SYNTHETIC nodulesynth" in ds.SeriesDescription
        uids.add(ds.SOPInstanceUID)
        img = sitk.ReadImage(str(path))
        assert img.GetSpacing()[:2] == pytest.approx((it.spacing_mm[1], it.spacing_mm[0]))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img).reshape(it.hu.shape), it.hu)
    assert len(uids) == len(items)
    # every slice its own series (a series reader must not stack unrelated slices into a volume)
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(base / "dicom" / "images"))
    assert len(series) == len(items)
    assert all(len(reader.GetGDCMSeriesFileNames(str(base / "dicom" / "images"), s)) == 1 for s in series)
    # deterministic from the dataset key (reruns and shards agree), different for another key
    ctx = DicomContext("rev-abc|seed-7", "m", "r", "v")
    assert ctx.uid("sop", "x") == ctx.uid("sop", "x") != DicomContext("rev-abc|seed-8", "m", "r", "v").uid("sop", "x")


def test_dicom_seg_boxes_equal(written):
    hd = pytest.importorskip("highdicom")
    base, items = written
    for it in items:
        path = base / "dicom" / "seg" / f"{it.name}.dcm"
        if not len(it.boxes):
            assert not path.exists()
            continue
        import pydicom

        seg = hd.seg.segread(path)
        ct_uid = pydicom.dcmread(base / "dicom" / "images" / f"{it.name}.dcm").SOPInstanceUID
        assert seg.get_source_image_uids()[0][2] == ct_uid  # the SEG references its CT slice
        m = np.asarray(seg.get_pixels_by_source_instance([ct_uid])).reshape(it.mask.shape)
        np.testing.assert_array_equal(m.astype(bool), it.mask == C.NODULE)
        np.testing.assert_array_equal(mask_to_boxes(np.where(m > 0, C.NODULE, 0)), it.boxes)


def test_dicom_export_prepares_back_with_its_seg_labels(written):
    """The DICOM export (CT + highdicom SEG) read back by ``prepare --dicom``'s reader: every slice with
    nodules is labelled by its SEG, pixel for pixel, and the one without stays unlabelled."""
    pytest.importorskip("highdicom")
    from nodulesynth.data.dicom_tree import read_dicom_label, read_dicom_volume, scan_dicom_tree

    base, items = written
    tree = scan_dicom_tree(base / "dicom")
    by_file = {v.files[0].stem: v for v in tree.volumes}
    assert sorted(by_file) == sorted(it.name for it in items)
    for it in items:
        v = by_file[it.name]
        lab = read_dicom_label(v, read_dicom_volume(v).hu.shape[1:])
        if not len(it.boxes):
            assert lab is None and not v.labels
            continue
        np.testing.assert_array_equal(lab[0], it.mask == C.NODULE)


def test_monai_datalist_loads_and_boxes_map_back_with_monai_box_ops(written):
    pytest.importorskip("monai")
    pytest.importorskip("nibabel")
    from monai.apps.detection.transforms.box_ops import apply_affine_to_boxes
    from monai.data import load_decathlon_datalist
    from monai.transforms import LoadImaged

    base, items = written
    path = base / "monai" / "datalist.json"
    meta = json.loads(path.read_text())
    assert meta["box_mode"] == "xyxy" and "LPS" in meta["coordinates"]
    train = load_decathlon_datalist(str(path), data_list_key="training")
    val = load_decathlon_datalist(str(path), data_list_key="validation")
    assert [e["name"] for e in train] == [it.name for it in items[:3]] and [e["name"] for e in val] == [items[3].name]
    load = LoadImaged(keys=["image"], reader="NibabelReader", image_only=False)
    for e, it in zip(train + val, items):
        d = load(dict(e))
        np.testing.assert_array_equal(np.asarray(d["image"]).T, it.hu)  # nibabel order is (x, y)
        a = np.asarray(d["image"].affine)[np.ix_([0, 1, 3], [0, 1, 3])]  # 2-D part of MONAI's RAS affine
        ras = torch.tensor(np.asarray(e["box"], np.float64).reshape(-1, 4) * -1)  # LPS → RAS (x, y flip)
        img_boxes = apply_affine_to_boxes(ras, torch.tensor(np.linalg.inv(a))).numpy()
        # MONAI image coordinates put pixel centres on integers: pixel-edge boxes sit half a pixel further
        np.testing.assert_allclose(img_boxes + 0.5, it.boxes, atol=1e-3)
        assert e["label"] == [0] * len(it.boxes)
