"""Does the mask StyleGAN's resolution (128², upsampled to 512) cost realism? (issue 13)

    python benchmarks/mask_resolution.py --weights pretrained --out DIR

The TRAIN patients' real 512² masks are translated as they are, and after the path a 128² (or 256²)
mask generator's output takes: one-hot area-averaged to that size, bilinear back to 512, argmax (the
generator upsamples its logits bilinearly). Each is judged by KID against the held-out real slices, as
``heldout_realism.py``'s *stage 2* column. If 128² cost little, the gap between generated masks and
real ones (*full* − *stage 2*) is their anatomy, not their resolution. Writes OUT/mask_resolution.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heldout_realism import HELD_OUT, _slices  # noqa: E402  (same slices and split as the yardstick)


def through(masks: np.ndarray, res: int) -> np.ndarray:
    """512² labels → res² class fractions → bilinear 512² → argmax: a res² generator's rendition."""
    from nodulesynth.masks.classes import NUM_CLASSES
    from nodulesynth.models.pix2pix import one_hot

    size = masks.shape[-1]
    low = F.interpolate(one_hot(torch.from_numpy(masks).long(), NUM_CLASSES), size=(res, res), mode="area")
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False).argmax(1).to(torch.uint8).numpy()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prepared", type=Path, default=Path("prepared"))
    p.add_argument("--weights", default="pretrained", help="whose translator renders the masks")
    p.add_argument("--resolutions", default="512,256,128")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    from nodulesynth.io import write_json
    from nodulesynth.metrics.kid import InceptionFeatures, kid
    from nodulesynth.models.tsgan import TSGAN
    from nodulesynth.synth.pipeline import GenerationConfig, Synthesizer

    _, tr_m, _ = _slices(a.prepared, "train")
    ho_i, _, _ = _slices(a.prepared, list(HELD_OUT))
    net = InceptionFeatures("cpu")
    f_ho = net(ho_i)
    syn = Synthesizer(TSGAN.from_pretrained(a.weights, device="cpu"), GenerationConfig(seed=a.seed, block=8, background="translator", body="translator"))  # the masks' effect on the translator alone
    rows = []
    for res in (int(r) for r in a.resolutions.split(",")):
        m = tr_m if res == tr_m.shape[-1] else through(tr_m, res)
        r = kid(net(syn.translate(m).images_hu.numpy()), f_ho, subsets=100,
                subset_size=max(2, min(len(m), len(f_ho)) // 2), seed=a.seed)
        rows.append({"mask_resolution": res, "kid_stage2": [round(r.mean * 1000, 1), round(r.std * 1000, 1)],
                     "pixels_changed": round(float((m != tr_m).mean()), 5)})
        print(json.dumps(rows[-1]), flush=True)
    write_json(a.out / "mask_resolution.json", {"command": " ".join(sys.argv), "weights": a.weights,
                                                "n_train_masks": len(tr_m), "n_heldout_slices": len(ho_i), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
