"""Any tree of DICOM files → CT volumes, grouped by SeriesInstanceUID.

Real collections arrive as whatever folders the archive produced: several studies in one folder,
one file per folder, a single slice kept from a series. So files are grouped by their tags, not
their folders: SeriesInstanceUID (+ orientation and matrix size), ordered along the slice normal.
A series whose slices are not evenly spaced (single slices picked far apart) is cut into evenly
spaced runs; a lone slice is a one-slice volume (its thickness stands in for the z spacing).
Files that are not usable CT image slices are skipped and counted by reason, never fatal, because
mixed trees (MR, SR, localizers, XML, READMEs) are normal; only a tree with no CT at all, or a
single non-CT file given on its own, is an error.

Enhanced (multi-frame) CT, what current scanners export, holds a whole series in one file: each frame
is a slice, its position, orientation, spacing and rescale in the per-frame functional groups (or the
shared ones). Its frames join the grouping like single-slice files; each file is decoded once.

DICOM SEG and RTSTRUCT files of the tree label the series they reference (``dicom_labels``): such a
volume is prepared like a labelled ``--volume``; the others stay unlabelled.
"""
from __future__ import annotations

import logging
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import NoduleSynthError
from .ct import CTVolume, _to_hu_int16, slice_axis_from_positions
from .dicom_labels import LabelRef, forget_unknown_sources, frame_macro, label_volume, match_frames, read_label_header

log = logging.getLogger(__name__)

HEADER_TAGS = [
    "Modality", "SeriesInstanceUID", "PatientID", "ImagePositionPatient", "ImageOrientationPatient",
    "PixelSpacing", "Rows", "Columns", "SliceThickness", "ImageType", "PixelData", "InstanceNumber",
    "NumberOfFrames", "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence", "SOPInstanceUID",
]
GAP_TOLERANCE = 0.1  # relative: slices further apart than (1 ± this) × the run's gap start a new run


@dataclass
class _Slice:
    path: Path
    position: float  # along the slice normal, mm
    ipp: np.ndarray  # (x, y, z) mm
    pixel_spacing: tuple[float, float]  # (row spacing dy, column spacing dx)
    thickness: float
    frame: int | None = None  # frame of an enhanced (multi-frame) file; None: a single-slice file
    sop: str = ""  # SOPInstanceUID: the same image stored twice has the same one


@dataclass
class DicomVolumeRef:
    """One volume found in the tree (headers only; ``read_dicom_volume`` loads the pixels)."""

    series_uid: str
    patient: str
    orientation: tuple[float, ...]  # ImageOrientationPatient (row dir xyz, column dir xyz)
    slices: list[_Slice] = field(default_factory=list)
    stack: int = 0  # > 0: the series holds several images at these positions; this is the stack-th
    labels: list[LabelRef] = field(default_factory=list)  # SEG / RTSTRUCT files with lesions on these slices
    placed: dict[Path, dict[int, int]] = field(default_factory=dict)  # per file: {its frame or contour: slice}

    @property
    def key(self) -> str:
        """Unique per volume (a series cut into runs or stacks has several)."""
        return f"{self.series_uid}@{self.slices[0].position:.3f}" + (f"#{self.stack}" if self.stack else "")

    @property
    def files(self) -> list[Path]:
        """Each file once (an enhanced file holds many of the slices)."""
        return list(dict.fromkeys(s.path for s in self.slices))


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
            "volumes_labelled": sum(bool(v.labels) for v in self.volumes),
            "annotation_files": len({s.path for v in self.volumes for s in v.labels}),
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
    if modality in ("SEG", "RTSTRUCT"):
        return ds, None
    if modality != "CT":
        return None, f"not CT (Modality={modality or 'missing'})"
    image_type = [str(t).upper() for t in (getattr(ds, "ImageType", None) or [])]
    if "LOCALIZER" in image_type:
        return None, "CT localizer (scout)"
    for tag in ("Rows", "Columns"):
        if getattr(ds, tag, None) in (None, ""):
            return None, f"CT without {tag}"
    return ds, None


def _is_enhanced(ds) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds


def _frames(ds) -> tuple[list[tuple], str | None]:
    """[(frame, ImagePositionPatient, ImageOrientationPatient, PixelSpacing, SliceThickness)] of one
    file (one entry, frame None, for a single-slice file), or ([], skip reason)."""
    if not _is_enhanced(ds):
        for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if getattr(ds, tag, None) in (None, ""):
                return [], f"CT without {tag}"
        return [(None, ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing,
                 getattr(ds, "SliceThickness", 0))], None
    n = int(getattr(ds, "NumberOfFrames", 0) or 0)
    if n < 1 or len(ds.PerFrameFunctionalGroupsSequence) != n:
        return [], "enhanced CT whose per-frame groups do not match NumberOfFrames"
    out = []
    for i in range(n):
        kind = frame_macro(ds, i, "CTImageFrameTypeSequence")
        if kind is not None and "LOCALIZER" in [str(t).upper() for t in (getattr(kind, "FrameType", None) or [])]:
            continue
        pos, ori, mea = (frame_macro(ds, i, q) for q in ("PlanePositionSequence", "PlaneOrientationSequence",
                                                      "PixelMeasuresSequence"))
        for item, tag in ((pos, "ImagePositionPatient"), (ori, "ImageOrientationPatient"), (mea, "PixelSpacing")):
            if item is None or getattr(item, tag, None) in (None, ""):
                return [], f"enhanced CT without {tag} for frame {i + 1}"
        out.append((i, pos.ImagePositionPatient, ori.ImageOrientationPatient, mea.PixelSpacing,
                    getattr(mea, "SliceThickness", 0)))
    return out, (None if out else "enhanced CT of localizer frames only")


def _stacks(slices: list[_Slice]) -> tuple[list[list[_Slice]], int]:
    """Slices sorted by position → stacks with one image per position, and how many duplicates (the
    same image, by SOPInstanceUID and frame, stored twice) were dropped. Distinct images at one
    position (several phases in one series; independent 2-D images, as nodulesynth's own DICOM export
    writes them) go to stacks 1, 2, ... in file order, each read as its own volume."""
    stacks: list[list[_Slice]] = [[]]
    dups, i = 0, 0
    while i < len(slices):
        j = i + 1
        while j < len(slices) and slices[j].position - slices[i].position < 1e-3:
            j += 1
        seen: set = set()
        at = []
        for s in slices[i:j]:
            ident = (s.sop, s.frame) if s.sop else (s.path, s.frame)
            if ident in seen:
                dups += 1
            else:
                seen.add(ident)
                at.append(s)
        while len(stacks) < len(at):
            stacks.append([])
        for k, s in enumerate(at):
            stacks[k].append(s)
        i = j
    return [st for st in stacks if st], dups


def _runs(slices: list[_Slice]) -> list[list[_Slice]]:
    """Evenly spaced runs of one stack's slices (sorted by position, one per position)."""
    runs: list[list[_Slice]] = []
    for s in slices:
        run = runs[-1] if runs else None
        gap = s.position - run[-1].position if run else 0.0
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
    return runs


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
    annotations: list[LabelRef] = []
    for p in paths:
        ds, why = _header(p)
        if ds is not None and ds.Modality in ("SEG", "RTSTRUCT"):
            annotations.append(read_label_header(p, ds.Modality))
            continue
        frames, why = ([], why) if ds is None else _frames(ds)
        if not frames:
            skipped[why] += 1
            first_skip.setdefault(why, p)
            continue
        for frame, ipp, iop, spacing, thick in frames:
            iop = tuple(round(float(v), 4) for v in iop)
            normal = np.cross(np.asarray(iop[:3]), np.asarray(iop[3:]))
            ipp = np.asarray([float(v) for v in ipp])
            key = (str(getattr(ds, "SeriesInstanceUID", "") or f"no-series:{p.parent}"), iop, int(ds.Rows), int(ds.Columns))
            groups[key].append(_Slice(p, float(ipp @ normal), ipp, (float(spacing[0]), float(spacing[1])),
                                      float(thick or 0), frame, str(getattr(ds, "SOPInstanceUID", "") or "")))
            patients[key] = str(getattr(ds, "PatientID", "") or "") or f"unknown:{p.parent.name}"
    if not groups:
        if root.is_file():
            why = next(iter(skipped))
            raise NoduleSynthError(f"{root}: {why}; --dicom needs CT image slices")
        detail = "; ".join(f"{n} {why} (e.g. {first_skip[why]})" for why, n in skipped.most_common(3))
        raise NoduleSynthError(f"--dicom {root}: no CT image slices found ({detail or 'no files'})")
    volumes = []
    for key in sorted(groups, key=lambda k: (patients[k], k[0])):
        stacks, dups = _stacks(sorted(groups[key], key=lambda s: s.position))
        if dups:
            skipped["duplicate slice (same image stored twice)"] += dups
        for k, stack in enumerate(stacks):
            for run in _runs(stack):
                volumes.append(DicomVolumeRef(key[0], patients[key], key[1], run, stack=k))
    _attach_labels(annotations, volumes, skipped)
    return DicomTree(volumes, skipped, len(paths))


def _attach_labels(annotations: list[LabelRef], volumes: list[DicomVolumeRef], skipped: Counter) -> None:
    """Give each SEG / RTSTRUCT to the runs of its series that hold its lesion pieces. A piece on no
    slice of the series is an error: the nodule it outlines would stay in the volume unlabelled."""
    for a in annotations:
        if not a.series_uid:  # an RTSTRUCT naming only its contours' images: their series
            sops = {f[2] for f in a.lesion_frames}
            a.series_uid = next((v.series_uid for v in volumes if sops & {s.sop for s in v.slices}), "")
        runs = [v for v in volumes if v.series_uid == a.series_uid]
        if not a.lesion_frames:
            skipped[f"DICOM {a.kind} without lesions (" + ", ".join(a.other_segments[:3]) + ")"] += 1
            continue
        if not runs:
            skipped[f"DICOM {a.kind} whose CT series is not in the tree"] += 1
            continue
        forget_unknown_sources(a, {s.sop for v in runs for s in v.slices})
        matched: set[int] = set()
        for v in runs:
            got = match_frames(a, v.slices, v.orientation)
            if got:
                v.labels.append(a)
                v.placed[a.path] = got
                matched |= set(got)
        missing = [f for f in a.lesion_frames if f[0] not in matched]
        normal = np.cross(np.asarray(runs[0].orientation[:3]), np.asarray(runs[0].orientation[3:]))
        pos = [s.position for v in runs for s in v.slices]
        in_gap = [f for f in missing if min(pos) < f[1] @ normal < max(pos)]
        if in_gap:  # on a slice missing from the series (cut there into runs): nothing there to label
            skipped[f"DICOM {a.kind} lesion pieces on a missing slice"] += len(in_gap)
            log.warning("%s: %d lesion piece(s) on slices missing from series %s", a.path, len(in_gap), a.series_uid)
        missing = [f[0] for f in missing if f[0] not in {g[0] for g in in_gap}]
        if missing:
            i, point = next(f[:2] for f in a.lesion_frames if f[0] == missing[0])
            what = "frame" if a.kind == "SEG" else "contour"
            raise NoduleSynthError(f"{a.path}: lesion {what} {i + 1} at {point.round(2).tolist()} mm lies on no slice of "
                                   f"CT series {a.series_uid} in the tree ({len(missing)} such {what}(s)); its nodule "
                                   "would stay unlabelled there")
        if a.other_segments:
            log.info("%s: left out (not lesions): %s", a.path, ", ".join(a.other_segments))


def read_dicom_label(ref: DicomVolumeRef, shape: tuple[int, int]) -> np.ndarray | None:
    """Boolean (z, y, x) lesion label of a volume from its SEG / RTSTRUCT files (stored order, as
    ``read_dicom_volume``), or None when none labels it."""
    if not ref.labels:
        return None
    return label_volume([(a, ref.placed[a.path]) for a in ref.labels], ref.slices, ref.orientation, shape)


def _rescale(ds, frame: int | None) -> tuple[float, float]:
    """(slope, intercept) of a slice: an enhanced frame's Pixel Value Transformation, else the file's."""
    item = frame_macro(ds, frame, "PixelValueTransformationSequence") or ds
    return float(getattr(item, "RescaleSlope", 1) or 1), float(getattr(item, "RescaleIntercept", 0) or 0)


def _file_hu(path: Path, frames: list[int | None]) -> dict[int | None, np.ndarray]:
    """The slices ``frames`` of one file in HU, int16 (rescale applied; frame None: a single-slice file).
    pydicom decodes without plugins only some transfer syntaxes; JPEG Lossless
    (1.2.840.10008.1.2.4.70, common in PACS exports) and others go through SimpleITK's GDCM, which
    ``--lidc`` reads with anyway, so a compressed tree is read, not refused."""
    import pydicom

    try:
        ds = pydicom.dcmread(path)
        a = ds.pixel_array
        a = a[None] if a.ndim == 2 else a
        out = {}
        for f in frames:
            slope, intercept = _rescale(ds, f)
            out[f] = a[f or 0].astype(np.float32) * slope + intercept
    except Exception as e:  # no pydicom decoder for this transfer syntax, truncated pixel data
        import SimpleITK as sitk

        try:
            a = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32)  # GDCM applies the rescale
        except RuntimeError:
            raise NoduleSynthError(f"{path}: cannot decode pixel data ({str(e).strip().splitlines()[0]})") from e
        a = a[None] if a.ndim == 2 else a
        if a.ndim != 3 or max(f or 0 for f in frames) >= len(a) or (None in frames and len(a) != 1):
            raise NoduleSynthError(f"{path}: pixel data of shape {a.shape} does not hold frames {frames}") from e
        out = {f: a[f or 0] for f in frames}
    if None in frames and (a.ndim != 3 or len(a) != 1):
        raise NoduleSynthError(f"{path}: expected one 2-D image, got pixel data of shape {a.shape}")
    return {f: _to_hu_int16(np.rint(v)) for f, v in out.items()}


def read_dicom_volume(ref: DicomVolumeRef) -> CTVolume:
    """HU int16 (z, y, x) with world geometry from the DICOM tags (stored orientation kept)."""
    wanted: dict[Path, list] = defaultdict(list)
    for s in ref.slices:
        wanted[s.path].append(s.frame)
    decoded = {p: _file_hu(p, fs) for p, fs in wanted.items()}
    hu = np.stack([decoded[s.path][s.frame] for s in ref.slices])
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
    direction, spacing = slice_axis_from_positions(direction, (dz, float(dy), float(dx)), ref.slices[0].ipp,
                                                   ref.slices[-1].ipp, len(ref.slices))
    origin = tuple(float(v) for v in ref.slices[0].ipp[::-1])
    return CTVolume(hu, spacing, origin, direction, ref.series_uid, str(ref.slices[0].path.parent))


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
