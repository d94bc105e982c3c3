"""``prepare`` on CT in general, not only on the sample: variants of the real volumes that hold the
same physical image (other storage order, file format, matrix, pixel encoding, scanner padding,
noise, kernel) must give the same anatomy, with the patient's left lung still the left one; what
cannot be supported (a missing slice) must be one clear error that writes nothing.

Every variant is rebuilt on the fly from a few slices of ../shared/data (skipped when absent)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from nodulesynth.cli import main
from nodulesynth.data.ct import load_ct
from nodulesynth.data.dicom_tree import read_dicom_volume, scan_dicom_tree
from nodulesynth.data.lidc import nodules_from_lidc
from nodulesynth.data.slices import SliceDataset
from nodulesynth.errors import NoduleSynthError
from nodulesynth.masks.classes import MaskClass

DATA = (Path(__file__).resolve().parents[1] / "../shared/data").resolve()
LUNG1 = DATA / "pyradiomics-lung"
LESION_SLICES = slice(31, 36)  # lung1's lesion lies on slices 32-34 (5 mm apart): a 5-slice volume around it
LEFT, RIGHT, NODULE = int(MaskClass.LEFT_LUNG), int(MaskClass.RIGHT_LUNG), int(MaskClass.NODULE)


# ------------------------------------------------------------------ helpers


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def _grid(path: Path) -> tuple[float, float, float, float]:
    """World (y_min, x_min) of the canonical in-plane grid and its (dy, dx), read from the file
    header (SimpleITK) or the DICOM tags, independently of nodulesynth's geometry code."""
    if path.is_dir() or path.suffix == ".dcm":
        folder = path if path.is_dir() else path.parent
        pts, pos = [], []
        for f in folder.glob("*.dcm"):
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            ipp = np.array([float(v) for v in ds.ImagePositionPatient])
            iop = np.array([float(v) for v in ds.ImageOrientationPatient])
            row, col = iop[:3], iop[3:]
            dy, dx = (float(v) for v in ds.PixelSpacing)
            pos.append(float(ipp @ np.cross(row, col)))
            pts += [ipp + row * dx * a + col * dy * b for a in (0, ds.Columns - 1) for b in (0, ds.Rows - 1)]
        step = float(np.median(np.diff(sorted(pos))))
        spacing = [dx if abs(row[w]) > 0.5 else dy if abs(col[w]) > 0.5 else step for w in (1, 0)]
    else:
        r = sitk.ImageFileReader()
        r.SetFileName(str(path))
        r.ReadImageInformation()
        img = sitk.Image([1, 1, 1], sitk.sitkUInt8)
        img.SetSpacing(r.GetSpacing())
        img.SetOrigin(r.GetOrigin())
        img.SetDirection(r.GetDirection())
        n = r.GetSize()
        pts = [img.TransformContinuousIndexToPhysicalPoint([a, b, c])
               for a in (0, n[0] - 1) for b in (0, n[1] - 1) for c in (0, n[2] - 1)]
        d = np.abs(np.array(r.GetDirection()).reshape(3, 3))
        spacing = [r.GetSpacing()[int(np.argmax(d[w]))] for w in (1, 0)]
    pts = np.asarray(pts)
    return float(pts[:, 1].min()), float(pts[:, 0].min()), float(spacing[0]), float(spacing[1])


def _pairs(ref: Path, var: Path):
    """(record, reference mask, variant mask moved onto the reference's world grid, variant image)
    for every reference slice the variant also kept (same patient, same world z)."""
    R, X = SliceDataset(ref), SliceDataset(var)
    grids: dict[str, tuple] = {}

    def centre(rec):
        g = grids.setdefault(rec.scan_path, _grid(Path(rec.scan_path)))
        return g[0] + rec.crop_center_yx[0] * g[2], g[1] + rec.crop_center_yx[1] * g[3]

    out = []
    for i, rr in enumerate(R.records):
        js = [j for j, rx in enumerate(X.records) if rx.patient == rr.patient and abs(rx.z_mm - rr.z_mm) < 0.5]
        if not js:
            continue
        rx = X.records[js[0]]
        (yr, xr), (yv, xv), t = centre(rr), centre(rx), rr.spacing_mm[0]
        moved = ndi.shift(np.asarray(X.masks[js[0]]), ((yv - yr) / t, (xv - xr) / t), order=0, cval=0)
        out.append((rr, np.asarray(R.masks[i]), moved, np.asarray(X.images[js[0]]), np.asarray(X.masks[js[0]])))
    return R, X, out


def _assert_same_anatomy(ref: Path, var: Path, min_dice: float, lesion_tol: float = 0.1) -> None:
    R, X, pairs = _pairs(ref, var)
    assert len(X) == len(R) == len(pairs), f"{var.name}: kept {len(X)} slices, {len(pairs)} match the {len(R)} reference slices"
    lesion_ref = lesion_var = 0
    for rec, mr, mv, img, mask in pairs:
        for cls in (LEFT, RIGHT):
            assert _dice(mr == cls, mv == cls) >= min_dice, (var.name, rec.z_mm, MaskClass(cls).name)
        assert _dice(mr == LEFT, mv == RIGHT) < 0.05, (var.name, rec.z_mm, "lungs swapped")
        cols = np.nonzero(mask == LEFT)[1], np.nonzero(mask == RIGHT)[1]
        assert cols[0].mean() > cols[1].mean(), (var.name, rec.z_mm, "patient's left lung must lie on image right")
        lung = np.isin(mask, (LEFT, RIGHT))
        assert abs(float(np.median(img[lung])) + 850) <= 50, (var.name, rec.z_mm, float(np.median(img[lung])))
        assert tuple(rec.spacing_mm) == (0.8, 0.8)
        lesion_ref += int((mr == NODULE).sum())
        lesion_var += int((mv == NODULE).sum())
    assert abs(lesion_var - lesion_ref) <= lesion_tol * max(lesion_ref, 1), (var.name, lesion_ref, lesion_var)
    if lesion_ref:
        assert min(_dice(p[1] == NODULE, p[2] == NODULE) for p in pairs if (p[1] == NODULE).any()) >= min_dice - 0.1


# ------------------------------------------------------------------ volume files (lung1, NRRD + label)


@pytest.fixture(scope="module")
def lung1(tmp_path_factory):
    """A 5-slice crop of lung1 around its lesion (image + label, NRRD) and its prepared reference."""
    if not (LUNG1 / "lung1_image.nrrd").is_file():
        pytest.skip(f"{LUNG1} absent (real pyradiomics volumes are only on the project's machines)")
    root = tmp_path_factory.mktemp("lung1")
    imgs = [sitk.ReadImage(str(LUNG1 / f"lung1_{k}.nrrd"))[:, :, LESION_SLICES] for k in ("image", "label")]
    ref = _write_volume(root / "orig", imgs, lambda a, img, lab: (a, _geometry(img)))
    return root, imgs, _prepare_volume(ref, root / "out_orig")


def _geometry(img: sitk.Image) -> dict:
    return {"spacing": np.array(img.GetSpacing()), "origin": np.array(img.GetOrigin()),
            "direction": np.array(img.GetDirection()).reshape(3, 3)}


def _write_volume(folder: Path, imgs, change, ext: str = ".nrrd") -> Path:
    """``change(array zyx, image, is_label) -> (array, geometry)`` applied to image and label."""
    folder.mkdir(parents=True, exist_ok=True)
    for img, kind in zip(imgs, ("image", "label")):
        arr, g = change(sitk.GetArrayFromImage(img), img, kind == "label")
        out = sitk.GetImageFromArray(np.ascontiguousarray(arr))
        out.SetSpacing([float(v) for v in g["spacing"]])
        out.SetOrigin([float(v) for v in g["origin"]])
        out.SetDirection([float(v) for v in g["direction"].ravel()])
        sitk.WriteImage(out, str(folder / f"lung1_{kind}{ext}"))
    return folder


def _prepare_volume(folder: Path, out: Path) -> Path:
    img, lab = sorted(folder.glob("lung1_image.*"))[0], sorted(folder.glob("lung1_label.*"))[0]
    assert main(["prepare", "--volume", str(img), "--label", str(lab), "--negatives", "0", "--out", str(out)]) == 0
    return out


def _flip(axes):
    """Voxel array flipped along numpy ``axes`` with the direction flipped to match: same world image."""

    def change(a, img, is_label):
        g = _geometry(img)
        n = img.GetSize()
        for ax in axes:
            i = 2 - ax  # SimpleITK index axis
            g["origin"] = g["origin"] + g["direction"][:, i] * g["spacing"][i] * (n[i] - 1)
            g["direction"][:, i] *= -1
            a = np.flip(a, axis=ax)
        return a, g

    return change


def _stored_yzx(a, img, is_label):
    """Stored as (y, z, x): coronal slices, the direction permuted to match."""
    g = _geometry(img)
    cols = [0, 2, 1]
    g["direction"], g["spacing"] = g["direction"][:, cols], g["spacing"][cols]
    return a.transpose(1, 0, 2), g


@pytest.mark.parametrize("name,change,ext", [
    ("nifti", lambda a, img, lab: (a, _geometry(img)), ".nii.gz"),
    ("flip_x", _flip([2]), ".nrrd"),
    ("flip_y", _flip([1]), ".nrrd"),
    ("flip_xy_nifti", _flip([1, 2]), ".nii.gz"),
    ("flip_z", _flip([0]), ".nrrd"),
    ("stored_yzx", _stored_yzx, ".nrrd"),
])
def test_volume_storage_keeps_anatomy_and_sides(lung1, name, change, ext):
    root, imgs, ref = lung1
    var = _prepare_volume(_write_volume(root / name, imgs, change, ext), root / f"out_{name}")
    _assert_same_anatomy(ref, var, min_dice=0.99, lesion_tol=0.0)


def _resample(spacing_xy):
    def change(a, img, is_label):
        sp = [spacing_xy[0], spacing_xy[1], img.GetSpacing()[2]]
        size = [int(round(img.GetSize()[i] * img.GetSpacing()[i] / sp[i])) for i in range(3)]
        r = sitk.Resample(img, size, sitk.Transform(), sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear,
                          img.GetOrigin(), sp, img.GetDirection(), 0 if is_label else -1024, img.GetPixelID())
        return sitk.GetArrayFromImage(r), _geometry(r)

    return change


def _padded(value):
    """Outside the reconstruction circle, the air gets the scanner's padding value (the patient stays inside)."""

    def change(a, img, is_label):
        if is_label:
            return a, _geometry(img)
        ny, nx = a.shape[1:]
        yy, xx = np.ogrid[:ny, :nx]
        outside = (yy - (ny - 1) / 2) ** 2 + (xx - (nx - 1) / 2) ** 2 > (min(nx, ny) / 2) ** 2
        a = a.astype(np.int16)
        for k in range(len(a)):
            patient = ndi.binary_fill_holes(ndi.binary_dilation(a[k] > -500, iterations=3))
            a[k][outside & ~patient] = value
        return a, _geometry(img)

    return change


def _noise(a, img, is_label):
    if is_label:
        return a, _geometry(img)
    rng = np.random.default_rng(0)
    return np.clip(np.rint(a + rng.normal(0, 60, a.shape)), -1024, 3071).astype(np.int16), _geometry(img)


def _soft_kernel(a, img, is_label):
    if is_label:
        return a, _geometry(img)
    return np.rint(ndi.gaussian_filter(a.astype(np.float32), (0, 1, 1))).astype(np.int16), _geometry(img)


@pytest.mark.parametrize("name,change,min_dice,lesion_tol", [
    ("aniso_0.6x0.75", _resample((0.6, 0.75)), 0.95, 0.15),
    ("matrix_256", _resample((0.5703125 * 2, 0.5703125 * 2)), 0.95, 0.15),
    ("matrix_1024", _resample((0.5703125 / 2, 0.5703125 / 2)), 0.95, 0.15),
    ("padding_-2048", _padded(-2048), 0.99, 0.0),
    ("padding_-3024", _padded(-3024), 0.99, 0.0),
    ("low_dose_sigma60", _noise, 0.95, 0.1),
    ("soft_kernel_sigma1px", _soft_kernel, 0.95, 0.1),
])
def test_volume_acquisition_variants(lung1, name, change, min_dice, lesion_tol):
    root, imgs, ref = lung1
    var = _prepare_volume(_write_volume(root / name, imgs, change), root / f"out_{name}")
    _assert_same_anatomy(ref, var, min_dice=min_dice, lesion_tol=lesion_tol)


def _small_field_of_view(pad: int, radius: int = 175):
    """A reconstruction circle (centre row 360, column 300 of lung1's 512² slices) that cuts the
    body all round and the lateral 0-15 % of the image-left lung; outside it, the scanner's padding."""

    def change(a, img, is_label):
        if is_label:
            return a, _geometry(img)
        yy, xx = np.ogrid[: a.shape[1], : a.shape[2]]
        a = a.astype(np.int16)
        a[:, (yy - 360) ** 2 + (xx - 300) ** 2 > radius**2] = pad
        return a, _geometry(img)

    return change


def _columns_from(c0: int):
    """The image starts at column c0 (a rectangular reconstruction that ends inside the patient):
    it cuts the body and the lateral ~5 % of the image-left lung on the lesion's slices."""

    def change(a, img, is_label):
        g = _geometry(img)
        g["origin"] = g["origin"] + g["direction"][:, 0] * g["spacing"][0] * c0
        return a[:, :, c0:], g

    return change


@pytest.mark.parametrize("name,change", [
    ("fov_3024", _small_field_of_view(-3024)),
    ("fov_1024", _small_field_of_view(-1024)),
    ("image_edge", _columns_from(112)),
])
def test_lung_cut_by_the_field_of_view_stays_lung(lung1, name, change):
    """A lung reaching past the field of view (or the image edge) is open to the padding, so hole
    filling never made it body and it was lost: the slice kept one lung or none. It must stay the
    same lung up to the cut, and the air the cut closes off stays background."""
    root, imgs, ref = lung1
    var = _prepare_volume(_write_volume(root / name, imgs, change), root / f"out_{name}")
    R, X, pairs = _pairs(ref, var)
    assert len(X) == len(R) == len(pairs)
    for rec, mr, mv, img, mask in pairs:
        for cls in (LEFT, RIGHT):
            kept = (mr == cls) & (mv > 0)  # the reference lung inside the field of view
            assert (mv == cls)[kept].mean() >= 0.97, (rec.z_mm, MaskClass(cls).name)
            assert (mr == cls)[mv == cls].mean() >= 0.97, (rec.z_mm, MaskClass(cls).name)
        assert ((mv > 0) & (mr == 0)).sum() <= 0.002 * (mr > 0).sum(), (rec.z_mm, "outside air became patient")
    assert sum(int((p[2] == NODULE).sum()) for p in pairs) >= 0.98 * sum(int((p[1] == NODULE).sum()) for p in pairs)


# ------------------------------------------------------------------ DICOM (LIDC-IDRI-0001 with its XML)

LIDC_Z = (-122.5, -112.5)  # five slices through the nodule of LIDC-IDRI-0001


def _copy_lidc(src_series: Path, xml: Path, dst: Path, change=None, xml_change=None, drop: float | None = None) -> Path:
    """LIDC-IDRI-0001's slices within LIDC_Z (+ its XML) under ``dst`` in the LIDC layout;
    ``change(ds, hu) -> file name | None`` rewrites a slice's pixels / tags."""
    series = dst / "LIDC-IDRI-0001" / src_series.parent.name / src_series.name
    series.mkdir(parents=True)
    for f in sorted(src_series.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        z = float(ds.ImagePositionPatient[2])
        if not LIDC_Z[0] <= z <= LIDC_Z[1] or z == drop:
            continue
        hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        name = change(ds, hu) if change else None
        ds.save_as(series / (name or f.name))
    text = xml.read_text()
    (series / xml.name).write_text(xml_change(text, ds.Rows, ds.Columns) if xml_change else text)
    return dst


def _store(ds, hu, slope: float = 1.0, intercept: float = -1024.0, signed: bool = True) -> None:
    stored = np.rint((np.clip(hu, -3024, 3071) - intercept) / slope)
    ds.PixelRepresentation = int(signed)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelData = (stored.astype(np.int16) if signed else np.clip(stored, 0, 65535).astype(np.uint16)).tobytes()
    ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
    if "PixelPaddingValue" in ds:
        del ds.PixelPaddingValue


def _unsigned(ds, hu):
    _store(ds, hu, 1.0, -1024.0, signed=False)


def _slope2(ds, hu):
    _store(ds, hu, 2.0, -1024.0)


def _flip_columns(ds, hu):
    ipp = [float(v) for v in ds.ImagePositionPatient]
    ds.ImagePositionPatient = [ipp[0] + float(ds.PixelSpacing[1]) * (ds.Columns - 1), ipp[1], ipp[2]]
    ds.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]
    _store(ds, hu[:, ::-1])


def _flip_xml_columns(text: str, rows: int, cols: int) -> str:
    import re

    return re.sub(r"<xCoord>(\d+)</xCoord>", lambda m: f"<xCoord>{cols - 1 - int(m.group(1))}</xCoord>", text)


def _reversed_order(ds, hu):
    z = float(ds.ImagePositionPatient[2])
    ds.InstanceNumber = int(round(1000 + z * 10))  # numbered from the head down; files named likewise
    return f"{int(round(-z * 10)):05d}.dcm"


@pytest.fixture(scope="module")
def lidc_ref(lidc_0001, tmp_path_factory):
    root = tmp_path_factory.mktemp("lidc")
    src = _copy_lidc(*lidc_0001, root / "orig")
    out = root / "out_orig"
    assert main(["prepare", "--lidc", str(src), "--negatives", "0", "--out", str(out)]) == 0
    assert SliceDataset(out).meta["n_nodule_slices"] >= 3
    return root, out


@pytest.mark.parametrize("name,change,xml_change", [
    ("unsigned_intercept", _unsigned, None),
    ("signed_slope2", _slope2, None),
    ("columns_flipped", _flip_columns, _flip_xml_columns),
    ("reversed_order", _reversed_order, None),
])
def test_lidc_dicom_encodings(lidc_0001, lidc_ref, name, change, xml_change):
    root, ref = lidc_ref
    src = _copy_lidc(*lidc_0001, root / name, change, xml_change)
    out = root / f"out_{name}"
    assert main(["prepare", "--lidc", str(src), "--negatives", "0", "--out", str(out)]) == 0
    _assert_same_anatomy(ref, out, min_dice=0.97, lesion_tol=0.02)


def _gantry_tilt(deg: float):
    """The same pixels acquired with the gantry tilted: every slice plane leans (its column axis
    turns in y-z), the table still steps straight along z, so the stack is sheared."""
    t = np.radians(deg)

    def change(ds, hu):
        ds.ImageOrientationPatient = [1, 0, 0, 0, f"{np.cos(t):.8f}", f"{-np.sin(t):.8f}"]
        ds.GantryDetectorTilt = f"{deg:g}"

    return change


@pytest.mark.parametrize("deg", [15, -25])
def test_gantry_tilt_keeps_slices_boxes_and_the_nodule_where_it_was_scanned(lidc_0001, lidc_ref, deg, caplog):
    """A tilted series was read as if each slice lay along the leaning plane's normal: slice
    positions drifted (z_mm −120.085 for −120.0 at 15°) and the nodule's centre, taken at the table's
    z, fell outside its own scan (a warning per nodule, and ``--include-small`` spheres lost)."""
    root, ref = lidc_ref
    src = _copy_lidc(*lidc_0001, root / f"tilt{deg}", _gantry_tilt(deg))
    out = root / f"out_tilt{deg}"
    with caplog.at_level("WARNING"):
        assert main(["prepare", "--lidc", str(src), "--negatives", "0", "--out", str(out)]) == 0
    assert "outside the scan" not in caplog.text
    R, X = SliceDataset(ref), SliceDataset(out)
    assert np.array_equal(np.asarray(X.images), np.asarray(R.images))
    assert np.array_equal(np.asarray(X.masks), np.asarray(R.masks))
    assert [r.z_mm for r in X.records] == [r.z_mm for r in R.records]
    assert all(np.array_equal(a.boxes, b.boxes) for a, b in zip(X.records, R.records))
    # the nodule's centre where the leaning plane put it: rows run (0, cos t, −sin t) from the origin
    series = next(src.rglob("*.xml")).parent
    plain = load_ct(lidc_0001[0])
    ct = load_ct(series)
    (n0,), (n,) = nodules_from_lidc(lidc_0001[1], plain), nodules_from_lidc(next(series.glob("*.xml")), ct)
    r = n0.center_xyz_mm[1] - plain.origin[1]
    t = np.radians(deg)
    assert np.allclose(n.center_xyz_mm, (n0.center_xyz_mm[0], plain.origin[1] + r * np.cos(t),
                                         n0.center_xyz_mm[2] - r * np.sin(t)), atol=0.05)
    # --dicom's reader agrees with the series reader
    alt = read_dicom_volume(scan_dicom_tree(series).volumes[0])
    assert np.array_equal(alt.hu, ct.hu) and np.allclose(alt.spacing, ct.spacing)
    assert np.allclose(alt.direction, ct.direction, atol=1e-4) and np.allclose(alt.origin, ct.origin)  # its IOP keeps 4 decimals


def test_dicom_tree_reads_jpeg_lossless(lidc_0001, tmp_path):
    """JPEG Lossless (1.2.840.10008.1.2.4.70) has no pydicom decoder without plugins; ``--dicom``
    reads it through SimpleITK's GDCM and gets the same HU as from the uncompressed files."""

    def jpeg_lossless(ds, hu):
        img = sitk.GetImageFromArray(np.clip(hu, -1024, 3071).astype(np.int16)[None])
        w = sitk.ImageFileWriter()
        w.SetFileName(str(tmp_path / "c.dcm"))
        w.SetImageIO("GDCMImageIO")
        w.SetUseCompression(True)
        w.SetCompressor("JPEG")
        w.Execute(img)
        c = pydicom.dcmread(tmp_path / "c.dcm")
        for tag in ("BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation"):
            setattr(ds, tag, getattr(c, tag))
        ds.RescaleIntercept, ds.RescaleSlope = c.get("RescaleIntercept", 0), c.get("RescaleSlope", 1)
        ds.file_meta.TransferSyntaxUID = c.file_meta.TransferSyntaxUID
        ds.PixelData = c.PixelData
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True

    plain = read_dicom_volume(scan_dicom_tree(_copy_lidc(*lidc_0001, tmp_path / "plain")).volumes[0])
    tree = scan_dicom_tree(_copy_lidc(*lidc_0001, tmp_path / "jpeg", jpeg_lossless))
    assert str(pydicom.dcmread(tree.volumes[0].files[0]).file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.70"
    jpeg = read_dicom_volume(tree.volumes[0])
    assert np.array_equal(jpeg.hu, plain.hu) and jpeg.spacing == plain.spacing


def test_missing_slice_is_one_clear_error_and_writes_nothing(lidc_0001, tmp_path, capsys):
    src = _copy_lidc(*lidc_0001, tmp_path / "gap", drop=-117.5)
    out = tmp_path / "ds"
    assert main(["prepare", "--lidc", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]  # the rest is the progress bar
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("nodulesynth prepare: error: ")
    assert "gap of 5.00 mm" in lines[0] and "-120.000000.dcm" in lines[0] and str(src) in lines[0]
    assert not out.exists() and not list(tmp_path.glob(".ds*"))  # no output, no empty shard folder beside it
    # --dicom cuts the series into its evenly spaced runs instead (documented), never interpolating over the gap
    assert sorted(len(v.slices) for v in scan_dicom_tree(src).volumes) == [2, 2]


def test_uneven_step_is_named_as_such(lidc_0001, tmp_path, capsys):
    """One slice 0.8 mm off its place: an uneven step, not "a gap of ≈ 0 missing slices"."""

    def shift(ds, hu):
        ipp = [float(v) for v in ds.ImagePositionPatient]
        if ipp[2] == -117.5:
            ds.ImagePositionPatient = [ipp[0], ipp[1], ipp[2] + 0.8]

    src = _copy_lidc(*lidc_0001, tmp_path / "uneven", shift)
    assert main(["prepare", "--lidc", str(src), "--out", str(tmp_path / "ds")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(lines) == 1 and "an uneven step of 3.30 mm (median 2.50)" in lines[0] and "missing" not in lines[0]
    assert not (tmp_path / "ds").exists() and not list(tmp_path.glob(".ds*"))


def _enhanced(series: Path, out: Path) -> Path:
    """The single-slice files of ``series`` as one Enhanced CT Image (multi-frame) file, as current
    scanners export: frames from the head down, each with its own position and rescale in the
    per-frame functional groups, spacing and orientation shared, plus a localizer frame that must
    not become a slice."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    files = sorted(series.glob("*.dcm"), key=lambda f: -float(pydicom.dcmread(f).ImagePositionPatient[2]))
    first = pydicom.dcmread(files[0])
    frames, per_frame = [], []
    for k, f in enumerate([*files, files[-1]]):
        ds = pydicom.dcmread(f)
        hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        intercept = -1024.0 - 8 * k  # a different rescale on every frame
        frames.append(np.rint(hu - intercept).astype(np.int16))
        localizer = k == len(files)
        ipp = [float(v) for v in ds.ImagePositionPatient]
        pos, pvt, kind = Dataset(), Dataset(), Dataset()
        pos.ImagePositionPatient = [ipp[0], ipp[1], ipp[2] + (2.5 if localizer else 0.0)]  # would extend the run
        pvt.RescaleIntercept, pvt.RescaleSlope, pvt.RescaleType = f"{intercept:g}", "1", "HU"
        kind.FrameType = ["ORIGINAL", "PRIMARY", "LOCALIZER" if localizer else "AXIAL", "NONE"]
        g = Dataset()
        g.PlanePositionSequence, g.PixelValueTransformationSequence = Sequence([pos]), Sequence([pvt])
        g.CTImageFrameTypeSequence = Sequence([kind])
        per_frame.append(g)
    mea, ori, shared = Dataset(), Dataset(), Dataset()
    mea.PixelSpacing, mea.SliceThickness = first.PixelSpacing, first.SliceThickness
    ori.ImageOrientationPatient = first.ImageOrientationPatient
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = Sequence([mea]), Sequence([ori])
    enh = first
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
                "RescaleSlope", "RescaleIntercept", "PixelPaddingValue"):
        if tag in enh:
            delattr(enh, tag)
    enh.SOPClassUID = enh.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    enh.NumberOfFrames = len(frames)
    enh.SharedFunctionalGroupsSequence = Sequence([shared])
    enh.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    enh.PixelRepresentation, enh.BitsAllocated, enh.BitsStored, enh.HighBit = 1, 16, 16, 15
    enh.PixelData = np.stack(frames).tobytes()
    out.mkdir(parents=True)
    enh.save_as(out / "enhanced.dcm")
    return out


def test_enhanced_multiframe_ct_reads_like_its_single_slice_files(lidc_0001, tmp_path):
    plain_root = _copy_lidc(*lidc_0001, tmp_path / "plain")
    series = next(plain_root.rglob("*.dcm")).parent
    enh_root = _enhanced(series, tmp_path / "enh")
    plain, tree = scan_dicom_tree(plain_root), scan_dicom_tree(enh_root)
    assert len(tree.volumes) == 1 and tree.volumes[0].files == [enh_root / "enhanced.dcm"]
    a, b = read_dicom_volume(plain.volumes[0]), read_dicom_volume(tree.volumes[0])
    assert b.shape == a.shape == (5, 512, 512)  # the localizer frame is left out
    assert np.array_equal(b.hu, a.hu) and b.spacing == a.spacing and b.origin == a.origin
    assert np.allclose(b.direction, a.direction)
    # and end to end: prepare --dicom gives the same slices from either
    outs = []
    for name, root in (("plain", plain_root), ("enh", enh_root)):
        assert main(["prepare", "--dicom", str(root), "--out", str(tmp_path / f"out_{name}")]) == 0
        outs.append(SliceDataset(tmp_path / f"out_{name}"))
    assert len(outs[0]) == len(outs[1]) >= 1
    assert np.array_equal(np.asarray(outs[0].images), np.asarray(outs[1].images))
    assert np.array_equal(np.asarray(outs[0].masks), np.asarray(outs[1].masks))


def test_enhanced_ct_without_positions_is_skipped_by_name(lidc_0001, tmp_path):
    enh_root = _enhanced(next(_copy_lidc(*lidc_0001, tmp_path / "plain").rglob("*.dcm")).parent, tmp_path / "enh")
    ds = pydicom.dcmread(enh_root / "enhanced.dcm")
    del ds.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence
    ds.save_as(enh_root / "enhanced.dcm")
    with pytest.raises(NoduleSynthError, match="enhanced CT without ImagePositionPatient for frame 3"):
        scan_dicom_tree(enh_root)
