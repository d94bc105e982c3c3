"""Build the shipped body atlas ``nodulesynth/synth/body_atlas.npz`` (~20 s).

    python benchmarks/build_body_atlas.py --prepared prepared

The body (mask class 1: soft tissue, fat, muscle, bone, mediastinum) holds most of what separates
translated slices from real ones on held-out patients (benchmarks README, "Body atlas"), and a mask
says nothing about where a rib, a fat plane or a vessel of the mediastinum lies. Each entry here is
the body of one real slice, registered onto generated anatomy at run time (``nodulesynth.synth.atlas``),
taken from the TRAIN patients of the prepared 512² sets at 0.8 mm (never a VAL or TEST patient, so the
held-out evaluation stays unseen):

- ``hu``: the slice's HU on its body (class 1), carried ``RIM_PX`` beyond it by the nearest body
  pixel's value (so that interpolation at the body's edge reads body, not lung or air), 0 elsewhere:
  lungs, airways and nodules are never stored;
- ``masks``: the slice's label mask, which the registration aligns to the generated one;
- ``source``: dataset and patient, for attribution.

Left out: slices whose body covers less than ``MIN_BODY`` of the image (a scout edge, a stray slice).

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

OUT = Path(__file__).resolve().parents[1] / "nodulesynth" / "synth" / "body_atlas.npz"
RIM_PX = 2
MIN_BODY = 0.05


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prepared", type=Path, default=Path("prepared"))
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args(argv)
    hus, masks, sources = [], [], []
    for src, i, hu, m in train_slices(a.prepared):
        body = m == MaskClass.BODY
        if body.mean() < MIN_BODY:
            print(f"left out {src} slice {i}: body covers {body.mean():.1%} of the image")
            continue
        dist, (iy, ix) = ndi.distance_transform_edt(~body, return_indices=True)
        hus.append(np.where(dist <= RIM_PX, np.clip(np.rint(hu[iy, ix]), -1024, 3071), 0).astype(np.int16))
        masks.append(m)
        sources.append(src)
    with atomic_file(a.out) as fh:
        np.savez_compressed(fh, hu=np.stack(hus), masks=np.stack(masks), source=np.asarray(sources),
                            spacing_mm=np.float32(SPACING_MM))
    print(f"{a.out}: {len(hus)} bodies of {len(set(sources))} patients, {a.out.stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
