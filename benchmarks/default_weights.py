"""Recipe and evaluation of the shipped default weights (pretrained/).

    python benchmarks/default_weights.py data  --phantom P --lidc L --out DIR   # train/holdout sets
    python benchmarks/default_weights.py eval  --weights pretrained --data DIR   # held-out quality
    python benchmarks/default_weights.py ship  --masks RUN --translator RUN [--lung-texture RUN] --card CARD.md

`data` splits the prepared phantom slices by series (whole scans held out) and the real LIDC-IDRI
slices by slice (only 2 real patients exist here; every 4th slice is held out, and adjacent slices
are correlated, so the real held-out figures are optimistic), then writes:
  masks-train/       phantom train + real train ×4       (stage 1)
  translator-train/  phantom train + real train ×15      (stage 2: real texture over-sampled)
  holdout-real/, holdout-phantom/
`eval` translates the held-out real masks and reports PSNR/SSIM on the lung window, and samples
masks from the StyleGAN to compare nodule rate and size with the training masks.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch


def build_data(args) -> None:
    from nodulesynth.data.slices import SliceDataset, split_by_series, write_slice_subset

    out = Path(args.out)
    ph, real = SliceDataset(args.phantom), SliceDataset(args.lidc)
    ph_train, ph_hold = split_by_series(ph, holdout_series=args.holdout_scans, seed=0)
    real_hold = list(range(2, len(real), 4))
    real_train = [i for i in range(len(real)) if i not in real_hold]
    write_slice_subset(out / "masks-train", [(ph, ph_train), (real, real_train * 4)], {"recipe": "masks-train"})
    write_slice_subset(out / "translator-train", [(ph, ph_train), (real, real_train * 15)], {"recipe": "translator-train"})
    write_slice_subset(out / "holdout-real", [(real, real_hold)], {"recipe": "holdout-real"})
    write_slice_subset(out / "holdout-phantom", [(ph, ph_hold)], {"recipe": "holdout-phantom"})
    summary = {
        "phantom_train_slices": len(ph_train), "phantom_holdout_slices": len(ph_hold),
        "real_train_slices": len(real_train), "real_holdout_slices": len(real_hold),
        "phantom_holdout_series": sorted({ph.records[i].series_uid for i in ph_hold}),
    }
    (out / "split.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


@torch.inference_mode()
def evaluate(args) -> None:
    from nodulesynth.data.slices import SliceDataset
    from nodulesynth.hu import unit_to_hu
    from nodulesynth.metrics.image_quality import psnr, ssim
    from nodulesynth.metrics.nodules import nodule_stats
    from nodulesynth.models.pix2pix import one_hot
    from nodulesynth.models.tsgan import TSGAN
    from nodulesynth.synth.pipeline import GenerationConfig, quality_gate

    torch.manual_seed(0)
    model = TSGAN.from_pretrained(args.weights)
    report: dict = {"weights": model.source, "revision": model.revision}
    for name in ("holdout-real", "holdout-phantom") if args.data else ():
        ds = SliceDataset(Path(args.data) / name)
        masks = torch.from_numpy(np.array(ds.masks)).long()
        real = torch.from_numpy(np.array(ds.images)).float()
        fake = torch.cat([unit_to_hu(model.translator(one_hot(m[None]))[:, 0]) for m in masks])
        lung = (masks == 2) | (masks == 3)
        report[name] = {
            "slices": len(ds),
            "psnr_db": round(psnr(fake, real).mean().item(), 2),
            "ssim": round(ssim(fake, real).mean().item(), 4),
            "lung_hu_fake_vs_real": [round(fake[lung].mean().item(), 1), round(real[lung].mean().item(), 1)],
            "body_hu_fake_vs_real": [round(fake[masks == 1].median().item(), 1), round(real[masks == 1].median().item(), 1)],
        }
    train = SliceDataset(Path(args.data) / "masks-train") if args.data else None
    spacing = model.spacing_mm or float(train.records[0].spacing_mm[0])
    z = torch.randn(args.samples, model.mask_config.z_dim, generator=torch.Generator().manual_seed(0))
    gen = torch.cat([model.mask_generator.sample(zz, size=model.image_size) for zz in z.split(16)]).numpy()
    report["masks_generated"] = nodule_stats(gen, spacing).summary()
    passed, why, _ = quality_gate(torch.from_numpy(gen), GenerationConfig(), spacing)
    report["quality_gate"] = {"pass_rate": round(passed.float().mean().item(), 4),
                              "rejected": dict(Counter(w for w in why if w))}
    report["masks_accepted"] = nodule_stats(gen[passed.numpy()], spacing).summary()
    if train is not None:
        report["masks_train"] = nodule_stats(np.asarray(train.masks), spacing).summary()
    if args.preview and args.data:  # top row: generated (mask | CT); bottom row: held-out real (mask | CT)
        from nodulesynth.synth.pipeline import Synthesizer
        from nodulesynth.viz import preview_grid

        gen_b = Synthesizer(model, GenerationConfig(seed=0, block=4)).generate(range(4))
        real = SliceDataset(Path(args.data) / "holdout-real")
        preview_grid(args.preview, images_hu=list(gen_b.images_hu.numpy()) + [real.images[i] for i in range(4)],
                     masks=list(gen_b.masks.numpy()) + [real.masks[i] for i in range(4)],
                     boxes=list(gen_b.boxes) + [real.records[i].boxes for i in range(4)], columns=4, tile=192)
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


def ship(args) -> None:
    """Assemble pretrained/ from two finished runs (and the lung texture run): fp16 safetensors +
    configs + the model card (the one card writer, models.card, with --card appended as the
    hand-written section)."""
    from nodulesynth.models.export import export_tsgan
    from nodulesynth.models.tsgan import TSGAN

    card = Path(args.card).read_text(encoding="utf-8") if args.card else None
    export_tsgan(args.masks, args.translator, args.out, model_card_extra=card, overwrite=True,
                 spacing_mm=args.spacing, dtype=torch.float16, data_note=args.data_note or None,
                 lung_texture=args.lung_texture)
    print(f"shipped {args.out}: revision {TSGAN.from_pretrained(args.out).revision}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data")
    d.add_argument("--phantom", required=True)
    d.add_argument("--lidc", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--holdout-scans", type=int, default=4)
    e = sub.add_parser("eval")
    e.add_argument("--weights", default="pretrained")
    e.add_argument("--data", default=None, help="recipe folder (held-out sets, training masks); without it only "
                   "the sampled-mask statistics are measured")
    e.add_argument("--samples", type=int, default=128)
    e.add_argument("--json", default=None)
    e.add_argument("--preview", default=None, help="PNG: 4 generated (top) above 4 held-out real slices")
    s = sub.add_parser("ship")
    s.add_argument("--masks", required=True)
    s.add_argument("--translator", required=True)
    s.add_argument("--out", default="pretrained")
    s.add_argument("--card", default=None, help="model card markdown (README.md of the weights)")
    s.add_argument("--lung-texture", default=None, help="lung texture run (or weights folder) to ship beside them")
    s.add_argument("--spacing", type=float, default=None,
                   help="mm per pixel of the training slices (default: read from the runs' data)")
    s.add_argument("--data-note", default="", help="one line: what the weights were trained on")
    args = p.parse_args()
    {"data": build_data, "eval": evaluate, "ship": ship}[args.cmd](args)


if __name__ == "__main__":
    main()
