"""``prepare --dicom`` with DICOM SEG files beside the CT: the lesion segments label their series.

The SEG is built from LIDC-IDRI-0001's own readers' consensus (the ``--lidc`` path's nodule pixels on
the native grid), so ``--dicom`` with it must give the nodule slices and boxes ``--lidc`` gives.
Skipped without ../shared/data."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from nodulesynth.cli import main
from nodulesynth.data.dicom_tree import scan_dicom_tree
from nodulesynth.data.prepare import PrepareConfig, _load_job, discover_lidc
from nodulesynth.data.sections import nodules_in_slice
from nodulesynth.data.slices import SliceDataset
from nodulesynth.errors import NoduleSynthError
from nodulesynth.masks.classes import MaskClass
from nodulesynth.masks.semantic import semantic_mask

from test_general_ct import _copy_lidc  # the LIDC sample's five slices through its nodule

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return c


def _segment(number: int, label: str, category: tuple, kind: tuple) -> Dataset:
    s = Dataset()
    s.SegmentNumber, s.SegmentLabel, s.SegmentAlgorithmType = number, label, "MANUAL"
    s.SegmentedPropertyCategoryCodeSequence = Sequence([_code(*category)])
    s.SegmentedPropertyTypeCodeSequence = Sequence([_code(*kind)])
    return s


NODULE = (2, "Nodule", ("49755003", "SCT", "Morphologically abnormal structure"), ("27925004", "SCT", "Nodule"))
LUNG = (1, "Lung", ("123037004", "SCT", "Anatomical structure"), ("39607008", "SCT", "Lung"))


def write_seg(path: Path, ct_files: list[Path], frames: list[tuple[int, Path, np.ndarray]], segments=(LUNG, NODULE)):
    """A BINARY DICOM SEG of the series of ``ct_files``: ``frames`` = (segment number, CT file whose
    plane it lies on, boolean mask)."""
    ref = pydicom.dcmread(ct_files[0], stop_before_pixels=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SEG_CLASS, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = SEG_CLASS, meta.MediaStorageSOPInstanceUID, "SEG"
    ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = ref.PatientID, ref.StudyInstanceUID, generate_uid()
    ds.FrameOfReferenceUID = ref.FrameOfReferenceUID
    series = Dataset()
    series.SeriesInstanceUID = ref.SeriesInstanceUID
    ds.ReferencedSeriesSequence = Sequence([series])
    ds.SegmentationType, ds.SegmentSequence = "BINARY", Sequence([_segment(*s) for s in segments])
    ds.Rows, ds.Columns, ds.NumberOfFrames = ref.Rows, ref.Columns, len(frames)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 1, 0, 0
    mea, ori, shared = Dataset(), Dataset(), Dataset()
    mea.PixelSpacing, mea.SliceThickness = ref.PixelSpacing, ref.SliceThickness
    ori.ImageOrientationPatient = ref.ImageOrientationPatient
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = Sequence([mea]), Sequence([ori])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per = []
    for number, f, _ in frames:
        g, pos, sid = Dataset(), Dataset(), Dataset()
        pos.ImagePositionPatient = pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient
        sid.ReferencedSegmentNumber = number
        g.PlanePositionSequence, g.SegmentIdentificationSequence = Sequence([pos]), Sequence([sid])
        per.append(g)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    ds.PixelData = pydicom.pixels.pack_bits(np.stack([m for _, _, m in frames]).astype(np.uint8))
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def lidc_case(lidc_0001, tmp_path_factory):
    """(LIDC tree, its series files by slice, native consensus nodule masks by slice)."""
    root = tmp_path_factory.mktemp("seg")
    src = _copy_lidc(*lidc_0001, root / "lidc")
    job = discover_lidc(src)[0][0]
    cfg = PrepareConfig(out=root / "unused")
    ct, nodules, _ = _load_job(job, cfg)
    assert np.allclose(ct.direction, np.eye(3))  # stored = canonical: native masks are on the files' grid
    files = sorted(next(src.rglob("*.dcm")).parent.glob("*.dcm"), key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    masks = {}
    for k in range(ct.shape[0]):
        sns = nodules_in_slice(ct, k, nodules, cfg.min_section_mm)
        if sns:
            m = semantic_mask(ct.hu[k], (ct.spacing[1], ct.spacing[2]), sns, None) == MaskClass.NODULE
            if m.any():
                masks[k] = m
    assert len(masks) >= 3
    return root, src, files, masks


def _dicom_tree(root: Path, files: list[Path], name: str) -> Path:
    d = root / name / "ct"
    d.mkdir(parents=True)
    for f in files:
        shutil.copy(f, d / f.name)
    return d.parent


def test_seg_labels_the_series_like_the_lidc_readers(lidc_case):
    root, src, files, masks = lidc_case
    tree = _dicom_tree(root, files, "dicom_seg")
    lung = np.zeros_like(next(iter(masks.values())))
    lung[100:400, 60:250] = True  # an anatomy segment: must not become a nodule
    write_seg(tree / "seg.dcm", files, [(2, files[k], m) for k, m in masks.items()] + [(1, files[0], lung)])
    scanned = scan_dicom_tree(tree)
    assert scanned.summary()["volumes_labelled_by_seg"] == 1 and scanned.summary()["seg_files"] == 1
    assert main(["prepare", "--dicom", str(tree), "--negatives", "0", "--out", str(root / "out_dicom")]) == 0
    assert main(["prepare", "--lidc", str(src), "--negatives", "0", "--out", str(root / "out_lidc")]) == 0
    d, ref = SliceDataset(root / "out_dicom"), SliceDataset(root / "out_lidc")
    assert d.meta["labelled"] and all(r.labelled for r in d.records)
    assert [r.slice_index for r in d.records] == [r.slice_index for r in ref.records] == sorted(masks)
    for a, b, ma, mb in zip(d.records, ref.records, d.masks, ref.masks):
        assert np.array_equal(a.boxes, b.boxes)
        assert np.array_equal(ma == MaskClass.NODULE, mb == MaskClass.NODULE)


def test_seg_without_lesions_leaves_the_series_unlabelled(lidc_case):
    root, _, files, masks = lidc_case
    tree = _dicom_tree(root, files, "lung_only")
    write_seg(tree / "seg.dcm", files, [(1, files[k], m) for k, m in masks.items()], segments=(LUNG,))
    scanned = scan_dicom_tree(tree)
    assert not scanned.volumes[0].segs
    assert any(k.startswith("DICOM SEG without lesion segments (Lung") for k in scanned.skipped)


def test_seg_frame_off_every_slice_is_one_clear_error(lidc_case, tmp_path, capsys):
    root, _, files, masks = lidc_case
    tree = _dicom_tree(tmp_path, files, "off")
    k = next(iter(masks))
    seg = write_seg(tree / "seg.dcm", files, [(2, files[k], masks[k])])
    ds = pydicom.dcmread(seg)
    ipp = [float(v) for v in ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient]
    ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient = [ipp[0], ipp[1], ipp[2] + 40]
    ds.save_as(seg)
    with pytest.raises(NoduleSynthError, match="lesion frame 1 .* lies on no slice of CT series"):
        scan_dicom_tree(tree)
    assert main(["prepare", "--dicom", str(tree), "--out", str(tmp_path / "out")]) == 2
    assert "seg.dcm" in capsys.readouterr().err and not (tmp_path / "out").exists()
