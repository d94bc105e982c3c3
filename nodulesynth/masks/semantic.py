"""Six-class semantic masks from one axial CT slice (the paired labels both GAN stages learn from).

Classes (``MaskClass``): body, left lung, right lung, trachea/main bronchi, nodule. The slice must
be in the canonical orientation of ``CTVolume.canonical()`` (radiological display): image-right is
the patient's LEFT, so the lung on the image's right half is ``LEFT_LUNG``.

Without a lung segmentation the anatomy comes from HU alone, built to hold on chest CT in general
(field of view, table, arms, 0.5–1 mm pixels), with all sizes in millimetres:
- body: HU > −500, opened to cut the table/blanket loose, components ≥ 20 % of the largest kept
  (arms), holes filled;
- air inside the body (HU < −400), within the volume's 3-D lungs and airways where the volume is long
  enough to show them (``thoracic_air``: on one slice bowel gas can pass for lung), split into
  components: the airway is a small, round, very dark
  (< −900 HU median) component near the mediastinal midline; gas pockets (uniform ≤ −960 HU, e.g.
  bowel) and small specks are dropped; the rest is lung, filled (vessels) and closed;
- left/right: each lung component goes to the side of the body's midline its centroid lies on; a
  component straddling the midline (lungs touching anteriorly/posteriorly, or joined through the
  bronchi) is split by eroding until two seeds separate, each pixel going to the nearest seed.
Nodules come from LIDC contours (≥50 % reader vote) or, for LUNA16 spheres, the sphere's cross
section refined by intensity (nodule tissue is far denser than parenchyma).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull, QhullError

from ..hu import AIR_HU
from .classes import MaskClass
from .components import components as _components
from .outlines import outline_pixels

BODY_HU = -500  # denser than this: the patient (fat ≈ −100, lung walls), not the air around it
LUNG_AIR_HU = -400  # darker than this inside the body: lungs and airways (parenchyma ≈ −850)
NODULE_HU = -600  # denser than this inside an annotated nodule: nodule tissue, not parenchyma

LUNA16_TO_CLASS = {3: MaskClass.LEFT_LUNG, 4: MaskClass.RIGHT_LUNG, 5: MaskClass.TRACHEA}


@dataclass
class SliceNodule:
    """A nodule's cross-section on one slice, in that slice's pixels.
    ``polygons``: (points (N,2) col,row; inclusion; reader) outlines; empty → use the circle."""

    center_yx: tuple[float, float]
    radius_px: tuple[float, float]  # (ry, rx) of the sphere's cross-section
    polygons: list[tuple[np.ndarray, bool, str | None]] = field(default_factory=list)
    n_readers: int = 1


def _disk(radius_mm: float, spacing: tuple[float, float]) -> np.ndarray:
    ry = max(1, int(round(radius_mm / spacing[0])))
    rx = max(1, int(round(radius_mm / spacing[1])))
    yy, xx = np.ogrid[-ry : ry + 1, -rx : rx + 1]
    return (yy / ry) ** 2 + (xx / rx) ** 2 <= 1.0


def body_mask(hu: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
    """Patient cross-section: dense pixels, opened (detaches table/blanket), big components, holes filled."""
    dense = hu > BODY_HU
    opened = ndi.binary_opening(dense, structure=_disk(2.5, spacing))
    lab, n, sizes = _components(opened)
    if n == 0:
        return np.zeros_like(dense)
    # trunk = largest; arms at the sides are big and not flat; tables/blankets are flat
    keep = sizes >= 0.03 * sizes.max()
    keep[0] = False
    for i, sl in enumerate(ndi.find_objects(lab), start=1):
        if keep[i] and sizes[i] < sizes.max():
            h = (sl[0].stop - sl[0].start) * spacing[0]
            w = (sl[1].stop - sl[1].start) * spacing[1]
            keep[i] = h >= 0.4 * w and min(h, w) >= 30.0
    body = keep[lab]
    body = ndi.binary_closing(body, structure=_disk(3.0, spacing), border_value=0) | body
    body = ndi.binary_fill_holes(body)
    # opening shaved the skin; restore dense pixels touching the body
    body |= ndi.binary_dilation(body, structure=_disk(3.0, spacing)) & dense
    return body | _cut_by_field_of_view(hu, spacing, body)


FOV_CONTACT_MAX = 0.4  # share of a region's rim on the field-of-view edge: a cut lung's is small
INSIDE_HULL_MIN = 0.5  # share of a region inside the body's convex hull: cut lungs 0.6-1, cushions ≤ 0.2
OUTSIDE_AIR_HU = -960  # median of the air around the patient (≈ −1000); parenchyma's is −780 to −900


def _cut_by_field_of_view(hu: np.ndarray, spacing: tuple[float, float], body: np.ndarray) -> np.ndarray:
    """Regions inside the patient that hole filling missed because the reconstruction circle (or the
    image edge) cuts through them: a lung reaching past a small field of view is open to the padding
    outside it, so it is no hole. Such a region is walled by the body on most of its rim, holds
    parenchyma and lies mostly inside the body's convex hull. The air between a wide patient and
    the circle touches the edge along a long arc and reads as air; cushions under the back, as dark
    as lung, lie outside the hull. Padding is flat air (≤ AIR_HU after ``CTVolume``'s clipping) in
    blocks a few mm wide, which noise in real air never fills."""
    padding = ndi.binary_opening(hu <= AIR_HU, structure=_disk(2.0, spacing))
    frame = np.zeros(hu.shape, dtype=bool)
    frame[[0, -1], :] = True
    frame[:, [0, -1]] = True
    lab, n, sizes = _components(~body & ~padding)
    out = np.zeros(hu.shape, dtype=bool)
    hull = None
    min_px = 100.0 / (spacing[0] * spacing[1])  # under 1 cm²: nothing to decide
    for i, box in enumerate(ndi.find_objects(lab), start=1):
        if sizes[i] < min_px:
            continue
        box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
        comp = lab[box] == i
        rim = ndi.binary_dilation(comp, structure=np.ones((3, 3), dtype=bool)) & ~comp  # body or padding
        at_frame = int((comp & frame[box]).sum())  # the image's own edge rows belong to the region
        contact = (int((rim & padding[box]).sum()) + at_frame) / max(int(rim.sum()) + at_frame, 1)
        if not 0 < contact < FOV_CONTACT_MAX:
            continue
        core = ndi.binary_erosion(comp, structure=_disk(3.0, spacing))  # a narrow pocket is all skin and rim
        if not core.any() or np.median(hu[box][core]) <= OUTSIDE_AIR_HU:
            continue
        hull = _convex_hull(body) if hull is None else hull  # foam cushions read like lung, but lie outside it
        if hull[box][comp].mean() >= INSIDE_HULL_MIN:
            out[box] |= comp
    return out


def _convex_hull(mask: np.ndarray) -> np.ndarray:
    """The filled convex hull of a 2-D mask's pixels (all False for fewer than three)."""
    ys, xs = np.nonzero(mask & ~ndi.binary_erosion(mask))
    im = Image.new("1", (mask.shape[1], mask.shape[0]), 0)
    if len(xs) >= 3:
        pts = np.c_[xs, ys].astype(float)
        try:
            ImageDraw.Draw(im).polygon([tuple(pts[v]) for v in ConvexHull(pts).vertices], fill=1, outline=1)
        except QhullError:  # collinear: a line has no inside
            pass
    return np.array(im, dtype=bool)


MIN_EXTENT_MM = 100.0  # thinner stacks (single slices, short runs) hold too little of the chest to tell


def thoracic_air(hu: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray | None:
    """(Z, H, W) bool: where a canonical volume's lungs and airways may lie (None for a stack under
    MIN_EXTENT_MM, where the one-slice rule stands alone). On one slice, colon gas mixed with stool and
    a stomach bubble look like lung; in 3-D they are components of their own, below the diaphragm.
    So: air (< LUNG_AIR_HU) inside each slice's body, labelled in 3-D at half resolution; kept are the
    largest component (the lungs, joined by the airways) and any other reaching the upper half of its
    height (a lung not joined at this resolution, the trachea; gas stays below the diaphragm, and even
    a distended colon's gas may be large), dilated by one half-resolution pixel so no lung edge is lost."""
    hu = np.asarray(hu)
    z, h, w = hu.shape
    if z * float(spacing[0]) < MIN_EXTENT_MM:
        return None
    half = (float(spacing[1]) * 2, float(spacing[2]) * 2)
    air = np.stack([body_mask(sl, half) & (sl < LUNG_AIR_HU) for sl in hu[:, ::2, ::2]])
    lab, n = ndi.label(air)
    if n == 0:
        return np.zeros(hu.shape, dtype=bool)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    big = int(np.argmax(sizes))
    boxes = ndi.find_objects(lab)
    lo, hi = boxes[big - 1][0].start, boxes[big - 1][0].stop  # canonical: slice index grows toward the head
    keep = np.array([False] + [b is not None and b[0].stop - 1 >= (lo + hi) / 2 for b in boxes])
    keep[big] = True
    lungs = ndi.binary_dilation(keep[lab], structure=ndi.generate_binary_structure(3, 1)[1:2])
    return np.repeat(np.repeat(lungs, 2, axis=1), 2, axis=2)[:, :h, :w]


def _split_touching(comp: np.ndarray, spacing: tuple[float, float]) -> np.ndarray | None:
    """Split one lung component that spans both sides: erode (distance threshold) until two big
    seeds appear, then give every pixel to the nearest seed. Nearest-seed (not flooding) keeps
    thin bridges such as the main bronchi with the lung they belong to. None if it never splits."""
    dist = ndi.distance_transform_edt(comp, sampling=spacing)
    for depth in (2.0, 4.0, 6.0, 9.0, 13.0, 18.0):
        lab, n, sizes = _components(dist > depth)
        if n < 2:
            continue
        order = np.argsort(sizes)[::-1]
        a, b = order[0], order[1]
        if sizes[b] < 0.1 * sizes[a]:
            continue
        seeds = np.zeros(comp.shape, dtype=np.int16)
        seeds[lab == a] = 1
        seeds[lab == b] = 2
        _, idx = ndi.distance_transform_edt(seeds == 0, sampling=spacing, return_indices=True)
        return np.where(comp, seeds[idx[0], idx[1]], 0)
    return None


def _airway_score(
    comp: np.ndarray, hu: np.ndarray, spacing: tuple[float, float], body_box: tuple[float, float, float, float]
) -> float | None:
    """How trachea-like an air component is (higher better), or None if it is not."""
    area = comp.sum() * spacing[0] * spacing[1]
    if not 80.0 <= area <= 900.0:  # main bronchi (≥ ~10 mm) up to a wide trachea
        return None
    vals = hu[comp]
    if np.median(vals) > -900:
        return None
    ys, xs = np.nonzero(comp)
    h = (ys.max() - ys.min() + 1) * spacing[0]
    w = (xs.max() - xs.min() + 1) * spacing[1]
    roundness = area / (math.pi * (max(h, w) / 2) ** 2)
    if roundness < 0.35 or max(h, w) > 40.0:
        return None
    y0, x0, y1, x1 = body_box
    cx = (x0 + x1) / 2
    fx = abs(xs.mean() - cx) / max(x1 - x0, 1)
    fy = (ys.mean() - y0) / max(y1 - y0, 1)
    if fx > 0.12 or not 0.1 <= fy <= 0.75:
        return None
    return roundness - 2 * fx


def _find_airway(
    hu: np.ndarray, spacing: tuple[float, float], body: np.ndarray, air: np.ndarray, body_box
) -> np.ndarray | None:
    """The most trachea-like air component. Tried on the air mask and on a stricter one
    (< −950 HU, grown back ≤ 1.5 mm into air) because at ~1 mm pixels a thin tracheal wall blurs
    and the lumen merges with an abutting lung at −400 HU."""
    strict = ndi.binary_opening(body & (hu < -950), structure=_disk(1.0, spacing))
    best, best_score = None, -np.inf
    px_area = spacing[0] * spacing[1]
    for source, grow in ((air, False), (strict, True)):
        lab, n, sizes = _components(source)
        for i in np.flatnonzero(sizes * px_area >= 20.0):
            comp = lab == i
            score = _airway_score(comp, hu, spacing, body_box)
            if score is not None and score > best_score:
                if grow:
                    comp = ndi.binary_dilation(comp, structure=_disk(1.5, spacing)) & air
                best, best_score = comp, score
    return best


def _anatomy_from_hu(hu: np.ndarray, spacing: tuple[float, float], body: np.ndarray,
                     lung_air: np.ndarray | None = None) -> np.ndarray:
    out = np.zeros(hu.shape, dtype=np.uint8)
    ys, xs = np.nonzero(body)
    if len(ys) == 0:
        return out
    body_box = (ys.min(), xs.min(), ys.max(), xs.max())
    mid_col = (xs.min() + xs.max()) / 2.0
    px_area = spacing[0] * spacing[1]
    air = body & (hu < LUNG_AIR_HU)
    if lung_air is not None:  # the volume's 3-D lungs and airways (thoracic_air): bowel gas is not lung
        air &= lung_air
    air = ndi.binary_opening(air, structure=_disk(1.0, spacing))
    airway = _find_airway(hu, spacing, body, air, body_box)
    if airway is not None:
        air &= ~airway
        out[airway] = MaskClass.TRACHEA
    lab, n, sizes = _components(air)
    lungs = np.zeros(hu.shape, dtype=bool)
    for i in np.flatnonzero(sizes * px_area >= 20.0):
        area = sizes[i] * px_area
        comp = lab == i
        vals = hu[comp]
        if np.percentile(vals, 90) < -960:  # uniform gas (bowel, stomach): lungs have vessels
            continue
        cx = np.nonzero(comp)[1].mean()
        off_mid = abs(cx - mid_col) / max(body_box[3] - body_box[1], 1)
        if area < 150.0 and off_mid < 0.1:  # oesophagus air, mediastinal specks
            continue
        lungs |= comp
    if not lungs.any():
        return out
    lab, n, sizes = _components(lungs)
    right_side = np.zeros(hu.shape, dtype=bool)  # image right = patient LEFT
    for i in range(1, n + 1):
        comp = lab == i
        cols = np.nonzero(comp)[1]
        frac_right = (cols > mid_col).mean()
        if 0.15 < frac_right < 0.85 and sizes[i] * px_area > 2000.0:
            ws = _split_touching(comp, spacing)
            if ws is not None:
                for part in (1, 2):
                    p = ws == part
                    if p.any() and np.nonzero(p)[1].mean() > mid_col:
                        right_side |= p
                continue
            right_side |= comp & (np.arange(hu.shape[1])[None, :] > mid_col)
            continue
        if frac_right >= 0.5:
            right_side |= comp
    left_img = lungs & ~right_side
    close = _disk(2.0, spacing)
    for region, cls in ((right_side, MaskClass.LEFT_LUNG), (left_img, MaskClass.RIGHT_LUNG)):
        if not region.any():
            continue
        filled = ndi.binary_fill_holes(ndi.binary_closing(region, structure=close) | region) & body
        out[filled & (out == 0)] = cls
    return out


def _rasterise(polys: list[tuple[np.ndarray, bool, str | None]], shape: tuple[int, int], n_readers: int) -> np.ndarray:
    """LIDC outlines → boolean mask: per reader the pixels inside its outlines (masks.outlines: the
    outline's own pixels lie outside the nodule), then the ≥50 % reader vote."""
    per_reader: dict[str | None, list[tuple[np.ndarray, bool]]] = {}
    for pts, incl, reader in polys:
        per_reader.setdefault(reader, []).append((np.asarray(pts, dtype=np.float64).reshape(-1, 2), bool(incl)))
    votes = np.zeros(shape, dtype=np.int32)
    for reader_polys in per_reader.values():
        yx = outline_pixels(reader_polys, 0.5)
        yx = yx[(yx[:, 0] >= 0) & (yx[:, 0] < shape[0]) & (yx[:, 1] >= 0) & (yx[:, 1] < shape[1])]
        votes[yx[:, 0], yx[:, 1]] += 1
    need = max(1, math.ceil(0.5 * max(n_readers, 1)))
    return votes >= need


def _sphere_section(hu: np.ndarray, sn: SliceNodule, body: np.ndarray) -> np.ndarray:
    """Circle of the annotated sphere, refined to the dense tissue in it (grown at most to 1.2×)."""
    h, w = hu.shape
    yy, xx = np.ogrid[:h, :w]
    cy, cx = sn.center_yx
    ry, rx = max(sn.radius_px[0], 0.5), max(sn.radius_px[1], 0.5)
    ell = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    disk = ell <= 1.0
    if not disk.any():
        iy, ix = int(round(cy)), int(round(cx))
        if 0 <= iy < h and 0 <= ix < w:
            disk[iy, ix] = True
        return disk
    dense = (ell <= 1.44) & (hu > NODULE_HU)
    lab, n, _ = _components(dense)
    hit = np.unique(lab[disk & dense])
    hit = hit[hit > 0]
    refined = np.isin(lab, hit) if len(hit) else np.zeros_like(disk)
    if refined.sum() < 0.25 * disk.sum():  # ground glass / partial volume: trust the annotation
        return disk & (body | (hu > NODULE_HU))
    return refined


def semantic_mask(
    slice_hu: np.ndarray,
    spacing: tuple[float, float],
    nodules=(),
    lung_seg: np.ndarray | None = None,
    lung_air: np.ndarray | None = None,
) -> np.ndarray:
    """uint8 (H, W) ``MaskClass`` labels for one canonical axial slice. ``nodules``: ``SliceNodule``
    cross-sections in this slice's pixels (see ``nodulesynth.data.sections.nodules_in_slice``). ``lung_seg``: the matching
    LUNA16 seg-lungs slice (3 left, 4 right, 5 trachea); when given it decides lungs and trachea.
    ``lung_air``: this slice of the volume's :func:`thoracic_air`; air outside it is never lung."""
    hu = np.asarray(slice_hu, dtype=np.float32)
    if hu.ndim != 2:
        raise ValueError(f"semantic_mask: expected one (H, W) slice, got shape {hu.shape}")
    spacing = (float(spacing[0]), float(spacing[1]))
    body = body_mask(hu, spacing)
    if lung_seg is not None:
        seg = np.asarray(lung_seg)
        if seg.shape != hu.shape:
            raise ValueError(f"semantic_mask: lung_seg shape {seg.shape} != slice shape {hu.shape}")
        anat = np.zeros(hu.shape, dtype=np.uint8)
        for v, cls in LUNA16_TO_CLASS.items():
            anat[seg == v] = cls
        body |= anat > 0
    else:
        anat = _anatomy_from_hu(hu, spacing, body, lung_air)
    mask = np.where(body, np.uint8(MaskClass.BODY), np.uint8(MaskClass.BACKGROUND)).astype(np.uint8)
    mask[anat > 0] = anat[anat > 0]
    for sn in nodules:
        if sn.polygons:
            nod = _rasterise(sn.polygons, hu.shape, sn.n_readers)
        else:
            nod = _sphere_section(hu, sn, body)
        mask[nod] = MaskClass.NODULE
    return mask


def lung_parenchyma(slice_hu: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Lung-parenchyma extraction (the paper's §4.1 / Fig. 3 step): keep lungs and nodules, set
    everything else to air (−1024 HU: our value; the paper shows the result, not the number)."""
    keep = np.isin(mask, (MaskClass.LEFT_LUNG, MaskClass.RIGHT_LUNG, MaskClass.NODULE))
    return np.where(keep, slice_hu, np.asarray(AIR_HU, dtype=np.asarray(slice_hu).dtype))
