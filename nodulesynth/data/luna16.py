"""LUNA16 layout: subset*/<seriesuid>.mhd(+.raw), annotations.csv, optional seg-lungs-LUNA16/.

LUNA16's lung segmentation labels (seg-lungs-LUNA16): 3 = left lung, 4 = right lung, 5 = trachea;
``prepare`` takes the two lungs' sides from where they lie (:func:`lung_seg_sides`), not from the values.
"""
from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import NoduleSynthError
from .records import MAX_DIAMETER_MM, Nodule

log = logging.getLogger(__name__)

LUNA16_SEG_LEFT = 3
LUNA16_SEG_RIGHT = 4
LUNA16_SEG_TRACHEA = 5
ANNOTATION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")


def read_annotations(csv_path: str | Path) -> dict[str, list[Nodule]]:
    """annotations.csv → {seriesuid: [Nodule]}. Any malformed row is an error naming file and line."""
    path = Path(csv_path)
    if not path.is_file():
        raise NoduleSynthError(f"{path}: annotations file not found")
    out: dict[str, list[Nodule]] = {}
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise NoduleSynthError(f"{path}: cannot read ({e.strerror or e})") from e
    try:  # utf-8-sig: a BOM from spreadsheet exports must not become part of "seriesuid"
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:  # e.g. a latin-1 export; UIDs and numbers are ASCII either way
        text = raw.decode("latin-1")
        log.warning("%s: not UTF-8; read as latin-1", path)
    with io.StringIO(text, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise NoduleSynthError(f"{path}: empty file (expected header {','.join(ANNOTATION_COLUMNS)})")
        header = [h.strip() for h in header]
        missing = [c for c in ANNOTATION_COLUMNS if c not in header]
        if missing:
            raise NoduleSynthError(f"{path}:1: header lacks column(s) {', '.join(missing)}")
        col = {c: header.index(c) for c in ANNOTATION_COLUMNS}
        for row in reader:
            line = reader.line_num
            if not row or all(not v.strip() for v in row):
                continue
            if len(row) < len(header):
                raise NoduleSynthError(f"{path}:{line}: expected {len(header)} fields, got {len(row)}")
            uid = row[col["seriesuid"]].strip()
            if not uid:
                raise NoduleSynthError(f"{path}:{line}: empty seriesuid")
            try:
                x, y, z, d = (float(row[col[c]]) for c in ANNOTATION_COLUMNS[1:])
            except ValueError as e:
                raise NoduleSynthError(f"{path}:{line}: not a number ({e})") from e
            if not all(math.isfinite(v) for v in (x, y, z, d)) or d <= 0:
                raise NoduleSynthError(f"{path}:{line}: coordinates must be finite and diameter_mm > 0")
            if d > MAX_DIAMETER_MM:
                raise NoduleSynthError(f"{path}:{line}: diameter_mm {d:g} is not a plausible nodule "
                                       f"(> {MAX_DIAMETER_MM:g} mm; a unit or column error?)")
            out.setdefault(uid, []).append(Nodule(uid, (x, y, z), d))
    return out


def read_lung_seg(path: str | Path) -> np.ndarray:
    """A seg-lungs-LUNA16 .mhd → uint8 (z, y, x) labels as stored (3 left, 4 right, 5 trachea)."""
    from .ct import _load_mhd  # same header checks and errors as CT files

    arr, _ = _load_mhd(Path(path))
    if arr.min() < 0 or arr.max() > 255:
        raise NoduleSynthError(f"{path}: lung segmentation values outside 0..255")
    return arr.astype(np.uint8)


def lung_seg_sides(seg: np.ndarray, name: str = "lung segmentation") -> np.ndarray:
    """A canonical (z, y, x) lung seg (see ``CTVolume.reorient``) with its two lung labels set by
    where they lie: the label whose voxels sit on the image's right is the patient's left.

    Why: a side swapped in a mask becomes a wrongly labelled training slice, and the values 3/4
    are a convention of the files, which copies and re-exports of LUNA16 do not all keep; the
    anatomy is not a convention. A volume holding only one of the two labels is kept as stored."""
    cols = {v: np.nonzero(seg == v)[2] for v in (LUNA16_SEG_LEFT, LUNA16_SEG_RIGHT)}
    if min(len(c) for c in cols.values()) == 0:
        return seg
    if cols[LUNA16_SEG_LEFT].mean() >= cols[LUNA16_SEG_RIGHT].mean():
        return seg
    log.warning("%s: label %d lies on the patient's right and %d on the left; taking the sides by position",
                name, LUNA16_SEG_LEFT, LUNA16_SEG_RIGHT)
    out = seg.copy()
    out[seg == LUNA16_SEG_LEFT] = LUNA16_SEG_RIGHT
    out[seg == LUNA16_SEG_RIGHT] = LUNA16_SEG_LEFT
    return out


@dataclass
class Luna16Scan:
    series_uid: str
    mhd: Path
    seg: Path | None
    nodules: list[Nodule]


@dataclass
class Luna16Index:
    """Scans with at least one annotated nodule; the rest are counted, not listed."""

    root: Path
    scans: list[Luna16Scan]
    n_scans_found: int
    n_skipped_no_nodules: int
    n_annotated_missing: int  # annotated series UIDs with no .mhd on disk
    annotations: dict[str, list[Nodule]] = field(default_factory=dict)

    @property
    def n_nodules(self) -> int:
        return sum(len(s.nodules) for s in self.scans)

    def summary(self) -> str:
        return (
            f"LUNA16 {self.root}: {self.n_scans_found} scans, {len(self.scans)} with nodules "
            f"({self.n_nodules} nodules), {self.n_skipped_no_nodules} skipped without nodules, "
            f"{self.n_annotated_missing} annotated scans not on disk, "
            f"{sum(s.seg is not None for s in self.scans)} with lung segmentation"
        )


def discover_luna16(root: str | Path) -> Luna16Index:
    """Index a LUNA16-style root: subset*/ folders of .mhd, annotations.csv, optional seg-lungs-LUNA16/."""
    root = Path(root)
    if not root.is_dir():
        raise NoduleSynthError(f"--luna16 {root}: not a folder")
    ann_path = root / "annotations.csv"
    if not ann_path.is_file():
        found = sorted(root.rglob("annotations.csv"))
        if not found:
            raise NoduleSynthError(f"--luna16 {root}: no annotations.csv in this folder")
        ann_path = found[0]
    annotations = read_annotations(ann_path)
    subsets = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("subset"))
    mhds = sorted(m for s in subsets for m in s.glob("*.mhd"))
    if not mhds:
        raise NoduleSynthError(f"--luna16 {root}: no subset*/*.mhd scans found")
    seg_dir = root / "seg-lungs-LUNA16"
    scans, skipped = [], 0
    for mhd in mhds:
        uid = mhd.stem
        if uid not in annotations:
            skipped += 1
            continue
        seg = seg_dir / f"{uid}.mhd"
        scans.append(Luna16Scan(uid, mhd, seg if seg.is_file() else None, annotations[uid]))
    on_disk = {m.stem for m in mhds}
    missing = sum(1 for u in annotations if u not in on_disk)
    return Luna16Index(root, scans, len(mhds), skipped, missing, annotations)
