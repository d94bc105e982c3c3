"""LIDC nodules inserted into real lung crops of many patients, for the detection benchmark.

The slice-level ``--insert-into`` (512² prepared slices) can only use the few whole scans there are
(two patients here). ``prepare --lidc-crops`` gives real lung around a nodule for hundreds of LIDC
patients, 128² at each scan's own pixel spacing. Each crop is resampled to the model's 0.8 mm,
reflect-padded (so the nodule texture model sees lung, not air, beyond the crop's edge) onto a 512²
canvas, given one LIDC nodule of at least 3 mm (the generator's gate) by ``Synthesizer.add_nodules_to_real``, and only the pixels that
changed are brought back to the crop's own grid: every other pixel stays the scan's, at its native
resolution, like the real crops the detector is tested on. The crop's own nodule is kept and avoided.

One crop per patient first (a second only once every patient has given one), in an order drawn by
the seed; crops whose nodule does not fit (too little free lung) are skipped and counted.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from nodulesynth.errors import NoduleSynthError

REFLECT_PX = 48  # lung beyond the crop's edge (at 0.8 mm) that the nodule texture model sees
CHUNK = 16  # crops given to add_nodules_to_real at once; part of the cache key


def load_crop_backgrounds(ds) -> dict:
    """The TRAIN crops of a prepared crops set (a labelled SliceDataset): HU and masks (memory-mapped),
    spacing, patient."""
    idx = [i for i, r in enumerate(ds.records) if r.split == "train"]
    if not idx:
        raise NoduleSynthError(f"--insert-into {ds.root}: no TRAIN crops")
    return {"kind": "crops", "into": [str(ds.root)], "images": ds.images, "masks": ds.masks, "index": np.asarray(idx),
            "spacing": np.array([float(ds.records[i].spacing_mm[0]) for i in idx]),
            "patient": np.array([ds.records[i].patient for i in idx]),
            "key": f"{zlib.crc32((ds.root / 'index.json').read_bytes()):08x}"}


def crop_order(bg: dict, seed: int) -> np.ndarray:
    """Positions into bg["index"]: round r takes the r-th crop (in a seeded shuffle) of every patient
    that has one, patients in a seeded order; so N ≤ #patients crops come from N patients."""
    rng = np.random.default_rng(seed)
    pats = rng.permutation(np.unique(bg["patient"]))
    per = {p: rng.permutation(np.nonzero(bg["patient"] == p)[0]) for p in pats}
    rounds = max(len(v) for v in per.values())
    return np.array([per[p][r] for r in range(rounds) for p in pats if r < len(per[p])], np.int64)


def _to_canvas(hu: np.ndarray, mask: np.ndarray, spacing: float, model_mm: float, size: int):
    """Crop → model spacing, reflect-padded then air-padded to size²; returns canvas HU, mask, region."""
    from nodulesynth.detect.windows import resample_slice
    from nodulesynth.masks.classes import MaskClass

    h8, m8 = resample_slice(hu, mask, spacing, model_mm)
    hh, ww = h8.shape
    h8 = np.pad(h8, REFLECT_PX, mode="reflect")
    m8 = np.pad(m8, REFLECT_PX, mode="reflect")
    oy, ox = (size - h8.shape[0]) // 2, (size - h8.shape[1]) // 2
    ch = np.full((size, size), -1000.0, np.float32)
    cm = np.zeros((size, size), np.uint8)
    ch[oy : oy + h8.shape[0], ox : ox + h8.shape[1]] = h8
    cm[oy : oy + m8.shape[0], ox : ox + m8.shape[1]] = m8
    y, x = oy + REFLECT_PX, ox + REFLECT_PX
    # the reflected lung is context, never a place: labelled as a nodule it is kept out of reach
    # (placement avoids nodules by GAP_PX), so each new nodule lies whole inside the crop
    outside = np.ones((size, size), bool)
    outside[y : y + hh, x : x + ww] = False
    cm[outside & ((cm == MaskClass.LEFT_LUNG) | (cm == MaskClass.RIGHT_LUNG))] = MaskClass.NODULE
    return ch, cm, (y, x, hh, ww)


def _back(orig: np.ndarray, canvas_in: np.ndarray, canvas_out: np.ndarray, fresh: np.ndarray, region):
    """The changed canvas pixels (the new nodule and its rim) brought back onto the native crop: a
    linear blend weight that is 0 where nothing changed, so those pixels stay exactly the scan's.
    Returns (crop HU, new-nodule mask on the crop grid)."""
    y, x, hh, ww = region
    sl = (slice(y, y + hh), slice(x, x + ww))
    z = (orig.shape[0] / hh, orig.shape[1] / ww)
    changed = (canvas_out[sl] != canvas_in[sl]).astype(np.float32)
    a = np.clip(ndi.zoom(changed, z, order=1), 0, 1)
    val = ndi.zoom(canvas_out[sl], z, order=1)
    out = np.where(a > 0, a * val + (1 - a) * orig, orig).astype(np.float32)
    return out, ndi.zoom(fresh[sl].astype(np.uint8), z, order=0) > 0


def insert_into_crops(weights: str, bg: dict, n: int, seed: int, cache: Path, device: str) -> tuple[dict, dict]:
    """n TRAIN crops, each with one inserted LIDC nodule: (arrays, meta). Arrays: ``inserted`` and
    ``background`` HU (n, 128, 128) float32, ``new`` (the inserted nodule) and ``own`` (the crop's
    nodule) bool masks, ``patient``. Cached per chunk (atomic), so a killed run resumes."""
    from tqdm import tqdm

    from nodulesynth.masks.classes import MaskClass
    from nodulesynth.metrics.nodules import MIN_NODULE_MM
    from nodulesynth.models.tsgan import TSGAN
    from nodulesynth.synth.pipeline import GenerationConfig, Synthesizer

    model = TSGAN.from_pretrained(weights, device=device)
    syn = Synthesizer(model, GenerationConfig(seed=seed, block=CHUNK, num_nodules=1, min_size_mm=MIN_NODULE_MM))
    model_mm = float(syn.spacing_mm)
    order = crop_order(bg, seed)
    f = cache / f"crops-inserted-{Path(str(model.source)).name}-{model.revision}-seed{seed}-{bg['key']}.npz"
    have = dict(np.load(f, allow_pickle=False)) if f.is_file() else None
    keys = ("inserted", "new", "own", "pos")
    if have is None:
        have = {k: np.zeros((0, 128, 128), np.float16 if k == "inserted" else bool) for k in keys[:3]}
        have["pos"] = np.zeros(0, np.int64)  # position in ``order`` of each kept crop
        have["tried"] = np.zeros((), np.int64)
    with tqdm(total=n, initial=min(n, len(have["pos"])), desc="LIDC nodules into real crops", unit="crop") as bar:
        while len(have["pos"]) < n:
            start = int(have["tried"])
            if start >= len(order):
                raise NoduleSynthError(f"--insert-into {bg['into'][0]}: only {len(have['pos'])} of {len(order)} TRAIN "
                                       f"crops take a nodule; fewer than --n-synth {n}")
            pos = order[start : start + CHUNK]
            rows = bg["index"][pos]
            orig = [np.asarray(bg["images"][r], np.float32) for r in rows]
            own = [np.asarray(bg["masks"][r]) == MaskClass.NODULE for r in rows]
            canv = [_to_canvas(o, np.asarray(bg["masks"][r]), s, model_mm, syn.image_size)
                    for o, r, s in zip(orig, rows, bg["spacing"][pos])]
            names = [f"crop{int(r)}" for r in rows]  # the stream of each crop: its row, not its place in a chunk
            ok = []
            try:
                outs = [syn.add_nodules_to_real(np.stack([c[0] for c in canv]), np.stack([c[1] for c in canv]), names)]
                ok = list(range(len(rows)))
            except NoduleSynthError:  # a crop without room: redo one by one, skip those (same streams)
                outs = []
                for k in range(len(rows)):
                    try:
                        outs.append(syn.add_nodules_to_real(canv[k][0][None], canv[k][1][None], names[k : k + 1]))
                        ok.append(k)
                    except NoduleSynthError:
                        pass
            res_h = np.concatenate([o.images_hu.numpy() for o in outs]) if outs else np.zeros((0,))
            res_m = np.concatenate([o.masks.numpy() for o in outs]) if outs else np.zeros((0,))
            add = {k: [] for k in keys}
            for j, k in enumerate(ok):
                fresh = (res_m[j] == MaskClass.NODULE) & (canv[k][1] != MaskClass.NODULE)
                hu, new = _back(orig[k], canv[k][0], res_h[j], fresh, canv[k][2])
                add["inserted"].append(hu.astype(np.float16))
                add["new"].append(new)
                add["own"].append(own[k])
                add["pos"].append(start + k)
            for k in keys:
                if add[k]:
                    have[k] = np.concatenate([have[k], np.stack(add[k]) if k != "pos" else np.asarray(add[k])])
            have["tried"] = np.asarray(start + len(pos))
            f.parent.mkdir(parents=True, exist_ok=True)
            tmp = f.with_suffix(".tmp.npz")
            np.savez(tmp, **have)
            tmp.replace(f)
            bar.update(min(n, len(have["pos"])) - bar.n)
    k = np.asarray(have["pos"][:n])
    pats = bg["patient"][order[k]]
    arrays = {"inserted": have["inserted"][:n].astype(np.float32), "new": have["new"][:n], "own": have["own"][:n],
              "background": np.stack([np.asarray(bg["images"][r], np.float32) for r in bg["index"][order[k]]])
              if len(k) else np.zeros((0, 128, 128), np.float32), "patient": pats}
    meta = {"weights": str(model.source), "revision": str(model.revision), "seed": seed, "into": bg["into"],
            "kind": "crops", "backgrounds": int(n), "background_patients": int(len(np.unique(pats))),
            "crops_tried": int(k[-1]) + 1 if len(k) else 0,  # those not kept had no room for a nodule
            "spacing_mm": "native (crops)", "model_spacing_mm": model_mm}
    return arrays, meta
