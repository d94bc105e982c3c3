"""Lung parenchyma texture: a small fully convolutional GAN for what a mask cannot say.

Why it exists: a semantic mask says where the lungs are, not where vessels run, so a translator
trained with paired losses paints each lung as its blurred mean (the held-out measurements in the
README: 4–6 % of lung pixels above −700 HU against 12.5 % in real slices). This model learns the
parenchyma alone, from real lung patches of the TRAIN patients, with an adversarial loss only, and
the pipeline composites its field inside the lungs; nodules, lung walls and everything outside the
lungs stay the translator's.

The generator is a spatial GAN (Jetchev et al. 2016, "Texture synthesis with spatial generative
adversarial networks"): a noise field at 1/8 of the output size (local codes, plus one global code
per image for its overall density) upsampled by resize-convolutions with per-pixel noise inputs
(as StyleGAN's), so it draws a seamless field of any size. The critic is a plain patch critic
trained with the non-saturating loss and a lazy R1 penalty (StyleGAN2): on CPU-sized runs it
learnt vessel-like segments within ~800 steps, where a spectral-norm hinge critic (SNGAN) stayed
at chance and the generator drew blobs.

Unconditional, the field is the same everywhere in the lung; real vessels are thick near the hila and
thin out towards the pleura. With ``cond_channels = 3`` it is given :func:`lung_conditions` (where in
the lung each pixel lies) at every block.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NoduleSynthError
from ..masks.classes import MaskClass

NAME = "lung_texture"


class UnitRange:
    """For a config with ``hu_low``/``hu_high`` (the HU span of a tanh output) and ``spacing_mm``
    (the pixel size it draws at): their checks and the HU ↔ unit-range maps."""

    def check_range(self) -> None:
        name = type(self).__name__
        if not self.hu_low < self.hu_high:
            raise NoduleSynthError(f"{name}: hu_low {self.hu_low} must be below hu_high {self.hu_high}")
        if not 0 < self.spacing_mm <= 20:
            raise NoduleSynthError(f"{name}.spacing_mm={self.spacing_mm}: must be a pixel size in mm")

    def to_unit(self, hu: torch.Tensor) -> torch.Tensor:
        mid, half = (self.hu_high + self.hu_low) / 2, (self.hu_high - self.hu_low) / 2
        return ((hu - mid) / half).clamp(-1, 1)

    def to_hu(self, unit: torch.Tensor) -> torch.Tensor:
        mid, half = (self.hu_high + self.hu_low) / 2, (self.hu_high - self.hu_low) / 2
        return unit * half + mid


@dataclass
class LungTextureConfig(UnitRange):
    """Sizes of the texture generator and the HU range its tanh output spans."""

    z_local: int = 16  # noise channels per cell of the 1/2^(len(channels)-1) grid
    z_global: int = 16  # noise channels shared by the whole field (one draw per image)
    channels: tuple[int, ...] = (96, 64, 48, 24)  # per resolution, coarse → fine
    hu_low: float = -1024.0
    hu_high: float = 476.0  # vessels with contrast reach ≈ +300 HU
    spacing_mm: float = 0.8  # pixel size of the training patches; the field is drawn at this spacing
    cond_channels: int = 0  # condition maps given to every block (0: an unconditional texture, the lungs)

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        if self.cond_channels < 0:
            raise NoduleSynthError(f"{type(self).__name__}.cond_channels={self.cond_channels}: must be ≥ 0")
        if len(self.channels) < 2 or min(self.channels) < 1:
            raise NoduleSynthError(f"LungTextureConfig.channels={self.channels}: need ≥ 2 positive sizes")
        self.check_range()

    @property
    def factor(self) -> int:
        """Output pixels per noise cell along each axis."""
        return 2 ** (len(self.channels) - 1)

    @property
    def reach(self) -> int:
        """How far (px) an input noise cell's effect reaches beyond the cell: one cell of the 3×3
        convolution on the noise grid (f px), two 3×3 convolutions per upsampling block at 2^k times
        that grid (2·f/2^k px each, summing to 2(f − 1)), one pixel of the last convolution: 3f − 1
        (23 px for f = 8, as measured by perturbing single noise cells). Also how far a field's
        zero-padded border reaches in."""
        return 3 * self.factor - 1


class _Up(nn.Module):
    """×2 nearest upsampling (then the condition maps at that scale, if any), two 3×3 convolutions,
    each followed by learnt-scale pixel noise."""

    def __init__(self, cin: int, cout: int, cond: int = 0) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin + cond, cout, 3, padding=1)
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.n1 = nn.Parameter(torch.zeros(1, cout, 1, 1))
        self.n2 = nn.Parameter(torch.zeros(1, cout, 1, 1))

    def forward(self, x: torch.Tensor, noise: tuple[torch.Tensor, torch.Tensor],
                cond: torch.Tensor | None = None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = self.c1(x if cond is None else torch.cat([x, _pool_to(cond, x.shape[2:])], 1))
        x = F.leaky_relu(x + self.n1 * noise[0], 0.2)
        return F.leaky_relu(self.c2(x) + self.n2 * noise[1], 0.2)


def _pool_to(cond: torch.Tensor, size) -> torch.Tensor:
    """Condition maps averaged down to ``size`` (unchanged when already there)."""
    return cond if tuple(cond.shape[2:]) == tuple(size) else F.adaptive_avg_pool2d(cond, tuple(size))


LUNG_CONDITIONS = 3  # condition maps of a conditioned lung texture (lung_conditions)
HILUM_CELL, HILUM_SIGMA = 8, 6.0  # the mediastinum's nearness: 8-px cells, Gaussian of 6 cells (48 px)


def nearness(src: torch.Tensor, cell: int = HILUM_CELL, sigma: float = HILUM_SIGMA) -> torch.Tensor:
    """(B, H, W) how near ``src`` pixels are, smoothly: their share of each ``cell``² cell, blurred by a
    Gaussian of ``sigma`` cells, doubled and clipped at 1, upsampled bilinearly. Smooth where a
    max-pool distance has 45° ridges and steps, which a generator conditioned on it would draw."""
    h, w = src.shape[1:]
    x = F.avg_pool2d(src.float()[:, None], cell, cell, ceil_mode=True)
    r = int(3 * sigma)
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, device=x.device, dtype=x.dtype) / sigma) ** 2)
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (r, r, 0, 0)), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r)), k.view(1, 1, -1, 1))
    return F.interpolate((2 * x).clamp(max=1), size=(h, w), mode="bilinear", align_corners=False)[:, 0]


def lung_conditions(masks: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) where in the lung a pixel lies, for a conditioned lung texture: vessels are thick
    near the hilum and thin out towards the pleura, and the dependent (posterior) lung is denser.

    1. the lungs (classes 2, 3 and their nodules);
    2. how near the mediastinum is (body pixels between the lungs along their row, where the hila
       are): :func:`nearness`, 1 beside it, fading over ~150 px (at 0.8 mm);
    3. the depth down the lung, front to back: 0 at the lung's top row in the image, 1 at its bottom.
    All three are 0 outside the lungs."""
    m = masks.long()
    left, right = m == MaskClass.LEFT_LUNG, m == MaskClass.RIGHT_LUNG
    nodule = m == MaskClass.NODULE
    lung = left | right | nodule  # a nodule lies in the lung: its field is drawn there too
    # the patient's right lung lies on the image's left: between = a right-lung pixel to the left along
    # the row and a left-lung pixel to the right, and not lung (as models.body_texture's map)
    between = right.int().cummax(2).values.bool() & left.flip(2).int().cummax(2).values.flip(2).bool() & ~lung
    hilum = nearness(between)
    rows = torch.arange(m.shape[1], device=m.device, dtype=torch.float32)[None, :, None]

    def depth_in(side: torch.Tensor) -> torch.Tensor:  # 0 at the side's first row, 1 at its last
        any_row = side.any(2)
        top = torch.where(any_row, rows[..., 0], float("inf")).amin(1)
        bottom = torch.where(any_row, rows[..., 0], -float("inf")).amax(1)
        return ((rows - top[:, None, None]) / (bottom - top).clamp_min(1)[:, None, None]).clamp(0, 1).expand(m.shape)

    zero = torch.zeros(m.shape, device=m.device)
    depth = torch.where(left, depth_in(left), torch.where(right, depth_in(right),
                                                          torch.where(nodule, depth_in(left | right), zero)))
    lf = lung.float()
    return torch.stack([lf, hilum * lf, depth * lf], 1)


class LungTextureGenerator(nn.Module):
    """Noise (and, with ``cfg.cond_channels``, condition maps at the field's size) → a texture field
    in [-1, 1] (map to HU with ``cfg.to_hu``). Unconditional it draws the lung parenchyma; conditioned
    on where it draws (``models.body_texture``), the body."""

    def __init__(self, cfg: LungTextureConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or LungTextureConfig()
        ch, c = cfg.channels, cfg.cond_channels
        self.inp = nn.Conv2d(cfg.z_local + cfg.z_global + c, ch[0], 3, padding=1)
        self.ups = nn.ModuleList(_Up(a, b, c) for a, b in zip(ch[:-1], ch[1:]))
        self.out = nn.Conv2d(ch[-1], 1, 3, padding=1)

    def noise_shapes(self, height: int, width: int) -> list[tuple[int, int, int]]:
        """(channels, h, w) of every noise input for a field of ``height``×``width`` pixels."""
        f = self.cfg.factor
        if height % f or width % f:
            raise NoduleSynthError(f"lung texture: field {height}×{width} is not a multiple of {f} pixels")
        shapes = [(self.cfg.z_local, height // f, width // f), (self.cfg.z_global, 1, 1)]
        for k in range(len(self.ups)):
            s = 2 ** (k + 1)
            shapes += [(1, height // f * s, width // f * s)] * 2
        return shapes

    def noise(self, batch: int, height: int, width: int, seeds: Sequence[int] | None = None,
              device: torch.device | str | None = None) -> list[torch.Tensor]:
        """The noise inputs: from the global torch RNG on ``device`` when ``seeds`` is None
        (training: saved in checkpoints), else row b from its own CPU generator seeded by
        ``seeds[b]``, so a sample's field depends only on (weights, seed, size) — never on the batch
        or the device."""
        shapes = self.noise_shapes(height, width)
        if seeds is None:
            return [torch.randn(batch, *s, device=device) for s in shapes]
        if len(seeds) != batch:
            raise NoduleSynthError(f"lung texture: {len(seeds)} seeds for a batch of {batch}")
        g = torch.Generator(device="cpu")
        rows = []
        for s in seeds:
            g.manual_seed(int(s) & 0xFFFFFFFFFFFFFFFF)
            rows.append([torch.randn(1, *sh, generator=g) for sh in shapes])
        return [torch.cat([r[k] for r in rows]).to(device) for k in range(len(shapes))]

    def forward(self, noise: list[torch.Tensor], cond: torch.Tensor | None = None) -> torch.Tensor:
        zl, zg, *pixel = noise
        if (cond is None) != (self.cfg.cond_channels == 0):
            raise NoduleSynthError(f"texture generator: {self.cfg.cond_channels} condition channels expected, "
                                   f"got {'none' if cond is None else cond.shape[1]}")
        x = torch.cat([zl, zg.expand(-1, -1, *zl.shape[2:]), *([] if cond is None else [_pool_to(cond, zl.shape[2:])])], 1)
        x = F.leaky_relu(self.inp(x), 0.2)
        for k, up in enumerate(self.ups):
            x = up(x, (pixel[2 * k], pixel[2 * k + 1]), cond)
        return torch.tanh(self.out(x))

    @property
    def reach(self) -> int:
        """How far (px) an input noise cell's effect reaches beyond the cell (:attr:`LungTextureConfig.reach`)."""
        return self.cfg.reach

    def with_conditions(self, cond_channels: int) -> "LungTextureGenerator":
        """A copy that also takes ``cond_channels`` condition maps (this one takes none), drawing the same
        field until trained: the new inputs' weights start at zero (fine-tuning a texture onto where it
        draws, as ControlNet's zero-initialised inputs)."""
        if self.cfg.cond_channels:
            raise NoduleSynthError(f"texture generator: already takes {self.cfg.cond_channels} condition maps")
        cfg = dataclasses.replace(self.cfg, cond_channels=cond_channels)
        new = LungTextureGenerator(cfg).to(self.inp.weight.device)
        with torch.no_grad():
            own = dict(self.named_parameters())
            for name, p in new.named_parameters():
                old = own[name]
                p.zero_()
                p[tuple(slice(0, n) for n in old.shape)] = old  # the condition inputs are the last channels
        return new

    @torch.no_grad()
    def sample_hu(self, height: int, width: int, seeds: Sequence[int], device=None,
                  spacing_mm: float | None = None, boxes: torch.Tensor | None = None,
                  cond: torch.Tensor | None = None) -> torch.Tensor:
        """(B, height, width) HU fields, one per seed, for pixels of ``spacing_mm`` (default: the
        model's own): drawn at the model's spacing, then resampled, so a vessel keeps its size in mm.

        ``boxes`` ((B, 4) y0, x0, y1, x1; empty rows allowed): where each field is needed. Each row is
        then evaluated only on its box grown by :attr:`reach` (the noise is still the whole field's,
        cut to it), which gives the whole field's values inside the box at a fraction of the cost on
        a CPU; outside the grown box the field is ``hu_low``. Ignored when resampling.

        ``cond`` ((B, cond_channels, height, width)): the condition maps of a conditional model, at
        the asked pixels (resampled with the field)."""
        dev = device if device is not None else self.inp.weight.device
        f, scale = self.cfg.factor, (spacing_mm or self.cfg.spacing_mm) / self.cfg.spacing_mm
        h, w = height, width
        if abs(scale - 1) > 1e-3:
            h, w = (-(-max(f, round(n * scale)) // f) * f for n in (height, width))
            boxes = None
        if cond is not None:
            cond = cond.to(dev, torch.float32)
            if (h, w) != tuple(cond.shape[2:]):
                cond = F.interpolate(cond, size=(h, w), mode="bilinear", align_corners=False)
        noise = self.noise(len(seeds), h, w, seeds, dev)
        if boxes is None:
            field = self.cfg.to_hu(self(noise, cond)[:, 0].float())
        else:
            field = torch.full((len(seeds), h, w), self.cfg.hu_low, device=dev)
            r = self.reach
            for b, (y0, x0, y1, x1) in enumerate(boxes.tolist()):
                if y1 <= y0 or x1 <= x0:
                    continue
                y0, x0 = max(0, (y0 - r) // f * f), max(0, (x0 - r) // f * f)
                y1, x1 = min(h, -(-(y1 + r) // f) * f), min(w, -(-(x1 + r) // f) * f)
                cut = [n[b:b + 1, :, y0 * n.shape[2] // h:y1 * n.shape[2] // h, x0 * n.shape[3] // w:x1 * n.shape[3] // w]
                       if n.shape[2] > 1 else n[b:b + 1] for n in noise]
                c = None if cond is None else cond[b:b + 1, :, y0:y1, x0:x1]
                field[b, y0:y1, x0:x1] = self.cfg.to_hu(self(cut, c)[0, 0].float())
        if (h, w) != (height, width):
            field = F.interpolate(field[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
        return field


class PatchCritic(nn.Module):
    """Patch critic: stride-2 4×4 convolutions, one logit per ~46-px receptive field."""

    def __init__(self, channels: Sequence[int] = (32, 64, 128, 256), in_channels: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for k in channels:
            layers += [nn.Conv2d(c, k, 4, 2, 1), nn.LeakyReLU(0.2)]
            c = k
        layers.append(nn.Conv2d(c, 1, 3, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def lung_alpha(masks: torch.Tensor, ramp_px: int = 4, nodule_margin_px: int = 3) -> torch.Tensor:
    """(B, H, W) blend weight of the texture field: 1 deep inside the lungs, 0 outside them, on and
    within ``nodule_margin_px`` of nodules, ramping over ~``ramp_px`` pixels inside the lung edge so
    the translator's pleura and the nodule's rim stay its own."""
    m = masks.long()
    lung = (m == MaskClass.LEFT_LUNG) | (m == MaskClass.RIGHT_LUNG)
    k = 2 * nodule_margin_px + 1
    near_nodule = F.max_pool2d((m == MaskClass.NODULE).float()[:, None], k, 1, nodule_margin_px)[:, 0] > 0
    region = (lung & ~near_nodule).float()
    w = 2 * ramp_px + 1
    inside = F.avg_pool2d(region[:, None], w, 1, ramp_px, count_include_pad=True)[:, 0]
    return ((inside - 0.6) / 0.39).clamp(0, 1) * region  # 0.39: a window all lung reaches exactly 1


def alpha_boxes(alpha: torch.Tensor) -> torch.Tensor:
    """(B, 4) int64 y0, x0, y1, x1 (end-exclusive) around each row's nonzero ``alpha``; (0, 0, 0, 0)
    for a row without any."""
    rows, cols = alpha.flatten(2).amax(2) > 0, alpha.amax(1) > 0  # (B, H), (B, W)
    def span(any_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = any_.shape[1]
        first = torch.where(any_.any(1), any_.float().argmax(1), 0)
        last = torch.where(any_.any(1), n - any_.flip(1).float().argmax(1), 0)
        return first, last
    (y0, y1), (x0, x1) = span(rows), span(cols)
    return torch.stack([y0, x0, y1, x1], 1)


def composite(hu: torch.Tensor, masks: torch.Tensor, field_hu: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
              alpha: Callable[[torch.Tensor], torch.Tensor] = lung_alpha) -> torch.Tensor:
    """The translated slices with the texture field where ``alpha`` of the masks says (default
    :func:`lung_alpha`: inside the lungs); every pixel where it is 0 is returned unchanged.
    ``field_hu`` is the field, or a function of the (B, 4) boxes around where it is needed that draws it."""
    a = alpha(masks.to(hu.device)).to(hu.dtype)
    if callable(field_hu):
        field_hu = field_hu(alpha_boxes(a))
    return torch.lerp(hu, field_hu.to(hu.dtype), a)
