"""The TRAIN slices the shipped libraries are built from (``build_background_library.py``,
``build_body_atlas.py``): every TRAIN slice of the prepared 512² sets at 0.8 mm, never a VAL or TEST
patient, so the held-out evaluation stays unseen.

Data: TCGA (TCIA, CC BY 3.0), the pyradiomics test volumes (NSCLC-Radiomics, TCIA, CC BY 3.0), LIDC-IDRI
(TCIA, CC BY 3.0); attribution in the data READMEs.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nodulesynth.data.slices import SliceDataset  # noqa: E402
from nodulesynth.data.splits import patient_of, split_indices  # noqa: E402

SETS = ("tcga", "pyradiomics", "lidc-sample")
SPACING_MM = 0.8


def train_slices(prepared: Path) -> Iterator[tuple[str, int, np.ndarray, np.ndarray]]:
    """(``dataset:patient``, slice index, HU float32 (512, 512), mask uint8) of every TRAIN slice."""
    for name in SETS:
        folder = prepared / name
        if not (folder / "index.json").is_file():
            raise SystemExit(f"--prepared {prepared}: {name} is not a prepared dataset (nodulesynth prepare)")
        ds = SliceDataset(folder)
        for i in split_indices(ds, "train"):
            rec = ds.records[i]
            if any(abs(s - SPACING_MM) > 1e-3 for s in rec.spacing_mm) or ds.images.shape[1:] != (512, 512):
                raise SystemExit(f"{folder}: slice {i} is not 512² at {SPACING_MM} mm")
            yield f"{name}:{patient_of(rec)}", i, np.asarray(ds.images[i], np.float32), np.asarray(ds.masks[i], np.uint8)
