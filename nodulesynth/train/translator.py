"""Stage 2 trainer: DL-Pix2Pix on (mask one-hot, CT) pairs, loss eq. (8), paper §4.2.

G loss = GAN + λ_L1·L1 + λ_P·perceptual (λ_L1 = 200, λ_P = 10); D = PatchGAN on (mask, image).
Perceptual = VGG-19 features when weights are available (torch hub cache or ``vgg_weights``),
otherwise pix2pixHD discriminator feature matching; which one is used is logged and recorded in
``run.json`` (it changes what the λ_P term means). Adam 2e-4, β1 0.5; the LR is constant for the
first half of the epochs and decays linearly to 0 over the second half (per step, LambdaLR).
The UNet is fully convolutional, so it trains on random crops (``crop_size``) of the 512² slices.
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
from ..hu import hu_to_unit, unit_to_hu
from ..io import write_json
from ..runtime import autocast
from ..viz import preview_grid
from . import engine

log = logging.getLogger("nodulesynth.train")


def _default_model():
    from ..models.pix2pix import TranslatorConfig

    return TranslatorConfig()


@dataclasses.dataclass
class TranslatorTrainConfig(engine.RunConfig):
    """DL-Pix2Pix training run. Defaults are the paper's (§4.2)."""

    model: "TranslatorConfig" = dataclasses.field(default_factory=_default_model)  # noqa: F821
    epochs: int = 200                 # LR decays linearly to 0 over the second half
    batch_size: int = 1
    lr: float = 2e-4
    beta1: float = 0.5
    lambda_l1: float = 200.0
    lambda_perc: float = 10.0
    gan_mode: str = "lsgan"           # or "bce" (original pix2pix); see models.losses.gan_loss
    crop_size: int | None = 256       # None = whole slices
    augment: bool = True
    vgg_weights: str | None = None
    num_samples: int = 4
    num_workers: int = 2


class PairDataset(torch.utils.data.Dataset):
    """Items are ``(index, seed)`` pairs from engine.IndexStream → (onehot-able mask, unit image);
    the seed drives the random crop and augmentation, so data is a pure function of the pair."""

    def __init__(self, ds, crop: int | None, augment) -> None:
        self.ds, self.crop, self.augment = ds, crop, augment

    def __len__(self) -> int:
        return len(self.ds.records)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        i, seed = item
        hu = np.asarray(self.ds.images[i], dtype=np.float32)
        mask = np.asarray(self.ds.masks[i])
        if self.augment is not None:
            hu, mask = self.augment(hu, mask, seed)
        if self.crop is not None and self.crop < hu.shape[-1]:
            rng = np.random.default_rng([seed, 1])
            y, x = (int(rng.integers(0, s - self.crop + 1)) for s in hu.shape)
            hu, mask = hu[y:y + self.crop, x:x + self.crop], mask[y:y + self.crop, x:x + self.crop]
        image = torch.from_numpy(hu_to_unit(np.ascontiguousarray(hu, dtype=np.float32)))[None]
        return torch.from_numpy(np.array(mask, dtype=np.int64)), image


class _BatchSampler:
    """Feeds the DataLoader ``steps`` batches from the stream, starting where it stands now."""

    def __init__(self, stream: engine.IndexStream, batch_size: int, steps: int) -> None:
        self.stream, self.batch_size, self.steps = stream, batch_size, steps

    def __iter__(self):
        for _ in range(self.steps):
            yield self.stream.take(self.batch_size)

    def __len__(self) -> int:
        return self.steps


def lr_factor(step: int, total: int) -> float:
    """1 for the first half of training, then linear to 0 at ``total``."""
    half = total // 2
    return 1.0 if step < half else max(0.0, (total - step) / max(1, total - half))


def train_translator(cfg: TranslatorTrainConfig) -> Path:
    """Train DL-Pix2Pix; returns the run folder (export in ``out/export`` unless stopped by SIGINT)."""
    from ..data.slices import SliceDataset
    from ..models.io import save_module
    from ..models.losses import PerceptualLoss, feature_matching_loss, gan_loss
    from ..models.pix2pix import DLPix2PixGenerator, PatchDiscriminator, one_hot
    from .augment import PairAugment

    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise NoduleSynthError("--epochs and --batch-size must be positive")
    info, device = engine.init_distributed(cfg.device)
    ds = SliceDataset(cfg.data)
    size = ds.images.shape[-1]
    crop = cfg.crop_size if cfg.crop_size and cfg.crop_size < size else None
    multiple = 2 ** cfg.model.num_downs
    for what, s in (("--crop-size", crop or size), (f"--data {cfg.data}: slice size", size)):
        if s % multiple:
            raise NoduleSynthError(f"{what} {s}: must be a multiple of 2**num_downs = {multiple}")
    if (crop or size) < 2 ** (cfg.model.n_layers_d + 2):
        raise NoduleSynthError(f"--crop-size {crop or size}: too small for the {cfg.model.n_layers_d}-layer PatchGAN "
                               f"(at least {2 ** (cfg.model.n_layers_d + 2)})")
    pairs = PairDataset(ds, crop, PairAugment() if cfg.augment else None)
    stream = engine.IndexStream(np.arange(len(ds)), cfg.seed, info)
    steps_per_epoch = stream.per_epoch // cfg.batch_size
    if steps_per_epoch == 0:
        raise NoduleSynthError(f"--batch-size {cfg.batch_size}: larger than the {stream.per_epoch} slices per process")
    total = cfg.epochs * steps_per_epoch
    out, ckpt = engine.prepare_run(cfg.out, cfg, cfg.resume, cfg.overwrite, info)

    engine.seed_everything(cfg.seed)  # same initial weights on every rank
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    G = DLPix2PixGenerator(cfg.model).to(device, memory_format=fmt)
    D = PatchDiscriminator(cfg.model).to(device, memory_format=fmt)
    engine.seed_everything(cfg.seed, info.rank, stream=1)
    perc = PerceptualLoss.try_create(cfg.vgg_weights)
    perc = perc.to(device) if perc is not None else None
    perc_kind = "vgg19" if perc is not None else "feature_matching"
    log.info("perceptual loss: %s", "VGG-19 features" if perc is not None else
             "discriminator feature matching (no VGG-19 weights found)")
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
    sch_g = torch.optim.lr_scheduler.LambdaLR(opt_g, lambda s: lr_factor(s, total))
    sch_d = torch.optim.lr_scheduler.LambdaLR(opt_d, lambda s: lr_factor(s, total))
    step = 0
    if ckpt is not None:
        st = engine.load_checkpoint(ckpt)
        G.load_state_dict(st["G"]); D.load_state_dict(st["D"])
        opt_g.load_state_dict(st["opt_g"]); opt_d.load_state_dict(st["opt_d"])
        sch_g.load_state_dict(st["sch_g"]); sch_d.load_state_dict(st["sch_d"])
        stream.load_state_dict(st["data"]); engine.set_rng_state(st["rng"])
        step = int(st["step"])
        log.info("resumed from %s (step %d)", ckpt, step)
    G_t, D_t = engine.wrap_ddp(G, info, device), engine.wrap_ddp(D, info, device)

    stop_at = min(total, cfg.max_steps) if cfg.max_steps is not None else total
    metrics = engine.Metrics(out, ["epoch", "lr", "d_loss", "g_gan", "l1", "perc", "g_total", "imgs_per_s"],
                             resume_step=step if ckpt else None, enabled=info.is_main)
    sample_idx = [i for i, r in enumerate(ds.records) if r.has_nodule][: cfg.num_samples] or list(range(cfg.num_samples))
    sample_idx = sample_idx[: len(ds)]
    run_meta = {"trainer": "translator", "perceptual": perc_kind, "vgg_weights": cfg.vgg_weights,
                "steps_per_epoch": steps_per_epoch, "total_steps": total, "world_size": info.world_size,
                "device": str(device), "crop_size": crop, "image_size": size}

    def save(step: int) -> None:
        if not info.is_main:
            return
        engine.save_checkpoint(out, step, {
            "step": step, "G": G.state_dict(), "D": D.state_dict(), "opt_g": opt_g.state_dict(),
            "opt_d": opt_d.state_dict(), "sch_g": sch_g.state_dict(), "sch_d": sch_d.state_dict(),
            "data": stream.state_dict(), "rng": engine.rng_state()}, keep=cfg.keep_checkpoints)
        masks = np.stack([np.asarray(ds.masks[i]) for i in sample_idx])
        was_training = G.training
        G.eval()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad(), \
                autocast(device, cfg.amp):
            fake = G(one_hot(torch.from_numpy(masks).long().to(device), cfg.model.in_classes).to(memory_format=fmt)).float()
        G.train(was_training)
        fake_hu = unit_to_hu(fake[:, 0].cpu().numpy())
        imgs, labels = [], []
        for k, i in enumerate(sample_idx):  # each row: (mask | real) (mask | generated)
            imgs += [np.asarray(ds.images[i]), fake_hu[k]]
            labels += [masks[k], masks[k]]
        preview_grid(out / "samples" / f"step-{step:08d}.png", images_hu=imgs, masks=labels, columns=2, tile=256)
        write_json(out / "run.json", {**run_meta, "step": step})

    # The loader's sampler runs ahead of training (prefetch), so it walks a copy of the stream; the
    # trainer's own stream advances one batch per finished step and is what checkpoints record.
    # An explicit generator keeps the loader from drawing on the global torch RNG.
    loader = torch.utils.data.DataLoader(
        pairs, batch_sampler=_BatchSampler(copy.deepcopy(stream), cfg.batch_size, stop_at - step),
        num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed))
    bar = tqdm(total=stop_at, initial=step, disable=not info.is_main, desc="translator", dynamic_ncols=True)
    t0 = t_last = time.monotonic()
    n_img = 0
    stopped = False
    with engine.StopSignal() as stop:
        G.train(); D.train()
        for labels, real in loader:
            onehot = one_hot(labels.to(device, non_blocking=True), cfg.model.in_classes).to(memory_format=fmt)
            real = real.to(device, non_blocking=True).to(memory_format=fmt)
            with autocast(device, cfg.amp):
                fake = G_t(onehot)
            # --- D: real pairs → 1, fake pairs → 0
            opt_d.zero_grad(set_to_none=True)
            with autocast(device, cfg.amp):
                loss_d = 0.5 * (gan_loss(D_t(onehot, fake.detach()), False, cfg.gan_mode)
                                + gan_loss(D_t(onehot, real), True, cfg.gan_mode))
            loss_d.backward()
            opt_d.step()
            # --- G: eq. (8)
            opt_g.zero_grad(set_to_none=True)
            with autocast(device, cfg.amp):
                pred, fake_feats = D_t(onehot, fake, return_features=True)
                g_gan = gan_loss(pred, True, cfg.gan_mode)
                l1 = F.l1_loss(fake.float(), real.float())
                if perc is not None:
                    p = perc(fake, real)
                else:
                    with torch.no_grad():
                        _, real_feats = D_t(onehot, real, return_features=True)
                    p = feature_matching_loss(real_feats, fake_feats)
                g_total = g_gan + cfg.lambda_l1 * l1 + cfg.lambda_perc * p
            g_total.backward()
            opt_g.step()
            sch_g.step(); sch_d.step()
            stream.take(cfg.batch_size)
            step += 1
            n_img += real.shape[0] * info.world_size
            bar.update(1)
            if info.is_main and (step % cfg.log_every == 0 or step == stop_at):  # .item() syncs: not every step
                bar.set_postfix(d=f"{loss_d.item():.3f}", l1=f"{l1.item():.4f}", p=f"{p.item():.3f}")
                now = time.monotonic()
                metrics.log(step, {"epoch": step / steps_per_epoch, "lr": sch_g.get_last_lr()[0],
                                   "d_loss": loss_d.item(), "g_gan": g_gan.item(), "l1": l1.item(),
                                   "perc": p.item(), "g_total": g_total.item(),
                                   "imgs_per_s": n_img / max(now - t_last, 1e-9)})
                t_last, n_img = now, 0
            out_of_time = engine.any_rank(cfg.time_budget_s is not None and time.monotonic() - t0 > cfg.time_budget_s,
                                          info, device)
            stopped = engine.any_rank(stop.requested, info, device)
            if stopped or out_of_time or step % cfg.checkpoint_every == 0 or step == stop_at:
                save(step)
            if stopped or out_of_time:
                break
    bar.close()
    metrics.close()
    if info.is_main and not stopped:
        save_module(G, cfg.model, out / "export", "translator")
        write_json(out / "run.json", {**run_meta, "step": step})
    log.info("translator training stopped at step %d/%d (%s)", step, total, out)
    return out
