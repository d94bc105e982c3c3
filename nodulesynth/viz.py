"""Preview grids: one row per sample, (mask | CT in lung window with nodule boxes).

Used by `prepare --preview`, `generate --preview` and the trainers' sample grids, so all pictures
of the project look the same.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from .hu import window_uint8
from .io import atomic_file
from .masks.classes import colorize

BOX_COLOUR = (255, 40, 40)


def _tile(hu: np.ndarray | None, mask: np.ndarray | None, boxes: np.ndarray | None, size: int) -> list[Image.Image]:
    tiles = []
    if mask is not None:
        tiles.append(Image.fromarray(colorize(np.asarray(mask))).resize((size, size), Image.NEAREST))
    if hu is not None:
        img = Image.fromarray(window_uint8(np.asarray(hu, dtype=np.float32))).convert("RGB")
        scale = size / img.width
        img = img.resize((size, size), Image.BILINEAR)
        if boxes is not None and len(boxes):
            draw = ImageDraw.Draw(img)
            for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float32) * scale:
                draw.rectangle([x0 - 2, y0 - 2, x1 + 2, y1 + 2], outline=BOX_COLOUR, width=2)
        tiles.append(img)
    return tiles


def preview_grid(
    path: str | os.PathLike,
    images_hu: Sequence[np.ndarray] | None = None,
    masks: Sequence[np.ndarray] | None = None,
    boxes: Sequence[np.ndarray] | None = None,
    columns: int = 4,
    tile: int = 256,
) -> str:
    """Write a PNG grid; each sample contributes a (mask, CT+boxes) pair of tiles.
    Either images or masks may be None (e.g. a mask-only StyleGAN sample grid)."""
    n = len(images_hu if images_hu is not None else masks)
    if n == 0:
        raise ValueError("preview_grid: nothing to draw")
    pairs = [
        _tile(
            None if images_hu is None else images_hu[i],
            None if masks is None else masks[i],
            None if boxes is None else boxes[i],
            tile,
        )
        for i in range(n)
    ]
    per = len(pairs[0])
    cols = max(1, min(columns, n))
    rows = (n + cols - 1) // cols
    gap = 4
    canvas = Image.new("RGB", (cols * (per * tile + gap), rows * (tile + gap)), (255, 255, 255))
    for i, tiles in enumerate(pairs):
        r, c = divmod(i, cols)
        for j, t in enumerate(tiles):
            canvas.paste(t, (c * (per * tile + gap) + j * tile, r * (tile + gap)))
    with atomic_file(path, "wb") as fh:
        canvas.save(fh, format="PNG")
    return str(path)
