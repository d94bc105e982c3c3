"""Build the shipped scanner-background library ``nodulesynth/synth/scanner_backgrounds.npz`` (~30 s).

    python benchmarks/build_background_library.py --prepared prepared

What lies outside the patient in a CT slice (the table, cushions, blankets, ECG leads, the air's own
noise) is in no mask class, so the translator can only guess it. Each entry here is that background
of one real slice, taken from the TRAIN patients of the prepared 512² sets at 0.8 mm (never a VAL or
TEST patient, so the held-out evaluation stays unseen):

- ``hu``: the slice with the patient (mask classes 1–5, grown by ``SKIN_PX`` so that the skin's
  partial-volume rim goes too) replaced by the slice's own air, tiled from ``tile``, its quietest
  all-background 32² window;
- ``bottom`` / ``centre_x``: the patient's lowest row and horizontal centre, where a generated body is
  aligned (``nodulesynth.synth.background``);
- ``source``: dataset and patient, for attribution.

Left out, so no patient anatomy ships: slices with a soft-tissue region larger than ``ARM_PX`` outside
the body mask (arms at the sides, a second body part), and slices whose body reaches the image's
bottom edge (no table to take).

Data: TCGA (TCIA, CC BY 3.0), the pyradiomics test volumes (NSCLC-Radiomics, TCIA, CC BY 3.0), LIDC-IDRI
(TCIA, CC BY 3.0); attribution in the data READMEs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library_slices import SPACING_MM, train_slices  # noqa: E402

from nodulesynth.io import atomic_file  # noqa: E402
from nodulesynth.masks.classes import MaskClass  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "nodulesynth" / "synth" / "scanner_backgrounds.npz"
TILE = 32
TISSUE_HU = -300.0
SKIN_PX = 4  # 3.2 mm: the rim of skin just outside the mask would draw the real patient's outline
ARM_PX = 3000  # ≈ 19 cm² at 0.8 mm: far more than a cable, a fold of cloth or the table's rim


def air_tile(hu: np.ndarray, background: np.ndarray) -> np.ndarray | None:
    """The quietest (lowest 95th-percentile HU) TILE² window lying wholly in the background."""
    best, best_q = None, np.inf
    for y in range(0, hu.shape[0] - TILE + 1, TILE // 2):
        for x in range(0, hu.shape[1] - TILE + 1, TILE // 2):
            if background[y : y + TILE, x : x + TILE].all():
                q = np.percentile(hu[y : y + TILE, x : x + TILE], 95)
                if q < best_q:
                    best, best_q = hu[y : y + TILE, x : x + TILE], q
    return None if best is None else best.copy()


def entry(hu: np.ndarray, mask: np.ndarray) -> tuple | str:
    """(background HU, tile, bottom row, centre column) of one slice, or why it is left out."""
    body = mask != MaskClass.BACKGROUND
    rows, cols = np.nonzero(body.any(1))[0], np.nonzero(body.any(0))[0]
    if not len(rows):
        return "no body"
    if rows[-1] >= hu.shape[0] - 2:
        return "body reaches the bottom edge"
    outside = (~body) & (hu > TISSUE_HU)
    lab, n = ndi.label(outside)
    if n and np.bincount(lab.ravel())[1:].max() > ARM_PX:
        return "soft tissue outside the body (arm?)"
    tile = air_tile(hu, ~body)
    if tile is None:
        return "no all-background window for the air"
    reps = (-(-hu.shape[0] // TILE), -(-hu.shape[1] // TILE))
    air = np.tile(tile, reps)[: hu.shape[0], : hu.shape[1]]
    patient = ndi.binary_dilation(body, iterations=SKIN_PX)
    return np.where(patient, air, hu), tile, int(rows[-1]), 0.5 * float(cols[0] + cols[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prepared", type=Path, default=Path("prepared"))
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args(argv)
    hus, tiles, bottoms, centres, sources = [], [], [], [], []
    for src, i, hu, mask in train_slices(a.prepared):
        e = entry(hu, mask)
        if isinstance(e, str):
            print(f"left out {src} slice {i}: {e}")
            continue
        bg, tile, bottom, centre = e
        hus.append(np.clip(np.rint(bg), -1024, 3071).astype(np.int16))
        tiles.append(np.clip(np.rint(tile), -1024, 3071).astype(np.int16))
        bottoms.append(bottom)
        centres.append(centre)
        sources.append(src)
    with atomic_file(a.out) as fh:
        np.savez_compressed(fh, hu=np.stack(hus), tile=np.stack(tiles), bottom=np.asarray(bottoms, np.int16),
                            centre_x=np.asarray(centres, np.float32), source=np.asarray(sources),
                            spacing_mm=np.float32(SPACING_MM))
    print(f"{a.out}: {len(hus)} backgrounds of {len(set(sources))} patients, {a.out.stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
