"""Image quality in the paper's Table 1 layout, on held-out real patients, with the real-vs-real floor.

    python benchmarks/realism.py --weights pretrained --out /tmp/realism        # one model
    python benchmarks/realism.py --weights A B --names full no-lia --out DIR     # ablations side by side

Rows: each model, and ``real vs real`` (two disjoint halves of the real patients) measured in the
same run, so a model's distance can be read against the distance between real patients.

- **Full image, FID / KID**: generated 512² slices vs the held-out half B of the TCGA patients'
  slices (42 patients, two vendors, neck to abdomen: unannotated, never used for training). The
  floor is half A vs half B; the generated set has |A| slices for FID (its bias depends on the set
  sizes), all ``--n-generated`` for KID. Real slices are resampled to the model's 0.8 mm and
  centre-cropped/padded to 512 with air.
- **Masked region, FID / KID**: 64² nodule-centred windows (≈ 45 mm at 0.7 mm): the central 64² of
  real LIDC nodule crops (768 patients none of which trained the shipped model; one crop per
  nodule, its middle slice), vs windows centred on each generated nodule after resampling the
  slice to 0.7 mm (LIDC's median spacing). The floor is two disjoint halves of the LIDC patients.
- **PSNR / SSIM** (paired; the paper's eq. 12 with MAX = 4095 on HU + 1024, and eq. 13 with
  L = 255 on the 8-bit lung window, plus PSNR of the 8-bit window): the translator is given the
  semantic mask of each real slice (the project's mask builder; the lesion label where there is
  one) and its output is compared with that slice. Full image: all TCGA slices + the pyradiomics
  lesion slices; masked: the lesion slices only, over the nodule pixels dilated by 8 px (6.4 mm).
  The floor row has no paired figures (there is no pair).

KID (unbiased MMD², cubic kernel, ± std over subsets) is the figure to trust here: with ~40 real
slices per half, FID carries a large small-sample bias, which is why the real-vs-real floor row
sits far above 0. Compare a model's FID only with the floor in the same run.
"""
from __future__ import annotations

import argparse
import csv
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from nodulesynth.errors import NoduleSynthError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MODEL_SPACING = 0.8
CROP = 64


def fit(hu: np.ndarray, spacing: float, target: float, size: int, fill: float = -1024.0, order: int = 1) -> np.ndarray:
    """Resample a slice to ``target`` mm/px and centre-crop/pad it to size² (pad value ``fill``)."""
    from scipy import ndimage as ndi

    z = spacing / target
    if abs(z - 1) > 1e-3:
        hu = ndi.zoom(hu, z, order=order, mode="nearest")
    ph, pw = max(0, size - hu.shape[0]), max(0, size - hu.shape[1])
    hu = np.pad(hu, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)), constant_values=fill)
    y0, x0 = (hu.shape[0] - size) // 2, (hu.shape[1] - size) // 2
    return hu[y0 : y0 + size, x0 : x0 + size]


def load_tcga(root: Path, size: int, max_patients: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """TCGA single DICOM slices → (HU (N, size, size) float32 at 0.8 mm, patient ids)."""
    import pydicom

    files = sorted(root.glob("*/*.dcm"))
    if max_patients:
        keep = sorted({f.parent.name for f in files})[:max_patients]
        files = [f for f in files if f.parent.name in keep]
    if not files:
        raise NoduleSynthError(f"--tcga {root}: no DICOM slices (*/ *.dcm) found")
    ims, pats = [], []
    for f in files:
        d = pydicom.dcmread(f)
        hu = d.pixel_array.astype(np.float32) * float(getattr(d, "RescaleSlope", 1)) + float(getattr(d, "RescaleIntercept", 0))
        ims.append(fit(hu, float(d.PixelSpacing[0]), MODEL_SPACING, size))
        pats.append(f.parent.name)
    return np.stack(ims), np.asarray(pats)


def load_lesion_slices(root: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """pyradiomics volumes: every slice crossing the lesion label → (HU, semantic masks with the
    lesion as class NODULE), at 0.8 mm, size²."""
    import SimpleITK as sitk

    from nodulesynth.masks.classes import MaskClass
    from nodulesynth.masks.semantic import semantic_mask

    ims, mks = [], []
    for img in sorted(root.glob("*_image.nrrd")):
        lab = img.with_name(img.name.replace("_image", "_label"))
        if not lab.is_file():
            continue
        vol = sitk.GetArrayFromImage(sitk.ReadImage(str(img))).astype(np.float32)
        les = sitk.GetArrayFromImage(sitk.ReadImage(str(lab)))
        sp = float(sitk.ReadImage(str(img)).GetSpacing()[0])
        for k in np.nonzero(les.reshape(len(les), -1).any(1))[0]:
            hu = fit(vol[k], sp, MODEL_SPACING, size)
            lk = fit(les[k].astype(np.float32), sp, MODEL_SPACING, size, fill=0, order=0) > 0
            m = semantic_mask(hu, (MODEL_SPACING, MODEL_SPACING))
            m[lk] = MaskClass.NODULE
            ims.append(hu)
            mks.append(m)
    return (np.stack(ims), np.stack(mks)) if ims else (np.zeros((0, size, size), np.float32), np.zeros((0, size, size), np.uint8))


def lidc_nodule_windows(npz: Path, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Central 64² HU of one crop per nodule (its middle slice) → (windows, patient)."""
    from nodulesynth.detect.windows import crops_to_hu

    with np.load(npz, allow_pickle=False) as d:
        pat, nod, sl = d["patient"].astype(np.int64), d["nodule"].astype(np.int64), d["slice"].astype(np.int64)
        order = np.lexsort((sl, nod, pat))  # grouped by nodule, slices in z order
        key = (pat * 10000 + nod)[order]
        starts = np.r_[0, np.nonzero(np.diff(key))[0] + 1]
        counts = np.diff(np.r_[starts, len(key)])
        pick = np.sort(order[starts + counts // 2])
        h = d["images"].shape[1]
        o = (h - CROP) // 2
        return crops_to_hu(d["images"][pick][:, o : o + CROP, o : o + CROP]), pat[pick]


def nodule_windows(images_hu: np.ndarray, masks: np.ndarray, spacing: float, target: float) -> np.ndarray:
    """64² windows centred on each nodule component of generated slices (resampled to ``target``)."""
    from nodulesynth.detect.windows import resample_slice
    from nodulesynth.masks.boxes import mask_to_boxes

    out = []
    for h, m in zip(images_hu, masks):
        h, m = resample_slice(h, m, spacing, target)
        hp = np.pad(h, CROP, constant_values=-1024)
        for b in mask_to_boxes(m):
            cx, cy = int(round((b[0] + b[2]) / 2)) + CROP, int(round((b[1] + b[3]) / 2)) + CROP
            out.append(hp[cy - CROP // 2 : cy + CROP // 2, cx - CROP // 2 : cx + CROP // 2])
    return np.stack(out) if out else np.zeros((0, CROP, CROP), np.float32)


def halves(groups: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint halves of the patients → (indices A, indices B)."""
    pats = np.random.default_rng(seed).permutation(np.unique(groups))
    a = set(pats[: len(pats) // 2].tolist())
    ia = np.array([i for i, g in enumerate(groups) if g in a])
    ib = np.array([i for i, g in enumerate(groups) if g not in a])
    return ia, ib


def paired(model, images: np.ndarray, masks: np.ndarray, dilate_px: int, block: int, background: str = "translator",
           body: str = "translator", lungs: str = "texture") -> dict:
    """Translator output of each real slice's mask vs that slice: PSNR/SSIM, full and masked.
    ``background``, ``body`` and ``lungs`` as generate's; the defaults, the translator's own (with the
    weights' lung texture, as measured since it shipped), measure translation (a scanner background, an
    atlas body or library lung tiles are another scan's: no pixel of them is predictable from the mask)."""
    from nodulesynth.masks.classes import MaskClass
    from nodulesynth.metrics.image_quality import dilate, psnr_8bit, psnr_ct, ssim_8bit
    from nodulesynth.synth.pipeline import GenerationConfig, Synthesizer

    syn = Synthesizer(model, GenerationConfig(block=block, background=background, body=body, lungs=lungs))
    res = {k: [] for k in ("psnr_full", "psnr8_full", "ssim_full", "psnr_masked", "psnr8_masked", "ssim_masked")}
    for s in range(0, len(images), block):
        fake = syn.translate(masks[s : s + block]).images_hu
        real = torch.from_numpy(np.ascontiguousarray(images[s : s + block])).float()
        reg = dilate(torch.from_numpy(masks[s : s + block] == MaskClass.NODULE), dilate_px)
        res["psnr_full"] += psnr_ct(fake, real).tolist()
        res["psnr8_full"] += psnr_8bit(fake, real).tolist()
        res["ssim_full"] += ssim_8bit(fake, real).tolist()
        res["psnr_masked"] += psnr_ct(fake, real, reg).tolist()
        res["psnr8_masked"] += psnr_8bit(fake, real, reg).tolist()
        res["ssim_masked"] += ssim_8bit(fake, real, reg).tolist()
    out = {}
    for k, v in res.items():
        v = np.asarray(v, np.float64)
        v = v[np.isfinite(v)]
        out[k] = float(v.mean()) if len(v) else None
        out[k + "_n"] = int(len(v))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", nargs="+", default=["pretrained"], help="TSGAN weights folder(s) (or hub ids)")
    p.add_argument("--names", nargs="+", help="row names for --weights (default: folder names)")
    p.add_argument("--out", required=True)
    p.add_argument("--tcga", default=str(SHARED / "tcga-chest-slices"))
    p.add_argument("--lesions", default=str(SHARED / "pyradiomics-lung"))
    p.add_argument("--crops", default=str(SHARED / "lidc-nodule-crops" / "lidc_nodule_crops.npz"))
    p.add_argument("--n-generated", type=int, default=100, help="generated slices per model")
    p.add_argument("--n-crops", type=int, default=200, help="real nodule windows per half (masked FID/KID)")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--dilate-px", type=int, default=8, help="masked PSNR/SSIM: nodule dilation in px")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--block", type=int, default=8)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (test suite)")
    a = p.parse_args(argv)
    try:
        return run(a, argv)
    except NoduleSynthError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(a, argv) -> int:
    from nodulesynth.detect.yolo import git_revision
    from nodulesynth.io import write_json
    from nodulesynth.metrics.kid import InceptionFeatures, fid, kid
    from nodulesynth.models.tsgan import TSGAN
    from nodulesynth.synth.pipeline import GenerationConfig, Synthesizer

    t0 = time.time()
    torch.manual_seed(a.seed)
    if a.names and len(a.names) != len(a.weights):
        raise NoduleSynthError(f"--names: {len(a.names)} names for {len(a.weights)} --weights")
    if a.n_generated < 2 or a.n_crops < 2:
        raise NoduleSynthError("--n-generated and --n-crops must be ≥ 2")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    net = InceptionFeatures(a.device)  # a clear error first if the Inception network is absent
    size = 512
    tcga, tpat = load_tcga(Path(a.tcga), size, max_patients=6 if a.smoke else None)
    les_i, les_m = load_lesion_slices(Path(a.lesions), size) if Path(a.lesions).is_dir() else (np.zeros((0, size, size)), np.zeros((0, size, size), np.uint8))
    if a.smoke:
        les_i, les_m = les_i[:2], les_m[:2]
    crops, cpat = lidc_nodule_windows(Path(a.crops), a.seed) if Path(a.crops).is_file() else (None, None)
    ia, ib = halves(tpat, a.seed)
    print(f"real: {len(tcga)} TCGA slices of {len(np.unique(tpat))} patients (halves {len(ia)} / {len(ib)} slices), "
          f"{len(les_i)} lesion slices, {0 if crops is None else len(crops)} LIDC nodule windows", flush=True)
    f_a, f_b = net(tcga[ia], progress=True), net(tcga[ib], progress=True)
    rng = np.random.default_rng(a.seed)
    n_crops = min(a.n_crops, 8) if a.smoke else a.n_crops
    if crops is not None:
        ca, cb = halves(cpat, a.seed)
        ca = rng.choice(ca, min(n_crops, len(ca)), replace=False)
        cb = rng.choice(cb, min(n_crops, len(cb)), replace=False)
        g_a, g_b = net(crops[ca], progress=True), net(crops[cb], progress=True)
    subsets = 5 if a.smoke else a.kid_subsets

    def kidd(x, y):
        # subsets of half the smaller set: with subsets as large as the sets every subset is the
        # whole set and the std says nothing (the mean stays unbiased either way)
        k = kid(x, y, subsets=subsets, subset_size=min(1000, max(2, min(len(x), len(y)) // 2)), seed=a.seed)
        return k.mean, k.std, k.subset_size

    rows = []
    feats: dict = {}
    floor = {"model": "real vs real (disjoint patients)", "fid_full": fid(f_a, f_b), "n_full": [len(f_a), len(f_b)]}
    floor["kid_full"], floor["kid_full_std"], _ = kidd(f_a, f_b)
    if crops is not None:
        floor["fid_masked"] = fid(g_a, g_b)
        floor["kid_masked"], floor["kid_masked_std"], _ = kidd(g_a, g_b)
        floor["n_masked"] = [len(g_a), len(g_b)]
    names = a.names or [Path(w).name or str(w) for w in a.weights]
    n_gen = 4 if a.smoke else a.n_generated
    for name, w in zip(names, a.weights):
        t1 = time.time()
        model = TSGAN.from_pretrained(w, device=a.device)
        syn = Synthesizer(model, GenerationConfig(seed=a.seed, block=min(a.block, n_gen)))
        from tqdm import tqdm

        with tqdm(total=n_gen, desc=f"{name}: generate", unit="img") as bar:
            b = syn.generate(range(n_gen), progress=bar.update)
        gen = b.images_hu.numpy()
        f_g = net(gen, progress=True)
        feats[f"{name}_full"] = f_g
        row = {"model": name, "weights": str(model.source), "revision": str(model.revision),
               "fid_full": fid(f_g[: len(f_a)], f_b), "n_full": [min(len(f_g), len(f_a)), len(f_b)]}
        row["kid_full"], row["kid_full_std"], _ = kidd(f_g, f_b)
        if crops is not None:
            sp = float((getattr(model, "meta", {}) or {}).get("spacing_mm", MODEL_SPACING) or MODEL_SPACING)
            from nodulesynth.detect.windows import LIDC_MEDIAN_SPACING_MM

            gw = nodule_windows(gen, b.masks.numpy(), sp, LIDC_MEDIAN_SPACING_MM)
            if len(gw) >= 2:
                h_g = net(gw)
                feats[f"{name}_masked"] = h_g
                row["fid_masked"] = fid(h_g[: len(g_a)], g_b)
                row["kid_masked"], row["kid_masked_std"], _ = kidd(h_g, g_b)
                row["n_masked"] = [min(len(h_g), len(g_a)), len(g_b)]
        from nodulesynth.masks.semantic import semantic_mask

        n_paired = 3 if a.smoke else len(tcga)
        tm = np.stack([semantic_mask(h, (MODEL_SPACING, MODEL_SPACING)) for h in tcga[:n_paired]])
        pi = np.concatenate([tcga[:n_paired], les_i]).astype(np.float32)
        pm = np.concatenate([tm, les_m]).astype(np.uint8)
        row.update(paired(model, pi, pm, a.dilate_px, a.block))
        row["seconds"] = round(time.time() - t1, 1)
        rows.append(row)
        print(f"{name}: done in {row['seconds']} s", flush=True)
    rows.append(floor)
    feats["real_full_a"], feats["real_full_b"] = f_a, f_b
    if crops is not None:
        feats["real_masked_a"], feats["real_masked_b"] = g_a, g_b
    np.savez_compressed(out / "features.npz", **{k: v.astype(np.float32) for k, v in feats.items()})  # rescoring without Inception

    def fmt(r, k, d=3):
        v = r.get(k)
        if v is None:
            return "-"
        s = f"{v:.{d}f}"
        return s + (f"±{r[k + '_std']:.{d}f}" if k + "_std" in r else "")

    head = (f"{'model':34} | {'FID':>8} {'KID':>13} {'PSNR':>7} {'PSNR8':>7} {'SSIM':>6} | {'FID':>8} {'KID':>13} "
            f"{'PSNR':>7} {'PSNR8':>7} {'SSIM':>6}")
    lines = [f"{'':34} | {'full image':^54} | {'masked region':^54}", head]
    for r in rows:
        lines.append(f"{r['model'][:34]:34} | {fmt(r, 'fid_full', 2):>8} {fmt(r, 'kid_full', 4):>13} {fmt(r, 'psnr_full', 2):>7} "
                     f"{fmt(r, 'psnr8_full', 2):>7} {fmt(r, 'ssim_full'):>6} | {fmt(r, 'fid_masked', 2):>8} "
                     f"{fmt(r, 'kid_masked', 4):>13} {fmt(r, 'psnr_masked', 2):>7} {fmt(r, 'psnr8_masked', 2):>7} "
                     f"{fmt(r, 'ssim_masked'):>6}")
    text = "\n".join(lines)
    print(text)
    import platform

    doc = {"command": "python " + " ".join(shlex.quote(x) for x in ["benchmarks/realism.py"] + list(argv if argv is not None else sys.argv[1:])),
           "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                        "nodulesynth_git": git_revision()},
           "seed": a.seed, "device": a.device, "smoke": a.smoke, "dilate_px": a.dilate_px, "kid_subsets": subsets,
           "real": {"tcga_slices": len(tcga), "tcga_patients": int(len(np.unique(tpat))), "half_a": len(ia), "half_b": len(ib),
                    "lesion_slices": len(les_i), "lidc_windows_per_half": n_crops if crops is not None else 0},
           "wall_s": round(time.time() - t0, 1), "rows": rows, "table": text}
    write_json(out / "realism.json", doc)
    keys = ["model", "fid_full", "kid_full", "kid_full_std", "psnr_full", "psnr8_full", "ssim_full", "fid_masked",
            "kid_masked", "kid_masked_std", "psnr_masked", "psnr8_masked", "ssim_masked", "psnr_masked_n"]
    with open(out / "realism.csv", "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        wr.writeheader()
        wr.writerows(rows)
    (out / "realism.txt").write_text(text + "\n")
    print(f"wrote {out}/realism.json (.csv, .txt) in {doc['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
