"""Real lungs, inserted nodules: new samples made of real TRAIN slices without a nodule, each with
LIDC nodules added (``Synthesizer.add_nodules_to_real``): `generate --synthetic inserted`,
``SyntheticNoduleDataset(synthetic="inserted")``, the detection benchmark's ``real+N inserted`` arm.

Why slices without a nodule: a copy of a slice holding a real nodule would count that nodule twice
in training. Why TRAIN slices only: a copy of a validation or test patient's slice would carry that
patient into training. Copy ``i`` is a pure function of (weights, seed, i, the real set): it takes
background ``i mod M`` (M backgrounds) and is seeded by its name ``insert<i>``; where the nodules find
no room, attempt ``a`` takes background ``(i + a) mod M`` under the name ``insert<i>.<a>``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import NoduleSynthError
from .pipeline import SyntheticBatch, Synthesizer

MODES = ("generated", "inserted")  # what the synthetic samples are
MAX_ATTEMPTS = 16  # backgrounds tried per copy before giving up


def add_to_real_slices(synth: Synthesizer, real, rows, names) -> SyntheticBatch:
    """Slices ``rows`` of the prepared set ``real`` with LIDC nodules added, slice k seeded by
    ``names[k]``; one where they find no room stays as it was (provenance ``no_room``). Provenance: the
    real slice's, overlaid by what it is now (source "real+lidc-nodules", the nodules), with where the
    scan came from kept as ``real_source``. The one path of `generate --real
    --add-nodules`, ``conditions={"add_nodules": True}`` and the inserted copies."""
    from .dataset import real_provenance

    rows = [int(r) for r in rows]
    items = [real[r] for r in rows]
    out = synth.add_nodules_to_real(np.stack([np.asarray(it["image_hu"]) for it in items]),
                                    np.stack([np.asarray(it["mask"]) for it in items]), list(names), no_room="keep")
    real_provs = [real_provenance(it["record"], r) for r, it in zip(rows, items)]
    out.provenance = [{**rp, **p, "real_source": rp["source"]} for rp, p in zip(real_provs, out.provenance)]
    return out


@dataclass
class InsertionSource:
    """The backgrounds of the inserted copies: indices into ``real`` (a SliceDataset)."""

    real: object
    backgrounds: np.ndarray
    name: str = "real"

    @classmethod
    def from_real(cls, real, allowed, spacing_mm: float, name: str = "real") -> "InsertionSource":
        """The slices of ``allowed`` (TRAIN indices into ``real``) without a nodule; refused when there
        are none or their pixel spacing is not the model's."""
        from .dataset import check_real_spacing

        allowed = np.asarray(sorted(int(i) for i in allowed), np.int64)
        bg = allowed[[not real.records[int(i)].has_nodule for i in allowed]] if len(allowed) else allowed
        if not len(bg):
            raise NoduleSynthError(f"{name}: no TRAIN slice without a nodule to insert nodules into "
                                   "(prepare keeps nodule-free slices with --negatives F, default 0.1)")
        check_real_spacing(real, bg, spacing_mm, name)
        return cls(real, bg, name)

    def generate(self, synth: Synthesizer, indices) -> SyntheticBatch:
        """Copies ``indices`` (their provenance: the background's, the nodules, index and attempt)."""
        indices = [int(i) for i in indices]
        m = len(self.backgrounds)
        todo = {i: 0 for i in indices}
        done: dict[int, tuple] = {}
        while todo:
            batch = sorted(todo)
            rows = [int(self.backgrounds[(i + todo[i]) % m]) for i in batch]
            names = [f"insert{i}" + (f".{todo[i]}" if todo[i] else "") for i in batch]
            out = add_to_real_slices(synth, self.real, rows, names)
            for k, (i, r) in enumerate(zip(batch, rows)):
                p = out.provenance[k]
                if "no_room" not in p:
                    done[i] = (out.images_hu[k], out.masks[k], out.boxes[k],
                               {**p, "real_index": r, "index": i, "attempt": todo.pop(i)})
                elif todo[i] + 1 >= min(m, MAX_ATTEMPTS):
                    raise NoduleSynthError(f"{self.name}: copy {i}: the nodules found no room in {min(m, MAX_ATTEMPTS)} "
                                           f"TRAIN slices ({p['no_room']}); relax the nodule conditions")
                else:
                    todo[i] += 1
        got = [done[i] for i in indices]
        size = np.asarray(self.real[int(self.backgrounds[0])]["image_hu"]).shape
        return SyntheticBatch(
            images_hu=torch.stack([g[0] for g in got]) if got else torch.zeros(0, *size),
            masks=torch.stack([g[1] for g in got]) if got else torch.zeros(0, *size, dtype=torch.uint8),
            boxes=[np.asarray(g[2], np.float32).reshape(-1, 4) for g in got], provenance=[g[3] for g in got])

