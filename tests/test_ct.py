"""CT loading and world↔voxel geometry, on files written here and on the real LIDC sample."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import NODULE_XYZ, ORIGIN, SHAPE, SPACING, synth_chest, write_mhd
from nodulesynth.data.ct import CTVolume, load_ct
from nodulesynth.errors import NoduleSynthError


def _volume(direction) -> CTVolume:
    return CTVolume(np.zeros((4, 5, 6), np.int16), (2.5, 0.7, 0.8), (-50.0, 10.0, 20.0), np.asarray(direction, float), "u", "mem")


@pytest.mark.parametrize(
    "direction",
    [np.eye(3), np.diag([1.0, -1.0, -1.0]), np.diag([-1.0, 1.0, -1.0])],
    ids=["identity", "flipped-xy", "flipped-zx"],
)
def test_world_voxel_round_trip(direction):
    ct = _volume(direction)
    rng = np.random.default_rng(0)
    zyx = rng.uniform(0, 4, size=(50, 3))
    xyz = ct.voxel_to_world(zyx)
    np.testing.assert_allclose(ct.world_to_voxel(xyz), zyx, atol=1e-9)
    # origin is voxel 0 and steps follow the direction's signs: (x, y, z) vs (z, y, x) order
    np.testing.assert_allclose(ct.voxel_to_world([0, 0, 0]), [20.0, 10.0, -50.0])
    step_x = ct.voxel_to_world([0, 0, 1]) - ct.voxel_to_world([0, 0, 0])
    np.testing.assert_allclose(step_x, [0.8 * direction[2, 2], 0, 0])


def test_world_to_index_bounds():
    ct = _volume(np.eye(3))
    assert ct.world_to_index([20.0, 10.0, -50.0]).tolist() == [0, 0, 0]
    with pytest.raises(NoduleSynthError, match="outside"):
        ct.world_to_index([20.0 - 5, 10.0, -50.0])


def test_flipped_mhd_canonicalises_to_same_anatomy(tmp_path):
    chest = synth_chest(0)
    write_mhd(tmp_path / "plain.mhd", chest.hu)
    write_mhd(tmp_path / "flip.mhd", chest.hu, flipped=True)
    plain, flip = load_ct(tmp_path / "plain.mhd"), load_ct(tmp_path / "flip.mhd")
    assert plain.series_uid == "plain" and plain.hu.dtype == np.int16 and plain.hu.shape == SHAPE
    assert plain.spacing == SPACING and plain.origin == ORIGIN
    np.testing.assert_array_equal(np.diag(flip.direction), [1, -1, -1])
    # the same world point is the same tissue in both stored orientations
    for ct in (plain, flip):
        z, y, x = ct.world_to_index(NODULE_XYZ)
        assert ct.hu[z, y, x] > -200
    canon = flip.canonical()
    np.testing.assert_array_equal(canon.hu, plain.hu)
    np.testing.assert_allclose(canon.origin, plain.origin)
    np.testing.assert_allclose(canon.direction, np.eye(3))
    np.testing.assert_allclose(canon.world_to_voxel(NODULE_XYZ), plain.world_to_voxel(NODULE_XYZ))


def test_corrupt_mhd_names_file(tmp_path):
    bad = tmp_path / "bad.mhd"
    bad.write_text("this is not a header\n")
    with pytest.raises(NoduleSynthError, match="bad.mhd.*corrupt"):
        load_ct(bad)


def test_missing_raw_names_file(tmp_path):
    write_mhd(tmp_path / "scan.mhd", synth_chest(0).hu[:2])
    (tmp_path / "scan.raw").unlink()
    with pytest.raises(NoduleSynthError, match=r"scan\.mhd.*scan\.raw is missing"):
        load_ct(tmp_path / "scan.mhd")


def test_truncated_raw_is_clear_error(tmp_path):
    write_mhd(tmp_path / "scan.mhd", synth_chest(0).hu[:2])
    raw = tmp_path / "scan.raw"
    raw.write_bytes(raw.read_bytes()[:100])
    with pytest.raises(NoduleSynthError, match="scan.mhd"):
        load_ct(tmp_path / "scan.mhd")


def test_unreadable_dicom_folder(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.dcm").write_bytes(b"\0" * 64)
    with pytest.raises(NoduleSynthError, match=str(tmp_path.name)):
        load_ct(tmp_path)


def test_real_dicom_series(lidc_0001):
    folder, _ = lidc_0001
    ct = load_ct(folder)
    assert ct.series_uid == folder.name  # LIDC folders are named by series UID
    assert ct.hu.shape == (16, 512, 512) and ct.hu.dtype == np.int16
    assert ct.spacing == pytest.approx((2.5, 0.703125, 0.703125))
    np.testing.assert_allclose(ct.slice_z_mm()[[0, -1]], [-132.5, -95.0])
    # HU calibrated: air outside ≈ −1000, soft tissue in the middle ≈ 0..100
    assert ct.hu[:, :20, :20].mean() < -900
    assert -100 < np.median(ct.hu[8, 230:260, 240:270]) < 300
