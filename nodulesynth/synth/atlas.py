"""Body atlas: the body of a real TRAIN slice, registered onto generated anatomy.

A label mask says where the body is, not where a rib, a fat plane, a muscle or a vessel of the
mediastinum lies, so a translator trained with L1 paints their average: a smooth grey body. On held-out
patients the body holds most of the remaining gap (putting the real body back around translated real
masks takes the stage-2 KID×1000 from 207 to 80; benchmarks README, "Body atlas").

So the body comes from an atlas, as in multi-atlas CT synthesis: each sample takes one of the real
bodies in ``body_atlas.npz`` (built by ``benchmarks/build_body_atlas.py``) and registers that slice's
label mask onto its own: an affine that matches the bodies' bounding boxes, then a smooth displacement
(a coarse control grid, bicubic) fitted by gradient descent so that the atlas's tissue and lungs land
on the generated ones (``AtlasConfig``). The warped HU replace the translated body (class 1) where the
warped atlas is body too; a feathered edge and every other class stay as they were.

Which body: the ``top_k`` entries whose masks (cropped to the body, with the body's size in mm) are
nearest the generated one, one of them drawn by the sample's own seed. Registration runs at a fixed
batch shape like every stage of the pipeline, so a sample is the same in any batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import NoduleSynthError
from ..masks.classes import MaskClass
from .library import NpzLibrary

LIBRARY = Path(__file__).with_name("body_atlas.npz")
MODES = ("atlas", "translator")
REG_SIZE = 64  # registration resolution (px); 128² measured no better at 6× the cost
DESCRIPTOR = 16  # side of the body-cropped mask descriptor
SIZE_WEIGHT = 2.0  # weight of log body size (mm) against the descriptor's shape distance


@dataclass(frozen=True)
class AtlasConfig:
    """How an atlas body is chosen and registered. The defaults measured best on held-out patients
    (benchmarks README, "Body atlas": 10 settings at seed 0; a stiffer, coarser warp stretches the
    atlas's anatomy less than a close fit)."""

    grid: int = 6  # displacement control points per side
    smooth: float = 1.0  # weight of the control grid's first differences
    iters: int = 50  # Adam steps (100 measured the same)
    lr: float = 0.01
    top_k: int = 8  # nearest candidates a sample draws its entry from

    def __post_init__(self):
        if self.grid < 2 or self.iters < 0 or self.top_k < 1 or not (self.smooth >= 0 and self.lr > 0):
            raise NoduleSynthError(f"atlas config: grid ≥ 2, iters ≥ 0, top_k ≥ 1, smooth ≥ 0, lr > 0; got {self}")


def _channels(masks: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float maps of what registration aligns: tissue (body, airway, nodule), left, right lung."""
    m = masks.long()
    tissue = (m == MaskClass.BODY) | (m == MaskClass.TRACHEA) | (m == MaskClass.NODULE)
    return torch.stack([tissue, m == MaskClass.LEFT_LUNG, m == MaskClass.RIGHT_LUNG], 1).float()


def _small(masks: torch.Tensor) -> torch.Tensor:
    """(B, 3, REG_SIZE, REG_SIZE) the channels, area-downsampled: what matching and registration see."""
    return F.interpolate(_channels(masks), size=(REG_SIZE, REG_SIZE), mode="area")


def body_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(B, 4) patient bounding boxes (y0, x0, y1, x1) in normalised [-1, 1] image coordinates
    (pixel-edge; a mask without a patient gets the whole image)."""
    from ..models.lung_texture import alpha_boxes

    h, w = masks.shape[-2:]
    b = alpha_boxes((masks != MaskClass.BACKGROUND).float()).float()  # end-exclusive pixel rows/cols
    empty = (b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])
    b = torch.where(empty[:, None], torch.tensor([0.0, 0.0, h, w], device=b.device), b)
    scale = torch.tensor([h, w, h, w], device=b.device, dtype=b.dtype)
    return b / scale * 2 - 1


def box_affine(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """(B, 2, 3) ``affine_grid`` thetas that map each ``dst`` box onto its ``src`` box (output → input)."""
    sy = (src[:, 2] - src[:, 0]) / (dst[:, 2] - dst[:, 0])
    sx = (src[:, 3] - src[:, 1]) / (dst[:, 3] - dst[:, 1])
    theta = torch.zeros(len(src), 2, 3, device=src.device)
    theta[:, 0, 0], theta[:, 0, 2] = sx, src[:, 1] - sx * dst[:, 1]
    theta[:, 1, 1], theta[:, 1, 2] = sy, src[:, 0] - sy * dst[:, 0]
    return theta


def descriptors(masks: torch.Tensor, spacing_mm: float) -> torch.Tensor:
    """(B, D) what entries are matched by: the masks' channels cropped to the body and resized to
    DESCRIPTOR² (shape), and the body's log height and width in mm (size), which cropping forgets."""
    ch = _small(masks)
    box = body_boxes(masks)
    unit = torch.tensor([[-1.0, -1.0, 1.0, 1.0]], device=box.device).expand_as(box)
    grid = F.affine_grid(box_affine(box, unit), (len(ch), 1, DESCRIPTOR, DESCRIPTOR), align_corners=False)
    shape = F.grid_sample(ch, grid, align_corners=False).flatten(1) / DESCRIPTOR
    mm = torch.stack([box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]], 1) / 2 * torch.tensor(
        masks.shape[-2:], device=box.device) * spacing_mm
    return torch.cat([shape, SIZE_WEIGHT * mm.clamp_min(1).log()], 1)


def reg_maps(masks: torch.Tensor) -> torch.Tensor:
    """(B, 3, REG_SIZE, REG_SIZE) what registration compares: the channels, area-downsampled and blurred
    (a 5-px box at REG_SIZE widens the loss's basin)."""
    return F.avg_pool2d(_small(masks), 5, 1, 2, count_include_pad=False)


def register(src: torch.Tensor, dst: torch.Tensor, config: AtlasConfig = AtlasConfig(),
             src_maps: torch.Tensor | None = None, src_boxes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(theta (B,2,3), displacement field (B,2,REG_SIZE,REG_SIZE)) warping label masks ``src`` onto
    ``dst`` (B,H,W); ``src_maps`` / ``src_boxes`` (precomputed ``reg_maps`` / ``body_boxes`` of ``src``)
    spare recomputing them.

    Each sample's loss is its own mean, summed over the batch, so its gradient (and Adam's step) is
    the same whatever else is in the batch."""
    # the pipeline runs under inference_mode, whose tensors autograd cannot record: fit on copies
    with torch.inference_mode(False), torch.enable_grad():
        s = (reg_maps(src) if src_maps is None else src_maps).clone()
        d = reg_maps(dst.clone())
        theta = box_affine((body_boxes(src) if src_boxes is None else src_boxes).clone(), body_boxes(dst.clone()))
        base = F.affine_grid(theta, (len(s), 1, REG_SIZE, REG_SIZE), align_corners=False)
        disp = torch.zeros(len(s), 2, config.grid, config.grid, device=s.device, requires_grad=True)
        opt = torch.optim.Adam([disp], lr=config.lr)
        for _ in range(config.iters):
            field = F.interpolate(disp, size=(REG_SIZE, REG_SIZE), mode="bicubic", align_corners=False)
            moved = F.grid_sample(s, base + field.permute(0, 2, 3, 1), align_corners=False)
            loss = ((moved - d) ** 2).flatten(1).mean(1) + config.smooth * (
                disp.diff(dim=2).pow(2).flatten(1).mean(1) + disp.diff(dim=3).pow(2).flatten(1).mean(1))
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
        field = F.interpolate(disp, size=(REG_SIZE, REG_SIZE), mode="bicubic", align_corners=False)
    return theta.detach(), field.detach()


def warp(x: torch.Tensor, theta: torch.Tensor, field: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, *size) ``x`` (B, C, h, w) resampled (bilinear) through the registration; the smooth field
    is upsampled bilinearly from REG_SIZE (bicubic to full size costs 3× as much for the same warp)."""
    base = F.affine_grid(theta, (len(x), 1, *size), align_corners=False)
    field = F.interpolate(field, size=size, mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    return F.grid_sample(x, base + field, align_corners=False, padding_mode="zeros")


class BodyAtlas(NpzLibrary):
    """The shipped atlas of real TRAIN bodies (loaded on first use)."""

    KEYS = ("hu", "masks", "source", "spacing_mm")
    WHAT = "body atlas"
    BUILDER = "benchmarks/build_body_atlas.py"

    def __init__(self, path: str | Path = LIBRARY, config: AtlasConfig = AtlasConfig()):
        super().__init__(path)
        self.config = config
        self._cache: dict[str, tuple[torch.Tensor, ...]] = {}  # device → _on

    def check(self, d: dict[str, np.ndarray]) -> str | None:
        if why := super().check(d):
            return why
        if d["masks"].shape != d["hu"].shape:
            return f"hu {d['hu'].shape}, masks {d['masks'].shape}"
        if int(d["masks"].max()) > max(MaskClass):
            return f"mask labels above {max(MaskClass)}"
        return None

    @cached_property
    def _descriptors(self) -> torch.Tensor:
        """(N, D) the entries' matching descriptors, on the CPU only (``entries`` chooses there)."""
        return descriptors(torch.from_numpy(self._data["masks"]), float(self._data["spacing_mm"]))

    def _on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(masks (N, H, W) uint8, registration maps, body boxes) on ``device``, computed once."""
        key = str(device)
        if key not in self._cache:
            m = torch.from_numpy(self._data["masks"]).to(device)
            self._cache[key] = (m, reg_maps(m), body_boxes(m))
        return self._cache[key]

    def entries(self, masks: torch.Tensor, seeds: Sequence[int], spacing_mm: float,
                avoid: Sequence[str | None] | None = None) -> list[int]:
        """The entry of each sample: one of the ``top_k`` nearest to its mask, drawn by its seed. ``avoid``:
        per sample, a source (``dataset:patient``) whose entries it must not take — for evaluations that
        translate the masks of patients the atlas holds."""
        # chosen on the CPU whatever the device: the same masks then take the same entries on a GPU
        # (a float rounding there could reorder two near-equal candidates and swap the whole body)
        masks, desc = masks.cpu(), self._descriptors
        with torch.autocast("cpu", enabled=False):
            dist = torch.cdist(descriptors(masks, spacing_mm), desc)
        if avoid is not None:
            src = self._data["source"]
            own = torch.tensor(np.asarray([src == a for a in avoid]).reshape(len(avoid), len(src)), device=dist.device)
            dist = dist.masked_fill(own[: len(dist)], float("inf"))
        near = dist.topk(min(self.config.top_k, len(desc)), largest=False).indices
        pick = [int(np.random.default_rng(int(s)).integers(near.shape[1])) for s in seeds[: len(masks)]]
        return near[torch.arange(len(masks)), torch.tensor(pick, device=near.device)].tolist()

    def paste(self, hu: torch.Tensor, masks: torch.Tensor, entries: Sequence[int]) -> torch.Tensor:
        """``hu`` (B, H, W) with its body (class 1) replaced by each sample's registered atlas entry.

        The atlas pixels go where both the generated and the warped atlas mask are body, with a 2-px
        feathered edge; a mask without a body is left alone."""
        lib_masks, maps, boxes = self._on(hu.device)
        e = torch.as_tensor(list(entries), device=hu.device)
        src = lib_masks[e]
        body_hu = torch.from_numpy(self._data["hu"][e.cpu().numpy()]).to(hu.device, torch.float32)
        # fp32 even under a caller's autocast: a bf16 sampling grid is off by up to a pixel at 512²,
        # which moves every bone edge (measured: p99 45 HU against the fp32 warp)
        with torch.autocast(hu.device.type, enabled=False):
            theta, field = register(src, masks, self.config, maps[e], boxes[e])
            moved = warp(torch.stack([body_hu, (src == MaskClass.BODY).float()], 1), theta, field, tuple(hu.shape[-2:]))
        moved, moved_body = moved[:, 0], moved[:, 1]
        both = ((masks == MaskClass.BODY) & (moved_body > 0.5)).float()[:, None]
        alpha = (F.avg_pool2d(both, 5, 1, 2) * both)[:, 0]
        return torch.lerp(hu, moved.to(hu.dtype), alpha.to(hu.dtype))

    def apply(self, hu: torch.Tensor, masks: torch.Tensor, seeds: Sequence[int], spacing_mm: float,
              avoid: Sequence[str | None] | None = None) -> tuple[torch.Tensor, list[int]]:
        """(``hu`` with each sample's atlas body, the entries taken): ``entries`` then ``paste``."""
        e = self.entries(masks, seeds, spacing_mm, avoid)
        return self.paste(hu, masks, e), e
