"""FID / KID: hand checks of the formulas, and the offline Inception features on real slices."""
import numpy as np
import pytest

from nodulesynth.errors import NoduleSynthError
from nodulesynth.metrics.kid import fid, frechet_distance, kid


def test_frechet_distance_by_hand():
    # 1-D: (μ1-μ2)² + σ1² + σ2² - 2σ1σ2 = (3-1)² + (2-1)² = 5
    assert frechet_distance([1.0], [[1.0]], [3.0], [[4.0]]) == pytest.approx(5.0)
    # diagonal covariances: per-dimension sum of the 1-D terms
    mu1, mu2 = np.array([0.0, 1.0]), np.array([1.0, 1.0])
    s1, s2 = np.diag([1.0, 4.0]), np.diag([9.0, 1.0])
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(1 + (1 - 3) ** 2 + (2 - 1) ** 2)


def test_fid_kid_of_a_set_to_itself_and_to_a_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 16))
    b = rng.normal(size=(400, 16))
    assert fid(a, a) == pytest.approx(0.0, abs=1e-6)
    k_same = kid(a, b, subsets=20, subset_size=200)
    k_shift = kid(a, b + 0.5, subsets=20, subset_size=200)
    # unbiased: two samples of one distribution are ~0 (within a few subset stds), a shift is clearly > 0
    assert abs(k_same.mean) < 3 * k_same.std + 1e-3
    assert k_shift.mean > 10 * max(k_same.std, 1e-4) and k_shift.mean > 0.05
    assert fid(a, b + 0.5) > fid(a, b) + 3.0  # shift term 16·0.25 = 4
    assert kid(a, a, subsets=5, subset_size=50).subset_size == 50
    with pytest.raises(ValueError):
        kid(a[:1], b)


def test_inception_features_on_real_slices():
    from nodulesynth.metrics import kid as K

    try:
        path = K.inception_path()
    except NoduleSynthError as e:
        pytest.skip(str(e))
    import pathlib

    import pydicom

    root = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "tcga-chest-slices"
    files = sorted(root.glob("*/*.dcm"))[:4]
    if not files:
        pytest.skip(f"real slices absent ({root})")
    hu = np.stack([(lambda d: d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept))(pydicom.dcmread(f))
                   for f in files]).astype(np.float32)
    net = K.InceptionFeatures(path=path)
    x = net.preprocess(hu[:1])
    assert x.shape == (1, 3, 299, 299) and x.min() >= -1 and x.max() <= 0.9921875
    f = net(hu, batch=4)
    assert f.shape == (4, 2048) and np.isfinite(f).all()
    # the same slices twice give the same features; noise moves them
    assert np.allclose(net(hu[:2]), f[:2], atol=1e-4)
    noisy = net(hu[:2] + np.random.default_rng(0).normal(0, 150, hu[:2].shape).astype(np.float32))
    assert np.abs(noisy - f[:2]).mean() > 1e-2


def test_frechet_distance_matches_scipy_sqrtm():
    from scipy import linalg

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(60, 8)), rng.normal(size=(50, 8)) @ rng.normal(size=(8, 8))
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * np.real(linalg.sqrtm(s1 @ s2)))
    assert frechet_distance(a.mean(0), s1, b.mean(0), s2) == pytest.approx(ref, rel=1e-6)


def test_fid_sample_space_equals_covariance_form():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(12, 40)), rng.normal(size=(9, 40)) * 1.5 + 0.2  # 12·9 ≤ 40²: sample space
    ref = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert fid(a, b) == pytest.approx(ref, rel=1e-6)


@pytest.mark.slow
def test_realism_smoke_end_to_end(tmp_path):
    """benchmarks/realism.py --smoke: the shipped model vs 6 real TCGA patients, tiny crops npz."""
    import json
    import os
    import pathlib
    import subprocess
    import sys

    from nodulesynth.metrics import kid as K

    try:
        K.inception_path()
    except NoduleSynthError as e:
        pytest.skip(str(e))
    root = pathlib.Path(__file__).resolve().parents[1]
    tcga = root.parent / "shared" / "data" / "tcga-chest-slices"
    if not tcga.is_dir():
        pytest.skip(f"real slices absent ({tcga})")
    rng = np.random.default_rng(0)
    n = 16
    npz = tmp_path / "crops.npz"
    np.savez(npz, images=rng.integers(0, 120, (n, 128, 128)).astype(np.uint8), reader_masks=np.zeros((n, 128, 128), np.uint8),
             patient=np.arange(n).astype(np.int16), nodule=np.zeros(n, np.int16), slice=np.zeros(n, np.int16))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "realism.py"), "--smoke", "--crops", str(npz),
                        "--tcga", str(tcga), "--lesions", str(tmp_path / "none"), "--out", str(out)],
                       capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((out / "realism.json").read_text())
    model, floor = doc["rows"]
    assert floor["model"].startswith("real vs real") and "psnr_full" not in floor
    for row in (model, floor):
        assert np.isfinite(row["fid_full"]) and row["fid_full"] >= 0 and np.isfinite(row["kid_full"])
    assert 10 < model["psnr_full"] < 60 and 0 < model["ssim_full"] <= 1
    assert model["psnr_masked"] is None  # no nodule on TCGA slices: masked paired figures are absent, not 0
    assert (out / "realism.csv").is_file() and "real vs real" in (out / "realism.txt").read_text()
