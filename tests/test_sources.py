"""Generic CT sources for prepare: DICOM trees, NIfTI/NRRD volumes with labels, MSD layout; bad input."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import NODULE_DIAMETER, NODULE_XYZ, ORIGIN, SPACING, synth_chest
from nodulesynth.cli import main
from nodulesynth.data.dicom_tree import read_dicom_volume, scan_dicom_tree
from nodulesynth.data.slices import SliceDataset
from nodulesynth.data.splits import check_disjoint
from nodulesynth.data.volumes import VolumeConfig, prepare_volumes, read_volume_file
from nodulesynth.errors import NoduleSynthError
from nodulesynth.masks.classes import MaskClass

DATA = (Path(__file__).resolve().parents[1] / "../shared/data").resolve()
FAST = ["--size", "128", "--spacing", "2.0"]


def _chest_and_label():
    chest = synth_chest(seed=1)
    z, y, x = np.meshgrid(*[np.arange(n) for n in chest.hu.shape], indexing="ij")
    w = [ORIGIN[i] + (z, y, x)[i] * SPACING[i] for i in range(3)]
    r2 = (w[2] - NODULE_XYZ[0]) ** 2 + (w[1] - NODULE_XYZ[1]) ** 2 + (w[0] - NODULE_XYZ[2]) ** 2
    return chest.hu, (r2 <= (NODULE_DIAMETER / 2) ** 2).astype(np.uint8)


def _write(path: Path, arr: np.ndarray) -> Path:
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    img.SetSpacing(SPACING[::-1])
    img.SetOrigin(ORIGIN[::-1])
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("vol")
    hu, lab = _chest_and_label()
    return _write(d / "case7_image.nii.gz", hu), _write(d / "case7_label.nrrd", lab), hu, lab


def test_volume_pair_with_label(pair, tmp_path):
    img, lab, hu, label = pair
    ct = read_volume_file(img)
    assert ct.hu.shape == hu.shape and ct.spacing == SPACING and ct.series_uid == "case7"
    out = prepare_volumes(VolumeConfig(out=tmp_path / "ds", volumes=[img], labels=[lab], size=128, spacing_mm=2.0,
                                       negatives=1.0, split_fractions=(1.0, 0.0, 0.0)))
    ds = SliceDataset(out)
    lesion_slices = int(label.reshape(len(label), -1).any(1).sum())
    pos = [i for i, r in enumerate(ds.records) if r.has_nodule]
    assert len(pos) == lesion_slices and len(ds) > len(pos)  # every lesion slice + negatives
    assert ds.meta["labelled"] and ds.meta["n_nodules"] == 1 and ds.meta["source"] == "volume"
    for i in pos:
        m = ds.masks[i]
        # the nodule sits in the patient's LEFT lung: image right half, inside the lung
        cols = np.nonzero(m == MaskClass.NODULE)[1]
        assert cols.mean() > 64 and (m == MaskClass.LEFT_LUNG).any() and (m == MaskClass.RIGHT_LUNG).any()
    assert {r.patient for r in ds.records} == {"case7"} and {r.split for r in ds.records} == {"train"}
    assert all(r.spacing_mm == (2.0, 2.0) and r.labelled for r in ds.records)


def test_a_lung_mask_given_as_label_is_refused(tmp_path, capsys):
    """A lung (or body, organ) mask passed as --label would make whole lungs "nodules": refused by size,
    naming the file, with nothing written; the volume's own lesion label passes the same check."""
    from nodulesynth.data.volumes import check_lesion_label
    from nodulesynth.masks.semantic import semantic_mask

    img, lesion = DATA / "pyradiomics-lung/lung1_image.nrrd", DATA / "pyradiomics-lung/lung1_label.nrrd"
    if not img.is_file():
        pytest.skip(f"real volume not found at {img}")
    ref = sitk.ReadImage(str(img))
    hu, sp = sitk.GetArrayFromImage(ref), ref.GetSpacing()[::-1]
    lungs = np.stack([np.isin(semantic_mask(h, sp[1:]), (MaskClass.LEFT_LUNG, MaskClass.RIGHT_LUNG)) for h in hu])
    bad = sitk.GetImageFromArray(lungs.astype(np.uint8))
    bad.CopyInformation(ref)
    sitk.WriteImage(bad, str(tmp_path / "lung1_lungs.nrrd"))
    out = tmp_path / "ds"
    assert main(["prepare", "--volume", str(img), "--label", str(tmp_path / "lung1_lungs.nrrd"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "lung1_lungs.nrrd: a labelled region spans" in err and "not a lung, body or organ mask" in err
    assert not out.exists()
    check_lesion_label(sitk.GetArrayFromImage(sitk.ReadImage(str(lesion))) != 0, sp, lesion)  # the real lesion passes


def test_negatives_never_call_bowel_gas_lung(tmp_path):
    """A labelled volume whose lower slices show the abdomen: its nodule-free slices are drawn from the
    whole volume, and a slice of colon gas must not pass as a slice with 1000 mm² of lung."""
    from conftest import chest_over_abdomen

    hu, gas = chest_over_abdomen()
    label = np.zeros(hu.shape, np.uint8)
    label[40:43, 60:64, 84:88] = 1  # a nodule in the patient's left lung
    img, lab = _write(tmp_path / "abd_image.nii.gz", hu), _write(tmp_path / "abd_label.nii.gz", label)
    out = prepare_volumes(VolumeConfig(out=tmp_path / "ds", volumes=[img], labels=[lab], size=128, spacing_mm=2.0,
                                       negatives=10.0, split_fractions=(1.0, 0.0, 0.0)))
    ds = SliceDataset(out)
    assert len(ds) > 3
    for i in range(len(ds)):
        lung = np.isin(np.asarray(ds.masks[i]), (MaskClass.LEFT_LUNG, MaskClass.RIGHT_LUNG))
        assert np.median(np.asarray(ds.images[i])[lung]) > -960  # parenchyma, never gas
    assert all(r.slice_index >= 25 for r in ds.records)  # the abdominal slices hold no lung


def test_unlabelled_volume_every_k(pair, tmp_path):
    img = pair[0]
    assert main(["prepare", "--volume", str(img), "--out", str(tmp_path / "a"), *FAST, "--every-k", "1"]) == 0
    assert main(["prepare", "--volume", str(img), "--out", str(tmp_path / "b"), *FAST, "--every-k", "4"]) == 0
    a, b = SliceDataset(tmp_path / "a"), SliceDataset(tmp_path / "b")
    assert not a.meta["labelled"] and not any(r.labelled or r.has_nodule for r in a.records)
    assert len(a) == 20  # every slice of the phantom passes through both lungs
    assert [r.slice_index for r in b.records] == [0, 4, 8, 12, 16]
    assert not (a.masks[:] == MaskClass.NODULE).any()  # unlabelled: no nodule class at all


# ------------------------------------------------------------------ DICOM


def write_dicom(path: Path, pixels: np.ndarray, series: str, patient: str, z: float, modality: str = "CT",
                spacing: float = 2.0) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.SeriesInstanceUID = modality, patient, series
    ds.StudyInstanceUID = generate_uid()
    ds.ImagePositionPatient = [ORIGIN[2], ORIGIN[1], z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [spacing, spacing]
    ds.SliceThickness = 2.5
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = (pixels.astype(np.int32) + 1024).astype(np.int16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def dicom_tree(tmp_path_factory):
    """Two series of two patients mixed in one folder, a lone slice elsewhere, an MR file, a README."""
    root = tmp_path_factory.mktemp("dicom")
    hu = synth_chest(seed=2, nodule=False).hu
    zs = [ORIGIN[0] + k * SPACING[0] for k in range(hu.shape[0])]
    for k in (0, 1, 2, 3):  # series A, written out of order on purpose
        write_dicom(root / "mixed" / f"a{(k * 3) % 4}.dcm", hu[k + 5], "1.2.3.1", "PAT-A", zs[k + 5])
    for k in (0, 1, 2):
        write_dicom(root / "mixed" / f"b{k}.dcm", hu[k + 10], "1.2.3.2", "PAT-B", zs[k + 10])
    write_dicom(root / "lone" / "x" / "one.dcm", hu[8], "1.2.3.3", "PAT-C", zs[8])
    write_dicom(root / "mr" / "mr.dcm", hu[8], "1.2.3.4", "PAT-C", zs[8], modality="MR")
    (root / "README.txt").write_text("not DICOM")
    return root, hu, zs


def test_dicom_tree_groups_by_series(dicom_tree):
    root, hu, zs = dicom_tree
    tree = scan_dicom_tree(root)
    assert [(v.series_uid, len(v.slices)) for v in tree.volumes] == [("1.2.3.1", 4), ("1.2.3.2", 3), ("1.2.3.3", 1)]
    assert dict(tree.skipped) == {"not CT (Modality=MR)": 1, "not a DICOM file": 1}
    a = read_dicom_volume(tree.volumes[0])
    assert np.array_equal(a.hu, hu[5:9]) and a.spacing == SPACING  # sorted along z, HU restored
    lone = read_dicom_volume(tree.volumes[2])
    assert lone.shape == (1, 128, 128) and lone.spacing[0] == 2.5  # thickness stands in for z spacing
    assert np.allclose(lone.origin, (zs[8], ORIGIN[1], ORIGIN[2]))


def test_prepare_dicom_tree(dicom_tree, tmp_path):
    root = dicom_tree[0]
    assert main(["prepare", "--dicom", str(root), "--out", str(tmp_path / "ds"), *FAST,
                 "--split-fractions", "0.34,0.33,0.33", "--split-seed", "3"]) == 0
    ds = SliceDataset(tmp_path / "ds")
    assert len(ds) == 8 and ds.meta["n_patients"] == 3 and not ds.meta["labelled"]
    assert ds.meta["scans"]["files_skipped"] == {"not CT (Modality=MR)": 1, "not a DICOM file": 1}
    assert sorted(ds.meta["split"]["patients"].values()) == [1, 1, 1]
    check_disjoint(ds.records)
    assert {r.patient for r in ds.records} == {"PAT-A", "PAT-B", "PAT-C"}


def test_dicom_bad_input(dicom_tree, tmp_path, capsys):
    root = dicom_tree[0]
    out = tmp_path / "ds"
    assert main(["prepare", "--dicom", str(root / "mr" / "mr.dcm"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "mr.dcm" in err and "not CT" in err and len(err.strip().splitlines()) == 1
    assert main(["prepare", "--dicom", str(root / "mr"), "--out", str(out)]) == 2
    assert "no CT image slices" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".ds*"))


# ------------------------------------------------------------------ MSD and bad volumes


def test_msd_root(pair, tmp_path):
    _, _, hu, label = pair
    root = tmp_path / "Task06_Lung"
    _write(root / "imagesTr" / "lung_001.nii.gz", hu)
    _write(root / "labelsTr" / "lung_001.nii.gz", label)
    (root / "imagesTr" / "._lung_001.nii.gz").write_bytes(b"macOS junk")  # ignored, as in the real tarball
    assert main(["prepare", "--msd", str(root), "--out", str(tmp_path / "ds"), *FAST, "--negatives", "0"]) == 0
    ds = SliceDataset(tmp_path / "ds")
    assert ds.meta["source"] == "msd" and len(ds) == int(label.reshape(len(label), -1).any(1).sum())
    assert all(r.has_nodule and r.patient == "lung_001" for r in ds.records)
    (root / "labelsTr" / "lung_001.nii.gz").unlink()
    with pytest.raises(NoduleSynthError, match="lung_001.nii.gz: no label"):
        prepare_volumes(VolumeConfig(out=tmp_path / "ds2", msd=root))
    assert not (tmp_path / "ds2").exists()


def test_bad_volumes(pair, tmp_path, capsys):
    img, lab, hu, label = pair
    out = tmp_path / "ds"
    small = _write(tmp_path / "small_label.nrrd", label[:, :64])
    assert main(["prepare", "--volume", str(img), "--label", str(small), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "small_label.nrrd" in err and "size" in err and len(err.strip().splitlines()) == 1
    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(hu[5]), str(flat))
    assert main(["prepare", "--volume", str(flat), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "flat.nii.gz" in err and "3-D" in err
    assert main(["prepare", "--volume", str(img), "--label", str(lab), "--label", str(lab), "--out", str(out)]) == 2
    assert "--label" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".ds*"))


# ------------------------------------------------------------------ the real data in ../shared/data


def test_real_tcga_tree():
    root = DATA / "tcga-chest-slices"
    if not root.is_dir():
        pytest.skip(f"{root} absent (real TCGA slices are only on the project's machines)")
    tree = scan_dicom_tree(root)
    s = tree.summary()
    # 81 files, 5 of them the same slice exported twice; README.md is not DICOM
    assert s["patients"] == 42 and s["slices"] == 76 and s["volumes"] == 76
    assert s["files_skipped"] == {"not a DICOM file": 1, "duplicate slice (same image stored twice)": 5}
    v = read_dicom_volume(tree.volumes[0])
    assert v.shape == (1, 512, 512) and -1100 < v.hu.min() < -900 and v.hu.max() > 500


def test_real_pyradiomics_pair():
    d = DATA / "pyradiomics-lung"
    if not d.is_dir():
        pytest.skip(f"{d} absent (real pyradiomics volumes are only on the project's machines)")
    from nodulesynth.data.volumes import VolumeJob, check_pair

    check_pair(d / "lung1_image.nrrd", d / "lung1_label.nrrd")
    ct, label = VolumeJob("lung1", "volume", d / "lung1_image.nrrd", "lung1", d / "lung1_label.nrrd").load()
    assert ct.shape == (48, 512, 512) and abs(ct.spacing[1] - 0.570) < 1e-3
    assert int(label.sum()) == 837 and int(label.reshape(48, -1).any(1).sum()) == 3  # README: 837 voxels, 3 slices


def test_dicom_prepare_resumes(dicom_tree, tmp_path, monkeypatch, interrupt_second_job):
    """Interrupted after the first volume: nothing under --out, the finished volume's shard is
    reused by the rerun (only the other two are processed again)."""
    from nodulesynth.data import volumes

    real, calls = interrupt_second_job(volumes, "process_volume")
    cfg = VolumeConfig(out=tmp_path / "ds", dicom=dicom_tree[0], size=128, spacing_mm=2.0)
    with pytest.raises(KeyboardInterrupt):
        prepare_volumes(cfg)
    assert not (tmp_path / "ds").exists()
    first = calls[0]
    calls.clear()
    monkeypatch.setattr(volumes, "process_volume", lambda job, cfg: (calls.append(job.key), real(job, cfg))[1])
    ds = SliceDataset(prepare_volumes(cfg))
    assert len(ds) == 8 and first not in calls and len(calls) == 2
    assert not (tmp_path / ".ds.shards").exists()
