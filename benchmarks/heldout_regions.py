"""Which region of a translated slice holds the KID gap? Swap regions between real and translated.

    python benchmarks/heldout_regions.py --weights pretrained --out DIR

The TRAIN patients' real masks are translated (``--background translator``: the translator's own
background, so every region is the translator's), then lungs (classes 2, 3, 5), body (1, 4) or
background (0) are swapped between the translated and the real slice. Each variant is scored as
``heldout_realism.py`` scores stage 2 (KID×1000 against the held-out patients' real slices, same
features, subsets and seed), so "translated, real X" says how far the gap closes when X alone is
right, and "real, translated X" how much X alone opens it. Writes DIR/heldout_regions.{json,txt}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

REGIONS = {"lungs": (2, 3, 5), "body": (1, 4), "background": (0,)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prepared", type=Path, default=Path("prepared"))
    p.add_argument("--weights", default="pretrained")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--subsets", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    from heldout_realism import HELD_OUT, _slices

    from nodulesynth.metrics.kid import InceptionFeatures, kid
    from nodulesynth.models.tsgan import TSGAN
    from nodulesynth.synth.pipeline import GenerationConfig, Synthesizer

    tr_i, tr_m, _ = _slices(a.prepared, "train")
    ho_i, _, _ = _slices(a.prepared, list(HELD_OUT))
    net = InceptionFeatures("cpu")
    f_ho = net(ho_i)

    def k1000(x: np.ndarray) -> list[float]:
        r = kid(net(x), f_ho, subsets=a.subsets, subset_size=max(2, min(len(x), len(ho_i)) // 2), seed=a.seed)
        return [round(r.mean * 1000, 1), round(r.std * 1000, 1)]

    model = TSGAN.from_pretrained(a.weights, device="cpu")
    fake = Synthesizer(model, GenerationConfig(seed=a.seed, background="translator", body="translator")).translate(tr_m).images_hu.numpy()
    rows = {"real (the floor)": k1000(tr_i), "translated": k1000(fake)}
    for name, classes in REGIONS.items():
        region = np.isin(tr_m, classes)
        rows[f"translated, real {name}"] = k1000(np.where(region, tr_i, fake))
    for name, classes in REGIONS.items():
        region = np.isin(tr_m, classes)
        rows[f"real, translated {name}"] = k1000(np.where(region, fake, tr_i))
    text = "\n".join(f"{k:34} {v[0]:7.1f} ± {v[1]:.1f}" for k, v in rows.items())
    print(text)
    a.out.mkdir(parents=True, exist_ok=True)
    doc = {"command": " ".join(sys.argv), "weights": str(model.source), "revision": str(model.revision),
           "n_train_slices": len(tr_i), "n_heldout_slices": len(ho_i), "kid_x1000": rows}
    (a.out / "heldout_regions.json").write_text(json.dumps(doc, indent=2), encoding="utf-8")
    (a.out / "heldout_regions.txt").write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
