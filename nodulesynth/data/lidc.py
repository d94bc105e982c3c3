"""LIDC-IDRI reading-session XML → nodule records with contours, and reader consensus.

The XML gives, per radiologist (``readingSession``), nodules (``unblindedReadNodule``) as per-slice
outlines (``roi``: imageZposition, inclusion, edgeMap pixel xCoord/yCoord) plus characteristics.
Pixel outlines only become millimetres with the CT's geometry, hence ``nodules_from_lidc(xml, ct)``.

Choices (documented because they change the data):
- Nodules < 3 mm are marked by LIDC readers with a single point and no characteristics. They are
  read (``characteristics["lt3mm"] = True``) but ``nodules_from_lidc`` drops them by default, the
  same inclusion criterion as LUNA16 (≥ 3 mm). ``nonNodule`` marks are ignored.
- Several readers outline the same physical nodule; ``consensus_nodules`` clusters per-reader
  records whose centres are close, so one nodule yields one record (and one box) whose contours
  keep each reader's outline; the mask code then takes the ≥50 % reader vote (as pylidc does).
"""
from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from ..errors import NoduleSynthError
from .ct import CTVolume
from .records import MAX_DIAMETER_MM, Contour, Nodule



def _tag(el: ET.Element) -> str:
    return el.tag.rsplit("}", 1)[-1]


def _child(el: ET.Element, name: str) -> ET.Element | None:
    for c in el:
        if _tag(c) == name:
            return c
    return None


def _children(el: ET.Element, name: str) -> list[ET.Element]:
    return [c for c in el if _tag(c) == name]


def _text(el: ET.Element, name: str) -> str | None:
    c = _child(el, name)
    return None if c is None or c.text is None else c.text.strip()


def lidc_series_uid(path: str | Path) -> str | None:
    """SeriesInstanceUid of an LIDC CT read message, or None for other well-formed XML (e.g. chest
    X-ray reads). A corrupt or truncated XML is an error naming it: read as "no annotations", its
    patient would silently vanish from the dataset."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise NoduleSynthError(f"{path}: corrupt or truncated XML ({e}); fix or remove it") from e
    except OSError as e:
        raise NoduleSynthError(f"{path}: cannot read ({e.strerror or e})") from e
    if _tag(root) != "LidcReadMessage":
        return None
    header = _child(root, "ResponseHeader")
    return None if header is None else _text(header, "SeriesInstanceUid")


def read_lidc_xml(path: str | Path, ct: CTVolume | None = None) -> list[Nodule]:
    """All readers' nodules, one record per reader per nodule, contours kept (pixel coordinates).
    Without ``ct`` the world centre is (nan, nan, mean contour z) and the diameter nan; pass the CT
    (as loaded by ``load_ct``, whose pixel grid the contours refer to) to get millimetres."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise NoduleSynthError(f"{path}: not a readable XML file ({e})") from e
    if _tag(root) != "LidcReadMessage":
        raise NoduleSynthError(f"{path}: not an LIDC CT reading XML (root <{_tag(root)}>, expected <LidcReadMessage>)")
    header = _child(root, "ResponseHeader")
    uid = (_text(header, "SeriesInstanceUid") if header is not None else None) or ""
    nodules: list[Nodule] = []
    for si, session in enumerate(_children(root, "readingSession")):
        reader = _text(session, "servicingRadiologistID") or f"reader{si}"
        for nod in _children(session, "unblindedReadNodule"):
            nid = _text(nod, "noduleID") or "?"
            contours = []
            for roi in _children(nod, "roi"):
                try:
                    z = float(_text(roi, "imageZposition"))
                    pts = np.array(
                        [[float(_text(e, "xCoord")), float(_text(e, "yCoord"))] for e in _children(roi, "edgeMap")],
                        dtype=np.float64,
                    ).reshape(-1, 2)
                except (TypeError, ValueError) as e:
                    raise NoduleSynthError(f"{path}: nodule {nid!r} of reader {reader}: bad roi ({e})") from e
                incl = (_text(roi, "inclusion") or "TRUE").upper() == "TRUE"
                if len(pts):
                    contours.append(Contour(z, pts, incl, reader))
            if not contours:
                continue
            chars = {}
            ch = _child(nod, "characteristics")
            if ch is not None:
                for c in ch:
                    try:
                        chars[_tag(c)] = int(c.text.strip())
                    except (AttributeError, ValueError):
                        pass
            small = all(len(c.points_xy) == 1 for c in contours)
            if small:
                chars["lt3mm"] = True
            chars["nodule_id"] = nid
            z_mean = float(np.mean([c.z_mm for c in contours]))
            nodules.append(Nodule(uid, (math.nan, math.nan, z_mean), math.nan, contours, reader, chars))
    if ct is not None:
        nodules = [measure_nodule(n, ct) for n in nodules]
        for n in nodules:
            if n.diameter_mm > MAX_DIAMETER_MM:
                raise NoduleSynthError(
                    f"{path}: nodule {n.characteristics.get('nodule_id')!r} of reader {n.reader}: outlines span "
                    f"{n.diameter_mm:.0f} mm (> {MAX_DIAMETER_MM:g} mm), not a plausible nodule (corrupt coordinates?)")
    return nodules


def _contour_world(c: Contour, ct: CTVolume) -> np.ndarray:
    """Pixel (col, row) at world z → world (x, y, z) mm, for an axial slice grid."""
    k = ct.world_to_voxel(np.array([*ct.voxel_to_world(np.zeros(3))[:2], c.z_mm]))[0]
    zyx = np.stack([np.full(len(c.points_xy), k), c.points_xy[:, 1], c.points_xy[:, 0]], axis=1)
    return ct.voxel_to_world(zyx)


def _polygon_centroid(xy: np.ndarray) -> tuple[np.ndarray, float]:
    """Shoelace centroid and area; degenerate outlines fall back to the point mean."""
    if len(xy) < 3:
        return xy.mean(axis=0), 0.0
    x, y = xy[:, 0], xy[:, 1]
    xn, yn = np.roll(x, -1), np.roll(y, -1)
    cross = x * yn - xn * y
    a = cross.sum() / 2.0
    if abs(a) < 1e-9:
        return xy.mean(axis=0), 0.0
    cx = ((x + xn) * cross).sum() / (6 * a)
    cy = ((y + yn) * cross).sum() / (6 * a)
    return np.array([cx, cy]), abs(a)


def _plane_z(w: np.ndarray, xy: np.ndarray, z_mm: float) -> float:
    """World z at ``xy`` of the slice plane through the outline's world points ``w``. That is the
    XML's imageZposition (the table's z) on an axial slice, but not under gantry tilt: there the
    plane leans, z changes along the rows, and a centre at the table's z lies off its own slice."""
    if np.ptp(w[:, 2]) < 1e-6:  # one point, or an axial plane
        return z_mm if abs(float(w[0, 2]) - z_mm) < 1e-3 else float(w[0, 2])
    a = np.c_[np.ones(len(w)), w[:, :2]]
    coef, *_ = np.linalg.lstsq(a, w[:, 2], rcond=None)
    return float(coef[0] + coef[1:] @ xy)


def measure_nodule(n: Nodule, ct: CTVolume) -> Nodule:
    """Fill in the world centre (area-weighted centroid of the inclusion outlines) and diameter
    (largest in-plane extent over slices, + one pixel because edgeMap points are boundary pixel
    centres). Point-marked (<3 mm) nodules get diameter 3.0 mm, the LIDC upper bound."""
    incl = [c for c in n.contours if c.inclusion] or n.contours
    cents, weights, diam = [], [], 0.0
    px = float(np.mean(np.asarray(ct.spacing)[1:]))
    for c in incl:
        w = _contour_world(c, ct)
        cen, area = _polygon_centroid(w[:, :2])
        cents.append([cen[0], cen[1], _plane_z(w, cen, c.z_mm)])
        weights.append(max(area, 1e-6))
        if len(w) > 1:
            d = np.sqrt(((w[:, None, :2] - w[None, :, :2]) ** 2).sum(-1)).max()
            diam = max(diam, float(d) + px)
    center = np.average(np.asarray(cents), axis=0, weights=np.asarray(weights))
    if n.characteristics.get("lt3mm"):
        diam = 3.0
    return Nodule(n.series_uid, tuple(float(v) for v in center), diam, n.contours, n.reader, dict(n.characteristics))


def consensus_nodules(nodules: list[Nodule], distance_mm: float = 5.0) -> list[Nodule]:
    """Group per-reader records of one physical nodule: single-linkage clustering of centres closer
    than max(distance_mm, larger radius). Centre and diameter are the readers' means; contours are
    all readers' outlines (each tagged with its reader)."""
    if not nodules:
        return []
    c = np.array([n.center_xyz_mm for n in nodules], dtype=np.float64)
    if not np.all(np.isfinite(c)):
        raise ValueError("consensus_nodules: measure nodules with a CT first (centres are nan)")
    r = np.array([n.radius_mm for n in nodules])
    dist = np.sqrt(((c[:, None] - c[None]) ** 2).sum(-1))
    link = dist <= np.maximum(distance_mm, np.maximum(r[:, None], r[None]))
    # connected components of the link graph (transitive closure by repeated boolean products)
    reach = link.copy()
    while True:
        nxt = (reach.astype(np.int32) @ link.astype(np.int32)) > 0
        if np.array_equal(nxt, reach):
            break
        reach = nxt
    labels = np.argmax(reach, axis=1)  # smallest index in each component
    out = []
    for lab in np.unique(labels):
        members = [nodules[i] for i in np.flatnonzero(labels == lab)]
        readers = sorted({m.reader or "?" for m in members})
        chars: dict = {"readers": readers, "n_readers": len(readers)}
        keys = {k for m in members for k, v in m.characteristics.items() if isinstance(v, int) and not isinstance(v, bool)}
        for k in sorted(keys):
            vals = [m.characteristics[k] for m in members if k in m.characteristics]
            chars[k] = float(np.median(vals))
        out.append(
            Nodule(
                members[0].series_uid,
                tuple(float(v) for v in np.mean([m.center_xyz_mm for m in members], axis=0)),
                float(np.mean([m.diameter_mm for m in members])),
                [ct for m in members for ct in m.contours],
                f"consensus:{len(readers)}",
                chars,
            )
        )
    return out


def nodules_from_lidc(
    xml_path: str | Path,
    ct: CTVolume,
    consensus: bool = True,
    include_small: bool = False,
    distance_mm: float = 5.0,
) -> list[Nodule]:
    """Nodules of ``ct`` from its LIDC XML in world mm: per reader, or (default) one consensus
    record per physical nodule. < 3 mm point marks are dropped unless ``include_small`` (then they
    are 3 mm spheres without contours)."""
    nods = read_lidc_xml(xml_path, ct)
    if nods and ct.series_uid and nods[0].series_uid and nods[0].series_uid != ct.series_uid:
        raise NoduleSynthError(f"{xml_path}: annotates series {nods[0].series_uid}, not the CT's {ct.series_uid}")
    kept = []
    for n in nods:
        if n.characteristics.get("lt3mm"):
            if not include_small:
                continue
            n = Nodule(n.series_uid, n.center_xyz_mm, 3.0, [], n.reader, n.characteristics)
        kept.append(n)
    return consensus_nodules(kept, distance_mm) if consensus else kept


def reframe_contours(nodules: list[Nodule], src: CTVolume, dst: CTVolume) -> list[Nodule]:
    """Contour pixels re-expressed on another grid of the same scan (e.g. after ``canonical()``)."""
    if src is dst:
        return nodules
    out = []
    for n in nodules:
        cs = []
        for c in n.contours:
            zyx = dst.world_to_voxel(_contour_world(c, src))
            cs.append(Contour(c.z_mm, zyx[:, [2, 1]], c.inclusion, c.reader))
        out.append(Nodule(n.series_uid, n.center_xyz_mm, n.diameter_mm, cs, n.reader, dict(n.characteristics)))
    return out
