"""One dataset writer for every export format: items in, per-item files written on worker
processes, aggregate files (COCO annotations.json, YOLO data.yaml, MONAI datalist.json,
manifest.json) written once at the end from the per-item records.

Why this shape: the per-item work (PNG/NIfTI/DICOM encoding, RLE) is CPU-heavy and independent, so
it runs on worker processes while the generator keeps the cores busy; and because the aggregates are
a pure function of the ordered records, a dataset written in shards (torchrun ranks, ``--start-index``
runs) and merged (``export.merge``) is byte-for-byte the single-run dataset (except creation dates).

Layout: one format → files directly in the dataset folder; several → one subfolder per format.
OUT/manifest.json lists every item: name, position, source, split, pixel spacing, boxes (px),
provenance and the files it owns in each format.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import NoduleSynthError
from ..hu import LUNG_WINDOW
from ..io import write_json
from ..workers import worker_pool
from . import coco, dicom, monai, volume, yolo

FORMATS = ("coco", "yolo", "nifti", "mha", "dicom", "monai")
ALIASES = {"both": ("coco", "yolo")}


def parse_formats(text: str, arg: str = "--format") -> tuple[str, ...]:
    """'coco,nifti' → ('coco', 'nifti') in canonical order; 'both' = coco,yolo."""
    parts = [p.strip().lower() for p in str(text).split(",") if p.strip()]
    chosen: set[str] = set()
    for p in parts:
        for f in ALIASES.get(p, (p,)):
            if f not in FORMATS:
                raise NoduleSynthError(f"{arg}: unknown format {p!r}; give a comma list of {', '.join(FORMATS)} "
                                       "(both = coco,yolo)")
            chosen.add(f)
    if not chosen:
        raise NoduleSynthError(f"{arg}: no format given; choose from {', '.join(FORMATS)}")
    return tuple(f for f in FORMATS if f in chosen)


@dataclass
class ExportItem:
    """One slice to export. ``hu`` int16 (H,W); ``mask`` uint8 six-class labels; ``boxes`` (K,4)
    float32 xyxy pixel edges; ``spacing_mm`` (row, col); ``position`` its place in the whole dataset."""

    name: str
    hu: np.ndarray
    mask: np.ndarray
    boxes: np.ndarray
    source: str  # "synthetic" | "real" | "mask-in"
    spacing_mm: tuple[float, float]
    provenance: dict
    split: str = "train"
    position: int = 0


@dataclass(frozen=True)
class ExportSpec:
    """What to write (picklable: it travels to the workers with each item)."""

    formats: tuple[str, ...]
    image_format: str = "png"
    dicom: dicom.DicomContext | None = None

    def subdir(self, fmt: str) -> str:
        return "" if len(self.formats) == 1 else fmt

    def root(self, base: Path, fmt: str) -> Path:
        return Path(base) / self.subdir(fmt)

    def nifti_for_monai(self) -> str:
        """The format whose NIfTI files the MONAI datalist points at ('nifti' if written, else its own)."""
        return "nifti" if "nifti" in self.formats else "monai"


def prepare_folders(spec: ExportSpec, base: Path) -> None:
    for fmt in spec.formats:
        r = spec.root(base, fmt)
        if fmt == "coco":
            (r / "images").mkdir(parents=True, exist_ok=True)
        elif fmt == "yolo":
            yolo.make_folders(r)
        elif fmt in ("nifti", "mha") or (fmt == "monai" and spec.nifti_for_monai() == "monai"):
            volume.make_folders(r)
        elif fmt == "dicom":
            dicom.make_folders(r)


def write_item(spec: ExportSpec, base: Path, item: ExportItem) -> dict:
    """Write one item in every format; return its records (runs on an export worker)."""
    base = Path(base)
    rec: dict = {}
    files: dict[str, list[str]] = {}

    def rel(fmt: str, path: str) -> str:
        return str(Path(spec.subdir(fmt)) / path)

    for fmt in spec.formats:
        root = spec.root(base, fmt)
        if fmt == "coco":
            rec["coco"] = coco.coco_item(root, item, spec.image_format)
            files[fmt] = [rel(fmt, f"images/{rec['coco']['image']['file_name']}")]
        elif fmt == "yolo":
            yolo.yolo_item(root, item)
            files[fmt] = [rel(fmt, f"{d}/{item.split}/{item.name}{ext}") for d, ext in (("images", ".png"), ("labels", ".txt"))]
        elif fmt in ("nifti", "mha"):
            v = volume.volume_item(root, item, fmt)
            files[fmt] = [rel(fmt, v["image"]), rel(fmt, v["label"])]
        elif fmt == "dicom":
            d = dicom.dicom_item(root, item, spec.dicom)
            files[fmt] = [rel(fmt, p) for p in (d["image"], d["seg"]) if p]
    if "monai" in spec.formats:
        src = spec.nifti_for_monai()
        if src == "monai":
            v = volume.volume_item(spec.root(base, "monai"), item, "nifti")
            files["monai"] = [rel("monai", v["image"]), rel("monai", v["label"])]
        image, mask = (os.path.relpath(base / f, spec.root(base, "monai")) for f in files[src])
        rec["monai"] = monai.monai_entry(item, image, mask)
    rec["manifest"] = {
        "name": item.name, "position": int(item.position), "source": item.source, "split": item.split,
        "seed": item.provenance.get("seed"), "index": item.provenance.get("index"),
        "pixel_spacing_mm": [float(v) for v in item.spacing_mm],
        "boxes_xyxy_px": np.asarray(item.boxes, np.float32).reshape(-1, 4).tolist(),
        "provenance": item.provenance, "files": files,
    }
    return rec


def _init_worker() -> None:  # encoding workers: one thread each, the generator owns the cores
    os.environ.setdefault("OMP_NUM_THREADS", "1")


class DatasetWriter:
    """Queues items to ``workers`` processes (0 = write inline) and keeps their records in order.
    At most 3·workers items wait, bounding memory; the first worker error surfaces at ``add``/``drain``."""

    def __init__(self, base: Path, spec: ExportSpec, workers: int = 0):
        self.base, self.spec, self.workers = Path(base), spec, int(workers)
        prepare_folders(spec, self.base)
        self.records: list[dict] = []
        self._pending: deque[Future] = deque()
        self._pool: ProcessPoolExecutor | None = None

    def _submit(self, item: ExportItem) -> Future:
        self.start()
        return self._pool.submit(write_item, self.spec, self.base, item)

    def start(self) -> None:
        """Start the worker processes now (otherwise at the first item), so that a benchmark times
        the encoding, not the start-up."""
        if self.workers and self._pool is None:
            # forkserver: never fork a process holding torch's threads; Ctrl-C stays the main process's
            self._pool = worker_pool(self.workers, "forkserver", _init_worker)

    def add(self, item: ExportItem) -> None:
        if not self.workers:
            self.records.append(write_item(self.spec, self.base, item))
            return
        self._pending.append(self._submit(item))
        while len(self._pending) > 3 * self.workers:
            self.records.append(self._pending.popleft().result())

    def drain(self) -> list[dict]:
        while self._pending:
            self.records.append(self._pending.popleft().result())
        return self.records

    def close(self) -> None:
        for f in self._pending:
            f.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


@dataclass
class Header:
    """Dataset-level facts shared by the manifest, COCO info, data.yaml comments and the datalist."""

    fields: dict = field(default_factory=dict)

    def coco_info(self, image_format: str) -> dict:
        keep = ("weights", "revision", "seed", "source", "n_synthetic", "n_inserted", "n_real", "n_mask_in", "start_index",
                "block", "pixel_spacing_mm", "pixel_spacing_note", "validation", "quality_gate")
        return coco.coco_info(image_format, {k: self.fields[k] for k in keep if k in self.fields})


def yolo_notes(header: dict, records: list[dict]) -> list[str]:
    real = sorted({tuple(r["manifest"]["pixel_spacing_mm"]) for r in records if r["manifest"]["source"] == "real"})
    s = header.get("pixel_spacing_mm")
    notes = [f"images: 8-bit PNG, lung window {list(LUNG_WINDOW)} HU -> 0..255",
             f"pixel spacing (mm, row/col): synthetic {s}" + (f"; real slices keep their own: {[list(x) for x in real]}"
                                                              if real else ""),
             "per-image spacing and provenance: manifest.json"]
    v = header.get("validation") or {}
    if v.get("n_val"):
        notes.append(f"val: {v['n_val']} real slices of {len(v.get('val_patients', []))} held-out patient(s); "
                     "synthetic slices are train only")
    return notes


def finalize(base: Path, spec: ExportSpec, records: list[dict], header: dict, final_root: Path,
             preview: list | None = None) -> None:
    """Write the aggregate files of a dataset from its ordered item records."""
    base, final_root = Path(base), Path(final_root)
    if "coco" in spec.formats:
        coco.write_coco(spec.root(base, "coco"), [r["coco"] for r in records], Header(header).coco_info(spec.image_format))
    if "yolo" in spec.formats:
        n_val = sum(r["manifest"]["split"] == "val" for r in records)
        yolo.write_data_yaml(spec.root(base, "yolo"), spec.root(final_root, "yolo"), n_val, yolo_notes(header, records))
    if "monai" in spec.formats:
        keep = ("weights", "revision", "seed", "pixel_spacing_mm")
        facts = {k: header[k] for k in keep if k in header}
        if "validation" in header:  # "validation" itself is the datalist's list of held-out entries
            facts["validation_split"] = header["validation"]
        monai.write_datalist(spec.root(base, "monai"), [r["monai"] for r in records], facts)
    if preview:
        from ..viz import preview_grid

        preview_grid(base / "preview.png", [p[0] for p in preview], [p[1] for p in preview], [p[2] for p in preview])
    write_json(base / "manifest.json", {**header, "items": [r["manifest"] for r in records]})


def save_preview(path: Path, preview: list) -> None:
    """Preview inputs of a shard (hu, mask, boxes per item) so the merged preview equals a single run's."""
    if not preview:
        return
    boxes = [np.asarray(p[2], np.float32).reshape(-1, 4) for p in preview]
    np.savez(path, hu=np.stack([p[0] for p in preview]), mask=np.stack([p[1] for p in preview]),
             boxes=np.concatenate(boxes), counts=np.array([len(b) for b in boxes]))


def load_preview(path: Path) -> list:
    with np.load(path, allow_pickle=False) as z:
        ends = np.cumsum(z["counts"])
        boxes = np.split(z["boxes"], ends[:-1])
        return [(z["hu"][k], z["mask"][k], boxes[k]) for k in range(len(z["hu"]))]
