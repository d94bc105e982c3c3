"""The model card (``README.md``) of a TSGAN weights folder.

One writer for every producer — ``TSGAN.save_pretrained``, ``nodulesynth train export`` and the
shipped-weights recipe (benchmarks/default_weights.py) — so every card states the same facts:
architecture, image size, pixel spacing, revision, training summary, intended use.
"""
from __future__ import annotations

import json
import re
from typing import Any

from .. import __version__

_FRONT_MATTER = re.compile(r"\A---\n.*?\n---\n", re.S)


def _training_lines(meta: dict[str, Any]) -> list[str]:
    mk, tr = meta.get("mask_training") or {}, meta.get("translator_training") or {}
    tx, bx = meta.get("lung_texture_training") or {}, meta.get("body_texture_training") or {}
    nx = meta.get("nodule_texture_training") or {}
    lines = []
    if mk:
        lines.append(f"- mask StyleGAN: {mk.get('step', '?')} steps; nodule rate of real masks "
                     f"{mk.get('real_nodule_rate', '?')}, of sampled masks {mk.get('ema_nodule_rate', '?')}")
    if tr:
        lines.append(f"- DL-Pix2Pix translator: {tr.get('step', '?')} steps; perceptual loss: "
                     f"{tr.get('perceptual', '?')}")
    if tx:
        lines.append(f"- lung texture GAN: {tx.get('step', '?')} steps on {tx.get('patches', '?')} real lung patches")
    if bx:
        lines.append(f"- body texture GAN: {bx.get('step', '?')} steps on {bx.get('patches', '?')} real body windows")
    if nx:
        lines.append(f"- nodule inpainting GAN: {nx.get('step', '?')} steps on {nx.get('windows', '?')} real nodule windows")
    return lines


def model_card(*, mask_resolution: int, image_size: int, revision: str, meta: dict[str, Any],
               extra: str | None = None) -> str:
    """Markdown card with Hugging Face front matter. ``extra`` (a hand-written section, e.g. the
    shipped weights' data and limits) is appended; its own front matter, if any, is dropped."""
    spacing = meta.get("spacing_mm")
    spacing_text = f"{spacing} mm per pixel" if spacing else "not recorded"
    lines = [
        "---",
        "library_name: nodulesynth",
        "tags: [medical-imaging, ct, lung-nodule, gan, synthetic-data, tsgan]",
        "---",
        "# TSGAN weights (nodulesynth)",
        "",
        'Two-stage GAN for synthetic lung-nodule CT slices (after "Lung Nodule Image Synthesis Driven by',
        'Two-Stage Generative Adversarial Networks"):',
        "",
        "1. **Mask StyleGAN** (`mask_generator.*`): z ~ N(0, I) → 6-class semantic mask (0 background,",
        f"   1 body, 2 left lung, 3 right lung, 4 trachea, 5 nodule), {mask_resolution}×{mask_resolution},"
        " progressive growing, WGAN-GP.",
        "2. **DL-Pix2Pix** (`translator.*`): mask one-hot → 1-channel CT slice in [-1, 1]",
        "   (maps linearly to HU [-1024, 1024]), UNet with LIA skips and DWMH attention, PatchGAN.",
        *([] if not meta.get("lung_texture_run") else [
            "3. **Lung texture** (`lung_texture.*`): a fully convolutional texture GAN trained on real lung",
            "   patches; its field replaces the translated lungs' interior (nodules and walls stay the translator's)."]),
        *([] if not meta.get("body_texture_run") else [
            "4. **Body texture** (`body_texture.*`): the same GAN conditioned on where in the body it draws, trained",
            "   on real body windows; its field replaces the translated body (class 1) but near nodules."]),
        *([] if not meta.get("nodule_texture_run") else [
            "5. **Nodule texture** (`nodule_texture.*`): an inpainting GAN trained on real LIDC nodule windows;",
            "   it redraws each nodule and a 2-px rim from the slice around it."]),
        "",
        f"Image size: {image_size}. Pixel spacing: {spacing_text}. Revision: `{revision}`. nodulesynth {__version__}.",
        "",
        "## Training",
        *(_training_lines(meta) or ["- (no training record)"]),
        "",
        "```",
        json.dumps(meta, indent=2, default=str),
        "```",
        "",
        "## Intended use",
        "Research on data augmentation for lung-nodule detection. Not a medical device and not for",
        "diagnosis: synthetic images must not be used for any clinical decision.",
        "",
        "## Load",
        "```python",
        "from nodulesynth import TSGAN",
        'model = TSGAN.from_pretrained("path/to/this/folder")',
        "```",
    ]
    if extra and extra.strip():
        lines += ["", _FRONT_MATTER.sub("", extra.lstrip()).strip()]
    return "\n".join(lines) + "\n"
