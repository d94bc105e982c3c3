"""Trainers for both TSGAN stages (imported lazily: torch models load only when used).

    from nodulesynth.train import MaskTrainConfig, train_masks, TranslatorTrainConfig, train_translator
    from nodulesynth.train import LungTextureTrainConfig, train_lung_texture
    from nodulesynth.train import BodyTextureTrainConfig, train_body_texture  (an experiment, not shipped)
    from nodulesynth.train import NoduleTextureTrainConfig, train_nodule_texture

All run the one loop of ``engine.Trainer`` (resume, signals, time budget, checkpoints, metrics);
``MaskTrainer`` / ``TranslatorTrainer`` / ``LungTextureTrainer`` / ``BodyTextureTrainer`` / ``NoduleTextureTrainer`` supply its hooks.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "MaskTrainConfig": "nodulesynth.train.masks",
    "train_masks": "nodulesynth.train.masks",
    "TranslatorTrainConfig": "nodulesynth.train.translator",
    "train_translator": "nodulesynth.train.translator",
    "export_tsgan": "nodulesynth.train.engine",
    "Trainer": "nodulesynth.train.engine",
    "MaskTrainer": "nodulesynth.train.masks",
    "TranslatorTrainer": "nodulesynth.train.translator",
    "PRESETS": "nodulesynth.train.translator",
    "LungTextureTrainConfig": "nodulesynth.train.lung_texture",
    "LungTextureTrainer": "nodulesynth.train.lung_texture",
    "train_lung_texture": "nodulesynth.train.lung_texture",
    "BodyTextureTrainConfig": "nodulesynth.train.body_texture",
    "BodyTextureTrainer": "nodulesynth.train.body_texture",
    "train_body_texture": "nodulesynth.train.body_texture",
    "NoduleTextureTrainConfig": "nodulesynth.train.nodule_texture",
    "NoduleTextureTrainer": "nodulesynth.train.nodule_texture",
    "train_nodule_texture": "nodulesynth.train.nodule_texture",
    "preset_config": "nodulesynth.train.translator",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nodulesynth.train' has no attribute {name!r}")
