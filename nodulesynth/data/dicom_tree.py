"""Any tree of DICOM files → CT volumes, grouped by SeriesInstanceUID.

Real collections arrive as whatever folders the archive produced: several studies in one folder,
one file per folder, a single slice kept from a series. So files are grouped by their tags, not
their folders: SeriesInstanceUID (+ orientation and matrix size), ordered along the slice normal.
A series whose slices are not evenly spaced (single slices picked far apart) is cut into evenly
spaced runs; a lone slice is a one-slice volume (its thickness stands in for the z spacing).
Files that are not usable CT image slices are skipped and counted by reason, never fatal, because
mixed trees (MR, SR, localizers, XML, READMEs) are normal; only a tree with no CT at all, or a
single non-CT file given on its own, is an error.
"""
from __future__ import annotations

import logging
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import NoduleSynthError
from .ct import CTVolume, _to_hu_int16

log = logging.getLogger(__name__)

HEADER_TAGS = [
    "Modality", "SeriesInstanceUID", "PatientID", "ImagePositionPatient", "ImageOrientationPatient",
    "PixelSpacing", "Rows", "Columns", "SliceThickness", "ImageType", "PixelData", "InstanceNumber",
]
GAP_TOLERANCE = 0.1  # relative: slices further apart than (1 ± this) × the run's gap start a new run


@dataclass
class _Slice:
    path: Path
    position: float  # along the slice normal, mm
    ipp: np.ndarray  # (x, y, z) mm
    pixel_spacing: tuple[float, float]  # (row spacing dy, column spacing dx)
    thickness: float


@dataclass
class DicomVolumeRef:
    """One volume found in the tree (headers only; ``read_dicom_volume`` loads the pixels)."""

    series_uid: str
    patient: str
    orientation: tuple[float, ...]  # ImageOrientationPatient (row dir xyz, column dir xyz)
    slices: list[_Slice] = field(default_factory=list)

    @property
    def key(self) -> str:
        """Unique per volume (a series cut into runs has several)."""
        return f"{self.series_uid}@{self.slices[0].position:.3f}"

    @property
    def files(self) -> list[Path]:
        return [s.path for s in self.slices]


@dataclass
class DicomTree:
    volumes: list[DicomVolumeRef]
    skipped: Counter  # reason → files
    n_files: int

    def summary(self) -> dict:
        return {
            "files_seen": self.n_files,
            "volumes": len(self.volumes),
            "series": len({v.series_uid for v in self.volumes}),
            "patients": len({v.patient for v in self.volumes}),
            "slices": sum(len(v.slices) for v in self.volumes),
            "files_skipped": dict(self.skipped),
        }


def _header(path: Path):
    """(dataset, None) or (None, skip reason)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
    except InvalidDicomError:
        return None, "not a DICOM file"
    except Exception:  # pydicom raises many types for truncated / corrupt files
        return None, "unreadable DICOM"
    modality = str(getattr(ds, "Modality", "") or "")
    if modality != "CT":
        return None, f"not CT (Modality={modality or 'missing'})"
    image_type = [str(t).upper() for t in (getattr(ds, "ImageType", None) or [])]
    if "LOCALIZER" in image_type:
        return None, "CT localizer (scout)"
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"):
        if getattr(ds, tag, None) in (None, ""):
            return None, f"CT without {tag}"
    return ds, None


def _runs(slices: list[_Slice]) -> tuple[list[list[_Slice]], int]:
    """Evenly spaced runs of slices sorted by position, and how many duplicates (a second file at
    the same position of the same series, e.g. one slice exported twice) were dropped."""
    runs: list[list[_Slice]] = []
    dups = 0
    for s in slices:
        run = runs[-1] if runs else None
        gap = s.position - run[-1].position if run else 0.0
        if run and gap < 1e-3:
            dups += 1
            continue
        if run and len(run) == 1:
            ok = gap <= max(3 * run[0].thickness, 10.0)  # further apart: not one volume
        elif run:
            step = run[1].position - run[0].position
            ok = abs(gap - step) <= GAP_TOLERANCE * step
        else:
            ok = False
        if ok:
            run.append(s)
        else:
            runs.append([s])
    return runs, dups


def scan_dicom_tree(root: str | Path) -> DicomTree:
    """Find every CT image slice under ``root`` (a folder, or one file) and group them into volumes."""
    root = Path(root)
    if not root.exists():
        raise NoduleSynthError(f"--dicom {root}: no such file or folder")
    if root.is_file():
        paths = [root]
    else:
        paths = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            paths += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
    skipped: Counter = Counter()
    groups: dict[tuple, list[_Slice]] = defaultdict(list)
    patients: dict[tuple, str] = {}
    first_skip: dict[str, Path] = {}
    for p in paths:
        ds, why = _header(p)
        if ds is None:
            skipped[why] += 1
            first_skip.setdefault(why, p)
            continue
        iop = tuple(round(float(v), 4) for v in ds.ImageOrientationPatient)
        row, col = np.asarray(iop[:3]), np.asarray(iop[3:])
        normal = np.cross(row, col)
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
        key = (str(getattr(ds, "SeriesInstanceUID", "") or f"no-series:{p.parent}"), iop, int(ds.Rows), int(ds.Columns))
        thick = float(getattr(ds, "SliceThickness", 0) or 0)
        groups[key].append(_Slice(p, float(ipp @ normal), ipp, (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])), thick))
        patients[key] = str(getattr(ds, "PatientID", "") or "") or f"unknown:{p.parent.name}"
    if not groups:
        if root.is_file():
            why = next(iter(skipped))
            raise NoduleSynthError(f"{root}: {why}; --dicom needs CT image slices")
        detail = "; ".join(f"{n} {why} (e.g. {first_skip[why]})" for why, n in skipped.most_common(3))
        raise NoduleSynthError(f"--dicom {root}: no CT image slices found ({detail or 'no files'})")
    volumes = []
    for key in sorted(groups, key=lambda k: (patients[k], k[0])):
        slices = sorted(groups[key], key=lambda s: s.position)
        runs, dups = _runs(slices)
        if dups:
            skipped["duplicate slice (same series and position)"] += dups
        for run in runs:
            volumes.append(DicomVolumeRef(key[0], patients[key], key[1], run))
    return DicomTree(volumes, skipped, len(paths))


def _slice_hu(path: Path) -> np.ndarray:
    """One slice in HU (rescale applied). pydicom decodes without plugins only some transfer syntaxes;
    JPEG Lossless (1.2.840.10008.1.2.4.70, common in PACS exports) and others go through SimpleITK's
    GDCM, which ``--lidc`` reads with anyway, so a compressed tree is read, not refused."""
    import pydicom

    try:
        ds = pydicom.dcmread(path)
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        inter = float(getattr(ds, "RescaleIntercept", 0) or 0)
        a = ds.pixel_array.astype(np.float32) * slope + inter
    except Exception as e:  # no pydicom decoder for this transfer syntax, truncated pixel data
        import SimpleITK as sitk

        try:
            a = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32)  # GDCM applies the rescale
        except RuntimeError:
            raise NoduleSynthError(f"{path}: cannot decode pixel data ({str(e).strip().splitlines()[0]})") from e
        a = a[0] if a.ndim == 3 and a.shape[0] == 1 else a
    if a.ndim != 2:
        raise NoduleSynthError(f"{path}: expected one 2-D image, got pixel data of shape {a.shape}")
    return a


def read_dicom_volume(ref: DicomVolumeRef) -> CTVolume:
    """HU int16 (z, y, x) with world geometry from the DICOM tags (stored orientation kept)."""
    arrs = [_slice_hu(s.path) for s in ref.slices]
    hu = _to_hu_int16(np.rint(np.stack(arrs)))
    row, col = np.asarray(ref.orientation[:3]), np.asarray(ref.orientation[3:])
    normal = np.cross(row, col)
    if len(ref.slices) > 1:
        dz = float(np.median(np.diff([s.position for s in ref.slices])))
    else:
        dz = ref.slices[0].thickness or 1.0
    dy, dx = ref.slices[0].pixel_spacing
    if min(dz, dy, dx) <= 0:
        raise NoduleSynthError(f"{ref.slices[0].path}: invalid voxel spacing {(dz, dy, dx)}")
    # direction[:, j] = world (z, y, x) unit vector of array axis j (slice, row, column)
    direction = np.stack([normal[::-1], col[::-1], row[::-1]], axis=1)
    origin = tuple(float(v) for v in ref.slices[0].ipp[::-1])
    return CTVolume(hu, (dz, float(dy), float(dx)), origin, direction, ref.series_uid, str(ref.slices[0].path.parent))


def dicom_patient_id(folder: str | Path) -> str:
    """PatientID of the first readable DICOM file in ``folder`` ("" if none carries one)."""
    import pydicom

    for f in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else [Path(folder)]:
        if f.is_file() and f.suffix.lower() == ".dcm":
            try:
                return str(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["PatientID"]).get("PatientID", "") or "")
            except Exception:  # unreadable file: try the next one
                continue
    return ""
