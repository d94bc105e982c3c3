"""``prepare --dicom`` with DICOM SEG or RTSTRUCT files beside the CT: their lesions label the series.

Both are built from LIDC-IDRI-0001's own readers' consensus (the ``--lidc`` path's nodule pixels on
the native grid), so ``--dicom`` with them must give the nodule slices and boxes ``--lidc`` gives.
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


def _annotation(sop_class: str, modality: str, ct_file: Path) -> tuple[Dataset, Dataset]:
    """(a new annotation object of the CT's patient and study, the CT slice's header)."""
    ref = pydicom.dcmread(ct_file, stop_before_pixels=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop_class, meta.MediaStorageSOPInstanceUID, modality
    ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = ref.PatientID, ref.StudyInstanceUID, generate_uid()
    return ds, ref


def write_seg(path: Path, ct_files: list[Path], frames: list[tuple[int, Path, np.ndarray]], segments=(LUNG, NODULE)):
    """A BINARY DICOM SEG of the series of ``ct_files``: ``frames`` = (segment number, CT file whose
    plane it lies on, boolean mask)."""
    ds, ref = _annotation(SEG_CLASS, "SEG", ct_files[0])
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
    assert scanned.summary()["volumes_labelled"] == 1 and scanned.summary()["annotation_files"] == 1
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
    assert not scanned.volumes[0].labels
    assert any(k.startswith("DICOM SEG without lesions (Lung") for k in scanned.skipped)


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


def test_seg_frame_on_a_missing_slice_is_counted_not_fatal(lidc_case, tmp_path):
    """A series with a slice missing is cut into runs (documented); a lesion frame on the missing slice
    has nothing to label, while the frames on the slices present still label theirs."""
    root, _, files, masks = lidc_case
    gone = sorted(masks)[1]
    tree = _dicom_tree(tmp_path, [f for k, f in enumerate(files) if k != gone], "gap")
    write_seg(tree / "seg.dcm", files, [(2, files[k], m) for k, m in masks.items()])
    scanned = scan_dicom_tree(tree)
    assert scanned.skipped["DICOM SEG lesion pieces on a missing slice"] == 1
    assert all(v.labels for v in scanned.volumes if len(v.slices) > 1)


RT_STRUCT_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"


def write_rtstruct(path: Path, ct_files: list[Path], rois: list[tuple[str, str, list[tuple[Path, np.ndarray, str]]]]):
    """An RT Structure Set of the series of ``ct_files``: ``rois`` = (name, RTROIInterpretedType,
    [(CT file, contour (N, 2) as (row, col) pixel coordinates, ContourGeometricType)])."""
    ds, ref = _annotation(RT_STRUCT_CLASS, "RTSTRUCT", ct_files[0])
    se, st, fr = Dataset(), Dataset(), Dataset()
    se.SeriesInstanceUID = ref.SeriesInstanceUID
    st.RTReferencedSeriesSequence = Sequence([se])
    fr.FrameOfReferenceUID, fr.RTReferencedStudySequence = ref.FrameOfReferenceUID, Sequence([st])
    ds.ReferencedFrameOfReferenceSequence = Sequence([fr])
    roi_seq, contour_seq, obs_seq = [], [], []
    for n, (name, kind, contours) in enumerate(rois, start=1):
        r, o, rc = Dataset(), Dataset(), Dataset()
        r.ROINumber, r.ROIName, r.ReferencedFrameOfReferenceUID = n, name, ref.FrameOfReferenceUID
        o.ObservationNumber, o.ReferencedROINumber, o.RTROIInterpretedType = n, n, kind
        cs = []
        for f, rc_px, geom in contours:
            c = pydicom.dcmread(f, stop_before_pixels=True)
            ipp = np.array([float(v) for v in c.ImagePositionPatient])
            iop = np.array([float(v) for v in c.ImageOrientationPatient])
            dy, dx = (float(v) for v in c.PixelSpacing)
            world = ipp + rc_px[:, 1:2] * dx * iop[:3] + rc_px[:, 0:1] * dy * iop[3:]
            item, img = Dataset(), Dataset()
            img.ReferencedSOPClassUID, img.ReferencedSOPInstanceUID = c.SOPClassUID, c.SOPInstanceUID
            item.ContourImageSequence = Sequence([img])
            item.ContourGeometricType, item.NumberOfContourPoints = geom, len(world)
            item.ContourData = [f"{v:.4f}" for v in world.ravel()]
            cs.append(item)
        rc.ReferencedROINumber, rc.ContourSequence = n, Sequence(cs)
        roi_seq.append(r)
        contour_seq.append(rc)
        obs_seq.append(o)
    ds.StructureSetROISequence, ds.ROIContourSequence = Sequence(roi_seq), Sequence(contour_seq)
    ds.RTROIObservationsSequence = Sequence(obs_seq)
    ds.save_as(path, enforce_file_format=True)
    return path


def _outlines(mask: np.ndarray) -> list[np.ndarray]:
    """Closed polygons (row, col) around a mask's pieces: the 0.5 iso-line between pixel centres."""
    from skimage import measure

    return [c for c in measure.find_contours(np.pad(mask, 1).astype(float), 0.5) if len(c) >= 3]


def test_fill_is_by_pixel_centre_and_even_odd():
    from nodulesynth.data.dicom_labels import _fill

    outer = np.array([[1.5, 1.5], [1.5, 8.5], [8.5, 8.5], [8.5, 1.5]])
    m = _fill(outer, (12, 12))
    assert m.sum() == 49 and m[2:9, 2:9].all()  # centres 2..8 lie inside 1.5..8.5
    inner = np.array([[3.5, 3.5], [3.5, 6.5], [6.5, 6.5], [6.5, 3.5]])
    ring = _fill(outer, (12, 12)) ^ _fill(inner, (12, 12))
    assert ring.sum() == 49 - 9 and not ring[4:7, 4:7].any()


def test_rtstruct_gtv_labels_the_series_like_the_lidc_readers(lidc_case):
    pytest.importorskip("skimage")
    root, src, files, masks = lidc_case
    tree = _dicom_tree(root, files, "dicom_rt")
    gtv = [(files[k], c - 1, "CLOSED_PLANAR") for k, m in masks.items() for c in _outlines(m)]  # -1: the pad
    lung = np.array([[100.0, 60.0], [100.0, 250.0], [400.0, 250.0], [400.0, 60.0]])
    k0 = next(iter(masks))
    write_rtstruct(tree / "rtstruct.dcm", files, [
        ("Lung_L", "ORGAN", [(files[k0], lung, "CLOSED_PLANAR")]),  # an organ at risk: never a nodule
        ("PTV_nodule", "PTV", [(files[k0], lung, "CLOSED_PLANAR")]),  # a margin around it: neither
        ("GTV-1", "GTV", gtv + [(files[k0], lung[:1], "POINT")]),  # a POINT outlines nothing
    ])
    scanned = scan_dicom_tree(tree)
    assert scanned.summary()["volumes_labelled"] == 1 and scanned.volumes[0].labels[0].kind == "RTSTRUCT"
    assert main(["prepare", "--dicom", str(tree), "--negatives", "0", "--out", str(root / "out_rt")]) == 0
    out_lidc = root / "out_lidc_rt"
    assert main(["prepare", "--lidc", str(src), "--negatives", "0", "--out", str(out_lidc)]) == 0
    d, ref = SliceDataset(root / "out_rt"), SliceDataset(out_lidc)
    assert [r.slice_index for r in d.records] == [r.slice_index for r in ref.records] == sorted(masks)
    for a, b, ma, mb in zip(d.records, ref.records, d.masks, ref.masks):
        na, nb = ma == MaskClass.NODULE, mb == MaskClass.NODULE
        assert 2 * (na & nb).sum() / (na.sum() + nb.sum()) > 0.98  # polygons between pixel centres (1.0 here)
        assert np.abs(np.asarray(a.boxes) - np.asarray(b.boxes)).max() <= 1


def test_rtstruct_without_a_lesion_roi_leaves_the_series_unlabelled(lidc_case, tmp_path):
    root, _, files, masks = lidc_case
    tree = _dicom_tree(tmp_path, files, "organs")
    k = next(iter(masks))
    write_rtstruct(tree / "rt.dcm", files, [("Heart", "ORGAN", [(files[k], _outlines(masks[k])[0], "CLOSED_PLANAR")])])
    scanned = scan_dicom_tree(tree)
    assert not scanned.volumes[0].labels and "DICOM RTSTRUCT without lesions (Heart)" in scanned.skipped


def test_rtstruct_naming_only_its_contours_images_finds_their_series(lidc_case, tmp_path):
    pytest.importorskip("skimage")
    root, _, files, masks = lidc_case
    tree = _dicom_tree(tmp_path, files, "no_series")
    rt = write_rtstruct(tree / "rt.dcm", files, [("GTV", "GTV", [(files[k], c - 1, "CLOSED_PLANAR")
                                                                 for k, m in masks.items() for c in _outlines(m)])])
    ds = pydicom.dcmread(rt)
    del ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence
    ds.save_as(rt)
    scanned = scan_dicom_tree(tree)
    assert scanned.volumes[0].labels and scanned.volumes[0].labels[0].series_uid == scanned.volumes[0].series_uid
    for c in ds.ROIContourSequence[0].ContourSequence:
        del c.ContourImageSequence
    ds.save_as(rt)
    with pytest.raises(NoduleSynthError, match="names neither its CT series"):
        scan_dicom_tree(tree)
