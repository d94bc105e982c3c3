"""nodulesynth: synthetic lung-nodule CT slices from TSGAN (StyleGAN masks → DL-Pix2Pix CT).

Public API (imported lazily so `import nodulesynth` stays light):
    SyntheticNoduleDataset, TSGAN, load_ct, semantic_mask, mask_to_boxes, MaskClass
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "SyntheticNoduleDataset": "nodulesynth.synth.dataset",
    "TSGAN": "nodulesynth.models.tsgan",
    "load_ct": "nodulesynth.data.ct",
    "CTVolume": "nodulesynth.data.ct",
    "semantic_mask": "nodulesynth.masks.semantic",
    "mask_to_boxes": "nodulesynth.masks.boxes",
    "MaskClass": "nodulesynth.masks.classes",
    "SliceDataset": "nodulesynth.data.slices",
    "NoduleSynthError": "nodulesynth.errors",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nodulesynth' has no attribute {name!r}")
