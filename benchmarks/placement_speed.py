"""Host-side cost of LIDC nodule mode per drawn mask: StyleGAN nodules → lung, anatomy gate, LIDC
nodules placed, boxes (`LidcPlacer.gate_and_place`, what `generate` does on the host between the mask
generator and the translator). On a GPU this host work, not the kernels, bounds end-to-end slices/s.

    python benchmarks/placement_speed.py                    # 128 masks, placement workers 0,1,2
    python benchmarks/placement_speed.py --n 256 --workers 0,4,8

Masks come from the shipped mask generator (CPU, block 32, seed 0). For each worker count: wall
ms per mask (after a warm-up batch that also starts the workers) and the main process's own CPU ms
per mask (what is left on the thread that drives the GPU); every count must give the in-process
result bit for bit. Writes benchmarks/results/placement_speed.json.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nodulesynth.io import write_json  # noqa: E402
from nodulesynth.masks.nodule_model import LidcPlacer  # noqa: E402
from nodulesynth.synth.dataset import load_tsgan  # noqa: E402
from nodulesynth.synth.pipeline import GenerationConfig, Synthesizer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "placement_speed.json"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=128, help="masks per timed pass")
    p.add_argument("--workers", default="0,1,2", help="comma list of placement worker counts")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per worker count (the median is kept)")
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)
    counts = [int(w) for w in a.workers.split(",")]
    synth = Synthesizer(load_tsgan("pretrained", torch.device("cpu")), GenerationConfig(seed=0, block=32))
    keys = [(i, 0) for i in range(a.n)]
    masks = torch.cat([synth._masks(keys[s : s + 32]) for s in range(0, a.n, 32)])
    rows, ref = [], None
    for w in counts:
        placer = LidcPlacer(synth.config, synth.spacing_mm, workers=w)
        placer.gate_and_place(masks[:32], keys[:32])  # warm-up: caches, and the worker processes start
        walls, cpus = [], []
        for _ in range(a.repeats):
            placer.placed.clear()
            c, t = time.process_time(), time.perf_counter()
            out, passed, _, boxes = placer.gate_and_place(masks, keys)
            walls.append(time.perf_counter() - t)
            cpus.append(time.process_time() - c)
        placer.close()
        result = (out.numpy(), passed.numpy(), [b.numpy() for b in boxes], dict(placer.placed))
        if ref is None:
            ref = result
        same = (np.array_equal(result[0], ref[0]) and np.array_equal(result[1], ref[1])
                and all(np.array_equal(x, y) for x, y in zip(result[2], ref[2])) and result[3] == ref[3])
        if not same:
            raise SystemExit(f"placement with {w} workers differs from {counts[0]} workers")
        rows.append({"workers": w, "ms_per_mask": 1000 * float(np.median(walls)) / a.n,
                     "main_cpu_ms_per_mask": 1000 * float(np.median(cpus)) / a.n, "passed": int(passed.sum()),
                     "identical_to_first": True})
        print(f"workers {w}: {rows[-1]['ms_per_mask']:.2f} ms/mask wall, "
              f"{rows[-1]['main_cpu_ms_per_mask']:.2f} ms/mask on the main process", file=sys.stderr)
    out = Path(a.out)
    write_json(out, {
        "command": "python benchmarks/placement_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(), "n": a.n, "spacing_mm": synth.spacing_mm,
        "date": time.strftime("%Y-%m-%d"), "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
