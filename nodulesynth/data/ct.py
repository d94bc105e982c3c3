"""CT volumes: one reader for LUNA16 .mhd/.raw and DICOM series folders, and world↔voxel geometry.

Arrays are numpy order (z, y, x); so are ``spacing``, ``origin`` and ``direction`` (SimpleITK's
(x, y, z) versions are reversed once, here). World coordinates are LPS millimetres given as
(x, y, z), the way LUNA16's annotations.csv and DICOM give them. The direction matrix is honoured
(LUNA16 has scans stored flipped); ``canonical()`` flips such a volume so that rows run
anterior→posterior and columns patient-right→left, which is what the mask code assumes.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import NoduleSynthError
from ..hu import AIR_HU

log = logging.getLogger(__name__)

__all__ = ["AIR_HU", "CTVolume", "check_hu_plausible", "dicom_series_parts", "load_ct", "mhd_data_file"]


@dataclass
class CTVolume:
    """A CT scan in HU. ``direction[:, j]`` is the world (z, y, x) unit vector of array axis j."""

    hu: np.ndarray  # int16 (z, y, x)
    spacing: tuple[float, float, float]  # mm, (z, y, x)
    origin: tuple[float, float, float]  # world mm of voxel (0, 0, 0), (z, y, x)
    direction: np.ndarray  # 3x3, (z, y, x) order
    series_uid: str
    path: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.hu.shape)

    def voxel_to_world(self, zyx) -> np.ndarray:
        """Voxel (z, y, x) (float ok; (N,3) or (3,)) → world (x, y, z) mm."""
        v = np.asarray(zyx, dtype=np.float64)
        world_zyx = np.asarray(self.origin) + (v * np.asarray(self.spacing)) @ np.asarray(self.direction).T
        return world_zyx[..., ::-1].copy()

    def world_to_voxel(self, xyz_mm) -> np.ndarray:
        """World (x, y, z) mm ((N,3) or (3,)) → float voxel (z, y, x); may lie outside the volume."""
        w = np.asarray(xyz_mm, dtype=np.float64)[..., ::-1]
        inv = np.linalg.inv(np.asarray(self.direction, dtype=np.float64))
        return ((w - np.asarray(self.origin)) @ inv.T) / np.asarray(self.spacing)

    def contains(self, zyx) -> np.ndarray:
        """True where a (float) voxel position rounds to a voxel inside the volume."""
        v = np.rint(np.asarray(zyx, dtype=np.float64))
        return np.all((v >= 0) & (v < np.asarray(self.shape)), axis=-1)

    def world_to_index(self, xyz_mm) -> np.ndarray:
        """World (x, y, z) mm → nearest integer voxel (z, y, x); error if outside the volume
        (SimpleITK would silently return an out-of-range index)."""
        v = self.world_to_voxel(xyz_mm)
        if not np.all(self.contains(v)):
            raise NoduleSynthError(f"{self.path}: world point(s) {np.asarray(xyz_mm).tolist()} lie outside the scan")
        return np.rint(v).astype(np.int64)

    def slice_z_mm(self) -> np.ndarray:
        """World z (mm) of every axial slice (at the slice's first voxel)."""
        k = np.arange(self.shape[0], dtype=np.float64)
        idx = np.stack([k, np.zeros_like(k), np.zeros_like(k)], axis=1)
        return self.voxel_to_world(idx)[:, 2]

    def _canonical_ops(self) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
        """Axis permutation + flips that make the direction matrix ≈ identity."""
        d = np.asarray(self.direction, dtype=np.float64)
        perm = tuple(int(np.argmax(np.abs(d[w, :]))) for w in range(3))  # array axis for each world axis
        if sorted(perm) != [0, 1, 2]:
            raise NoduleSynthError(f"{self.path}: direction matrix {d.tolist()} is too oblique to reorient")
        flips = tuple(bool(d[w, perm[w]] < 0) for w in range(3))
        return perm, flips

    def reorient(self, arr: np.ndarray) -> np.ndarray:
        """Apply the same permutation/flips as ``canonical()`` to a same-grid array (e.g. a lung seg)."""
        perm, flips = self._canonical_ops()
        out = np.transpose(arr, perm)
        for ax, f in enumerate(flips):
            if f:
                out = np.flip(out, axis=ax)
        return np.ascontiguousarray(out)

    def canonical(self) -> "CTVolume":
        """Same scan with identity-like direction: z up the patient, rows anterior→posterior, columns
        patient right→left (radiological display), so image-right is the patient's left."""
        perm, flips = self._canonical_ops()
        if perm == (0, 1, 2) and not any(flips):
            return self
        spacing = tuple(float(self.spacing[p]) for p in perm)
        d = np.asarray(self.direction, dtype=np.float64)[:, list(perm)].copy()
        shape = np.asarray(self.shape)[list(perm)]
        # New voxel 0 is the old voxel at the far end of every flipped axis.
        corner_old = np.zeros(3)
        for ax in range(3):
            if flips[ax]:
                corner_old[perm[ax]] = shape[ax] - 1
        origin_xyz = self.voxel_to_world(corner_old)
        for ax in range(3):
            if flips[ax]:
                d[:, ax] = -d[:, ax]
        return CTVolume(
            hu=self.reorient(self.hu),
            spacing=spacing,
            origin=tuple(float(v) for v in origin_xyz[::-1]),
            direction=d,
            series_uid=self.series_uid,
            path=self.path,
        )


def _image_geometry(img: sitk.Image) -> tuple[tuple, tuple, np.ndarray]:
    spacing = tuple(float(s) for s in img.GetSpacing()[::-1])
    origin = tuple(float(o) for o in img.GetOrigin()[::-1])
    d = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)[::-1, ::-1].copy()
    return spacing, origin, d


TILT_MIN_DEG = 0.5  # slice steps further than this off the plane's normal: a gantry-tilted (sheared) stack


def slice_axis_from_positions(direction: np.ndarray, spacing: tuple, first_xyz, last_xyz, n: int) -> tuple[np.ndarray, tuple]:
    """Direction and spacing with the slice axis set to the real step between slice positions.
    A gantry-tilted acquisition leans every slice plane while the table moves straight along z, so
    the stack is sheared: the next slice is not along the plane's normal. Readers that assume it is
    (SimpleITK's series reader, a normal-based affine) misplace every slice but the first, by up to
    (k·step·sin tilt), and a nodule's centre can then lie outside its own scan. The step keeps the
    acquired pixels where they were measured (no resampling: every slice stays the scanner's image);
    the direction is then not orthogonal, which ``world_to_voxel`` (a general inverse) allows."""
    d = np.asarray(direction, dtype=np.float64).copy()
    if n < 2:
        return d, tuple(spacing)
    step = (np.asarray(last_xyz, dtype=np.float64) - np.asarray(first_xyz, dtype=np.float64))[::-1] / (n - 1)
    length = float(np.linalg.norm(step))
    if not length > 0 or abs(float(step @ d[:, 0])) / length >= np.cos(np.radians(TILT_MIN_DEG)):  # nan: unknown
        return d, tuple(spacing)
    d[:, 0] = step / length  # slice k lies at the first slice's position + k · step
    return d, (length, *tuple(spacing)[1:])


def _to_hu_int16(arr: np.ndarray) -> np.ndarray:
    """Clip to the int16 HU range; padding outside the scanner's field of view (−2000/−3024) becomes air."""
    return np.clip(arr, AIR_HU, np.iinfo(np.int16).max).astype(np.int16)


# ---------------------------------------------------------------- plausibility

AIR_BELOW_HU = -800  # outside the body and in the airways; lung parenchyma is ≈ −850
TISSUE_HU = (-200, 300)  # fat, muscle, blood, nodules
MIN_PRESENT = 1e-3  # a CT in HU has at least 0.1 % air voxels and 0.1 % soft-tissue voxels


def check_hu_plausible(arr: np.ndarray, name: str | Path) -> None:
    """Refuse volumes that are not chest CT in Hounsfield units, before they can become labelled
    slices: NaN/inf voxels, 8-bit images (a MET_UCHAR volume cannot hold HU), and volumes without
    both air and soft tissue (raw scanner values without the rescale, masks, empty or air-only scans)."""
    if arr.size == 0:
        raise NoduleSynthError(f"{name}: empty volume (shape {arr.shape})")
    if arr.dtype.kind == "f":
        bad = arr.size - int(np.count_nonzero(np.isfinite(arr)))
        if bad == arr.size:
            raise NoduleSynthError(f"{name}: every voxel is NaN or infinite; not a CT volume")
        if bad:
            raise NoduleSynthError(f"{name}: {bad:,} of {arr.size:,} voxels are NaN or infinite; refusing to label this scan")
    if arr.dtype.itemsize == 1:
        raise NoduleSynthError(f"{name}: 8-bit voxels ({arr.dtype}, e.g. MET_UCHAR) cannot hold Hounsfield units; "
                               "not a CT volume (a mask or a display image?)")
    lo, hi = float(arr.min()), float(arr.max())
    n = arr.size
    if np.count_nonzero(arr <= AIR_BELOW_HU) < MIN_PRESENT * n:
        raise NoduleSynthError(f"{name}: no air (values {lo:g}..{hi:g}, none ≤ {AIR_BELOW_HU} HU): not a CT in "
                               "Hounsfield units (stored without its rescale offset, or not a CT?)")
    if np.count_nonzero((arr >= TISSUE_HU[0]) & (arr <= TISSUE_HU[1])) < MIN_PRESENT * n:
        raise NoduleSynthError(f"{name}: no soft tissue ({TISSUE_HU[0]}..{TISSUE_HU[1]} HU; values {lo:g}..{hi:g}): "
                               "an empty or air-only volume, not a chest CT")


# ---------------------------------------------------------------- MetaImage (.mhd)

MET_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
             "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}


def _mhd_fields(path: Path) -> dict[str, str]:
    try:
        text = path.read_bytes()[:65536].decode("ascii", errors="strict")
    except (OSError, UnicodeDecodeError) as e:
        raise NoduleSynthError(f"{path}: not a readable MetaImage (.mhd) header ({e})") from e
    fields = {}
    for line in text.splitlines():
        m = re.match(r"\s*(\w+)\s*=\s*(.*?)\s*$", line)
        if m:
            fields[m.group(1)] = m.group(2)
        if m and m.group(1) == "ElementDataFile":
            break  # LOCAL: binary data follows
    return fields


def mhd_data_file(path: str | Path) -> Path | None:
    """The .raw/.zraw file a .mhd header names (None for LOCAL/LIST/pattern data or a bad header)."""
    path = Path(path)
    try:
        data = _mhd_fields(path).get("ElementDataFile")
    except NoduleSynthError:
        return None
    if not data or data.upper() in ("LOCAL", "LIST") or "%" in data:
        return None
    return path.parent / data


def _check_mhd(path: Path) -> None:
    """Validate the MetaImage header ourselves: SimpleITK's errors for these cases are cryptic
    ("No such file or directory" for a truncated .raw) or absent (a .raw larger than DimSize says)."""
    fields = _mhd_fields(path)
    for key in ("NDims", "DimSize", "ElementType", "ElementDataFile"):
        if key not in fields:
            raise NoduleSynthError(f"{path}: corrupt .mhd header: missing {key}")
    etype = fields["ElementType"].upper()
    if etype not in MET_BYTES:
        raise NoduleSynthError(f"{path}: unsupported ElementType {fields['ElementType']!r} "
                               f"(expected one of {', '.join(MET_BYTES)})")
    try:
        ndims = int(fields["NDims"])
        dims = [int(v) for v in fields["DimSize"].split()]
        channels = int(fields.get("ElementNumberOfChannels", "1"))
        header = int(fields.get("HeaderSize", "0"))
    except ValueError as e:
        raise NoduleSynthError(f"{path}: corrupt .mhd header ({e})") from e
    if len(dims) != ndims or min(dims, default=0) < 1:
        raise NoduleSynthError(f"{path}: DimSize {fields['DimSize']!r} does not give {ndims} positive sizes")
    raw = mhd_data_file(path)
    if raw is None:
        return
    if not raw.is_file():
        raise NoduleSynthError(f"{path}: its ElementDataFile {raw.name} is missing (expected {raw})")
    if fields.get("CompressedData", "False").lower() == "true":
        return  # size unknown until inflated; ITK checks the stream
    need = int(np.prod(dims)) * MET_BYTES[etype] * channels
    have = raw.stat().st_size
    if (header == -1 and have < need) or (header != -1 and have != header + need):
        raise NoduleSynthError(
            f"{path}: {raw.name} holds {have:,} bytes but DimSize {' × '.join(map(str, dims))} of {etype} "
            f"({MET_BYTES[etype]} bytes each) needs {need + max(header, 0):,}; truncated data or a wrong header")


def _load_mhd(path: Path) -> tuple[np.ndarray, sitk.Image]:
    _check_mhd(path)
    try:
        img = sitk.ReadImage(str(path))
        arr = sitk.GetArrayFromImage(img)
    except RuntimeError as e:
        raise NoduleSynthError(f"{path}: cannot read MetaImage ({str(e).strip().splitlines()[-1]})") from e
    if arr.ndim != 3:
        raise NoduleSynthError(f"{path}: expected a 3-D volume, got {arr.ndim}-D")
    return arr, img


# ---------------------------------------------------------------- DICOM series

STEP_TOLERANCE = 0.1  # a slice step more than 10 % off the series' median step is a gap (or an overlap)


def _slice_positions(files: list[str]) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Position of every file along the slice normal (mm), the files pydicom cannot read apart, and
    every file's ImagePositionPatient (x, y, z) (nan where unreadable)."""
    import pydicom

    pos, bad, ipps = [], [], []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True,
                                 specific_tags=["ImagePositionPatient", "ImageOrientationPatient"])
            ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
            iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
            pos.append(float(np.dot(ipp, np.cross(iop[:3], iop[3:]))))
            ipps.append(ipp)
        except Exception:  # noqa: BLE001 - pydicom raises many types for broken files
            bad.append(f)
            pos.append(np.nan)
            ipps.append(np.full(3, np.nan))
    return np.asarray(pos, dtype=np.float64), bad, np.asarray(ipps, dtype=np.float64).reshape(-1, 3)


def dicom_series_parts(folder: str | Path, split_at_gaps: bool = False) -> tuple[str, list[list[str]]]:
    """The series of ``folder`` (the largest one) as runs of evenly spaced slices, sorted along the
    slice normal. A file of the folder that cannot be read, a missing slice (gap), a repeated
    position or an uneven step is refused, naming the file or the gap, unless ``split_at_gaps``:
    then the series is cut there into contiguous parts (single slices dropped). A volume is never
    resampled over a missing slice."""
    folder = Path(folder)
    reader = sitk.ImageSeriesReader()
    try:
        uids = reader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as e:
        raise NoduleSynthError(f"{folder}: cannot scan for DICOM files ({e})") from e
    if not uids:
        raise NoduleSynthError(f"{folder}: no readable DICOM series in this folder")
    files_per = {u: list(reader.GetGDCMSeriesFileNames(str(folder), u)) for u in uids}
    uid = max(uids, key=lambda u: len(files_per[u]))
    if len(uids) > 1:
        log.warning("%s: %d DICOM series; using %s (%d files)", folder, len(uids), uid, len(files_per[uid]))
    files = files_per[uid]
    if len(files) < 2:
        raise NoduleSynthError(f"{folder}: DICOM series {uid} has {len(files)} slice(s); a CT volume needs several")
    listed = {str(Path(f).resolve()) for fs in files_per.values() for f in fs}
    unlisted = sorted(str(p) for p in folder.iterdir()
                      if p.is_file() and p.suffix.lower() == ".dcm" and str(p.resolve()) not in listed)
    if unlisted and not split_at_gaps:  # GDCM silently leaves out files it cannot parse
        raise NoduleSynthError(f"{unlisted[0]}: unreadable DICOM file in series folder {folder} "
                               f"({len(unlisted)} such file(s)); refusing to read the series with a slice missing "
                               "(prepare --split-series-at-gaps uses the intact runs of slices instead)")
    pos, bad, _ = _slice_positions(files)
    if bad:
        if not split_at_gaps:
            raise NoduleSynthError(f"{bad[0]}: DICOM file without a readable slice position (series {uid})")
        keep = np.isfinite(pos)
        files, pos = [f for f, k in zip(files, keep) if k], pos[keep]
    order = np.argsort(pos, kind="stable")
    files, pos = [files[i] for i in order], pos[order]
    steps = np.diff(pos)
    if len(steps) == 0:
        return uid, []
    median = float(np.median(steps))
    breaks = []
    for i, d in enumerate(steps):
        if median <= 0 or d <= 1e-3:
            what = f"two slices at the same position {pos[i]:.2f} mm"
        elif abs(d - median) > STEP_TOLERANCE * median:
            what = (f"a gap of {d:.2f} mm (≈ {round(d / median) - 1} missing slice(s)) between {pos[i]:.2f} and "
                    f"{pos[i + 1]:.2f} mm" if round(d / median) >= 2  # else no whole slice fits: not a gap
                    else f"an uneven step of {d:.2f} mm (median {median:.2f}) between {pos[i]:.2f} and {pos[i + 1]:.2f} mm")
        else:
            continue
        if not split_at_gaps:
            raise NoduleSynthError(f"{folder}: DICOM series {uid} has {what} ({Path(files[i]).name} → "
                                   f"{Path(files[i + 1]).name}); refusing to resample over it "
                                   "(prepare --split-series-at-gaps uses the contiguous parts instead)")
        log.warning("%s: series %s split at %s", folder, uid, what)
        breaks.append(i + 1)
    parts = [files[a:b] for a, b in zip([0, *breaks], [*breaks, len(files)])]
    return uid, [p for p in parts if len(p) >= 2]


def _load_dicom_series(folder: Path, files: list[str] | None = None) -> tuple[np.ndarray, sitk.Image, str, tuple]:
    if files is None:
        uid, parts = dicom_series_parts(folder)
        files = parts[0] if parts else []
    else:
        uid = ""
    if len(files) < 2:
        raise NoduleSynthError(f"{folder}: DICOM series has {len(files)} slice(s); a CT volume needs several")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(files))
    try:
        img = reader.Execute()
        arr = sitk.GetArrayFromImage(img)
    except RuntimeError as e:
        raise NoduleSynthError(f"{folder}: unreadable DICOM series {uid} ({str(e).strip().splitlines()[-1]})") from e
    if not uid:
        import pydicom

        uid = str(pydicom.dcmread(files[0], stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).SeriesInstanceUID)
    ends = _slice_positions([files[0], files[-1]])[2]  # the series reader's first and last slice
    return arr, img, uid, (ends[0], ends[1])


def load_ct(path: str | Path, files: list[str] | tuple[str, ...] | None = None) -> CTVolume:
    """Read a LUNA16 ``.mhd`` (series UID = file name stem) or a DICOM series folder (series UID
    from the DICOM tags; ``files``: only these slices, one part of ``dicom_series_parts``) into HU
    int16 (z, y, x). Stored orientation is kept; see ``canonical()``. Volumes that are not
    plausible chest CT in HU are refused (``check_hu_plausible``)."""
    p = Path(path)
    if not p.exists():
        raise NoduleSynthError(f"{p}: no such file or folder")
    if p.is_dir():
        arr, img, uid, ends = _load_dicom_series(p, None if files is None else list(files))
    elif p.suffix.lower() == ".mhd":
        arr, img = _load_mhd(p)
        uid = p.stem
    else:
        raise NoduleSynthError(f"{p}: expected a .mhd file or a DICOM series folder")
    spacing, origin, direction = _image_geometry(img)
    if p.is_dir():
        direction, spacing = slice_axis_from_positions(direction, spacing, *ends, arr.shape[0])
    if min(spacing) <= 0 or not np.all(np.isfinite(spacing)):
        raise NoduleSynthError(f"{p}: invalid voxel spacing {spacing}")
    check_hu_plausible(arr, p)
    return CTVolume(_to_hu_int16(arr), spacing, origin, direction, uid, str(p))


