"""Body-texture trainer: the conditional texture GAN of ``models.body_texture`` on real body patches.

The conditional texture loop of ``train.lung_texture.ConditionalTextureTrainer`` (non-saturating loss,
lazy R1, EMA export, exact resume; windows of 512² TRAIN slices with the condition maps of the field
around them; a conditional critic) with body windows: at least ``min_body`` body (class 1), pixels
outside the body reading ``hu_low``, conditions from ``body_conditions``. What it learns is the body
given where it lies, not the lungs or the air around it.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..errors import NoduleSynthError
from ..masks.classes import MaskClass
from ..models.body_texture import NAME, BodyTextureConfig, body_conditions
from .engine import opt
from .lung_texture import ConditionalTextureTrainer, TextureTrainConfig


@dataclasses.dataclass
class BodyTextureTrainConfig(TextureTrainConfig):
    """Body texture GAN run."""

    model: BodyTextureConfig = opt(factory=BodyTextureConfig)
    min_body: float = opt(0.4, "least share of body pixels (class 1) in a patch")


class BodyTextureTrainer(ConditionalTextureTrainer):
    """The conditional texture loop with body windows (class 1) and their ``body_conditions``."""

    name = "body-texture"
    export_name = NAME

    def check_share(self) -> None:
        if not 0 < self.cfg.min_body <= 1:
            raise NoduleSynthError(f"--min-body {self.cfg.min_body}: must be in (0, 1]")

    def region(self, mask: np.ndarray) -> np.ndarray:
        return mask == MaskClass.BODY

    def conditions(self, mask: np.ndarray) -> np.ndarray:
        return body_conditions(torch.from_numpy(np.array(mask))[None])[0].numpy()

    @property
    def share(self) -> float:
        return self.cfg.min_body

    def no_patches(self) -> str:
        return (f"no {self.cfg.patch_size}² window of a 512² slice is ≥ {self.cfg.min_body:.0%} body; "
                "body patches are what this model learns")


def train_body_texture(cfg: BodyTextureTrainConfig):
    """Train the body texture GAN; returns the run folder (weights in ``out/export``)."""
    return BodyTextureTrainer(cfg).fit()
