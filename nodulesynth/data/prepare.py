"""Prepare a training slice dataset from real CT (LUNA16, LIDC-IDRI, DICOM, NIfTI/NRRD/MHA, MSD, LIDC crops).

This module handles LUNA16 and LIDC-IDRI; ``volumes`` handles --dicom/--volume/--msd and ``crops``
--lidc-crops, with the same shards, resume and atomic output. Every source records the patient of
each slice and a patient-level train/val/test split (``splits``).

Per scan: load and reorient (radiological display), pick every axial slice crossing a nodule
(LUNA16: the annotated sphere; LIDC: the slices radiologists outlined, ≥50 % reader vote) plus a
fraction of nodule-free lung slices (≥ 5 mm from any nodule), build the 6-class mask on the native
grid, then resample image (linear) and mask (nearest) to a fixed in-plane spacing and centre-crop /
pad (−1024 HU) to size×size around the body. Boxes come from the resampled mask.

Resumable: each finished scan is a shard in ``.<out>.shards/`` beside ``--out`` (written atomically,
skipped when present with the same settings); the shards are then streamed into the final
``SliceDataset`` folder (see ``nodulesynth.data.slices``), which appears under ``--out`` by one
atomic rename, and the shards are removed.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import json
import logging
import os
import shutil
import time
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from scipy import ndimage as ndi
from tqdm import tqdm

from ..errors import NoduleSynthError
from ..io import (atomic_dir, atomic_file, check_out_dir, disk_full_error, free_bytes, is_disk_full, out_path,
                  tree_bytes, write_json)
from ..masks.boxes import mask_to_boxes
from ..masks.classes import MaskClass
from ..masks.semantic import semantic_mask, thoracic_air
from .ct import AIR_HU, CTVolume, dicom_series_parts, load_ct, mhd_data_file
from .lidc import lidc_series_uid, nodules_from_lidc, reframe_contours
from .luna16 import discover_luna16, lung_seg_sides, read_lung_seg
from .records import Nodule
from .sections import nodules_in_slice
from .dicom_tree import dicom_patient_id
from .slices import SliceRecord, write_slice_dataset
from .splits import assign_splits, parse_fractions

log = logging.getLogger(__name__)

NEGATIVE_MARGIN_MM = 5.0
MIN_LUNG_MM2 = 1000.0  # a nodule-free slice must show at least this much lung


@dataclass
class PrepareConfig:
    out: Path
    luna16: Path | None = None
    lidc: Path | None = None
    size: int = 512
    spacing_mm: float = 0.8
    negatives: float = 0.1  # nodule-free slices per nodule slice (expected value, per scan)
    seed: int = 0
    preview: bool = False
    overwrite: bool = False
    max_scans: int | None = None
    include_small: bool = False  # LIDC < 3 mm point marks as 3 mm spheres
    min_section_mm: float = 1.0  # smallest sphere cross-section radius that counts as a nodule slice
    split_series_at_gaps: bool = False  # DICOM: cut a series with a missing slice into its intact parts
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train/val/test by patient (data.splits)
    split_seed: int = 0

    def validate(self) -> None:
        if (self.luna16 is None) == (self.lidc is None):
            raise NoduleSynthError("prepare: give exactly one of --luna16 ROOT or --lidc ROOT")
        check_slice_settings(self)

    def fingerprint(self) -> dict:
        """Settings a shard depends on (resume only reuses shards made with the same ones)."""
        return settings_fingerprint(self)


def check_slice_settings(cfg) -> None:
    """The resampling/selection options every scan source shares (``--size``, ``--spacing``,
    ``--negatives``, ``--max-scans``, ``--seed``): one clear error for the first bad one."""
    if not 16 <= cfg.size <= 4096:
        raise NoduleSynthError(f"--size {cfg.size}: must be between 16 and 4096")
    if not 0.05 <= cfg.spacing_mm <= 10:
        raise NoduleSynthError(f"--spacing {cfg.spacing_mm}: must be between 0.05 and 10 mm")
    if not 0 <= cfg.negatives <= 10:
        raise NoduleSynthError(f"--negatives {cfg.negatives}: must be between 0 and 10")
    if cfg.max_scans is not None and cfg.max_scans < 1:
        raise NoduleSynthError(f"--max-scans {cfg.max_scans}: must be ≥ 1")
    if cfg.seed < 0:
        raise NoduleSynthError(f"--seed {cfg.seed}: must be ≥ 0")


# Config fields that change neither a shard's content nor its meaning (output place, resume limit, splits).
_NOT_IN_FINGERPRINT = ("out", "preview", "overwrite", "max_scans", "split_fractions", "split_seed")


def settings_fingerprint(cfg) -> dict:
    """A config dataclass as the JSON-able settings its shards depend on (paths resolved, lists
    of paths too), so a resume only reuses shards made with the same ones."""

    def norm(v):
        return str(Path(v).resolve()) if isinstance(v, Path) else [norm(x) for x in v] if isinstance(v, list) else v

    d = asdict(cfg)
    for k in _NOT_IN_FINGERPRINT:
        d.pop(k, None)
    return {k: norm(v) for k, v in d.items()}


@dataclass
class ScanJob:
    key: str  # unique shard name
    source: str  # "luna16" | "lidc"
    path: Path  # .mhd or DICOM folder
    nodules: list[Nodule] | None = None  # LUNA16 (world spheres)
    seg: Path | None = None
    xml: Path | None = None
    files: tuple[str, ...] | None = None  # DICOM: only these slices (one part of a series split at a gap)


# ---------------------------------------------------------------- discovery


def discover_lidc(root: Path, split_at_gaps: bool = False) -> tuple[list[ScanJob], int]:
    """DICOM series folders under ``root`` paired with their LIDC XML (same folder, else a parent
    folder up to ``root``, matched by SeriesInstanceUid). Returns (jobs, series skipped without XML).
    ``split_at_gaps``: a series with a missing slice becomes one job per intact part."""
    import pydicom

    root = Path(root)
    if not root.is_dir():
        raise NoduleSynthError(f"--lidc {root}: not a folder")
    xml_by_uid: dict[str, Path] = {}
    series_dirs: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for f in sorted(filenames):
            if f.lower().endswith(".xml"):
                uid = lidc_series_uid(Path(dirpath) / f)
                if uid:
                    xml_by_uid.setdefault(uid, Path(dirpath) / f)
        if sum(f.lower().endswith(".dcm") for f in filenames) >= 2:
            series_dirs.append(Path(dirpath))
    if not series_dirs:
        raise NoduleSynthError(f"--lidc {root}: no DICOM series folders (.dcm files) found")
    jobs, skipped = [], 0
    for d in series_dirs:
        first = next(p for p in sorted(d.iterdir()) if p.suffix.lower() == ".dcm")
        try:
            ds = pydicom.dcmread(first, stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "Modality"])
        except Exception as e:  # pydicom raises many types for broken files
            raise NoduleSynthError(f"{first}: unreadable DICOM file ({e})") from e
        uid = str(getattr(ds, "SeriesInstanceUID", ""))
        if getattr(ds, "Modality", "CT") != "CT" or uid not in xml_by_uid:
            skipped += 1
            continue
        if not split_at_gaps:
            jobs.append(ScanJob(uid, "lidc", d, xml=xml_by_uid[uid]))
            continue
        _, parts = dicom_series_parts(d, split_at_gaps=True)
        for i, part in enumerate(parts):
            key = uid if len(parts) == 1 else f"{uid}.part{i + 1}"
            jobs.append(ScanJob(key, "lidc", d, xml=xml_by_uid[uid], files=tuple(part)))
    return jobs, skipped


def _jobs(cfg: PrepareConfig) -> tuple[list[ScanJob], dict]:
    if cfg.luna16 is not None:
        index = discover_luna16(cfg.luna16)
        log.info(index.summary())
        jobs = [ScanJob(s.series_uid, "luna16", s.mhd, s.nodules, s.seg) for s in index.scans]
        summary = {
            "scans_found": index.n_scans_found,
            "scans_with_nodules": len(index.scans),
            "scans_skipped_no_nodules": index.n_skipped_no_nodules,
            "annotated_scans_missing": index.n_annotated_missing,
        }
    else:
        jobs, skipped = discover_lidc(cfg.lidc, cfg.split_series_at_gaps)
        summary = {"scans_found": len(jobs) + skipped, "scans_with_xml": len(jobs), "scans_skipped_no_xml": skipped}
    if not jobs:
        raise NoduleSynthError(f"{cfg.luna16 or cfg.lidc}: no scans with nodule annotations found")
    if cfg.max_scans is not None:
        jobs = jobs[: cfg.max_scans]
    return jobs, summary


# ---------------------------------------------------------------- per scan


def resample_slice(
    hu: np.ndarray, mask: np.ndarray, spacing: tuple[float, float], center_yx: tuple[float, float], size: int, target: float
) -> tuple[np.ndarray, np.ndarray]:
    """Resample to ``target`` mm pixels, size×size, centred on ``center_yx`` (native pixels);
    outside the scan is air (image) / background (mask)."""
    scale = np.array([target / spacing[0], target / spacing[1]])
    offset = np.asarray(center_yx, dtype=np.float64) - scale * (size - 1) / 2.0
    img = ndi.affine_transform(
        hu.astype(np.float32), scale, offset=offset, output_shape=(size, size), order=1, mode="constant", cval=AIR_HU
    )
    msk = ndi.affine_transform(mask, scale, offset=offset, output_shape=(size, size), order=0, mode="constant", cval=0)
    return np.clip(np.rint(img), -32768, 32767).astype(np.int16), msk.astype(np.uint8)


def _body_center(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return ((mask.shape[0] - 1) / 2.0, (mask.shape[1] - 1) / 2.0)
    return ((ys.min() + ys.max()) / 2.0, (xs.min() + xs.max()) / 2.0)


def dicom_slice_mask(path: Path, min_lung_mm2: float, size: int = 512, target: float = 0.8) -> np.ndarray | None:
    """One single-slice CT DICOM file → its 6-class mask resampled as ``prepare`` does (``target``
    mm pixels, size×size, body-centred), or None when either lung covers < ``min_lung_mm2``
    (a slice above or below the lungs): real anatomy for benchmarks and tests."""
    import pydicom

    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    sp = tuple(float(v) for v in ds.PixelSpacing)
    m = semantic_mask(hu, sp)
    if min((m == MaskClass.LEFT_LUNG).sum(), (m == MaskClass.RIGHT_LUNG).sum()) * sp[0] * sp[1] < min_lung_mm2:
        return None
    return resample_slice(hu, m, sp, _body_center(m), size, target)[1]


def _load_job(job: ScanJob, cfg: PrepareConfig) -> tuple[CTVolume, list[Nodule], np.ndarray | None]:
    raw = load_ct(job.path, files=job.files)
    ct = raw.canonical()
    seg = None
    if job.source == "luna16":
        nodules = job.nodules or []
        if job.seg is not None:
            seg_raw = read_lung_seg(job.seg)
            if seg_raw.shape != raw.hu.shape:
                raise NoduleSynthError(f"{job.seg}: lung segmentation shape {seg_raw.shape} != CT {raw.hu.shape}")
            seg = lung_seg_sides(raw.reorient(seg_raw), str(job.seg))
    else:
        nodules = reframe_contours(nodules_from_lidc(job.xml, raw, include_small=cfg.include_small), raw, ct)
    return ct, nodules, seg


def process_scan(job: ScanJob, cfg: PrepareConfig) -> tuple[np.ndarray, np.ndarray, list[SliceRecord], int]:
    """One scan → (images (n,S,S) int16, masks (n,S,S) uint8, records, nodules seen on them)."""
    ct, nodules, seg = _load_job(job, cfg)
    rng = np.random.default_rng([cfg.seed, zlib.crc32(job.key.encode())])
    zs = ct.slice_z_mm()
    sp = (ct.spacing[1], ct.spacing[2])
    picked: list[tuple[int, np.ndarray, int]] = []  # (k, native mask, n nodules)
    for n in nodules:
        if not ct.contains(ct.world_to_voxel(n.center_xyz_mm)):
            log.warning("%s: nodule at (%.1f, %.1f, %.1f) mm (%.1f mm) has its centre outside the scan; only "
                        "cross-sections inside it are labelled", job.path, *n.center_xyz_mm, n.diameter_mm)
    no_lung = []
    # bowel gas is never lung; without nodules no slice is drawn (no positives, so no negatives)
    lung_air = thoracic_air(ct.hu, ct.spacing) if seg is None and nodules else None
    air = (lambda k: None) if lung_air is None else lung_air.__getitem__  # noqa: E731
    for k in range(ct.shape[0]):
        sns = nodules_in_slice(ct, k, nodules, cfg.min_section_mm)
        if not sns:
            continue
        m = semantic_mask(ct.hu[k], sp, sns, None if seg is None else seg[k], air(k))
        if (m == MaskClass.NODULE).any():  # else readers disagree here: neither positive nor negative
            if not np.isin(m, (MaskClass.LEFT_LUNG, MaskClass.RIGHT_LUNG)).any():
                no_lung.append(float(zs[k]))  # a nodule with no lung around it is not a lung nodule slice
                continue
            picked.append((k, m, len(sns)))
    if no_lung and not picked:
        raise NoduleSynthError(f"{job.path}: no lung found on any of its {len(no_lung)} nodule slice(s); refusing "
                               "to label them (not a chest CT, or annotations of another scan?)")
    if no_lung:
        log.warning("%s: %d nodule slice(s) without lungs skipped (z = %s mm)", job.path, len(no_lung),
                    ", ".join(f"{z:.1f}" for z in no_lung))
    n_pos = len(picked)
    pos_k = [k for k, _, _ in picked]
    n_seen = sum(any(nodules_in_slice(ct, k, [n], cfg.min_section_mm) for k in pos_k) for n in nodules)
    n_neg = int(np.floor(cfg.negatives * n_pos + rng.random())) if n_pos else 0
    if n_neg:
        near = np.zeros(len(zs), dtype=bool)
        for n in nodules:
            lo, hi = n.z_range_mm
            near |= (zs >= lo - NEGATIVE_MARGIN_MM) & (zs <= hi + NEGATIVE_MARGIN_MM)
        cands = rng.permutation(np.flatnonzero(~near))[: 3 * n_neg + 3]
        px_mm2 = sp[0] * sp[1]
        for k in cands:
            m = semantic_mask(ct.hu[k], sp, (), None if seg is None else seg[k], air(k))
            if np.isin(m, (MaskClass.LEFT_LUNG, MaskClass.RIGHT_LUNG)).sum() * px_mm2 >= MIN_LUNG_MM2:
                picked.append((int(k), m, 0))
                n_neg -= 1
                if n_neg == 0:
                    break
    picked.sort(key=lambda t: t[0])
    s = cfg.size
    images = np.empty((len(picked), s, s), dtype=np.int16)
    masks = np.empty((len(picked), s, s), dtype=np.uint8)
    records = []
    for i, (k, m, nn) in enumerate(picked):
        center = _body_center(m)
        images[i], masks[i] = resample_slice(ct.hu[k], m, sp, center, s, cfg.spacing_mm)
        boxes = mask_to_boxes(masks[i])
        records.append(
            SliceRecord(
                series_uid=ct.series_uid,
                z_mm=float(zs[k]),
                slice_index=int(k),
                spacing_mm=(cfg.spacing_mm, cfg.spacing_mm),
                boxes=boxes,
                source=job.source,
                has_nodule=bool(len(boxes)),
                scan_path=str(job.path),
                crop_center_yx=center,
                n_nodules=nn,
            )
        )
    return images, masks, records, n_seen


# ---------------------------------------------------------------- shards and driver


def _inputs(cfg: PrepareConfig) -> list[tuple[str, Path]]:
    """Every input path of the settings (any Path field but ``out``): --out must stay clear of them."""
    return [(f"--{k.replace('_', '-')}", v) for k, v in vars(cfg).items() if k != "out" and isinstance(v, Path)]


def _shard_dir(cfg: PrepareConfig) -> Path:
    out = Path(cfg.out).resolve()  # "." has no name of its own
    return out.parent / f".{out.name}.shards"


def _safe(key: str) -> str:
    return key if key.replace(".", "").replace("-", "").replace("_", "").isalnum() else hashlib.sha1(key.encode()).hexdigest()


@contextmanager
def _shards(cfg: PrepareConfig) -> Iterator[Path]:
    """The shard folder for these settings (shards made with other settings are discarded), for the
    ``with`` block that fills it. A run that fails before its first shard is finished leaves no shard to
    resume from, so the folder goes again: a refusal writes nothing beside ``--out``."""
    d = _shard_dir(cfg)
    fp = cfg.fingerprint()
    stamp = d / "settings.json"
    if d.exists():
        try:
            same = json.loads(stamp.read_text()) == fp
        except (OSError, json.JSONDecodeError):
            same = False
        if not same:
            shutil.rmtree(d)
    d.mkdir(parents=True, exist_ok=True)
    if not stamp.exists():
        write_json(stamp, fp)
    try:
        yield d
    except BaseException:
        if d.is_dir() and all(f.name == "settings.json" for f in d.iterdir()):
            shutil.rmtree(d, ignore_errors=True)
        raise


def _file_stamp(p: Path) -> list:
    """Name, size and mtime of a file, or of every file in a folder (a DICOM series); for a .mhd
    also its data file, whose name the header gives."""
    if p.is_dir():
        return [x for f in sorted(p.iterdir()) if f.is_file() for x in _file_stamp(f)]
    try:
        st = p.stat()
    except OSError:
        return [str(p), None]
    out = [str(p), st.st_size, st.st_mtime_ns]
    if p.suffix.lower() == ".mhd":
        raw = mhd_data_file(p)
        if raw is not None and raw != p:
            out += _file_stamp(raw)
    return out


def _nodule_rows(nodules) -> list:
    """The annotations of one scan, as numbers (contour points hashed): editing a row changes this."""
    rows = []
    for n in nodules:
        pts = hashlib.sha256(b"".join(np.ascontiguousarray(c.points_xy, np.float64).tobytes() + repr((c.z_mm, c.inclusion, c.reader)).encode()
                                      for c in n.contours)).hexdigest()
        rows.append([n.series_uid, [float(v) for v in n.center_xyz_mm], float(n.diameter_mm), n.reader, pts])
    return rows


def input_stamp(job: ScanJob) -> str:
    """Fingerprint of what a scan's shard was made from: size + mtime of every input file (CT,
    its .raw or DICOM files, lung seg) and the content of its annotations (its annotations.csv
    rows, its XML). A shard whose stamp differs is stale and is recomputed on resume."""
    h = hashlib.sha256()
    for k, v in sorted(vars(job).items()):
        if isinstance(v, Path):
            h.update(json.dumps([k, _file_stamp(v)]).encode())
            if v.is_file() and v.suffix.lower() == ".xml":
                h.update(hashlib.sha256(v.read_bytes()).digest())
        elif isinstance(v, list) and v and isinstance(v[0], Nodule):
            h.update(json.dumps([k, _nodule_rows(v)]).encode())
        elif isinstance(v, (str, int, float, bool, tuple, type(None))):
            h.update(json.dumps([k, v]).encode())
    return h.hexdigest()


def _write_shard(d: Path, key: str, images: np.ndarray, masks: np.ndarray, records: list[SliceRecord], n_nodules: int,
                 stamp: str = "") -> None:
    name = _safe(key)
    try:
        for suffix, arr in ((".images.npy", images), (".masks.npy", masks)):
            with atomic_file(d / f"{name}{suffix}", "wb") as fh:
                np.save(fh, arr)
        write_json(  # last: marks the shard done
            d / f"{name}.json",
            {"key": key, "inputs": stamp, "n_nodules": n_nodules, "records": [r.to_json() for r in records]},
        )
    except BaseException:  # no half shard (e.g. images without masks on a full disk)
        for suffix in (".images.npy", ".masks.npy", ".json"):
            (d / f"{name}{suffix}").unlink(missing_ok=True)
        raise


def _read_shard(d: Path, key: str, stamp: str = "") -> tuple[np.ndarray, np.ndarray, list[SliceRecord], int] | None:
    name = _safe(key)
    j = d / f"{name}.json"
    if not j.is_file():
        return None
    try:
        info = json.loads(j.read_text())
    except (OSError, ValueError):
        return None
    if info.get("inputs") != stamp:  # made from other input files or annotations: stale
        return None
    recs = [SliceRecord.from_json(r) for r in info["records"]]
    images = np.load(d / f"{name}.images.npy", mmap_mode="r")
    masks = np.load(d / f"{name}.masks.npy", mmap_mode="r")
    return images, masks, recs, int(info["n_nodules"])


def _preview(folder: Path, records: list[SliceRecord], n: int = 16) -> Path:
    from ..viz import preview_grid

    images = np.load(folder / "images.npy", mmap_mode="r")
    masks = np.load(folder / "masks.npy", mmap_mode="r")
    pos = [i for i, r in enumerate(records) if r.has_nodule]
    neg = [i for i, r in enumerate(records) if not r.has_nodule]
    take_pos = [pos[int(j)] for j in np.linspace(0, len(pos) - 1, min(len(pos), n - min(len(neg), n // 4)))] if pos else []
    take = sorted(set(take_pos) | set(neg[: n - len(take_pos)]))
    path = folder / "preview.png"
    preview_grid(path, [images[i] for i in take], [masks[i] for i in take], [records[i].boxes for i in take], columns=4)
    return path


def prepare(cfg: PrepareConfig) -> Path:
    """Run the whole preparation; returns the dataset folder (``cfg.out``)."""
    cfg.validate()
    out = check_out_dir(cfg.out, cfg.overwrite, inputs=_inputs(cfg))
    t0 = time.time()
    jobs, summary = _jobs(cfg)
    parts = []
    with _shards(cfg) as shards:
        for i, job in enumerate(tqdm(jobs, desc="prepare", unit="scan")):
            stamp = input_stamp(job)
            got = _read_shard(shards, job.key, stamp)
            if got is None:
                result = process_scan(job, cfg)
                try:
                    _write_shard(shards, job.key, *result, stamp=stamp)
                except OSError as e:
                    if not is_disk_full(e):
                        raise
                    done = tree_bytes(shards)  # finished shards stay: a rerun with more space resumes from them
                    per_scan = (done + result[0].nbytes + result[1].nbytes) / (i + 1)
                    raise disk_full_error(e, shards, int(per_scan * len(jobs) * 2) - done) from e  # shards + dataset
                got = _read_shard(shards, job.key, stamp)
            for r in got[2]:  # patient ids (LUNA16 has none: one scan = one patient)
                r.patient = r.patient or (dicom_patient_id(job.path) if job.source == "lidc" else r.series_uid)
            parts.append(got)
    parts = [p for p in parts if len(p[2])]
    if not parts:
        raise NoduleSynthError(f"{cfg.luna16 or cfg.lidc}: no slice crossed an annotated nodule; nothing to write")
    records = [r for p in parts for r in p[2]]
    split = assign_splits(records, cfg.split_fractions, cfg.split_seed)
    n_nodule_series = len({r.series_uid for r in records if r.has_nodule})
    meta = {
        "source": "luna16" if cfg.luna16 is not None else "lidc",
        "root": str(cfg.luna16 or cfg.lidc),
        "classes": {c.name.lower(): int(c) for c in MaskClass},
        "box_format": "xyxy pixel edges",
        "settings": cfg.fingerprint(),
        "scans": {**summary, "scans_prepared": len(jobs), "scans_with_nodule_slices": n_nodule_series},
        "n_nodules": int(sum(p[3] for p in parts)),
        "split": split,
        "seconds": round(time.time() - t0, 2),  # scan processing (shards reused on resume are not re-timed)
    }
    need = sum(p[0].nbytes + p[1].nbytes for p in parts)
    if free_bytes(out.parent) < need:  # the dataset is as big as the shards: refuse before writing
        raise disk_full_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), out.parent, need)
    return write_prepared(out, shards, parts, records, meta, cfg, _inputs(cfg), need_bytes=need)


def write_prepared(out: Path, shards: Path, parts: list, records: list[SliceRecord], meta: dict, cfg,
                   inputs, need_bytes: int | None = None) -> Path:
    """Last step of every source: the shards' slices as one dataset folder (atomically, with the
    preview grid if ``cfg.preview``), then the shards go (only once the dataset stands)."""
    with atomic_dir(out, cfg.overwrite, inputs=inputs, need_bytes=need_bytes) as tmp:
        write_slice_dataset(tmp, [p[0] for p in parts], [p[1] for p in parts], records, meta)
        if cfg.preview:
            _preview(tmp, records)
    shutil.rmtree(shards, ignore_errors=True)
    return out


# ---------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--luna16", type=Path, metavar="ROOT", help="LUNA16 root: subset*/, annotations.csv, [seg-lungs-LUNA16/]")
    src.add_argument("--lidc", type=Path, metavar="ROOT", help="LIDC-IDRI root: DICOM series folders with their XML")
    src.add_argument("--dicom", type=Path, metavar="DIR", help="any tree of CT DICOM files (grouped by series); DICOM SEG or RTSTRUCT files in it label "
                                                              "their series' lesions, other series are unlabelled")
    src.add_argument("--volume", type=Path, action="append", metavar="IMG",
                     help="a CT volume file (.nii/.nii.gz/.nrrd/.mha/.mhd); repeatable, pairs in order with --label")
    src.add_argument("--msd", type=Path, metavar="ROOT", help="Medical Segmentation Decathlon task: imagesTr/ + labelsTr/")
    src.add_argument("--lidc-crops", type=Path, metavar="NPZ", help="LIDC nodule crops npz (128² crops, reader masks)")
    p.add_argument("--label", type=Path, action="append", default=[], metavar="LBL",
                   help="lesion label for the matching --volume (non-zero = lesion → nodule class)")
    p.add_argument("--every-k", type=int, default=1,
                   help="unlabelled sources: keep every k-th slice that passes through both lungs (default 1)")
    p.add_argument("--min-lung-mm2", type=float, default=500.0,
                   help="unlabelled sources: a kept slice shows at least this much of EACH lung (default 500)")
    p.add_argument("--split-fractions", default="0.8,0.1,0.1", metavar="TR,VA,TE",
                   help="train,val,test fractions of PATIENTS (default 0.8,0.1,0.1)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the patient split (default 0)")
    from .crops import add_arguments as crops_arguments

    crops_arguments(p)
    p.add_argument("--out", type=out_path, required=True, help="output dataset folder")
    p.add_argument("--size", type=int, default=512, help="output slice size in pixels (default 512)")
    p.add_argument("--spacing", type=float, default=0.8, help="output in-plane pixel spacing in mm (default 0.8)")
    p.add_argument("--negatives", type=float, default=0.1, help="nodule-free slices per nodule slice (default 0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-scans", type=int, default=None, help="only the first N scans (quick looks)")
    p.add_argument("--include-small", action="store_true", help="LIDC: keep <3 mm point marks as 3 mm nodules")
    p.add_argument("--split-series-at-gaps", action="store_true",
                   help="DICOM: a series with a missing/unreadable slice is cut into its contiguous parts "
                        "(default: refused; slices are never interpolated over a gap)")
    p.add_argument("--preview", action="store_true", help="also write preview.png (slices, masks, boxes)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def run(args: argparse.Namespace) -> int:
    from .volumes import prepare_other_source

    out = prepare_other_source(args)
    if out is not None:
        _report(out, args.preview)
        return 0
    cfg = PrepareConfig(
        out=args.out,
        luna16=args.luna16,
        lidc=args.lidc,
        size=args.size,
        spacing_mm=args.spacing,
        negatives=args.negatives,
        seed=args.seed,
        preview=args.preview,
        overwrite=args.overwrite,
        max_scans=args.max_scans,
        include_small=args.include_small,
        split_series_at_gaps=getattr(args, "split_series_at_gaps", False),
        split_fractions=parse_fractions(args.split_fractions),
        split_seed=args.split_seed,
    )
    _report(prepare(cfg), cfg.preview)
    return 0


def _report(out: Path, preview: bool) -> None:
    meta = json.loads((out / "index.json").read_text())["meta"]
    sp = meta.get("split", {}).get("patients", {})
    print(
        f"prepared {meta['n_slices']} slices ({meta['n_nodule_slices']} with nodules, {meta['n_boxes']} boxes, "
        f"{meta['n_nodules']} nodules) from {meta['n_series']} scans of {meta.get('n_patients', '?')} patients "
        f"(train/val/test patients {sp.get('train', 0)}/{sp.get('val', 0)}/{sp.get('test', 0)})"
        + ("" if meta.get("labelled", True) else ", UNLABELLED source (no nodule annotations)")
        + f" in {meta['seconds']:.1f} s → {out}"
        + (f" (preview: {out / 'preview.png'})" if preview else "")
    )
