"""How CT-like is the procedural phantom? Side-by-side slices and HU statistics vs the real LIDC sample.

    python benchmarks/phantom_vs_real.py [--seeds 0 1] [--out benchmarks/results/phantom_vs_real.png]

Writes a PNG (real and phantom slices in the lung and mediastinal windows, HU histograms inside
the body and inside the lungs) and prints a table of HU statistics per region. Regions come from
the same code for both (``nodulesynth.masks.semantic``: body by threshold, lungs as low-HU
components), so the comparison does not favour the phantom's own ground truth.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from nodulesynth.data.ct import load_ct  # noqa: E402
from nodulesynth.data.phantom import PhantomConfig, make_phantom  # noqa: E402
from nodulesynth.masks.classes import MaskClass  # noqa: E402
from nodulesynth.masks.semantic import semantic_mask  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REAL = REPO / ".." / "shared" / "data" / "lidc-idri-sample"


def real_series() -> list[tuple[str, np.ndarray, tuple[float, float]]]:
    """(name, HU (z, y, x), in-plane spacing) for each real series folder (the one holding .dcm files)."""
    out = []
    for patient in sorted(REAL.glob("LIDC-IDRI-*")):
        for folder in sorted({p.parent for p in patient.rglob("*.dcm")}):
            ct = load_ct(folder).canonical()
            out.append((patient.name, ct.hu, (ct.spacing[1], ct.spacing[2])))
    return out


def regions(hu3: np.ndarray, spacing: tuple[float, float], every: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """HU values inside the body and inside the lungs, from semantic_mask on each (every-th) slice."""
    body_v, lung_v = [], []
    for k in range(0, hu3.shape[0], every):
        m = semantic_mask(hu3[k], spacing)
        body_v.append(hu3[k][m > 0])
        lung_v.append(hu3[k][(m == MaskClass.LEFT_LUNG) | (m == MaskClass.RIGHT_LUNG)])
    return np.concatenate(body_v).astype(np.float32), np.concatenate(lung_v).astype(np.float32)


def noise_std(hu3: np.ndarray) -> float:
    """Median local std (5×5) over flat soft tissue / fat: the image noise level."""
    vals = []
    for k in range(0, hu3.shape[0], max(1, hu3.shape[0] // 8)):
        s = hu3[k].astype(np.float32)
        mean = ndimage.uniform_filter(s, 5)
        sd = np.sqrt(np.maximum(ndimage.uniform_filter(s * s, 5) - mean**2, 0))
        flat = (mean > -150) & (mean < 100)
        if flat.any():
            vals.append(sd[flat])
    return float(np.median(np.concatenate(vals))) if vals else float("nan")


def peak(values: np.ndarray, lo: float, hi: float) -> float:
    """Histogram mode within [lo, hi] HU (10 HU bins): where a tissue class sits."""
    h, e = np.histogram(values, bins=np.arange(lo, hi + 10, 10))
    return float(e[np.argmax(h)] + 5) if h.sum() else float("nan")


def stats(name: str, hu3: np.ndarray, spacing, every: int = 1) -> dict:
    body, lungs = regions(hu3, spacing, every)
    soft = body[(body > -250) & (body < 250)]
    return dict(
        name=name, body=body, lungs=lungs,
        row={
            "lung p5/p50/p95": "%.0f / %.0f / %.0f" % tuple(np.percentile(lungs, [5, 50, 95])) if len(lungs) else "-",
            "lung mean": f"{lungs.mean():.0f}" if len(lungs) else "-",
            "lung >-500 (vessels) %": f"{100 * (lungs > -500).mean():.1f}" if len(lungs) else "-",
            "body p5/p50/p95": "%.0f / %.0f / %.0f" % tuple(np.percentile(body, [5, 50, 95])),
            "fat peak": f"{peak(soft, -200, -30):.0f}",
            "soft-tissue peak": f"{peak(soft, -20, 120):.0f}",
            "body >300 (bone) %": f"{100 * (body > 300).mean():.1f}",
            "noise std": f"{noise_std(hu3):.1f}",
            "lung area % of body": f"{100 * len(lungs) / max(len(body), 1):.0f}",
        },
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--slices", type=int, default=48)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "phantom_vs_real.png")
    args = ap.parse_args(argv)
    if not REAL.is_dir():
        print(f"real sample not found at {REAL.resolve()}; nothing to compare", file=sys.stderr)
        return 2

    reals = [stats(n, hu, sp) for n, hu, sp in real_series()]
    real_hu = {n: hu for n, hu, _ in real_series()}
    phantoms, ph_hu, times = [], {}, []
    for seed in args.seeds:
        t = time.perf_counter()
        scan = make_phantom(seed, PhantomConfig(slices=args.slices))
        times.append(time.perf_counter() - t)
        name = f"phantom seed {seed}"
        ph_hu[name] = scan.hu
        phantoms.append(stats(name, scan.hu, scan.spacing[1:], every=3))
        phantoms[-1]["spacing"] = scan.spacing

    # ---- table ----
    cols = reals + phantoms
    keys = list(cols[0]["row"])
    w0 = max(len(k) for k in keys) + 2
    print(f"phantom generation: {np.mean(times):.2f} s per 512x512x{args.slices} scan (mean of {len(times)})")
    print("".ljust(w0) + "".join(c["name"].rjust(22) for c in cols))
    for k in keys:
        print(k.ljust(w0) + "".join(c["row"][k].rjust(22) for c in cols))
    all_real_l = np.concatenate([c["lungs"] for c in reals])
    all_ph_l = np.concatenate([c["lungs"] for c in phantoms])
    all_real_b = np.concatenate([c["body"] for c in reals])
    all_ph_b = np.concatenate([c["body"] for c in phantoms])

    def hist_l1(a, b, lo, hi):
        bins = np.arange(lo, hi + 10, 10)
        ha = np.histogram(a, bins)[0] / max(len(a), 1)
        hb = np.histogram(b, bins)[0] / max(len(b), 1)
        return 0.5 * np.abs(ha - hb).sum()

    print(f"histogram total-variation distance (0 = identical, 1 = disjoint; 10 HU bins): "
          f"lungs {hist_l1(all_real_l, all_ph_l, -1024, 200):.2f}, body {hist_l1(all_real_b, all_ph_b, -1024, 1000):.2f}")

    # ---- picture ----
    names = list(real_hu) + list(ph_hu)
    vols = [real_hu[n] for n in real_hu] + [ph_hu[n] for n in ph_hu]
    fig, ax = plt.subplots(3, len(names), figsize=(4.2 * len(names), 12.6))
    for j, (n, v) in enumerate(zip(names, vols)):
        k = v.shape[0] // 2
        ax[0, j].imshow(v[k], cmap="gray", vmin=-1000, vmax=400)
        ax[0, j].set_title(f"{n}\nlung window [-1000, 400]", fontsize=9)
        ax[1, j].imshow(v[k], cmap="gray", vmin=-160, vmax=240)
        ax[1, j].set_title("mediastinal window [-160, 240]", fontsize=9)
        ax[0, j].axis("off")
        ax[1, j].axis("off")
    for j, (lab, rv, pv, lo, hi) in enumerate(((("body"), all_real_b, all_ph_b, -1024, 1000),
                                                 (("lungs"), all_real_l, all_ph_l, -1024, 0))):
        a = ax[2, j]
        bins = np.arange(lo, hi + 10, 10)
        a.hist(rv, bins, density=True, histtype="step", color="k", label="real LIDC")
        a.hist(pv, bins, density=True, histtype="step", color="r", label="phantom")
        a.set_yscale("log")
        a.set_title(f"HU histogram inside {lab}", fontsize=9)
        a.legend(fontsize=8)
    for j in range(2, len(names)):
        ax[2, j].axis("off")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
