"""Train the TSGAN stages: `train masks` (StyleGAN), `train translator` (DL-Pix2Pix), `train export`.

Multi-GPU: launch the same command with `torchrun --nproc_per_node=N -m nodulesynth train ...`.
"""
from __future__ import annotations

import argparse
import logging


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="prepared slice dataset folder (nodulesynth prepare)")
    p.add_argument("--out", required=True, help="run folder (checkpoints, samples, metrics.csv, export/)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    p.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints (default 1000)")
    p.add_argument("--max-steps", type=int, default=None, help="stop (checkpoint + export) at this global step")
    p.add_argument("--time-budget", type=float, default=None, help="stop after this many seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--no-amp", action="store_true", help="disable bf16 autocast on CUDA")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="train_command", metavar="STAGE", required=True)

    m = sub.add_parser("masks", help="progressive mask StyleGAN (paper §3.1)")
    _common(m)
    m.add_argument("--resolution", type=int, default=512, help="final mask size (4·2^k, default 512)")
    m.add_argument("--steps-per-level", type=int, default=10_000, help="steps per resolution (paper: 10,000)")
    m.add_argument("--final-steps", type=int, default=None,
                   help="steps at the target resolution (default: --steps-per-level)")
    m.add_argument("--batch-size", type=int, nargs="+", default=None,
                   help="batch size per level 4, 8, ... (last value repeats; default 64 64 64 32 32 16 16 8)")
    m.add_argument("--fmap-base", type=int, default=8192, help="StyleGAN channel budget (channels = base/res)")
    m.add_argument("--fmap-min", type=int, default=16, help="fewest channels at any resolution")
    m.add_argument("--fmap-max", type=int, default=512)
    m.add_argument("--z-dim", type=int, default=512)
    m.add_argument("--mapping-layers", type=int, default=8)
    m.add_argument("--nodule-gain", type=float, default=1.0,
                   help="critic weight of the nodule channel (>1 counters nodule collapse; default 1 = paper)")
    m.add_argument("--all-slices", action="store_true", help="train on all slices, not only nodule slices")
    m.add_argument("--sample-every", type=int, default=500, help="steps between nodule-rate measurements")

    t = sub.add_parser("translator", help="DL-Pix2Pix mask → CT translator (paper §3.2)")
    _common(t)
    t.add_argument("--epochs", type=int, default=200, help="epochs (LR decays linearly over the second half)")
    t.add_argument("--batch-size", type=int, default=1, help="batch size per process (paper: 1)")
    t.add_argument("--crop-size", type=int, default=256, help="random training crop (0 = whole slices)")
    t.add_argument("--ngf", type=int, default=64)
    t.add_argument("--ndf", type=int, default=64)
    t.add_argument("--num-downs", type=int, default=8)
    t.add_argument("--no-lia", action="store_true", help="ablation: no LIA on the skips")
    t.add_argument("--no-dwmh", action="store_true", help="ablation: no DWMH attention")
    t.add_argument("--no-augment", action="store_true", help="disable paired augmentation")
    t.add_argument("--vgg-weights", default=None, help="torchvision VGG-19 weights file for the perceptual loss")
    t.add_argument("--gan-mode", choices=("lsgan", "bce"), default="lsgan")
    t.add_argument("--workers", type=int, default=2, help="DataLoader workers")

    e = sub.add_parser("export", help="assemble a TSGAN folder (from_pretrained layout) from two runs")
    e.add_argument("--masks", required=True, help="mask StyleGAN run folder")
    e.add_argument("--translator", required=True, help="translator run folder")
    e.add_argument("--out", required=True, help="TSGAN folder to write")
    e.add_argument("--overwrite", action="store_true")
    e.add_argument("--card", default=None, help="extra markdown text for the model card")


def _run_common(args: argparse.Namespace) -> dict:
    return dict(data=args.data, out=args.out, resume=args.resume, overwrite=args.overwrite,
                checkpoint_every=args.checkpoint_every, max_steps=args.max_steps, time_budget_s=args.time_budget,
                seed=args.seed, device=args.device, amp=not args.no_amp)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.train_command in ("masks", "translator"):  # before any data is read: clear of inputs, writable
        from ..io import check_out_dir

        check_out_dir(args.out, args.overwrite, reuse=args.resume,
                      inputs=[("--data", args.data), ("--vgg-weights", getattr(args, "vgg_weights", None))])
    if args.train_command == "masks":
        from ..models.stylegan import MaskGANConfig
        from .masks import MaskTrainConfig, train_masks

        model = MaskGANConfig(resolution=args.resolution, fmap_base=args.fmap_base, fmap_max=args.fmap_max, fmap_min=args.fmap_min,
                              z_dim=args.z_dim, w_dim=args.z_dim, mapping_layers=args.mapping_layers)
        extra = {"batch_sizes": tuple(args.batch_size)} if args.batch_size else {}
        out = train_masks(MaskTrainConfig(model=model, steps_per_level=args.steps_per_level, final_level_steps=args.final_steps,
                                          nodule_gain=args.nodule_gain, nodule_only=not args.all_slices,
                                          sample_every=args.sample_every, **extra, **_run_common(args)))
    elif args.train_command == "translator":
        from ..models.pix2pix import TranslatorConfig
        from .translator import TranslatorTrainConfig, train_translator

        model = TranslatorConfig(ngf=args.ngf, ndf=args.ndf, num_downs=args.num_downs, lia=not args.no_lia,
                                 dwmh=not args.no_dwmh)
        out = train_translator(TranslatorTrainConfig(
            model=model, epochs=args.epochs, batch_size=args.batch_size, crop_size=args.crop_size or None,
            augment=not args.no_augment, vgg_weights=args.vgg_weights, gan_mode=args.gan_mode,
            num_workers=args.workers, **_run_common(args)))
    else:
        from .engine import export_tsgan

        out = export_tsgan(args.masks, args.translator, args.out, args.card, overwrite=args.overwrite)
    print(out)
    return 0
