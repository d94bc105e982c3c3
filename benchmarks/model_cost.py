"""Parameter counts and forward GFLOPs of both TSGAN generators at 512×512 (paper configs), and what
the translator's texture options (decoder noise, resize-conv, multi-scale PatchGAN) add.

Counts with ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs = 2 × multiply-adds; convs,
matmuls and attention; elementwise ops are not counted). Batch 1, CPU, fp32. Run:

    python benchmarks/model_cost.py            # table + benchmarks/results/model_cost.json
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from nodulesynth.models import (DLPix2PixGenerator, MaskDiscriminator, MaskGANConfig, MaskGenerator,
                                PatchDiscriminator, TranslatorConfig, one_hot)
from nodulesynth.models.pix2pix import build_discriminator


def _count(module: torch.nn.Module, *inputs) -> tuple[float, float]:
    """(GFLOPs of one forward, seconds it took) under no_grad."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        t0 = time.perf_counter()
        module(*inputs)
        dt = time.perf_counter() - t0
    return counter.get_total_flops() / 1e9, dt


def measure(size: int = 512) -> list[dict]:
    torch.manual_seed(0)
    mask_cfg = MaskGANConfig(resolution=size)
    labels = torch.randint(0, 6, (1, size, size))
    onehot = one_hot(labels)
    image = torch.zeros(1, 1, size, size)
    rows = []

    def add(name: str, module: torch.nn.Module, *inputs, config: str = "") -> None:
        gflops, dt = _count(module.eval(), *inputs)
        params = sum(p.numel() for p in module.parameters())
        rows.append({"network": name, "config": config, "params_M": round(params / 1e6, 3),
                     "gflops_forward": round(gflops, 2), "cpu_forward_s": round(dt, 2)})

    add("MaskGenerator (StyleGAN2-mod)", MaskGenerator(mask_cfg), torch.randn(1, mask_cfg.z_dim),
        config=f"res {size}, fmap_base {mask_cfg.fmap_base}, 8 mapping layers")
    add("MaskDiscriminator", MaskDiscriminator(mask_cfg), torch.softmax(torch.randn(1, 6, size, size), 1),
        config=f"res {size}")
    for lia, dwmh, name in [(True, True, "DL-Pix2Pix generator"), (False, False, "pix2pix UNet (no LIA/DWMH)")]:
        cfg = TranslatorConfig(ngf=64, num_downs=8, lia=lia, dwmh=dwmh)
        add(name, DLPix2PixGenerator(cfg), onehot,
            config=f"ngf 64, 8 downs, lia={lia}, dwmh={dwmh} (depth {cfg.dwmh_depth}, window {cfg.dwmh_window})")
    for noise, upsample in [(True, "transpose"), (False, "bilinear"), (True, "bilinear")]:
        cfg = TranslatorConfig(ngf=64, num_downs=8, noise=noise, upsample=upsample)
        add("DL-Pix2Pix + texture options", DLPix2PixGenerator(cfg), onehot,
            config=f"ngf 64, 8 downs, LIA+DWMH, noise={noise}, upsample={upsample}")
    cfg = TranslatorConfig(ngf=64)
    add("PatchGAN 70x70", PatchDiscriminator(cfg), onehot, image, config="ndf 64, n_layers 3")
    for num_d in (2, 3):
        add(f"multi-scale PatchGAN x{num_d}", build_discriminator(TranslatorConfig(ngf=64, num_d=num_d)), onehot, image,
            config=f"ndf 64, n_layers 3, {num_d} scales (pix2pixHD)")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "model_cost.json")
    args = parser.parse_args(argv)
    rows = measure(args.size)
    print(f"{'network':32s} {'params (M)':>11s} {'GFLOPs/fwd':>11s} {'CPU s':>7s}  config")
    for r in rows:
        print(f"{r['network']:32s} {r['params_M']:11.2f} {r['gflops_forward']:11.2f} {r['cpu_forward_s']:7.2f}  "
              f"{r['config']}")
    from nodulesynth.io import write_json

    write_json(args.out, {"size": args.size, "batch": 1, "torch": torch.__version__, "machine": platform.machine(),
                          "flops_note": "FLOPs = 2 x MACs, FlopCounterMode, forward only", "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
