"""Nodule-texture trainer: the inpainting GAN of ``models.nodule_texture`` on real nodule windows.

Data: every prepared dataset's TRAIN split (in practice the LIDC nodule crops: thousands of
nodules with readers' outlines), resampled to the model's pixel spacing. The bank holds one
(window + 2·jitter)² cut per nodule component whose extent fits the window, centred on it: HU and
the outline. Each step cuts a window² view at a random offset that keeps the hole inside it, then
flips and turns it (a nodule has no preferred direction in-plane), so the model never learns that
nodules sit in the centre.

Step: the critic sees (window, outline) with the non-saturating loss and a lazy R1 penalty, as the
lung texture's, each logit weighted by how much hole its cell holds (outside the hole real and fake
are the same pixels: a plain mean stayed at chance, 2·ln 2, in a first run); the generator adds
``lambda_l1`` · the L1 distance inside the hole (so the hole agrees with the real one) to the
adversarial loss (so it draws texture, not a mean); both are given the real nodule's mean density
inside its outline, the one thing the window cannot tell. An EMA of the generator is what is
exported. Resume is exact (global RNG only, saved).

Fine band (``l1_blur``, ``lambda_band``): the critic learns slowly here, and a pixel L1 then draws
the smooth conditional median (the first shipped model held half the real inner structure). With
``l1_blur`` > 0 the L1 compares blurred fill and real (shape, density, edges), and ``lambda_band``
matches each window's std of the fine band (image minus its blur) inside the hole to the real's: the
frequency split of super-resolution GANs, with texture left to terms that accept any draw of the
right energy.
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
from ..models.lung_texture import PatchCritic
from ..models.nodule_texture import DENSITY_TABLE, DRAW_FIELDS, NAME, NoduleInpainter, NoduleTextureConfig, hole_of
from . import engine
from .engine import opt
from .lung_texture import GanRunConfig, LungTextureTrainer

log = logging.getLogger("nodulesynth.train")


@dataclasses.dataclass
class NoduleTextureTrainConfig(GanRunConfig):
    """Nodule inpainting GAN run (and the shared GAN settings)."""

    r1_gamma: float = opt(0.1, "R1 penalty weight γ on the critic's gradient at real windows")
    model: NoduleTextureConfig = opt(factory=NoduleTextureConfig)
    steps: int = opt(6000, "optimisation steps")
    batch_size: int = opt(32, "windows per step")
    jitter: int = opt(8, "largest shift (px) of a view from the nodule's centre")
    lambda_l1: float = opt(10.0, "weight of the L1 distance to the real pixels inside the hole")
    l1_blur: float = opt(0.0, "σ (px) of the Gaussian that fill and real are blurred with before the L1 (0: pixel "
                              "L1); above 0 the L1 holds shape and density and leaves the fine band to the "
                              "critic and --lambda-band")
    lambda_band: float = opt(0.0, "weight of matching each window's fine-band std (image − its --l1-blur blur) inside "
                                  "the hole to the real window's (needs --l1-blur > 0)")
    init_weights: str | None = opt(None, "fine-tune: start the generator from the nodule texture of this weights "
                                         "folder (\"pretrained\": the shipped one); the critic starts fresh; with "
                                         "--steps 0 only its density table is refitted on --data")


def nodule_cuts(hu: np.ndarray, mask: np.ndarray, side: int, max_extent: int) -> np.ndarray:
    """(N, 2, side, side) float32: HU and outline of a ``side``² cut centred on each nodule component
    whose extent is at most ``max_extent`` px (shifted, never padded, where the slice edge is near)."""
    from ..masks.boxes import mask_to_boxes

    h, w = mask.shape
    nod = mask == MaskClass.NODULE
    if h < side or w < side or not nod.any():
        return np.zeros((0, 2, side, side), np.float32)
    out = []
    for x0, y0, x1, y1 in np.asarray(mask_to_boxes(mask)).reshape(-1, 4).astype(int):
        if max(x1 - x0, y1 - y0) > max_extent:
            continue
        cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
        ty, tx = min(max(cy - side // 2, 0), h - side), min(max(cx - side // 2, 0), w - side)
        out.append(np.stack([hu[ty:ty + side, tx:tx + side], nod[ty:ty + side, tx:tx + side]]))
    return np.stack(out).astype(np.float32) if out else np.zeros((0, 2, side, side), np.float32)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, 1, H, W) blurred by a separable Gaussian of ``sigma`` px (reflected edges); ``sigma`` 0: ``x``."""
    if sigma <= 0:
        return x
    r = max(1, int(3 * sigma + 0.5))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=x.dtype, device=x.device) ** 2 / (2 * sigma**2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))


def hole_std(x: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """(B,) standard deviation of (B, 1, H, W) ``x`` over each window's ``hole`` pixels."""
    n = hole.sum((1, 2, 3)).clamp(min=1)
    mean = (x * hole).sum((1, 2, 3)) / n
    return (((x - mean[:, None, None, None]) ** 2 * hole).sum((1, 2, 3)) / n + 1e-8).sqrt()


def wmean(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` weighted by ``w`` (same shape)."""
    return (x * w).sum() / w.sum().clamp(min=1e-6)


class NoduleTextureTrainer(LungTextureTrainer):
    """Hooks for the nodule inpainter: the lung texture's data loop (``setup``) with a bank of nodule
    cuts, random in-bounds views, critic on (image, outline), generator with adversarial + L1 loss."""

    name = "nodule-texture"
    export_name = NAME
    metric_fields = ("d_loss", "g_loss", "l1", "band", "r1", "fake_hole_hu", "real_hole_hu", "fake_hole_std",
                     "real_hole_std", "fake_band_std", "real_band_std")

    def check(self) -> None:
        cfg = self.cfg
        if cfg.steps < 0 or cfg.batch_size < 1 or cfg.jitter < 0 or cfg.lambda_l1 < 0:
            raise NoduleSynthError("--batch-size must be positive, --steps, --jitter and --lambda-l1 ≥ 0")
        if cfg.steps == 0 and not cfg.init_weights:
            raise NoduleSynthError("--steps 0 (refit the density table only) needs --init-weights")
        if cfg.r1_gamma < 0 or cfg.r1_every < 1 or not 0 <= cfg.ema_beta < 1:
            raise NoduleSynthError("--r1-gamma must be ≥ 0, --r1-every ≥ 1 and --ema-beta in [0, 1)")
        if cfg.l1_blur < 0 or cfg.lambda_band < 0 or (cfg.lambda_band > 0 and cfg.l1_blur == 0):
            raise NoduleSynthError(f"--l1-blur {cfg.l1_blur}, --lambda-band {cfg.lambda_band}: both must be ≥ 0, and "
                                   "the fine band needs a blur (--l1-blur > 0)")
        if cfg.init_weights:
            init = engine.init_config(cfg.init_weights, NoduleTextureConfig, NAME)
            if dataclasses.replace(init, **{f: getattr(cfg.model, f) for f in DRAW_FIELDS}) != cfg.model:
                raise NoduleSynthError(f"--init-weights {cfg.init_weights}: its nodule texture ({init}) differs from "
                                       f"--model ({cfg.model}) in more than how densities are drawn")

    @property
    def side(self) -> int:
        return self.cfg.model.window + 2 * self.cfg.jitter

    def patches(self, hu: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return nodule_cuts(hu, mask, self.side, self.cfg.model.max_extent)

    def no_patches(self) -> str:
        return (f"no nodule (class {int(MaskClass.NODULE)}) of at most {self.cfg.model.max_extent} px fits a "
                f"{self.side}² cut; nodule windows are what this model learns")

    def to_bank(self, patches: np.ndarray) -> torch.Tensor:
        """Cuts → (N, 2, side, side): unit-range HU, outline; and each cut's range of view offsets
        that keep the hole ≥ 2 px inside the view (``self.lo``, ``self.hi``: (N, 2) y/x, inclusive)."""
        cfg = self.cfg.model
        bank = torch.from_numpy(patches)
        bank[:, 0] = cfg.to_unit(bank[:, 0])
        hole = hole_of(bank[:, 1] > 0, cfg.ring_px)
        lo, hi = [], []
        for axis in (2, 1):  # rows (y) then columns (x) of the (N, side, side) hole
            any_ = hole.any(axis)
            first = any_.float().argmax(1)
            last = any_.shape[1] - any_.flip(1).float().argmax(1)
            lo.append((last + 2 - cfg.window).clamp(min=0))
            hi.append((first - 2).clamp(max=2 * self.cfg.jitter))
        self.lo, self.hi = torch.stack(lo, 1), torch.stack(hi, 1)
        ok = (self.lo <= self.hi).all(1)
        self.lo, self.hi = self.lo[ok], self.hi[ok]
        return bank[ok].contiguous()

    def build(self) -> None:
        cfg = self.cfg
        self.G = NoduleInpainter(cfg.model)
        if cfg.init_weights:  # (config checked in check(); the density table is refitted below)
            init = engine.load_init_module(cfg.init_weights, NoduleInpainter, NoduleTextureConfig, NAME)
            self.G.load_state_dict({k: v for k, v in init.state_dict().items() if k not in DENSITY_TABLE}, strict=False)
        self.G.to(self.device)
        # the bank's nodule densities by area (the cuts are at the model's spacing), which generation draws from
        area = (self.bank[:, 1] > 0).sum((1, 2)).float() * cfg.model.spacing_mm**2
        self.G.fit_density(self.density(self.bank), area)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        self.D = PatchCritic(in_channels=2).to(self.device)
        self.opt_g = torch.optim.Adam(self.G.parameters(), cfg.lr_g, betas=(cfg.beta1, cfg.beta2))
        self.opt_d = torch.optim.Adam(self.D.parameters(), cfg.lr_d, betas=(cfg.beta1, cfg.beta2))
        self.G.train()
        self.D.train()

    def real_batch(self) -> torch.Tensor:
        """``batch_size`` views (image, outline) at random in-bounds offsets, flipped and turned."""
        cfg, s = self.cfg, self.cfg.model.window
        idx = torch.randint(0, len(self.bank), (cfg.batch_size,))
        lo, hi = self.lo[idx], self.hi[idx]
        off = lo + (torch.rand(cfg.batch_size, 2) * (hi - lo + 1).float()).long().clamp(max=hi - lo)
        ar = torch.arange(s)
        rows = (off[:, 0, None] + ar)[:, :, None].expand(-1, s, s)
        cols = (off[:, 1, None] + ar)[:, None, :].expand(-1, s, s)
        cuts = self.bank[idx]
        view = cuts[torch.arange(cfg.batch_size)[:, None, None, None], torch.arange(2)[None, :, None, None],
                    rows[:, None], cols[:, None]]
        flip = torch.rand(cfg.batch_size) < 0.5
        view = torch.where(flip[:, None, None, None], view.flip(-1), view)
        k = int(torch.randint(0, 4, (1,)))
        return torch.rot90(view, k, (2, 3)).contiguous().to(self.device)

    def train_step(self, batch: Any) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        real = self.real_batch()
        outline = real[:, 1:]
        hole = hole_of(outline[:, 0], cfg.model.ring_px)[:, None].float()
        density = self.density(real)
        fake = torch.cat([self.G(real[:, :1], outline, density,
                                 self.G.noise_inputs(len(real), cfg.model.window, device=self.device)), outline], 1)
        lazy = cfg.r1_gamma > 0 and self.step % cfg.r1_every == 0
        real.requires_grad_(lazy)
        d_real = self.D(real)
        w = self.logit_weights(hole, d_real.shape[-2:])
        d_loss = wmean(F.softplus(-d_real), w) + wmean(F.softplus(self.D(fake.detach())), w)
        r1 = torch.zeros((), device=self.device)
        if lazy:
            grad, = torch.autograd.grad(d_real.sum(), real, create_graph=True)
            r1 = grad[:, :1].pow(2).sum((1, 2, 3)).mean()
            d_loss = d_loss + cfg.r1_gamma / 2 * cfg.r1_every * r1
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt_d.step()
        real = real.detach()
        f_low, r_low = (gaussian_blur(x[:, :1], cfg.l1_blur) for x in (fake, real))
        l1 = ((f_low - r_low).abs() * hole).sum() / hole.sum().clamp(min=1)
        f_std, r_std = hole_std(fake[:, :1] - f_low, hole), hole_std(real[:, :1] - r_low, hole)
        band = (f_std - r_std).abs().mean()
        g_loss = wmean(F.softplus(-self.D(fake)), w) + cfg.lambda_l1 * l1 + cfg.lambda_band * band
        self.generator_step(g_loss)
        with torch.no_grad():
            to_hu, inside = cfg.model.to_hu, hole[:, 0] > 0
            f, r = to_hu(fake[:, 0].detach())[inside], to_hu(real[:, 0])[inside]
            hu = (cfg.model.hu_high - cfg.model.hu_low) / 2  # HU per unit
            stats = {"fake_hole_hu": f.mean(), "real_hole_hu": r.mean(), "fake_hole_std": f.std(),
                     "real_hole_std": r.std(), "fake_band_std": f_std.detach().mean() * hu,
                     "real_band_std": r_std.mean() * hu}
        return {"d_loss": d_loss.detach(), "g_loss": g_loss.detach(), "l1": l1.detach(), "band": band.detach(),
                "r1": r1.detach(), **stats}

    @staticmethod
    def density(views: torch.Tensor) -> torch.Tensor:
        """(B,) mean unit-range image inside each view's outline (its nodule's density)."""
        inside = views[:, 1] > 0
        return (views[:, 0] * inside).sum((1, 2)) / inside.sum((1, 2)).clamp(min=1)

    @staticmethod
    def logit_weights(hole: torch.Tensor, shape) -> torch.Tensor:
        """(B, 1, h, w) share of each critic logit's cell that is hole: only logits that see the hole
        count, since everywhere else real and fake windows are the same pixels (a plain mean sits at
        chance whatever the critic learns there)."""
        return F.adaptive_avg_pool2d(hole, shape)

    @torch.no_grad()
    def preview(self) -> None:
        """Rows: real views; the averaged generator's fill of their holes (two seeds)."""
        from ..viz import preview_grid

        cfg, n = self.cfg.model, self.cfg.num_samples
        with torch.random.fork_rng():
            torch.manual_seed(0)
            real = self.real_batch()[:n]
        outs = [self.G_ema(real[:, :1], real[:, 1:], self.density(real),
                           self.G_ema.noise_inputs(n, cfg.window, [s * n + i for i in range(n)], self.device))
                for s in range(2)]
        imgs = [cfg.to_hu(t[:, 0]).cpu().numpy() for t in (real[:, :1], *outs)]
        preview_grid(self.out / "samples" / f"step-{self.step:08d}.png",
                     images_hu=[im for row in imgs for im in row], columns=n, tile=128)

    def run_meta(self) -> dict[str, Any]:
        return {**super().run_meta(), "windows": int(len(self.bank))}


def train_nodule_texture(cfg: NoduleTextureTrainConfig):
    """Train the nodule inpainting GAN; returns the run folder (weights in ``out/export``)."""
    return NoduleTextureTrainer(cfg).fit()
