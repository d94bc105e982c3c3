"""Training losses of both TSGAN stages.

Stage 1 (eqs. 1–2): WGAN-GP with λ_gp = 10 and drift 0.001·E[D(real)²] (ProGAN's drift term).
Stage 2 (eq. 8): GAN + λ_L1·L1 + λ_P·perceptual. The GAN term is LSGAN by default: the paper
does not say which; least squares gives non-saturating, well-scaled gradients for a PatchGAN
and is what pix2pixHD pairs with feature matching (our perceptual fallback). BCE-with-logits
(original pix2pix) is available as ``mode="bce"``.

Perceptual loss: VGG-19 (torchvision architecture, ``weights=None``) with ImageNet weights read
only from the torch hub cache or a file the user gives — never downloaded. When neither exists,
``PerceptualLoss.try_create`` returns None and the trainer uses ``feature_matching_loss``.
The FID Inception network is never used as a loss (that would optimise the evaluation metric).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NoduleSynthError

log = logging.getLogger(__name__)

VGG19_HUB_FILE = "vgg19-dcbb9e9d.pth"  # torchvision's IMAGENET1K_V1 file name in $TORCH_HOME/hub/checkpoints
# relu1_1, relu2_1, relu3_1, relu4_1, relu5_1 in torchvision's vgg19().features (pix2pixHD's layers)
VGG19_LAYERS = (1, 6, 11, 20, 29)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------- stage 1: WGAN-GP

def gradient_penalty(D: Callable[..., torch.Tensor], real: torch.Tensor, fake: torch.Tensor,
                     lambda_gp: float = 10.0, **d_kwargs) -> torch.Tensor:
    """λ·E[(‖∇D(x̂)‖₂ − 1)²] at x̂ = ε·real + (1−ε)·fake, ε ~ U(0,1) per sample.

    ``d_kwargs`` go to D (e.g. level=, alpha=). Gradients are taken in fp32; call it outside
    autocast for an exact penalty (double backward through bf16 is too coarse).
    """
    eps = torch.rand(real.shape[0], *([1] * (real.ndim - 1)), device=real.device, dtype=torch.float32)
    x_hat = (eps * real.detach().float() + (1 - eps) * fake.detach().float()).requires_grad_(True)
    out = D(x_hat, **d_kwargs)
    (grad,) = torch.autograd.grad(out.float().sum(), x_hat, create_graph=True)
    return lambda_gp * (grad.flatten(1).norm(2, dim=1) - 1).square().mean()


def wgan_d_loss(d_real: torch.Tensor, d_fake: torch.Tensor, drift: float = 0.001) -> torch.Tensor:
    """Eq. (1) without the penalty: E[D(fake)] − E[D(real)] + drift·E[D(real)²]."""
    d_real, d_fake = d_real.float(), d_fake.float()
    return d_fake.mean() - d_real.mean() + drift * d_real.square().mean()


def wgan_gp_d_loss(D: Callable[..., torch.Tensor], real: torch.Tensor, fake: torch.Tensor,
                   lambda_gp: float = 10.0, drift: float = 0.001, **d_kwargs) -> tuple[torch.Tensor, dict]:
    """Full eq. (1). Returns (loss, parts) with detached parts for logging: d_real, d_fake, gp, drift."""
    d_real = D(real, **d_kwargs)
    d_fake = D(fake.detach(), **d_kwargs)
    gp = gradient_penalty(D, real, fake, lambda_gp, **d_kwargs)
    loss = wgan_d_loss(d_real, d_fake, drift) + gp
    parts = {"d_real": d_real.detach().float().mean(), "d_fake": d_fake.detach().float().mean(), "gp": gp.detach(),
             "drift": drift * d_real.detach().float().square().mean()}
    return loss, parts


def wgan_g_loss(d_fake: torch.Tensor) -> torch.Tensor:
    """Eq. (2): −E[D(G(z))]."""
    return -d_fake.float().mean()


# ---------------------------------------------------------------- stage 2: pix2pix

def gan_loss(logits: torch.Tensor, target_is_real: bool, mode: str = "lsgan") -> torch.Tensor:
    """PatchGAN loss on a logits map: LSGAN (MSE to 1/0, default) or BCE-with-logits."""
    logits = logits.float()
    target = torch.full_like(logits, 1.0 if target_is_real else 0.0)
    if mode == "lsgan":
        return F.mse_loss(logits, target)
    if mode == "bce":
        return F.binary_cross_entropy_with_logits(logits, target)
    raise NoduleSynthError(f"gan_loss mode={mode!r}: use 'lsgan' or 'bce'")


def l1_loss(fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Eq. (9): mean |y − G(x)|."""
    return F.l1_loss(fake.float(), real.float())


def lowpass_l1_loss(fake: torch.Tensor, real: torch.Tensor, factor: int = 1) -> torch.Tensor:
    """L1 between ``factor``×``factor`` average-pooled images (``factor`` 1 = eq. 9).

    Not in the paper. A mask does not say where vessels run, so pixel L1 pulls the output to the
    conditional mean (a blur); on a low-passed pair L1 still pins region HU levels and
    anatomy while leaving texture finer than ``factor`` px to the adversarial terms."""
    if factor < 1:
        raise NoduleSynthError(f"lowpass_l1_loss: factor must be >= 1, got {factor}")
    fake, real = fake.float(), real.float()
    if factor > 1:
        fake, real = F.avg_pool2d(fake, factor, ceil_mode=True), F.avg_pool2d(real, factor, ceil_mode=True)
    return F.l1_loss(fake, real)


def region_l1_loss(fake: torch.Tensor, real: torch.Tensor, region: torch.Tensor, factor: int) -> torch.Tensor:
    """L1 between ``factor``-pooled images of the ``region`` (B, 1, H, W) alone (zero elsewhere):
    the region's content per block, blind to where inside a block it lies and to every pixel
    outside the region."""
    region = region.float()
    return lowpass_l1_loss(fake.float() * region, real.float() * region, factor)


def _highpass(x: torch.Tensor, size: int = 5) -> torch.Tensor:
    return x - F.avg_pool2d(x, size, 1, size // 2, count_include_pad=False)


def region_stats_loss(fake: torch.Tensor, real: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """1-D Wasserstein-1 distance, per image, between the values of ``fake`` and ``real`` inside
    the same ``region`` (B, 1, H, W bool), for the intensities and for their 5×5 high-pass.

    Not in the paper. It asks for the right amount of bright, thin structure (vessels in the
    lungs) without asking where it lies, which no mask says. Both images share the region, so
    their sorted values pair up one to one; the pixels outside it sort past the end as equal
    sentinels and add nothing."""
    if region.shape[0] != fake.shape[0] or region.shape[-2:] != fake.shape[-2:]:
        raise ValueError(f"region_stats_loss: region {tuple(region.shape)} does not match images {tuple(fake.shape)}")
    region = region.bool()
    n = region.flatten(1).sum(1).clamp_min(1).float()
    total = fake.new_zeros((), dtype=torch.float32)
    for f, r in ((fake.float(), real.float()), (_highpass(fake.float()), _highpass(real.float()))):
        sf = torch.where(region, f, 1e4).flatten(1).sort(dim=1).values
        sr = torch.where(region, r, 1e4).flatten(1).sort(dim=1).values
        total = total + ((sf - sr).abs().sum(1) / n).mean()
    return total


def multiscale_gan_loss(outputs: Sequence, target_is_real: bool, mode: str = "lsgan") -> torch.Tensor:
    """Mean of :func:`gan_loss` over discriminator scales; ``outputs`` are logits or (logits, feats)."""
    logits = [o[0] if isinstance(o, tuple) else o for o in outputs]
    return sum(gan_loss(x, target_is_real, mode) for x in logits) / len(logits)


def multiscale_feature_matching_loss(real_outputs: Sequence, fake_outputs: Sequence,
                                     keep: torch.Tensor | None = None) -> torch.Tensor:
    """pix2pixHD feature matching over scales: mean over scales of :func:`feature_matching_loss`
    (pix2pixHD weights each scale by 1/num_D); outputs are (logits, feats) per scale."""
    if len(real_outputs) != len(fake_outputs) or not real_outputs:
        raise ValueError("multiscale_feature_matching_loss: need equally many, non-empty scale outputs")
    return sum(feature_matching_loss(r[1], f[1], keep) for r, f in zip(real_outputs, fake_outputs)) / len(real_outputs)


def feature_matching_loss(real_feats: Sequence[torch.Tensor], fake_feats: Sequence[torch.Tensor],
                          keep: torch.Tensor | None = None) -> torch.Tensor:
    """pix2pixHD: Σ_l mean|D_l(fake) − D_l(real)| over the PatchGAN's intermediate activations
    (real detached). With n_layers=3 this equals pix2pixHD's weighting (4/(n_layers+1) = 1).
    ``keep`` (B, 1, H, W) in [0, 1], area-pooled to each feature map, weights its positions."""
    if len(real_feats) != len(fake_feats) or not real_feats:
        raise ValueError("feature_matching_loss: need two equally long, non-empty feature lists")
    total = 0
    for r, f in zip(real_feats, fake_feats):
        d = (f.float() - r.detach().float()).abs()
        if keep is not None:
            d = d * F.adaptive_avg_pool2d(keep.float(), d.shape[-2:])
        total = total + d.mean()
    return total


def _load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise NoduleSynthError(f"--vgg-weights {path}: file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except NoduleSynthError:
        raise
    except Exception as e:  # corrupt file: safetensors / torch raise several types
        raise NoduleSynthError(f"--vgg-weights {path}: cannot read weights ({type(e).__name__}: {e})") from e
    if not isinstance(sd, dict):
        raise NoduleSynthError(f"--vgg-weights {path}: expected a state dict, found {type(sd).__name__}")
    return sd


class PerceptualLoss(nn.Module):
    """Eq. (10): Σ_l mean|φ_l(y) − φ_l(G(x))| on frozen VGG-19 features (relu1_1 … relu5_1).

    The 1-channel CT in [-1, 1] is mapped to [0, 1], repeated to RGB and ImageNet-normalised.
    """

    def __init__(self, state_dict: dict[str, torch.Tensor], layers: Sequence[int] = VGG19_LAYERS,
                 source: str = "<state dict>"):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        # torchvision's vgg19(weights=None).features, built alone: the unused 120 M-parameter classifier is skipped
        features = make_layers(cfgs["E"], batch_norm=False)[: max(layers) + 1]
        wanted = {k.removeprefix("features."): v for k, v in state_dict.items() if k.startswith("features.")}
        own = features.state_dict()
        missing = [k for k in own if k not in wanted or wanted[k].shape != own[k].shape]
        if missing:
            raise NoduleSynthError(f"{source}: not torchvision VGG-19 weights (missing or mis-shaped: "
                                   f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''})")
        features.load_state_dict({k: wanted[k].float() for k in own})
        self.features = features.eval().requires_grad_(False)
        self.layers = tuple(layers)
        self.source = source
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "PerceptualLoss":
        super().train(mode)
        self.features.eval()  # frozen feature extractor: always inference behaviour
        return self

    @classmethod
    def from_file(cls, path: str | Path) -> "PerceptualLoss":
        path = Path(path).expanduser()
        return cls(_load_state_dict_file(path), source=str(path))

    @staticmethod
    def hub_cache_file() -> Path:
        """Where torchvision would have cached the ImageNet VGG-19 ($TORCH_HOME/hub/checkpoints)."""
        return Path(torch.hub.get_dir()) / "checkpoints" / VGG19_HUB_FILE

    @classmethod
    def try_create(cls, path: str | Path | None = None) -> "PerceptualLoss | None":
        """A user file (errors raise), else the hub cache file, else None (→ feature matching). Logs which."""
        if path is not None:
            loss = cls.from_file(path)
            log.info("perceptual loss: VGG-19 with weights from %s", loss.source)
            return loss
        cached = cls.hub_cache_file()
        if cached.is_file():
            loss = cls.from_file(cached)
            log.info("perceptual loss: VGG-19 with ImageNet weights from the torch hub cache %s", cached)
            return loss
        log.warning("perceptual loss: no VGG-19 weights (none given, none at %s); using the pix2pixHD "
                    "discriminator feature-matching loss instead", cached)
        return None

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = ((x.float() + 1) * 0.5).expand(-1, 3, -1, -1) if x.shape[1] == 1 else (x.float() + 1) * 0.5
        x = (x - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.layers:
                out.append(x)
        return out

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            real_f = self._features(real)
        return sum(F.l1_loss(f.float(), r.float()) for f, r in zip(self._features(fake), real_f))
