"""LUNA16 FROC/CPM from 2-D detections against a hand-worked example."""
import numpy as np
import pytest

from nodulesynth.metrics.froc import Detection, Nodule, froc, hits, link_nodules


def _b(*v):
    return np.array(v, np.float32)


def test_froc_hand_worked():
    # 2 scans, 3 nodules. Nodule A (scan 1) spans slices 10-11; B (scan 1) slice 20; C (scan 2) slice 5.
    A = Nodule(1, {10: _b(10, 10, 20, 20), 11: _b(11, 11, 19, 19)})
    B = Nodule(1, {20: _b(50, 50, 60, 60)})
    C = Nodule(2, {5: _b(0, 0, 8, 8)})
    dets = [
        Detection(1, 11, _b(12, 12, 18, 18), 0.9),  # hits A (centre 15,15 in A's slice-11 box)
        Detection(1, 10, _b(14, 14, 16, 16), 0.3),  # hits A again: not a FP, A keeps 0.9
        Detection(1, 21, _b(50, 50, 60, 60), 0.8),  # B has no box on slice 21 → FP
        Detection(2, 5, _b(2, 2, 6, 6), 0.6),  # hits C
        Detection(2, 5, _b(30, 30, 40, 40), 0.7),  # FP
        Detection(1, 20, _b(58, 58, 70, 70), 0.2),  # centre (64,64) outside B → FP
    ]
    r = froc([A, B, C], dets, n_scans=2)
    # thresholds high→low: 0.9 (sens 1/3, 0 FP), 0.8 (1/3, 0.5 FP/scan), 0.7 (1/3, 1.0), 0.6 (2/3, 1.0),
    # 0.3 (2/3, 1.0), 0.2 (2/3, 1.5). B is never found.
    assert r.sensitivities == pytest.approx([1 / 3, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3])
    assert r.cpm == pytest.approx((3 * (1 / 3) + 4 * (2 / 3)) / 7)
    # with IoU ≥ 0.5 instead of the centre rule: the 0.9 box still hits A (IoU 36/64), but the box on
    # C (IoU 16/64) and the 0.3 box on A (4/100) become FPs, so only A is ever found
    r2 = froc([A, B, C], dets, n_scans=2, iou=0.5)
    assert r2.sensitivities == pytest.approx([1 / 3] * 7)
    assert r2.curve_fps[-1] == pytest.approx(5 / 2)


def test_froc_perfect_and_empty():
    n = [Nodule("s", {0: _b(0, 0, 4, 4)})]
    assert froc(n, [Detection("s", 0, _b(1, 1, 3, 3), 0.5)], 1).cpm == 1.0
    assert froc(n, [], 1).cpm == 0.0
    # a detection on another scan never hits
    assert not hits(Detection("t", 0, _b(1, 1, 3, 3), 0.5), n[0])
    with pytest.raises(ValueError):
        froc(n, [], 0)


def test_link_nodules_across_slices():
    nods = link_nodules("s", [(3, [_b(0, 0, 5, 5)]), (4, [_b(1, 1, 6, 6), _b(40, 40, 45, 45)]), (6, [_b(1, 1, 6, 6)])])
    sizes = sorted(len(n.boxes) for n in nods)
    assert sizes == [1, 1, 2]  # slice 6 is not adjacent to 4: a new nodule
