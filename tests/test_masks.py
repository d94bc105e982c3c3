"""Semantic masks: real patients (sides, airway) and synthetic slices with known anatomy."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import LIDC_SAMPLE, NODULE_XYZ, SPACING, chest_over_abdomen, synth_chest
from nodulesynth.data.ct import load_ct
from nodulesynth.data.dicom_tree import read_dicom_volume, scan_dicom_tree
from nodulesynth.data.lidc import nodules_from_lidc
from nodulesynth.masks.classes import MaskClass
from nodulesynth.data.sections import nodules_in_slice
from nodulesynth.masks import semantic
from nodulesynth.masks.semantic import SliceNodule, lung_parenchyma, semantic_mask

SP2 = SPACING[1:]
NOD_ROW, NOD_COL = (NODULE_XYZ[1] + 127) / 2, (NODULE_XYZ[0] + 127) / 2


def _centroid_col(mask, cls):
    return np.nonzero(mask == cls)[1].mean()


@pytest.mark.parametrize("case, step", [("lidc_0001", 3), ("lidc_0002", 2)])
def test_real_lungs_on_correct_sides(case, step, request):
    folder, xml = request.getfixturevalue(case)
    ct = load_ct(folder).canonical()
    nods = nodules_from_lidc(xml, ct)
    px_mm2 = ct.spacing[1] * ct.spacing[2]
    w = ct.shape[2]
    for k in range(0, ct.shape[0], step):
        m = semantic_mask(ct.hu[k], ct.spacing[1:], nodules_in_slice(ct, k, nods))
        for cls in (MaskClass.LEFT_LUNG, MaskClass.RIGHT_LUNG):
            assert (m == cls).sum() * px_mm2 > 5000, f"slice {k}: {cls.name} missing"
        # radiological convention: the patient's left lung is on the image's right
        assert _centroid_col(m, MaskClass.LEFT_LUNG) > w / 2 > _centroid_col(m, MaskClass.RIGHT_LUNG)
        lungs = np.isin(m, (MaskClass.LEFT_LUNG, MaskClass.RIGHT_LUNG))
        assert np.median(ct.hu[k][lungs]) < -700  # lungs are aerated tissue
        body = m > 0
        assert body[:8].sum() == 0 and body[-8:].sum() == 0  # air above and table below are not body


def test_real_airway_visible(lidc_0002):
    """LIDC-IDRI-0002's slices are above the carina: the trachea is in every one, mid-line, dark."""
    folder, _ = lidc_0002
    ct = load_ct(folder).canonical()
    for k in range(0, ct.shape[0], 3):
        m = semantic_mask(ct.hu[k], ct.spacing[1:])
        tr = m == MaskClass.TRACHEA
        area = tr.sum() * ct.spacing[1] * ct.spacing[2]
        assert 100 < area < 700, f"slice {k}: trachea area {area:.0f} mm²"
        body_cols = np.nonzero(m > 0)[1]
        mid = (body_cols.min() + body_cols.max()) / 2
        assert abs(_centroid_col(m, MaskClass.TRACHEA) - mid) < 0.08 * np.ptp(body_cols)
        assert np.median(ct.hu[k][tr]) < -900


def test_synthetic_slice_classes():
    chest = synth_chest(0)
    k = 10
    sn = SliceNodule((NOD_ROW, NOD_COL), (3.0, 3.0))
    m = semantic_mask(chest.hu[k], SP2, [sn])
    seg = chest.seg[k]
    for cls, label in ((MaskClass.LEFT_LUNG, 3), (MaskClass.RIGHT_LUNG, 4), (MaskClass.TRACHEA, 5)):
        truth = seg == label
        got = m == cls
        if cls == MaskClass.LEFT_LUNG:
            got |= m == MaskClass.NODULE  # the nodule sits inside the left lung
        iou = (truth & got).sum() / (truth | got).sum()
        assert iou > 0.85, f"{cls.name}: IoU {iou:.2f}"
    assert m[int(NOD_ROW), int(NOD_COL)] == MaskClass.NODULE
    assert (m == MaskClass.NODULE).sum() == pytest.approx(np.pi * 9, rel=0.5)
    assert (m[110:] == 0).all()  # the table (row ~111) stays background
    with_seg = semantic_mask(chest.hu[k], SP2, [sn], lung_seg=seg)
    assert ((with_seg == MaskClass.LEFT_LUNG) == ((seg == 3) & (with_seg != MaskClass.NODULE))).all()
    assert ((with_seg == MaskClass.TRACHEA) == (seg == 5)).all()


def test_touching_lungs_are_split_by_side():
    hu = synth_chest(0).hu[3].copy()
    hu[60:90, 50:78] = -850  # a broad bridge of lung across the midline, under the trachea
    m = semantic_mask(hu, SP2)
    lab_left, lab_right = m == MaskClass.LEFT_LUNG, m == MaskClass.RIGHT_LUNG
    assert lab_left.sum() > 500 and lab_right.sum() > 500
    assert np.nonzero(lab_left)[1].min() >= 55 and np.nonzero(lab_right)[1].max() <= 72
    assert _centroid_col(m, MaskClass.LEFT_LUNG) > 64 > _centroid_col(m, MaskClass.RIGHT_LUNG)


def test_sphere_refined_by_intensity():
    hu = np.full((64, 64), 40, np.int16)  # chest wall so there is a body
    hu[10:54, 10:54] = -850
    yy, xx = np.mgrid[:64, :64]
    blob = (yy - 32) ** 2 + (xx - 30) ** 2 <= 25  # dense core, radius 5
    hu[blob] = 20
    m = semantic_mask(hu, (1.0, 1.0), [SliceNodule((32.0, 32.0), (8.0, 8.0))])
    nod = m == MaskClass.NODULE
    assert (nod == blob).all()  # the annotated circle (r=8) shrinks to the dense tissue
    # ground glass (nothing dense): fall back to the annotated circle
    m2 = semantic_mask(np.where(blob, -850, hu).astype(np.int16), (1.0, 1.0), [SliceNodule((32.0, 32.0), (5.0, 5.0))])
    assert (m2 == MaskClass.NODULE).sum() == pytest.approx(np.pi * 25, rel=0.15)


def test_contour_vote_and_holes():
    hu = np.full((40, 40), 40, np.int16)
    square = lambda a, b: np.array([[a, a], [b, a], [b, b], [a, b]], float)  # noqa: E731
    polys = [(square(5, 20), True, "r1"), (square(10, 25), True, "r2"), (square(12, 30), True, "r3")]
    m = semantic_mask(hu, (1.0, 1.0), [SliceNodule((15.0, 15.0), (8.0, 8.0), polys, n_readers=3)])
    nod = m == MaskClass.NODULE
    assert nod[7, 7] == 0 and nod[15, 15] == 1 and nod[22, 22] == 1 and nod[28, 28] == 0  # ≥2 of 3 votes
    hole = [(square(5, 30), True, "r1"), (square(14, 20), False, "r1")]
    m = semantic_mask(hu, (1.0, 1.0), [SliceNodule((15.0, 15.0), (8.0, 8.0), hole)])
    assert m[17, 17] != MaskClass.NODULE and m[8, 8] == MaskClass.NODULE


def test_lung_parenchyma():
    chest = synth_chest(0)
    hu = chest.hu[10]
    m = semantic_mask(hu, SP2)
    par = lung_parenchyma(hu, m)
    lungs = np.isin(m, (MaskClass.LEFT_LUNG, MaskClass.RIGHT_LUNG, MaskClass.NODULE))
    assert (par[~lungs] == -1024).all() and (par[lungs] == hu[lungs]).all() and par.dtype == hu.dtype


def test_bowel_gas_is_not_lung_once_the_volume_shows_the_chest():
    C = MaskClass
    from nodulesynth.masks.semantic import thoracic_air

    hu, gas = chest_over_abdomen()
    sp = (2.0, 2.0)
    alone = semantic_mask(hu[12], sp)  # one slice cannot tell stool-mottled gas from lung
    assert np.isin(alone, (C.LEFT_LUNG, C.RIGHT_LUNG)).any()
    air = thoracic_air(hu, (2.5, 2.0, 2.0))
    assert not (air & gas).any()
    low = semantic_mask(hu[12], sp, lung_air=air[12])
    assert not np.isin(low, (C.LEFT_LUNG, C.RIGHT_LUNG)).any() and (low == C.BODY).sum() > (alone == C.BODY).sum()
    for k in (30, 55):  # chest slices keep their lungs and airway as the one-slice rule drew them
        np.testing.assert_array_equal(semantic_mask(hu[k], sp, lung_air=air[k]), semantic_mask(hu[k], sp))
    assert thoracic_air(hu[:30], (2.5, 2.0, 2.0)) is None  # 75 mm: too little of the chest to tell


TCGA = LIDC_SAMPLE.parent / "tcga-chest-slices"


def _tcga_slice(patient: str, image_id: str):
    files = sorted((TCGA / patient).glob(f"ID_{image_id}_*.dcm"))
    if not files:
        pytest.skip(f"{TCGA / patient} absent (real TCGA slices are only on the project's machines)")
    ref = next(v for v in scan_dicom_tree(files[0].parent).volumes if files[0] in v.files)
    ct = read_dicom_volume(ref).canonical()
    return ct.hu[0], ct.spacing[1:]


@pytest.mark.parametrize("patient, image_id", [
    ("TCGA-50-8460", "0070"),  # foam cushion under the back, as dark as lung, cut by the circle
    ("TCGA-60-2695", "0002"),  # cushion under the back, cut by the image edge
    ("TCGA-50-5942", "0090"),  # back flattened on the circle: a thin air pocket between them
])
def test_what_the_field_of_view_closes_off_outside_the_patient_stays_outside(patient, image_id, monkeypatch):
    """Rescuing lungs cut by the field of view must not take in what lies under the patient."""
    hu, sp = _tcga_slice(patient, image_id)
    rescue = semantic._cut_by_field_of_view
    monkeypatch.setattr(semantic, "_cut_by_field_of_view", lambda h, s, b: np.zeros_like(b))
    body = semantic.body_mask(hu, sp)
    assert not rescue(hu, sp, body).any()

