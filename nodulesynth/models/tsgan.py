"""TSGAN: the two trained generators (mask StyleGAN + DL-Pix2Pix) as one loadable object.

Folder layout (local, shipped ``pretrained/`` or a Hugging Face hub repo):
``tsgan.json`` (format, version, image_size, training meta), ``mask_generator.{safetensors,json}``,
``translator.{safetensors,json}``, ``README.md`` (model card).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..errors import NoduleSynthError
from ..io import atomic_dir, write_json
from ..runtime import resolve_device
from .io import load_module, read_config, save_module, sha256_files
from .pix2pix import DLPix2PixGenerator, TranslatorConfig, one_hot
from .stylegan import MaskGANConfig, MaskGenerator

log = logging.getLogger(__name__)

FORMAT = "nodulesynth-tsgan"
FORMAT_VERSION = 1
MASK_NAME, TRANSLATOR_NAME = "mask_generator", "translator"
LAYOUT = ("tsgan.json", f"{MASK_NAME}.safetensors", f"{MASK_NAME}.json", f"{TRANSLATOR_NAME}.safetensors",
          f"{TRANSLATOR_NAME}.json", "README.md")
HUB_PATTERNS = list(LAYOUT)
# The weights shipped with the repository; module-level so tests can point it elsewhere.
DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "pretrained"

MODEL_CARD = """---
library_name: nodulesynth
tags: [medical-imaging, ct, lung-nodule, gan, synthetic-data]
---
# TSGAN weights (nodulesynth)

Two-stage GAN for synthetic lung-nodule CT slices (after "Lung Nodule Image Synthesis Driven by
Two-Stage Generative Adversarial Networks"):

1. **Mask StyleGAN** (`mask_generator.*`): z ~ N(0, I) → 6-class semantic mask (0 background,
   1 body, 2 left lung, 3 right lung, 4 trachea, 5 nodule), {mask_res}×{mask_res}, progressive growing, WGAN-GP.
2. **DL-Pix2Pix** (`translator.*`): mask one-hot → 1-channel CT slice in [-1, 1]
   (maps linearly to HU [-1024, 1024]), UNet with LIA skips and DWMH attention, PatchGAN.

Image size: {image_size}. Revision: `{revision}`. nodulesynth {version}.

Training meta:
```
{meta}
```

## Intended use
Research on data augmentation for lung-nodule detection. Not a medical device; synthetic images
must not be used for diagnosis. Trained on public LUNA16 / LIDC-IDRI data (see their licences).

## Load
```python
from nodulesynth import TSGAN
model = TSGAN.from_pretrained("path/to/this/folder")
```
"""


class TSGAN(nn.Module):
    """Holds ``mask_generator`` (MaskGenerator) and ``translator`` (DLPix2PixGenerator)."""

    def __init__(self, mask_generator: MaskGenerator, translator: DLPix2PixGenerator, meta: dict | None = None,
                 *, revision: str = "untrained", source: str = "memory"):
        super().__init__()
        self.mask_generator = mask_generator
        self.translator = translator
        self.meta: dict[str, Any] = dict(meta or {})
        self.image_size = int(self.meta.get("image_size", 512))
        self.meta["image_size"] = self.image_size
        self.revision = revision
        self.source = source

    @property
    def mask_config(self) -> MaskGANConfig:
        return self.mask_generator.cfg

    @property
    def translator_config(self) -> TranslatorConfig:
        return self.translator.cfg

    @classmethod
    def from_configs(cls, mask_cfg: MaskGANConfig, translator_cfg: TranslatorConfig, image_size: int = 512,
                     meta: dict | None = None) -> "TSGAN":
        """Fresh, untrained networks (for trainers and tests)."""
        return cls(MaskGenerator(mask_cfg), DLPix2PixGenerator(translator_cfg), {**(meta or {}), "image_size": image_size})

    @torch.no_grad()
    def forward(self, z: torch.Tensor, truncation_psi: float = 0.7, noise_mode: str = "const"):
        """z → (uint8 masks (B, S, S), images (B, 1, S, S) in [-1, 1]), S = image_size."""
        masks = self.mask_generator.sample(z, truncation_psi, noise_mode, size=self.image_size)
        images = self.translator(one_hot(masks, self.translator_config.in_classes).to(z.dtype))
        return masks, images

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, weights: str | Path | None = "pretrained", revision: str | None = None,
                        device: str | torch.device = "cpu") -> "TSGAN":
        """"pretrained"/None → the shipped folder; an existing folder → it; else a hub repo id,
        falling back to the shipped folder (with a warning) when the hub cannot be reached."""
        dev = resolve_device(device)
        if weights is None or str(weights) == "pretrained":
            return cls._load_local(Path(DEFAULT_WEIGHTS_DIR), dev, shipped=True)
        path = Path(weights).expanduser()
        if path.is_dir():  # a path is never a valid repo id: decide before touching the hub
            if revision is not None:
                log.warning("TSGAN: revision=%s ignored for the local folder %s", revision, path)
            return cls._load_local(path, dev)
        if path.exists():
            raise NoduleSynthError(f"--weights {weights}: is a file; give a TSGAN folder or a hub repo id")
        text = str(weights)
        if text.startswith((".", "~", "/")) or text.count("/") != 1 or "\\" in text:
            raise NoduleSynthError(f"--weights {weights}: no such folder (and not a hub repo id of the form org/name)")
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

        try:
            local = Path(snapshot_download(repo_id=text, revision=revision, allow_patterns=HUB_PATTERNS))
        except HFValidationError as e:
            raise NoduleSynthError(f"--weights {weights}: not an existing folder and not a valid hub repo id") from e
        except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as e:
            what = f"{weights}@{revision}" if revision else text
            raise NoduleSynthError(f"--weights {what}: the hub has no such (accessible) repo or revision "
                                   f"({type(e).__name__})") from e
        except (OSError, ConnectionError) as e:  # offline / unreachable (LocalEntryNotFoundError is an OSError)
            log.warning("TSGAN: could not get %s from the Hugging Face hub (%s: %s); falling back to the shipped "
                        "weights in %s", f"{weights}@{revision}" if revision else str(weights), type(e).__name__,
                        str(e).splitlines()[0] if str(e) else "", DEFAULT_WEIGHTS_DIR)
            return cls._load_local(Path(DEFAULT_WEIGHTS_DIR), dev, shipped=True)
        sha = local.name if local.parent.name == "snapshots" else sha256_files(list(local.glob("*.safetensors")))[:12]
        model = cls._load_local(local, dev, source=f"hub:{weights}@{sha}", revision=sha)
        return model

    @classmethod
    def _load_local(cls, folder: Path, device: torch.device, shipped: bool = False, source: str | None = None,
                    revision: str | None = None) -> "TSGAN":
        files = [folder / f"{MASK_NAME}.safetensors", folder / f"{TRANSLATOR_NAME}.safetensors"]
        if shipped and not all(f.is_file() for f in files):
            raise NoduleSynthError(f"no trained TSGAN weights in the shipped folder {folder} yet: train them "
                                   "(`nodulesynth train masks ...`, then `nodulesynth train translator ...`) "
                                   "or pass --weights FOLDER|HUB_REPO_ID")
        missing = [p.name for p in [folder / "tsgan.json", *files] if not p.is_file()]
        if missing:
            raise NoduleSynthError(f"{folder}: not a TSGAN weights folder (missing {', '.join(missing)})")
        meta_path = folder / "tsgan.json"
        try:
            info = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise NoduleSynthError(f"{meta_path}: not readable JSON ({e})") from e
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            raise NoduleSynthError(f"{meta_path}: not a {FORMAT} file")
        if int(info.get("version", 0)) > FORMAT_VERSION:
            raise NoduleSynthError(f"{meta_path}: format version {info.get('version')} is newer than this "
                                   f"nodulesynth understands ({FORMAT_VERSION}); upgrade nodulesynth")
        mask = load_module(MaskGenerator, MaskGANConfig, folder, MASK_NAME, device)
        translator = load_module(DLPix2PixGenerator, TranslatorConfig, folder, TRANSLATOR_NAME, device)
        meta = {**dict(info.get("meta") or {}), "image_size": int(info.get("image_size", 512))}
        revision = revision or sha256_files(files)[:12]
        source = source or f"local:{folder.resolve()}"
        model = cls(mask, translator, meta, revision=revision, source=source).eval()
        log.info("TSGAN: loaded %s (revision %s)", source, revision)
        return model

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, folder: str | Path, model_card: str | None = None, dtype: torch.dtype | None = None,
                        overwrite: bool = False) -> Path:
        """Write the layout atomically. An existing folder holding only a previous TSGAN export is
        replaced; any other non-empty folder needs ``overwrite=True``. ``dtype=torch.float16`` halves
        the download (weights load back as fp32)."""
        folder = Path(folder)
        if folder.is_dir() and not overwrite:
            existing = {p.name for p in folder.iterdir()}
            overwrite = bool(existing) and existing <= set(LAYOUT)
        with atomic_dir(folder, overwrite=overwrite, arg="save_pretrained folder") as tmp:
            save_module(self.mask_generator, self.mask_config, tmp, MASK_NAME, dtype)
            save_module(self.translator, self.translator_config, tmp, TRANSLATOR_NAME, dtype)
            meta = {k: v for k, v in self.meta.items() if k != "image_size"}
            write_json(tmp / "tsgan.json", {"format": FORMAT, "version": FORMAT_VERSION, "image_size": self.image_size,
                                            "nodulesynth_version": __version__, "meta": meta})
            revision = sha256_files([tmp / f"{MASK_NAME}.safetensors", tmp / f"{TRANSLATOR_NAME}.safetensors"])[:12]
            if model_card is None:
                model_card = MODEL_CARD.format(mask_res=self.mask_config.resolution, image_size=self.image_size,
                                               revision=revision, version=__version__,
                                               meta=json.dumps(meta, indent=2, default=str))
            (tmp / "README.md").write_text(model_card, encoding="utf-8")
        log.info("TSGAN: saved to %s (revision %s)", folder, revision)
        return folder


def read_configs(folder: str | Path) -> tuple[MaskGANConfig, TranslatorConfig]:
    """The two configs of a TSGAN folder, without loading weights (for trainers resuming from an export)."""
    return read_config(MaskGANConfig, folder, MASK_NAME), read_config(TranslatorConfig, folder, TRANSLATOR_NAME)
