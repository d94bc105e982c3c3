"""Generic CT input for ``prepare``: DICOM trees, volume files (NIfTI, NRRD, MHA/MHD) with optional
lesion labels, and the Medical Segmentation Decathlon layout → a prepared slice dataset.

Users' data is rarely LUNA16: this reads what hospitals and public challenges hand out.
- ``--dicom DIR``: every CT slice under DIR, grouped into volumes by SeriesInstanceUID
  (``dicom_tree``); a volume that DICOM SEG or RTSTRUCT files of the tree annotate (``dicom_labels``:
  their lesions) is labelled by them, the others are unlabelled.
- ``--volume IMG [--label LBL]`` (repeatable; labels pair with volumes in order): any file
  SimpleITK reads as a 3-D image. A label must have the image's size and grid; every non-zero
  label voxel is lesion → class 5 (NODULE).
- ``--msd ROOT``: ``ROOT/imagesTr/*.nii.gz`` with ``ROOT/labelsTr/<same name>`` (the Decathlon's
  lung task: label 1 = cancer → class 5). ``imagesTs`` has no labels and is not read.

Slices kept (documented choice, recorded in the meta):
- labelled volume: every slice with lesion voxels, plus ``negatives`` × as many lesion-free
  slices ≥ 5 mm from any lesion that show ≥ 1000 mm² of lung (true negatives: the label covers the
  whole volume) — the same rule as the LUNA16/LIDC path;
- unlabelled volume (DICOM without SEG/RTSTRUCT, ``--volume`` without ``--label``): every ``every_k``-th slice (counted
  from the volume's first slice) that passes through BOTH lungs (each lung's largest piece ≥ ``min_lung_mm2``).
  These slices carry anatomy masks without a nodule class and are marked ``labelled=False``:
  ``has_nodule=False`` there means "not annotated", never "nodule-free" (TCGA slices show tumours).
Anatomy masks come from HU (``masks.semantic``); image and mask are resampled to ``spacing`` mm and
``size``² around the body, like the LUNA16/LIDC path. Patients: the DICOM PatientID; for volume
files the file name (minus ``_image``/``_0000``-style suffixes), each file its own patient.
"""
from __future__ import annotations

import hashlib
import re
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi
from tqdm import tqdm

from ..errors import NoduleSynthError
from ..io import check_out_dir
from ..masks.boxes import mask_to_boxes
from ..masks.classes import MaskClass
from ..masks.semantic import semantic_mask, thoracic_air
from .ct import CTVolume, _image_geometry, _to_hu_int16, check_hu_plausible
from .dicom_tree import DicomVolumeRef, read_dicom_label, read_dicom_volume, scan_dicom_tree
from .slices import SliceRecord
from .splits import DEFAULT_FRACTIONS, assign_splits

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
NEGATIVE_MARGIN_MM = 5.0
MAX_LESION_MM = 150.0  # a labelled region wider than this in any axis is no lung lesion (a lung, a body)
MAX_LESION_ML = 1000.0  # nor one larger than this (a 12-cm tumour holds 0.9 L; one lung 2-3 L)
MIN_LUNG_MM2 = 1000.0  # a labelled volume's negative slice must show this much lung


def _suffix(p: Path) -> str:
    name = p.name.lower()
    return next((s for s in VOLUME_SUFFIXES if name.endswith(s)), "")


def patient_from_name(p: Path) -> str:
    stem = p.name[: len(p.name) - len(_suffix(p))] if _suffix(p) else p.stem
    return re.sub(r"(_image|_img|_ct|_0000)$", "", stem, flags=re.IGNORECASE) or stem


def _info(path: Path, arg: str) -> sitk.ImageFileReader:
    """Header only (size, dimension, geometry): lets every input be checked before any work."""
    if not path.is_file():
        raise NoduleSynthError(f"{arg} {path}: no such file")
    if not _suffix(path):
        raise NoduleSynthError(f"{arg} {path}: unsupported file type (use {', '.join(VOLUME_SUFFIXES)})")
    r = sitk.ImageFileReader()
    r.SetFileName(str(path))
    try:
        r.ReadImageInformation()
    except RuntimeError as e:
        raise NoduleSynthError(f"{path}: cannot read image header ({str(e).strip().splitlines()[-1]})") from e
    if r.GetDimension() != 3 or min(r.GetSize()) < 1:
        raise NoduleSynthError(f"{path}: expected a 3-D volume, got a {r.GetDimension()}-D image of size {r.GetSize()}")
    if r.GetNumberOfComponents() != 1:
        raise NoduleSynthError(f"{path}: expected a scalar (grey-level) volume, got {r.GetNumberOfComponents()} components per voxel")
    return r


def check_pair(image: Path, label: Path | None) -> None:
    """Refuse a bad image/label pair with one clear error before anything is written."""
    ri = _info(image, "--volume")
    if label is None:
        return
    rl = _info(label, "--label")
    if rl.GetSize() != ri.GetSize():
        raise NoduleSynthError(
            f"{label}: label size {rl.GetSize()} (x, y, z) != image size {ri.GetSize()} of {image}"
        )
    if not (np.allclose(rl.GetSpacing(), ri.GetSpacing(), rtol=1e-3, atol=1e-3)
            and np.allclose(rl.GetOrigin(), ri.GetOrigin(), atol=0.5)
            and np.allclose(rl.GetDirection(), ri.GetDirection(), atol=1e-3)):
        raise NoduleSynthError(
            f"{label}: label grid (spacing {rl.GetSpacing()}, origin {rl.GetOrigin()}, direction {rl.GetDirection()}) "
            f"does not match the image {image} (spacing {ri.GetSpacing()}, origin {ri.GetOrigin()}, "
            f"direction {ri.GetDirection()})"
        )


def read_volume_file(path: Path) -> CTVolume:
    """A 3-D CT image file → HU int16 ``CTVolume`` (stored orientation kept)."""
    _info(path, "--volume")
    try:
        img = sitk.ReadImage(str(path))
        arr = sitk.GetArrayFromImage(img)
    except RuntimeError as e:
        raise NoduleSynthError(f"{path}: cannot read image ({str(e).strip().splitlines()[-1]})") from e
    spacing, origin, direction = _image_geometry(img)
    if min(spacing) <= 0 or not np.all(np.isfinite(spacing)):
        raise NoduleSynthError(f"{path}: invalid voxel spacing {spacing}")
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        raise NoduleSynthError(f"{path}: contains NaN/inf voxels")
    if arr.max() <= 0 or arr.min() >= 0:  # CT in HU has air < 0 and tissue/bone > 0
        raise NoduleSynthError(f"{path}: intensities {arr.min()}…{arr.max()} are not CT Hounsfield units")
    check_hu_plausible(arr, path)  # the same air/tissue/8-bit checks as load_ct
    return CTVolume(_to_hu_int16(np.rint(arr)), spacing, origin, direction, patient_from_name(path), str(path))


def read_label_file(path: Path) -> np.ndarray:
    try:
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except RuntimeError as e:
        raise NoduleSynthError(f"{path}: cannot read label ({str(e).strip().splitlines()[-1]})") from e
    return arr != 0


def check_lesion_label(label: np.ndarray, spacing: tuple[float, float, float], name: str | Path) -> None:
    """Refuse a label that cannot be lesions before its regions become nodule boxes: a lung, body or
    organ mask passed as ``--label`` (or an anatomy SEG/RTSTRUCT named as a lesion) would otherwise
    teach a detector that lungs are nodules. Each connected region must fit MAX_LESION_MM per axis and
    MAX_LESION_ML."""
    if not label.any():
        return
    comps, _ = ndi.label(label, structure=np.ones((3, 3, 3), bool))
    voxels = np.bincount(comps.ravel())
    voxel_ml = float(np.prod(spacing)) / 1000.0
    for i, sl in enumerate(ndi.find_objects(comps), start=1):
        extent = [(s.stop - s.start) * sp for s, sp in zip(sl, spacing)]
        ml = int(voxels[i]) * voxel_ml
        if max(extent) > MAX_LESION_MM or ml > MAX_LESION_ML:
            raise NoduleSynthError(
                f"{name}: a labelled region spans {extent[2]:.0f} × {extent[1]:.0f} × {extent[0]:.0f} mm (x, y, z) and "
                f"{ml:.0f} mL; lesion labels are expected (each region ≤ {MAX_LESION_MM:g} mm, ≤ {MAX_LESION_ML:g} mL), "
                "not a lung, body or organ mask")


def discover_msd(root: Path) -> list[tuple[Path, Path]]:
    """(image, label) pairs of a Decathlon task folder; macOS ``._`` junk files are ignored."""
    root = Path(root)
    imgs, labs = root / "imagesTr", root / "labelsTr"
    if not imgs.is_dir() or not labs.is_dir():
        raise NoduleSynthError(f"--msd {root}: expected imagesTr/ and labelsTr/ folders (Medical Segmentation Decathlon layout)")
    pairs = []
    for img in sorted(p for p in imgs.iterdir() if _suffix(p) and not p.name.startswith(".")):
        lab = labs / img.name
        if not lab.is_file():
            raise NoduleSynthError(f"{img}: no label {lab} (every imagesTr volume needs its labelsTr file)")
        pairs.append((img, lab))
    if not pairs:
        raise NoduleSynthError(f"--msd {root}: no volumes in imagesTr/ ({', '.join(VOLUME_SUFFIXES)})")
    return pairs


# ---------------------------------------------------------------- jobs


@dataclass
class VolumeJob:
    key: str
    source: str  # "dicom" | "volume" | "msd"
    path: Path  # volume file, or the first DICOM file
    patient: str
    label: Path | None = None
    dicom: DicomVolumeRef | None = None

    @property
    def labelled(self) -> bool:
        return self.label is not None or (self.dicom is not None and bool(self.dicom.labels))

    def stamp(self) -> str:
        """Name, size and mtime of every input file: a changed file makes its shard stale."""
        files = ([*self.dicom.files, *(s.path for s in self.dicom.labels)] if self.dicom is not None
                 else [self.path] + ([self.label] if self.label else []))
        h = hashlib.sha256()
        for f in files:
            st = Path(f).stat()
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def load(self) -> tuple[CTVolume, np.ndarray | None]:
        """Canonical (radiological) CT and its label on the same grid."""
        raw = read_dicom_volume(self.dicom) if self.dicom is not None else read_volume_file(self.path)
        label = None
        if self.dicom is not None:
            raw.series_uid = self.dicom.series_uid
            lab = read_dicom_label(self.dicom, raw.hu.shape[1:])
            if lab is not None:
                check_lesion_label(lab, raw.spacing, ", ".join(str(a.path) for a in self.dicom.labels))
                label = raw.reorient(lab)
        if self.label is not None:
            lab = read_label_file(self.label)
            if lab.shape != raw.hu.shape:
                raise NoduleSynthError(f"{self.label}: label shape {lab.shape} != image shape {raw.hu.shape} of {self.path}")
            check_lesion_label(lab, raw.spacing, self.label)
            label = raw.reorient(lab)
        return raw.canonical(), label


@dataclass
class VolumeConfig:
    out: Path
    dicom: Path | None = None
    volumes: list[Path] = field(default_factory=list)
    labels: list[Path] = field(default_factory=list)
    msd: Path | None = None
    size: int = 512
    spacing_mm: float = 0.8
    negatives: float = 0.1  # labelled volumes: lesion-free slices per lesion slice
    every_k: int = 1  # unlabelled volumes: every k-th slice...
    min_lung_mm2: float = 500.0  # ...through both lungs (each lung at least this area)
    seed: int = 0
    split_fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
    split_seed: int = 0
    preview: bool = False
    overwrite: bool = False
    max_scans: int | None = None

    @property
    def source(self) -> str:
        return "dicom" if self.dicom is not None else "msd" if self.msd is not None else "volume"

    def validate(self) -> None:
        given = (self.dicom is not None) + bool(self.volumes) + (self.msd is not None)
        if given != 1:
            raise NoduleSynthError("prepare: give exactly one source (--dicom, --volume, --msd, ...)")
        if self.labels and not self.volumes:
            raise NoduleSynthError("--label: only with --volume")
        if len(self.labels) > len(self.volumes):
            raise NoduleSynthError(f"--label given {len(self.labels)} times for {len(self.volumes)} --volume; "
                                   "labels pair with volumes in order")
        if self.every_k < 1:
            raise NoduleSynthError(f"--every-k {self.every_k}: must be ≥ 1")
        if not 0 <= self.min_lung_mm2 <= 1e5:
            raise NoduleSynthError(f"--min-lung-mm2 {self.min_lung_mm2}: must be between 0 and 100000")
        from .prepare import check_slice_settings

        check_slice_settings(self)

    def fingerprint(self) -> dict:
        from .prepare import settings_fingerprint

        return settings_fingerprint(self) | {"kind": self.source}


def volume_jobs(cfg: VolumeConfig) -> tuple[list[VolumeJob], dict]:
    """Discover and check every input (errors here, before anything is written)."""
    if cfg.dicom is not None:
        tree = scan_dicom_tree(cfg.dicom)
        jobs = [VolumeJob(v.key, "dicom", v.slices[0].path, v.patient, None, v) for v in tree.volumes]
        summary = tree.summary()
    else:
        if cfg.msd is not None:
            pairs: list[tuple[Path, Path | None]] = list(discover_msd(cfg.msd))
        else:
            labels = list(cfg.labels) + [None] * (len(cfg.volumes) - len(cfg.labels))
            pairs = list(zip(cfg.volumes, labels))
        for img, lab in pairs:
            check_pair(Path(img), None if lab is None else Path(lab))
        keys = Counter(patient_from_name(Path(i)) for i, _ in pairs)
        jobs = []
        for img, lab in pairs:
            img = Path(img)
            key = patient_from_name(img) if keys[patient_from_name(img)] == 1 else str(img.resolve())
            jobs.append(VolumeJob(key, cfg.source, img, patient_from_name(img), None if lab is None else Path(lab)))
        summary = {"volumes": len(jobs), "labelled": sum(j.labelled for j in jobs)}
    if cfg.max_scans is not None:
        jobs = jobs[: cfg.max_scans]
    return jobs, summary


# ---------------------------------------------------------------- per volume


def _lung_areas(m: np.ndarray, px_mm2: float) -> tuple[float, float]:
    """Area (mm²) of the largest connected piece of each lung: scattered gas specks the HU mask
    builder may call lung on an abdominal slice (bowel) never add up to a lung this way."""
    out = []
    for cls in (MaskClass.LEFT_LUNG, MaskClass.RIGHT_LUNG):
        lab, n = ndi.label(m == cls)
        out.append(float(np.bincount(lab.ravel())[1:].max() * px_mm2) if n else 0.0)
    return out[0], out[1]


def pick_slices(ct: CTVolume, label: np.ndarray | None, cfg: VolumeConfig, rng: np.random.Generator):
    """[(slice k, native 6-class mask)] by the rule in the module docstring."""
    sp = (ct.spacing[1], ct.spacing[2])
    px = sp[0] * sp[1]
    picked = []
    # bowel gas is never lung (one slice cannot tell); a label without lesions draws no slice
    lung_air = thoracic_air(ct.hu, ct.spacing) if label is None or label.any() else None
    air = (lambda k: None) if lung_air is None else lung_air.__getitem__  # noqa: E731
    if label is None:
        for k in range(0, ct.shape[0], cfg.every_k):
            m = semantic_mask(ct.hu[k], sp, lung_air=air(k))
            if min(_lung_areas(m, px)) >= cfg.min_lung_mm2:
                picked.append((k, m))
        return picked
    pos = np.flatnonzero(label.reshape(label.shape[0], -1).any(axis=1))
    for k in pos:
        m = semantic_mask(ct.hu[k], sp, lung_air=air(k))
        m[label[k]] = MaskClass.NODULE
        picked.append((int(k), m))
    n_neg = int(np.floor(cfg.negatives * len(pos) + rng.random())) if len(pos) else 0
    if n_neg:
        zs = ct.slice_z_mm()
        near = np.zeros(len(zs), bool)
        for k in pos:
            near |= np.abs(zs - zs[k]) <= NEGATIVE_MARGIN_MM + ct.spacing[0] / 2
        for k in rng.permutation(np.flatnonzero(~near))[: 3 * n_neg + 3]:
            m = semantic_mask(ct.hu[k], sp, lung_air=air(k))
            if sum(_lung_areas(m, px)) >= MIN_LUNG_MM2:
                picked.append((int(k), m))
                n_neg -= 1
                if n_neg == 0:
                    break
    return sorted(picked, key=lambda t: t[0])


def process_volume(job: VolumeJob, cfg: VolumeConfig):
    """One volume → (images (n,S,S) int16, masks (n,S,S) uint8, records, lesions seen on them)."""
    from .prepare import _body_center, resample_slice

    ct, label = job.load()
    rng = np.random.default_rng([cfg.seed, zlib.crc32(job.key.encode())])
    picked = pick_slices(ct, label, cfg, rng)
    n_lesions = 0
    if label is not None and picked:
        comps, _ = ndi.label(label, structure=np.ones((3, 3, 3), bool))
        n_lesions = len(set(np.unique(comps[[k for k, _ in picked]]).tolist()) - {0})
    zs = ct.slice_z_mm()
    sp = (ct.spacing[1], ct.spacing[2])
    s = cfg.size
    images = np.empty((len(picked), s, s), np.int16)
    masks = np.empty((len(picked), s, s), np.uint8)
    records = []
    for i, (k, m) in enumerate(picked):
        center = _body_center(m)
        images[i], masks[i] = resample_slice(ct.hu[k], m, sp, center, s, cfg.spacing_mm)
        boxes = mask_to_boxes(masks[i])
        records.append(SliceRecord(
            series_uid=ct.series_uid, z_mm=float(zs[k]), slice_index=int(k), spacing_mm=(cfg.spacing_mm, cfg.spacing_mm),
            boxes=boxes, source=job.source, has_nodule=bool(len(boxes)), scan_path=str(job.path),
            crop_center_yx=center, n_nodules=int(bool(len(boxes))), patient=job.patient, labelled=job.labelled,
        ))
    return images, masks, records, n_lesions


def prepare_volumes(cfg: VolumeConfig) -> Path:
    """Run the whole preparation (resumable per volume, atomic); returns ``cfg.out``."""
    from . import prepare as prep

    cfg.validate()
    jobs, summary = volume_jobs(cfg)
    inputs = [("--dicom", cfg.dicom), ("--msd", cfg.msd)] + [("--volume", v) for v in cfg.volumes] + [("--label", v) for v in cfg.labels]
    out = check_out_dir(cfg.out, cfg.overwrite, inputs=inputs)
    t0 = time.time()
    parts = []
    with prep._shards(cfg) as shards:
        for job in tqdm(jobs, desc=f"prepare {cfg.source}", unit="volume"):
            stamp = job.stamp()
            got = prep._read_shard(shards, job.key, stamp=stamp)
            if got is None:
                prep._write_shard(shards, job.key, *process_volume(job, cfg), stamp=stamp)
                got = prep._read_shard(shards, job.key, stamp=stamp)
            parts.append(got)
    no_slices = sum(1 for p in parts if not len(p[2]))
    parts = [p for p in parts if len(p[2])]
    root = cfg.dicom or cfg.msd or cfg.volumes[0]
    if not parts:
        raise NoduleSynthError(
            f"{root}: no slice passed the selection (lesion slices for labelled volumes; slices through both lungs, "
            f"each ≥ {cfg.min_lung_mm2:g} mm², for unlabelled ones); nothing to write"
        )
    records = [r for p in parts for r in p[2]]
    split = assign_splits(records, cfg.split_fractions, cfg.split_seed)
    meta = {
        "source": cfg.source,
        "root": str(root) if cfg.volumes == [] else [str(v) for v in cfg.volumes],
        "labels": [str(v) for v in cfg.labels] if cfg.labels else None,
        "classes": {c.name.lower(): int(c) for c in MaskClass},
        "box_format": "xyxy pixel edges",
        "settings": {**cfg.fingerprint(), "split_fractions": list(cfg.split_fractions), "split_seed": cfg.split_seed},
        "selection": {
            "labelled": f"every lesion slice + {cfg.negatives:g} lesion-free slices per lesion slice (≥ {NEGATIVE_MARGIN_MM:g} mm "
                        f"from lesions, ≥ {MIN_LUNG_MM2:g} mm² lung)",
            "unlabelled": f"every {cfg.every_k}-th slice through both lungs (each ≥ {cfg.min_lung_mm2:g} mm²)",
        },
        "scans": {**summary, "volumes_prepared": len(jobs), "volumes_without_kept_slices": no_slices},
        "n_nodules": int(sum(p[3] for p in parts)),
        "split": split,
        "seconds": round(time.time() - t0, 2),
    }
    return prep.write_prepared(out, shards, parts, records, meta, cfg, inputs)


def prepare_other_source(args) -> Path | None:
    """CLI dispatch for the sources this module and ``crops`` handle; None for --luna16/--lidc."""
    from .splits import parse_fractions

    fractions = parse_fractions(args.split_fractions)
    if getattr(args, "lidc_crops", None) is not None:
        from .crops import config_from_args, prepare_crops

        return prepare_crops(config_from_args(args, fractions, args.split_seed))
    if args.dicom is None and not args.volume and args.msd is None:
        if args.label:
            raise NoduleSynthError("--label: only with --volume")
        return None
    cfg = VolumeConfig(
        out=args.out, dicom=args.dicom, volumes=list(args.volume or []), labels=list(args.label or []), msd=args.msd,
        size=args.size, spacing_mm=args.spacing, negatives=args.negatives, every_k=args.every_k,
        min_lung_mm2=args.min_lung_mm2, seed=args.seed, split_fractions=fractions, split_seed=args.split_seed,
        preview=args.preview, overwrite=args.overwrite, max_scans=args.max_scans,
    )
    return prepare_volumes(cfg)
