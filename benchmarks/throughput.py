"""Slices/s of TSGAN generation against two references measured in the same run (issue 11).

    python benchmarks/throughput.py                       # CUDA when present, else a tiny CPU config
    python benchmarks/throughput.py --models shipped,paper --batches 16,64,128 --seconds 5

Per model (shipped weights; "paper": paper-size untrained networks, gate off so rejection sampling
is not timed) and batch size:
- translator alone: fp32, bf16, bf16 + channels_last, + torch.compile, + CUDA graphs
  (compile mode "reduce-overhead"), as img/s and as a fraction of the bf16 FLOP roofline
  (forward FLOPs counted with FlopCounterMode as in benchmarks/model_cost.py; peak from --peak-tflops
  or the device name);
- end to end (masks, gate, translation, boxes — the `generate` pipeline at block = batch), in memory
  and to disk (COCO 8-bit PNG + RLE, encoded on export worker processes as `generate` does; their
  start-up is timed apart, `export_start_s`; writing annotations.json is in), with
  the LIDC nodules placed in process and on `generate`'s default placement workers;
- reference: the same translator one image at a time in fp32 (the reference pix2pix test loop).
Writes benchmarks/results/throughput.json (device, versions, every row) and prints a table.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from nodulesynth.export.writer import DatasetWriter, ExportItem, ExportSpec, finalize  # noqa: E402
from nodulesynth.io import write_json  # noqa: E402
from nodulesynth.models.pix2pix import one_hot  # noqa: E402
from nodulesynth.synth.dataset import load_tsgan  # noqa: E402
from nodulesynth.synth.pipeline import GenerationConfig, Synthesizer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "throughput.json"
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}  # dense, no sparsity


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev: torch.device, seconds: float, min_iters: int = 2) -> float:
    """Seconds per call (after one warm-up), repeated for at least ``seconds``."""
    fn()
    sync(dev)
    n, t0 = 0, time.perf_counter()
    while n < min_iters or time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    sync(dev)
    return (time.perf_counter() - t0) / n


def translator_gflops(net: torch.nn.Module, size: int) -> float:
    x = one_hot(torch.randint(0, 6, (1, size, size)))
    with torch.no_grad(), FlopCounterMode(display=False) as c:
        net.float().cpu()(x)
    return c.get_total_flops() / 1e9


def peak_tflops(dev: torch.device, given: float | None) -> float | None:
    if given:
        return given
    if dev.type != "cuda":
        return None
    name = torch.cuda.get_device_name(dev)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def translator_rows(name: str, tsgan, dev: torch.device, batches: list[int], seconds: float, size: int,
                    gflops: float, peak: float | None, compile_: bool) -> Iterator[dict]:
    """One row per variant and batch, yielded as measured (a compile cut short by a time limit keeps the rest)."""
    base = tsgan.translator.float().to(dev).eval()
    variants = [("fp32", torch.float32, False, None), ("bf16", torch.bfloat16, False, None),
                ("bf16+channels_last", torch.bfloat16, True, None)]
    if compile_:
        variants += [("bf16+cl+compile", torch.bfloat16, True, "default"),
                     ("bf16+cl+compile+cudagraphs", torch.bfloat16, True, "reduce-overhead")]
    if dev.type == "cpu":  # bf16 is slower than fp32 on most CPUs; keep the CPU run short
        variants = [("fp32", torch.float32, False, None), ("fp32+channels_last", torch.float32, True, None)]
    for B in batches:
        x0 = one_hot(torch.randint(0, 6, (B, size, size))).to(dev)
        for label, dtype, cl, mode in variants:
            net = base.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
            x = x0.contiguous(memory_format=torch.channels_last) if cl else x0
            if mode is not None:
                net = torch.compile(net, mode=mode)

            def run():
                with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
                    return net(x)
            try:
                s = timed(run, dev, seconds)
            except Exception as e:  # a variant that does not build here is reported, not fatal
                yield {"model": name, "stage": "translator", "variant": label, "batch": B, "error": str(e)[:200]}
                continue
            ips = B / s
            yield {"model": name, "stage": "translator", "variant": label, "batch": B, "img_s": ips,
                   "tflops": ips * gflops / 1e3, "roofline_frac": (ips * gflops / 1e3 / peak) if peak else None}
    base.to(memory_format=torch.contiguous_format)


def reference_row(name: str, tsgan, dev: torch.device, seconds: float, size: int) -> dict:
    """The reference pix2pix test loop: one image per forward, fp32, default layout."""
    net = tsgan.translator.float().to(dev).eval().to(memory_format=torch.contiguous_format)
    x = one_hot(torch.randint(0, 6, (1, size, size))).to(dev)

    def run():
        with torch.inference_mode():
            return net(x)
    return {"model": name, "stage": "reference batch-1 fp32 loop", "variant": "fp32", "batch": 1,
            "img_s": 1 / timed(run, dev, seconds)}


def disk_format() -> str:
    """COCO (PNG + RLE, what `generate` writes by default) where pycocotools is installed, else YOLO
    (the same PNG encoding, text labels): the GPU machine's image may lack pycocotools."""
    try:
        import pycocotools  # noqa: F401
    except ImportError:
        return "yolo"
    return "coco"


def end_to_end_rows(name: str, tsgan, dev: torch.device, batches: list[int], n: int, gate: bool, workers: int,
                    compile_: bool, place: int | None = None, profile: bool = True) -> list[dict]:
    rows = []
    for B in batches:
        cfg = GenerationConfig(block=B, batch_size=B, gate=gate, place_workers=place)
        synth = Synthesizer(tsgan.to(dev), cfg)
        t_start = time.perf_counter()

        def step(what: str) -> None:  # on stderr as it happens: a run cut short shows where it stood
            print(f"  [{name} end to end, batch {B}, placement workers {synth.place_workers}] {what} "
                  f"at {time.perf_counter() - t_start:.1f} s", file=sys.stderr, flush=True)
        if compile_:
            synth.tsgan.translator = torch.compile(synth.tsgan.translator)
        synth.generate(range(B))  # warm-up (and compilation)
        sync(dev)
        step("warm-up done")
        t0 = time.perf_counter()
        for s in range(0, n, B):
            synth.generate(range(s, min(s + B, n)))
        sync(dev)
        mem = n / (time.perf_counter() - t0)
        step(f"{n} slices in memory")
        prof = profile_generate(synth, n, B, dev) if B == batches[-1] and not compile_ and profile else None
        tmp = Path(tempfile.mkdtemp(prefix="nodulesynth-throughput-"))
        try:
            spec = ExportSpec((disk_format(),), "png")
            w = DatasetWriter(tmp, spec, workers)
            t0 = time.perf_counter()
            w.start()  # the export processes' start-up, reported apart from the steady rate
            start_s = time.perf_counter() - t0
            step("export workers started")
            t0 = time.perf_counter()
            for s in range(0, n, B):
                b = synth.generate(range(s, min(s + B, n)))
                hu = b.images_hu.round().short().numpy()
                for k, prov in enumerate(b.provenance):
                    w.add(ExportItem(f"synth_{s + k:06d}", hu[k], b.masks[k].numpy(), b.boxes[k], "synthetic",
                                     (synth.spacing_mm, synth.spacing_mm), prov, "train", s + k))
            finalize(tmp, spec, w.drain(), {}, tmp)
            disk = n / (time.perf_counter() - t0)
            step(f"{n} slices to disk")
            w.close()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if compile_:
            synth.tsgan.translator = synth.tsgan.translator._orig_mod
        synth.close()
        rows.append({"model": name, "stage": "end to end", "variant": ("bf16+cl" if dev.type == "cuda" else "fp32+cl")
                     + ("+compile" if compile_ else ""), "batch": B, "img_s": mem, "to_disk_img_s": disk,
                     "export_workers": workers, "export_start_s": start_s, "export_format": disk_format(), "gate": gate,
                     "place_workers": synth.place_workers})
        if prof:
            rows[-1]["profile_top_tottime"] = prof
    return rows


def profile_generate(synth, n: int, B: int, dev: torch.device, top: int = 20) -> list[dict]:
    """Where an end-to-end pass spends its host time (cProfile, functions by own time): on a GPU
    the slices/s are bound by whichever host-side step this lists first, not by the kernels."""
    import cProfile
    import pstats

    pr = cProfile.Profile()
    pr.enable()
    for s in range(0, n, B):
        synth.generate(range(s, min(s + B, n)))
    sync(dev)
    pr.disable()
    st = pstats.Stats(pr)
    rows = sorted(((v[2], v[3], v[1], k) for k, v in st.stats.items()), reverse=True)[:top]
    return [{"function": f"{Path(k[0]).name}:{k[1]}({k[2]})", "tottime_s": round(tt, 4), "cumtime_s": round(ct, 4),
             "calls": nc, "ms_per_slice": round(1000 * tt / n, 3)} for tt, ct, nc, k in rows]


HEADER = (f"{'model':8} {'stage':28} {'variant':28} {'batch':>5} {'img/s':>9} {'to disk':>8} {'roofline':>8} "
          f"{'place':>5}")


def row_line(r: dict) -> str:
    ips = f"{r['img_s']:9.2f}" if "img_s" in r else f"{'error':>9}"
    disk = f"{r['to_disk_img_s']:8.2f}" if r.get("to_disk_img_s") else f"{'':8}"
    roof = f"{100 * r['roofline_frac']:7.1f}%" if r.get("roofline_frac") else f"{'':8}"
    place = f"{r['place_workers']:5d}" if "place_workers" in r else f"{'':5}"
    return f"{r['model']:8} {r['stage']:28} {r['variant']:28} {r['batch']:5d} {ips} {disk} {roof} {place}"


def write(a, argv, dev: torch.device, peak: float | None, rows: list[dict]) -> Path:
    out = Path(a.out)  # write_json makes the folder and writes through a temp file
    cuda = dev.type == "cuda"
    write_json(out, {
        "command": "python benchmarks/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": torch.cuda.get_device_name(dev) if cuda else (platform.processor() or platform.machine()),
        "torch": torch.__version__, "cuda": torch.version.cuda, "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(), "peak_bf16_tflops": peak, "size": a.size,
        "date": time.strftime("%Y-%m-%d"), "rows": rows})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--models", default=None, help="comma list of shipped, paper (default: both on CUDA, shipped on CPU)")
    p.add_argument("--batches", default=None, help="comma list (default: 16,64,128 on CUDA, 2 on CPU)")
    p.add_argument("--n", type=int, default=None, help="slices per end-to-end run (default 1024 CUDA, 4 CPU)")
    p.add_argument("--seconds", type=float, default=None, help="time per translator measurement (default 3 CUDA, 0 CPU)")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--workers", type=int, default=None, help="export worker processes (default: half the cores)")
    p.add_argument("--place-workers", default=None,
                   help="comma list of LIDC placement worker counts for the end-to-end rows, 'auto' = generate's "
                        "default (default: 0,auto on CUDA, 0 on CPU)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile / CUDA-graph variants")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak for the roofline (default by name)")
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)
    dev = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if a.device == "auto" else a.device))
    cuda = dev.type == "cuda"
    models = (a.models or ("shipped,paper" if cuda else "shipped")).split(",")
    batches = [int(b) for b in (a.batches or ("16,64,128" if cuda else "2")).split(",")]
    n = a.n or (1024 if cuda else 4)
    seconds = a.seconds if a.seconds is not None else (3.0 if cuda else 0.0)
    workers = a.workers if a.workers is not None else max(1, (os.cpu_count() or 2) // 2)
    compile_ = cuda and not a.no_compile
    places = [None if v == "auto" else int(v) for v in (a.place_workers or ("0,auto" if cuda else "0")).split(",")]
    peak = peak_tflops(dev, a.peak_tflops)
    rows: list[dict] = []
    print(HEADER, flush=True)

    def emit(new: Iterable[dict], gflops: float) -> None:
        """Print and write each row as it is measured: a run cut short by a time limit keeps its rows."""
        for r in new:
            r.setdefault("translator_gflops", gflops)
            print(row_line(r), flush=True)
            rows.append(r)
            write(a, argv, dev, peak, rows)

    for name in models:
        if name == "shipped":
            tsgan, gate = load_tsgan("pretrained", torch.device("cpu")), True
        elif name == "paper":
            from generate_speed import fresh_tsgan

            tsgan, gate = fresh_tsgan(a.size), False
        else:
            p.error(f"--models: unknown model {name!r}")
        size = int(tsgan.image_size)
        gflops = translator_gflops(tsgan.translator, size)
        emit([reference_row(name, tsgan, dev, seconds, size)], gflops)
        emit(translator_rows(name, tsgan, dev, batches, seconds, size, gflops, peak, compile_), gflops)
        for k, pw in enumerate(places):
            emit(end_to_end_rows(name, tsgan, dev, batches, n, gate, workers, False, pw, profile=k == 0), gflops)
        if compile_:
            emit(end_to_end_rows(name, tsgan, dev, batches[-1:], n, gate, workers, True, places[-1]), gflops)
        print(f"done {name}", file=sys.stderr)
    print(f"wrote {a.out}")  # emit() wrote it after the last row
    return 0


if __name__ == "__main__":
    sys.exit(main())
