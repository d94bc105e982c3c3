"""Training speed of both TSGAN trainers (steps/s, images/s) on CPU and, if present, CUDA.

Runs the real trainers (`train_masks`, `train_translator`) on a synthetic slice dataset and reads
the per-step throughput they log to metrics.csv, skipping warm-up steps (and, for the masks, every
level below the last one, so the number is for the target resolution).

    python benchmarks/train_speed.py                      # small CPU config
    python benchmarks/train_speed.py --paper --devices cuda   # paper-size nets (512², ngf 64)
    python benchmarks/train_speed.py --texture                # translator with the texture options
"""
from __future__ import annotations

import argparse
import dataclasses
import csv
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from nodulesynth.data.slices import SliceRecord, write_slice_dataset
from nodulesynth.models.pix2pix import TranslatorConfig
from nodulesynth.models.stylegan import MaskGANConfig
from nodulesynth.train import MaskTrainConfig, TranslatorTrainConfig, train_masks, train_translator


def synthetic_dataset(folder: Path, n: int, size: int) -> str:
    """Ellipse chests (body, lungs, trachea) with a nodule on every slice: shapes only matter for speed."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        cx, cy = 0.5 + rng.uniform(-0.03, 0.03, 2)
        m = masks[i]
        m[((xx - cx) / 0.42) ** 2 + ((yy - cy) / 0.33) ** 2 < 1] = 1
        m[((xx - cx + 0.17) / 0.13) ** 2 + ((yy - cy) / 0.22) ** 2 < 1] = 3
        m[((xx - cx - 0.17) / 0.13) ** 2 + ((yy - cy) / 0.22) ** 2 < 1] = 2
        m[((xx - cx) / 0.03) ** 2 + ((yy - cy + 0.12) / 0.03) ** 2 < 1] = 4
        m[(xx - cx - 0.17) ** 2 + (yy - cy) ** 2 < 0.04**2] = 5
    images = (np.array([-1024, 40, -850, -850, -1000, 30], np.float32)[masks] + rng.normal(0, 20, masks.shape))
    recs = [SliceRecord("bench", float(i), i, (0.8, 0.8), np.zeros((0, 4), np.float32), "phantom", True) for i in range(n)]
    return str(write_slice_dataset(folder, images.astype(np.int16), masks, recs))


def _rate(run: Path, first_step: int, batch: int) -> tuple[float, float]:
    with open(run / "metrics.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if int(r["step"]) > first_step][:-1]  # last row includes eval/export
    img_s = float(np.median([float(r["imgs_per_s"]) for r in rows]))
    return img_s / batch, img_s


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    p.add_argument("--paper", action="store_true", help="paper-size networks at 512 (GPU)")
    p.add_argument("--mask-resolution", type=int, default=64)
    p.add_argument("--mask-batch", type=int, default=8)
    p.add_argument("--fmap-base", type=int, default=1024)
    p.add_argument("--fmap-max", type=int, default=128)
    p.add_argument("--z-dim", type=int, default=128)
    p.add_argument("--image-size", type=int, default=128, help="translator training crop")
    p.add_argument("--translator-batch", type=int, default=1)
    p.add_argument("--ngf", type=int, default=16)
    p.add_argument("--num-downs", type=int, default=7)
    p.add_argument("--steps", type=int, default=8, help="timed steps per measurement (after 2 warm-up steps)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--texture", action="store_true",
                   help="translator with the texture options (decoder noise, bilinear resize-conv, 2-scale D, FM)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.paper:
        mcfg = MaskGANConfig(resolution=512)
        tcfg = TranslatorConfig()
        a.mask_resolution = a.image_size = 512
    else:
        mcfg = MaskGANConfig(resolution=a.mask_resolution, fmap_base=a.fmap_base, fmap_max=a.fmap_max,
                             z_dim=a.z_dim, w_dim=a.z_dim, mapping_layers=4)
        tcfg = TranslatorConfig(ngf=a.ngf, ndf=a.ngf, num_downs=a.num_downs, dwmh_depth=min(5, a.num_downs - 2))
    if a.texture:
        tcfg = dataclasses.replace(tcfg, noise=True, upsample="bilinear", num_d=2)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        size = max(a.mask_resolution, a.image_size)
        data = synthetic_dataset(tmp / "data", max(16, a.mask_batch, a.translator_batch * 4), size)
        for dev in a.devices:
            per = a.steps + 2
            run = train_masks(MaskTrainConfig(
                data=data, out=str(tmp / f"m-{dev}"), model=mcfg, steps_per_level=per, batch_sizes=(a.mask_batch,),
                checkpoint_every=10**9, sample_every=10**9, log_every=1, eval_samples=8, device=dev))
            sps, ips = _rate(run, per * (mcfg.num_levels - 1) + 2, a.mask_batch)
            results.append(("masks (StyleGAN, last level)", dev, f"{a.mask_resolution}²", a.mask_batch, sps, ips))
            run = train_translator(TranslatorTrainConfig(
                data=data, out=str(tmp / f"t-{dev}"), model=tcfg, epochs=10**6, batch_size=a.translator_batch,
                crop_size=a.image_size, checkpoint_every=10**9, log_every=1, max_steps=a.steps + 3, num_workers=2,
                device=dev, lambda_fm=10.0 if a.texture else 0.0))
            sps, ips = _rate(run, 2, a.translator_batch)
            results.append(("translator (DL-Pix2Pix)", dev, f"{a.image_size}²", a.translator_batch, sps, ips))
    print(f"\n{'trainer':<30} {'device':<7} {'size':>6} {'batch':>5} {'steps/s':>9} {'img/s':>9}")
    for name, dev, size, bs, sps, ips in results:
        print(f"{name:<30} {dev:<7} {size:>6} {bs:>5} {sps:>9.3f} {ips:>9.2f}")
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
