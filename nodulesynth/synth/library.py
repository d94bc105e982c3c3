"""Shipped libraries of real TRAIN slices (scanner backgrounds, body atlas): one npz each, package data.

What they share, and why once: loaded lazily with ``allow_pickle=False`` (never unpickle shipped
data), one clear error naming the file and the script that rebuilds it, and a revision (the file's
hash) that every sample's provenance records beside the entry and its source patient.
"""
from __future__ import annotations

import hashlib
from functools import cached_property
from pathlib import Path

import numpy as np

from ..errors import NoduleSynthError


class NpzLibrary:
    """A library file of ``KEYS`` arrays with one entry per row of ``hu`` and its ``source``."""

    KEYS: tuple[str, ...] = ("hu", "source", "spacing_mm")
    WHAT = "library"  # in error messages
    BUILDER = ""  # the benchmarks/ script that builds it

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def check(self, d: dict[str, np.ndarray]) -> str | None:
        """Why the loaded arrays are inconsistent, or None (subclasses add their own checks)."""
        n = len(d["hu"])
        if n == 0 or d["hu"].ndim != 3 or len(d["source"]) != n:
            return f"entries {n}, hu {d['hu'].shape}, sources {len(d['source'])}"
        return None

    @cached_property
    def _data(self) -> dict[str, np.ndarray]:
        try:
            with np.load(self.path, allow_pickle=False) as z:
                d = {k: z[k] for k in self.KEYS}
        except (OSError, KeyError, ValueError) as e:
            raise NoduleSynthError(f"{self.path}: not a {self.WHAT} ({e}); reinstall nodulesynth "
                                   f"or rebuild it with {self.BUILDER}") from e
        why = self.check(d)
        if why:
            raise NoduleSynthError(f"{self.path}: inconsistent {self.WHAT} ({why})")
        return d

    @cached_property
    def revision(self) -> str:
        """First 12 hex digits of the file's SHA-256: recorded in every sample's provenance."""
        return hashlib.sha256(self.path.read_bytes()).hexdigest()[:12]

    def __len__(self) -> int:
        return len(self._data["hu"])

    def source(self, k: int) -> str:
        """Dataset and patient of entry ``k`` (attribution)."""
        return str(self._data["source"][k])
