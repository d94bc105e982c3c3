"""Side-by-side picture of several weight folders: the same samples (seed, indices) from each, one
row per folder, each sample as the whole slice and a 4x zoom on its first nodule (lung window
-1000..400 HU). Folders that share a mask generator draw the same masks, so the rows differ only by
the translator: the quickest way to see checkerboards, halos, vessels and nodule texture.

    python benchmarks/compare_weights.py --weights pretrained runs/gpu/texture --out DIR/compare.png
    python benchmarks/compare_weights.py --weights pretrained --background translator scanner --out FILE
    python benchmarks/compare_weights.py --weights pretrained --body translator atlas --out FILE
    python benchmarks/compare_weights.py --weights pretrained --lungs texture library --out FILE
    python benchmarks/compare_weights.py --weights A B --texture ground-glass part-solid --out FILE
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def tiles(hu: np.ndarray, mask: np.ndarray, tile: int, zoom_px: int = 96) -> list[np.ndarray]:
    """[whole slice, zoom on the nodule (or the centre)] at tile² each."""
    from PIL import Image

    from nodulesynth.hu import window_uint8
    from nodulesynth.masks.classes import MaskClass

    im = window_uint8(hu)
    ys, xs = np.nonzero(mask == MaskClass.NODULE)
    cy, cx = (int(ys.mean()), int(xs.mean())) if len(ys) else (im.shape[0] // 2, im.shape[1] // 2)
    h = zoom_px // 2
    y0 = int(np.clip(cy - h, 0, im.shape[0] - zoom_px))
    x0 = int(np.clip(cx - h, 0, im.shape[1] - zoom_px))

    def fit(a: np.ndarray, resample) -> np.ndarray:
        return np.asarray(Image.fromarray(a).resize((tile, tile), resample))

    return [fit(im, Image.LANCZOS), fit(im[y0:y0 + zoom_px, x0:x0 + zoom_px], Image.NEAREST)]


def main(argv=None) -> int:
    from nodulesynth.synth.lung_library import MODES as LUNG_MODES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", nargs="+", required=True, help="TSGAN weight folders (one row each)")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    p.add_argument("--n", type=int, default=4, help="samples per row")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--tile", type=int, default=192)
    p.add_argument("--background", nargs="+", default=["scanner"], choices=("scanner", "translator"),
                   help="generate's --background; several: one row per weights and background")
    p.add_argument("--body", nargs="+", default=["atlas"], choices=("atlas", "translator"),
                   help="generate's --body; several: one row per weights, background and body")
    p.add_argument("--lungs", nargs="+", default=[None], choices=LUNG_MODES,
                   help="generate's --lungs (default: generate's); several: one row per weights, background, body and lungs")
    p.add_argument("--texture", nargs="+", default=[None], choices=("solid", "part-solid", "ground-glass"),
                   help="generate's --texture (LIDC nodules of that class); several: one row per texture, then weights, ...")
    a = p.parse_args(argv)
    from PIL import Image

    from nodulesynth.models.tsgan import TSGAN
    from nodulesynth.synth.pipeline import GenerationConfig, Synthesizer

    rows = []
    for tex, w, bg, body, lungs in [(t, w, bg, body, lg) for t in a.texture for w in a.weights for bg in a.background
                                    for body in a.body for lg in a.lungs]:
        model = TSGAN.from_pretrained(w, device="cpu")
        lungs = lungs or GenerationConfig.lungs
        b = Synthesizer(model, GenerationConfig(seed=a.seed, block=8, background=bg, body=body, lungs=lungs,
                                                texture=tex)).generate(range(a.n))
        hu, masks = b.images_hu.numpy(), b.masks.numpy()
        rows.append(np.concatenate([t for i in range(a.n) for t in tiles(hu[i], masks[i], a.tile)], 1))
        print(f"{w} ({bg} background, {body} body, {lungs} lungs{f', {tex} nodules' if tex else ''}): "
              f"revision {model.revision}", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_name(a.out.name + ".tmp.png")
    Image.fromarray(np.concatenate(rows, 0)).save(tmp, optimize=True)
    tmp.replace(a.out)
    print(f"wrote {a.out} (rows: {', '.join(a.weights)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
