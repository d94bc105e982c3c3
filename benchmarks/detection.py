"""Does it help a detector? Real-only vs real + N synthetic, YOLO from scratch, folds by patient.

    # real LIDC nodules (768 patients), windows with the nodule at a random position + negatives
    python benchmarks/detection.py --protocol patches --out /tmp/det-patches
    # prepared 512² slice datasets (LUNA16 / LIDC / phantom), the paper's protocol, + FROC/CPM
    python benchmarks/detection.py --protocol slices --data PREPARED [PREPARED ...] --out /tmp/det-slices
    # a few-second end-to-end run (the test suite runs this)
    python benchmarks/detection.py --protocol patches --smoke --out /tmp/det-smoke

Arms (per detector, per fold): ``real`` (N = 0), ``real+N`` for each N in ``--n-synth``, all with
the same epochs (as the paper), and ``real (equal steps)``: real only, trained for as many
optimiser steps as the largest mixed arm (nbs = batch, so one batch = one step), so that a gain
cannot come from longer training alone. Folds are by patient; test sets are real only; metrics
are ultralytics' P, R, mAP50, mAP50-95 of the last epoch's weights (no selection on the test
fold), mean ± std over folds, in the paper's Table 3 layout. ``--eval`` scores every model on an
external real set too. Writes results.json (command, versions, seeds, per-fold rows), results.csv
and map_vs_n.png under --out; the synthetic windows/slices are cached under --out/work.

Synthetic data: ``--weights`` (default: the shipped ``pretrained``) through the Synthesizer, seed
``--seed``; in `patches` each generated slice is resampled to the crops' pixel spacing
(``--patch-spacing-mm``, default LIDC's median 0.7 mm) and cut into windows exactly like the real
crops (one positive per nodule, one negative from lung away from any nodule). N counts generated
slices (real counts crops), so each arm adds about N positive and N negative windows.

``--synth-source inserted --insert-into PREPARED...`` adds (or, alone, replaces the generated arm with)
``real+N inserted``: N real TRAIN slices of other datasets with LIDC nodules inserted by
``Synthesizer.add_nodules_to_real``, cut into windows the same way. It asks which part of the
synthetic slice helps a detector: the generated nodule in real lung, or the whole generated slice.
``--synth-source crops backgrounds --insert-into`` a ``prepare --lidc-crops`` set: ``real+N crops`` takes
N TRAIN crops of N patients, each with one inserted nodule (benchmarks/insert_crops.py: only its pixels
changed, native spacing kept); ``real+N backgrounds`` the very same windows without the nodule (all
negatives), so crops against backgrounds is what the nodules add beyond more real lung of more
patients. Those patients must be outside the test folds (``--test-unseen-by`` the same set).

``--synth-use`` says how the synthetic windows are used: ``mix`` (the paper's, default) adds them to the
real training set; ``pretrain`` adds ``real+N pretrain``: the detector first trains on the N synthetic
slices' windows alone, then from those weights on the real ones, each for the arm's epochs, so its
optimiser steps equal the mixed arm's and the control's. It is paired against the mixed arm too.
"""
from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from nodulesynth.errors import NoduleSynthError

FULL = dict(folds=5, epochs=30, n_synth=[0, 500, 1000, 2000], detectors=["yolov8n", "yolov5nu"], imgsz_patches=64,
            imgsz_slices=512, batch=32)
SMOKE = dict(folds=2, run_folds=1, epochs=1, n_synth=[0, 4], detectors=["yolov8n"], max_patients=6, imgsz_patches=64,
             imgsz_slices=64, batch=8)


# ----------------------------------------------------------------------------------------------- data
def train_patients(prepared: str) -> set[int]:
    """LIDC patient numbers in the TRAIN split of a prepared crops dataset (what its models learnt from)."""
    p = Path(prepared) / "index.json"
    try:
        recs = json.loads(p.read_text(encoding="utf-8"))["records"]
        seen = {int(str(r["patient"]).rsplit("-", 1)[-1]) for r in recs if r.get("split") == "train"}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise NoduleSynthError(f"--test-unseen-by {prepared}: not a prepared crops dataset with patient splits ({e})") from e
    if not seen:
        raise NoduleSynthError(f"--test-unseen-by {prepared}: no TRAIN patients recorded")
    return seen


def fold_patients(groups: np.ndarray, folds: int, seed: int, seen: set[int] | None = None) -> list[np.ndarray]:
    """Patient folds; with ``seen`` (patients a generator learnt from) they split only the others, so
    every test patient is one the synthetic data's models never saw, and the seen ones always train."""
    from nodulesynth.detect.windows import patient_folds

    if seen is None:
        return patient_folds(groups, folds, seed=seed)
    return patient_folds(groups[~np.isin(groups, list(seen))], folds, seed=seed)


def subsample_patients(idx: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The entries of ``idx`` whose patient is in a random ``fraction`` of the patients ``idx`` holds (at
    least one): a fold's real training set made scarce, as when a site has few annotated scans. Drawn by
    ``seed`` alone, so every arm of a fold trains on the same patients."""
    if fraction >= 1:
        return idx
    pats = np.unique(groups[idx])
    keep = np.random.default_rng(seed).choice(pats, max(1, int(round(len(pats) * fraction))), replace=False)
    return idx[np.isin(groups[idx], keep)]


def load_crops(path: str, max_patients: int | None, seed: int, first: set[int] | None = None):
    """The shared crops npz (images, reader_masks, patient) → arrays, optionally a random subset of
    ``max_patients`` patients that takes those in ``first`` before any other."""
    p = Path(path)
    if not p.is_file():
        raise NoduleSynthError(f"--crops {p}: no such file (the lidc-nodule-crops npz)")
    try:
        with np.load(p, allow_pickle=False) as d:
            missing = {"images", "reader_masks", "patient"} - set(d.files)
            if missing:
                raise NoduleSynthError(f"--crops {p}: not a crops npz (missing {sorted(missing)})")
            images, masks, patient = d["images"], d["reader_masks"], d["patient"].astype(np.int64)
    except (ValueError, OSError) as e:
        raise NoduleSynthError(f"--crops {p}: unreadable npz ({e})") from e
    if images.ndim != 3 or images.shape != masks.shape or len(patient) != len(images) or images.dtype != np.uint8:
        raise NoduleSynthError(f"--crops {p}: expected uint8 images and reader_masks (N,H,W) and patient (N,)")
    if max_patients:
        pats = np.random.default_rng(seed).permutation(np.unique(patient))
        if first is not None:
            pats = np.concatenate([pats[np.isin(pats, list(first))], pats[~np.isin(pats, list(first))]])
        pats = pats[:max_patients]
        keep = np.isin(patient, pats)
        images, masks, patient = images[keep], masks[keep], patient[keep]
    return images, masks, patient


def group_of(rec) -> str:
    """Patient of a prepared slice record (``patient`` when the record has it, else its series)."""
    return str(getattr(rec, "patient", "") or rec.series_uid)


def load_slices(paths: list[str]):
    """Prepared slice datasets → (images HU (N,H,W) int16, masks, boxes, groups, series, slice index, spacing)."""
    from nodulesynth.data.slices import SliceDataset, require_labelled

    ims, mks, boxes, groups, series, sidx, sp = [], [], [], [], [], [], []
    shape = None
    for p in paths:
        ds = require_labelled(SliceDataset(p), "--data")
        if shape is None:
            shape = ds.images.shape[1:]
        elif ds.images.shape[1:] != shape:
            raise NoduleSynthError(f"--data {p}: slice size {ds.images.shape[1:]} differs from {shape}")
        ims.append(np.asarray(ds.images))
        mks.append(np.asarray(ds.masks))
        for r in ds.records:
            boxes.append(np.asarray(r.boxes, np.float32).reshape(-1, 4))
            groups.append(f"{p}:{group_of(r)}")
            series.append(f"{p}:{r.series_uid}")
            sidx.append(int(r.slice_index))
            sp.append(float(r.spacing_mm[0]))
    return (np.concatenate(ims), np.concatenate(mks), boxes, np.asarray(groups), np.asarray(series),
            np.asarray(sidx), float(np.median(sp)))


def cached_slices(f: Path, n: int, chunk: int, desc: str, make) -> tuple[np.ndarray, np.ndarray, bool]:
    """The first n slices of the cache file ``f`` (HU float16, masks), made ``chunk`` at a time by
    ``make(start, end, progress_bar)`` → SyntheticBatch where the file holds fewer; each chunk is
    saved atomically, so a killed run resumes from the last whole one. Returns (HU, masks, made any)."""
    have_h, have_m = np.zeros((0, 512, 512), np.float16), np.zeros((0, 512, 512), np.uint8)
    if f.is_file():
        with np.load(f, allow_pickle=False) as d:
            have_h, have_m = d["images"], d["masks"]
    made = len(have_h) < n
    if made:
        from tqdm import tqdm

        with tqdm(total=n - len(have_h), desc=desc, unit="img") as bar:
            for s in range(len(have_h), n, chunk):
                b = make(s, min(n, s + chunk), bar)
                have_h = np.concatenate([have_h, b.images_hu.numpy().astype(np.float16)])
                have_m = np.concatenate([have_m, b.masks.numpy()])
                f.parent.mkdir(parents=True, exist_ok=True)
                tmp = f.with_suffix(".tmp.npz")
                np.savez(tmp, images=have_h, masks=have_m)
                tmp.replace(f)
    return have_h, have_m, made


def synthesize(weights: str, n: int, seed: int, cache: Path, device: str, lungs: str | None = None,
               min_readers: int | None = None):
    """n generated 512² slices (HU float16, masks) from ``weights``, cached by (weights, revision, seed,
    ``lungs`` when it is not "texture", what every cache before ``--lungs`` holds, and ``min_readers``
    when set)."""
    from nodulesynth.models.tsgan import TSGAN
    from nodulesynth.synth.pipeline import GenerationConfig, Synthesizer

    model = TSGAN.from_pretrained(weights, device=device)
    lungs = lungs or GenerationConfig.lungs
    key = f"{Path(str(model.source)).name}-{model.revision}-seed{seed}-block{min(16, n)}"
    key += "" if lungs == "texture" else f"-lungs-{lungs}"
    key += "" if min_readers is None else f"-readers{min_readers}"
    # block (the fixed forward-pass shape, part of the reproducibility key) ≤ n: no padded compute
    syn = Synthesizer(model, GenerationConfig(seed=seed, block=min(16, n), lungs=lungs, min_readers=min_readers))
    have_h, have_m, made = cached_slices(cache / f"synthetic-{key}.npz", n, 32, "synthetic slices",
                                         lambda s, e, bar: syn.generate(range(s, e), progress=bar.update))
    prov = {"gate": syn.stats.summary()} if made else {}
    meta = {"weights": str(model.source), "revision": str(model.revision), "seed": seed, "lungs": lungs,
            "min_readers": min_readers, "block": min(16, n),
            "spacing_mm": float(getattr(model, "meta", {}).get("spacing_mm", 0.8) or 0.8), **prov}
    return have_h[:n].astype(np.float32), have_m[:n], meta


def load_backgrounds(prepared: list[str]) -> dict:
    """The slices nodules are inserted into: the TRAIN slices without a nodule of labelled prepared sets
    (every positive is then an inserted one and every negative a true one; a slice of an unlabelled
    source, e.g. TCGA, may hold a tumour nobody outlined, so such sets are refused); or, for one
    ``prepare --lidc-crops`` set, its TRAIN crops (:mod:`insert_crops`)."""
    from insert_crops import load_crop_backgrounds

    from nodulesynth.data.slices import SliceDataset, require_labelled
    from nodulesynth.masks.classes import MaskClass

    sets = [require_labelled(SliceDataset(p), "--insert-into") for p in prepared]
    if any(ds.meta.get("source") == "lidc-crops" for ds in sets):
        if len(prepared) > 1:
            raise NoduleSynthError(f"--insert-into {' '.join(prepared)}: a crops set (prepare --lidc-crops) goes alone")
        return load_crop_backgrounds(sets[0])
    bg = {"kind": "slices", "images": [], "masks": [], "names": [], "spacing": set(), "patients": set(), "into": list(prepared)}
    for p, ds in zip(prepared, sets):
        for i, r in enumerate(ds.records):
            m = np.asarray(ds.masks[i]) if r.split == "train" else None
            if m is not None and not (m == MaskClass.NODULE).any():
                bg["images"].append(np.asarray(ds.images[i]))
                bg["masks"].append(m)
                bg["names"].append(f"{Path(p).name}:{r.series_uid}:{r.slice_index}")
                bg["spacing"].add(round(float(r.spacing_mm[0]), 3))
                bg["patients"].add(f"{p}:{group_of(r)}")
    if not bg["images"]:
        raise NoduleSynthError(f"--insert-into {' '.join(prepared)}: no TRAIN slice without a nodule to insert into")
    if len(bg["spacing"]) != 1 or bg["images"][0].shape != (512, 512):
        raise NoduleSynthError(f"--insert-into: need 512² slices of one pixel spacing (have {sorted(bg['spacing'])} mm, "
                               f"{bg['images'][0].shape}); `nodulesynth prepare` writes 512² at 0.8 mm by default")
    return bg


def insert_nodules(weights: str, bg: dict, n: int, seed: int, cache: Path, device: str):
    """n real slices with LIDC nodules inserted (``Synthesizer.add_nodules_to_real``: real lungs, real
    noise, only the new nodules and their rim drawn): copy i is background i mod M
    (:func:`load_backgrounds`), named "insert<i>" so every copy draws its own nodules and places.
    Cached like :func:`synthesize`."""
    import zlib

    from nodulesynth.models.tsgan import TSGAN
    from nodulesynth.synth.pipeline import GenerationConfig, Synthesizer

    bg_h, bg_m, names = bg["images"], bg["masks"], bg["names"]
    model = TSGAN.from_pretrained(weights, device=device)
    block = 16  # the chunk given to add_nodules_to_real at once: part of the reproducibility key
    key = f"{zlib.crc32(chr(0).join(names).encode()):08x}"
    syn = Synthesizer(model, GenerationConfig(seed=seed, block=block))

    def insert(s: int, e: int, bar):
        j = [i % len(bg_h) for i in range(s, e)]
        out = syn.add_nodules_to_real(np.stack([bg_h[k] for k in j]), np.stack([bg_m[k] for k in j]),
                                      [f"insert{i}" for i in range(s, e)])
        bar.update(e - s)
        return out

    have_h, have_m, _ = cached_slices(
        cache / f"inserted-{Path(str(model.source)).name}-{model.revision}-seed{seed}-block{block}-{key}.npz",
        n, block, "real slices + inserted nodules", insert)
    meta = {"weights": str(model.source), "revision": str(model.revision), "seed": seed, "block": block,
            "spacing_mm": next(iter(bg["spacing"])), "into": bg["into"], "backgrounds": len(bg_h),
            "background_patients": len(bg["patients"])}
    return have_h[:n].astype(np.float32), have_m[:n], meta


SOURCES = ("generated", "inserted", "crops", "backgrounds")
CROP_SOURCES = ("crops", "backgrounds")  # from a crops set (insert_crops), made together
POOL_PREFIX = {"generated": "synthetic", "inserted": "inserted", "crops": "crop-inserted",
               "backgrounds": "crop-background"}  # file names in the shared image pool


USES = ("mix", "pretrain")  # synthetic windows added to the real ones, or trained on first (--synth-use)


def arm_name(source: str, n: int, use: str = "mix") -> str:
    """``real+N`` for N generated slices (the paper's arm), ``real+N inserted`` for N real slices with inserted
    nodules, ``real+N crops`` for N real crops with one each, ``real+N backgrounds`` for those crops without;
    `` pretrain`` appended when the detector trains on them first and on the real ones after."""
    return f"real+{n}" + ("" if source == "generated" else f" {source}") + ("" if use == "mix" else f" {use}")


def make_source(a, source: str, n: int, cache: Path, backgrounds: dict | None):
    """The n slices of one synthetic source: generated whole slices, or real slices with inserted nodules."""
    if source == "generated":
        return synthesize(a.weights, n, a.seed, cache, a.device, a.lungs, a.min_readers)
    return insert_nodules(a.weights, backgrounds, n, a.seed, cache, a.device)


def fit_slices(images, masks, spacing, target_spacing, shape):
    """Generated slices → the real set's spacing and size (resample, then centre crop / pad with air)."""
    from nodulesynth.detect.windows import resample_slice
    from nodulesynth.masks.boxes import mask_to_boxes

    H, W = shape
    oi, om, ob = [], [], []
    for h, m in zip(images, masks):
        h, m = resample_slice(h, m, spacing, target_spacing)
        ph, pw = max(0, H - h.shape[0]), max(0, W - h.shape[1])
        h = np.pad(h, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)), constant_values=-1024)
        m = np.pad(m, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)))
        y0, x0 = (h.shape[0] - H) // 2, (h.shape[1] - W) // 2
        h, m = h[y0 : y0 + H, x0 : x0 + W], m[y0 : y0 + H, x0 : x0 + W]
        oi.append(h)
        om.append(m)
        ob.append(mask_to_boxes(m))
    return np.stack(oi), np.stack(om), ob


# ----------------------------------------------------------------------------------------------- runs
def summarise(rows: list[dict]) -> list[dict]:
    """Mean ± std over folds per detector and arm. The control's epochs are rounded per fold (its
    steps follow each fold's size), so one arm may span two epoch counts: shown as a range."""
    keys = ("precision", "recall", "map50", "map50_95", "cpm")
    out: dict = {}
    for r in rows:
        if r["test"] != "fold":
            continue
        out.setdefault((r["detector"], r["arm"], r["n_synth"]), []).append(r)
    table = []
    for (det, arm, n), rs in out.items():
        eps = sorted({r["epochs"] for r in rs})
        row = {"detector": det, "arm": arm, "n_synth": n, "epochs": eps[0] if len(eps) == 1 else f"{eps[0]}-{eps[-1]}",
               "folds": len(rs)}
        for k in keys:
            v = [r[k] for r in rs if r.get(k) is not None]
            if v:
                row[k], row[k + "_std"] = float(np.mean(v)), float(np.std(v))
        table.append(row)
    return table


def paired(rows: list[dict], key: str = "map50_95") -> list[dict]:
    """Each mixed arm against real only and against the equal-steps control, paired over the folds
    both ran: mean difference ± its standard error, and in how many folds the mixed arm is ahead.
    Folds differ far more than arms do, so the paired difference is what says whether N helps."""
    by = {}
    for r in rows:
        if r["test"] == "fold" and r.get(key) is not None:
            by.setdefault((r["detector"], r["arm"]), {})[r["fold"]] = r[key]
    out = []
    for (det, arm), v in by.items():
        if not arm.startswith("real+"):
            continue
        refs = ["real", *(a for d, a in by if d == det and a.startswith("real (equal"))]
        mixed = arm.removesuffix(" pretrain")
        if " " in arm:  # real+N inserted / crops / backgrounds / pretrain: also against the generated real+N
            refs.append(arm.split(" ")[0])
        if mixed != arm:  # pretraining on a source against mixing it in
            refs.append(mixed)
        if mixed.endswith(" crops"):  # and the nodules against the same lungs without them
            refs.append(mixed.replace(" crops", " backgrounds") + arm[len(mixed):])
        if arm.endswith(")") and " (" in arm:  # renamed by --arm-suffix: against the arm of the other run
            refs.append(arm[: arm.rindex(" (")])
        refs = list(dict.fromkeys(refs))
        for ref in refs:
            w = by.get((det, ref), {})
            folds = sorted(set(v) & set(w))
            if len(folds) < 2:
                continue
            d = [v[f] - w[f] for f in folds]
            out.append({"detector": det, "arm": arm, "against": ref, "metric": key, **diff_stats(d),
                        "per_fold": [round(float(x), 4) for x in d]})
    return out


def diff_stats(d) -> dict:
    """Paired differences (≥ 2) → folds, mean, its standard error, and how many are > 0."""
    d = np.asarray(d, np.float64)
    return {"folds": len(d), "mean_diff": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(len(d))),
            "ahead": int((d > 0).sum())}


def print_table(table: list[dict], note: str, pairs: list[dict] | None = None) -> str:
    """The table, then each mixed arm's paired differences (:func:`paired`), printed and returned."""
    lines = [note, f"{'Detector':9} {'Data quantity':22} {'Precision':13} {'Recall':13} {'mAP50':13} {'mAP50-95':13} "
             f"{'CPM':13} epochs folds"]
    f = lambda r, k: f"{r[k]:.3f}±{r[k + '_std']:.3f}" if k in r else "-"
    for r in table:
        lines.append(f"{r['detector']:9} {r['arm']:22} {f(r, 'precision'):13} {f(r, 'recall'):13} {f(r, 'map50'):13} "
                     f"{f(r, 'map50_95'):13} {f(r, 'cpm'):13} {r['epochs']:6} {r['folds']:5}")
    if pairs:
        lines.append("paired over folds (mean difference ± standard error; folds where the mixed arm is ahead):")
        lines += [f"  {p['detector']} {p['arm']} vs {p['against']}: {p['metric']} {p['mean_diff']:+.3f} ± {p['se']:.3f}, "
                  f"ahead in {p['ahead']} of {p['folds']} folds" for p in pairs]
    text = "\n".join(lines)
    print(text)
    return text


def plot(table: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for det in dict.fromkeys(r["detector"] for r in table):
        mixed = [r for r in table if r["detector"] == det and not r["arm"].startswith("real (equal")]
        if not mixed or "map50_95" not in mixed[0]:
            continue
        for src in SOURCES:  # one line per source and use, each from the shared real-only point
            for use in USES:
                rs = sorted((r for r in mixed if r["n_synth"] == 0 or r["arm"] == arm_name(src, r["n_synth"], use)),
                            key=lambda r: r["n_synth"])
                if len(rs) > 1 or (src, use) == ("generated", "mix"):
                    ax.errorbar([r["n_synth"] for r in rs], [r["map50_95"] for r in rs],
                                yerr=[r["map50_95_std"] for r in rs], capsize=3,
                                marker="o" if src == "generated" else "^", linestyle="-" if use == "mix" else "--",
                                label=f"{det} + {src}" + (" (same epochs)" if use == "mix" else ", trained on first"))
        n_max = max(r["n_synth"] for r in mixed)
        for r in table:  # drawn beside the largest mixed arm, whose optimiser steps it matches
            if r["detector"] == det and r["arm"].startswith("real (equal"):
                ax.errorbar([n_max * 1.03 + 1], [r["map50_95"]], yerr=[r["map50_95_std"]], marker="s", capsize=3,
                            linestyle="none", label=f"{det} real only, as many steps as +{n_max}")
    ax.set_xlabel("slices added (N)")
    ax.set_ylabel("mAP50-95 on real test folds")
    import textwrap

    ax.set_title("\n".join(textwrap.wrap(title, 80)), fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def preview(sets: list, path: Path, n: int = 8, seed: int = 0) -> None:
    """A grid of windows as the detector sees them (lung window, box outlines): two rows per set (real
    first, then each synthetic source), windows with a nodule, then without."""
    from PIL import Image, ImageDraw

    from nodulesynth.hu import window_uint8

    rng = np.random.default_rng(seed)
    rows = []
    for w in sets:
        pos = [i for i, b in enumerate(w.boxes) if len(b)]
        neg = [i for i, b in enumerate(w.boxes) if not len(b)]
        for idx in (pos, neg):
            rows.append(rng.choice(idx, min(n, len(idx)), replace=False).tolist() if idx else [])
            rows[-1] = [(w, i) for i in rows[-1]]
    s = 96
    size = sets[0].images.shape[1]
    canvas = Image.new("RGB", (n * (s + 2), len(rows) * (s + 2)), (40, 40, 40))
    for r, items in enumerate(rows):
        for c, (w, i) in enumerate(items):
            tile = Image.fromarray(window_uint8(w.images[i])).convert("RGB").resize((s, s), Image.NEAREST)
            d = ImageDraw.Draw(tile)
            for b in w.boxes[i]:
                d.rectangle([v * s / size for v in b], outline=(235, 40, 40))
            canvas.paste(tile, (c * (s + 2), r * (s + 2)))
    canvas.save(path)


def main(argv=None) -> int:
    from nodulesynth.synth.lung_library import MODES as LUNG_MODES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--protocol", choices=["patches", "slices"], default="patches")
    p.add_argument("--out", required=True)
    p.add_argument("--crops", default="../shared/data/lidc-nodule-crops/lidc_nodule_crops.npz")
    p.add_argument("--data", nargs="+", help="prepared slice dataset folders (protocol slices)")
    p.add_argument("--weights", default="pretrained", help="TSGAN weights for the synthetic arm")
    p.add_argument("--lungs", choices=LUNG_MODES, default=None,
                   help="generate's --lungs for the generated slices (default: generate's default)")
    p.add_argument("--min-readers", type=int, choices=[1, 2, 3, 4], default=None,
                   help="generate's --min-readers for the generated slices: only nodules that many of LIDC's 4 "
                        "readers outlined (LUNA16: 3; default: all)")
    p.add_argument("--detectors", nargs="+", choices=["yolov8n", "yolov5nu"])
    p.add_argument("--detector-weights", nargs="*", default=[], metavar="DET=PT",
                   help="start a detector from a local ultralytics .pt (your own file: .pt files are pickles)")
    p.add_argument("--n-synth", nargs="+", type=int)
    p.add_argument("--synth-source", nargs="+", choices=SOURCES, default=["generated"],
                   help="what a real+N arm adds: generated whole slices (the paper's), and/or real slices with "
                        "nodules inserted (`inserted`: --insert-into's TRAIN slices, `add_nodules_to_real`), or, with "
                        "--insert-into a crops set, its TRAIN crops with one nodule inserted (`crops`) and/or the same "
                        "windows without it (`backgrounds`)")
    p.add_argument("--synth-use", nargs="+", choices=USES, default=["mix"],
                   help="mix: synthetic windows added to the real ones (the paper's); pretrain: trained on first, "
                        "then the real ones from those weights (arm 'real+N pretrain')")
    p.add_argument("--insert-into", nargs="+", metavar="PREPARED", default=[],
                   help="labelled prepared slice datasets whose TRAIN slices without a nodule receive the inserted "
                        "nodules (patients apart from the test folds, e.g. prepared/pyradiomics prepared/lidc-sample; "
                        "an unlabelled set such as TCGA is refused: its slices are not known negatives); or one "
                        "prepare --lidc-crops set for --synth-source crops/backgrounds (patches; needs "
                        "--test-unseen-by the same set)")
    p.add_argument("--folds", type=int)
    p.add_argument("--run-folds", type=int, help="run only the first K folds (CPU budget); said in the table")
    p.add_argument("--epochs", type=int)
    p.add_argument("--no-control", action="store_true", help="skip the real-only equal-optimiser-steps control")
    p.add_argument("--control-only", action="store_true",
                   help="train only the real arm and the control (the synthetic slices are still made, to size the "
                        "control): completes a --no-control run of the same folds and seed, merged with --from-json")
    p.add_argument("--max-patients", type=int, help="use a random subset of patients (CPU budget)")
    p.add_argument("--train-fraction", type=float, default=1.0,
                   help="train on this fraction of each fold's real training patients (scarce real data); test folds "
                        "are unchanged. Raise --epochs to keep the optimiser steps")
    p.add_argument("--test-unseen-by", metavar="PREPARED",
                   help="patches: test folds only from patients outside that prepared crops dataset's TRAIN split "
                        "(the patients the texture models never saw); --max-patients then takes all of them first")
    p.add_argument("--imgsz", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--window", type=int, default=48, help="patches: window side in px")
    p.add_argument("--patch-spacing-mm", type=float, default=None, help="patches: pixel spacing of the crops")
    p.add_argument("--eval", dest="eval_set", help="external real test set: a crops npz or a prepared folder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: seconds, end to end")
    p.add_argument("--from-json", nargs="+", metavar="RESULTS_JSON",
                   help="only re-summarise a (possibly partial) results.json into --out; several runs of the same "
                        "folds and seed (e.g. one with the control, one with --synth-source inserted) are merged, "
                        "so every arm is paired with every other; their shared arms must agree to the digit")
    p.add_argument("--arm-suffix", nargs="+", metavar="SUFFIX",
                   help="with --from-json, one per file ('' for none), e.g. ' (clean)': appended to the names of "
                        "that file's arms other than 'real', so two runs of one arm (e.g. inserted into other "
                        "backgrounds) both stay, and pair with each other")
    p.add_argument("--pool", nargs="+", metavar="RESULTS_JSON",
                   help="only pool the paired differences of runs with other seeds (each possibly merged with "
                        "--from-json first) over all their folds: OUT/pooled.{json,txt,png}")
    a = p.parse_args(argv)
    try:
        if a.arm_suffix is not None and (not a.from_json or len(a.arm_suffix) != len(a.from_json)):
            raise NoduleSynthError(f"--arm-suffix: one per --from-json file ({len(a.from_json or [])}), "
                                   f"got {len(a.arm_suffix)}")
        if a.from_json:
            return summarise_json([Path(f) for f in a.from_json], Path(a.out), a.arm_suffix)
        if a.pool:
            return pool_seeds([Path(f) for f in a.pool], Path(a.out))
        return run(a, argv)
    except NoduleSynthError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(a, argv) -> int:
    from nodulesynth.detect import windows as W
    from nodulesynth.detect import yolo as Y

    t0 = time.time()
    size = SMOKE if a.smoke else FULL
    folds = a.folds or size["folds"]
    epochs = a.epochs or size["epochs"]
    n_list = sorted(set(a.n_synth if a.n_synth is not None else size["n_synth"]) | {0})
    detectors = a.detectors or size["detectors"]
    batch = a.batch or size["batch"]
    max_pat = a.max_patients or size.get("max_patients")
    if any(n < 0 for n in n_list) or epochs < 1 or batch < 1:
        raise NoduleSynthError("--n-synth must be ≥ 0, --epochs and --batch ≥ 1")
    sources = list(dict.fromkeys(a.synth_source))
    if bool({"inserted", *CROP_SOURCES} & set(sources)) != bool(a.insert_into):
        raise NoduleSynthError("--synth-source inserted/crops/backgrounds and --insert-into PREPARED... go together")
    backgrounds = load_backgrounds(a.insert_into) if a.insert_into else None  # bad input refused before any work
    if backgrounds is not None and backgrounds["kind"] == "crops":
        if "inserted" in sources:
            raise NoduleSynthError(f"--insert-into {a.insert_into[0]}: a crops set feeds --synth-source crops/backgrounds, "
                                   "not inserted (whole 512² slices)")
        if a.protocol != "patches":
            raise NoduleSynthError(f"--insert-into {a.insert_into[0]}: a crops set is for --protocol patches")
        if a.test_unseen_by is None or not set(backgrounds["patient"]) <= {
                f"LIDC-IDRI-{p:04d}" for p in train_patients(a.test_unseen_by)}:
            raise NoduleSynthError(f"--insert-into {a.insert_into[0]}: its TRAIN patients must never be tested; "
                                   f"pass --test-unseen-by {a.insert_into[0]}")
    elif set(CROP_SOURCES) & set(sources):
        raise NoduleSynthError("--synth-source crops/backgrounds: only with --insert-into a crops set (prepare --lidc-crops)")
    if a.control_only and (a.no_control or not any(n_list)):
        raise NoduleSynthError("--control-only: needs the control (not --no-control) and an --n-synth > 0 to size it")
    if not 0 < a.train_fraction <= 1:
        raise NoduleSynthError(f"--train-fraction {a.train_fraction}: expected a fraction in (0, 1]")
    det_weights = {}
    for s in a.detector_weights:
        k, _, v = s.partition("=")
        if k not in Y.DETECTORS or not Path(v).is_file():
            raise NoduleSynthError(f"--detector-weights {s}: expected DET=FILE with DET in {sorted(Y.DETECTORS)} and an existing file")
        det_weights[k] = v
    out = Path(a.out).resolve()
    work = out / "work"
    if a.protocol == "patches":
        load_crops(a.crops, 1, a.seed)  # one clear error for a bad --crops before anything is set up
        if a.test_unseen_by:
            train_patients(a.test_unseen_by)
    elif a.test_unseen_by:
        raise NoduleSynthError("--test-unseen-by: only for --protocol patches")
    out.mkdir(parents=True, exist_ok=True)
    Y.offline(work)

    wcfg = W.WindowConfig(size=a.window if not a.smoke else 24)
    seen = None  # patients the synthetic data's models learnt from (--test-unseen-by)
    n_max = max(n_list)
    if a.protocol == "patches":
        imgsz = a.imgsz or size["imgsz_patches"]
        seen = train_patients(a.test_unseen_by) if a.test_unseen_by else None
        unseen = None if seen is None else set(np.unique(load_crops(a.crops, None, a.seed)[2]).tolist()) - seen
        images, masks, patient = load_crops(a.crops, max_pat, a.seed, first=unseen)
        real = W.windows_from_crops(images, masks, patient, wcfg, seed=a.seed)
        target_sp = a.patch_spacing_mm or W.LIDC_MEDIAN_SPACING_MM
        syn, syn_meta = {}, {}
        for src in sources if n_max else ():
            if src in CROP_SOURCES:
                if src not in syn:  # both crop sources at once: the same crops and the same windows
                    from insert_crops import insert_into_crops

                    c, meta = insert_into_crops(a.weights, backgrounds, n_max, a.seed, out / "work", a.device)
                    pair = W.paired_windows(c["inserted"], c["background"], c["new"], c["own"],
                                            np.arange(n_max), wcfg, seed=a.seed)
                    for k, w in zip(CROP_SOURCES, pair):
                        if k in sources:
                            syn[k], syn_meta[k] = w, {**meta, "nodules_inserted": k == "crops"}
                continue
            sh, sm, syn_meta[src] = make_source(a, src, n_max, out / "work", backgrounds)
            syn[src] = W.windows_from_slices(sh, sm, syn_meta[src]["spacing_mm"], target_sp, wcfg, seed=a.seed)
        real_series = None
    else:
        if not a.data:
            raise NoduleSynthError("--protocol slices needs --data PREPARED [PREPARED ...]")
        imgsz = a.imgsz or size["imgsz_slices"]
        rh, rm, rb, rg, rs, ri, sp = load_slices(a.data)
        if max_pat:
            pats = np.random.default_rng(a.seed).permutation(np.unique(rg))[:max_pat]
            k = np.isin(rg, pats)
            rh, rm, rb, rg, rs, ri = rh[k], rm[k], [b for b, kk in zip(rb, k) if kk], rg[k], rs[k], ri[k]
        _, groups = np.unique(rg, return_inverse=True)
        real = W.Windows(rh.astype(np.float32), rb, groups.astype(np.int64))
        real_series = (rs, ri)
        syn, syn_meta = {}, {}
        for src in sources if n_max else ():
            sh, sm, syn_meta[src] = make_source(a, src, n_max, out / "work", backgrounds)
            fh, _, fb = fit_slices(sh, sm, syn_meta[src]["spacing_mm"], sp, rh.shape[1:])
            syn[src] = W.Windows(fh, fb, np.arange(len(fh), dtype=np.int64))
    if not real.n_positive:
        raise NoduleSynthError("no real positive windows/slices to train on")

    if len(real):
        preview([real, *syn.values()], out / "windows_preview.png", seed=a.seed)
    pool = work / "pool"
    real_paths = np.array(Y.write_images(pool, "real", real.images, real.boxes))
    syn_paths = {src: np.array(Y.write_images(pool, POOL_PREFIX[src], w.images, w.boxes)) if len(w) else np.array([])
                 for src, w in syn.items()}
    fold_pats = fold_patients(real.group, folds, a.seed, seen)
    run_folds = min(a.run_folds or size.get("run_folds") or folds, folds)

    ext = None
    if a.eval_set:
        e = Path(a.eval_set)
        if e.is_file():
            ei, em, ep = load_crops(str(e), None, a.seed)
            ew = W.windows_from_crops(ei, em, ep, wcfg, seed=a.seed + 1)
        elif e.is_dir():
            eh, emk, eb, eg, _, _, esp = load_slices([str(e)])
            if a.protocol == "patches":
                ew = W.windows_from_slices(eh, emk, esp, target_sp, wcfg, seed=a.seed + 1)
            else:
                ew = W.Windows(eh.astype(np.float32), eb, np.zeros(len(eh), np.int64))
        else:
            raise NoduleSynthError(f"--eval {e}: no such file or folder")
        ext_paths = Y.write_images(pool, "external", ew.images, ew.boxes)
        ext = Y.write_data_yaml(work / "external.yaml", ext_paths[:1], ext_paths)
        n_ext = len(ext_paths)

    rows: list[dict] = []
    uses = list(dict.fromkeys(a.synth_use))
    for f in range(run_folds):
        test_mask = np.isin(real.group, fold_pats[f])
        train_idx = subsample_patients(np.nonzero(~test_mask)[0], real.group, a.train_fraction, a.seed * 1000 + f)
        test_idx = np.nonzero(test_mask)[0]
        rng = np.random.default_rng(a.seed + f)
        val_idx = rng.choice(train_idx, size=min(len(train_idx), 32), replace=False)  # ultralytics' mandatory final val
        test_yaml = Y.write_data_yaml(work / f"fold{f}" / "test.yaml", real_paths[val_idx[:1]].tolist(),
                                      real_paths[test_idx].tolist())
        arms = [("real", None, 0, epochs, "mix")] + [(arm_name(src, n, use), src, n, epochs, use)
                                                     for n in n_list if n for src in syn for use in uses
                                                     if not a.control_only]
        if not a.no_control and n_max:
            added = max(int((w.group < n_max).sum()) for w in syn.values())  # the largest mixed arm's windows
            ctrl_epochs = int(round(epochs * (len(train_idx) + added) / len(train_idx)))
            arms.append((f"real (equal steps as +{n_max})", None, 0, ctrl_epochs, "mix"))
        for det in detectors:
            for arm, src, n, ep, use in arms:
                syn_list = syn_paths[src][np.nonzero(syn[src].group < n)[0]].tolist() if src else []
                train_list = real_paths[train_idx].tolist() + syn_list
                name = f"fold{f}/{det}/{'real-equal-steps' if '(' in arm else arm.replace(' ', '-')}"
                cfg = Y.YoloConfig(model=det_weights.get(det, Y.DETECTORS[det]), epochs=ep, imgsz=imgsz, batch=batch,
                                   device=a.device, seed=a.seed + f)
                t1 = time.time()
                steps = ep * int(np.ceil(len(train_list) / batch))
                if use == "pretrain":  # the synthetic windows alone, then the real ones from those weights
                    if not syn_list:
                        raise NoduleSynthError(f"{arm}: the synthetic slices gave no windows to train on first")
                    dy = Y.write_data_yaml(work / name / "synthetic" / "data.yaml", syn_list, real_paths[val_idx].tolist())
                    cfg = replace(cfg, model=str(Y.train(dy, work / name / "synthetic", cfg)))
                    steps = ep * (int(np.ceil(len(syn_list) / batch)) + int(np.ceil(len(train_idx) / batch)))
                    train_list = real_paths[train_idx].tolist()
                dy = Y.write_data_yaml(work / name / "data.yaml", train_list, real_paths[val_idx].tolist())
                weights = Y.train(dy, work / name, cfg)
                train_s = time.time() - t1
                m = Y.validate(weights, test_yaml, cfg)
                row = {"fold": f, "detector": det, "arm": arm, "n_synth": int(n), "epochs": ep, "test": "fold",
                       "train_images": len(train_idx) + len(syn_list), "test_images": len(test_idx),
                       "optimizer_steps": steps, "train_s": round(train_s, 1), **m,
                       "cpm": None}
                if real_series is not None:
                    row.update(froc_for(weights, real, real_series, test_idx, cfg))
                rows.append(row)
                print(f"[fold {f}] {det} {arm}: P {m['precision']:.3f} R {m['recall']:.3f} mAP50 {m['map50']:.3f} "
                      f"mAP50-95 {m['map50_95']:.3f} ({train_s:.0f} s, {row['train_images']} train images)", flush=True)
                if ext is not None:
                    rows.append({**row, "test": "external", "test_images": n_ext, **Y.validate(weights, ext, cfg),
                                 "cpm": None, "froc": None})
                _write(out, a, argv, rows, fold_pats, run_folds, folds, real, syn, syn_meta, imgsz,
                       batch, detectors, n_list, t0)
    table = _write(out, a, argv, rows, fold_pats, run_folds, folds, real, syn, syn_meta, imgsz, batch, detectors,
                   n_list, t0, final=True)
    return 0 if table else 1


def read_results(srcs: list[Path], arg: str, keys: tuple[str, ...]) -> list[dict]:
    """Each results.json of ``srcs``; one clear error naming ``arg`` and the file if one is not a
    detection results.json with ``keys``."""
    docs = []
    for src in srcs:
        try:
            doc = json.loads(src.read_text())
            for k in keys:
                doc[k]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise NoduleSynthError(f"{arg} {src}: not a detection results.json ({e})") from e
        docs.append(doc)
    return docs


def summarise_json(srcs: list[Path], out: Path, suffixes: list[str] | None = None) -> int:
    """Table, CSV and plot from the rows of one or more results.json (e.g. of a run stopped after some
    folds); the note says how many folds each row averages. Several runs must share protocol, seed and
    fold patients; a row (fold, detector, arm, test set) that two runs both hold must agree, since the
    benchmark is deterministic on one machine: a mismatch means the runs are not comparable.
    ``suffixes`` (one per file) rename that file's arms but 'real', so two runs of one arm both stay."""
    docs = read_results(srcs, "--from-json", ("rows", "note", "folds"))
    for doc, suffix in zip(docs, suffixes or []):
        doc["rows"] = [{**r, "arm": r["arm"] + suffix} if r["arm"] != "real" else r for r in doc["rows"]]
    first, rows, seen = docs[0], [], {}
    for src, doc in zip(srcs, docs):
        for k in ("protocol", "seed", "fold_patients"):
            if doc.get(k) != first.get(k):
                raise NoduleSynthError(f"--from-json {src}: {k} differs from {srcs[0]}'s; only runs of the same folds merge")
        for r in doc["rows"]:
            key = (r["fold"], r["detector"], r["arm"], r["test"])
            if key in seen:
                if any(seen[key].get(m) != r.get(m) for m in ("precision", "recall", "map50", "map50_95")):
                    raise NoduleSynthError(f"--from-json {src}: {key} differs from the same row of another run "
                                           "(other code, data or machine): these runs do not merge")
                continue
            seen[key] = r
            rows.append(r)
    out.mkdir(parents=True, exist_ok=True)
    done = sorted({r["fold"] for r in rows})
    note = first["note"].split(":", 1)[0] + f": folds completed {done} of {first['folds']} (" + first["note"].split(", ", 1)[1] + ")"
    merged = {**first, "rows": rows, "summarised_from": [str(s) for s in srcs]}
    if suffixes:
        merged["arm_suffixes"] = list(suffixes)
    if len(docs) > 1:
        merged["commands"] = [d.get("command") for d in docs]
        for d in docs[1:]:  # each source's metadata from whichever run made it
            for k in ("synthetic", "n_synthetic_windows", *(f for s in SOURCES[1:] for f in (s, f"n_{s}_windows"))):
                if not merged.get(k) and d.get(k):
                    merged[k] = d[k]
    _publish(out, merged, note, final=True)
    return 0


def pool_seeds(srcs: list[Path], out: Path, key: str = "map50_95") -> int:
    """Paired differences pooled over the folds of runs with different seeds (other folds, other
    draws): per comparison, each seed's mean ± SE and folds ahead, then all folds together. Runs must
    share the protocol and have distinct seeds (merge runs of one seed with --from-json first); their
    commands are kept beside the figures."""
    from nodulesynth.io import write_json

    docs = read_results(srcs, "--pool", ("rows", "seed", "protocol"))
    seeds = [d["seed"] for d in docs]
    if len(set(seeds)) != len(seeds) or len({d["protocol"] for d in docs}) != 1:
        raise NoduleSynthError(f"--pool: need runs of one protocol with distinct seeds (have seeds {seeds}); "
                               "merge runs of one seed with --from-json first")
    cmp: dict = {}
    for doc in docs:
        for q in paired(doc["rows"], key):
            cmp.setdefault((q["detector"], q["arm"], q["against"]), {})[doc["seed"]] = q["per_fold"]
    pooled = []
    for (det, arm, ref), by_seed in cmp.items():
        allv = [v for s in seeds if s in by_seed for v in by_seed[s]]
        pooled.append({"detector": det, "arm": arm, "against": ref, "metric": key,
                       "per_seed": {str(s): diff_stats(by_seed[s]) for s in seeds if s in by_seed},
                       "per_seed_folds": {str(s): by_seed[s] for s in seeds if s in by_seed},
                       "all": diff_stats(allv), "seeds": [s for s in seeds if s in by_seed]})
    cell = lambda r: f"{r['mean_diff']:+.3f} ± {r['se']:.3f} ({r['ahead']}/{r['folds']})"
    lines = [f"paired {key} differences pooled over seeds {seeds} (mean ± SE, folds ahead):"]
    lines += [f"  {q['detector']} {q['arm']} vs {q['against']}: " + " | ".join(
        f"seed {s}: {cell(q['per_seed'][str(s)])}" for s in q["seeds"]) + f" | all: {cell(q['all'])}" for q in pooled]
    text = "\n".join(lines)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "pooled.json", {"sources": [str(s) for s in srcs], "seeds": seeds, "metric": key,
                                     "commands": [d.get("command") for d in docs], "pooled": pooled})
    (out / "pooled.txt").write_text(text + "\n")
    plot_pooled(pooled, seeds, out / "pooled.png", key)
    return 0


def plot_pooled(pooled: list[dict], seeds: list, path: Path, key: str) -> None:
    """One row per comparison: every fold's paired difference (a marker per seed) and the pooled mean ±
    SE, against the zero line; what the pooled table says, at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 0.45 * len(pooled) + 1.5))
    offset = {s: 0.3 * (j / max(len(seeds) - 1, 1) - 0.5) for j, s in enumerate(seeds)}
    for j, s in enumerate(seeds):  # one colour per seed in every row, whichever seeds a row has
        ax.plot([], [], "o", ms=3, alpha=0.6, color=f"C{j % 10}", label=f"seed {s} folds")
    for y, q in enumerate(pooled):
        for s in q["seeds"]:
            v = q["per_seed_folds"][str(s)]
            ax.plot(v, [y + offset[s]] * len(v), "o", ms=3, alpha=0.6, color=f"C{seeds.index(s) % 10}")
        a = q["all"]
        ax.errorbar([a["mean_diff"]], [y], xerr=[a["se"]], fmt="s", color="k", capsize=3,
                    label="all folds: mean ± SE" if y == 0 else None)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(range(len(pooled)), [f"{q['arm']} vs {q['against']}" for q in pooled], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"paired difference in {key} (per test fold)")
    ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(len(seeds) + 1, 4), frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def froc_for(weights, real, series, test_idx, cfg) -> dict:
    """FROC/CPM of one model on the test slices, grouped into scans by series (FP per scan counts
    only the slices the prepared dataset holds for each scan)."""
    from nodulesynth.detect import yolo as Y
    from nodulesynth.metrics.froc import Detection, froc, link_nodules

    rs, ri = series
    dets = Y.predict(weights, real.images[test_idx], cfg)
    nodules, detections = [], []
    for s in np.unique(rs[test_idx]):
        k = test_idx[rs[test_idx] == s]
        nodules += link_nodules(s, [(int(ri[i]), real.boxes[i]) for i in k])
    for i, (b, sc) in zip(test_idx, dets):
        detections += [Detection(rs[i], int(ri[i]), bb, float(c)) for bb, c in zip(b, sc)]
    r = froc(nodules, detections, n_scans=len(np.unique(rs[test_idx])))
    return {"cpm": r.cpm, "froc": r.to_dict()}


def _write(out, a, argv, rows, fold_pats, run_folds, folds, real, syn, syn_meta, imgsz, batch, detectors,
           n_list, t0, final=False):
    from nodulesynth.detect import yolo as Y

    note = (f"protocol {a.protocol}: {run_folds} of {folds} patient folds run, "
            f"{len(np.unique(real.group))} patients, {len(real)} real windows/slices ({real.n_positive} with a nodule), "
            f"imgsz {imgsz}, batch {batch} (nbs = batch), from scratch, last-epoch weights; test folds real only"
            + (f", test patients outside {a.test_unseen_by}'s TRAIN split" if a.test_unseen_by else "")
            + (f", real training patients: {a.train_fraction:g} of each fold's" if a.train_fraction < 1 else ""))
    doc = {
        "command": "python " + " ".join(shlex.quote(x) for x in (["benchmarks/detection.py"] + list(argv if argv is not None else sys.argv[1:]))),
        "versions": Y.versions(), "seed": a.seed, "protocol": a.protocol, "note": note,
        "folds": folds, "run_folds": run_folds, "fold_patients": [fp.tolist() for fp in fold_pats],
        "n_synth": n_list, "detectors": detectors, "sources": list(syn),
        "synthetic": syn_meta.get("generated", {}), "n_synthetic_windows": len(syn.get("generated", ())),
        **{k: v for src in syn if src != "generated"
           for k, v in ((src, syn_meta[src]), (f"n_{src}_windows", len(syn[src])))},
        "window": a.window if a.protocol == "patches" else None, "finished": final,
        "wall_s": round(time.time() - t0, 1), "rows": rows,
    }
    return _publish(out, doc, note, final)


def _publish(out: Path, doc: dict, note: str, final: bool) -> list[dict]:
    """results.json (``doc`` with its rows' table and paired differences), then :func:`_write_tables`;
    returns the table. One writer for a running benchmark and for ``--from-json``."""
    from nodulesynth.io import write_json

    table = summarise(doc["rows"])
    doc = {**doc, "note": note, "table": table, "paired": paired(doc["rows"])}
    write_json(out / "results.json", doc)
    _write_tables(out, table, note, final, doc["paired"])
    return table


CSV_KEYS = ["detector", "arm", "n_synth", "epochs", "folds", "precision", "precision_std", "recall", "recall_std",
            "map50", "map50_std", "map50_95", "map50_95_std", "cpm", "cpm_std"]


def _write_tables(out: Path, table: list[dict], note: str, final: bool, pairs: list[dict] | None = None) -> None:
    """results.csv (atomically, after every arm); table.txt (with the paired differences) and the
    plot once the run is final."""
    with open(out / "results.csv.tmp", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_KEYS, extrasaction="ignore")
        w.writeheader()
        w.writerows(table)
    (out / "results.csv.tmp").replace(out / "results.csv")
    if final:
        (out / "table.txt").write_text(print_table(table, note, pairs) + "\n")
        if table:
            plot(table, out / "map_vs_n.png", note)


if __name__ == "__main__":
    from nodulesynth.runtime import keep_heap

    keep_heap()  # the process is ours: reuse freed 512² buffers (README "Performance", "Heap")
    sys.exit(main())
