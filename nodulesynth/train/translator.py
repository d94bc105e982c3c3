"""Stage 2 trainer: DL-Pix2Pix on (mask one-hot, CT) pairs, loss eq. (8), paper §4.2.

G loss = GAN + λ_L1·L1 + λ_P·perceptual (λ_L1 = 200, λ_P = 10); D = PatchGAN on (mask, image).
Perceptual = VGG-19 features when weights are available (torch hub cache or ``vgg_weights``),
otherwise pix2pixHD discriminator feature matching; which one is used is logged and recorded in
``run.json`` (it changes what the λ_P term means). Adam 2e-4, β1 0.5; the LR is constant for the
first half of the epochs and decays linearly to 0 over the second half (per step, LambdaLR).

Beyond the paper (all off in the ``paper`` preset, see :data:`PRESETS`): ``lambda_fm`` adds
pix2pixHD feature matching over all discriminator scales (``model.num_d``; with no VGG weights
the λ_P term already is feature matching, so the two add up), ``l1_lowpass`` takes the L1 on
``l1_lowpass``-times average-pooled images (texture is left to the GAN terms), and the generator's
``noise``/``upsample`` options (models.pix2pix). ``lung_lowpass`` frees the lungs from the paired
terms: no mask says where vessels run, so any per-pixel (or per-feature) loss there paints the
lungs empty. Inside them L1 sees only the lungs' density per ``lung_lowpass`` block, feature
matching skips them, and ``lambda_lung_stats`` asks instead for the real amount of bright, thin
structure (the 1-D Wasserstein distance of the lung values and their high-pass).

Data: the UNet is fully convolutional, so it trains on random ``crop_size`` crops of any mix of
prepared datasets (512² slices, 128² nodule crops at native spacing), each with its share of the
draws (``data_weights``), optionally rescaled to one pixel spacing (``spacing_mm``) first. A slice
smaller than the crop (after rescaling) is left out, never padded with invented content.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any

import numpy as np
import torch

from ..errors import NoduleSynthError
from ..hu import hu_to_unit, unit_to_hu
from ..masks.classes import MaskClass
from ..models.pix2pix import TranslatorConfig
from ..runtime import autocast
from ..viz import preview_grid
from . import engine
from .engine import opt
from .sources import SliceSources

log = logging.getLogger("nodulesynth.train")


@dataclasses.dataclass
class TranslatorTrainConfig(engine.RunConfig):
    """DL-Pix2Pix training run. Defaults are the paper's (§4.2) except the 256 crop."""

    model: TranslatorConfig = opt(factory=TranslatorConfig)
    epochs: int = opt(200, "epochs (LR decays linearly over the second half; paper: 200)")
    batch_size: int = opt(1, "batch size per process (paper: 1)")
    lr: float = opt(2e-4, "Adam learning rate (paper: 2e-4)")
    beta1: float = opt(0.5, "Adam beta1 (paper: 0.5)")
    lambda_l1: float = opt(200.0, "L1 weight λ_L1 (paper: 200)")
    l1_lowpass: int = opt(1, "L1 on images average-pooled by this factor (1 = plain L1, the paper)")
    lambda_perc: float = opt(10.0, "perceptual weight λ_P (paper: 10; VGG-19, else feature matching)")
    lambda_fm: float = opt(0.0, "extra pix2pixHD feature-matching weight over all D scales (0 = the paper)")
    lung_lowpass: int = opt(0, "inside the lungs, no pixel L1 or feature matching: only L1 on the lungs' density pooled by "
                               "this factor (0 = lungs like the rest)")
    lambda_lung_stats: float = opt(0.0, "weight of the lung-statistics loss: 1-D Wasserstein between generated and real "
                                        "lung values and their high-pass, same lungs (0 = off)")
    gan_mode: str = opt("lsgan", "GAN loss (see models.losses.gan_loss)", choices=("lsgan", "bce"))
    crop_size: int | None = opt(256, "random training crop (0 = whole slices)", none_if=0)
    spacing_mm: float | None = opt(None, "rescale every slice to this pixel spacing (mm) before cropping",
                                   flag="--spacing")
    augment: bool = opt(True, "paired augmentation (train.augment)")
    vgg_weights: str | None = opt(None, "torchvision VGG-19 weights file for the perceptual loss")
    num_samples: int = opt(4, "slices in each preview grid")
    num_workers: int = opt(2, "DataLoader workers", flag="--workers")
    init_weights: str | None = opt(None, "fine-tune: start the generator from the translator of this weights "
                                         "folder (a TSGAN folder or a run's export/); its architecture is used, "
                                         "plus decoder noise if --noise is given")


_PAPER: dict[str, Any] = {
    "model": {"ngf": 64, "ndf": 64, "num_downs": 8, "lia": True, "dwmh": True, "dropout": 0.5, "n_layers_d": 3,
              "noise": False, "upsample": "transpose", "num_d": 1},
    "epochs": 200, "batch_size": 1, "lr": 2e-4, "beta1": 0.5, "lambda_l1": 200.0, "l1_lowpass": 1,
    "lambda_perc": 10.0, "lambda_fm": 0.0, "lung_lowpass": 0, "lambda_lung_stats": 0.0, "crop_size": None,
}

# Named configurations (``--preset``). "paper": §4.2 and Fig. 3 exactly (whole slices, batch 1);
# "pix2pix", "pix2pix-lia", "pix2pix-dwmh": its Table 4 ablations; "texture": the texture options
# of this project at once (a candidate to measure, not a measured default).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": _PAPER,
    "pix2pix": {**_PAPER, "model": {**_PAPER["model"], "lia": False, "dwmh": False}},
    "pix2pix-lia": {**_PAPER, "model": {**_PAPER["model"], "lia": True, "dwmh": False}},
    "pix2pix-dwmh": {**_PAPER, "model": {**_PAPER["model"], "lia": False, "dwmh": True}},
    "texture": {**_PAPER, "model": {**_PAPER["model"], "noise": True, "upsample": "bilinear", "num_d": 2},
                "lambda_l1": 50.0, "l1_lowpass": 4, "lambda_fm": 10.0, "crop_size": 256},
}
# "lung-texture": the texture preset with the lungs freed from every paired loss but a coarse density
# L1, and the lung-statistics loss in their place (vessel positions are not in the mask).
PRESETS["lung-texture"] = {**PRESETS["texture"], "lung_lowpass": 16, "lambda_lung_stats": 50.0}


def _init_architecture(cfg: "TranslatorTrainConfig"):
    """The generator fields of ``cfg.init_weights`` (read before the run folder's config.json is
    written, so it records, and --resume compares, the network that actually trains), plus decoder
    noise if asked for; the discriminator fields stay ``cfg.model``'s."""
    init = engine.init_config(cfg.init_weights, TranslatorConfig, "translator")
    keep = {f.name: getattr(cfg.model, f.name) for f in dataclasses.fields(cfg.model)
            if f.name in ("ndf", "n_layers_d", "num_d")}
    return dataclasses.replace(init, noise=init.noise or cfg.model.noise, **keep)


def _init_generator(cfg: "TranslatorTrainConfig"):
    """The generator of ``cfg.init_weights`` (architecture ``cfg.model``, see _init_architecture), in
    training mode."""
    from ..models.pix2pix import DLPix2PixGenerator

    G = engine.load_init_module(cfg.init_weights, DLPix2PixGenerator, TranslatorConfig, "translator")
    if cfg.model.noise and not G.cfg.noise:
        # Decoder noise added to a network trained without it: its scales start at 0, so the
        # fine-tune starts from exactly the init network's output and learns how much texture to add.
        with_noise = DLPix2PixGenerator(dataclasses.replace(G.cfg, noise=True))
        missing, unexpected = with_noise.load_state_dict(G.state_dict(), strict=False)
        if unexpected or any(not k.startswith("noises.") for k in missing):
            raise NoduleSynthError(f"--init-weights {cfg.init_weights}: cannot add decoder noise "
                                   f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        G = with_noise.float().train()
    return G


def preset_config(name: str | None, model: dict | None = None, **fields) -> TranslatorTrainConfig:
    """A config from a preset, with ``fields`` (and ``model`` fields) given explicitly on top."""
    if name is not None and name not in PRESETS:
        raise NoduleSynthError(f"--preset {name}: unknown; use one of {', '.join(PRESETS)}")
    base = copy.deepcopy(PRESETS[name]) if name else {}
    model_kw = {**base.pop("model", {}), **(model or {})}
    return TranslatorTrainConfig(**{**base, **fields}, model=TranslatorConfig(**model_kw))


def rescale_pair(hu: np.ndarray, mask: np.ndarray, spacing: tuple[float, float], target: float):
    """Resample a (HU, mask) pair from ``spacing`` (dy, dx mm) to ``target`` mm pixels: area
    averaging when shrinking, bilinear when enlarging, nearest for labels."""
    import cv2

    fy, fx = float(spacing[0]) / target, float(spacing[1]) / target
    if abs(fy - 1) < 1e-3 and abs(fx - 1) < 1e-3:
        return hu, mask
    h, w = max(1, round(hu.shape[0] * fy)), max(1, round(hu.shape[1] * fx))
    interp = cv2.INTER_AREA if fy * fx < 1 else cv2.INTER_LINEAR
    return (cv2.resize(np.ascontiguousarray(hu, np.float32), (w, h), interpolation=interp),
            cv2.resize(np.ascontiguousarray(mask, np.uint8), (w, h), interpolation=cv2.INTER_NEAREST))


def rescaled_shape(record, shape: tuple[int, int], target: float | None) -> tuple[int, int]:
    if target is None:
        return tuple(shape)
    return tuple(max(1, round(n * float(s) / target)) for n, s in zip(shape, record.spacing_mm))


class PairDataset(torch.utils.data.Dataset):
    """Items are ``(global index, seed)`` pairs from engine.IndexStream → (mask labels, unit image);
    the seed drives the random crop and augmentation, so data is a pure function of the pair."""

    def __init__(self, sources: SliceSources, crop: int | None, augment, spacing_mm: float | None = None) -> None:
        self.sources, self.crop, self.augment, self.spacing_mm = sources, crop, augment, spacing_mm

    def __len__(self) -> int:
        return len(self.sources)

    def load(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        """HU (float32) and mask of global slice ``g``, at the common spacing if one is set."""
        ds, i = self.sources.locate(g)
        hu, mask = np.asarray(ds.images[i], dtype=np.float32), np.asarray(ds.masks[i])
        if self.spacing_mm is not None:
            hu, mask = rescale_pair(hu, mask, ds.records[i].spacing_mm, self.spacing_mm)
        return hu, mask

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        g, seed = item
        hu, mask = self.load(g)
        if self.augment is not None:
            hu, mask = self.augment(hu, mask, seed)
        if self.crop is not None and (self.crop < hu.shape[0] or self.crop < hu.shape[1]):
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


class TranslatorTrainer(engine.Trainer):
    """Stage 2 hooks: pix2pix-style alternating D/G steps with eq. (8) (+ the texture options)."""

    name = "translator"
    metric_fields = ("epoch", "lr", "d_loss", "g_gan", "l1", "perc", "fm", "lung_stats", "g_total")

    def setup(self) -> None:
        from .augment import PairAugment
        from ..models.pix2pix import min_input_size

        cfg = self.cfg
        if cfg.epochs < 1 or cfg.batch_size < 1:
            raise NoduleSynthError("--epochs and --batch-size must be positive")
        if cfg.init_weights:
            cfg.model = _init_architecture(cfg)
        if cfg.l1_lowpass < 1:
            raise NoduleSynthError(f"--l1-lowpass {cfg.l1_lowpass}: must be ≥ 1")
        if cfg.lung_lowpass < 0 or cfg.lambda_lung_stats < 0:
            raise NoduleSynthError("--lung-lowpass and --lambda-lung-stats must be ≥ 0")
        if cfg.spacing_mm is not None and not (cfg.spacing_mm > 0 and np.isfinite(cfg.spacing_mm)):
            raise NoduleSynthError(f"--spacing {cfg.spacing_mm}: must be a positive number of mm")
        from ..data.slices import SliceDataset  # noqa: F401  (errors for missing folders come from here)

        crop = cfg.crop_size or None
        multiple = 2 ** cfg.model.num_downs
        if crop is not None:
            if crop % multiple:
                raise NoduleSynthError(f"--crop-size {crop}: must be a multiple of 2**num_downs = {multiple}")
            keep = lambda ds, r: min(rescaled_shape(r, ds.images.shape[1:], cfg.spacing_mm)) >= crop  # noqa: E731
        else:
            keep = None
        split = None if cfg.split == "all" else cfg.split
        why = (f"slices must be at least --crop-size {crop} px" + (f" at --spacing {cfg.spacing_mm} mm" if cfg.spacing_mm
                                                                   else "")) if crop else ""
        self.sources = SliceSources(cfg.data, split, cfg.data_weights, keep, why)
        sizes = {tuple(ds.images.shape[1:]) for ds in self.sources.datasets}
        if crop is None:
            if len(sizes) > 1 or cfg.spacing_mm is not None:
                raise NoduleSynthError("--crop-size 0 (whole slices) needs one slice size and no --spacing; "
                                       f"the --data folders hold {sorted(sizes)}: give a --crop-size")
            (h, w), = sizes
            for what, s in ((f"--data {self.sources.paths[0]}: slice size", h), ("slice width", w)):
                if s % multiple:
                    raise NoduleSynthError(f"{what} {s}: must be a multiple of 2**num_downs = {multiple}")
        self.crop = crop
        self.image_size = max(max(sz) for sz in sizes)
        need = min_input_size(cfg.model)
        if (crop or self.image_size) < need:
            raise NoduleSynthError(f"--crop-size {crop or self.image_size}: too small for the {cfg.model.num_d}-scale, "
                                   f"{cfg.model.n_layers_d}-layer PatchGAN (at least {need})")
        self.pairs = PairDataset(self.sources, crop, PairAugment() if cfg.augment else None, cfg.spacing_mm)
        self.stream = engine.IndexStream(self.sources.indices, cfg.seed, self.info, self.sources.groups,
                                         self.sources.weights)
        self.steps_per_epoch = self.stream.per_epoch // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise NoduleSynthError(f"--batch-size {cfg.batch_size}: larger than the {self.stream.per_epoch} slices "
                                   "per process")
        first = self.sources.indices[self.sources.groups == self.sources.groups[0]]
        nod = [int(g) for g in first if self.sources.record(int(g)).has_nodule]
        self.sample_idx = (nod or [int(g) for g in first])[: cfg.num_samples]

    def total_steps(self) -> int:
        return self.cfg.epochs * self.steps_per_epoch

    def build(self) -> None:
        from ..models.losses import PerceptualLoss
        from ..models.pix2pix import DLPix2PixGenerator, build_discriminator

        cfg, device = self.cfg, self.device
        self.fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        if cfg.init_weights:
            self.G = _init_generator(cfg).to(device, memory_format=self.fmt)
        else:
            self.G = DLPix2PixGenerator(cfg.model).to(device, memory_format=self.fmt)
        self.D = build_discriminator(cfg.model).to(device, memory_format=self.fmt)
        self.G_t, self.D_t = self.G, self.D
        perc = PerceptualLoss.try_create(cfg.vgg_weights)
        self.perc = perc.to(device) if perc is not None else None
        self.perc_kind = "vgg19" if perc is not None else "feature_matching"
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
        total = self.total_steps()
        self.sch_g = torch.optim.lr_scheduler.LambdaLR(self.opt_g, lambda s: lr_factor(s, total))
        self.sch_d = torch.optim.lr_scheduler.LambdaLR(self.opt_d, lambda s: lr_factor(s, total))

    def wrap(self) -> None:
        self.G_t, self.D_t = engine.wrap_ddp(self.G, self.info, self.device), engine.wrap_ddp(self.D, self.info, self.device)

    def batches(self, step: int, stop_at: int):
        # The loader's sampler runs ahead of training (prefetch), so it walks a copy of the stream; the
        # trainer's own stream advances one batch per finished step and is what checkpoints record.
        # An explicit generator keeps the loader from drawing on the global torch RNG.
        cfg = self.cfg
        return torch.utils.data.DataLoader(
            self.pairs, batch_sampler=_BatchSampler(copy.deepcopy(self.stream), cfg.batch_size, stop_at - step),
            num_workers=cfg.num_workers, pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(cfg.seed))

    def train_step(self, batch) -> dict[str, torch.Tensor]:
        from ..models.losses import (lowpass_l1_loss, multiscale_feature_matching_loss, multiscale_gan_loss,
                                     region_l1_loss, region_stats_loss)
        from ..models.pix2pix import discriminate, one_hot

        cfg, device, fmt = self.cfg, self.device, self.fmt
        labels, real = batch
        self.G.train(); self.D.train()
        labels = labels.to(device, non_blocking=True)
        onehot = one_hot(labels, cfg.model.in_classes).to(memory_format=fmt)
        real = real.to(device, non_blocking=True).to(memory_format=fmt)
        with autocast(device, cfg.amp):
            fake = self.G_t(onehot)
        # --- D: real pairs → 1, fake pairs → 0 (mean over scales)
        self.opt_d.zero_grad(set_to_none=True)
        with autocast(device, cfg.amp):
            loss_d = 0.5 * (multiscale_gan_loss(discriminate(self.D_t, onehot, fake.detach()), False, cfg.gan_mode)
                            + multiscale_gan_loss(discriminate(self.D_t, onehot, real), True, cfg.gan_mode))
        loss_d.backward()
        self.opt_d.step()
        # --- G: eq. (8) (+ feature matching, + the lung terms)
        self.opt_g.zero_grad(set_to_none=True)
        lungs = (((labels == MaskClass.LEFT_LUNG) | (labels == MaskClass.RIGHT_LUNG))[:, None]
                 if cfg.lung_lowpass or cfg.lambda_lung_stats else None)
        keep = ~lungs if cfg.lung_lowpass else None
        with autocast(device, cfg.amp):
            fake_out = discriminate(self.D_t, onehot, fake, return_features=True)
            g_gan = multiscale_gan_loss(fake_out, True, cfg.gan_mode)
            if cfg.lung_lowpass:  # the rest at l1_lowpass, the lungs' density alone at lung_lowpass
                l1 = (region_l1_loss(fake, real, keep, cfg.l1_lowpass)
                      + region_l1_loss(fake, real, lungs, cfg.lung_lowpass))
            else:
                l1 = lowpass_l1_loss(fake, real, cfg.l1_lowpass)
            fm = torch.zeros((), device=device)
            if self.perc is None or cfg.lambda_fm > 0:
                with torch.no_grad():
                    real_out = discriminate(self.D_t, onehot, real, return_features=True)
                fm = multiscale_feature_matching_loss(real_out, fake_out, keep)
            p = self.perc(fake, real) if self.perc is not None else fm
            lung_stats = region_stats_loss(fake, real, lungs) if cfg.lambda_lung_stats else torch.zeros((), device=device)
            g_total = (g_gan + cfg.lambda_l1 * l1 + cfg.lambda_perc * p + cfg.lambda_fm * fm
                       + cfg.lambda_lung_stats * lung_stats)
        g_total.backward()
        self.opt_g.step()
        self.sch_g.step(); self.sch_d.step()
        self.stream.take(cfg.batch_size)
        return {"d_loss": loss_d.detach(), "g_gan": g_gan.detach(), "l1": l1.detach(), "perc": p.detach(),
                "fm": fm.detach(), "lung_stats": lung_stats.detach(), "g_total": g_total.detach()}

    def log_values(self, losses) -> dict[str, Any]:
        return {"epoch": self.step / self.steps_per_epoch, "lr": self.sch_g.get_last_lr()[0], **super().log_values(losses)}

    def state_dict(self) -> dict[str, Any]:
        return {"G": self.G.state_dict(), "D": self.D.state_dict(), "opt_g": self.opt_g.state_dict(),
                "opt_d": self.opt_d.state_dict(), "sch_g": self.sch_g.state_dict(), "sch_d": self.sch_d.state_dict(),
                "data": self.stream.state_dict()}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.G.load_state_dict(st["G"]); self.D.load_state_dict(st["D"])
        self.opt_g.load_state_dict(st["opt_g"]); self.opt_d.load_state_dict(st["opt_d"])
        self.sch_g.load_state_dict(st["sch_g"]); self.sch_d.load_state_dict(st["sch_d"])
        self.stream.load_state_dict(st["data"])

    def preview_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """The preview slices (common spacing, centre-cropped to a size the UNet takes)."""
        m = 2 ** self.cfg.model.num_downs
        pairs = [self.pairs.load(g) for g in self.sample_idx]
        side = min(min(h.shape) for h, _ in pairs) // m * m
        crops = []
        for hu, mask in pairs:
            y, x = (hu.shape[0] - side) // 2, (hu.shape[1] - side) // 2
            crops.append((hu[y:y + side, x:x + side], mask[y:y + side, x:x + side]))
        return np.stack([c[0] for c in crops]), np.stack([c[1] for c in crops])

    @torch.no_grad()
    def preview(self) -> None:
        """Each row: (mask | real) (mask | generated); G in eval mode, noise seeded per row."""
        from ..models.pix2pix import one_hot

        hu, masks = self.preview_pairs()
        was_training = self.G.training
        self.G.eval()
        with autocast(self.device, self.cfg.amp):
            x = one_hot(torch.from_numpy(masks).long().to(self.device), self.cfg.model.in_classes)
            fake = self.G(x.to(memory_format=self.fmt), noise_seeds=list(range(len(masks)))).float()
        self.G.train(was_training)
        fake_hu = unit_to_hu(fake[:, 0].cpu().numpy())
        imgs, labels = [], []
        for k in range(len(masks)):
            imgs += [hu[k], fake_hu[k]]
            labels += [masks[k], masks[k]]
        preview_grid(self.out / "samples" / f"step-{self.step:08d}.png", images_hu=imgs, masks=labels, columns=2,
                     tile=256)

    def run_meta(self) -> dict[str, Any]:
        spacing = self.cfg.spacing_mm or float(self.sources.record(int(self.sources.indices[0])).spacing_mm[0])
        return {**super().run_meta(), "perceptual": self.perc_kind, "vgg_weights": self.cfg.vgg_weights,
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps(), "crop_size": self.crop,
                "image_size": self.image_size, "spacing_mm": spacing, "data": self.sources.summary()}

    def export(self) -> None:
        from ..models.io import save_module

        save_module(self.G, self.cfg.model, self.out / "export", "translator")


def train_translator(cfg: TranslatorTrainConfig):
    """Train DL-Pix2Pix; returns the run folder (export in ``out/export`` unless stopped by SIGINT)."""
    return TranslatorTrainer(cfg).fit()
