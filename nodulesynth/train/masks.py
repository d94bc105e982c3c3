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
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import NoduleSynthError
from ..io import write_json
from ..masks.classes import NUM_CLASSES, MaskClass
from ..models.pix2pix import one_hot
from ..runtime import autocast
from ..viz import preview_grid
from . import engine

log = logging.getLogger("nodulesynth.train")


def _default_model():
    from ..models.stylegan import MaskGANConfig

    return MaskGANConfig()


@dataclasses.dataclass
class MaskTrainConfig(engine.RunConfig):
    """Mask StyleGAN training run. Defaults are the paper's (§4.2) where it gives them."""

    model: "MaskGANConfig" = dataclasses.field(default_factory=_default_model)  # noqa: F821
    steps_per_level: int = 10_000                  # paper: 10,000 per resolution
    final_level_steps: int | None = None           # steps at the target resolution (None = steps_per_level)
    batch_sizes: tuple[int, ...] = (64, 64, 64, 32, 32, 16, 16, 8)  # per level 4, 8, ..., 512 (last repeats)
    lr: float = 0.002
    betas: tuple[float, float] = (0.0, 0.99)
    lambda_gp: float = 10.0
    drift: float = 0.001
    ema_half_life_images: float = 10_000.0         # StyleGAN's ema_kimg=10
    ema_rampup: float | None = 0.05                # half-life ≤ rampup·images seen (StyleGAN2), so early
                                                   # and short runs have an EMA that tracks G
    nodule_gain: float = 1.0                       # >1: remedy for nodule collapse (see module doc)
    nodule_only: bool = True
    sample_every: int = 500                        # nodule-rate measurement + metrics row with it
    eval_samples: int = 256


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
    dyadic, so fp16 stores them exactly while the pooling factor² ≤ 2048."""

    def __init__(self, ds, indices: np.ndarray, resolution: int, device: torch.device, chunk: int = 64) -> None:
        factor = ds.masks.shape[-1] // resolution
        dtype = torch.float16 if factor * factor <= 2048 else torch.float32
        self.row = np.full(len(ds), -1, dtype=np.int64)
        self.row[indices] = np.arange(len(indices))
        self.bank = torch.cat([
            masks_to_fractions(torch.from_numpy(np.asarray(ds.masks[c])), resolution).to(dtype)
            for c in np.array_split(indices, max(1, len(indices) // chunk))
        ]).to(device)

    def fractions(self, idx, size: int) -> torch.Tensor:
        x = self.bank[torch.from_numpy(self.row[np.asarray(idx, dtype=np.int64)]).to(self.bank.device)].float()
        return x if x.shape[-1] == size else F.adaptive_avg_pool2d(x, size)


def train_masks(cfg: MaskTrainConfig) -> Path:
    """Train the mask StyleGAN; returns the run folder (export in ``out/export`` when finished or
    stopped by max_steps/time budget; a SIGINT only checkpoints)."""
    from ..data.slices import SliceDataset
    from ..models.io import save_module
    from ..models.losses import wgan_g_loss, wgan_gp_d_loss
    from ..models.stylegan import MaskDiscriminator, MaskGenerator

    levels = cfg.model.num_levels
    if cfg.steps_per_level < 1 or not cfg.batch_sizes or min(cfg.batch_sizes) < 1:
        raise NoduleSynthError("--steps-per-level and --batch-size must be positive")
    info, device = engine.init_distributed(cfg.device)
    ds = SliceDataset(cfg.data)
    indices = np.array([i for i, r in enumerate(ds.records) if r.has_nodule or not cfg.nodule_only], dtype=np.int64)
    if len(indices) == 0:
        raise NoduleSynthError(f"--data {cfg.data}: no nodule slices to train on (nodule_only=True)")
    if ds.masks.shape[-1] < cfg.model.resolution:
        raise NoduleSynthError(f"--resolution {cfg.model.resolution}: larger than the dataset's {ds.masks.shape[-1]} px masks")
    out, ckpt = engine.prepare_run(cfg.out, cfg, cfg.resume, cfg.overwrite, info)
    reals = _RealMasks(ds, indices, cfg.model.resolution, device)

    engine.seed_everything(cfg.seed)  # same initial weights on every rank
    G = MaskGenerator(cfg.model).to(device)
    D = MaskDiscriminator(cfg.model).to(device)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    engine.seed_everything(cfg.seed, info.rank, stream=1)
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), eps=1e-8)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), eps=1e-8)
    stream = engine.IndexStream(indices, cfg.seed, info)
    step, images_seen = 0, 0
    if ckpt is not None:
        st = engine.load_checkpoint(ckpt)
        G.load_state_dict(st["G"]); D.load_state_dict(st["D"]); G_ema.load_state_dict(st["G_ema"])
        opt_g.load_state_dict(st["opt_g"]); opt_d.load_state_dict(st["opt_d"])
        stream.load_state_dict(st["data"]); engine.set_rng_state(st["rng"])
        step, images_seen = int(st["step"]), int(st["images_seen"])
        log.info("resumed from %s (step %d)", ckpt, step)
    # progressive growing leaves the layers of later levels unused: DDP must be told
    G_t = engine.wrap_ddp(G, info, device, find_unused=True)
    critic = _Critic(engine.wrap_ddp(D, info, device, find_unused=True), cfg.nodule_gain)

    total = cfg.steps_per_level * (levels - 1) + (cfg.final_level_steps or cfg.steps_per_level)
    stop_at = min(total, cfg.max_steps) if cfg.max_steps is not None else total
    metrics = engine.Metrics(out, ["level", "alpha", "resolution", "batch", "d_loss", "g_loss", "wdist", "gp",
                                   "real_nodule_rate", "ema_nodule_rate", "real_nodule_frac", "ema_nodule_frac",
                                   "imgs_per_s"], resume_step=step if ckpt else None, enabled=info.is_main)
    eval_gen = torch.Generator().manual_seed(cfg.seed + 12345)
    eval_z = torch.randn(cfg.eval_samples, cfg.model.z_dim, generator=eval_gen)
    eval_real_idx = indices[np.random.default_rng(cfg.seed).permutation(len(indices))[: cfg.eval_samples]]
    last: dict[str, float] = {}
    t0, t_last, n_img = time.monotonic(), time.monotonic(), 0

    def evaluate(level: int, alpha: float) -> dict[str, float]:
        """Nodule rate of EMA samples vs reals at the current resolution (RNG-neutral)."""
        r = 4 * 2**level
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad(), \
                autocast(device, cfg.amp):
            fake = torch.cat([G_ema(z.to(device), level=level, alpha=alpha, noise_mode="const").float().softmax(1)
                              for z in eval_z.split(64)])
        real = torch.cat([reals.fractions(c, r) for c in np.array_split(eval_real_idx, max(1, len(eval_real_idx) // 64))])
        return {"real_nodule_rate": nodule_rate(real.argmax(1)), "ema_nodule_rate": nodule_rate(fake.argmax(1)),
                "real_nodule_frac": real[:, MaskClass.NODULE].mean().item(),
                "ema_nodule_frac": fake[:, MaskClass.NODULE].mean().item()}

    def save(step: int, level: int, alpha: float) -> None:
        if not info.is_main:
            return
        engine.save_checkpoint(out, step, {
            "step": step, "level": level, "images_seen": images_seen,
            "G": G.state_dict(), "D": D.state_dict(), "G_ema": G_ema.state_dict(),
            "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "data": stream.state_dict(),
            "rng": engine.rng_state()}, keep=cfg.keep_checkpoints)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            labels = G_ema(eval_z[:16].to(device), level=level, alpha=alpha, noise_mode="const").argmax(1)
        preview_grid(out / "samples" / f"step-{step:08d}.png", masks=list(labels.to(torch.uint8).cpu().numpy()),
                     columns=8, tile=128)
        write_json(out / "run.json", {"trainer": "masks", "step": step, "level": level, "alpha": alpha, "world_size": info.world_size,
                                      "device": str(device), **{k: v for k, v in last.items() if "nodule" in k}})

    bar = tqdm(total=stop_at, initial=step, disable=not info.is_main, desc="masks", dynamic_ncols=True)
    level = schedule(step, cfg.steps_per_level, levels)[0]
    stopped_by_signal = False
    with engine.StopSignal() as stop:
        while step < stop_at:
            level, alpha = schedule(step, cfg.steps_per_level, levels)
            res, bs = 4 * 2**level, cfg.batch_sizes[min(level, len(cfg.batch_sizes) - 1)]
            G.train(); D.train()
            real = fade_reals(reals.fractions([i for i, _ in stream.take(bs)], res), alpha)
            # --- critic step (eq. 1)
            z = torch.randn(bs, cfg.model.z_dim, device=device)
            with torch.no_grad(), autocast(device, cfg.amp):
                fake = G_t(z, level=level, alpha=alpha).float().softmax(1)
            # in fp32: the gradient penalty's double backward is too coarse in bf16 (models.losses)
            opt_d.zero_grad(set_to_none=True)
            loss_d, parts = wgan_gp_d_loss(critic, real, fake, cfg.lambda_gp, cfg.drift, level=level, alpha=alpha)
            loss_d.backward()
            opt_d.step()
            # --- generator step (eq. 2); D's grads from this pass are discarded at the next zero_grad
            z = torch.randn(bs, cfg.model.z_dim, device=device)
            opt_g.zero_grad(set_to_none=True)
            with autocast(device, cfg.amp):
                loss_g = wgan_g_loss(critic(G_t(z, level=level, alpha=alpha).float().softmax(1), level, alpha))
            loss_g.backward()
            opt_g.step()
            images_seen += bs * info.world_size
            half_life = cfg.ema_half_life_images
            if cfg.ema_rampup is not None:
                half_life = min(half_life, images_seen * cfg.ema_rampup)
            ema_update(G_ema, G, 0.5 ** (bs * info.world_size / max(half_life, 1e-8)))
            step += 1
            n_img += bs * info.world_size
            bar.update(1)
            evaluated = step % cfg.sample_every == 0 or step == stop_at
            if evaluated and info.is_main:
                last.update(evaluate(level, alpha))
            if info.is_main and (evaluated or step % cfg.log_every == 0):  # .item() syncs: not every step
                last.update(d_loss=loss_d.item(), g_loss=loss_g.item(), gp=parts["gp"].item(),
                            wdist=(parts["d_real"] - parts["d_fake"]).item())
                bar.set_postfix(res=res, a=f"{alpha:.2f}", d=f"{last['d_loss']:.3f}", g=f"{last['g_loss']:.3f}")
                now = time.monotonic()
                row = {"level": level, "alpha": alpha, "resolution": res, "batch": bs,
                       "imgs_per_s": n_img / max(now - t_last, 1e-9), **last}
                if not evaluated:
                    row = {k: v for k, v in row.items() if "nodule" not in k}
                metrics.log(step, row)
                t_last, n_img = now, 0
            out_of_time = engine.any_rank(cfg.time_budget_s is not None and time.monotonic() - t0 > cfg.time_budget_s,
                                          info, device)
            stopped_by_signal = engine.any_rank(stop.requested, info, device)
            if stopped_by_signal or out_of_time or step % cfg.checkpoint_every == 0 or step == stop_at:
                save(step, level, alpha)
            if stopped_by_signal or out_of_time:
                break
    bar.close()
    metrics.close()
    if info.is_main and not stopped_by_signal:
        save_module(G_ema, cfg.model, out / "export", "mask_generator")
    log.info("mask training stopped at step %d/%d (%s)", step, total, out)
    return out
