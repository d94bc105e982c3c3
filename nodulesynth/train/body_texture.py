"""Body-texture trainer: the conditional texture GAN of ``models.body_texture`` on real body patches.

The lung-texture trainer's loop (``train.lung_texture``: non-saturating loss, lazy R1, EMA export,
exact resume) with three changes:

- Data: every ``patch_size``² window (on a ``stride`` grid) of the TRAIN slices whose pixels are at
  least ``min_body`` body (class 1), kept with the condition maps (``body_conditions``) of the whole
  field the generator draws around it; pixels outside the body read ``hu_low``. 512² slices only:
  the nodule crops hold too little body to tell where it lies.
- The critic sees the image and its condition maps (a conditional patch critic, as pix2pix's).
- The generator draws a field for the condition maps of another bank window, and only its body
  pixels count (the rest is set to ``hu_low``, as in the reals): what it learns is the body given
  where it lies, not the lungs or the air around it.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..errors import NoduleSynthError
from ..masks.classes import MaskClass
from ..models.body_texture import NAME, BodyTextureConfig, body_conditions
from .engine import opt
from .lung_texture import LungTextureTrainer, TextureTrainConfig, windows


@dataclasses.dataclass
class BodyTextureTrainConfig(TextureTrainConfig):
    """Body texture GAN run."""

    model: BodyTextureConfig = opt(factory=BodyTextureConfig)
    min_body: float = opt(0.4, "least share of body pixels (class 1) in a patch")


class BodyTextureTrainer(LungTextureTrainer):
    """Hooks of the lung-texture trainer with body patches and a conditional critic."""

    name = "body-texture"
    export_name = NAME

    def check_share(self) -> None:
        if not 0 < self.cfg.min_body <= 1:
            raise NoduleSynthError(f"--min-body {self.cfg.min_body}: must be in (0, 1]")

    def patches(self, hu: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(n, 1 + 4, S, S): the field-sized window's HU (body only) and its condition maps."""
        cfg = self.cfg
        size, m = cfg.patch_size, cfg.margin
        side = size + 2 * m
        h, w = hu.shape
        if max(h, w) < 256 or h < side or w < side:
            return np.zeros((0, 1 + cfg.model.cond_channels, side, side), np.float32)
        body = mask == MaskClass.BODY
        y, x, ok = windows(body, size, cfg.stride, cfg.min_body, margin=m)
        ok = rng.permutation(ok)[: cfg.max_patches_per_slice]
        if not len(ok):
            return np.zeros((0, 1 + cfg.model.cond_channels, side, side), np.float32)
        cond = body_conditions(torch.from_numpy(np.array(mask))[None])[0].numpy()
        image = np.where(body, hu, cfg.model.hu_low)[None]
        both = np.concatenate([image, cond]).astype(np.float32)
        return np.stack([both[:, y[k] - m:y[k] + size + m, x[k] - m:x[k] + size + m] for k in ok])

    def no_patches(self) -> str:
        return (f"no {self.cfg.patch_size}² window of a 512² slice is ≥ {self.cfg.min_body:.0%} body; "
                "body patches are what this model learns")

    def to_bank(self, patches: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(patches)
        t[:, :1] = self.cfg.model.to_unit(t[:, :1])
        return t.contiguous()

    def _centre(self, x: torch.Tensor) -> torch.Tensor:
        m, size = self.cfg.margin, self.cfg.patch_size
        return x[:, :, m:m + size, m:m + size]

    def real_batch(self) -> torch.Tensor:
        """``batch_size`` windows (image + conditions), each flipped left-right at random: the body's
        up and down (front and back) differ, so no turns."""
        cfg = self.cfg
        real = self._centre(self.bank[torch.randint(0, len(self.bank), (cfg.batch_size,))])
        flip = torch.rand(cfg.batch_size) < 0.5
        return torch.where(flip[:, None, None, None], real.flip(-1), real).to(self.device)

    def fake_batch(self) -> torch.Tensor:
        """Fields for the condition maps of random bank windows; outside the body, ``hu_low``."""
        cfg = self.cfg
        cond = self.bank[torch.randint(0, len(self.bank), (cfg.batch_size,)), 1:].to(self.device)
        side = cfg.patch_size + 2 * cfg.margin
        fake = self._centre(self.G(self.G.noise(cfg.batch_size, side, side, device=self.device), cond))
        c = self._centre(cond)
        return torch.cat([torch.where(c[:, :1] > 0.5, fake, torch.full_like(fake, -1.0)), c], 1)

    @torch.no_grad()
    def preview(self) -> None:
        """Top row: fields of the averaged generator for bank windows' conditions; bottom: those windows."""
        from ..viz import preview_grid

        cfg, n = self.cfg, self.cfg.num_samples
        pick = self.bank[torch.linspace(0, len(self.bank) - 1, n).long()]
        side = cfg.patch_size + 2 * cfg.margin
        fake = self.G_ema.sample_hu(side, side, list(range(n)), self.device, cond=pick[:, 1:].to(self.device)).cpu()
        fake = torch.where(pick[:, 1] > 0.5, fake, torch.full_like(fake, cfg.model.hu_low)).numpy()
        real = cfg.model.to_hu(pick[:, 0]).numpy()
        preview_grid(self.out / "samples" / f"step-{self.step:08d}.png", images_hu=[*fake, *real], columns=n, tile=128)


def train_body_texture(cfg: BodyTextureTrainConfig):
    """Train the body texture GAN; returns the run folder (weights in ``out/export``)."""
    return BodyTextureTrainer(cfg).fit()
