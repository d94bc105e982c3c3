"""Several prepared slice datasets as one training source: split filter, global indices, weights.

Why: stage 2 trains on real 512² slices of several collections *and* 128² nodule crops at their
native spacing (the translator is fully convolutional), each with its own share of the batches
(``--data A --data B --data-weights 1,3``). Only each dataset's TRAIN split is used by default
(:func:`nodulesynth.data.splits.split_indices`: the split stored by ``prepare``, or one computed by
patient for datasets prepared before splits existed), so held-out patients never reach training.
Each dataset splits its own patients, so one patient can be TRAIN in one collection and held out in
another (an LIDC patient of the sample slices is also in the nodule crops): a patient outside the
wanted split in *any* of the given datasets is left out of all of them.

Global index ``g`` addresses slice ``g - offsets[d]`` of dataset ``d``.
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np

from ..errors import NoduleSynthError

log = logging.getLogger("nodulesynth.train")


def as_paths(data: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """``data`` as a list of dataset folders (one path or several)."""
    paths = [str(data)] if isinstance(data, (str, os.PathLike)) else [str(p) for p in data]
    if not paths:
        raise NoduleSynthError("--data: give at least one prepared dataset folder")
    return paths


def parse_weights(weights, n: int) -> list[float] | None:
    """``'1,3'`` / ``(1, 3)`` / None → n non-negative floats with a positive sum (or None = by size)."""
    if weights is None or weights == "" or weights == ():
        return None
    try:
        vals = [float(w) for w in (weights.split(",") if isinstance(weights, str) else weights)]
    except ValueError as e:
        raise NoduleSynthError(f"--data-weights {weights!r}: expected numbers like 1,3") from e
    if len(vals) != n:
        raise NoduleSynthError(f"--data-weights {weights!r}: {len(vals)} weights for {n} --data folders")
    if any(not np.isfinite(v) or v < 0 for v in vals) or sum(vals) <= 0:
        raise NoduleSynthError(f"--data-weights {weights!r}: weights must be ≥ 0 with a positive sum")
    return vals


class SliceSources:
    """The selected slices of one or more ``SliceDataset`` folders.

    ``indices`` (global ids of the selected slices) and ``groups`` (their dataset) feed
    :class:`engine.IndexStream`; ``weights`` is None (every slice equally likely) or the share of
    draws per dataset."""

    def __init__(self, data, split: str | None = "train", weights=None, keep=None, keep_why: str = "") -> None:
        from ..data.slices import SliceDataset
        from ..data.splits import patient_of, split_indices

        self.paths = as_paths(data)
        self.datasets = [SliceDataset(p) for p in self.paths]
        self.offsets = np.cumsum([0] + [len(ds) for ds in self.datasets])
        self.weights = parse_weights(weights, len(self.datasets))
        self.split = split
        idx, groups = [], []
        chosen = [split_indices(ds, split) for ds in self.datasets]
        held = set()
        if split not in (None, "all"):
            for ds, local in zip(self.datasets, chosen):
                mine = set(local.tolist())
                held |= {patient_of(r) for i, r in enumerate(ds.records) if i not in mine}
        self.excluded = 0
        for d, (path, ds) in enumerate(zip(self.paths, self.datasets)):
            local = chosen[d]
            if held:
                mine = np.asarray([i for i in local if patient_of(ds.records[i]) not in held], dtype=np.int64)
                if len(mine) < len(local):
                    log.info("data %s: %d slices left out (their patients are held out in another --data folder)",
                             path, len(local) - len(mine))
                self.excluded += len(local) - len(mine)
                local = mine
            if keep is not None:
                local = np.asarray([i for i in local if keep(ds, ds.records[i])], dtype=np.int64)
            if len(local) == 0 and (self.weights is None or self.weights[d] > 0):
                raise NoduleSynthError(f"--data {path}: no usable slices among the {len(ds)} (split {split or 'all'}"
                                       f"{'; ' + keep_why if keep is not None and keep_why else ''})")
            idx.append(local + self.offsets[d])
            groups.append(np.full(len(local), d, dtype=np.int64))
            log.info("data %s: %d of %d slices (split %s)", path, len(local), len(ds), split or "all")
        self.indices = np.concatenate(idx).astype(np.int64)
        self.groups = np.concatenate(groups)

    def __len__(self) -> int:
        return len(self.indices)

    def locate(self, g: int):
        """(dataset, local index) of global index ``g``."""
        d = int(np.searchsorted(self.offsets, g, side="right") - 1)
        return self.datasets[d], int(g - self.offsets[d])

    def record(self, g: int):
        ds, i = self.locate(g)
        return ds.records[i]

    def summary(self) -> list[dict]:
        """Per dataset: path, slices used, patients used (for run.json and model cards)."""
        from ..data.splits import patient_of

        out = []
        for d, (path, ds) in enumerate(zip(self.paths, self.datasets)):
            local = self.indices[self.groups == d] - self.offsets[d]
            out.append({"path": path, "slices": int(len(local)), "of": len(ds),
                        "patients": len({patient_of(ds.records[i]) for i in local}),
                        "size": int(ds.images.shape[-1]),
                        "weight": None if self.weights is None else self.weights[d]})
        return out
