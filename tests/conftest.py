"""Shared fixtures: the real LIDC-IDRI sample (skipped when absent) and a small synthetic LUNA16 root."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Test models are tiny: one thread beats a contended OpenMP pool by 10-100x on shared CI cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _keep_locale():
    """SimpleITK's GDCM DICOM writer (used by tests to write series) switches LC_CTYPE to "C" for
    good, which turns every later default-encoding read_text() into ASCII: restore it per test."""
    import locale

    saved = locale.setlocale(locale.LC_CTYPE)
    yield
    if locale.setlocale(locale.LC_CTYPE) != saved:
        locale.setlocale(locale.LC_CTYPE, saved)


LIDC_SAMPLE = (Path(__file__).resolve().parents[1] / "../shared/data/lidc-idri-sample").resolve()


@pytest.fixture(scope="session")
def lidc_sample() -> Path:
    if not (LIDC_SAMPLE / "LIDC-IDRI-0001").is_dir():
        pytest.skip(f"real LIDC-IDRI sample not found at {LIDC_SAMPLE} (../shared/data beside the repo)")
    return LIDC_SAMPLE


@pytest.fixture(scope="session")
def lidc_0001(lidc_sample) -> tuple[Path, Path]:
    """(series folder, its XML) of LIDC-IDRI-0001."""
    xml = next((lidc_sample / "LIDC-IDRI-0001").rglob("*.xml"))
    return xml.parent, xml


@pytest.fixture(scope="session")
def lidc_0002(lidc_sample) -> tuple[Path, Path]:
    xml = next((lidc_sample / "LIDC-IDRI-0002").rglob("*.xml"))
    return xml.parent, xml


# ------------------------------------------------------------------ synthetic LUNA16 chest

SPACING = (2.5, 2.0, 2.0)  # (z, y, x) mm
SHAPE = (20, 128, 128)
ORIGIN = (-100.0, -127.0, -127.0)  # (z, y, x) world of voxel 0 → column 63.5 is x = 0
NODULE_XYZ = (50.0, 10.0, -75.0)  # in the patient's LEFT lung (+x in LPS), world mm
NODULE_DIAMETER = 12.0


@dataclass
class SynthChest:
    hu: np.ndarray  # int16 (z, y, x), canonical orientation
    seg: np.ndarray  # uint8 LUNA16 labels: 3 left, 4 right, 5 trachea


def synth_chest(seed: int = 0, nodule: bool = True) -> SynthChest:
    """Body ellipse ~40 HU, two lung ellipses ~−850 HU, trachea −1000 HU, a 30 HU sphere nodule,
    a table below the body; canonical orientation (image right = patient left = +x)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    wz = ORIGIN[0] + z * SPACING[0]
    wy = ORIGIN[1] + y * SPACING[1]
    wx = ORIGIN[2] + x * SPACING[2]
    hu = np.full(SHAPE, -1000.0)
    seg = np.zeros(SHAPE, dtype=np.uint8)
    body = (wx / 110) ** 2 + (wy / 80) ** 2 <= 1
    hu[body] = 40
    hu[(np.abs(wy - 95) < 2) & (np.abs(wx) < 100)] = 200  # table, detached from the body
    for side, label in ((+1, 3), (-1, 4)):  # +x = patient left → LUNA16 label 3
        lung = ((wx - side * 50) / 35) ** 2 + ((wy - 5) / 50) ** 2 <= 1
        hu[lung] = -850
        seg[lung] = label
    trachea = wx**2 + (wy + 35) ** 2 <= 8**2
    hu[trachea] = -1000
    seg[trachea] = 5
    if nodule:
        r2 = (wx - NODULE_XYZ[0]) ** 2 + (wy - NODULE_XYZ[1]) ** 2 + (wz - NODULE_XYZ[2]) ** 2
        hu[r2 <= (NODULE_DIAMETER / 2) ** 2] = 30
    hu += rng.normal(0, 15, SHAPE)
    return SynthChest(np.clip(np.rint(hu), -1024, 3000).astype(np.int16), seg)


def chest_over_abdomen(seed: int = 0):
    """(Z, H, W) canonical volume, 60 slices of 2.5 mm at 2 mm pixels: two lungs (−850 HU, vessels)
    over slices 25–59 joined by a trachea in the top slices, and below them colon gas mottled with
    stool (its 90th HU percentile above −960, so one slice alone takes it for lung) in slices 5–20."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(np.arange(60), np.arange(128), np.arange(128), indexing="ij")
    hu = np.where(((x - 64) / 55.0) ** 2 + ((y - 64) / 40.0) ** 2 <= 1, 40.0, -1000.0)
    for side in (-1, 1):
        lung = (((x - 64 - side * 25) / 17.0) ** 2 + ((y - 66) / 25.0) ** 2 <= 1) & (z >= 25)
        hu[lung] = -850 + rng.normal(0, 30, lung.sum())
    hu[(((x - 64) / 5.0) ** 2 + ((y - 46) / 5.0) ** 2 <= 1) & (z >= 50)] = -1000  # trachea
    hu[(np.abs(x - 64) <= 30) & (np.abs(y - 46) <= 2) & (z >= 50) & (z <= 52)] = -1000  # main bronchi
    gas = (((x - 85) / 14.0) ** 2 + ((y - 60) / 12.0) ** 2 <= 1) & (z >= 5) & (z <= 20)
    hu[gas] = np.where(rng.random(gas.sum()) < 0.2, -600, -1000)
    return hu.astype(np.int16), gas


def write_mhd(path: Path, arr: np.ndarray, flipped: bool = False) -> None:
    """Write (z, y, x) ``arr`` in canonical geometry; ``flipped`` stores it the way some LUNA16
    scans are stored: x and y reversed with direction diag(−1, −1, 1)."""
    import SimpleITK as sitk

    origin_xyz = [ORIGIN[2], ORIGIN[1], ORIGIN[0]]
    direction = (1, 0, 0, 0, 1, 0, 0, 0, 1)
    if flipped:
        arr = arr[:, ::-1, ::-1]
        origin_xyz = [ORIGIN[2] + (SHAPE[2] - 1) * SPACING[2], ORIGIN[1] + (SHAPE[1] - 1) * SPACING[1], ORIGIN[0]]
        direction = (-1, 0, 0, 0, -1, 0, 0, 0, 1)
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    img.SetSpacing(SPACING[::-1])
    img.SetOrigin(origin_xyz)
    img.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


UID_PLAIN = "1.2.826.0.1.3680043.9.9999.1"
UID_FLIPPED = "1.2.826.0.1.3680043.9.9999.2"
UID_EMPTY = "1.2.826.0.1.3680043.9.9999.3"


@pytest.fixture
def interrupt_second_job(monkeypatch):
    """``real, calls = interrupt_second_job(module, "process_scan")``: the per-job function
    ``module.name(job, cfg)`` now records each ``job.key`` in ``calls`` and raises KeyboardInterrupt
    (a Ctrl-C) on the second job, for the resume tests of every prepare source."""

    def arm(module, name: str):
        real, calls = getattr(module, name), []

        def crash_on_second(job, cfg):
            calls.append(job.key)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return real(job, cfg)

        monkeypatch.setattr(module, name, crash_on_second)
        return real, calls

    return arm


@pytest.fixture(scope="session")
def luna16_root(tmp_path_factory) -> Path:
    """subset0/ with a plain and a flipped scan (same anatomy, one nodule each) and a scan without
    nodules; annotations.csv; seg-lungs-LUNA16/ for the plain scan only."""
    root = tmp_path_factory.mktemp("luna16")
    chest = synth_chest(0)
    write_mhd(root / "subset0" / f"{UID_PLAIN}.mhd", chest.hu)
    write_mhd(root / "subset0" / f"{UID_FLIPPED}.mhd", chest.hu, flipped=True)
    write_mhd(root / "subset1" / f"{UID_EMPTY}.mhd", synth_chest(1, nodule=False).hu)
    write_mhd(root / "seg-lungs-LUNA16" / f"{UID_PLAIN}.mhd", chest.seg)
    rows = ["seriesuid,coordX,coordY,coordZ,diameter_mm"]
    for uid in (UID_PLAIN, UID_FLIPPED):
        rows.append(f"{uid},{NODULE_XYZ[0]},{NODULE_XYZ[1]},{NODULE_XYZ[2]},{NODULE_DIAMETER}")
    (root / "annotations.csv").write_text("\n".join(rows) + "\n")
    return root
