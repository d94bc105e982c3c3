"""Scanner backgrounds: what lies outside the patient in a real slice, laid around generated anatomy.

No mask class holds the table, cushions, blankets or the air's own noise, so a translator can only
guess them (the shipped one draws a dotted table). On held-out patients, putting the real background
back around translated real masks takes the stage-2 KID×1000 from 207 to 124 (benchmarks README,
"Scanner backgrounds"): after the patient's body, the largest single part of the gap.

The library (``scanner_backgrounds.npz``, built by ``benchmarks/build_background_library.py``) holds the
background of real TRAIN slices at 0.8 mm with the patient replaced by the slice's own air. Each sample
takes one entry by its own seed, shifted so that the entry's body bottom and centre meet the generated
body's (a patient lies on the table); only background pixels (mask class 0) change. Pixels the shift
brings in from beyond the entry's edges are that entry's air, tiled.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..masks.classes import MaskClass
from .library import NpzLibrary

LIBRARY = Path(__file__).with_name("scanner_backgrounds.npz")
MODES = ("scanner", "translator")


def body_geometry(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bottom row, horizontal centre, has body) of each (B, H, W) mask's patient (classes 1–5)."""
    from ..models.lung_texture import alpha_boxes

    y0, x0, y1, x1 = alpha_boxes((masks != MaskClass.BACKGROUND).float()).unbind(1)  # end-exclusive
    return y1 - 1, (x0 + x1 - 1).float() / 2, y1 > y0


class ScannerBackgrounds(NpzLibrary):
    """The shipped library of real scanner backgrounds (loaded on first use)."""

    KEYS = ("hu", "tile", "bottom", "centre_x", "source", "spacing_mm")
    WHAT = "scanner-background library"
    BUILDER = "benchmarks/build_background_library.py"

    def __init__(self, path: str | Path = LIBRARY):
        super().__init__(path)
        self._cache: dict[tuple[float, str], tuple[torch.Tensor, ...]] = {}  # (spacing, device) → _scaled

    def check(self, d: dict[str, np.ndarray]) -> str | None:
        n = len(d["hu"])
        return super().check(d) or (f"entries {n}, tiles {len(d['tile'])}, bottoms {len(d['bottom'])}"
                                    if len(d["tile"]) != n or len(d["bottom"]) != n else None)

    def entry(self, seed: int) -> int:
        """The library entry of a sample whose background seed is ``seed``."""
        return int(seed) % len(self)

    def _scaled(self, spacing_mm: float, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(hu, tile, bottom, centre) at ``spacing_mm`` on ``device``; resampled once per spacing."""
        key = (round(float(spacing_mm), 6), str(device))
        if key not in self._cache:
            d = self._data
            s = float(d["spacing_mm"]) / float(spacing_mm)
            hu, tile = torch.from_numpy(d["hu"]).float(), torch.from_numpy(d["tile"]).float()
            if abs(s - 1) > 1e-6:
                size = [max(1, round(x * s)) for x in hu.shape[1:]]
                mode = "area" if s < 1 else "bilinear"
                hu = F.interpolate(hu[:, None], size=size, mode=mode)[:, 0]
                tile = F.interpolate(tile[:, None], size=[max(1, round(tile.shape[1] * s))] * 2, mode=mode)[:, 0]
            bottom = torch.from_numpy(d["bottom"].astype(np.float32)) * s
            centre = torch.from_numpy(d["centre_x"].astype(np.float32)) * s
            self._cache[key] = tuple(t.to(device) for t in (hu, tile, bottom, centre))
        return self._cache[key]

    def paste(self, hu: torch.Tensor, masks: torch.Tensor, seeds: Sequence[int], spacing_mm: float) -> torch.Tensor:
        """``hu`` (B, H, W) with its background pixels replaced by each sample's library entry.

        Batched: one gather for the block. A mask without a body keeps its translated background."""
        lib, tile, lb, lc = self._scaled(spacing_mm, hu.device)
        b, h, w = hu.shape
        e = torch.tensor([self.entry(s) for s in seeds[:b]], device=hu.device)
        bottom, centre, has = body_geometry(masks)
        dy = (bottom.float() - lb[e]).round().long()
        dx = (centre - lc[e]).round().long()
        ys = torch.arange(h, device=hu.device)[None, :] - dy[:, None]  # (B, H) rows of the entry
        xs = torch.arange(w, device=hu.device)[None, :] - dx[:, None]
        lh, lw = lib.shape[1:]
        inside = ((ys >= 0) & (ys < lh))[:, :, None] & ((xs >= 0) & (xs < lw))[:, None, :]
        ei = e[:, None, None]
        bg = lib[ei, ys.clamp(0, lh - 1)[:, :, None], xs.clamp(0, lw - 1)[:, None, :]]
        t = tile.shape[1]
        air = tile[ei, (torch.arange(h, device=hu.device) % t)[None, :, None], (torch.arange(w, device=hu.device) % t)[None, None, :]]
        bg = torch.where(inside, bg, air)
        replace = (masks == MaskClass.BACKGROUND) & has[:, None, None]
        return torch.where(replace, bg.to(hu.dtype), hu)
