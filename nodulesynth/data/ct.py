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

log = logging.getLogger(__name__)

AIR_HU = -1024


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


def _to_hu_int16(arr: np.ndarray) -> np.ndarray:
    """Clip to the int16 HU range; padding outside the scanner's field of view (−2000/−3024) becomes air."""
    return np.clip(arr, AIR_HU, np.iinfo(np.int16).max).astype(np.int16)


def _check_mhd(path: Path) -> None:
    """Validate the MetaImage header ourselves: SimpleITK's errors for these cases are cryptic."""
    try:
        text = path.read_bytes()[:65536].decode("ascii", errors="strict")
    except (OSError, UnicodeDecodeError) as e:
        raise NoduleSynthError(f"{path}: not a readable MetaImage (.mhd) header ({e})") from e
    fields = {}
    for line in text.splitlines():
        m = re.match(r"\s*(\w+)\s*=\s*(.*?)\s*$", line)
        if m:
            fields[m.group(1)] = m.group(2)
    for key in ("NDims", "DimSize", "ElementType", "ElementDataFile"):
        if key not in fields:
            raise NoduleSynthError(f"{path}: corrupt .mhd header: missing {key}")
    data = fields["ElementDataFile"]
    if data.upper() not in ("LOCAL", "LIST") and "%" not in data:
        raw = path.parent / data
        if not raw.is_file():
            raise NoduleSynthError(f"{path}: its ElementDataFile {raw.name} is missing (expected {raw})")


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


def _load_dicom_series(folder: Path) -> tuple[np.ndarray, sitk.Image, str]:
    reader = sitk.ImageSeriesReader()
    try:
        uids = reader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as e:
        raise NoduleSynthError(f"{folder}: cannot scan for DICOM files ({e})") from e
    if not uids:
        raise NoduleSynthError(f"{folder}: no readable DICOM series in this folder")
    files_per = {u: reader.GetGDCMSeriesFileNames(str(folder), u) for u in uids}
    uid = max(uids, key=lambda u: len(files_per[u]))
    if len(uids) > 1:
        log.warning("%s: %d DICOM series; using %s (%d files)", folder, len(uids), uid, len(files_per[uid]))
    files = files_per[uid]
    if len(files) < 2:
        raise NoduleSynthError(f"{folder}: DICOM series {uid} has {len(files)} slice(s); a CT volume needs several")
    reader.SetFileNames(files)
    try:
        img = reader.Execute()
        arr = sitk.GetArrayFromImage(img)
    except RuntimeError as e:
        raise NoduleSynthError(f"{folder}: unreadable DICOM series {uid} ({str(e).strip().splitlines()[-1]})") from e
    return arr, img, uid


def load_ct(path: str | Path) -> CTVolume:
    """Read a LUNA16 ``.mhd`` (series UID = file name stem) or a DICOM series folder (series UID
    from the DICOM tags) into HU int16 (z, y, x). Stored orientation is kept; see ``canonical()``."""
    p = Path(path)
    if not p.exists():
        raise NoduleSynthError(f"{p}: no such file or folder")
    if p.is_dir():
        arr, img, uid = _load_dicom_series(p)
    elif p.suffix.lower() == ".mhd":
        arr, img = _load_mhd(p)
        uid = p.stem
    else:
        raise NoduleSynthError(f"{p}: expected a .mhd file or a DICOM series folder")
    spacing, origin, direction = _image_geometry(img)
    if min(spacing) <= 0 or not np.all(np.isfinite(spacing)):
        raise NoduleSynthError(f"{p}: invalid voxel spacing {spacing}")
    return CTVolume(_to_hu_int16(arr), spacing, origin, direction, uid, str(p))

