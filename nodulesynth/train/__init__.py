"""Trainers for both TSGAN stages (imported lazily: torch models load only when used).

    from nodulesynth.train import MaskTrainConfig, train_masks, TranslatorTrainConfig, train_translator
"""
from __future__ import annotations

import importlib

_LAZY = {
    "MaskTrainConfig": "nodulesynth.train.masks",
    "train_masks": "nodulesynth.train.masks",
    "TranslatorTrainConfig": "nodulesynth.train.translator",
    "train_translator": "nodulesynth.train.translator",
    "export_tsgan": "nodulesynth.train.engine",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nodulesynth.train' has no attribute {name!r}")
