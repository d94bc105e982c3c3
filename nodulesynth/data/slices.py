"""The prepared slice dataset: what both GAN stages (and the detector baselines) train on.

Folder layout (written by ``prepare``; format version 1):
- ``images.npy``: int16 (N, H, W) HU, np.save format, opened memory-mapped (no load time, no copy);
- ``masks.npy``: uint8 (N, H, W) ``MaskClass`` labels;
- ``index.json``: ``{"meta": {...}, "records": [SliceRecord...]}`` with per-slice provenance
  (series UID, world z, slice index, in-plane spacing after resampling, nodule boxes xyxy,
  patient, train/val/test split by patient, and whether the source was labelled at all).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import NoduleSynthError
from ..io import atomic_file, write_json

FORMAT = "nodulesynth-slices"
VERSION = 1


@dataclass
class SliceRecord:
    series_uid: str
    z_mm: float
    slice_index: int
    spacing_mm: tuple[float, float]  # (dy, dx) after resampling
    boxes: np.ndarray  # (K, 4) float32 xyxy, pixel edges
    source: str  # "luna16" | "lidc" | "phantom"
    has_nodule: bool
    scan_path: str = ""
    crop_center_yx: tuple[float, float] = (0.0, 0.0)  # native pixel the crop is centred on
    n_nodules: int = 0  # annotated nodules crossing this slice
    patient: str = ""  # patient id ("" in datasets prepared before patients were recorded)
    split: str = ""  # "train" | "val" | "test" by patient (see nodulesynth.data.splits); "" = not recorded
    labelled: bool = True  # False: source has no nodule annotations, so has_nodule=False is NOT a true negative

    def to_json(self) -> dict:
        d = asdict(self)
        d["boxes"] = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4).round(3).tolist()
        d["spacing_mm"] = [float(v) for v in self.spacing_mm]
        d["crop_center_yx"] = [float(v) for v in self.crop_center_yx]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "SliceRecord":
        d = dict(d)
        d["boxes"] = np.asarray(d.get("boxes", []), dtype=np.float32).reshape(-1, 4)
        d["spacing_mm"] = tuple(d["spacing_mm"])
        d["crop_center_yx"] = tuple(d.get("crop_center_yx", (0.0, 0.0)))
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def _as_parts(x) -> list[np.ndarray]:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def write_slice_dataset(
    folder: str | Path,
    images: np.ndarray | Sequence[np.ndarray],
    masks: np.ndarray | Sequence[np.ndarray],
    records: Sequence[SliceRecord],
    meta: dict | None = None,
) -> Path:
    """Write images.npy / masks.npy / index.json into ``folder``. ``images``/``masks`` may be one
    (N, H, W) array or a list of chunks (e.g. memory-mapped per-scan shards), streamed in order
    so the whole dataset never has to fit in memory."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ip, mp = _as_parts(images), _as_parts(masks)
    n = sum(len(p) for p in ip)
    if n != sum(len(p) for p in mp) or n != len(records):
        raise ValueError(f"write_slice_dataset: {n} images, {sum(len(p) for p in mp)} masks, {len(records)} records")
    shape = ip[0].shape[1:] if ip else (0, 0)
    for name, parts, dtype in (("images.npy", ip, np.int16), ("masks.npy", mp, np.uint8)):
        with atomic_file(folder / name, "wb") as fh:
            np.lib.format.write_array_header_1_0(
                fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (n, *shape)}
            )
            for p in parts:
                if p.shape[1:] != shape:
                    raise ValueError(f"write_slice_dataset: chunk shape {p.shape[1:]} != {shape}")
                fh.write(np.ascontiguousarray(p, dtype=dtype).tobytes())
    meta = dict(meta or {})
    meta.update(
        format=FORMAT,
        version=VERSION,
        n_slices=n,
        height=int(shape[0]),
        width=int(shape[1]),
        n_nodule_slices=int(sum(r.has_nodule for r in records)),
        n_boxes=int(sum(len(r.boxes) for r in records)),
        n_series=len({r.series_uid for r in records}),
        n_patients=len({r.patient or r.series_uid for r in records}),
        labelled=bool(all(r.labelled for r in records)),  # False: has_nodule=False slices are not negatives
    )
    write_json(folder / "index.json", {"meta": meta, "records": [r.to_json() for r in records]})
    return folder


class SliceDataset:
    """Read a prepared folder: ``ds[i]`` → dict(image_hu int16 (H,W), mask uint8 (H,W), boxes, record)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        index = self.root / "index.json"
        for f in (index, self.root / "images.npy", self.root / "masks.npy"):
            if not f.is_file():
                raise NoduleSynthError(f"{self.root}: not a prepared slice dataset ({f.name} missing; run `nodulesynth prepare`)")
        try:
            data = json.loads(index.read_text())
            self.meta: dict = data["meta"]
            self.records = [SliceRecord.from_json(r) for r in data["records"]]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise NoduleSynthError(f"{index}: corrupt index ({e})") from e
        if self.meta.get("format") != FORMAT:
            raise NoduleSynthError(f"{index}: not a {FORMAT} index")
        try:
            self.images = np.load(self.root / "images.npy", mmap_mode="r")
            self.masks = np.load(self.root / "masks.npy", mmap_mode="r")
        except (ValueError, OSError) as e:
            raise NoduleSynthError(f"{self.root}: corrupt images.npy/masks.npy ({e})") from e
        if not (len(self.images) == len(self.masks) == len(self.records)):
            raise NoduleSynthError(
                f"{self.root}: {len(self.images)} images, {len(self.masks)} masks, {len(self.records)} records disagree"
            )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        return {"image_hu": np.asarray(self.images[i]), "mask": np.asarray(self.masks[i]), "boxes": r.boxes, "record": r}

    def __repr__(self) -> str:
        return f"SliceDataset({str(self.root)!r}, n={len(self)}, {self.meta.get('height')}x{self.meta.get('width')})"


def require_labelled(ds: SliceDataset, arg: str) -> SliceDataset:
    """``ds``, or one clear error when it was prepared from a source without nodule annotations
    (labelled=false): its empty boxes mean "not annotated", not "nodule-free" (some TCGA slices show
    tumours), so as detection data, mixed in or with nodules inserted, they would teach a detector to
    miss tumours. ``arg`` names the argument in the message."""
    if not all(r.labelled for r in ds.records):
        raise NoduleSynthError(f"{arg} {ds.root}: prepared from a source without nodule annotations (labelled=false); "
                               "its slices are not known negatives, so they are not used as detection data — use a "
                               "labelled source (LUNA16, LIDC-IDRI, --volume with --label)")
    return ds


def write_slice_subset(
    folder: str | Path, parts: Sequence[tuple["SliceDataset", Sequence[int]]], meta: dict | None = None
) -> Path:
    """Combine picked slices of prepared datasets into one new dataset (indices may repeat, which
    is how a small real set is over-sampled next to a large phantom set). All parts must share
    the slice size."""
    images = [ds.images[np.asarray(idx, dtype=np.int64)] for ds, idx in parts if len(idx)]
    masks = [ds.masks[np.asarray(idx, dtype=np.int64)] for ds, idx in parts if len(idx)]
    records = [ds.records[i] for ds, idx in parts for i in idx]
    sources = {str(ds.root): len(idx) for ds, idx in parts}
    return write_slice_dataset(folder, images, masks, records, {**(meta or {}), "built_from": sources})


def split_by_series(ds: "SliceDataset", holdout_series: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """(train, holdout) slice indices with whole series held out, so no patient is in both."""
    uids = sorted({r.series_uid for r in ds.records})
    rng = np.random.default_rng(seed)
    held = set(rng.choice(uids, size=min(holdout_series, len(uids)), replace=False).tolist())
    train = [i for i, r in enumerate(ds.records) if r.series_uid not in held]
    return train, [i for i, r in enumerate(ds.records) if r.series_uid in held]
