"""Realism on held-out patients, judged against the real-vs-real floor in the same run.

    python benchmarks/heldout_realism.py --prepared prepared --weights pretrained RUN/weights \
        --names shipped retrained --out /tmp/heldout

This is the yardstick for every model change (issue 13): the training corpus is the TRAIN split of
prepared datasets (``nodulesynth prepare`` records a patient-level split per slice); evaluation uses
only their VAL + TEST patients, which no model trained by ``benchmarks/retrain.py`` has seen.

- **KID full slice** (×1000, TF-Inception pool features of the lung window −1000…400 HU, 299²,
  unbiased MMD², cubic kernel): generated slices vs held-out real 512² slices, beside
  KID(train real, held-out real), the floor. Goal: generated ≤ 2 × floor.
- **KID stage 2**: the TRAIN patients' real masks translated, vs held-out real. Same anatomy as the
  floor's train side, so its gap to the floor is the translator's alone (the rest is the masks').
- **KID nodule region**: 64² windows centred on each generated nodule (resampled to LIDC's median
  0.7 mm) vs the central 64² of held-out LIDC nodule crops; floor: train crops vs held-out crops.
  ``nodule_grid.png`` shows 8 of them per model above 8 held-out crops.
- **Paired translation** of the held-out slices' own masks by the translator (its own body and
  background: a scanner background or an atlas body is another scan's, no pixel of it predictable
  from the mask): PSNR / SSIM of the 8-bit lung window (L = 255) and PSNR with MAX = 4095 on
  HU + 1024 (the paper's eq. 12); the same for the row's ``--background``/``--body`` as ``gen_*``.
- **Checkerboard**: median :func:`nodulesynth.metrics.artifacts.checkerboard_score` (spectral
  peaks at periods 2/4/8 px over their neighbourhood, log10; real CT ≈ 0.1).
- **Lung structure**: share of lung pixels above −700 HU (vessels, bronchial walls, fissures),
  generated vs held-out real: an empty, vessel-free lung reads near 0.
- **lung/body**: median lung share of the body in the masks: where along the chest the slices sit.
- **KID lung windows**: 64² windows of lung alone (≥ 97 % lung, ≥ 3 mm from any nodule) of the generated
  slices (resampled to 0.7 mm, as the nodule windows) vs lung-only corners of the held-out LIDC crops;
  floor: the same of the train crops. What the lungs' interior (``--lungs``) draws, without the rest.
- **lung |∇²|**: mean |Laplacian| (HU/px²) of the lung pixels of the nodule windows: the parenchyma's
  fine texture and noise at the crops' resolution, which KID's 299² Inception features barely see
  (a softer lung moves the nodule KID by less than its noise); floor: the held-out crops' own, at
  their native spacing. It reads resolution as well as texture: a slice drawn at 0.8 mm and
  resampled to 0.7 cannot hold what a 0.7-mm scan holds (README, "Fine texture").
Writes OUT/heldout_realism.{json,txt} and OUT/heldout_grid.png (top: generated, bottom: held-out real).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

SLICE_SETS = ("tcga", "pyradiomics", "lidc-sample")
CROP_SET = "lidc-crops"
HELD_OUT = ("val", "test")
VESSEL_HU = -700.0


def _slices(prepared: Path, split) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(HU float32 (N,512,512), masks uint8, patients) of every 512² prepared set's ``split``."""
    from nodulesynth.data.slices import SliceDataset
    from nodulesynth.data.splits import patient_of, split_indices

    ims, mks, pats = [], [], []
    for name in SLICE_SETS:
        if not (prepared / name / "index.json").is_file():
            continue
        ds = SliceDataset(prepared / name)
        idx = split_indices(ds, split)
        ims.append(np.asarray(ds.images[idx], np.float32))
        mks.append(np.asarray(ds.masks[idx]))
        pats += [f"{name}:{patient_of(ds.records[i])}" for i in idx]
    if not ims:
        raise SystemExit(f"--prepared {prepared}: none of {', '.join(SLICE_SETS)} is a prepared dataset")
    return np.concatenate(ims), np.concatenate(mks), pats


@functools.lru_cache(maxsize=None)
def _crop_set(prepared: Path):
    """The prepared LIDC crops (opened once for every crop-window function), or None."""
    from nodulesynth.data.slices import SliceDataset

    return SliceDataset(prepared / CROP_SET) if (prepared / CROP_SET / "index.json").is_file() else None


def _crop_windows(prepared: Path, split, n: int, seed: int, size: int = 64) -> np.ndarray | None:
    """Central size² HU of up to ``n`` nodule crops of ``split`` (one per nodule: its middle crop)."""
    from nodulesynth.data.splits import split_indices

    ds = _crop_set(prepared)
    if ds is None:
        return None
    idx = split_indices(ds, split)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(idx, min(n, len(idx)), replace=False))
    o = (ds.images.shape[1] - size) // 2
    return np.asarray(ds.images[idx][:, o : o + size, o : o + size], np.float32)


def _crop_lung_windows(prepared: Path, split, n: int, seed: int, size: int = 64) -> np.ndarray | None:
    """Up to ``n`` size² lung-only windows (a corner of a crop, ≥ 97 % lung and ≥ 4 px from its nodule;
    at most one per crop) of the ``split`` patients' LIDC nodule crops, at their native spacing."""
    from scipy import ndimage as ndi

    from nodulesynth.data.splits import split_indices

    ds = _crop_set(prepared)
    if ds is None:
        return None
    out = []
    for i in np.random.default_rng(seed).permutation(split_indices(ds, split)):
        m = np.asarray(ds.masks[i])
        lung = np.isin(m, (2, 3)) & ~ndi.binary_dilation(m == 5, iterations=4)
        e = m.shape[0] - size
        for y, x in ((0, 0), (0, e), (e, 0), (e, e)):
            if lung[y:y + size, x:x + size].mean() >= 0.97:
                out.append(np.asarray(ds.images[i][y:y + size, x:x + size], np.float32))
                break
        if len(out) >= n:
            break
    return np.stack(out) if out else None


def _crop_patients(prepared: Path, split) -> list[str]:
    """The ``split`` patients of the LIDC crops (what the shipped lung library must not hold)."""
    from nodulesynth.data.splits import patient_of, split_indices

    ds = _crop_set(prepared)
    if ds is None:
        return []
    return sorted({f"{CROP_SET}:{patient_of(ds.records[i])}" for i in split_indices(ds, split)})


def lung_windows(images_hu, masks, spacing: float, n: int, seed: int, size: int = 64) -> np.ndarray:
    """Up to ``n`` size² windows of slices at ``spacing`` mm (generated ones already resampled to the
    crops' spacing) that are ≥ 97 % lung and keep ≥ 3 mm from every nodule, on a size/2 grid, drawn at
    random."""
    from scipy import ndimage as ndi

    out = []
    for h, m in zip(images_hu, masks):
        lung = np.isin(m, (2, 3)) & ~ndi.binary_dilation(m == 5, iterations=max(1, round(3.0 / spacing)))
        for y in range(0, m.shape[0] - size + 1, size // 2):
            for x in range(0, m.shape[1] - size + 1, size // 2):
                if lung[y:y + size, x:x + size].mean() >= 0.97:
                    out.append(h[y:y + size, x:x + size])
    if not out:
        return np.zeros((0, size, size), np.float32)
    pick = np.sort(np.random.default_rng(seed).permutation(len(out))[:n])
    return np.stack([out[k] for k in pick]).astype(np.float32)


def lung_structure_share(hu: np.ndarray, masks: np.ndarray) -> float:
    """Share of lung pixels (classes 2, 3) above −700 HU."""
    lung = np.isin(masks, (2, 3))
    return float((hu[lung] > VESSEL_HU).mean()) if lung.any() else float("nan")


def lung_fine_texture(windows: np.ndarray) -> float:
    """Mean |Laplacian| (HU per px²) over the lung pixels (7×7 mean below −600 HU) of HU windows."""
    from scipy import ndimage as ndi

    w = np.asarray(windows, np.float32)
    if not len(w):
        return float("nan")
    lung = ndi.uniform_filter(w, (1, 7, 7)) < -600
    lap = np.abs(np.stack([ndi.laplace(x, mode="nearest") for x in w]))
    return round(float(lap[lung].mean()), 1) if lung.any() else float("nan")


def lung_of_body(masks: np.ndarray) -> float:
    """Median over slices of lung pixels / body pixels (classes 1–5): where along the chest the
    anatomy sits (apex and base ≈ 0.05, mid-thorax ≈ 0.4). The masks' share of the KID gap shows here."""
    body = (masks > 0).sum((1, 2))
    lung = np.isin(masks, (2, 3)).sum((1, 2))
    return round(float(np.median(lung / np.maximum(body, 1))), 3)


def main(argv=None) -> int:
    from nodulesynth.synth.lung_library import MODES as LUNG_MODES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prepared", type=Path, default=Path("prepared"))
    p.add_argument("--weights", nargs="+", default=["pretrained"])
    p.add_argument("--names", nargs="+")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n-generated", type=int, default=64)
    p.add_argument("--n-crops", type=int, default=200, help="nodule windows per side (train / held-out)")
    p.add_argument("--subsets", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block", type=int, default=8)
    p.add_argument("--background", nargs="+", default=["scanner"], choices=("scanner", "translator"),
                   help="generate's --background; several: one row per weights and background")
    p.add_argument("--body", nargs="+", default=["atlas"], choices=("atlas", "translator"),
                   help="generate's --body; several: one row per weights, background and body")
    p.add_argument("--lungs", nargs="+", default=None, choices=LUNG_MODES,
                   help="generate's --lungs (default: generate's default); several: one row each")
    p.add_argument("--atlas", nargs="*", action="append", metavar="KEY=VALUE",
                   help="synth.atlas.AtlasConfig fields for the atlas rows, e.g. grid=12 smooth=0.05 (default: shipped); "
                        "repeat the flag for one row per setting (a bare --atlas: the shipped one)")
    p.add_argument("--psi", type=float, default=None, help="truncation ψ of the mask StyleGAN (default: generate's)")
    a = p.parse_args(argv)
    from realism import nodule_windows, paired  # same helpers as the Table-1 benchmark

    from nodulesynth.detect.windows import LIDC_MEDIAN_SPACING_MM, resample_slice
    from nodulesynth.metrics.artifacts import checkerboard_score
    from nodulesynth.metrics.kid import InceptionFeatures, kid
    from nodulesynth.models.tsgan import TSGAN
    from nodulesynth.synth.atlas import AtlasConfig, BodyAtlas
    from nodulesynth.synth.pipeline import GenerationConfig, Synthesizer
    from nodulesynth.viz import preview_grid

    types = {f.name: f.type for f in dataclasses.fields(AtlasConfig)}
    atlas_configs = []
    for items in a.atlas or [[]]:
        try:
            kv = dict(x.split("=", 1) for x in items)
            atlas_configs.append((" ".join(items), AtlasConfig(**{k: (int if types[k] == "int" else float)(v) for k, v in kv.items()})))
        except (ValueError, KeyError) as e:
            raise SystemExit(f"--atlas {' '.join(items)}: expected KEY=VALUE with keys of AtlasConfig ({e})")

    t0 = time.time()
    a.out.mkdir(parents=True, exist_ok=True)
    names = a.names or [Path(w).name for w in a.weights]
    net = InceptionFeatures("cpu")
    tr_i, tr_m, tr_p = _slices(a.prepared, "train")
    ho_i, ho_m, ho_p = _slices(a.prepared, list(HELD_OUT))
    leak = set(tr_p) & set(ho_p)
    if leak:
        raise SystemExit(f"patients on both sides of the split: {sorted(leak)[:5]}")
    print(f"real 512² slices: train {len(tr_i)} ({len(set(tr_p))} patients), held-out {len(ho_i)} "
          f"({len(set(ho_p))} patients)", flush=True)

    def k1000(x, y):
        r = kid(x, y, subsets=a.subsets, subset_size=max(2, min(len(x), len(y)) // 2), seed=a.seed)
        return round(r.mean * 1000, 2), round(r.std * 1000, 2)

    f_tr, f_ho = net(tr_i), net(ho_i)
    floor = {"model": "real train vs held-out (floor)", "kid_full": k1000(f_tr, f_ho),
             "checkerboard": round(float(checkerboard_score(torch.from_numpy(ho_i)).median()), 3),
             "lung_share": round(lung_structure_share(ho_i, ho_m), 4), "lung_of_body": lung_of_body(ho_m)}
    c_tr, c_ho = _crop_windows(a.prepared, "train", a.n_crops, a.seed), _crop_windows(a.prepared, list(HELD_OUT), a.n_crops, a.seed)
    g_ho = None
    if c_tr is not None and len(c_ho) >= 2:
        g_tr, g_ho = net(c_tr), net(c_ho)
        floor["kid_nodule"] = k1000(g_tr, g_ho)
        floor["lung_lap"] = lung_fine_texture(c_ho)
    l_tr, l_ho = (_crop_lung_windows(a.prepared, s, a.n_crops, a.seed) for s in ("train", list(HELD_OUT)))
    lw_ho = None
    if l_tr is not None and l_ho is not None and len(l_ho) >= 2:
        lw_ho = net(l_ho)
        floor["kid_lung"] = k1000(net(l_tr), lw_ho)
    rows, grid, nodule_rows, lung_rows = [], None, [], []
    translation: dict[str, dict] = {}  # weights → paired scores of its own translation (same for every row)
    lungs = a.lungs or [GenerationConfig.lungs]
    runs = [(", ".join([n] + ([f"{bg} bg"] if len(a.background) > 1 else []) + ([f"{bd} body"] if len(a.body) > 1 else [])
                       + ([f"atlas {ak or 'shipped'}"] if bd == "atlas" and len(atlas_configs) > 1 else [])
                       + ([f"{lg} lungs"] if len(lungs) > 1 else [])), w, bg, bd, ac, lg)
            for n, w in zip(names, a.weights) for bg in a.background for bd in a.body
            for ak, ac in (atlas_configs if bd == "atlas" else atlas_configs[:1]) for lg in lungs]
    for name, w, background, body, atlas_config, lung_mode in runs:
        t1 = time.time()
        model = TSGAN.from_pretrained(w, device="cpu")
        psi = {} if a.psi is None else {"truncation_psi": a.psi}
        syn = Synthesizer(model, GenerationConfig(seed=a.seed, block=a.block, background=background, body=body,
                                                  lungs=lung_mode, **psi))
        if syn.atlas is not None and atlas_config != syn.atlas.config:
            syn.atlas = BodyAtlas(config=atlas_config)
        b = syn.generate(range(a.n_generated))
        gen, gm = b.images_hu.numpy(), b.masks.numpy()
        row = {"model": name, "weights": str(model.source), "revision": str(model.revision), "background": background,
               "body": body, "lungs": lung_mode, **({"atlas": dataclasses.asdict(syn.atlas.config)} if syn.atlas is not None else {}),
               "kid_full": k1000(net(gen), f_ho), "lung_share": round(lung_structure_share(gen, gm), 4),
               "lung_of_body": lung_of_body(gm),
               "checkerboard": round(float(checkerboard_score(b.images_hu).median()), 3)}
        # both window kinds are cut at the crops' spacing: each generated slice is resampled once
        sp = float(model.meta.get("spacing_mm") or 0.8)
        at_crops = [resample_slice(h, m, sp, LIDC_MEDIAN_SPACING_MM) for h, m in zip(gen, gm)] \
            if g_ho is not None or lw_ho is not None else []
        ch, cm = [h for h, _ in at_crops], [m for _, m in at_crops]
        if g_ho is not None:
            gw = nodule_windows(ch, cm, LIDC_MEDIAN_SPACING_MM, LIDC_MEDIAN_SPACING_MM)
            if len(gw) >= 2:
                row["kid_nodule"] = k1000(net(gw), g_ho)
                row["lung_lap"] = lung_fine_texture(gw)
            nodule_rows.append((name, gw[:8]))
        if lw_ho is not None:
            lw = lung_windows(ch, cm, LIDC_MEDIAN_SPACING_MM, a.n_crops, a.seed)
            if len(lw) >= 2:
                row["kid_lung"] = k1000(net(lw), lw_ho)
                lung_rows.append((name, lw[:8]))
        # Stage 2 alone: the train patients' real masks translated, against held-out real — the same
        # anatomy as the floor's train side, so the gap to the floor is the translator's texture.
        # With the atlas, a train mask must not take its own patient's body (the atlas holds the TRAIN
        # patients): translated with the translator's body, then each its atlas body from another patient
        # (the atlas touches only class 1, which no later stage changes, so the order is the pipeline's).
        if body == "atlas":
            t2 = Synthesizer(model, GenerationConfig(seed=a.seed, block=a.block, background=background, body="translator",
                                                     lungs=lung_mode))
            hu2 = syn.atlas.apply(t2.translate(tr_m).images_hu, torch.from_numpy(tr_m), list(range(len(tr_m))), syn.spacing_mm, avoid=tr_p)[0]
        else:
            hu2 = syn.translate(tr_m).images_hu
        row["kid_stage2"] = k1000(net(hu2.numpy()), f_ho)
        # Paired translation is the translator's own output (issue 13's SSIM/PSNR goal): a scanner
        # background or an atlas body is another scan's pixels, unpredictable from the mask. The same
        # scores for the row's setting (what `generate` writes) are kept beside, prefixed "gen_".
        if w not in translation:
            translation[w] = paired(model, ho_i, ho_m, 8, a.block)
        tr = translation[w]
        row.update({k: round(v, 4) if isinstance(v, float) else v for k, v in tr.items()})
        if (background, body, lung_mode) != ("translator", "translator", "texture"):
            gen_scores = paired(model, ho_i, ho_m, 8, a.block, background, body, lung_mode)
            row.update({f"gen_{k}": round(gen_scores[k], 4) for k in ("psnr8_full", "ssim_full", "psnr_full")})
        row["kid_ratio"] = round(row["kid_full"][0] / max(floor["kid_full"][0], 1e-9), 2)
        row["seconds"] = round(time.time() - t1, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if grid is None or name == runs[-1][0]:
            grid = (gen[:6], gm[:6], [bx for bx in b.boxes[:6]])
    rows.append(floor)
    lines = [f"{'model':32} {'KID×1000 full':>15} {'ratio':>6} {'KID×1000 stage 2':>16} {'KID×1000 nodule':>16} {'SSIM':>6} {'PSNR8':>6} "
             f"{'PSNR4095':>8} {'gen SSIM':>8} {'gen PSNR8':>9} {'lung>-700HU':>11} {'grid':>5} {'lung/body':>9} {'lung |∇²|':>9} "
             f"{'KID×1000 lung':>14}"]
    for r in rows:
        kf, kn = r["kid_full"], r.get("kid_nodule")
        k2, kl = r.get("kid_stage2"), r.get("kid_lung")
        lines.append(f"{r['model'][:32]:32} {kf[0]:>8.1f}±{kf[1]:<6.1f} {r.get('kid_ratio', ''):>6} "
                     f"{(f'{k2[0]:.1f}±{k2[1]:.1f}' if k2 else '-'):>16} "
                     f"{(f'{kn[0]:.1f}±{kn[1]:.1f}' if kn else '-'):>16} {r.get('ssim_full', '-'):>6} "
                     f"{r.get('psnr8_full', '-'):>6} {r.get('psnr_full', '-'):>8} {r.get('gen_ssim_full', '-'):>8} "
                     f"{r.get('gen_psnr8_full', '-'):>9} {r['lung_share']:>11} {r['checkerboard']:>5} "
                     f"{r['lung_of_body']:>9} {r.get('lung_lap', '-'):>9} "
                     f"{(f'{kl[0]:.1f}±{kl[1]:.1f}' if kl else '-'):>14}")
    text = "\n".join(lines)
    print(text)
    doc = {"command": " ".join(sys.argv), "n_generated": a.n_generated, "held_out_splits": HELD_OUT,
           "n_train_slices": len(tr_i), "n_heldout_slices": len(ho_i), "heldout_patients": sorted(set(ho_p)),
           "heldout_crop_patients": _crop_patients(a.prepared, list(HELD_OUT)),
           "rows": rows, "seconds": round(time.time() - t0, 1)}
    (a.out / "heldout_realism.json").write_text(json.dumps(doc, indent=2), encoding="utf-8")
    (a.out / "heldout_realism.txt").write_text(text + "\n", encoding="utf-8")
    gi, gmk, gb = grid
    preview_grid(a.out / "heldout_grid.png", [*gi, *ho_i[:6]], [*gmk, *ho_m[:6]],
                 [*gb, *[np.zeros((0, 4), np.float32)] * min(6, len(ho_i))], columns=6, tile=192)
    if nodule_rows and c_ho is not None:  # one row of nodule windows per model, then held-out real crops
        cells = [w for _, ws in nodule_rows for w in [*ws, *[np.full_like(c_ho[0], -1024)] * (8 - len(ws))]]
        preview_grid(a.out / "nodule_grid.png", [*cells, *c_ho[:8]], columns=8, tile=128)
        print("nodule_grid.png rows: " + ", ".join(n for n, _ in nodule_rows) + ", held-out real crops", flush=True)
    if lung_rows and l_ho is not None:  # one row of lung windows per model, then held-out real lung windows
        cells = [w for _, ws in lung_rows for w in [*ws, *[np.full_like(l_ho[0], -1024)] * (8 - len(ws))]]
        preview_grid(a.out / "lung_grid.png", [*cells, *l_ho[:8]], columns=8, tile=128)
        print("lung_grid.png rows: " + ", ".join(n for n, _ in lung_rows) + ", held-out real lung windows", flush=True)
    return 0


if __name__ == "__main__":
    from nodulesynth.runtime import keep_heap

    keep_heap()  # the process is ours: reuse freed 512² buffers (README "Performance", "Heap")
    raise SystemExit(main())
