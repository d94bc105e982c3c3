"""Stage 1 trainer: progressive-growing mask StyleGAN with WGAN-GP + drift (paper eqs. 1-2, §4.2).

Real masks are one-hot, average-pooled to the current level's resolution (class fractions, what a
softmax can match); fakes are ``softmax(logits)``. During a level's fade-in the reals are blended
like ProGAN's: ``lerp(upsample(pool2(x)), x, alpha)``, so D sees the same blend as G produces.

Nodules are rare (a few pixels of a few slices), so by default only nodule slices are used
(``nodule_only``) and the trainer measures, at every sample step, the *nodule rate*: the fraction
of EMA-generator masks (argmax at the current resolution, psi=1) with at least one nodule pixel,
against the same statistic on real masks pooled to that resolution. If the nodule class collapses,
``nodule_gain`` > 1 is the remedy: the critic sees the nodule channel scaled by that gain (for real,
fake and the gradient-penalty interpolates alike), i.e. the Wasserstein distance is measured in a
metric where nodule-pixel mismatch costs ``gain`` times more — the GAN analogue of class-frequency
weighting. The default 1.0 is the paper's loss. Measured once (CPU, synthetic ellipse masks, 64 slices,
res 8, 200 steps/level, batch 16, tiny nets, seed 0): at step 400 the EMA nodule rate at 8×8 was
0.63 with gain 1 and 0.91 with gain 4 against a real rate of 1.0, nodule pixel fraction 0.027 vs
0.026 real in both — a hint, not a verdict; check metrics.csv on real data before changing it.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import NoduleSynthError
from ..masks.classes import NUM_CLASSES, MaskClass
from ..models.pix2pix import one_hot
from ..models.stylegan import MaskGANConfig
from ..runtime import autocast
from ..viz import preview_grid
from . import engine
from .engine import opt
from .sources import SliceSources

log = logging.getLogger("nodulesynth.train")


@dataclasses.dataclass
class MaskTrainConfig(engine.RunConfig):
    """Mask StyleGAN training run. Defaults are the paper's (§4.2) where it gives them."""

    model: MaskGANConfig = opt(factory=MaskGANConfig)
    steps_per_level: int = opt(10_000, "steps per resolution (paper: 10,000)")
    final_level_steps: int | None = opt(None, "steps at the target resolution (default: --steps-per-level)",
                                        flag="--final-steps")
    batch_sizes: tuple[int, ...] = opt((64, 64, 64, 32, 32, 16, 16, 8),
                                       "batch size per level 4, 8, ..., 512 (last value repeats)", flag="--batch-size")
    lr: float = opt(0.002, "Adam learning rate (paper: 0.002)")
    betas: tuple[float, float] = opt((0.0, 0.99), "Adam betas (paper: 0, 0.99)")
    lambda_gp: float = opt(10.0, "gradient-penalty weight (paper: 10)")
    drift: float = opt(0.001, "drift weight (paper: 0.001)")
    ema_half_life_images: float = opt(10_000.0, "G EMA half-life in images (StyleGAN's ema_kimg=10)")
    ema_rampup: float | None = opt(0.05, "EMA half-life ≤ rampup·images seen (StyleGAN2), so short runs have an "
                                   "EMA that tracks G")
    nodule_gain: float = opt(1.0, "critic weight of the nodule channel (>1 counters nodule collapse; 1 = paper)")
    nodule_only: bool = opt(True, "train on all slices, not only nodule slices", flag="--all-slices")
    sample_every: int = opt(500, "steps between nodule-rate measurements")
    init_weights: str | None = opt(None, "fine-tune: start G and its EMA from the mask generator of this weights "
                                         "folder (a TSGAN folder or a run's export/) at its full resolution, with "
                                         "its architecture; no progressive growing")
    critic_warmup: int = opt(0, "fine-tuning: steps that train only the (fresh) critic before G moves")
    augment_p: float = opt(0.0, "probability of a random shift/scale/rotation of each mask the critic sees, "
                                "reals and fakes alike (DiffAugment; for a few dozen real slices; 0 = paper)")
    place_nodules: float = opt(0.0, "share of the real masks the critic sees with one real LIDC nodule outline "
                                    "placed into a lung (as generate --add-nodules does): with --all-slices the few, "
                                    "small real nodules otherwise teach G to draw none; 0 = off (the paper)")
    place_variants: int = opt(4, "placed copies of each real mask (different outline and position), made once "
                                 "up front with the nodule stream of (seed, slice, copy)")
    eval_samples: int = opt(256, "masks per nodule-rate measurement")


def schedule(step: int, steps_per_level: int, levels: int) -> tuple[int, float]:
    """(level, alpha) for a 0-based step: each level above 0 fades in over its first half."""
    level = min(step // steps_per_level, levels - 1)
    if level == 0:
        return 0, 1.0
    local = step - level * steps_per_level
    return level, min(1.0, local / max(1.0, steps_per_level / 2))


def masks_to_fractions(labels: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B,H,W) labels → (B,C,size,size) class fractions (one-hot average-pooled)."""
    x = one_hot(labels, NUM_CLASSES)
    return x if x.shape[-1] == size else F.adaptive_avg_pool2d(x, size)


def fade_reals(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """ProGAN blending of reals during fade-in (the previous level's image, nearest-upsampled)."""
    if alpha >= 1.0:
        return x
    low = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="nearest")
    return torch.lerp(low, x, alpha)


def augment_geometry(x: torch.Tensor, p: float, shift: float = 0.125, scale: float = 0.1,
                     degrees: float = 10.0) -> torch.Tensor:
    """Differentiable random shift / isotropic scale / rotation of class fractions (B,C,H,W), each
    sample with probability ``p``, outside the frame filled with background. The critic sees reals
    and fakes through it alike (DiffAugment, StyleGAN2-ADA's geometric group): with a few dozen real
    slices the critic otherwise memorises them and stops teaching G. No flips: anatomy is not
    left-right symmetric (heart, lung lobes, the left/right lung classes)."""
    if p <= 0:
        return x
    b, dev = x.shape[0], x.device
    on = (torch.rand(b, device=dev) < p).float()
    t = (torch.rand(b, 2, device=dev) * 2 - 1) * shift * 2 * on[:, None]  # affine_grid units: frame = 2
    s = torch.exp((torch.rand(b, device=dev) * 2 - 1) * math.log1p(scale) * on)
    a = (torch.rand(b, device=dev) * 2 - 1) * math.radians(degrees) * on
    cos, sin = torch.cos(a) / s, torch.sin(a) / s
    theta = torch.stack([torch.stack([cos, -sin, t[:, 0]], 1), torch.stack([sin, cos, t[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    bg = torch.zeros(1, x.shape[1], 1, 1, device=dev, dtype=x.dtype)
    bg[:, MaskClass.BACKGROUND] = 1
    moved = F.grid_sample(x - bg, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + bg
    return torch.where(on.bool()[:, None, None, None], moved, x)  # the others exactly as they were


def nodule_rate(labels: torch.Tensor) -> float:
    """Fraction of masks with at least one nodule pixel (≡ at least one class-5 component)."""
    return (labels == MaskClass.NODULE).flatten(1).any(1).float().mean().item()


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, beta: float) -> None:
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p.detach().to(pe.dtype), 1.0 - beta)
    for be, b in zip(ema.buffers(), model.buffers()):
        be.copy_(b)


class _Critic:
    """D with the optional nodule-channel gain applied to every input it sees (reals, fakes and
    the penalty's interpolates alike)."""

    def __init__(self, d: torch.nn.Module, gain: float) -> None:
        self.d, self.gain = d, gain
        w = torch.ones(NUM_CLASSES)
        w[MaskClass.NODULE] = gain
        self.w = w.view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor, level: int = 0, alpha: float = 1.0) -> torch.Tensor:
        if self.gain != 1.0:
            x = x * self.w.to(x.device, x.dtype)
        return self.d(x, level=level, alpha=alpha).float().view(-1)


class _RealMasks:
    """The training masks as class fractions at the model's resolution, pooled once up front:
    one-hot pooling 512² masks at every step dominated CPU training time. Pooling these further
    equals pooling the full-size one-hot directly (power-of-two sizes), and the fractions are
    dyadic, so fp16 stores them exactly while the pooling factor² ≤ 2048. Rows are addressed by
    the sources' global slice index; with ``variants`` > 0 the bank also holds that many copies of
    each mask with a placed LIDC nodule (:func:`placed_copies`), copy ``v`` at rows ``v·N + row``."""

    def __init__(self, sources: SliceSources, resolution: int, device: torch.device, chunk: int = 64,
                 variants: int = 0, seed: int = 0) -> None:
        factor = max(ds.masks.shape[-1] for ds in sources.datasets) // resolution
        dtype = torch.float16 if factor * factor <= 2048 else torch.float32
        self.row = np.full(int(sources.offsets[-1]), -1, dtype=np.int64)
        self.row[sources.indices] = np.arange(len(sources.indices))
        self.n = len(sources.indices)
        self.variants, self.placed = variants, 0
        copies: list[list[torch.Tensor]] = [[] for _ in range(variants + 1)]
        for d, ds in enumerate(sources.datasets):  # sources.indices are grouped by dataset, in order
            local = sources.indices[sources.groups == d] - sources.offsets[d]
            for c in np.array_split(local, max(1, len(local) // chunk)) if len(local) else []:
                m = np.asarray(ds.masks[c])
                copies[0].append(masks_to_fractions(torch.from_numpy(m), resolution).to(dtype))
                if variants:
                    spacing = [float(ds.records[i].spacing_mm[1]) for i in c]
                    extra, ok = placed_copies(m, spacing, variants, seed, c + sources.offsets[d])
                    self.placed += ok
                    for v in range(variants):
                        copies[v + 1].append(masks_to_fractions(torch.from_numpy(extra[v]), resolution).to(dtype))
        if variants:
            log.info("placed LIDC nodules into %d of %d mask copies", self.placed, variants * self.n)
        self.bank = torch.cat([torch.cat(p) for p in copies]).to(device)

    def fractions(self, idx, size: int, variant=None) -> torch.Tensor:
        rows = self.row[np.asarray(idx, dtype=np.int64)]
        if variant is not None:
            rows = rows + np.asarray(variant, dtype=np.int64) * self.n
        x = self.bank[torch.from_numpy(rows).to(self.bank.device)].float()
        return x if x.shape[-1] == size else F.adaptive_avg_pool2d(x, size)

    def variant_of(self, sample_seeds, share: float) -> np.ndarray | None:
        """Per draw: 0 (the real mask) or which placed copy, from the draw's own seed (so resume
        and DDP ranks see what an uninterrupted run sees)."""
        if not self.variants or share <= 0:
            return None
        out = []
        for s in sample_seeds:
            rng = np.random.default_rng([int(s), 0x504C43])
            out.append(int(rng.integers(1, self.variants + 1)) if rng.random() < share else 0)
        return np.asarray(out, dtype=np.int64)


def placed_copies(masks: np.ndarray, spacing_mm: list[float], variants: int, seed: int,
                  keys: np.ndarray) -> tuple[np.ndarray, int]:
    """``variants`` copies of each mask (N,H,W) with one LIDC nodule cross-section placed at its real
    size (the mask's pixel spacing) into a lung by :class:`NoduleModel`, from the stream of (seed,
    global slice index, copy); the mask's own nodules stay and are avoided. Only masks with both lungs
    get one, as ``generate``'s gate asks of a drawn anatomy (a one-lung apex slice stays as it is, and
    a no-lung slice skips NoduleModel's futile draws); a mask where no outline fits (a sliver of lung)
    keeps its copy unchanged too. Per-copy streams and this soft failure are why this is not
    ``LidcPlacer.add_to`` (one stream per mask name, an error on no fit). Returns (copies (V,N,H,W), placed)."""
    from ..masks.nodule_model import NoduleModel, PlacementError, placement_rng

    model = NoduleModel()  # any LIDC size, texture and lung: the library's own distribution
    out = np.repeat(masks[None], variants, axis=0)
    placed = 0
    for v in range(variants):
        for k, (m, sp) in enumerate(zip(masks, spacing_mm)):
            lungs = (m == MaskClass.LEFT_LUNG).any() and (m == MaskClass.RIGHT_LUNG).any()
            if not lungs:
                continue
            try:
                out[v, k], _ = model.place(m, sp, placement_rng(seed, int(keys[k]), v), count=1)
                placed += 1
            except PlacementError:
                pass
    return out, placed


class MaskTrainer(engine.Trainer):
    """Stage 1 hooks: progressive WGAN-GP with an EMA generator and nodule-rate evaluation."""

    name = "masks"
    metric_fields = ("level", "alpha", "resolution", "batch", "d_loss", "g_loss", "wdist", "gp",
                     "real_nodule_rate", "ema_nodule_rate", "real_nodule_frac", "ema_nodule_frac")

    def __init__(self, cfg: MaskTrainConfig) -> None:
        super().__init__(cfg)
        self.eval_every = cfg.sample_every
        self.images_seen = 0
        self.level, self.alpha = 0, 1.0

    def setup(self) -> None:
        cfg = self.cfg
        if cfg.steps_per_level < 1 or not cfg.batch_sizes or min(cfg.batch_sizes) < 1:
            raise NoduleSynthError("--steps-per-level and --batch-size must be positive")
        if not 0 <= cfg.augment_p <= 1:
            raise NoduleSynthError(f"--augment-p {cfg.augment_p}: a probability, 0 to 1")
        if not 0 <= cfg.place_nodules <= 1:
            raise NoduleSynthError(f"--place-nodules {cfg.place_nodules}: a share, 0 to 1")
        if cfg.place_nodules > 0 and cfg.place_variants < 1:
            raise NoduleSynthError(f"--place-variants {cfg.place_variants}: need ≥ 1 copy with --place-nodules")
        # fine-tuning: the init network's architecture (and resolution) replaces cfg.model first
        self.init_G = _init_generator(cfg) if cfg.init_weights else None
        keep = (lambda ds, r: r.has_nodule) if cfg.nodule_only else None
        self.sources = SliceSources(cfg.data, None if cfg.split == "all" else cfg.split, cfg.data_weights, keep,
                                    "only nodule slices are used (pass --all-slices for all)")
        res = cfg.model.resolution
        for path, ds in zip(self.sources.paths, self.sources.datasets):
            size = ds.masks.shape[-1]
            if size < res or size % res or ds.masks.shape[-2] != size:
                raise NoduleSynthError(f"--data {path}: {ds.masks.shape[-2]}×{size} masks cannot be pooled to "
                                       f"--resolution {res} (need square masks, a multiple of it)")
        self.stream = engine.IndexStream(self.sources.indices, cfg.seed, self.info, self.sources.groups,
                                         self.sources.weights)

    def build(self) -> None:
        from ..models.stylegan import MaskDiscriminator, MaskGenerator

        cfg, device = self.cfg, self.device
        self.reals = _RealMasks(self.sources, cfg.model.resolution, device,
                                variants=cfg.place_variants if cfg.place_nodules > 0 else 0, seed=cfg.seed)
        self.G = (self.init_G if self.init_G is not None else MaskGenerator(cfg.model)).to(device)
        self.D = MaskDiscriminator(cfg.model).to(device)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), eps=1e-8)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), eps=1e-8)
        self.G_t, self.critic = self.G, _Critic(self.D, cfg.nodule_gain)
        gen = torch.Generator().manual_seed(cfg.seed + 12345)
        self.eval_z = torch.randn(cfg.eval_samples, cfg.model.z_dim, generator=gen)
        idx = self.sources.indices
        self.eval_real_idx = idx[np.random.default_rng(cfg.seed).permutation(len(idx))[: cfg.eval_samples]]
        self.eval_real_var = self.reals.variant_of(np.arange(len(self.eval_real_idx)) + cfg.seed, cfg.place_nodules)

    def wrap(self) -> None:
        # progressive growing leaves the layers of later levels unused: DDP must be told
        self.G_t = engine.wrap_ddp(self.G, self.info, self.device, find_unused=True)
        self.critic = _Critic(engine.wrap_ddp(self.D, self.info, self.device, find_unused=True), self.cfg.nodule_gain)

    def total_steps(self) -> int:
        cfg = self.cfg
        final = cfg.final_level_steps or cfg.steps_per_level
        return final if cfg.init_weights else cfg.steps_per_level * (cfg.model.num_levels - 1) + final

    def level_at(self, step: int) -> tuple[int, float]:
        """(level, alpha) of a step; a fine-tune starts (and stays) at the full resolution."""
        if self.cfg.init_weights:
            return self.cfg.model.num_levels - 1, 1.0
        return schedule(step, self.cfg.steps_per_level, self.cfg.model.num_levels)

    def batch_size(self, level: int) -> int:
        return self.cfg.batch_sizes[min(level, len(self.cfg.batch_sizes) - 1)]

    def batches(self, step: int, stop_at: int):
        """Lazily: (level, alpha, faded real fractions) for each step, drawn when the step runs."""
        for s in range(step, stop_at):
            level, alpha = self.level_at(s)
            draws = self.stream.take(self.batch_size(level))
            idx = [i for i, _ in draws]
            var = self.reals.variant_of([seed for _, seed in draws], self.cfg.place_nodules)
            yield level, alpha, fade_reals(self.reals.fractions(idx, 4 * 2**level, var), alpha)

    def batch_images(self, batch) -> int:
        return batch[2].shape[0]

    def train_step(self, batch) -> dict[str, torch.Tensor]:
        from ..models.losses import wgan_g_loss, wgan_gp_d_loss

        cfg, device = self.cfg, self.device
        level, alpha, real = batch
        self.level, self.alpha = level, alpha
        bs = real.shape[0]
        self.G.train(); self.D.train()
        # --- critic step (eq. 1)
        z = torch.randn(bs, cfg.model.z_dim, device=device)
        with torch.no_grad(), autocast(device, cfg.amp):
            fake = self.G_t(z, level=level, alpha=alpha).float().softmax(1)
        aug = cfg.augment_p
        real, fake = augment_geometry(real, aug), augment_geometry(fake, aug)
        # in fp32: the gradient penalty's double backward is too coarse in bf16 (models.losses)
        self.opt_d.zero_grad(set_to_none=True)
        loss_d, parts = wgan_gp_d_loss(self.critic, real, fake, cfg.lambda_gp, cfg.drift, level=level, alpha=alpha)
        loss_d.backward()
        self.opt_d.step()
        # --- generator step (eq. 2); D's grads from this pass are discarded at the next zero_grad
        z = torch.randn(bs, cfg.model.z_dim, device=device)
        self.opt_g.zero_grad(set_to_none=True)
        learn_g = self.step >= cfg.critic_warmup  # a fresh critic first learns what real masks are
        with torch.set_grad_enabled(learn_g), autocast(device, cfg.amp):  # warm-up: g_loss logged, no graph
            fake = augment_geometry(self.G_t(z, level=level, alpha=alpha).float().softmax(1), aug)
            loss_g = wgan_g_loss(self.critic(fake, level, alpha))
        if learn_g:
            loss_g.backward()
            self.opt_g.step()
        world = self.info.world_size
        self.images_seen += bs * world
        half_life = cfg.ema_half_life_images
        if cfg.ema_rampup is not None:
            half_life = min(half_life, self.images_seen * cfg.ema_rampup)
        ema_update(self.G_ema, self.G, 0.5 ** (bs * world / max(half_life, 1e-8)))
        return {"d_loss": loss_d.detach(), "g_loss": loss_g.detach(), "gp": parts["gp"],
                "wdist": parts["d_real"] - parts["d_fake"]}

    def log_values(self, losses) -> dict[str, Any]:
        return {"level": self.level, "alpha": self.alpha, "resolution": 4 * 2**self.level,
                "batch": self.batch_size(self.level), **super().log_values(losses)}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Nodule rate of EMA samples vs reals at the current resolution."""
        level, alpha, device = self.level, self.alpha, self.device
        r = 4 * 2**level
        with autocast(device, self.cfg.amp):
            fake = torch.cat([self.G_ema(z.to(device), level=level, alpha=alpha, noise_mode="const").float().softmax(1)
                              for z in self.eval_z.split(64)])
        idx, var = self.eval_real_idx, self.eval_real_var
        parts = np.array_split(np.arange(len(idx)), max(1, len(idx) // 64))
        real = torch.cat([self.reals.fractions(idx[c], r, None if var is None else var[c]) for c in parts])
        return {"real_nodule_rate": nodule_rate(real.argmax(1)), "ema_nodule_rate": nodule_rate(fake.argmax(1)),
                "real_nodule_frac": real[:, MaskClass.NODULE].mean().item(),
                "ema_nodule_frac": fake[:, MaskClass.NODULE].mean().item()}

    def state_dict(self) -> dict[str, Any]:
        return {"level": self.level, "images_seen": self.images_seen, "G": self.G.state_dict(),
                "D": self.D.state_dict(), "G_ema": self.G_ema.state_dict(), "opt_g": self.opt_g.state_dict(),
                "opt_d": self.opt_d.state_dict(), "data": self.stream.state_dict()}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.G.load_state_dict(st["G"]); self.D.load_state_dict(st["D"]); self.G_ema.load_state_dict(st["G_ema"])
        self.opt_g.load_state_dict(st["opt_g"]); self.opt_d.load_state_dict(st["opt_d"])
        self.stream.load_state_dict(st["data"])
        self.images_seen = int(st["images_seen"])
        self.level, self.alpha = self.level_at(max(int(st["step"]) - 1, 0))

    @torch.no_grad()
    def preview(self) -> None:
        labels = self.G_ema(self.eval_z[:16].to(self.device), level=self.level, alpha=self.alpha,
                            noise_mode="const").argmax(1)
        preview_grid(self.out / "samples" / f"step-{self.step:08d}.png",
                     masks=list(labels.to(torch.uint8).cpu().numpy()), columns=8, tile=128)

    def run_meta(self) -> dict[str, Any]:
        spacings = {tuple(self.sources.record(int(g)).spacing_mm) for g in self.sources.indices}
        spacing = float(next(iter(spacings))[0]) if len(spacings) == 1 else None  # one spacing, or unknown
        return {**super().run_meta(), "level": self.level, "alpha": self.alpha, "data": self.sources.summary(),
                "spacing_mm": spacing,
                **({"placed_nodule_copies": [self.reals.placed, self.reals.variants * self.reals.n]}
                   if self.reals.variants else {}),
                **{k: v for k, v in self.last_eval.items() if "nodule" in k}}

    def export(self) -> None:
        from ..models.io import save_module

        save_module(self.G_ema, self.cfg.model, self.out / "export", "mask_generator")


def _init_generator(cfg: MaskTrainConfig):
    """The mask generator of ``cfg.init_weights``; its config replaces ``cfg.model``."""
    from ..models.stylegan import MaskGenerator

    G = engine.load_init_module(cfg.init_weights, MaskGenerator, MaskGANConfig, "mask_generator")
    cfg.model = G.cfg
    return G


def train_masks(cfg: MaskTrainConfig):
    """Train the mask StyleGAN; returns the run folder (export in ``out/export`` when finished or
    stopped by max_steps/time budget; a SIGINT only checkpoints)."""
    return MaskTrainer(cfg).fit()
