"""TSGAN networks: mask StyleGAN (stage 1), DL-Pix2Pix with LIA + DWMH (stage 2), the lung (and body)
texture GAN, losses, weights I/O."""
from __future__ import annotations

from .attention import DWMH, LIA, SoftPool2d, soft_pool2d
from .io import load_module, save_module
from .body_texture import BodyTextureConfig
from .lung_texture import LungTextureConfig, LungTextureGenerator
from .losses import (PerceptualLoss, feature_matching_loss, gan_loss, gradient_penalty, l1_loss, wgan_d_loss,
                     wgan_g_loss, wgan_gp_d_loss)
from .pix2pix import DLPix2PixGenerator, PatchDiscriminator, TranslatorConfig, one_hot
from .stylegan import MaskDiscriminator, MaskGANConfig, MaskGenerator
from .tsgan import TSGAN

__all__ = [
    "DWMH", "LIA", "SoftPool2d", "soft_pool2d", "load_module", "save_module", "PerceptualLoss",
    "feature_matching_loss", "gan_loss", "gradient_penalty", "l1_loss", "wgan_d_loss", "wgan_g_loss",
    "wgan_gp_d_loss", "DLPix2PixGenerator", "PatchDiscriminator", "TranslatorConfig", "one_hot",
    "MaskDiscriminator", "MaskGANConfig", "MaskGenerator", "TSGAN", "LungTextureConfig", "LungTextureGenerator",
    "BodyTextureConfig",
]
