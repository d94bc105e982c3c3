"""Images/s of synthetic-slice generation, end to end, in memory and to disk (COCO, 8-bit PNG).

    python benchmarks/generate_speed.py --weights pretrained          # trained weights
    python benchmarks/generate_speed.py --fresh --n 16 --block 8      # paper-size untrained model

--fresh builds a paper-size TSGAN (mask StyleGAN 512², fmap_base 8192; DL-Pix2Pix ngf 64, 8 downs,
LIA + DWMH) with random weights and turns the quality gate off (random masks never pass it), so
the numbers time the networks, box extraction and writing, not rejection sampling.
Runs on CPU, and on CUDA too when present; prints a table and writes benchmarks/results/generate_speed.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nodulesynth.export.writer import DatasetWriter, ExportItem, ExportSpec, finalize  # noqa: E402
from nodulesynth.runtime import resolve_device  # noqa: E402
from nodulesynth.synth.dataset import load_tsgan  # noqa: E402
from nodulesynth.synth.pipeline import GenerationConfig, Synthesizer, quality_gate  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "generate_speed.json"


def fresh_tsgan(size: int):
    from nodulesynth.models.pix2pix import TranslatorConfig
    from nodulesynth.models.stylegan import MaskGANConfig
    from nodulesynth.models.tsgan import TSGAN

    torch.manual_seed(0)
    downs = size.bit_length() - 2  # 512 → 8 (the paper's UNet depth); smaller sizes only for quick checks
    tcfg = TranslatorConfig(num_downs=downs, dwmh_depth=min(5, downs - 3) if downs > 3 else 1)
    return TSGAN.from_configs(MaskGANConfig(resolution=size), tcfg, image_size=size).eval()


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bench_device(model, dev: torch.device, cfg: GenerationConfig, n: int, workers: int = 1) -> dict:
    synth = Synthesizer(model.to(dev), cfg)
    synth.generate(range(cfg.block))  # warm-up (allocations, kernel choice)
    keys = [(i, 0) for i in range(cfg.block)]
    stages = {}
    for name, fn in [("masks", lambda: synth._masks(keys))]:
        sync(dev)
        t = time.perf_counter()
        masks = fn()
        sync(dev)
        stages[name] = (time.perf_counter() - t) / cfg.block
    t = time.perf_counter()
    quality_gate(masks, cfg, synth.spacing_mm)
    sync(dev)
    stages["gate+boxes"] = (time.perf_counter() - t) / cfg.block
    t = time.perf_counter()
    synth._translate(masks)
    sync(dev)
    stages["translate"] = (time.perf_counter() - t) / cfg.block

    t = time.perf_counter()
    for s in range(0, n, cfg.batch_size):
        synth.generate(range(s, min(s + cfg.batch_size, n)))
    sync(dev)
    mem = n / (time.perf_counter() - t)

    tmp = Path(tempfile.mkdtemp(prefix="nodulesynth-bench-"))
    try:  # what `generate` does: COCO 8-bit PNG + RLE on export worker processes
        t = time.perf_counter()
        spec = ExportSpec(("coco",), "png")
        w = DatasetWriter(tmp, spec, workers)
        for s in range(0, n, cfg.batch_size):
            b = synth.generate(range(s, min(s + cfg.batch_size, n)))
            hu = b.images_hu.round().short().numpy()
            for k, prov in enumerate(b.provenance):
                w.add(ExportItem(f"synth_{prov['index']:06d}", hu[k], b.masks[k].numpy(), b.boxes[k], "synthetic",
                                 (synth.spacing_mm, synth.spacing_mm), prov, "train", s + k))
        finalize(tmp, spec, w.drain(), {}, tmp)
        w.close()
        disk = n / (time.perf_counter() - t)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"device": str(dev), "n": n, "block": cfg.block, "in_memory_img_s": mem, "to_disk_img_s": disk,
            "stage_s_per_img": stages}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=None, help="TSGAN folder / 'pretrained' / hub id")
    p.add_argument("--fresh", action="store_true", help="paper-size untrained model, gate off")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--block", type=int, default=16, help="forward-pass rows (GenerationConfig.block)")
    p.add_argument("--workers", type=int, default=1, help="export worker processes for the to-disk run (0 = inline)")
    p.add_argument("--devices", default="auto", help="comma list (cpu,cuda) or auto = cpu + cuda if present")
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)
    if not a.fresh and a.weights is None:
        p.error("give --weights or --fresh")
    devices = (["cpu"] + (["cuda"] if torch.cuda.is_available() else [])) if a.devices == "auto" else a.devices.split(",")
    rows = []
    for d in devices:
        dev = resolve_device(d)
        model = fresh_tsgan(a.size) if a.fresh else load_tsgan(a.weights, dev)
        cfg = GenerationConfig(block=a.block, batch_size=a.block, gate=not a.fresh)
        rows.append(bench_device(model, dev, cfg, a.n, a.workers))
        print(f"done {d}", file=sys.stderr)
    head = f"{'device':8} {'n':>4} {'block':>5} {'in-memory img/s':>16} {'to-disk img/s':>14}  s/img: masks gate translate"
    print(head)
    for r in rows:
        st = r["stage_s_per_img"]
        print(f"{r['device']:8} {r['n']:4d} {r['block']:5d} {r['in_memory_img_s']:16.3f} {r['to_disk_img_s']:14.3f}  "
              f"{st['masks']:.3f} {st['gate+boxes']:.3f} {st['translate']:.3f}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": "python benchmarks/generate_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": "fresh paper-size (untrained, gate off)" if a.fresh else str(a.weights),
        "size": a.size, "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d"), "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
