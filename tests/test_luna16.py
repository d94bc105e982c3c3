"""LUNA16 readers and dataset discovery, on a folder written here in LUNA16's formats."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import NODULE_DIAMETER, NODULE_XYZ, SHAPE, UID_EMPTY, UID_FLIPPED, UID_PLAIN
from nodulesynth.data.luna16 import (
    LUNA16_SEG_LEFT,
    LUNA16_SEG_RIGHT,
    LUNA16_SEG_TRACHEA,
    discover_luna16,
    lung_seg_sides,
    read_annotations,
    read_lung_seg,
)
from nodulesynth.errors import NoduleSynthError


def test_read_annotations(tmp_path):
    p = tmp_path / "annotations.csv"
    p.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n1.2.3,-10.5,20,-100.25,5.5\n1.2.3,1,2,3,4\n\n9.9,0,0,0,3\n")
    ann = read_annotations(p)
    assert sorted(ann) == ["1.2.3", "9.9"]
    n = ann["1.2.3"][0]
    assert n.center_xyz_mm == (-10.5, 20.0, -100.25) and n.diameter_mm == 5.5 and n.series_uid == "1.2.3"


@pytest.mark.parametrize(
    "row, msg",
    [("1.2.3,abc,2,3,4", "not a number"), ("1.2.3,1,2", "expected 5 fields"), ("1.2.3,1,2,3,-4", "diameter_mm > 0"), (",1,2,3,4", "empty seriesuid")],
)
def test_malformed_row_names_file_and_line(tmp_path, row, msg):
    p = tmp_path / "annotations.csv"
    p.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n1.2.3,1,2,3,4\n" + row + "\n")
    with pytest.raises(NoduleSynthError, match=rf"annotations\.csv:3: .*{msg}"):
        read_annotations(p)


def test_missing_column(tmp_path):
    p = tmp_path / "annotations.csv"
    p.write_text("seriesuid,coordX,coordY,diameter_mm\n")
    with pytest.raises(NoduleSynthError, match="coordZ"):
        read_annotations(p)


def test_discover(luna16_root):
    idx = discover_luna16(luna16_root)
    assert idx.n_scans_found == 3 and idx.n_skipped_no_nodules == 1 and idx.n_annotated_missing == 0
    by_uid = {s.series_uid: s for s in idx.scans}
    assert set(by_uid) == {UID_PLAIN, UID_FLIPPED} and UID_EMPTY not in by_uid
    assert by_uid[UID_PLAIN].seg is not None and by_uid[UID_FLIPPED].seg is None
    assert by_uid[UID_PLAIN].nodules[0].center_xyz_mm == NODULE_XYZ
    assert by_uid[UID_PLAIN].nodules[0].diameter_mm == NODULE_DIAMETER
    s = idx.summary()
    assert "3 scans" in s and "2 with nodules" in s and "1 skipped without nodules" in s


def test_discover_errors(tmp_path, luna16_root):
    with pytest.raises(NoduleSynthError, match="annotations.csv"):
        discover_luna16(tmp_path)
    (tmp_path / "annotations.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n")
    with pytest.raises(NoduleSynthError, match="no subset"):
        discover_luna16(tmp_path)


def test_lung_seg_labels_match_sides(luna16_root):
    seg = read_lung_seg(luna16_root / "seg-lungs-LUNA16" / f"{UID_PLAIN}.mhd")
    assert seg.dtype == np.uint8 and seg.shape == SHAPE
    assert set(np.unique(seg)) == {0, LUNA16_SEG_LEFT, LUNA16_SEG_RIGHT, LUNA16_SEG_TRACHEA}
    # patient-left (label 3) is on the image's right in the canonical orientation
    cols = np.arange(SHAPE[2])
    left_col = cols[np.nonzero(seg == LUNA16_SEG_LEFT)[2]].mean()
    right_col = cols[np.nonzero(seg == LUNA16_SEG_RIGHT)[2]].mean()
    assert left_col > SHAPE[2] / 2 > right_col


def test_lung_seg_sides_follow_position_not_value():
    """Labels 3/4 stored the other way round are taken by where they lie; as stored they stay."""
    seg = np.zeros((2, 8, 10), np.uint8)
    seg[:, 2:6, 6:9] = LUNA16_SEG_LEFT  # image right = the patient's left in the canonical frame
    seg[:, 2:6, 1:4] = LUNA16_SEG_RIGHT
    seg[:, 0, 5] = LUNA16_SEG_TRACHEA
    assert lung_seg_sides(seg) is seg
    swapped = np.where(seg == LUNA16_SEG_LEFT, LUNA16_SEG_RIGHT, np.where(seg == LUNA16_SEG_RIGHT, LUNA16_SEG_LEFT, seg))
    assert np.array_equal(lung_seg_sides(swapped.astype(np.uint8)), seg)
    one = np.where(seg == LUNA16_SEG_RIGHT, 0, swapped).astype(np.uint8)  # one lung only: as stored
    assert np.array_equal(lung_seg_sides(one), one)
