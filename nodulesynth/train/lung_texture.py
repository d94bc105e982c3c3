"""Lung-texture trainer: the parenchyma GAN of ``models.lung_texture`` on real lung patches.

Data: every prepared dataset's TRAIN split (slices and nodule crops alike), resampled to the
model's pixel spacing; a patch is any ``patch_size``² window (on a ``stride`` grid) whose pixels are
at least ``min_lung`` lung (classes 2/3) and never within ``nodule_margin_px`` of a nodule, so the
model learns parenchyma and vessels, not nodules or walls. The patch bank is built once in
``setup`` (a few seconds; capped per slice so no one patient dominates) and drawn from with the
global torch RNG, so resume is exact.

Step: the generator draws a field ``margin`` pixels larger than the patch on every side and the
critic sees its centre, so what it learns is the interior of a field (how it is used: one field per
slice, cut by the lung mask), not zero-padded borders. The margin must reach past the generator's
:attr:`~nodulesynth.models.lung_texture.LungTextureConfig.reach` (23 px for the default model):
the first shipped texture was trained with 16 and saw 7 px of border in every view; resumed with 24
for 2,920 more steps, it drew 12–14 % of held-out lungs' pixels above −700 HU instead of 7 % (real
12.5 %; the two changes were made together, README "Vessels"). Non-saturating loss with a lazy R1 penalty
on the reals (StyleGAN2: ``r1_gamma``, every ``r1_every`` steps); an EMA of the generator is what
is exported. Random flips and 90° turns of the real patches (the parenchyma has no preferred
direction at this scale).

With ``--cond-channels 3`` the generator is told where in the lung it draws
(``models.lung_texture.lung_conditions``) and ``HilarLungTextureTrainer`` trains it on windows of the
512² slices with those maps (``ConditionalTextureTrainer``, shared with the body texture);
``--init-weights`` starts it from an unconditional texture.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import NoduleSynthError
from ..masks.classes import MaskClass
from ..models.lung_texture import (LUNG_CONDITIONS, NAME, LungTextureConfig, LungTextureGenerator, PatchCritic,
                                   lung_conditions)
from . import engine
from .engine import opt
from .sources import SliceSources

log = logging.getLogger("nodulesynth.train")


@dataclasses.dataclass
class GanRunConfig(engine.RunConfig):
    """What the small GAN runs (lung, body, nodule texture) share: optimiser, lazy R1, EMA, previews."""

    lr_g: float = opt(2e-4, "generator Adam learning rate")
    lr_d: float = opt(2e-4, "critic Adam learning rate")
    beta1: float = opt(0.5, "Adam beta1")
    beta2: float = opt(0.99, "Adam beta2")
    r1_gamma: float = opt(1.0, "R1 penalty weight γ on the critic's gradient at real patches")
    r1_every: int = opt(4, "apply R1 every this many steps (lazy regularisation, scaled to match)")
    ema_beta: float = opt(0.999, "per-step decay of the exported generator's weight average")
    num_samples: int = opt(8, "samples in each preview grid")


@dataclasses.dataclass
class TextureTrainConfig(GanRunConfig):
    """What a texture GAN run (lungs, body) has: steps, patches, and the shared GAN settings."""

    model: LungTextureConfig = opt(factory=LungTextureConfig)
    steps: int = opt(4000, "optimisation steps")
    batch_size: int = opt(16, "patches per step")
    patch_size: int = opt(64, "side of the real patches and of the critic's view (px at the model's spacing)")
    margin: int = opt(24, "extra generated pixels on each side, cut off before the critic (≥ the generator's "
                          "reach, 23 px by default, so the critic never sees the zero-padded border)")
    stride: int = opt(24, "grid step of candidate patches in 512² slices (px)")
    max_patches_per_slice: int = opt(40, "cap per slice, so large slices do not outweigh the crops' patients")


@dataclasses.dataclass
class LungTextureTrainConfig(TextureTrainConfig):
    """Lung-parenchyma texture GAN run."""

    min_lung: float = opt(0.98, "least share of lung pixels in a patch")
    nodule_margin_px: int = opt(6, "patches keep this far from nodule pixels")
    init_weights: str | None = opt(None, "fine-tune: start from the lung texture of this weights folder (\"pretrained\": "
                                         "the shipped one); with --cond-channels 3 its new condition inputs "
                                         "start at zero")


def windows(region: np.ndarray, size: int, stride: int, share: float, margin: int = 0
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(y, x, ok): top-left corners of the ``size``² windows on a ``stride`` grid that keep
    ``margin`` px inside the slice, and the indices of those at least ``share`` ``region``
    (an integral image, so one pass whatever the window count)."""
    h, w = region.shape
    ii = np.pad(region.astype(np.int32).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    y, x = (a.ravel() for a in np.meshgrid(np.arange(margin, h - size - margin + 1, stride),
                                          np.arange(margin, w - size - margin + 1, stride), indexing="ij"))
    s = ii[y + size, x + size] - ii[y, x + size] - ii[y + size, x] + ii[y, x]
    return y, x, np.flatnonzero(s >= share * size * size)


def lung_region(mask: np.ndarray, nodule_margin: int) -> np.ndarray:
    """The lungs (classes 2/3) farther than ``nodule_margin`` px from any nodule: what patches learn from."""
    from scipy.ndimage import binary_dilation

    nod = mask == MaskClass.NODULE
    if nod.any():
        nod = binary_dilation(nod, iterations=nodule_margin)
    return np.isin(mask, (MaskClass.LEFT_LUNG, MaskClass.RIGHT_LUNG)) & ~nod


def lung_patches(hu: np.ndarray, mask: np.ndarray, size: int, stride: int, min_lung: float, nodule_margin: int,
                 cap: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``cap`` ``size``² HU windows of one slice that are ≥ ``min_lung`` lung and clear of nodules."""
    lung = lung_region(mask, nodule_margin)
    if lung.shape[0] < size or lung.shape[1] < size:
        return np.zeros((0, size, size), np.float32)
    y, x, ok = windows(lung, size, stride, min_lung)
    if len(ok) == 0:
        return np.zeros((0, size, size), np.float32)
    ok = rng.permutation(ok)[:cap]
    return np.stack([hu[y[k]:y[k] + size, x[k]:x[k] + size] for k in ok]).astype(np.float32)


class LungTextureTrainer(engine.Trainer):
    """Hooks for the parenchyma GAN: patch bank in ``setup``, non-saturating D/G steps with lazy R1."""

    name = "lung-texture"
    export_name = NAME
    metric_fields = ("d_loss", "g_loss", "r1", "fake_mean_hu", "real_mean_hu", "fake_dense", "real_dense")

    def check(self) -> None:
        """Refuse bad flags before any data is read."""
        cfg = self.cfg
        if min(cfg.steps, cfg.batch_size, cfg.patch_size, cfg.stride, cfg.max_patches_per_slice) < 1 or cfg.margin < 0:
            raise NoduleSynthError("--steps, --batch-size, --patch-size, --stride, --max-patches-per-slice must be "
                                   "positive and --margin ≥ 0")
        if (cfg.patch_size + 2 * cfg.margin) % cfg.model.factor:
            raise NoduleSynthError(f"--patch-size + 2·--margin = {cfg.patch_size + 2 * cfg.margin}: must be a "
                                   f"multiple of {cfg.model.factor} (the generator's noise grid)")
        if cfg.r1_gamma < 0 or cfg.r1_every < 1 or not 0 <= cfg.ema_beta < 1:
            raise NoduleSynthError("--r1-gamma must be ≥ 0, --r1-every ≥ 1 and --ema-beta in [0, 1)")
        if getattr(cfg, "init_weights", None):
            init = engine.init_config(cfg.init_weights, LungTextureConfig, NAME)
            if dataclasses.replace(init, cond_channels=cfg.model.cond_channels) != cfg.model:
                raise NoduleSynthError(f"--init-weights {cfg.init_weights}: its lung texture ({init}) differs from "
                                       f"--model ({cfg.model}) in more than the condition maps")
        reach = cfg.model.reach
        if cfg.margin < reach:
            log.warning("--margin %d is below the generator's reach (%d px): the critic sees the field's "
                        "zero-padded border, which a drawn lung never uses", cfg.margin, reach)
        self.check_share()

    def check_share(self) -> None:
        if not 0 < self.cfg.min_lung <= 1:
            raise NoduleSynthError(f"--min-lung {self.cfg.min_lung}: must be in (0, 1]")

    def patches(self, hu: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The bank's patches of one slice (HU)."""
        cfg = self.cfg
        small = max(hu.shape) < 256  # nodule crops: few windows each, on a finer grid
        return lung_patches(hu, mask, cfg.patch_size, cfg.stride // 3 if small else cfg.stride, cfg.min_lung,
                            cfg.nodule_margin_px, 2 if small else cfg.max_patches_per_slice, rng)

    def no_patches(self) -> str:
        return (f"no {self.cfg.patch_size}² window is ≥ {self.cfg.min_lung:.0%} lung and clear of nodules; "
                "lung patches are what this model learns")

    def to_bank(self, patches: np.ndarray) -> torch.Tensor:
        """Stacked patches → the (N, C, h, w) bank in the model's unit range."""
        return self.cfg.model.to_unit(torch.from_numpy(patches))[:, None].contiguous()

    def setup(self) -> None:
        from .translator import PairDataset

        cfg = self.cfg
        self.check()
        split = None if cfg.split == "all" else cfg.split
        self.sources = SliceSources(cfg.data, split, None)
        slices = PairDataset(self.sources, None, None, cfg.model.spacing_mm)  # its load(): HU + mask at our spacing
        rng = np.random.default_rng(cfg.seed)
        bank, per_set = [], []
        for d in range(len(self.sources.datasets)):
            n0 = sum(len(b) for b in bank)
            for g in self.sources.indices[self.sources.groups == d]:
                p = self.patches(*slices.load(int(g)), rng)
                if len(p):
                    bank.append(p)
            per_set.append(sum(len(b) for b in bank) - n0)
        if not bank:
            raise NoduleSynthError(f"--data {', '.join(self.sources.paths)}: {self.no_patches()}")
        self.bank = self.to_bank(np.concatenate(bank))
        self.per_set = per_set
        log.info("%s: %d patches (%s)", self.name, len(self.bank),
                 ", ".join(f"{p}: {n}" for p, n in zip(self.sources.paths, per_set)))

    def build(self) -> None:
        cfg = self.cfg
        self.G = self.initial_generator().to(self.device)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        self.D = PatchCritic(in_channels=1 + cfg.model.cond_channels).to(self.device)
        self.opt_g = torch.optim.Adam(self.G.parameters(), cfg.lr_g, betas=(cfg.beta1, cfg.beta2))
        self.opt_d = torch.optim.Adam(self.D.parameters(), cfg.lr_d, betas=(cfg.beta1, cfg.beta2))
        self.G.train()
        self.D.train()

    def initial_generator(self) -> LungTextureGenerator:
        """A fresh generator, or ``init_weights``'s lung texture (widened to the run's condition maps)."""
        cfg = self.cfg
        if not getattr(cfg, "init_weights", None):
            return LungTextureGenerator(cfg.model)
        G = engine.load_init_module(cfg.init_weights, LungTextureGenerator, LungTextureConfig, NAME)  # checked in check()
        return G.with_conditions(cfg.model.cond_channels) if cfg.model.cond_channels and not G.cfg.cond_channels else G

    def total_steps(self) -> int:
        return self.cfg.steps

    def batches(self, step: int, stop_at: int):
        return range(step, stop_at)

    def batch_images(self, batch: Any) -> int:
        return self.cfg.batch_size

    def real_batch(self) -> torch.Tensor:
        """``batch_size`` bank patches, each flipped and turned at random (global torch RNG)."""
        cfg = self.cfg
        idx = torch.randint(0, len(self.bank), (cfg.batch_size,))
        real = self.bank[idx]
        flip = torch.rand(cfg.batch_size) < 0.5
        real = torch.where(flip[:, None, None, None], real.flip(-1), real)
        k = int(torch.randint(0, 4, (1,)))
        return torch.rot90(real, k, (2, 3)).to(self.device)

    def fake_batch(self) -> torch.Tensor:
        cfg = self.cfg
        side, m = cfg.patch_size + 2 * cfg.margin, cfg.margin
        fake = self.G(self.G.noise(cfg.batch_size, side, side, device=self.device))
        return fake[:, :, m:m + cfg.patch_size, m:m + cfg.patch_size]

    def train_step(self, batch: Any) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        real, fake = self.real_batch(), self.fake_batch()
        lazy = cfg.r1_gamma > 0 and self.step % cfg.r1_every == 0
        real.requires_grad_(lazy)
        d_real = self.D(real)
        d_loss = F.softplus(-d_real).mean() + F.softplus(self.D(fake.detach())).mean()
        r1 = torch.zeros((), device=self.device)
        if lazy:
            grad, = torch.autograd.grad(d_real.sum(), real, create_graph=True)
            r1 = grad.pow(2).sum((1, 2, 3)).mean()
            d_loss = d_loss + cfg.r1_gamma / 2 * cfg.r1_every * r1
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt_d.step()
        g_loss = F.softplus(-self.D(fake)).mean()
        self.generator_step(g_loss)
        real = real.detach()
        to_hu = self.cfg.model.to_hu
        with torch.no_grad():
            f, r = to_hu(fake.detach()[:, :1]), to_hu(real[:, :1])  # channel 0: the image (then any conditions)
            stats = {"fake_mean_hu": f.mean(), "real_mean_hu": r.mean(),
                     "fake_dense": (f > -700).float().mean(), "real_dense": (r > -700).float().mean()}
        return {"d_loss": d_loss.detach(), "g_loss": g_loss.detach(), "r1": r1.detach(), **stats}

    def generator_step(self, g_loss: torch.Tensor) -> None:
        """One Adam step of the generator on ``g_loss``, then its EMA."""
        self.opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        self.opt_g.step()
        with torch.no_grad():
            for e, p in zip(self.G_ema.parameters(), self.G.parameters()):
                e.lerp_(p, 1 - self.cfg.ema_beta)

    def state_dict(self) -> dict[str, Any]:
        return {"G": self.G.state_dict(), "G_ema": self.G_ema.state_dict(), "D": self.D.state_dict(),
                "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict()}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.G.load_state_dict(st["G"])
        self.G_ema.load_state_dict(st["G_ema"])
        self.D.load_state_dict(st["D"])
        self.opt_g.load_state_dict(st["opt_g"])
        self.opt_d.load_state_dict(st["opt_d"])

    @torch.no_grad()
    def preview(self) -> None:
        """Top row: fields of the averaged generator (seeded per column); bottom row: real patches."""
        from ..viz import preview_grid

        cfg, n = self.cfg, self.cfg.num_samples
        side = cfg.patch_size + 2 * cfg.margin
        fake = self.G_ema.sample_hu(side, side, list(range(n)), self.device).cpu().numpy()
        m = cfg.margin
        real = cfg.model.to_hu(self.bank[torch.linspace(0, len(self.bank) - 1, n).long(), 0]).numpy()
        preview_grid(self.out / "samples" / f"step-{self.step:08d}.png",
                     images_hu=[*fake[:, m:m + cfg.patch_size, m:m + cfg.patch_size], *real], columns=n, tile=128)

    def run_meta(self) -> dict[str, Any]:
        return {**super().run_meta(), "patches": int(len(self.bank)), "patches_per_set": self.per_set,
                "data": self.sources.summary(), "spacing_mm": self.cfg.model.spacing_mm}

    def export(self) -> None:
        from ..models.io import save_module

        save_module(self.G_ema, self.cfg.model, self.out / "export", self.export_name)


class ConditionalTextureTrainer(LungTextureTrainer):
    """The same loop for a generator conditioned on where it draws (``region``, ``conditions``):

    - Data: every ``patch_size``² window (on a ``stride`` grid) of the 512² TRAIN slices that is at least
      ``share`` region, kept with the condition maps of the whole field the generator draws around it;
      pixels outside the region read ``hu_low``. Nodule crops hold too little of a slice to say where
      they lie, so they give no window.
    - The critic sees the image and its condition maps (a conditional patch critic, as pix2pix's).
    - The generator draws a field for the condition maps of another bank window, and only its region
      (condition map 0) counts: what it learns is the texture given where it lies."""

    def region(self, mask: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def conditions(self, mask: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @property
    def share(self) -> float:
        raise NotImplementedError

    def patches(self, hu: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(n, 1 + C, S, S): the field-sized window's HU (region only) and its condition maps."""
        cfg = self.cfg
        size, m = cfg.patch_size, cfg.margin
        side = size + 2 * m
        h, w = hu.shape
        empty = np.zeros((0, 1 + cfg.model.cond_channels, side, side), np.float32)
        if max(h, w) < 256 or h < side or w < side:
            return empty
        region = self.region(mask)
        y, x, ok = windows(region, size, cfg.stride, self.share, margin=m)
        ok = rng.permutation(ok)[: cfg.max_patches_per_slice]
        if not len(ok):
            return empty
        image = np.where(region, hu, cfg.model.hu_low)[None]
        both = np.concatenate([image, self.conditions(mask)]).astype(np.float32)
        return np.stack([both[:, y[k] - m:y[k] + size + m, x[k] - m:x[k] + size + m] for k in ok])

    def to_bank(self, patches: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(patches)
        t[:, :1] = self.cfg.model.to_unit(t[:, :1])
        return t.contiguous()

    def _centre(self, x: torch.Tensor) -> torch.Tensor:
        m, size = self.cfg.margin, self.cfg.patch_size
        return x[:, :, m:m + size, m:m + size]

    def real_batch(self) -> torch.Tensor:
        """``batch_size`` windows (image + conditions), each flipped left-right at random: front and back
        differ (and a condition map may say which is which), so no turns."""
        cfg = self.cfg
        real = self._centre(self.bank[torch.randint(0, len(self.bank), (cfg.batch_size,))])
        flip = torch.rand(cfg.batch_size) < 0.5
        return torch.where(flip[:, None, None, None], real.flip(-1), real).to(self.device)

    def fake_batch(self) -> torch.Tensor:
        """Fields for the condition maps of random bank windows; outside the region, ``hu_low``."""
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


class HilarLungTextureTrainer(ConditionalTextureTrainer):
    """The lung texture given where in the lung it draws (``models.lung_texture.lung_conditions``):
    windows ≥ ``min_lung`` lung and clear of nodules, from 512² slices."""

    def region(self, mask: np.ndarray) -> np.ndarray:
        return lung_region(mask, self.cfg.nodule_margin_px)

    def conditions(self, mask: np.ndarray) -> np.ndarray:
        return lung_conditions(torch.from_numpy(np.array(mask))[None])[0].numpy()

    @property
    def share(self) -> float:
        return self.cfg.min_lung

    def no_patches(self) -> str:
        return (f"no {self.cfg.patch_size}² window of a 512² slice is ≥ {self.cfg.min_lung:.0%} lung and clear of "
                "nodules; lung patches with where they lie are what this model learns")


def train_lung_texture(cfg: LungTextureTrainConfig):
    """Train the lung-parenchyma texture GAN (conditioned on where in the lung it draws when
    ``cfg.model.cond_channels`` is 3); returns the run folder (weights in ``out/export``)."""
    if cfg.model.cond_channels not in (0, LUNG_CONDITIONS):
        raise NoduleSynthError(f"--cond-channels {cfg.model.cond_channels}: a lung texture takes 0 or "
                               f"{LUNG_CONDITIONS} condition maps (models.lung_texture.lung_conditions)")
    return (HilarLungTextureTrainer if cfg.model.cond_channels else LungTextureTrainer)(cfg).fit()
