"""Procedural 3-D chest-CT phantom written in the LUNA16 layout.

WHY: LUNA16 (~120 GB) is out of reach here and the real LIDC sample is two patients, so every
path of the data layer (``load_ct`` → annotations → masks → ``prepare``) needs CT-like scans with
known nodules. A phantom is deterministic from a seed (same seed → same bytes), fast (vectorised
numpy: every structure is an analytic field evaluated by broadcasting 1-D z / y / x coordinates,
vessels and nodules are rasterised per segment inside their bounding boxes) and has an exact
ground truth: nodule centres/diameters and the lung/airway masks.

Frames. Anatomy is built in a *body frame* in mm: X = patient's left (+, = larger x index, the
image's right in radiological display), Y = posterior (+, larger row index), Z = superior
(0 at the deepest costophrenic recess, the lung apex at ``Z = lung_height``). Arrays are (z, y, x)
like LUNA16's; the direction matrix is the identity, so world = origin + index * spacing.

Nodule sizes: LUNA16's annotated diameters (3–32 mm) are right-skewed with most nodules 4–10 mm;
we draw them from a log-normal with median 6.5 mm and log-sd 0.55, clipped to [3, 30] mm
(P(d < 10 mm) ≈ 0.78, P(d > 20 mm) ≈ 0.02), a documented fit rather than the LIDC database.
"""
from __future__ import annotations

import csv
import hashlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..errors import NoduleSynthError
from .records import Nodule

UID_PREFIX = "1.3.6.1.4.1.14519.5.2.1.6279.6001.9"
SEG_LEFT, SEG_RIGHT, SEG_TRACHEA = 3, 4, 5  # LUNA16 seg-lungs values
NODULE_TYPES = ("solid", "part-solid", "ground-glass")
ATTACHMENTS = ("interior", "juxta-pleural", "vessel")
ANNOTATION_HEADER = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")

# Internal tissue labels → (mean HU, texture amplitude HU). Bone cortex ~ +700, fat -100, etc.
_TISSUES = {
    "air": (-1000.0, 0.0),
    "skin": (20.0, 10.0),
    "fat": (-105.0, 14.0),
    "muscle": (55.0, 10.0),
    "cartilage": (120.0, 25.0),
    "marrow": (200.0, 70.0),
    "cortex": (620.0, 160.0),
    "lung": (-905.0, 24.0),
    "med_fat": (-105.0, 14.0),
    "heart": (40.0, 7.0),
    "blood": (42.0, 5.0),
    "lumen": (-1000.0, 0.0),
    "airway_wall": (35.0, 12.0),
    "liver": (58.0, 7.0),
    "abdomen": (35.0, 15.0),
    "csf": (15.0, 5.0),
    "disc": (85.0, 10.0),
    "table_shell": (180.0, 25.0),
    "table_foam": (-880.0, 15.0),
    "soft": (30.0, 12.0),
}
_L = {name: i for i, name in enumerate(_TISSUES)}
_LUT = np.array([v[0] for v in _TISSUES.values()], dtype=np.float32)
_AMP = np.array([v[1] for v in _TISSUES.values()], dtype=np.float32)


@dataclass
class PhantomConfig:
    """What varies between phantoms. Sizes other than 512 scale the in-plane spacing by 512/size so
    the whole body still fits (a 128² test phantom has ~3 mm pixels)."""

    size: int = 512
    slices: int = 100
    spacing_range_mm: tuple[float, float] = (0.55, 0.95)  # in-plane, at size 512
    thickness_choices_mm: tuple[float, ...] = (0.625, 1.0, 1.25, 1.5, 2.0, 2.5)
    nodules_min: int = 1
    nodules_max: int = 5
    nodules_extra_mean: float = 0.7  # Poisson mean of nodules beyond nodules_min
    diameter_range_mm: tuple[float, float] = (3.0, 30.0)
    diameter_median_mm: float = 6.5
    diameter_log_sd: float = 0.55
    type_probs: tuple[float, float, float] = (0.7, 0.15, 0.15)  # solid, part-solid, ground-glass
    attachment_probs: tuple[float, float, float] = (0.6, 0.2, 0.2)  # interior, juxta-pleural, vessel
    noise_std_range_hu: tuple[float, float] = (12.0, 22.0)
    psf_sigma_px: float = 0.6
    table_prob: float = 0.8
    vessel_min_radius_mm: float = 0.35

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> NoduleSynthError:
            return NoduleSynthError(f"PhantomConfig.{name}={getattr(self, name)!r}: {why}")

        if not 32 <= int(self.size) <= 1024:
            raise NoduleSynthError(f"--size {self.size}: must be between 32 and 1024 pixels")
        if not 4 <= int(self.slices) <= 1000:
            raise NoduleSynthError(f"--slices {self.slices}: must be between 4 and 1000")
        lo, hi = self.diameter_range_mm
        if not 0 < lo <= hi:
            raise bad("diameter_range_mm", "needs 0 < min <= max")
        if not 0 <= self.nodules_min <= self.nodules_max:
            raise bad("nodules_min", "needs 0 <= nodules_min <= nodules_max")
        for name in ("type_probs", "attachment_probs"):
            p = getattr(self, name)
            if len(p) != 3 or min(p) < 0 or sum(p) <= 0:
                raise bad(name, "needs three non-negative weights with a positive sum")
        if not self.thickness_choices_mm or min(self.thickness_choices_mm) <= 0:
            raise bad("thickness_choices_mm", "needs at least one positive thickness")
        if not 0 < self.spacing_range_mm[0] <= self.spacing_range_mm[1]:
            raise bad("spacing_range_mm", "needs 0 < min <= max")


@dataclass
class PhantomScan:
    """One phantom: HU (z, y, x) int16, spacing/origin in (z, y, x) mm like ``CTVolume``, LUNA16
    seg-lungs labels and the nodules (world x, y, z mm; characteristics say type and attachment)."""

    hu: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    lung_seg: np.ndarray
    nodules: list[Nodule]
    series_uid: str = ""
    meta: dict = field(default_factory=dict)


def series_uid(seed: int, index: int) -> str:
    """DICOM-looking series UID, deterministic from (seed, index), at most 64 characters."""
    h = int.from_bytes(hashlib.sha256(f"nodulesynth-phantom:{seed}:{index}".encode()).digest()[:12], "big")
    return f"{UID_PREFIX}{h % 10**24:024d}"


def sample_diameters(rng: np.random.Generator, n: int, cfg: PhantomConfig) -> np.ndarray:
    """Log-normal diameters (median cfg.diameter_median_mm), resampled into the allowed range."""
    lo, hi = cfg.diameter_range_mm
    d = rng.lognormal(math.log(cfg.diameter_median_mm), cfg.diameter_log_sd, size=max(4 * n, 16))
    d = d[(d >= lo) & (d <= hi)]
    return np.clip(np.concatenate([d, rng.uniform(lo, min(hi, 10.0), size=n)])[:n], lo, hi)


# --------------------------------------------------------------------------------------------
# Anatomy: analytic fields, evaluated on the grid (broadcast 1-D axes) and on point lists alike.
# --------------------------------------------------------------------------------------------
def _u(rng: np.random.Generator, a: float, b: float) -> float:
    return float(rng.uniform(a, b))


@dataclass(frozen=True)
class AnatomyRanges:
    """Uniform ranges (lo, hi) the random patient geometry is drawn from; lengths in mm in the
    body frame, angles in radians, ``*_frac`` as fractions of the lung height (0 = deepest
    costophrenic recess, 1 = apex). Plausible adult chest sizes, tuned by eye against the real
    LIDC sample (``benchmarks/phantom_vs_real.py`` compares the resulting HU statistics)."""

    body_half_width_mm: tuple[float, float] = (140.0, 190.0)
    body_depth_ratio: tuple[float, float] = (0.62, 0.74)  # AP half-depth / half-width
    outline_exponent_front: tuple[float, float] = (2.0, 2.4)  # superellipse: 2 = ellipse, more = boxier
    outline_exponent_back: tuple[float, float] = (2.6, 3.4)  # flatter back (supine on the table)
    outline_wobble: tuple[float, float] = (0.0, 0.025)  # relative amplitude of harmonics 2..5
    body_z_slope: tuple[float, float] = (-0.06, 0.08)  # relative widening from base to apex
    fat_mm: tuple[float, float] = (4.0, 28.0)  # subcutaneous fat (lateral; thinner elsewhere)
    muscle_mm: tuple[float, float] = (7.0, 11.0)  # chest-wall muscle everywhere
    pectoral_mm: tuple[float, float] = (6.0, 16.0)  # extra muscle anteriorly
    paraspinal_mm: tuple[float, float] = (30.0, 42.0)  # extra muscle beside the spine
    rib_ring_mm: tuple[float, float] = (6.0, 8.5)  # thickness of the rib layer
    lung_height_mm: tuple[float, float] = (210.0, 260.0)  # costophrenic recess to apex
    rib_pitch_mm: tuple[float, float] = (24.0, 30.0)  # z distance between ribs
    rib_height_mm: tuple[float, float] = (8.0, 11.0)
    rib_drop_mm: tuple[float, float] = (150.0, 210.0)  # ribs run lower anteriorly (helix pitch)
    rib_phase_mm: tuple[float, float] = (0.0, 30.0)
    vertebra_radius_mm: tuple[float, float] = (14.0, 18.0)
    canal_radius_mm: tuple[float, float] = (6.0, 8.0)  # spinal canal
    vertebra_pitch_mm: tuple[float, float] = (22.0, 27.0)
    disc_height_mm: tuple[float, float] = (4.0, 6.0)
    vertebra_phase_mm: tuple[float, float] = (0.0, 25.0)
    mediastinum_half_width_mm: tuple[float, float] = (9.0, 14.0)  # central band between the lungs
    heart_x_frac_of_cavity: tuple[float, float] = (0.12, 0.22)  # heart centre, right of midline (+x)
    heart_y_frac_of_front: tuple[float, float] = (0.2, 0.35)  # heart centre towards the sternum
    heart_half_width_frac: tuple[float, float] = (0.36, 0.46)  # of the cavity half-width
    heart_half_depth_frac: tuple[float, float] = (0.28, 0.36)  # of the cavity depth
    heart_half_height_frac: tuple[float, float] = (0.22, 0.3)  # of the lung height
    heart_z_frac: tuple[float, float] = (0.26, 0.34)
    upper_mediastinum_mm: tuple[tuple[float, float], tuple[float, float]] = ((22.0, 30.0), (30.0, 42.0))  # half-axes x, y
    upper_mediastinum_z_frac: tuple[tuple[float, float], tuple[float, float]] = ((0.42, 0.5), (0.78, 0.86))  # from, to
    aorta_radius_mm: tuple[float, float] = (10.0, 13.5)
    aortic_arch_z_frac: tuple[float, float] = (0.7, 0.78)
    lung_x_frac: tuple[float, float] = (0.5, 0.58)  # lung centre off midline, of the cavity half-width
    lung_y_frac: tuple[float, float] = (0.0, 0.12)  # lung centre towards the spine
    lung_half_width_frac: tuple[float, float] = (0.6, 0.72)  # of the cavity half-width
    lung_half_depth_frac: tuple[float, float] = (0.62, 0.72)  # of the cavity depth
    lung_wobble: tuple[float, float] = (0.0, 0.06)  # relative amplitude of outline harmonics 2..4
    dome_top_right_mm: tuple[float, float] = (55.0, 75.0)  # diaphragm dome height (right is higher)
    dome_top_left_mm: tuple[float, float] = (40.0, 60.0)
    dome_x_frac: tuple[float, float] = (0.35, 0.5)
    dome_y_frac: tuple[float, float] = (-0.3, 0.0)
    dome_radius_frac: tuple[float, float] = (0.5, 0.6)
    apex_taper_z_frac: tuple[float, float] = (0.5, 0.6)  # lungs narrow towards the apex above this
    lung_gradient_hu: tuple[float, float] = (30.0, 70.0)  # denser posteriorly (gravity, supine)
    carina_z_frac: tuple[float, float] = (0.6, 0.7)
    trachea_radius_mm: tuple[float, float] = (7.5, 10.0)
    trachea_x_mm: tuple[float, float] = (-4.0, 1.0)
    sternum_width_mm: tuple[float, float] = (12.0, 18.0)


class _Anatomy:
    """Random patient geometry (drawn from ``AnatomyRanges``). All public methods take
    broadcastable (Z, Y, X) mm arrays. Short attribute names are the drawn values used in the
    field formulas below; their meaning and units are those of the matching range."""

    def __init__(self, rng: np.random.Generator, ranges: AnatomyRanges = AnatomyRanges()):
        R = ranges
        u = lambda r: _u(rng, *r)  # noqa: E731  (draw order fixes the bytes of every phantom)
        self.half_width = u(R.body_half_width_mm)
        self.half_depth = self.half_width * u(R.body_depth_ratio)
        self.p_ant, self.p_post = u(R.outline_exponent_front), u(R.outline_exponent_back)
        self.harm = [(k, u(R.outline_wobble), u((0, 2 * math.pi))) for k in (2, 3, 4, 5)]
        self.g_slope = u(R.body_z_slope)
        self.fat0 = u(R.fat_mm)
        self.muscle0 = u(R.muscle_mm)
        self.pect = u(R.pectoral_mm)
        self.para = u(R.paraspinal_mm)
        self.rib_t = u(R.rib_ring_mm)
        self.lung_h = u(R.lung_height_mm)
        # ribs: helical bands on the rib ring, higher posteriorly
        self.rib_pitch, self.rib_h, self.rib_drop = u(R.rib_pitch_mm), u(R.rib_height_mm), u(R.rib_drop_mm)
        self.rib_phase = u(R.rib_phase_mm)
        # spine (vertebral body centre sits at the cavity's posterior wall)
        self.vertebra_r = u(R.vertebra_radius_mm)
        r_post = self._r_body_scalar(math.pi / 2)
        self.y_vb = r_post - self.fat0 - self.muscle0 - self.para * 0.55 - self.vertebra_r * 0.6
        self.canal_r = u(R.canal_radius_mm)
        self.y_canal = self.y_vb + self.vertebra_r + self.canal_r + 1.5
        self.vert_pitch, self.disc_h = u(R.vertebra_pitch_mm), u(R.disc_height_mm)
        self.vert_phase = u(R.vertebra_phase_mm)
        # mediastinum
        r_ant = self._r_body_scalar(-math.pi / 2)
        self.y_ant_cav = -(r_ant - self.fat0 - self.muscle0 - self.pect - self.rib_t)
        self.band = u(R.mediastinum_half_width_mm)
        cav_w = self.half_width - self.fat0 * 1.4 - self.muscle0 - self.rib_t
        self.cav_w = cav_w
        self.heart = (u(R.heart_x_frac_of_cavity) * cav_w, self.y_ant_cav * u(R.heart_y_frac_of_front),
                      u(R.heart_half_width_frac) * cav_w, u(R.heart_half_depth_frac) * (self.y_vb - self.y_ant_cav),
                      u(R.heart_half_height_frac) * self.lung_h, u(R.heart_z_frac))
        (ua, ub), (t0, t1) = R.upper_mediastinum_mm, R.upper_mediastinum_z_frac
        self.upper = (u(ua), u(ub), u(t0), u(t1))
        self.aorta_r = u(R.aorta_radius_mm)
        self.aorta_x = self.vertebra_r * 0.6 + self.aorta_r * 0.8
        self.aorta_y = self.y_vb - self.vertebra_r * 0.5
        self.t_arch = u(R.aortic_arch_z_frac)
        # lungs: per-side envelope (centre, semi-axes, harmonics), apex taper, diaphragm domes
        self.lung = {}
        for side, sgn in (("right", -1.0), ("left", 1.0)):
            self.lung[side] = dict(
                cx=sgn * cav_w * u(R.lung_x_frac), cy=u(R.lung_y_frac) * self.y_vb,
                ax=cav_w * u(R.lung_half_width_frac) * (0.95 if side == "left" else 1.0),
                ay=(self.y_vb - self.y_ant_cav) * u(R.lung_half_depth_frac),
                harm=[(k, u(R.lung_wobble), u((0, 2 * math.pi))) for k in (2, 3, 4)],
                dome_top=u(R.dome_top_right_mm) if side == "right" else u(R.dome_top_left_mm),
                dome_x=sgn * cav_w * u(R.dome_x_frac), dome_y=u(R.dome_y_frac) * self.y_vb,
                dome_r=cav_w * u(R.dome_radius_frac),
            )
        self.t_taper = u(R.apex_taper_z_frac)
        self.lung_grad = u(R.lung_gradient_hu)
        # airway
        self.t_carina = u(R.carina_z_frac)
        self.tr_r = u(R.trachea_radius_mm)
        self.tr_x = u(R.trachea_x_mm)
        self.tr_y = self.y_vb - self.vertebra_r - 12.0 - self.tr_r
        self.sternum_w = u(R.sternum_width_mm)

    # -- body --------------------------------------------------------------------------------
    def _r_body_scalar(self, th: float) -> float:
        return float(self.r_body(np.array([th], dtype=np.float32))[0])

    def r_body(self, th: np.ndarray) -> np.ndarray:
        """Radius of the body outline along angle ``th`` (superellipse, flatter at the back)."""
        c, s = np.abs(np.cos(th)), np.abs(np.sin(th))
        p = np.where(np.sin(th) > 0, self.p_post, self.p_ant).astype(np.float32)
        r = ((c / self.half_width) ** p + (s / self.half_depth) ** p) ** (-1.0 / p)
        for k, a, ph in self.harm:
            r = r * (1.0 + a * np.cos(k * th + ph))
        return r.astype(np.float32)

    def z_scale(self, Z: np.ndarray) -> np.ndarray:
        """Relative body size along z (the chest widens or narrows towards the apex)."""
        return (1.0 + self.g_slope * (Z / self.lung_h - 0.5)).astype(np.float32)

    def fat(self, th: np.ndarray) -> np.ndarray:
        return (self.fat0 * (0.7 + 0.6 * np.cos(th) ** 2 + 0.25 * np.clip(np.sin(th), 0, 1))).astype(np.float32)

    def muscle(self, th: np.ndarray) -> np.ndarray:
        ant = self.pect * np.exp(-(((np.abs(th + np.pi / 2) - 0.6) / 0.45) ** 2))
        post = self.para * np.exp(-(((th - np.pi / 2) / 0.28) ** 2))
        return (self.muscle0 + ant + post).astype(np.float32)

    def depth(self, Z, Y, X):
        """(radial depth below the skin, angle, r_body-along-angle); depth < 0 is outside."""
        th = np.arctan2(Y, X).astype(np.float32)
        r = np.sqrt(X * X + Y * Y).astype(np.float32)
        return self.r_body(th) * self.z_scale(Z) - r, th

    # -- cavity, mediastinum, lungs -------------------------------------------------------------
    def cavity_depth(self, th):
        return self.fat(th) + self.muscle(th) + self.rib_t + 1.5

    def mediastinum(self, Z, Y, X):
        """Non-lung contents of the thoracic cavity (spine block, central band, heart, great vessels, hila)."""
        t = Z / self.lung_h
        m = ((X * X + (Y - self.y_vb) ** 2) < (self.vertebra_r + 9.0) ** 2) | (np.abs(X - 0.1 * (Y - self.y_vb)) < self.band)
        ua, ub, t0, t1 = self.upper
        up = ((X / ua) ** 2 + ((Y - self.tr_y + 10.0) / ub) ** 2) < 1.0
        ao = ((X - self.aorta_x) ** 2 + (Y - self.aorta_y) ** 2) < (self.aorta_r + 3.0) ** 2
        m = m | (up & (t > t0) & (t < t1)) | (ao & (t < self.t_arch))
        hx, hy, ha, hb, hc, ht = self.heart
        m = m | ((((X - hx) / ha) ** 2 + ((Y - hy) / hb) ** 2) + ((Z - ht * self.lung_h) / hc) ** 2 < 1.0)
        for sgn in (-1.0, 1.0):
            q = ((X - sgn * (self.band + 14.0)) / 13.0) ** 2 + ((Y - 0.15 * self.y_vb) / 20.0) ** 2
            m = m | (q + ((Z - self.hilum_z()) / 24.0) ** 2 < 1.0)
        return m

    def hilum_z(self) -> float:
        return (self.t_carina - 0.08) * self.lung_h

    def taper(self, Z):
        t = Z / self.lung_h
        q = np.clip((t - self.t_taper) / (1.0 - self.t_taper), 0.0, 1.0)
        return np.where(t > 1.0, 0.0, np.sqrt(np.clip(1.0 - q * q, 0.0, 1.0))).astype(np.float32)

    def envelope(self, side: str, Z, Y, X):
        p = self.lung[side]
        dx, dy = (X - p["cx"]) / p["ax"], (Y - p["cy"]) / p["ay"]
        th = np.arctan2(dy, dx)
        rr = 1.0
        for k, a, ph in p["harm"]:
            rr = rr + a * np.cos(k * th + ph)
        rho = np.sqrt(dx * dx + dy * dy) / rr
        return rho < self.taper(Z)

    def dome_z(self, Y, X):
        """Height of the diaphragm under each point: a paraboloid dome per side, right higher."""
        out = []
        for side in ("right", "left"):
            p = self.lung[side]
            q = ((X - p["dome_x"]) ** 2 + (Y - p["dome_y"]) ** 2) / p["dome_r"] ** 2
            out.append(p["dome_top"] * (1.0 - 0.85 * q))
        return np.where(X < 0, out[0], out[1])

    def lung_side(self, Z, Y, X, inside=None) -> np.ndarray:
        """0 outside the lungs, 1 right lung (X < 0), 2 left lung (X > 0). ``inside`` (cavity above
        the domes minus mediastinum) may be passed in when the caller has it already."""
        if inside is None:
            d, th = self.depth(Z, Y, X)
            inside = (d > self.cavity_depth(th)) & (Z > self.dome_z(Y, X)) & ~self.mediastinum(Z, Y, X)
        right = inside & (X < 0) & self.envelope("right", Z, Y, X)
        left = inside & (X >= 0) & self.envelope("left", Z, Y, X)
        return right.astype(np.int8) + 2 * left.astype(np.int8)


# --------------------------------------------------------------------------------------------
# Rasterisers (bounding-box local, vectorised inside the box)
# --------------------------------------------------------------------------------------------
class _Grid:
    def __init__(self, z: np.ndarray, y: np.ndarray, x: np.ndarray, thickness: float):
        self.z, self.y, self.x, self.thickness = z, y, x, thickness
        self.shape = (len(z), len(y), len(x))

    def box(self, lo, hi):
        """Index slices covering body-frame mm box [lo, hi] (z, y, x); None when empty."""
        sl = []
        for ax, a, b in zip((self.z, self.y, self.x), lo, hi):
            i0, i1 = int(np.searchsorted(ax, a, "left")), int(np.searchsorted(ax, b, "right"))
            if i1 <= i0:
                return None
            sl.append(slice(i0, i1))
        return tuple(sl)

    def coords(self, sl):
        return self.z[sl[0], None, None], self.y[None, sl[1], None], self.x[None, None, sl[2]]


def _capsule(grid: _Grid, p0, p1, r0: float, r1: float, soft: float, slab: bool = True):
    """Partial-volume occupancy of a tapered tube p0→p1 (z, y, x mm) inside its box.

    With ``slab`` a voxel stands for its whole slice thickness: a tube thinner than the slice still
    shows (faintly) in every slice it crosses, as in real thick-slice CT."""
    p0, p1 = np.asarray(p0, np.float32), np.asarray(p1, np.float32)
    rmax = max(r0, r1) + soft
    half = grid.thickness / 2 if slab else 0.0
    lo, hi = np.minimum(p0, p1) - rmax, np.maximum(p0, p1) + rmax
    sl = grid.box((lo[0] - half, lo[1], lo[2]), (hi[0] + half, hi[1], hi[2]))
    if sl is None:
        return None, None
    Z, Y, X = grid.coords(sl)
    v = p1 - p0
    vv = float(v @ v) + 1e-6
    t = np.clip(((Z - p0[0]) * v[0] + (Y - p0[1]) * v[1] + (X - p0[2]) * v[2]) / vv, 0.0, 1.0)
    dz = np.abs(Z - (p0[0] + t * v[0]))
    if half:
        dz = np.maximum(dz - half, 0.0)
    dy, dx = Y - (p0[1] + t * v[1]), X - (p0[2] + t * v[2])
    rad = r0 + t * (r1 - r0)
    occ = np.clip((rad - np.sqrt(dz * dz + dy * dy + dx * dx)) / soft + 0.5, 0.0, 1.0)
    if half:
        cz = abs(float(v[0])) / math.sqrt(vv)
        occ *= np.minimum(1.0, 2.0 * rad / (grid.thickness * math.sqrt(max(1.0 - cz * cz, 1e-3))))
    return sl, occ.astype(np.float32)


def _fib_sphere(n: int) -> np.ndarray:
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    th = math.pi * (1 + 5**0.5) * i
    return np.stack([np.cos(phi), np.sin(phi) * np.sin(th), np.sin(phi) * np.cos(th)], 1).astype(np.float32)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-9)


# --------------------------------------------------------------------------------------------
# Vessel tree
# --------------------------------------------------------------------------------------------
def _grow_vessels(rng: np.random.Generator, an: _Anatomy, r_min: float, max_segments: int = 24000):
    """Random tapering trees from each hilum (arteries) and a lower one (veins), grown
    generation by generation (vectorised), pruned at the pleura. Returns (p0, p1, r0, r1, gen)."""
    seeds_p, seeds_d, seeds_r = [], [], []
    zh = an.hilum_z()
    for sgn in (-1.0, 1.0):
        for dz, n_roots in ((0.0, 9), (-22.0, 7)):  # arterial, venous hilum
            h = np.array([zh + dz, 0.15 * an.y_vb + (0.0 if dz == 0 else -8.0), sgn * (an.band + 12.0)], np.float32)
            d = rng.normal(size=(n_roots, 3)).astype(np.float32)
            d[:, 2] = sgn * (np.abs(d[:, 2]) + 0.6)
            d[:, 0] *= 1.4  # lobes above and below
            seeds_p.append(np.repeat(h[None], n_roots, 0))
            seeds_d.append(_unit(d))
            seeds_r.append(rng.uniform(3.0, 4.5, n_roots).astype(np.float32))
    p, d, r = np.concatenate(seeds_p), np.concatenate(seeds_d), np.concatenate(seeds_r)
    hub = p.copy()
    right_core = np.array([zh, 0.3 * an.y_vb, an.lung["right"]["cx"]], np.float32)
    left_core = np.array([zh, 0.3 * an.y_vb, an.lung["left"]["cx"]], np.float32)
    segs: list[np.ndarray] = []
    gen = 0
    total = 0
    while len(p) and total < max_segments:
        L = np.clip(r * rng.uniform(6.0, 11.0, len(r)), 2.5, 40.0).astype(np.float32)
        if gen == 0:
            L = rng.uniform(22.0, 32.0, len(r)).astype(np.float32)
        end = p + d * L[:, None]
        ok = an.lung_side(end[:, 0], end[:, 1], end[:, 2]) > 0
        if gen > 0:  # leaving the lung: turn towards the lung's core, else shorten, else prune
            core = np.where(p[:, 2:3] < 0, right_core, left_core)
            d2 = np.where(ok[:, None], d, _unit(d + 1.2 * _unit(core - p)))
            end2 = p + d2 * L[:, None]
            ok2 = ~ok & (an.lung_side(end2[:, 0], end2[:, 1], end2[:, 2]) > 0)
            d, end = np.where(ok2[:, None], d2, d), np.where(ok2[:, None], end2, end)
            ok = ok | ok2
            half = p + d * (L[:, None] / 2)
            ok_half = ~ok & (an.lung_side(half[:, 0], half[:, 1], half[:, 2]) > 0)
            end = np.where(ok_half[:, None], half, end)
            ok = ok | ok_half
        else:
            ok[:] = True
        p, d, r, end, hub = p[ok], d[ok], r[ok], end[ok], hub[ok]
        r1 = r * 0.93
        segs.append(np.concatenate([p, end, r[:, None], r1[:, None], np.full((len(r), 1), gen, np.float32)], 1))
        total += len(r)
        # two children per segment (asymmetric, Murray-like radii), bent away from the hilum
        grow = r1 * 0.8 > r_min
        p, d, r1, hub = end[grow], d[grow], r1[grow], hub[grow]
        n = len(p)
        if n == 0:
            break
        e = _unit(np.cross(d, rng.normal(size=(n, 3)).astype(np.float32)))
        a1 = np.deg2rad(rng.uniform(12, 32, n)).astype(np.float32)[:, None]
        a2 = np.deg2rad(rng.uniform(35, 65, n)).astype(np.float32)[:, None]
        out = _unit(p - hub)
        d1 = _unit(np.cos(a1) * d + np.sin(a1) * e + 0.25 * out)
        d2 = _unit(np.cos(a2) * d - np.sin(a2) * e + 0.25 * out)
        rr1 = r1 * rng.uniform(0.72, 0.86, n).astype(np.float32)
        rr2 = r1 * rng.uniform(0.5, 0.72, n).astype(np.float32)
        p = np.concatenate([p, p])
        d = np.concatenate([d1, d2])
        r = np.concatenate([rr1, rr2])
        hub = np.concatenate([hub, hub])
        gen += 1
    return np.concatenate(segs) if segs else np.zeros((0, 9), np.float32)


def _splat_lines(grid: _Grid, segs: np.ndarray, spacing, occ: np.ndarray) -> None:
    """Sub-voxel vessels as weighted 1-voxel lines (the PSF blur gives them their width): one
    vectorised scatter for thousands of segments instead of a box per segment."""
    if not len(segs):
        return
    sz, sy, sx = spacing
    step = 0.5 * min(sz, sy, sx)
    p0, p1, r = segs[:, 0:3], segs[:, 3:6], segs[:, 6]
    length = np.linalg.norm(p1 - p0, axis=1)
    n = np.maximum(np.ceil(length / step).astype(int), 1)
    seg_id = np.repeat(np.arange(len(segs)), n)
    frac = (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n) + 0.5) / np.repeat(n, n)
    pts = p0[seg_id] + (p1 - p0)[seg_id] * frac[:, None].astype(np.float32)
    cz = np.abs(p1[:, 0] - p0[:, 0]) / np.maximum(length, 1e-6)
    w = np.minimum(1.0, 2 * r / sx) * np.minimum(1.0, 2 * r / (sz * np.sqrt(np.maximum(1 - cz * cz, 1e-3))))
    idx = []
    for k, ax in enumerate((grid.z, grid.y, grid.x)):
        idx.append(np.rint((pts[:, k] - ax[0]) / (ax[1] - ax[0])).astype(np.int64))
    keep = np.ones(len(pts), bool)
    for k, n_ax in enumerate(grid.shape):
        keep &= (idx[k] >= 0) & (idx[k] < n_ax)
    lin = np.ravel_multi_index([i[keep] for i in idx], grid.shape)
    flat = occ.reshape(-1)
    np.maximum.at(flat, lin, w[seg_id[keep]].astype(np.float32))


# --------------------------------------------------------------------------------------------
# Nodules
# --------------------------------------------------------------------------------------------
def _place_nodules(rng, an: _Anatomy, cfg: PhantomConfig, z_lo: float, z_hi: float, vessels: np.ndarray):
    """Choose centre, radius, type and attachment for each nodule; rejection-sampled with the
    analytic lung so interior nodules sit fully inside a lung and juxta-pleural ones touch the wall."""
    n = int(min(cfg.nodules_max, cfg.nodules_min + rng.poisson(cfg.nodules_extra_mean)))
    diam = sample_diameters(rng, n, cfg)
    probes = _fib_sphere(26)
    placed = []
    for dm in diam:
        typ = NODULE_TYPES[rng.choice(3, p=np.asarray(cfg.type_probs) / sum(cfg.type_probs))]
        att = ATTACHMENTS[rng.choice(3, p=np.asarray(cfg.attachment_probs) / sum(cfg.attachment_probs))]
        found = None
        for shrink in (1.0, 0.8, 0.6, 0.45):
            R = float(dm) * shrink / 2
            if z_hi - z_lo < 2 * R * 0.6:
                continue
            found = _try_place(rng, an, R, att, z_lo + 0.3 * R, z_hi - 0.3 * R, vessels, probes, placed)
            if found is None and att != "interior":
                found = _try_place(rng, an, R, "interior", z_lo + 0.3 * R, z_hi - 0.3 * R, vessels, probes, placed)
            if found is not None:
                break
        if found is not None:
            c, a = found
            placed.append(dict(center=c, radius=R, type=typ, attachment=a))
    return placed


def _try_place(rng, an, R, att, z_lo, z_hi, vessels, probes, placed, tries: int = 6):
    half_w = an.cav_w
    for _ in range(tries):
        m = 512
        if att == "vessel":
            vs = vessels[(vessels[:, 6] > 0.7) & (vessels[:, 6] < 3.5)]
            vs = vs[(np.minimum(vs[:, 0], vs[:, 3]) > z_lo) & (np.maximum(vs[:, 0], vs[:, 3]) < z_hi)]
            if not len(vs):
                return None
            s = vs[rng.integers(0, len(vs), m)]
            base = s[:, 0:3] + (s[:, 3:6] - s[:, 0:3]) * rng.uniform(0.2, 0.8, (m, 1)).astype(np.float32)
            e = _unit(np.cross(s[:, 3:6] - s[:, 0:3], rng.normal(size=(m, 3)).astype(np.float32)))
            c = base + e * (s[:, 6:7] + 0.6 * R)
        else:
            c = np.stack([rng.uniform(z_lo, z_hi, m), rng.uniform(an.y_ant_cav, an.y_vb + 20, m),
                          rng.uniform(-half_w, half_w, m)], 1).astype(np.float32)
        c = c[(c[:, 0] >= z_lo) & (c[:, 0] <= z_hi)]
        c = c[an.lung_side(c[:, 0], c[:, 1], c[:, 2]) > 0]
        for q in placed:
            c = c[np.linalg.norm(c - q["center"], axis=1) > R + q["radius"] + 4.0]
        if not len(c):
            continue
        pr = (c[:, None, :] + R * probes[None]).reshape(-1, 3)
        inner = (an.lung_side(pr[:, 0], pr[:, 1], pr[:, 2]) > 0).reshape(len(c), -1)
        if att == "juxta-pleural":
            pr2 = (c[:, None, :] + 0.45 * R * probes[None]).reshape(-1, 3)
            half_in = (an.lung_side(pr2[:, 0], pr2[:, 1], pr2[:, 2]) > 0).reshape(len(c), -1).all(1)
            ok = half_in & ((~inner).sum(1) >= 2)
        elif att == "vessel":
            ok = inner.mean(1) >= 0.85
        else:
            ok = inner.all(1)
        if ok.any():
            return c[np.flatnonzero(ok)[0]].astype(np.float64), att
    return None


def _render_nodule(rng, grid: _Grid, hu: np.ndarray, tex: np.ndarray, nd: dict, spacing) -> None:
    """Lobulated/spiculated nodule blended as max(current, partial-volume nodule): vessels and
    bone stay visible through ground glass, as in real scans."""
    c, R = nd["center"], nd["radius"]
    soft = 0.6 * min(spacing[1:]) + 0.2
    lobes = _unit(rng.normal(size=(int(rng.integers(2, 6)), 3))).astype(np.float32)
    lob_a = rng.uniform(0.05, 0.25, len(lobes)).astype(np.float32) * (R > 3)
    rmax = R * (1 + float(lob_a.sum())) + soft
    sl = grid.box(c - rmax, c + rmax)
    if sl is None:
        return
    Z, Y, X = grid.coords(sl)
    dz, dy, dx = Z - c[0], Y - c[1], X - c[2]
    dist = np.sqrt(dz * dz + dy * dy + dx * dx) + 1e-6
    cosv = [(dz * v[0] + dy * v[1] + dx * v[2]) / dist for v in lobes]
    Rd = R * (1 + sum(a * (np.exp((cv - 1) / 0.25) - 0.125) for a, cv in zip(lob_a, cosv)))
    occ = np.clip((Rd - dist) / soft + 0.5, 0, 1).astype(np.float32)
    typ = nd["type"]
    core_hu = _u(rng, -10.0, 60.0)
    ggo_hu = _u(rng, -680.0, -520.0)
    t = tex[sl]
    if typ == "solid":
        val = core_hu + 18.0 * t
    else:
        val = ggo_hu + 45.0 * t
    nod = hu[sl] * (1 - occ) + val * occ
    if typ == "part-solid":
        rc = R * _u(rng, 0.35, 0.6)
        occ_c = np.clip((rc - dist) / soft + 0.5, 0, 1)
        nod = nod * (1 - occ_c) + (core_hu + 18.0 * t) * occ_c
    np.maximum(hu[sl], nod, out=hu[sl])
    nd["lobulated"] = bool(lob_a.max(initial=0) > 0.15)
    nd["spiculated"] = False
    if typ != "ground-glass" and R >= 4 and rng.random() < 0.35:  # spicules: thin tapering strands
        nd["spiculated"] = True
        for v in _unit(rng.normal(size=(int(rng.integers(4, 11)), 3))):
            ln = R * float(rng.uniform(1.4, 2.2))
            sl2, o2 = _capsule(grid, c, c + v * ln, max(0.6, 0.18 * R), 0.25, soft, slab=False)
            if sl2 is not None:
                np.maximum(hu[sl2], hu[sl2] * (1 - o2) + (core_hu - 30.0) * o2, out=hu[sl2])


# --------------------------------------------------------------------------------------------
# The phantom
# --------------------------------------------------------------------------------------------
def _gauss_kernel_energy(sigma: float) -> float:
    """sqrt(sum w²) of scipy's discrete Gaussian: how much it shrinks white-noise std per axis."""
    if sigma <= 0:
        return 1.0
    delta = np.zeros(33, np.float64)
    delta[16] = 1
    return float(np.sqrt((ndimage.gaussian_filter1d(delta, sigma) ** 2).sum()))


class _Ctx:
    """Grid state shared by the painting steps of one phantom."""

    def __init__(self, an: _Anatomy, grid: _Grid, sx: float):
        self.an, self.grid, self.sx = an, grid, sx
        zc, yc, xc = grid.z, grid.y, grid.x
        self.Z, self.Y, self.X = zc[:, None, None], yc[None, :, None], xc[None, None, :]
        self.Y2, self.X2 = yc[:, None], xc[None, :]
        self.lab = np.zeros(grid.shape, np.uint8)

    def zs(self, z0: float, z1: float) -> slice:
        """Slices whose centre lies in [z0, z1) mm: z-limited organs are painted only there."""
        zc = self.grid.z
        return slice(int(np.searchsorted(zc, z0)), int(np.searchsorted(zc, z1)))


def _paint_wall(c: _Ctx) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Skin, fat, muscle, ribs (helical bands on the rib ring, cortex around marrow), costal
    cartilage, sternum, scapulae. Returns (radial depth below the skin d, thoracic-cavity mask,
    mask of everything deeper than the subcutaneous fat)."""
    an, lab, zc, xc = c.an, c.lab, c.grid.z, c.grid.x
    H, W = lab.shape[1:]
    th2 = np.arctan2(c.Y2, c.X2).astype(np.float32)
    r2 = np.sqrt(c.X2 * c.X2 + c.Y2 * c.Y2).astype(np.float32)
    d = an.r_body(th2)[None] * an.z_scale(c.Z) - r2[None]
    f2, m2 = an.fat(th2), an.muscle(th2)
    np.copyto(lab, _L["skin"], where=d > 0)
    np.copyto(lab, _L["fat"], where=d > 1.8)
    np.copyto(lab, _L["muscle"], where=d > f2[None])
    ri = np.flatnonzero((d > (f2 + m2)[None]) & (d < (f2 + m2 + an.rib_t)[None]))
    if len(ri):  # evaluated only on the thin rib ring
        kz, rem = np.divmod(ri, H * W)
        ky, kx = np.divmod(rem, W)
        alpha = np.abs(np.angle(np.exp(1j * (th2[ky, kx] - np.pi / 2))))  # 0 at the spine, π at the sternum
        phase = np.mod(zc[kz] + an.rib_drop * alpha / np.pi - an.rib_phase, an.rib_pitch)
        rib = phase < an.rib_h
        dd = d.reshape(-1)[ri] - (f2 + m2)[ky, kx]
        core = rib & (phase > 1.1) & (phase < an.rib_h - 1.1) & (dd > 1.2) & (dd < an.rib_t - 1.2)
        bone = np.where(core, _L["marrow"], _L["cortex"]).astype(np.uint8)
        bone = np.where(alpha > np.pi - 0.75, _L["cartilage"], bone)
        sel = rib & (zc[kz] < an.lung_h * 1.08) & (alpha > 0.12)
        flat = lab.reshape(-1)
        flat[ri[sel]] = bone[sel]
        st = (np.abs(xc[kx]) < an.sternum_w) & (zc[kz] > 0.2 * an.lung_h) & (zc[kz] < 0.95 * an.lung_h)
        st_core = st & (np.abs(xc[kx]) < an.sternum_w - 2) & (dd > 1.5) & (dd < an.rib_t - 1.5)
        flat[ri[st]] = _L["cortex"]
        flat[ri[st_core]] = _L["marrow"]
    alpha2 = np.abs(np.angle(np.exp(1j * (th2 - np.pi / 2))))
    zs = c.zs(0.5 * an.lung_h, 1e9)
    scap = ((alpha2 > 0.45) & (alpha2 < 1.0))[None] & (d[zs] > (f2 + 2.0)[None]) & (d[zs] < (f2 + 5.0)[None])
    np.copyto(lab[zs], _L["cortex"], where=scap)
    return d, d > an.cavity_depth(th2)[None], d > (f2 + 3.0)[None]


def _paint_cavity(c: _Ctx, cav: np.ndarray) -> np.ndarray:
    """Abdomen under the domes, mediastinum (fat, heart, great vessels, oesophagus), lungs.
    Returns the lung side map (0 none, 1 right, 2 left)."""
    an, lab, Z, Y, X = c.an, c.lab, c.Z, c.Y, c.X
    below = Z < an.dome_z(c.Y2, c.X2)[None]
    np.copyto(lab, _L["soft"], where=cav)
    np.copyto(lab, np.where(c.X2 < 12.0, _L["liver"], _L["abdomen"]).astype(np.uint8)[None], where=cav & below)
    med_raw = an.mediastinum(Z, Y, X)
    np.copyto(lab, _L["med_fat"], where=med_raw & cav & ~below)
    L = an.lung_h
    hx, hy, ha, hb, hc, ht = an.heart
    zs = c.zs(ht * L - hc, ht * L + hc)
    q = ((X - hx) / ha) ** 2 + ((Y - hy) / hb) ** 2
    np.copyto(lab[zs], _L["heart"], where=(q + ((Z[zs] - ht * L) / hc) ** 2 < 0.8) & cav[zs] & ~below[zs])
    h_top = ht * L + hc * 0.7
    asc_x, asc_y = -5.0, an.tr_y - 28.0
    circles = [  # (x, y, r, z0, z1): descending + ascending aorta, pulmonary trunk, SVC
        (an.aorta_x, an.aorta_y, an.aorta_r, -1e9, an.t_arch * L),
        (asc_x, asc_y, an.aorta_r + 2.0, h_top - 0.05 * L, an.t_arch * L),
        (22.0, asc_y - 4.0, 13.0, h_top - 0.08 * L, h_top + 0.06 * L),
        (-25.0, asc_y, 9.0, h_top - 0.05 * L, 0.95 * L),
    ]
    for x0, y0, r, z0, z1 in circles:
        zs = c.zs(z0, z1)
        np.copyto(lab[zs], _L["blood"], where=(((X - x0) ** 2 + (Y - y0) ** 2) < r * r) & cav[zs] & ~below[zs])
    eso = ((X - 4.0) ** 2 + (Y - (an.tr_y + an.tr_r + 6)) ** 2) < 7.0**2
    np.copyto(lab, _L["soft"], where=eso & cav & ~below)
    za = an.t_arch * L
    sl, o = _capsule(c.grid, (za, asc_y, asc_x), (za, an.aorta_y, an.aorta_x), an.aorta_r, an.aorta_r, 1.0)
    if sl is not None:
        lab[sl][o > 0.5] = _L["blood"]
    side = an.lung_side(Z, Y, X, inside=cav & ~below & ~med_raw)
    np.copyto(lab, _L["lung"], where=side > 0)
    return side


def _paint_spine(c: _Ctx, deep: np.ndarray) -> None:
    """Vertebral bodies (cortex, marrow, discs), canal, neural arch, spinous/transverse processes."""
    an, lab, X2, Y2, zc = c.an, c.lab, c.X2, c.Y2, c.grid.z
    ph = np.mod(zc - an.vert_phase, an.vert_pitch)[:, None, None]
    vb2 = X2 * X2 + (Y2 - an.y_vb) ** 2
    body = vb2 < an.vertebra_r**2
    np.copyto(lab, _L["cortex"], where=body[None])
    np.copyto(lab, _L["marrow"], where=(vb2 < (an.vertebra_r - 2.2) ** 2)[None] & (ph > 1.5) & (ph < an.vert_pitch - an.disc_h - 1.5))
    np.copyto(lab, _L["disc"], where=body[None] & (ph >= an.vert_pitch - an.disc_h))
    canal2 = X2 * X2 + (Y2 - an.y_canal) ** 2
    arch2 = (canal2 < (an.canal_r + 4.5) ** 2) & (Y2 > an.y_vb)
    spinous2 = (np.abs(X2) < 3.5) & (Y2 > an.y_canal) & (Y2 < an.y_canal + an.canal_r + 28.0)
    transverse2 = (np.abs(Y2 - an.y_canal + 2) < 5.0) & (np.abs(X2) < an.vertebra_r + 16.0)
    post = ((arch2 | spinous2)[None] & (ph < an.vert_pitch - 6.0)) | (transverse2[None] & (ph > 3.0) & (ph < 11.0))
    np.copyto(lab, _L["cortex"], where=post & ~body[None] & deep & (lab != _L["lung"]))
    np.copyto(lab, _L["csf"], where=(canal2 < an.canal_r**2)[None])


def _paint_airway(c: _Ctx) -> np.ndarray:
    """Trachea and main bronchi (wall, then air lumen). Returns the lumen mask (LUNA16 label 5)."""
    an, lab, grid = c.an, c.lab, c.grid
    zc = grid.z
    car = np.array([an.t_carina * an.lung_h, an.tr_y + 6.0, an.tr_x], np.float32)
    top = np.array([max(zc[-1] + 30.0, car[0] + 1.0), an.tr_y - 12.0, an.tr_x], np.float32)
    rb_end = np.array([car[0] - 24.0, 0.15 * an.y_vb + 4, -(an.band + 16.0)], np.float32)
    lb_end = np.array([an.hilum_z() - 16.0, 0.15 * an.y_vb + 6, an.band + 22.0], np.float32)
    tubes = [(top, car, an.tr_r, an.tr_r * 0.95), (car, rb_end, an.tr_r * 0.72, an.tr_r * 0.6),
             (car, lb_end, an.tr_r * 0.65, an.tr_r * 0.55)]
    soft = 0.5 * c.sx
    airway = np.zeros(lab.shape, bool)
    for p0, p1, r0, r1 in tubes:
        sl, o = _capsule(grid, p0, p1, r0 + 1.8, r1 + 1.6, soft, slab=False)
        if sl is not None:
            sub = lab[sl]
            sub[(o > 0.5) & (sub != _L["lumen"])] = _L["airway_wall"]
    for p0, p1, r0, r1 in tubes:
        sl, o = _capsule(grid, p0, p1, r0, r1, soft, slab=False)
        if sl is not None:
            lab[sl][o > 0.5] = _L["lumen"]
            airway[sl] |= o > 0.5
    return airway


def _paint_table(c: _Ctx, rng: np.random.Generator) -> None:
    """Curved carbon-fibre table (thin dense shells around foam) a few mm under the back."""
    lab, yc, X2, Y2 = c.lab, c.grid.y, c.X2, c.Y2
    rows = np.flatnonzero((lab > 0).any(axis=(0, 2)))
    y0 = (yc[rows[-1]] if len(rows) else yc[-1]) + _u(rng, 4.0, 12.0)
    ytop = y0 - X2**2 / (2 * _u(rng, 500.0, 900.0))
    thick = _u(rng, 12.0, 30.0)
    inside = (Y2 > ytop) & (Y2 < ytop + thick) & (np.abs(X2) < _u(rng, 170.0, 230.0))
    shell = inside & ((Y2 < ytop + 2.5) | (Y2 > ytop + thick - 2.5))
    tab = np.where(shell, _L["table_shell"], _L["table_foam"]).astype(np.uint8)
    lab[:, inside] = tab[inside][None]


def _add_vessels(c: _Ctx, rng, hu: np.ndarray, tex: np.ndarray, lungmask: np.ndarray, cfg: PhantomConfig,
                 spacing) -> np.ndarray:
    """Pulmonary vessel trees (+ bronchi beside the larger arteries), blended into lung HU only."""
    an, grid, sx = c.an, c.grid, c.sx
    zc = grid.z
    segs = _grow_vessels(rng, an, max(cfg.vessel_min_radius_mm, 0.2 * sx))
    r_split = max(0.7 * sx, 0.6)
    inz = (np.maximum(segs[:, 0], segs[:, 3]) >= zc[0] - 20) & (np.minimum(segs[:, 0], segs[:, 3]) <= zc[-1] + 20)
    vocc = np.zeros(hu.shape, np.float32)
    big = segs[inz & (segs[:, 6] >= r_split)]
    soft = 0.5 * sx
    for s in big:
        sl, o = _capsule(grid, s[0:3], s[3:6], float(s[6]), float(s[7]), soft)
        if sl is not None:
            np.maximum(vocc[sl], o, out=vocc[sl])
    _splat_lines(grid, segs[inz & (segs[:, 6] < r_split)], spacing, vocc)
    idx = np.flatnonzero(vocc.reshape(-1) * lungmask.reshape(-1))
    o = vocc.reshape(-1)[idx]
    del vocc
    flat = hu.reshape(-1)
    flat[idx] += o * (40.0 + 6.0 * tex.reshape(-1)[idx] - flat[idx])
    for s in big[(big[:, 8] >= 1) & (big[:, 8] <= 2) & (big[:, 6] >= 2.0)]:  # bronchi: wall, then air
        p0, p1 = s[0:3], s[3:6]
        rb = float(s[6]) * 0.75
        off = _unit(np.cross(p1 - p0, np.array([1.0, 0.3, 0.2], np.float32))) * (float(s[6]) + rb + 0.8)
        for r0, r1, val in ((rb + 0.9, rb * 0.9 + 0.8, -60.0), (rb, rb * 0.9, -990.0)):
            sl, o = _capsule(grid, p0 + off, p1 + off, r0, r1, soft)
            if sl is None:
                break
            o = o * lungmask[sl]
            hu[sl] += o * (np.float32(val) - hu[sl])
    return segs


def _linear_field(rng: np.random.Generator, shape, cell: tuple[float, float, float]) -> np.ndarray:
    """Unit-variance smooth texture: coarse Gaussian noise, separably linearly interpolated
    (a few passes over the volume instead of a full-volume filter)."""
    low = rng.standard_normal(tuple(int(math.ceil(n / c)) + 2 for n, c in zip(shape, cell)), dtype=np.float32)
    f = low
    for ax, (n, c) in enumerate(zip(shape, cell)):
        pos = np.arange(n, dtype=np.float32) / c
        i0 = pos.astype(np.int64)
        w = (pos - i0).reshape([-1 if k == ax else 1 for k in range(3)])
        a = np.take(f, i0, axis=ax)
        f = np.take(f, i0 + 1, axis=ax)
        f -= a
        f *= w
        f += a
    return f * np.float32(1.0 / 0.8165**3 * 0.9)  # linear interpolation loses ~18% std per axis


def make_phantom(seed: int, cfg: PhantomConfig | None = None, uid: str | None = None) -> PhantomScan:
    """One deterministic phantom scan from ``seed`` (same seed and config → same bytes)."""
    cfg = cfg or PhantomConfig()
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise NoduleSynthError(f"seed={seed!r}: must be a non-negative integer")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x706A61]))
    an = _Anatomy(rng)
    W = H = int(cfg.size)
    D = int(cfg.slices)
    lo, hi = cfg.spacing_range_mm
    scale = 512.0 / W
    sx = float(np.clip(2 * an.half_width * (1 + abs(an.g_slope)) / (W * _u(rng, 0.8, 0.95)), lo * scale, hi * scale))
    sz = float(rng.choice(np.asarray(cfg.thickness_choices_mm, dtype=np.float64)))
    extent = D * sz
    # the slab covers the whole chest when long enough, else a random mid-chest part
    if extent >= 0.9 * an.lung_h:
        z_mid = an.lung_h * _u(rng, 0.45, 0.55)
    else:
        a = 0.25 * an.lung_h + extent / 2
        z_mid = _u(rng, a, max(a, 0.75 * an.lung_h - extent / 2))
    cx_px = (W - 1) / 2 + _u(rng, -0.03, 0.03) * W
    cy_px = (H - 1) / 2 + _u(rng, -0.06, 0.0) * H
    zc = (z_mid - extent / 2 + sz / 2 + np.arange(D) * sz).astype(np.float32)
    grid = _Grid(zc, ((np.arange(H) - cy_px) * sx).astype(np.float32), ((np.arange(W) - cx_px) * sx).astype(np.float32), sz)
    c = _Ctx(an, grid, sx)

    d, cav, deep = _paint_wall(c)
    del d
    side = _paint_cavity(c, cav)
    del cav
    _paint_spine(c, deep)
    del deep
    airway = _paint_airway(c)
    lab = c.lab
    lungmask = lab == _L["lung"]
    seg = np.zeros(lab.shape, np.uint8)
    np.copyto(seg, SEG_RIGHT, where=lungmask & (side == 1))
    np.copyto(seg, SEG_LEFT, where=lungmask & (side == 2))
    seg[airway] = SEG_TRACHEA
    del side, airway
    has_table = bool(rng.random() < cfg.table_prob)
    if has_table:
        _paint_table(c, rng)

    # HU = tissue mean + smooth texture; lungs denser posteriorly (gravity-dependent, supine)
    tex = _linear_field(rng, lab.shape, (max(1.0, 2.0 / sz), 3.0 / sx, 3.0 / sx))
    hu = _LUT[lab]
    hu += _AMP[lab] * tex
    ygrad = (an.lung_grad * np.clip((grid.y - an.y_ant_cav) / (an.y_vb - an.y_ant_cav), 0, 1.2)).astype(np.float32)
    hu += lungmask * ygrad[None, :, None]
    spacing = (sz, sx, sx)
    segs = _add_vessels(c, rng, hu, tex, lungmask, cfg, spacing)
    del lungmask
    placed = _place_nodules(rng, an, cfg, float(zc[0]), float(zc[-1]), segs[segs[:, 8] >= 1])
    for nd in placed:
        _render_nodule(rng, grid, hu, tex, nd, spacing)
    del tex

    # CT noise + in-plane PSF in one blur pass over (image + white noise pre-scaled to the target std)
    noise_std = _u(rng, *cfg.noise_std_range_hu)
    sig = (0.0, cfg.psf_sigma_px, cfg.psf_sigma_px)
    energy = math.prod(_gauss_kernel_energy(s) for s in sig)
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(noise_std / energy)
    for ax in (1, 2):
        ndimage.gaussian_filter1d(hu, cfg.psf_sigma_px, axis=ax, output=hu, truncate=3.0)
    np.clip(hu, -1024, 3071, out=hu)
    out = np.rint(hu).astype(np.int16)
    del hu

    # world = origin + index * spacing (identity direction), LUNA16-like origins
    ox, oy = -cx_px * sx + _u(rng, -15.0, 15.0), -cy_px * sx + _u(rng, -15.0, 15.0)
    oz = -_u(rng, 150.0, 350.0) - extent
    uid = uid or series_uid(int(seed), 0)
    nodules = []
    for nd in placed:
        cz_, cy_, cx_ = nd["center"]
        world = (ox + (cx_ / sx + cx_px) * sx, oy + (cy_ / sx + cy_px) * sx, oz + (cz_ - zc[0]))
        nodules.append(Nodule(uid, tuple(round(float(v), 4) for v in world), round(2 * nd["radius"], 3), reader="phantom",
                              characteristics={k: nd.get(k, False) for k in ("type", "attachment", "lobulated", "spiculated")}))
    meta = dict(seed=int(seed), noise_std_hu=round(noise_std, 2), table=has_table, vessel_segments=int(len(segs)),
                body_half_width_mm=round(an.half_width, 1), lung_height_mm=round(an.lung_h, 1))
    return PhantomScan(hu=out, spacing=spacing, origin=(oz, oy, ox), lung_seg=seg, nodules=nodules,
                       series_uid=uid, meta=meta)

# --------------------------------------------------------------------------------------------
# LUNA16 writer
# --------------------------------------------------------------------------------------------
def _write_mhd(path: Path, arr: np.ndarray, spacing_zyx, origin_zyx) -> None:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    img.SetOrigin(tuple(float(o) for o in origin_zyx[::-1]))
    img.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(img, str(path), useCompression=False)


def write_phantom_dataset(out, n_scans: int, seed: int = 0, cfg: PhantomConfig | None = None,
                          overwrite: bool = False, progress: bool = True) -> Path:
    """Write ``n_scans`` phantoms as a LUNA16 root: subset0/<uid>.mhd+.raw, annotations.csv,
    seg-lungs-LUNA16/<uid>.mhd+.raw (3 left, 4 right, 5 trachea), plus phantom.json (config,
    per-nodule type/attachment). Atomic: the folder appears complete or not at all."""
    from tqdm import tqdm

    from ..io import atomic_dir, write_json

    cfg = cfg or PhantomConfig()
    if int(n_scans) < 1:
        raise NoduleSynthError(f"--scans {n_scans}: must be at least 1")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise NoduleSynthError(f"--seed {seed!r}: must be a non-negative integer")
    seeds = np.random.SeedSequence(int(seed)).generate_state(int(n_scans), dtype=np.uint32)
    with atomic_dir(out, overwrite=overwrite, arg="--out") as tmp:
        (tmp / "subset0").mkdir()
        (tmp / "seg-lungs-LUNA16").mkdir()
        rows, scans = [], []
        for i in tqdm(range(int(n_scans)), desc="phantom", unit="scan", disable=not progress):
            uid = series_uid(int(seed), i)
            scan = make_phantom(int(seeds[i]), cfg, uid=uid)
            _write_mhd(tmp / "subset0" / f"{uid}.mhd", scan.hu, scan.spacing, scan.origin)
            _write_mhd(tmp / "seg-lungs-LUNA16" / f"{uid}.mhd", scan.lung_seg, scan.spacing, scan.origin)
            for n in scan.nodules:
                rows.append((uid, *(f"{v:.4f}" for v in n.center_xyz_mm), f"{n.diameter_mm:.3f}"))
            scans.append(dict(seriesuid=uid, spacing_zyx=list(scan.spacing), origin_zyx=list(scan.origin),
                              shape_zyx=list(scan.hu.shape), meta=scan.meta,
                              nodules=[dict(center_xyz_mm=list(n.center_xyz_mm), diameter_mm=n.diameter_mm,
                                            **n.characteristics) for n in scan.nodules]))
        with open(tmp / "annotations.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(ANNOTATION_HEADER)
            w.writerows(rows)
        write_json(tmp / "phantom.json", dict(generator="nodulesynth.data.phantom", seed=int(seed),
                                              n_scans=int(n_scans), config=asdict(cfg), scans=scans))
    return Path(out)
