"""Bad input never becomes labelled data, and faults never lose or half-write data (issue 14):
resume keyed on the inputs, disk full, implausible CT volumes, broken DICOM series, corrupt
annotations."""
from __future__ import annotations

import errno
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import NODULE_XYZ, UID_FLIPPED, UID_PLAIN, synth_chest, write_mhd
from nodulesynth.cli import main
from nodulesynth.data import prepare as prep
from nodulesynth.data.ct import dicom_series_parts, load_ct
from nodulesynth.data.lidc import lidc_series_uid
from nodulesynth.data.luna16 import read_annotations
from nodulesynth.data.prepare import PrepareConfig, prepare
from nodulesynth.data.slices import SliceDataset
from nodulesynth.errors import NoduleSynthError

HEADER = "seriesuid,coordX,coordY,coordZ,diameter_mm"


def _copy(luna16_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "luna"
    shutil.copytree(luna16_root, root)
    return root


def _small(out: Path, root: Path) -> PrepareConfig:
    return PrepareConfig(out=out, luna16=root, size=64, spacing_mm=4.0, negatives=0.0)


# ---------------------------------------------------------------- resume keyed on inputs


def test_resume_after_editing_annotations_equals_a_fresh_run(luna16_root, tmp_path, monkeypatch, interrupt_second_job):
    root = _copy(luna16_root, tmp_path)
    cfg = _small(tmp_path / "ds", root)
    real, _ = interrupt_second_job(prep, "process_scan")  # Ctrl-C while the second scan is processed
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg)
    monkeypatch.setattr(prep, "process_scan", real)
    shards = tmp_path / ".ds.shards"
    assert (shards / f"{UID_PLAIN}.json").is_file()  # the first scan's shard is finished
    (shards / f"{UID_FLIPPED}.images.npy").write_bytes(b"half")  # and a half-written one
    # the user now fixes the first scan's annotation (smaller nodule → fewer slices)
    (root / "annotations.csv").write_text(
        f"{HEADER}\n{UID_PLAIN},{NODULE_XYZ[0]},{NODULE_XYZ[1]},{NODULE_XYZ[2]},6.0\n"
        f"{UID_FLIPPED},{NODULE_XYZ[0]},{NODULE_XYZ[1]},{NODULE_XYZ[2]},12.0\n")
    resumed = SliceDataset(prepare(cfg))
    fresh = SliceDataset(prepare(_small(tmp_path / "fresh", root)))
    assert len(resumed) == len(fresh) < 10  # 10 slices before the edit
    np.testing.assert_array_equal(resumed.images, fresh.images)
    np.testing.assert_array_equal(resumed.masks, fresh.masks)
    assert [r.to_json() for r in resumed.records] == [r.to_json() for r in fresh.records]


def test_input_stamp_follows_the_scan_files(luna16_root, tmp_path):
    root = _copy(luna16_root, tmp_path)
    jobs, _ = prep._jobs(_small(tmp_path / "o", root))
    job = next(j for j in jobs if j.key == UID_PLAIN)
    before = prep.input_stamp(job)
    raw = root / "subset0" / f"{UID_PLAIN}.raw"
    raw.write_bytes(raw.read_bytes())  # same bytes, new mtime: re-exported, maybe changed
    import os

    os.utime(raw, ns=(raw.stat().st_atime_ns, raw.stat().st_mtime_ns + 10**9))
    assert prep.input_stamp(job) != before
    seg_before = prep.input_stamp(job)
    (root / "seg-lungs-LUNA16" / f"{UID_PLAIN}.raw").write_bytes(b"")
    assert prep.input_stamp(job) != seg_before


# ---------------------------------------------------------------- disk full


def _enospc_on_masks(monkeypatch):
    real = prep.atomic_file

    def atomic_file(path, mode="wb"):
        if str(path).endswith(".masks.npy"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, mode)

    monkeypatch.setattr(prep, "atomic_file", atomic_file)


def _little_space(monkeypatch, free=1000):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - free, free))


def test_prepare_disk_full_one_line_no_half_shard(luna16_root, tmp_path, monkeypatch, capsys):
    root = _copy(luna16_root, tmp_path)
    _enospc_on_masks(monkeypatch)
    _little_space(monkeypatch)
    args = ["prepare", "--luna16", str(root), "--out", str(tmp_path / "ds"), "--size", "64", "--spacing", "4"]
    assert main(args) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and "disk full" in last and ".masks.npy" in last and "more needed" in last, err
    assert not (tmp_path / "ds").exists()
    assert not list((tmp_path / ".ds.shards").glob(f"{UID_PLAIN}.*"))  # no images without masks
    monkeypatch.undo()
    _little_space(monkeypatch)  # shards fit, the dataset would not: refused before writing it
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "disk full" in err and "more needed" in err and not (tmp_path / "ds").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    import torch

    from nodulesynth.models.pix2pix import TranslatorConfig
    from nodulesynth.models.stylegan import MaskGANConfig
    from nodulesynth.models.tsgan import TSGAN

    torch.manual_seed(4)
    model = TSGAN.from_configs(
        MaskGANConfig(resolution=16, z_dim=32, w_dim=32, mapping_layers=2, fmap_base=256, fmap_max=32),
        TranslatorConfig(ngf=8, ndf=8, num_downs=6, dwmh_depth=3, dwmh_window=4, dwmh_heads=2), image_size=64)
    return str(model.save_pretrained(tmp_path_factory.mktemp("w") / "tiny"))


def test_generate_disk_full_one_line_nothing_left(tiny_weights, tmp_path, monkeypatch, capsys):
    from nodulesynth import io

    real = io.atomic_file

    def atomic_file(path, mode="wb"):  # every write_json (annotations, manifest) runs after the images
        if str(path).endswith(".json") and ".tmp-" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, mode)

    monkeypatch.setattr(io, "atomic_file", atomic_file)
    _little_space(monkeypatch)
    rc = main(["generate", "--n", "2", "--out", str(tmp_path / "out"), "--weights", tiny_weights, "--device", "cpu"])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert rc == 2 and "Traceback" not in err and ".json: disk full" in last and "more needed" in last, err
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- implausible CT volumes


def _mhd(tmp_path: Path, arr: np.ndarray, name="scan") -> Path:
    path = tmp_path / f"{name}.mhd"
    write_mhd(path, arr)
    return path


@pytest.mark.parametrize("make, message", [
    (lambda hu: np.where(np.arange(hu.size).reshape(hu.shape) % 97 == 0, np.nan, hu).astype(np.float32),
     "NaN or infinite"),
    (lambda hu: np.where(hu > 0, np.inf, hu).astype(np.float32), "NaN or infinite"),
    (lambda hu: np.full(hu.shape, np.nan, np.float32), "every voxel is NaN"),
    (lambda hu: np.clip(hu + 1024, 0, 255).astype(np.uint8), "8-bit"),  # MET_UCHAR
    (lambda hu: (hu.astype(np.int32) + 1024).astype(np.uint16), "no air"),  # raw values, no rescale
    (lambda hu: np.full(hu.shape, -1000, np.int16), "no soft tissue"),  # pure air
])
def test_implausible_volumes_are_refused(tmp_path, make, message):
    path = _mhd(tmp_path, make(synth_chest(0).hu.astype(np.float32)))
    with pytest.raises(NoduleSynthError, match=message) as e:
        load_ct(path)
    assert str(path) in str(e.value)


def test_pure_air_with_lung_seg_is_not_prepared(luna16_root, tmp_path, capsys):
    root = _copy(luna16_root, tmp_path)
    write_mhd(root / "subset0" / f"{UID_PLAIN}.mhd", np.full(synth_chest(0).hu.shape, -1024, np.int16))
    assert main(["prepare", "--luna16", str(root), "--out", str(tmp_path / "ds"), "--size", "64", "--spacing", "4"]) == 2
    assert f"{UID_PLAIN}.mhd: no soft tissue" in capsys.readouterr().err
    assert not (tmp_path / "ds").exists()


def test_nodule_slices_need_lungs(luna16_root, tmp_path, capsys):
    """A CT whose lungs are solid tissue (no seg file): the annotated nodule has no lung around it."""
    root = _copy(luna16_root, tmp_path)
    chest = synth_chest(0)
    hu = np.where(chest.seg > 0, 40, chest.hu).astype(np.int16)
    write_mhd(root / "subset0" / f"{UID_FLIPPED}.mhd", hu)
    assert main(["prepare", "--luna16", str(root), "--out", str(tmp_path / "ds"), "--size", "64", "--spacing", "4"]) == 2
    err = capsys.readouterr().err
    assert f"{UID_FLIPPED}.mhd: no lung found on any of its" in err, err


def test_mhd_raw_size_must_match_dimsize(tmp_path):
    path = _mhd(tmp_path, synth_chest(0).hu)
    raw = path.with_suffix(".raw")
    header = path.read_text()
    shape = synth_chest(0).hu.shape
    path.write_text(header.replace(f"DimSize = {shape[2]} {shape[1]} {shape[0]}",
                                   f"DimSize = {shape[2]} {shape[1]} {shape[0] - 5}"))
    with pytest.raises(NoduleSynthError, match=r"scan.raw holds [\d,]+ bytes but DimSize"):
        load_ct(path)  # a .raw larger than the header says: today read silently as 15 slices
    path.write_text(header)
    raw.write_bytes(raw.read_bytes()[:-1000])
    with pytest.raises(NoduleSynthError, match="truncated data or a wrong header"):
        load_ct(path)  # ITK says "No such file or directory"
    path.write_text(header.replace("MET_SHORT", "MET_FLOAT16"))
    with pytest.raises(NoduleSynthError, match="unsupported ElementType 'MET_FLOAT16'"):
        load_ct(path)


# ---------------------------------------------------------------- DICOM series with a missing slice


def _series(folder: Path, n=8, step=2.5, uid="1.2.826.0.1.3680043.9.9999.77") -> Path:
    folder.mkdir(parents=True)
    chest = synth_chest(0).hu[:n]
    for k in range(n):
        img = sitk.GetImageFromArray(chest[k])
        img.SetSpacing((2.0, 2.0))
        for tag, val in (("0008|0060", "CT"), ("0020|000e", uid), ("0020|000d", uid + ".1"),
                         ("0020|0032", f"-127\\-127\\{step * k}"), ("0020|0037", "1\\0\\0\\0\\1\\0"),
                         ("0020|0013", str(k + 1)), ("0018|0050", str(step)),
                         ("0008|0016", "1.2.840.10008.5.1.4.1.1.2"), ("0008|0018", f"{uid}.{k + 1}")):
            img.SetMetaData(tag, val)
        w = sitk.ImageFileWriter()
        w.KeepOriginalImageUIDOn()
        w.SetFileName(str(folder / f"{k:03d}.dcm"))
        w.Execute(img)
    return folder


def test_dicom_series_with_a_missing_slice_is_refused_or_split(tmp_path):
    folder = _series(tmp_path / "s")
    assert load_ct(folder).spacing[0] == pytest.approx(2.5)
    (folder / "003.dcm").unlink()  # a slice lost in transfer
    with pytest.raises(NoduleSynthError, match=r"gap of 5.00 mm .*002.dcm → 004.dcm"):
        load_ct(folder)  # today: 7 slices at an averaged 2.86 mm, z off by up to 1.25 mm
    uid, parts = dicom_series_parts(folder, split_at_gaps=True)
    assert [len(p) for p in parts] == [3, 4]
    for part, z0 in zip(parts, (0.0, 10.0)):
        ct = load_ct(folder, files=part)
        assert ct.spacing[0] == pytest.approx(2.5) and ct.slice_z_mm()[0] == pytest.approx(z0)


def test_dicom_series_with_an_unreadable_slice_is_refused(tmp_path):
    folder = _series(tmp_path / "s")
    data = (folder / "003.dcm").read_bytes()
    (folder / "003.dcm").write_bytes(data[:200])  # truncated in transfer
    with pytest.raises(NoduleSynthError, match="003.dcm"):
        load_ct(folder)


def test_prepare_lidc_split_option(lidc_0001, tmp_path, capsys):
    """The real LIDC-IDRI-0001 series with one slice missing: refused, or prepared in two parts."""
    series, xml = lidc_0001
    root = tmp_path / "lidc" / "LIDC-IDRI-0001"
    root.mkdir(parents=True)
    files = sorted(series.glob("*.dcm"), key=lambda p: float(p.stem))
    assert len(files) == 16
    for f in [*files[:8], *files[9:]]:  # links to the read-only originals, one slice missing
        (root / f.name).symlink_to(f)
    (root / xml.name).symlink_to(xml)
    args = ["prepare", "--lidc", str(tmp_path / "lidc"), "--size", "64", "--spacing", "6", "--negatives", "0"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    assert "refusing to resample over it" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "b"), "--split-series-at-gaps"]) == 0
    ds = SliceDataset(tmp_path / "b")
    assert ds.meta["scans"]["scans_prepared"] == 2 and len(ds) > 0


# ---------------------------------------------------------------- annotations


def test_corrupt_lidc_xml_is_named(tmp_path, lidc_0001):
    _, xml = lidc_0001
    bad = tmp_path / "069.xml"
    bad.write_bytes(xml.read_bytes()[:5000])  # truncated
    with pytest.raises(NoduleSynthError, match="069.xml: corrupt or truncated XML"):
        lidc_series_uid(bad)
    other = tmp_path / "cxr.xml"
    other.write_text("<IdriReadMessage/>")
    assert lidc_series_uid(other) is None  # well-formed XML of another kind is simply not ours


def test_truncated_lidc_xml_in_a_tree_stops_prepare(tmp_path, capsys):
    folder = _series(tmp_path / "lidc" / "p1")
    (folder / "069.xml").write_text("<?xml version='1.0'?><LidcReadMessage><ResponseHeader>")
    assert main(["prepare", "--lidc", str(tmp_path / "lidc"), "--out", str(tmp_path / "o")]) == 2
    assert "069.xml: corrupt or truncated XML" in capsys.readouterr().err


def test_implausible_diameter_and_encodings(tmp_path, caplog):
    csv = tmp_path / "annotations.csv"
    csv.write_text(f"{HEADER}\n1.2.3,1,2,3,5000\n")
    with pytest.raises(NoduleSynthError, match=r"annotations.csv:2: diameter_mm 5000 is not a plausible nodule"):
        read_annotations(csv)
    csv.write_bytes(("\ufeff" + f"{HEADER}\n1.2.3,1,2,3,5\n").encode("utf-8"))  # Excel's UTF-8 BOM
    assert read_annotations(csv)["1.2.3"][0].diameter_mm == 5
    csv.write_bytes(f"{HEADER},note\n1.2.3,1,2,3,5,Ä nodule\n".encode("latin-1"))
    assert read_annotations(csv)["1.2.3"][0].center_xyz_mm == (1, 2, 3)


def test_nodule_outside_its_scan_is_warned_about(luna16_root, tmp_path, caplog):
    root = _copy(luna16_root, tmp_path)
    (root / "annotations.csv").write_text(
        f"{HEADER}\n{UID_PLAIN},{NODULE_XYZ[0]},{NODULE_XYZ[1]},{NODULE_XYZ[2]},12\n{UID_PLAIN},0,0,900,8\n")
    with caplog.at_level("WARNING", logger="nodulesynth.data.prepare"):
        prepare(_small(tmp_path / "ds", root))
    assert any("(0.0, 0.0, 900.0) mm (8.0 mm) has its centre outside the scan" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- unlabelled real data is not mixed in


def test_unlabelled_real_slices_are_never_mixed_into_labelled_data(tiny_weights, tmp_path, capsys):
    """A set prepared from an unlabelled source (DICOM, a volume without a label) has empty boxes that
    mean "not annotated": mixing it in (Dataset real=, generate --real) is refused with one line."""
    from nodulesynth import SyntheticNoduleDataset
    from nodulesynth.data.slices import SliceRecord, write_slice_dataset

    recs = [SliceRecord("s", 0.0, k, (0.8, 0.8), np.zeros((0, 4), np.float32), "dicom", False, patient=f"p{k}",
                        split="train", labelled=False) for k in range(2)]
    ds = write_slice_dataset(tmp_path / "unlabelled", np.full((2, 64, 64), -800, np.int16),
                             np.full((2, 64, 64), 2, np.uint8), recs)
    for real in (ds, SliceDataset(ds)):
        with pytest.raises(NoduleSynthError, match="labelled=false"):
            SyntheticNoduleDataset(weights=tiny_weights, real=real, ratio=1.0, device="cpu")
    rc = main(["generate", "--real", str(ds), "--ratio", "1", "--out", str(tmp_path / "out"), "--weights", tiny_weights,
               "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "labelled=false" in err and str(ds) in err
    assert not (tmp_path / "out").exists()
