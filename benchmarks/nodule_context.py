"""What the nodule KID sees: the nodule, or the lung around it? Real context, only the nodule changed.

    python benchmarks/nodule_context.py --weights pretrained --n 200 --out /tmp/nodule-context

``heldout_realism.py``'s nodule column compares 64² windows around generated nodules with held-out
LIDC crops; a generated window differs in both its nodule and its lung. This benchmark holds the lung
real: ``--n`` crops of VAL patients (``prepared/lidc-crops``' own patient split), their nodule

- kept as it is (the real-vs-real reference of this set-up),
- redrawn by the weights' nodule texture model (what ``add_nodules_to_real`` and ``generate`` draw),
- replaced by a flat disc at the nodule's mean HU (a nodule with no texture),
- erased: outline dilated by 1 px filled with the median of the lung ring around it (no nodule),

each scored by KID × 1000 (the central 64², the yardstick's features and subsets) against ``--n``
crops of TEST patients, beside TRAIN crops (the yardstick's floor side) and the windows around the
nodules of ``--generated`` slices the weights generate (as the yardstick cuts them). The span from
"kept" to "erased" is all that a nodule can move this KID; a gap far beyond it lies in the context.
Crops stay at their native spacing (0.5–0.9 mm; the model was trained at 0.8 mm). Several
``--weights`` give a redrawn and a generated row each, on the same crops and features; each crop row
also reports its nodules' inner HU std (inside the outline less one pixel), the texture a fill keeps,
and its density gap: the Wasserstein-1 distance (HU) of the nodules' mean HU from the kept ones' within
each tercile of nodule area (a density drawn at the wrong size shows here).
Writes OUT/nodule_context.{json,txt}; ``--grid FILE`` adds a picture of the VAL crops kept and
redrawn, from the smallest nodule to the largest.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def variants(hu: np.ndarray, masks: np.ndarray, renders: dict) -> dict[str, np.ndarray]:
    """The crops with their nodule kept, redrawn (``{name: render(hu, masks)}``, one per weights), a
    flat disc, erased."""
    from scipy import ndimage as ndi

    from nodulesynth.masks.classes import MaskClass

    nod = masks == MaskClass.NODULE
    disc, erased = hu.copy(), hu.copy()
    for i in range(len(hu)):
        m = nod[i]
        ring = ndi.binary_dilation(m, iterations=4) & ~ndi.binary_dilation(m, iterations=1) & (hu[i] < -500)
        disc[i][m] = hu[i][m].mean()
        erased[i][ndi.binary_dilation(m, iterations=1)] = np.median(hu[i][ring]) if ring.any() else -850.0
    redrawn = {f"redrawn{name}": render(hu, masks) for name, render in renders.items()}
    return {"kept": hu, **redrawn, "flat disc": disc, "erased": erased}


def interior_std(hu: np.ndarray, masks: np.ndarray) -> float:
    """Median over crops of the HU standard deviation inside each nodule's outline less one pixel:
    how much inner structure (texture, partial volume, calcification) the nodules hold."""
    from scipy import ndimage as ndi

    from nodulesynth.masks.classes import MaskClass

    out = [h[inner].std() for h, m in zip(hu, masks)
           if (inner := ndi.binary_erosion(m == MaskClass.NODULE, iterations=1)).sum() >= 3]
    return round(float(np.median(out)), 1) if out else float("nan")


def density_gap(hu: np.ndarray, kept: np.ndarray, masks: np.ndarray, spacing: np.ndarray) -> float:
    """How far the nodules' mean HU (inside the outline) lies from the kept real ones' at the same size:
    Wasserstein-1 distance (HU) between the two, within each tercile of nodule area, averaged."""
    from scipy.stats import wasserstein_distance

    from nodulesynth.masks.classes import MaskClass

    nod = masks == MaskClass.NODULE
    area = nod.sum((1, 2)) * spacing**2
    mean = lambda x: np.array([h[m].mean() for h, m in zip(x, nod)])
    ok = nod.any((1, 2))
    group = np.digitize(area, np.quantile(area[ok], [1 / 3, 2 / 3]))
    a, b = mean(hu), mean(kept)
    return round(float(np.mean([wasserstein_distance(a[ok & (group == g)], b[ok & (group == g)])
                                for g in range(3)])), 1)


def size_grid(path: Path, sets: dict[str, np.ndarray], masks: np.ndarray, columns: int = 10) -> None:
    """PNG: one row per set (64² centres, lung window), ``columns`` crops from the smallest nodule to the
    largest (evenly spaced in area rank), so a density drawn at the wrong size shows."""
    from PIL import Image

    from nodulesynth.hu import window_uint8
    from nodulesynth.masks.classes import MaskClass

    order = np.argsort((masks == MaskClass.NODULE).sum((1, 2)))
    pick = order[np.linspace(0, len(order) - 1, columns).round().astype(int)]
    rows = [np.concatenate([window_uint8(x[i]) for i in pick], 1) for x in sets.values()]
    grid = np.concatenate([np.pad(r, ((0, 2), (0, 0)), constant_values=255) for r in rows], 0)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", nargs="+", default=["pretrained"], help="one redrawn and one generated row each")
    p.add_argument("--names", nargs="+", help="a name per --weights for the rows (default: the folders' names)")
    p.add_argument("--prepared", type=Path, default=Path("prepared"), help="folder holding lidc-crops/")
    p.add_argument("--n", type=int, default=200, help="crops per side")
    p.add_argument("--generated", type=int, default=64, help="generated slices whose nodule windows are scored too")
    p.add_argument("--subsets", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--grid", type=Path, help="also write this PNG: the VAL crops kept and redrawn, small to large nodules")
    a = p.parse_args(argv)

    import torch

    from heldout_realism import CROP_SET, lung_fine_texture
    from realism import nodule_windows
    from nodulesynth.data.slices import SliceDataset
    from nodulesynth.data.splits import split_indices
    from nodulesynth.io import write_json
    from nodulesynth.metrics.kid import InceptionFeatures, kid
    from nodulesynth.detect.windows import LIDC_MEDIAN_SPACING_MM
    from nodulesynth.models.tsgan import TSGAN
    from nodulesynth.synth.pipeline import GenerationConfig, Synthesizer

    t0 = time.time()
    ds = SliceDataset(a.prepared / CROP_SET)
    rng = np.random.default_rng(a.seed)
    pick = {s: np.sort(rng.choice(split_indices(ds, s), a.n, replace=False)) for s in ("val", "test", "train")}
    names = a.names or [Path(w).name for w in a.weights]
    if len(names) != len(a.weights):
        raise SystemExit(f"--names: {len(names)} names for {len(a.weights)} --weights")
    models = {n: TSGAN.from_pretrained(w, device="cpu") for n, w in zip(names, a.weights)}
    for n, w in zip(names, a.weights):
        if getattr(models[n], "nodule_texture", None) is None:
            raise SystemExit(f"--weights {w}: no nodule texture model to redraw with")

    val_sp = np.array([ds.records[i].spacing_mm[0] for i in pick["val"]], np.float64)  # crops: native spacing

    def renderer(model):
        def render(hu, masks):
            seeds = [a.seed * 1_000_003 + i for i in range(len(hu))]
            return model.nodule_texture.render(torch.from_numpy(hu), torch.from_numpy(masks), seeds,
                                               spacing_mm=val_sp).numpy()
        return render

    tag = (lambda n: f" ({n})") if len(models) > 1 else (lambda n: "")
    o = (ds.images.shape[1] - 64) // 2
    centre = lambda x: np.ascontiguousarray(x[:, o : o + 64, o : o + 64])
    net = InceptionFeatures("cpu")
    f_test = net(centre(np.asarray(ds.images[pick["test"]], np.float32)))
    sets = {"train crops (the floor side)": centre(np.asarray(ds.images[pick["train"]], np.float32))}
    val_m = np.asarray(ds.masks[pick["val"]])
    val = variants(np.asarray(ds.images[pick["val"]], np.float32), val_m,
                   {tag(n): renderer(m) for n, m in models.items()})
    sets.update({f"VAL crops, nodule {k}": centre(v) for k, v in val.items()})
    inner = {f"VAL crops, nodule {k}": interior_std(v, val_m) for k, v in val.items()}
    gap = {f"VAL crops, nodule {k}": density_gap(v, val["kept"], val_m, val_sp) for k, v in val.items()}
    if a.grid:
        size_grid(a.grid, {k: centre(v) for k, v in val.items() if k == "kept" or k.startswith("redrawn")}, centre(val_m))
    for n, model in models.items() if a.generated else ():
        b = Synthesizer(model, GenerationConfig(seed=a.seed)).generate(range(a.generated))
        gw = nodule_windows(b.images_hu.numpy(), b.masks.numpy(), float(model.meta.get("spacing_mm") or 0.8),
                            LIDC_MEDIAN_SPACING_MM)  # 64², centred on each nodule
        sets[f"generated nodule windows{tag(n)} ({len(gw)})"] = gw
    rows = []
    for name, x in sets.items():  # every set: 64² windows
        r = kid(net(x), f_test, subsets=a.subsets, subset_size=a.n // 2, seed=a.seed)
        rows.append({"set": name, "kid_x1000": round(r.mean * 1000, 2), "kid_std_x1000": round(r.std * 1000, 2),
                     "lung_lap": lung_fine_texture(x), **({"interior_std_hu": inner[name]} if name in inner else {}),
                     **({"density_gap_hu": gap[name]} if name in gap else {})})
        print(f"{name:36} KID×1000 {rows[-1]['kid_x1000']:6.2f} ± {rows[-1]['kid_std_x1000']:5.2f}  "
              f"lung |∇²| {rows[-1]['lung_lap']}  interior std {inner.get(name, '–')}  "
              f"density gap {gap.get(name, '–')}", flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    doc = {"command": "python benchmarks/nodule_context.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "weights": {n: str(m.source) for n, m in models.items()},
           "revision": {n: str(m.revision) for n, m in models.items()}, "n": a.n, "seed": a.seed,
           "against": f"{a.n} TEST-patient crops of {a.prepared / CROP_SET}, central 64²", "rows": rows,
           "wall_s": round(time.time() - t0, 1)}
    write_json(a.out / "nodule_context.json", doc)
    (a.out / "nodule_context.txt").write_text(
        f"KID × 1000 against {doc['against']}\n" + "\n".join(
            f"{r['set']:36} {r['kid_x1000']:6.2f} ± {r['kid_std_x1000']:5.2f}   lung |∇²| {r['lung_lap']}"
            f"   interior std {r.get('interior_std_hu', '–')}   density gap {r.get('density_gap_hu', '–')}"
            for r in rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
