"""TSGAN: the two trained generators (mask StyleGAN + DL-Pix2Pix) as one loadable object.

Folder layout (local, shipped ``pretrained/`` or a Hugging Face hub repo):
``tsgan.json`` (format, version, image_size, training meta), ``mask_generator.{safetensors,json}``,
``translator.{safetensors,json}``, ``README.md`` (model card); optionally
``lung_texture.{safetensors,json}`` (the lung-parenchyma texture GAN the pipeline composites into
the lungs, ``models.lung_texture``) and ``body_texture.{safetensors,json}`` (its conditional twin for
the body, ``models.body_texture``) and ``nodule_texture.{safetensors,json}`` (the inpainting GAN that
redraws each nodule, ``models.nodule_texture``).
"""
from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..errors import NoduleSynthError
from ..io import atomic_dir, write_json
from ..runtime import resolve_device
from ..masks.classes import NUM_CLASSES
from .card import model_card as write_card
from .io import load_module, read_config, save_module, sha256_files
from .body_texture import NAME as BODY_NAME
from .body_texture import BodyTextureConfig
from .lung_texture import NAME as TEXTURE_NAME
from .lung_texture import LungTextureConfig, LungTextureGenerator
from .nodule_texture import NAME as NODULE_NAME
from .nodule_texture import NoduleInpainter, NoduleTextureConfig
from .pix2pix import DLPix2PixGenerator, TranslatorConfig, one_hot
from .stylegan import MaskGANConfig, MaskGenerator

log = logging.getLogger(__name__)

FORMAT = "nodulesynth-tsgan"
FORMAT_VERSION = 1
MASK_NAME, TRANSLATOR_NAME = "mask_generator", "translator"
LAYOUT = ("tsgan.json", f"{MASK_NAME}.safetensors", f"{MASK_NAME}.json", f"{TRANSLATOR_NAME}.safetensors",
          f"{TRANSLATOR_NAME}.json", "README.md")
# optional texture models: file stem → (config class, attribute of TSGAN, module class)
TEXTURES = {TEXTURE_NAME: (LungTextureConfig, "lung_texture", LungTextureGenerator),
            BODY_NAME: (BodyTextureConfig, "body_texture", LungTextureGenerator),
            NODULE_NAME: (NoduleTextureConfig, "nodule_texture", NoduleInpainter)}
OPTIONAL = tuple(f"{n}.{ext}" for n in TEXTURES for ext in ("safetensors", "json"))
HUB_PATTERNS = [*LAYOUT, *OPTIONAL]
# The shipped weights are package data (nodulesynth/pretrained/, in the wheel too, so `pip install .`
# works without a checkout); the repository's top-level pretrained/ is a symlink to it.
# Module-level so tests can point it elsewhere.
DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "pretrained"

class TSGAN(nn.Module):
    """Holds ``mask_generator`` (MaskGenerator), ``translator`` (DLPix2PixGenerator) and, when the
    weights have them, ``lung_texture`` and ``body_texture`` (LungTextureGenerator) and
    ``nodule_texture`` (NoduleInpainter); None otherwise."""

    def __init__(self, mask_generator: MaskGenerator, translator: DLPix2PixGenerator, meta: dict | None = None,
                 *, revision: str = "untrained", source: str = "memory",
                 lung_texture: LungTextureGenerator | None = None, body_texture: LungTextureGenerator | None = None,
                 nodule_texture: NoduleInpainter | None = None):
        super().__init__()
        self.mask_generator = mask_generator
        self.translator = translator
        self.lung_texture = lung_texture
        self.body_texture = body_texture
        self.nodule_texture = nodule_texture
        self.meta: dict[str, Any] = dict(meta or {})
        self.image_size = int(self.meta.get("image_size", 512))
        self.meta["image_size"] = self.image_size
        self.revision = revision
        self.source = source

    @property
    def spacing_mm(self) -> float | None:
        """In-plane pixel size (mm) of the slices the networks were trained on, from ``tsgan.json``
        (``meta.spacing_mm``); None for weights that never recorded it. Conditions in mm, the quality
        gate and exported provenance use it."""
        sp = self.meta.get("spacing_mm")
        return float(sp) if sp is not None else None

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
    def forward(self, z: torch.Tensor, truncation_psi: float = 1.0, noise_mode: str = "const"):
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
        if _path_like(text):
            raise NoduleSynthError(f"--weights {weights}: no such folder (and not a hub repo id of the form org/name)")
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

        what = f"{weights}@{revision}" if revision else text
        try:
            local = Path(snapshot_download(repo_id=text, revision=revision, allow_patterns=HUB_PATTERNS))
        except HFValidationError as e:
            raise NoduleSynthError(f"--weights {weights}: not an existing folder and not a valid hub repo id") from e
        except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as e:
            raise NoduleSynthError(f"--weights {what}: the hub has no such (accessible) repo or revision "
                                   f"({type(e).__name__})") from e
        except Exception as e:  # noqa: BLE001 - sorted below: only "cannot reach the hub" falls back
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if not hub_unreachable(e):
                raise NoduleSynthError(f"--weights {what}: the Hugging Face hub download failed ({reason}); "
                                       "not substituting the shipped weights") from e
            log.warning("TSGAN: cannot reach the Hugging Face hub for %s (%s); falling back to the shipped "
                        "weights in %s (no local folder named %s exists either)", what, reason,
                        DEFAULT_WEIGHTS_DIR, text)
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
        info = read_info(folder / "tsgan.json")
        mask_cfg = read_config(MaskGANConfig, folder, MASK_NAME)
        translator_cfg = read_config(TranslatorConfig, folder, TRANSLATOR_NAME)
        check_compatible(folder, info["image_size"], mask_cfg, translator_cfg)
        mask = load_module(MaskGenerator, MaskGANConfig, folder, MASK_NAME, device)
        translator = load_module(DLPix2PixGenerator, TranslatorConfig, folder, TRANSLATOR_NAME, device)
        textures = {}
        for name, (config_cls, attr, module_cls) in TEXTURES.items():
            pair = (f"{name}.safetensors", f"{name}.json")
            present = [n for n in pair if (folder / n).is_file()]
            if present and len(present) != 2:
                raise NoduleSynthError(f"{folder}: {present[0]} without {set(pair).difference(present).pop()} "
                                       f"(the {name.replace('_', ' ')} model needs both)")
            if present:
                textures[attr] = load_module(module_cls, config_cls, folder, name, device)
                files.append(folder / f"{name}.safetensors")
        meta = {**info["meta"], "image_size": info["image_size"]}
        revision = revision or sha256_files(files)[:12]
        source = source or f"local:{folder.resolve()}"
        model = cls(mask, translator, meta, revision=revision, source=source, **textures).eval()
        log.info("TSGAN: loaded %s (revision %s)", source, revision)
        return model

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, folder: str | Path, model_card: str | None = None, dtype: torch.dtype | None = None,
                        overwrite: bool = False, card_extra: str | None = None) -> Path:
        """Write the layout atomically. An existing folder holding only a previous TSGAN export is
        replaced; any other non-empty folder needs ``overwrite=True``. ``dtype=torch.float16`` halves
        the download (weights load back as fp32). The card is ``models.card.model_card`` (plus
        ``card_extra``) unless ``model_card`` gives the full text."""
        folder = Path(folder)
        if folder.is_dir() and not overwrite:
            existing = {p.name for p in folder.iterdir() if not p.name.startswith(".")}  # .nodulesynth marker
            overwrite = bool(existing) and existing <= set(HUB_PATTERNS)
        def only_layout(p: Path) -> bool:  # a TSGAN export written before folders carried the marker
            return {q.name for q in p.iterdir() if not q.name.startswith(".")} <= set(HUB_PATTERNS)

        with atomic_dir(folder, overwrite=overwrite, arg="save_pretrained folder", ours=only_layout) as tmp:
            save_module(self.mask_generator, self.mask_config, tmp, MASK_NAME, dtype)
            save_module(self.translator, self.translator_config, tmp, TRANSLATOR_NAME, dtype)
            weights = [tmp / f"{MASK_NAME}.safetensors", tmp / f"{TRANSLATOR_NAME}.safetensors"]
            for name, (_, attr, _) in TEXTURES.items():
                if getattr(self, attr) is not None:
                    weights.append(save_module(getattr(self, attr), getattr(self, attr).cfg, tmp, name, dtype))
            meta = {k: v for k, v in self.meta.items() if k != "image_size"}
            write_json(tmp / "tsgan.json", {"format": FORMAT, "version": FORMAT_VERSION, "image_size": self.image_size,
                                            "nodulesynth_version": __version__, "meta": meta})
            revision = sha256_files(weights)[:12]
            if model_card is None:
                model_card = write_card(mask_resolution=self.mask_config.resolution, image_size=self.image_size,
                                        revision=revision, meta=meta, extra=card_extra)
            (tmp / "README.md").write_text(model_card, encoding="utf-8")
        log.info("TSGAN: saved to %s (revision %s)", folder, revision)
        return folder


def _need(cond: bool, path: Path, field: str, value: Any, why: str) -> None:
    if not cond:
        raise NoduleSynthError(f"{path}: {field}={value!r}: {why}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_info(path: Path) -> dict:
    """Read and check ``tsgan.json``: format, version, image_size (an int power of two ≥ 4) and the
    optional ``meta.spacing_mm`` (finite, > 0). Returns {"image_size", "meta", "version"}."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise NoduleSynthError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise NoduleSynthError(f"{path}: not a {FORMAT} file")
    version = info.get("version", 1)
    _need(_is_int(version) and version >= 1, path, "version", version, "must be an integer ≥ 1")
    if version > FORMAT_VERSION:
        raise NoduleSynthError(f"{path}: format version {version} is newer than this nodulesynth understands "
                               f"({FORMAT_VERSION}); upgrade nodulesynth")
    size = info.get("image_size", 512)
    _need(_is_int(size) and size >= 4 and not size & (size - 1), path, "image_size", size,
          "must be an integer power of two ≥ 4 (the slice size in pixels)")
    meta = info.get("meta") or {}
    _need(isinstance(meta, dict), path, "meta", type(meta).__name__, "must be an object")
    sp = meta.get("spacing_mm")
    if sp is not None:
        _need(isinstance(sp, (int, float)) and not isinstance(sp, bool) and math.isfinite(sp) and 0 < sp <= 20,
              path, "meta.spacing_mm", sp, "must be a pixel size in mm (0 < spacing ≤ 20)")
    return {"image_size": int(size), "meta": dict(meta), "version": int(version)}


def check_compatible(folder: Path, image_size: int, mask_cfg: MaskGANConfig, translator_cfg: TranslatorConfig) -> None:
    """The two networks must fit each other, the 6 mask classes and ``image_size`` — checked before
    any weights are read, so a bad edit fails at load and not minutes into generation."""
    info = folder / "tsgan.json"
    _need(mask_cfg.num_classes == NUM_CLASSES, folder / f"{MASK_NAME}.json", "num_classes", mask_cfg.num_classes,
          f"must be {NUM_CLASSES} (the mask classes nodulesynth uses)")
    _need(translator_cfg.in_classes == NUM_CLASSES, folder / f"{TRANSLATOR_NAME}.json", "in_classes",
          translator_cfg.in_classes, f"must be {NUM_CLASSES} (one input channel per mask class)")
    _need(translator_cfg.out_channels == 1, folder / f"{TRANSLATOR_NAME}.json", "out_channels",
          translator_cfg.out_channels, "must be 1 (one HU channel)")
    m = 2**translator_cfg.num_downs
    _need(image_size % m == 0, info, "image_size", image_size,
          f"must be a multiple of 2**num_downs = {m} for the translator ({TRANSLATOR_NAME}.json num_downs="
          f"{translator_cfg.num_downs})")
    _need(image_size >= mask_cfg.resolution, info, "image_size", image_size,
          f"smaller than the mask generator's resolution {mask_cfg.resolution} ({MASK_NAME}.json)")


def _path_like(text: str) -> bool:
    """True for strings that can only mean a local path (so a missing folder is an error, never a
    hub look-up that may fall back to the shipped weights): anything that is not exactly ``org/name``
    with hub-legal characters, anything starting with ``.``, ``~`` or ``/``, and ``a/b`` whose first
    part is an existing local folder (``runs/exp-typo`` beside ``runs/``)."""
    if text.startswith((".", "~", "/")) or "\\" in text or text.count("/") != 1:
        return True
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_]", text) or ".." in text or "--" in text:
        return True
    return Path(text.split("/")[0]).is_dir()


def hub_unreachable(err: BaseException) -> bool:
    """Does ``err`` (raised by snapshot_download / hf_hub_download) mean "offline or cannot connect"?

    huggingface_hub ≥ 1 wraps most failures: HF_HUB_OFFLINE and connection failures become a
    LocalEntryNotFoundError whose cause is OfflineModeIsEnabled / a connect or timeout error, but an
    HTTP 500 or 401 becomes the same class with an HfHubHTTPError cause, and HfHubHTTPError is itself
    an OSError. So walk the cause chain: any answer from the server (HfHubHTTPError), an incomplete
    cached snapshot or a local OSError (e.g. a permission error on the cache) is not "offline".
    """
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    chain, e = [], err
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    if any(isinstance(c, HfHubHTTPError) for c in chain):
        return False
    if any(type(c).__name__ == "IncompleteSnapshotError" for c in chain):
        return False
    for c in chain:  # by name too: httpx/requests connection errors are not builtin ConnectionErrors
        names = {t.__name__ for t in type(c).__mro__}
        if isinstance(c, (ConnectionError, TimeoutError)) or names & {
                "ConnectionError", "ConnectError", "ConnectTimeout", "TimeoutException", "NetworkError", "gaierror"}:
            return True
    # Offline mode without a cached snapshot: a bare LocalEntryNotFoundError (no cause) is "offline".
    return isinstance(err, LocalEntryNotFoundError) and err.__cause__ is None and err.__context__ is None

