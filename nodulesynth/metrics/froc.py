"""LUNA16-style FROC and CPM from 2-D (per-slice) detections.

LUNA16 scores 3-D candidates per scan: sensitivity at 1/8, 1/4, 1/2, 1, 2, 4, 8 false positives
per scan, and CPM = the mean of those seven sensitivities. A 2-D detector gives boxes per slice,
so we map them to nodules with this rule (the one the benchmark documents):

- a detection on slice s **hits** nodule n when n has a box on slice s and the detection's box
  centre lies inside that box (``iou=None``, the default), or — with ``iou=x`` — when the two
  boxes' IoU is ≥ x;
- a nodule is **found** at threshold t when any detection with score ≥ t hits it on any of its
  slices (its score is the best hitting score);
- a detection that hits some nodule is never a false positive (as in LUNA16, several candidates
  on one nodule count once); every other detection with score ≥ t is one false positive;
- sensitivity at f FPs/scan is the highest sensitivity reached at a threshold whose FP count per
  scan is ≤ f (the step curve; LUNA16 interpolates a bootstrapped curve, which differs little).
  Where even the strictest threshold gives more than f FPs/scan, the sensitivity is 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Sequence

import numpy as np

FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass
class Nodule:
    """One ground-truth nodule: its box on each slice it crosses (slice key → xyxy)."""

    scan: Hashable
    boxes: dict  # slice key → (4,) xyxy


@dataclass
class Detection:
    scan: Hashable
    slice: Hashable
    box: np.ndarray  # (4,) xyxy
    score: float


@dataclass
class FROCResult:
    fp_rates: tuple = FP_RATES
    sensitivities: list = field(default_factory=list)
    cpm: float = 0.0
    n_nodules: int = 0
    n_scans: int = 0
    curve_fps: list = field(default_factory=list)  # FPs/scan at each distinct threshold (descending score)
    curve_sens: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"fp_per_scan": list(self.fp_rates), "sensitivity": [float(s) for s in self.sensitivities],
                "cpm": float(self.cpm), "n_nodules": self.n_nodules, "n_scans": self.n_scans}


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def hits(det: Detection, nodule: Nodule, iou: float | None = None) -> bool:
    """Whether ``det`` hits ``nodule`` under the module's rule."""
    if det.scan != nodule.scan or det.slice not in nodule.boxes:
        return False
    b = np.asarray(nodule.boxes[det.slice], np.float64)
    d = np.asarray(det.box, np.float64)
    if iou is not None:
        return _iou(d, b) >= iou
    cx, cy = (d[0] + d[2]) / 2, (d[1] + d[3]) / 2
    return bool(b[0] <= cx <= b[2] and b[1] <= cy <= b[3])


def froc(nodules: Sequence[Nodule], detections: Sequence[Detection], n_scans: int, iou: float | None = None,
         fp_rates: Sequence[float] = FP_RATES) -> FROCResult:
    """FROC sensitivities at ``fp_rates`` and CPM (see the module docstring for the rule)."""
    if n_scans < 1:
        raise ValueError("froc: n_scans must be ≥ 1")
    by_scan: dict = {}
    for k, n in enumerate(nodules):
        by_scan.setdefault(n.scan, []).append(k)
    best = np.full(len(nodules), -np.inf)  # best hitting score per nodule
    fp_scores = []
    for d in detections:
        hit = [k for k in by_scan.get(d.scan, []) if hits(d, nodules[k], iou)]
        if hit:
            for k in hit:
                best[k] = max(best[k], float(d.score))
        else:
            fp_scores.append(float(d.score))
    fp_scores = np.asarray(fp_scores)
    thresholds = np.unique(np.concatenate([best[np.isfinite(best)], fp_scores]))[::-1]  # high → low
    n_nod = max(len(nodules), 1)
    fps = np.array([(fp_scores >= t).sum() / n_scans for t in thresholds])
    sens = np.array([(best >= t).sum() / n_nod for t in thresholds])
    out = []
    for f in fp_rates:
        ok = fps <= f + 1e-12
        out.append(float(sens[ok].max()) if ok.any() else 0.0)
    return FROCResult(tuple(fp_rates), out, float(np.mean(out)), len(nodules), int(n_scans), fps.tolist(), sens.tolist())


def link_nodules(scan: Hashable, slices: Sequence[tuple[int, np.ndarray]]) -> list[Nodule]:
    """Group per-slice boxes of one scan into 3-D nodules: a box joins a nodule that has a box on
    the directly preceding slice index whose IoU with it is > 0 (overlapping outlines on
    neighbouring slices are the same nodule); ``slices`` is (slice index, (K,4) boxes) pairs."""
    open_: list[tuple[Nodule, np.ndarray, int]] = []
    done: list[Nodule] = []
    for idx, boxes in sorted(slices, key=lambda t: t[0]):
        nxt = []
        used = set()
        for b in np.asarray(boxes, np.float64).reshape(-1, 4):
            match = None
            for j, (n, pb, pidx) in enumerate(open_):
                if j not in used and pidx == idx - 1 and _iou(b, pb) > 0:
                    match = j
                    break
            if match is None:
                n = Nodule(scan, {})
            else:
                used.add(match)
                n = open_[match][0]
            n.boxes[idx] = b
            nxt.append((n, b, idx))
        done += [n for j, (n, _, _) in enumerate(open_) if j not in used]
        open_ = nxt
    done += [n for n, _, _ in open_]
    return done
