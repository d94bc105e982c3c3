"""Patient-level train/val/test splits for prepared datasets.

Why by patient: slices of one patient are near-duplicates (same anatomy, scanner, noise), so a
patient on both sides of a split leaks and flatters every held-out figure. Each patient gets a
rank from a seeded hash of its id (stable: adding patients does not reshuffle the others' order),
and the ranked patients are cut into train/val/test by the fractions (largest-remainder rounding,
so the counts add up exactly). Same patients + fractions + seed → same split, on any machine.

Consumers (trainers, ``real=`` mixing, benchmarks) call :func:`split_indices`; datasets prepared
before splits were recorded fall back to computing the split here from ``patient_of``.
"""
from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

import numpy as np

from ..errors import NoduleSynthError

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


def parse_fractions(text: str | Sequence[float], arg: str = "--split-fractions") -> tuple[float, float, float]:
    """'0.8,0.1,0.1' (or a sequence) → three fractions ≥ 0 that sum to 1."""
    try:
        vals = [float(v) for v in (text.split(",") if isinstance(text, str) else text)]
    except ValueError as e:
        raise NoduleSynthError(f"{arg} {text!r}: expected three numbers like 0.8,0.1,0.1") from e
    if len(vals) != 3 or any(not np.isfinite(v) or v < 0 for v in vals) or abs(sum(vals) - 1.0) > 1e-6:
        raise NoduleSynthError(f"{arg} {text!r}: need three fractions train,val,test ≥ 0 that sum to 1")
    return vals[0], vals[1], vals[2]


def _rank_key(patient: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{patient}".encode()).hexdigest()


def split_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Patients per split: largest-remainder rounding of n·fractions (sums to n exactly)."""
    raw = np.asarray(fractions, dtype=np.float64) * n
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


def assign_patients(
    patients: Iterable[str], fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0
) -> dict[str, str]:
    """{patient: "train"|"val"|"test"} for the distinct patients given."""
    fr = parse_fractions(fractions, "split fractions")
    uniq = sorted({str(p) for p in patients}, key=lambda p: _rank_key(p, seed))
    out, start = {}, 0
    for name, k in zip(SPLITS, split_counts(len(uniq), fr)):
        for p in uniq[start : start + k]:
            out[p] = name
        start += k
    return out


def patient_of(record) -> str:
    """The patient a slice record belongs to; old datasets without one fall back to the series
    (one scan = one patient, the conservative guess for LUNA16, which has no patient ids)."""
    return str(getattr(record, "patient", "") or getattr(record, "series_uid", ""))


def assign_splits(records: Sequence, fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0) -> dict:
    """Set ``record.patient`` (if empty) and ``record.split`` on every record, by patient.
    Returns a summary for the dataset's meta (fractions, seed, patients and slices per split)."""
    for r in records:
        if not getattr(r, "patient", ""):
            r.patient = patient_of(r)
    by_patient = assign_patients((r.patient for r in records), fractions, seed)
    for r in records:
        r.split = by_patient[r.patient]
    return {
        "by": "patient",
        "fractions": [float(f) for f in parse_fractions(fractions, "split fractions")],
        "seed": int(seed),
        "patients": {s: sum(v == s for v in by_patient.values()) for s in SPLITS},
        "slices": {s: sum(r.split == s for r in records) for s in SPLITS},
    }


def split_indices(ds, split: str | Sequence[str] | None = "train") -> np.ndarray:
    """Indices of a ``SliceDataset``'s slices in ``split`` ("train", "val", "test", a list of
    them, or None/"all" for every slice). Records without a stored split (datasets prepared before
    splits existed) are split here by patient with the default fractions and seed 0."""
    n = len(ds.records)
    if split is None or split == "all":
        return np.arange(n, dtype=np.int64)
    wanted = {split} if isinstance(split, str) else set(split)
    bad = wanted - set(SPLITS)
    if bad:
        raise NoduleSynthError(f"split: unknown {sorted(bad)}; use train, val, test or all")
    if any(not getattr(r, "split", "") for r in ds.records):
        fr = ds.meta.get("split", {}).get("fractions", DEFAULT_FRACTIONS) if hasattr(ds, "meta") else DEFAULT_FRACTIONS
        seed = ds.meta.get("split", {}).get("seed", 0) if hasattr(ds, "meta") else 0
        by_patient = assign_patients((patient_of(r) for r in ds.records), fr, seed)
        splits = [getattr(r, "split", "") or by_patient[patient_of(r)] for r in ds.records]
    else:
        splits = [r.split for r in ds.records]
    return np.asarray([i for i, s in enumerate(splits) if s in wanted], dtype=np.int64)


def check_disjoint(records: Sequence) -> None:
    """Raise if any patient has slices in two splits (the invariant every consumer relies on)."""
    seen: dict[str, str] = {}
    for r in records:
        p, s = patient_of(r), getattr(r, "split", "")
        if p in seen and seen[p] != s:
            raise NoduleSynthError(f"patient {p} is in both {seen[p]!r} and {s!r} splits")
        seen[p] = s
