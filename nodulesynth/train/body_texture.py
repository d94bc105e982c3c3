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
