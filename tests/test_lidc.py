"""LIDC-IDRI XML on the real sample: contours, readers, consensus, and where the outline lands."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage as ndi

from nodulesynth.data.ct import load_ct
from nodulesynth.data.lidc import consensus_nodules, nodules_from_lidc, read_lidc_xml
from nodulesynth.errors import NoduleSynthError
from nodulesynth.masks.classes import MaskClass
from nodulesynth.data.sections import nodules_in_slice
from nodulesynth.masks.semantic import semantic_mask


def test_read_xml_per_reader(lidc_0001):
    _, xml = lidc_0001
    nods = read_lidc_xml(xml)
    big = [n for n in nods if not n.characteristics.get("lt3mm")]
    small = [n for n in nods if n.characteristics.get("lt3mm")]
    assert len(big) == 4 and len({n.reader for n in big}) == 4  # 4 radiologists outlined it
    assert len(small) == 9 and all(len(c.points_xy) == 1 for n in small for c in n.contours)
    first = next(n for n in big if n.characteristics["nodule_id"] == "Nodule 001")
    assert first.characteristics["malignancy"] == 5 and first.series_uid.endswith("603192")
    assert len(first.contours) == 8 and first.contours[0].z_mm == -125.0
    assert first.contours[0].points_xy.shape[1] == 2 and (first.contours[0].points_xy[0] == [312, 355]).all()
    assert math.isnan(first.diameter_mm)  # no millimetres without the CT


def test_consensus_one_physical_nodule(lidc_0001):
    folder, xml = lidc_0001
    ct = load_ct(folder)
    per_reader = nodules_from_lidc(xml, ct, consensus=False)
    assert len(per_reader) == 4
    centres = np.array([n.center_xyz_mm for n in per_reader])
    assert np.ptp(centres, axis=0).max() < 5.0  # readers agree within a few mm
    (nod,) = nodules_from_lidc(xml, ct)
    assert nod.characteristics["n_readers"] == 4 and len(nod.contours) == 32
    assert 20 < nod.diameter_mm < 40  # LIDC-IDRI-0001's nodule is a large (~2.5-3 cm) mass
    assert -125 <= nod.center_xyz_mm[2] <= -105
    with_small = nodules_from_lidc(xml, ct, include_small=True)
    assert len(with_small) > 1 and all(n.diameter_mm >= 3.0 for n in with_small)
    assert consensus_nodules([]) == []


@pytest.mark.parametrize("case", ["lidc_0001", "lidc_0002"])
def test_contour_lands_on_dense_tissue_inside_lung(case, request):
    folder, xml = request.getfixturevalue(case)
    ct = load_ct(folder).canonical()
    nods = nodules_from_lidc(xml, ct)
    hits = 0
    for k in range(ct.shape[0]):
        sns = nodules_in_slice(ct, k, nods)
        if not sns:
            continue
        mask = semantic_mask(ct.hu[k], ct.spacing[1:], sns)
        nod = mask == MaskClass.NODULE
        if nod.sum() < 20:
            continue
        hits += 1
        inside = ct.hu[k][nod]
        # the parenchyma 2–5 px out: the outline's own pixels (partial volume, outside the nodule) left out
        ring = ndi.binary_dilation(nod, iterations=5) & ~ndi.binary_dilation(nod, iterations=1)
        ring_lab = mask[ring]
        # nodule tissue (0001 solid, 0002 part ground-glass) is far denser than the parenchyma around it
        lung_ring = ct.hu[k][ring][ring_lab == MaskClass.LEFT_LUNG]
        assert np.median(inside) > np.median(lung_ring) + 200
        # it sits in the patient's left lung (image right): that lung borders it
        assert (ring_lab == MaskClass.LEFT_LUNG).mean() > 0.3
        assert (ring_lab == MaskClass.RIGHT_LUNG).sum() == 0
    assert hits >= 5


def test_not_lidc_xml(tmp_path):
    p = tmp_path / "x.xml"
    p.write_text("<IdriReadMessage/>")
    with pytest.raises(NoduleSynthError, match="x.xml.*not an LIDC CT"):
        read_lidc_xml(p)
    p.write_text("<LidcReadMessage")
    with pytest.raises(NoduleSynthError, match="x.xml"):
        read_lidc_xml(p)
