"""Boxes from nodule components, numpy and batched torch, and the format converters."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nodulesynth.masks.boxes import (
    coco_to_xyxy,
    mask_to_boxes,
    masks_to_boxes_batch,
    xyxy_to_coco,
    xyxy_to_yolo,
    yolo_to_xyxy,
)
from nodulesynth.masks.classes import MaskClass

N = MaskClass.NODULE


def _known_mask():
    m = np.zeros((32, 48), np.uint8)
    m[:, :] = MaskClass.BODY
    m[2:5, 10:14] = N  # 3 rows x 4 cols
    m[20:30, 3:6] = N
    m[5, 14] = N  # touches the first blob diagonally → same component (8-connected)
    m[20:22, 40:48] = N  # touches the image border
    m[10:12, 20:22] = MaskClass.TRACHEA  # other classes are ignored
    return m


EXPECTED = np.array([[10, 2, 15, 6], [3, 20, 6, 30], [40, 20, 48, 22]], np.float32)


def test_mask_to_boxes_known_components():
    b = mask_to_boxes(_known_mask())
    assert b.dtype == np.float32
    np.testing.assert_array_equal(b, EXPECTED)  # edge coordinates, sorted by (y0, x0)
    np.testing.assert_array_equal(mask_to_boxes(torch.from_numpy(_known_mask())), EXPECTED)
    assert mask_to_boxes(np.zeros((8, 8), np.uint8)).shape == (0, 4)


def test_batch_matches_numpy():
    rng = np.random.default_rng(0)
    masks = (rng.random((6, 40, 40)) < 0.08).astype(np.uint8) * N  # many small random components
    masks[2] = 0  # an empty item
    masks[4, :32] = _known_mask()[:, :40]
    got = masks_to_boxes_batch(torch.from_numpy(masks))
    assert len(got) == 6 and got[2].shape == (0, 4)
    for i in range(6):
        np.testing.assert_array_equal(got[i].numpy(), mask_to_boxes(masks[i]))


def test_batch_items_never_merge():
    masks = torch.zeros((2, 8, 8), dtype=torch.uint8)
    masks[0, 7, 2:4] = N  # bottom row of item 0 ...
    masks[1, 0, 2:4] = N  # ... directly "above" item 1's top row in memory
    got = masks_to_boxes_batch(masks)
    assert got[0].tolist() == [[2, 7, 4, 8]] and got[1].tolist() == [[2, 0, 4, 1]]


def test_converters_round_trip():
    b = EXPECTED
    np.testing.assert_array_equal(xyxy_to_coco(b)[0], [10, 2, 5, 4])
    np.testing.assert_allclose(coco_to_xyxy(xyxy_to_coco(b)), b)
    y = xyxy_to_yolo(b, 48, 32)
    np.testing.assert_allclose(y[0], [12.5 / 48, 4 / 32, 5 / 48, 4 / 32])
    np.testing.assert_allclose(yolo_to_xyxy(y, 48, 32), b, atol=1e-5)
    t = torch.tensor(b)
    assert torch.allclose(coco_to_xyxy(xyxy_to_coco(t)), t)
    assert xyxy_to_coco(np.zeros((0, 4))).shape == (0, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_batch_on_cuda():
    masks = torch.from_numpy(np.stack([_known_mask()] * 3)).cuda()
    got = masks_to_boxes_batch(masks)
    assert got[0].device.type == "cuda"
    np.testing.assert_array_equal(got[1].cpu().numpy(), EXPECTED)


def test_device_labelling_matches_scipy_labelling():
    """The max-pool labeller (used on GPU) partitions pixels exactly like scipy (used on CPU)."""
    from nodulesynth.masks.boxes import _label_maxpool, label_components_torch

    g = torch.Generator().manual_seed(3)
    fg = torch.rand(3, 40, 40, generator=g) > 0.6
    a, b = label_components_torch(fg), _label_maxpool(fg)
    assert torch.equal(a > 0, b > 0)
    # same partition: a bijection between the two label sets over foreground pixels
    pairs = torch.unique(torch.stack([a[fg], b[fg]], 1), dim=0)
    assert len(pairs) == len(torch.unique(a[fg])) == len(torch.unique(b[fg]))


def test_device_boxes_match_cpu_boxes():
    """The accelerator path (max-pool labels + scatter extents), run here on CPU tensors, gives the
    CPU path's boxes in the same order, including empty items and components at the border."""
    from nodulesynth.masks.boxes import _boxes_from_labels, _label_maxpool

    rng = np.random.default_rng(5)
    masks = (rng.random((5, 40, 48)) < 0.1).astype(np.uint8) * N
    masks[1] = 0
    masks[3, :32] = _known_mask()[:, :48]
    t = torch.from_numpy(masks)
    dev = _boxes_from_labels(_label_maxpool(t == N))
    cpu = masks_to_boxes_batch(t)
    assert [b.tolist() for b in dev] == [b.tolist() for b in cpu]
    assert cpu[1].shape == (0, 4)
