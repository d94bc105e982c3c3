"""benchmarks/compare_weights.py: one row per weight folder, the same samples in each, and the zoom
tile centred on the sample's nodule (what a reader compares)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compare_weights  # noqa: E402

PRETRAINED = Path(__file__).resolve().parents[1] / "nodulesynth" / "pretrained"


def test_zoom_tile_follows_the_nodule():
    hu = np.full((128, 128), -900.0, np.float32)
    mask = np.zeros((128, 128), np.uint8)
    hu[100:104, 20:24], mask[100:104, 20:24] = 50.0, 5  # a bright nodule far from the centre
    whole, zoom = compare_weights.tiles(hu, mask, tile=32, zoom_px=32)
    assert whole.shape == zoom.shape == (32, 32)
    assert zoom.max() == 191 and whole.max() > 60  # 50 HU in the window −1000..400: 191
    _, centre = compare_weights.tiles(hu, np.zeros_like(mask), tile=32, zoom_px=32)
    assert centre.max() < 50  # no nodule: the centre, which holds only dark lung here


def test_rows_are_the_same_samples(tmp_path):
    out = tmp_path / "cmp.png"
    assert compare_weights.main(["--weights", str(PRETRAINED), str(PRETRAINED), "--n", "1", "--tile", "48",
                                 "--out", str(out)]) == 0
    im = np.asarray(Image.open(out))
    assert im.shape == (96, 96)
    assert np.array_equal(im[:48], im[48:])  # same weights, same seed → identical rows
    assert not list(tmp_path.glob("*.tmp*"))
