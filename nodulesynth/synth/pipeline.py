"""Batched TSGAN generation: z → mask StyleGAN → quality gate → DL-Pix2Pix → HU slices + boxes.

Reproducibility contract (why the code is shaped this way):
- Sample ``i`` is a pure function of (weights, ``seed``, ``i``, ``block``): attempt ``j`` of sample ``i``
  draws its latent from its own CPU generator seeded by ``SeedSequence([seed, i, j])``; the mask
  generator runs with ``noise_mode="const"``; the accepted sample is the first attempt ``j`` that
  passes the quality gate and the conditions (rejection sampling). No state is shared between samples.
- On CPU, matrix products give slightly different bits for different batch *shapes* (BLAS blocking;
  measured ~1e-6 for a Linear at batch 1 vs 16) but identical bits for any composition of a
  batch of a fixed shape. So every forward pass runs at exactly ``block`` rows (padded), whatever
  batch size the caller asks for: results are bit-identical for any batch size, order or number of
  DataLoader workers on the same device. ``block`` is recorded in the provenance.
- Slices that come in rather than being drawn (mask-in ``translate`` with names, ``add_nodules_to_real``)
  are keyed by their names (:func:`named_keys`), so each is a function of its name and input alone.
- Across devices (CPU fp32 vs CUDA bf16 autocast) logits differ by rounding: masks are nearly
  always equal (a boundary pixel can flip the argmax, rarely), HU agree within bf16 tolerance.

The gate and the conditions run on the device, vectorised over a batch (integral images over the
nodule/lung maps, indexed by the component boxes), so nothing loops per pixel or per sample in Python.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import NoduleSynthError
from ..hu import HU_MAX, HU_MIN, unit_to_hu
from ..masks.boxes import masks_to_boxes_batch
from ..masks.classes import NUM_CLASSES, MaskClass
from ..metrics.nodules import MIN_NODULE_MM, nodule_size_mm
from ..runtime import autocast
from .atlas import MODES as BODY_MODES
from .atlas import BodyAtlas
from .background import MODES as BACKGROUND_MODES
from .background import ScannerBackgrounds
from .lung_library import MODES as LUNG_MODES
from .lung_library import LungLibrary

# Default in-plane spacing of prepared slices (prepare --size 512 --spacing 0.8): 512 px ↔ 409.6 mm.
DEFAULT_FIELD_OF_VIEW_MM = 512 * 0.8
NON_FINITE = "non-finite HU"  # gate reason for a translated slice holding NaN/inf
NO_BODY_REASON, MISSING_LUNG_REASON = "no body", "missing lung"  # gate reasons of the anatomy
NODULE_MODES = ("lidc", "stylegan")
THORAX_MARGIN = 2  # px around a nodule's box that must hold no background (quality gate)


@dataclass
class GenerationConfig:
    """How samples are drawn, gated and conditioned. Every field changes *which* samples you get,
    except ``batch_size`` and ``place_workers`` (throughput knobs only)."""

    seed: int = 0
    batch_size: int = 16  # samples produced per call chunk; never changes results
    # processes that place LIDC nodules beside the main one (never changes results); None: 0 on CPU
    # (the cores are translating), on an accelerator min(8, this rank's share of the cores − 1)
    place_workers: int | None = None
    block: int = 16  # fixed forward-pass shape (rows); part of the reproducibility key
    # StyleGAN truncation of the mask latents. 1.0 (none): measured on held-out patients, KID×1000
    # 279 vs 308 at 0.7 with every draw still passing the gate (README "Retraining on the real corpus").
    truncation_psi: float = 1.0
    max_attempts: int = 256  # rejection budget per sample (mask draws are cheap; 0.9**256 ≈ 2e-12)
    spacing_mm: float | None = None  # pixel size of generated slices; None: model meta or FOV/size
    # Quality gate (documented in README): a returned positive always has a real nodule in a lung.
    gate: bool = True  # False only to time untrained weights: anatomy/nodule validity unchecked
    min_nodules: int = 1  # 0 allows nodule-free samples (negatives / tests of untrained models)
    min_nodule_mm: float = MIN_NODULE_MM  # nodule size (metrics.nodules.nodule_size_mm) must reach this
    min_nodule_pixels: int | None = None  # None: 4 px (a speck floor; size is min_nodule_mm)
    min_lung_fraction: float = 0.002  # each lung must cover this fraction of the slice
    min_body_fraction: float = 0.01
    require_lungs: bool = True
    require_body: bool = True
    # Conditions (rejection sampling: draw until every nodule satisfies them).
    num_nodules: int | tuple[int, int] | None = None  # exact count or inclusive (lo, hi)
    min_size_mm: float | None = None  # nodule size: metrics.nodules.nodule_size_mm (longest in-plane extent)
    max_size_mm: float | None = None
    region: tuple[float, float, float, float] | None = None  # nodule centres in (x0,y0,x1,y1) ∈ [0,1]
    lung: str | None = None  # "left" / "right" (patient's): every nodule touches that lung
    # Where nodules come from: "lidc" — the StyleGAN draws the anatomy only (its nodule pixels become
    # lung) and real LIDC outlines are placed by masks.nodule_model, meeting the conditions by
    # construction; "stylegan" — the paper's StyleGAN-drawn nodules, conditions by rejection.
    nodules: str = "lidc"
    texture: str | None = None  # lidc only: "solid" (LIDC texture 4-5), "part-solid" (3), "ground-glass" (1-2)
    # lidc only: nodules outlined by at least this many of LIDC's 4 readers (LUNA16 keeps ≥ 3); None: all.
    # Drawn by section, 1-reader nodules are 21 % of LIDC's sections, 2-reader 16 %.
    min_readers: int | None = None
    add_nodules: bool = False  # mask-in (translate): place LIDC nodules into the given masks first
    # Weights with a lung texture model (models.lung_texture): its field replaces the translator's
    # lung interior (False: the translator's lungs, e.g. to compare the two).
    lung_texture: bool = True
    # The lungs' interior: "library" quilts real TRAIN lung tiles (synth.lung_library); "texture" draws
    # the weights' lung texture model; "translator" keeps the translator's (as lung_texture=False).
    # Held out (README "Real lung tiles", seed 0), KID×1000 of the lung windows 140 → 10 (floor 1), nodule
    # windows 58 → 17, whole slices 62 → 50 (floor 36) against the texture model.
    lungs: str = "library"
    # Weights with a body texture model (models.body_texture): its field replaces the translator's body
    # (class 1) but near nodules (False: the translator's body).
    body_texture: bool = True
    # Weights with a nodule texture model (models.nodule_texture): it redraws each nodule and its rim
    # from the slice around it (False: the translator's nodules).
    nodule_texture: bool = True
    # Outside the patient: "scanner" lays a real scanner background (table, cushions, the air's noise;
    # synth.background) around the anatomy; "translator" keeps the translator's own guess.
    background: str = "scanner"
    # The body (class 1): "atlas" registers a real TRAIN body onto the anatomy (ribs, fat, muscle, the
    # mediastinum's vessels; synth.atlas); "translator" keeps the translator's (or a body texture's).
    body: str = "atlas"

    def validate(self) -> None:
        def bad(name: str, why: str) -> None:
            raise NoduleSynthError(f"{name}: {why}")

        check_seed(self.seed)
        if self.batch_size < 1:
            bad("batch_size", f"must be ≥ 1, got {self.batch_size}")
        if self.block < 1:
            bad("block", f"must be ≥ 1, got {self.block}")
        if self.place_workers is not None and not (isinstance(self.place_workers, int) and self.place_workers >= 0):
            bad("place_workers", f"must be a count ≥ 0 or None (automatic), got {self.place_workers!r}")
        if self.max_attempts < 1:
            bad("max_attempts", f"must be ≥ 1, got {self.max_attempts}")
        if not (isinstance(self.truncation_psi, (int, float)) and 0 <= self.truncation_psi <= 2):
            bad("truncation_psi", f"must be in [0, 2] (1 = no truncation), got {self.truncation_psi!r}")
        if not (isinstance(self.min_nodule_mm, (int, float)) and 0 <= self.min_nodule_mm < math.inf):
            bad("min_nodule_mm", f"must be a size in mm ≥ 0, got {self.min_nodule_mm!r}")
        if self.min_nodules < 0:
            bad("min_nodules", f"must be ≥ 0, got {self.min_nodules}")
        if self.num_nodules is not None:
            lo, hi = self.count_range()
            if lo < 0 or hi < lo:
                bad("num_nodules", f"must be a count ≥ 0 or a range lo ≤ hi, got {self.num_nodules}")
        for name in ("min_size_mm", "max_size_mm"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                bad(name.replace("_", "-"), f"must be > 0 mm, got {v}")
        if self.min_size_mm and self.max_size_mm and self.min_size_mm > self.max_size_mm:
            bad("min-size-mm", f"{self.min_size_mm} is larger than max-size-mm {self.max_size_mm}")
        if self.region is not None:
            x0, y0, x1, y1 = self.region
            if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
                bad("region", f"must be (x0, y0, x1, y1) with 0 ≤ x0 < x1 ≤ 1, 0 ≤ y0 < y1 ≤ 1, got {self.region}")
        if self.lung not in (None, "left", "right"):
            bad("lung", f"must be 'left', 'right' or None, got {self.lung!r}")
        if self.spacing_mm is not None and not self.spacing_mm > 0:
            bad("spacing_mm", f"must be > 0, got {self.spacing_mm}")
        if self.nodules not in NODULE_MODES:
            bad("nodules", f"must be one of {', '.join(NODULE_MODES)}, got {self.nodules!r}")
        if self.texture is not None and self.nodules != "lidc":
            bad("texture", "needs nodules='lidc' (StyleGAN-drawn nodules carry no texture class)")
        if self.min_readers is not None:
            if self.nodules != "lidc":
                bad("min_readers", "needs nodules='lidc' (StyleGAN-drawn nodules have no readers)")
            if not (isinstance(self.min_readers, int) and 1 <= self.min_readers <= 4):
                bad("min_readers", f"must be 1, 2, 3 or 4 (LIDC had four readers), got {self.min_readers!r}")
        if self.background not in BACKGROUND_MODES:
            bad("background", f"must be one of {', '.join(BACKGROUND_MODES)}, got {self.background!r}")
        if self.lungs not in LUNG_MODES:
            bad("lungs", f"must be one of {', '.join(LUNG_MODES)}, got {self.lungs!r}")
        if self.body not in BODY_MODES:
            bad("body", f"must be one of {', '.join(BODY_MODES)}, got {self.body!r}")
        if self.add_nodules and self.nodules != "lidc":
            bad("add_nodules", "needs nodules='lidc' (LIDC outlines are what is placed)")

    def decisive(self) -> dict:
        """The fields that decide the samples (recorded in manifests, keyed into DICOM UIDs)."""
        import dataclasses

        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("batch_size", "place_workers")}

    def count_range(self) -> tuple[int, int]:
        if self.num_nodules is None:
            return (self.min_nodules, 1 << 30)
        if isinstance(self.num_nodules, int):
            return (self.num_nodules, self.num_nodules)
        lo, hi = self.num_nodules
        return (int(lo), int(hi))


@dataclass
class SyntheticBatch:
    """A batch of samples on the CPU. ``images_hu`` float32 (B,H,W) HU; ``masks`` uint8 (B,H,W);
    ``boxes[k]`` float32 (K,4) xyxy pixel-edge coordinates of the nodule components."""

    images_hu: torch.Tensor
    masks: torch.Tensor
    boxes: list[np.ndarray]
    provenance: list[dict]

    def __len__(self) -> int:
        return len(self.provenance)


@dataclass
class GateStats:
    """Counts of drawn / accepted / rejected attempts, by first failing reason."""

    attempts: int = 0
    accepted: int = 0
    rejected: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        rej = sum(self.rejected.values())
        reasons = ", ".join(f"{k} {v}" for k, v in self.rejected.most_common()) or "none"
        return f"{self.accepted} accepted of {self.attempts} drawn masks; {rej} rejected ({reasons})"


# Seeds are bounded so that different seeds never alias: sample_seed keeps 64 bits of the seed, and
# torch / JSON / provenance consumers hold a signed 64-bit int.
MAX_SEED = 2**63 - 1


def check_seed(seed, name: str = "seed") -> int:
    """A seed must be an int in [0, MAX_SEED]; larger ones would silently alias smaller seeds."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) <= MAX_SEED:
        raise NoduleSynthError(f"{name}: must be an integer in [0, 2**63 - 1] (larger seeds would alias "
                               f"smaller ones), got {seed!r}")
    return int(seed)


def sample_seed(seed: int, index: int, attempt: int) -> int:
    """64-bit seed of attempt ``attempt`` of sample ``index``: independent streams per (i, j)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(index), int(attempt)]).generate_state(2)
    return int((int(state[0]) << 32 | int(state[1])) & 0x7FFFFFFFFFFFFFFF)


NAMED_ATTEMPT = 1 << 31  # the attempt slot of named mask-in slices' keys: never a generated sample's attempt


def named_keys(names: Sequence[str]) -> list[tuple[int, int]]:
    """Seed keys of named mask-in / real slices: (64-bit hash of the name, NAMED_ATTEMPT). A named
    slice's result is then a function of (weights, seed, name, mask) alone, never of its place in a
    call, of the other slices beside it or of the batch size."""
    import hashlib

    if len(set(names)) != len(names):
        dup = sorted({x for x in names if list(names).count(x) > 1})[:3]
        raise NoduleSynthError(f"names: must be unique (they seed each slice), repeated: {dup}")
    return [(int.from_bytes(hashlib.blake2b(str(x).encode(), digest_size=8).digest(), "little"), NAMED_ATTEMPT)
            for x in names]


def latents(seed: int, keys: Sequence[tuple[int, int]], z_dim: int) -> torch.Tensor:
    """Latents for (index, attempt) pairs, each from its own CPU generator (device-independent)."""
    g = torch.Generator(device="cpu")
    out = torch.empty(len(keys), z_dim)
    for k, (i, j) in enumerate(keys):
        g.manual_seed(sample_seed(seed, i, j))
        out[k] = torch.randn(z_dim, generator=g)
    return out


def _box_sums(ii: torch.Tensor, bidx: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sum of a map inside integer boxes (x0,y0,x1,y1) via its padded integral image ii (B,H+1,W+1)."""
    x0, y0, x1, y1 = b.unbind(1)
    return ii[bidx, y1, x1] - ii[bidx, y0, x1] - ii[bidx, y1, x0] + ii[bidx, y0, x0]


def _integral(x: torch.Tensor) -> torch.Tensor:
    return F.pad(x.to(torch.int32).cumsum(1).cumsum(2), (1, 0, 1, 0))


def anatomy_minimums(config: GenerationConfig) -> tuple[float, float]:
    """The anatomy part of the gate: minimum body and per-lung shares of the slice (0: not required)."""
    return (config.min_body_fraction if config.require_body and config.gate else 0.0,
            config.min_lung_fraction if config.require_lungs and config.gate else 0.0)


def class_counts(masks: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """(B, len(classes)) int64 pixel counts of each class per label mask, on the masks' device.
    On CPU through numpy (a bool reduction there is ~6× faster than torch's on 512² masks)."""
    if masks.device.type == "cpu":
        m = masks.numpy()
        return torch.from_numpy(np.stack([(m == c).sum((1, 2), dtype=np.int64) for c in classes], 1))
    return torch.stack([(masks == c).flatten(1).sum(1) for c in classes], 1)


def quality_gate(
    masks: torch.Tensor, config: GenerationConfig, spacing_mm: float
) -> tuple[torch.Tensor, list[str | None], list[torch.Tensor]]:
    """Vectorised gate + conditions for a batch of label masks (B,H,W) uint8 on any device.

    A nodule *component* (one box of ``masks_to_boxes_batch``) is valid when its size
    (``nodule_size_mm``: longest in-plane extent) is ≥ min_nodule_mm (3 mm), it has ≥ min_nodule_pixels
    nodule pixels, touches a lung (inside it, or juxta-pleural: 8-adjacent to lung pixels) and lies
    inside the thorax (no background pixel within THORAX_MARGIN px of its box). A sample
    passes when every component is valid, the count of components is allowed, both lungs and the body
    are present and every nodule meets the size / region / lung conditions. Pixel counts use the
    component's box, so two components with overlapping boxes share pixels (rare; only loosens counts).
    Returns (passed (B,) bool on CPU, first failing reason per sample or None, boxes per sample —
    empty for samples whose anatomy already failed, whose components are never labelled).
    """
    B, H, W = masks.shape
    dev = masks.device
    area = H * W
    n_body, n_left, n_right, n_nod = class_counts(
        masks, (MaskClass.BODY, MaskClass.LEFT_LUNG, MaskClass.RIGHT_LUNG, MaskClass.NODULE)).unbind(1)
    body_frac, lung_frac = anatomy_minimums(config)
    no_body = n_body < body_frac * area
    no_lung = (n_left < lung_frac * area) | (n_right < lung_frac * area)
    # Components only for masks whose anatomy passed and that hold nodule pixels at all
    # (labelling is the expensive part; LIDC mode gates anatomy that has none).
    keep = torch.nonzero(~(no_body | no_lung) & (n_nod > 0)).flatten().tolist()
    kept = masks_to_boxes_batch(masks[keep]) if keep else []
    boxes = [torch.zeros(0, 4, device=dev) for _ in range(B)]
    for k, b in zip(keep, kept):
        boxes[k] = b
    counts = torch.tensor([len(b) for b in boxes], device=dev, dtype=torch.long)
    allb = torch.cat([b.to(dev).float().reshape(-1, 4) for b in boxes])
    bidx = torch.repeat_interleave(torch.arange(B, device=dev), counts)
    ib = allb.round().long()

    # Per-component sums only over the samples that have components: most rejected draws have none,
    # and the integral images / dilations below are the gate's main cost on CPU (same results).
    sub = torch.nonzero(counts > 0).flatten()
    remap = torch.full((B,), -1, dtype=torch.long, device=dev)
    remap[sub] = torch.arange(len(sub), device=dev)
    sidx = remap[bidx]
    msub = masks[sub]
    nod = msub == MaskClass.NODULE

    def near(m: torch.Tensor) -> torch.Tensor:  # 8-neighbourhood dilation
        return F.max_pool2d(m[:, None].float(), 3, 1, 1)[:, 0] > 0

    npix = _box_sums(_integral(nod), sidx, ib)
    touch_l = _box_sums(_integral(nod & near(msub == MaskClass.LEFT_LUNG)), sidx, ib) > 0
    touch_r = _box_sums(_integral(nod & near(msub == MaskClass.RIGHT_LUNG)), sidx, ib) > 0

    min_pix = 4 if config.min_nodule_pixels is None else config.min_nodule_pixels
    size_mm = nodule_size_mm(allb, spacing_mm)  # the one definition of nodule size
    # Inside the thorax: no background within THORAX_MARGIN px of the box (rejects blobs that a
    # young mask GAN paints at the image border next to stray lung pixels).
    m = THORAX_MARGIN
    grown = torch.stack([(ib[:, 0] - m).clamp(min=0), (ib[:, 1] - m).clamp(min=0),
                         (ib[:, 2] + m).clamp(max=W), (ib[:, 3] + m).clamp(max=H)], 1)
    outside = _box_sums(_integral(msub == MaskClass.BACKGROUND), sidx, grown) > 0
    bad_comp = ((npix < min_pix) | (size_mm < config.min_nodule_mm) | ~(touch_l | touch_r) | outside) & config.gate
    cond = torch.zeros_like(bad_comp)
    if config.min_size_mm is not None:
        cond |= size_mm < config.min_size_mm
    if config.max_size_mm is not None:
        cond |= size_mm > config.max_size_mm
    if config.region is not None:
        cx = (allb[:, 0] + allb[:, 2]) / (2 * W)
        cy = (allb[:, 1] + allb[:, 3]) / (2 * H)
        x0, y0, x1, y1 = config.region
        cond |= (cx < x0) | (cx > x1) | (cy < y0) | (cy > y1)
    if config.lung == "left":
        cond |= ~touch_l
    elif config.lung == "right":
        cond |= ~touch_r

    def per_sample(flags: torch.Tensor) -> torch.Tensor:
        return torch.zeros(B, device=dev, dtype=torch.long).index_add_(0, bidx, flags.long()) > 0

    lo, hi = config.count_range()
    checks = [
        (NO_BODY_REASON, no_body),
        (MISSING_LUNG_REASON, no_lung),
        ("invalid nodule", per_sample(bad_comp)),
        ("nodule count", (counts < (lo if config.gate or config.num_nodules is not None else 0)) | (counts > hi)),
        ("nodule condition", per_sample(cond)),
    ]
    fails = torch.stack([c for _, c in checks], 1).cpu()  # one sync per batch
    passed = ~fails.any(1)
    first = fails.float().argmax(1).tolist()
    reasons = [None if ok else checks[f][0] for ok, f in zip(passed.tolist(), first)]
    return passed, reasons, boxes


def validate_masks(masks, image_size: int, name: str = "masks") -> torch.Tensor:
    """User masks (H,W) or (B,H,W) with values 0..5 → uint8 tensor (B,H,W); clear errors otherwise."""
    t = masks if isinstance(masks, torch.Tensor) else torch.from_numpy(np.array(masks))  # copy: inputs may be read-only memmaps
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3:
        raise NoduleSynthError(f"{name}: expected a label mask (H, W) or a batch (B, H, W), got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        if t.dtype == torch.bool or not torch.equal(t, t.round()):
            raise NoduleSynthError(f"{name}: expected integer class labels 0..{NUM_CLASSES - 1}, got dtype {t.dtype}")
    if tuple(t.shape[1:]) != (image_size, image_size):
        raise NoduleSynthError(
            f"{name}: masks are {t.shape[1]}×{t.shape[2]} but the model translates {image_size}×{image_size} masks"
        )
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= NUM_CLASSES):
        raise NoduleSynthError(
            f"{name}: label values must be in 0..{NUM_CLASSES - 1} ({', '.join(c.name for c in MaskClass)}), "
            f"found {int(t.min())}..{int(t.max())}"
        )
    return t.to(torch.uint8)


class Synthesizer:
    """Runs a TSGAN as one batched, deterministic pipeline on its device (see module docstring)."""

    def __init__(self, tsgan, config: GenerationConfig | None = None):
        from ..models.pix2pix import one_hot

        self.config = config or GenerationConfig()
        self.config.validate()
        self.tsgan = tsgan.eval()
        self._one_hot = one_hot
        self.device = next(tsgan.parameters()).device
        self.image_size = int(tsgan.image_size)
        self.z_dim = int(tsgan.mask_config.z_dim)
        self.mask_resolution = int(tsgan.mask_config.resolution)
        meta = getattr(tsgan, "meta", {}) or {}
        self.spacing_mm = float(
            self.config.spacing_mm or meta.get("spacing_mm") or DEFAULT_FIELD_OF_VIEW_MM / self.image_size
        )
        # channels_last on every device: tensor cores on CUDA, oneDNN's fast layout on CPU (translation
        # 0.36 → 0.28 CPU-s per 512² slice measured on 2 cores; outputs differ by ≤ 2e-6 of the range)
        self.tsgan.translator.to(memory_format=torch.channels_last)
        for tex in (getattr(self.tsgan, "lung_texture", None), getattr(self.tsgan, "body_texture", None)):
            if tex is not None:  # the same layout gain (0.76 vs 1.03 s per lung field)
                tex.to(memory_format=torch.channels_last)
        self.stats = GateStats()
        # LIDC nodule mode: built now, so impossible conditions are refused before anything is drawn.
        self.lidc = None
        if self.config.nodules == "lidc":
            from ..masks.nodule_model import LidcPlacer

            self.lidc = LidcPlacer(self.config, self.spacing_mm, workers=self.place_workers)
        self.backgrounds = ScannerBackgrounds() if self.config.background == "scanner" else None
        self.atlas = BodyAtlas() if self.config.body == "atlas" else None
        self.lung_library = LungLibrary() if self.config.lungs == "library" and self.config.lung_texture else None
        self._atlas_entries: dict[tuple[int, int], int] = {}  # (i, attempt) → entry, until its provenance
        self._real_context = False  # True while add_nodules_to_real translates (it redraws nodules itself)

    @property
    def place_workers(self) -> int:
        """LIDC placement worker processes this synthesizer runs (``config.place_workers`` resolved)."""
        if self.config.nodules != "lidc":
            return 0
        if self.config.place_workers is not None:
            return self.config.place_workers
        if self.device.type == "cpu":
            return 0
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(0, min(8, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1))

    def close(self) -> None:
        """Stop the placement worker processes (if any); generation after this starts them again."""
        if self.lidc is not None:
            self.lidc.close()

    def __enter__(self) -> "Synthesizer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- provenance -------------------------------------------------------------------------
    def provenance(self, index: int, attempt: int) -> dict:
        return {
            "source": "synthetic",
            "model": str(getattr(self.tsgan, "source", "unknown")),
            "revision": str(getattr(self.tsgan, "revision", "unknown")),
            "seed": int(self.config.seed),
            "index": int(index),
            "attempt": int(attempt),
            "block": int(self.config.block),
            "truncation_psi": float(self.config.truncation_psi),
            "nodule_mode": self.config.nodules,
            "lung_texture": self.textured,
            **self._lungs_record(index, attempt),
            "body_texture": self.body_textured,
            "nodule_texture": self.nodule_textured,
            "background": self._background_record(index, attempt),
            "body": self._body_record(index, attempt),
            **({"nodules": self.lidc.placed.pop((int(index), int(attempt)), [])} if self.lidc is not None else {}),
        }

    def _background_record(self, index: int, attempt: int) -> dict | str:
        if self.backgrounds is None:
            return "translator"
        k = self.backgrounds.entry(self._stream_seeds([(index, attempt)], 3, 1)[0])
        return {"library": self.backgrounds.revision, "entry": k, "source": self.backgrounds.source(k)}

    def _lungs_record(self, index: int, attempt: int) -> dict:
        if not self.textured:
            return {"lungs": "translator"}
        if self.lung_library is None:
            return {"lungs": "texture"}
        return {"lungs": {"mode": "library", **self.lung_library.record(self._stream_seeds([(index, attempt)], 2, 1)[0])}}

    def _body_record(self, index: int, attempt: int) -> dict | str:
        if self.atlas is None:
            return "translator"
        k = self._atlas_entries.pop((int(index), int(attempt)))
        return {"atlas": self.atlas.revision, "entry": k, "source": self.atlas.source(k)}

    # ---- stages (always at exactly `block` rows) ----------------------------------------------
    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n == self.config.block:
            return x
        return torch.cat([x, x.new_zeros((self.config.block - n, *x.shape[1:]))])

    @torch.inference_mode()
    def _masks(self, keys: list[tuple[int, int]]) -> torch.Tensor:
        z = self._pad(latents(self.config.seed, keys, self.z_dim)).to(self.device)
        size = self.image_size if self.mask_resolution != self.image_size else None
        with autocast(self.device):
            m = self.tsgan.mask_generator.sample(
                z, truncation_psi=self.config.truncation_psi, noise_mode="const", size=size
            )
        return m[: len(keys)].to(torch.uint8)

    def _nodule_textures(self, keys, placed) -> list | None:
        """Per row, (x, y, texture class) of its placed LIDC nodules (``placed``: their provenance
        lists; default: the placer's record for each key), or None where nothing was placed."""
        from ..masks.nodule_model import TEXTURES

        if placed is None:
            if self.lidc is None:
                return None
            placed = [self.lidc.placed.get((int(i), int(j))) for i, j in keys]
        return [None if p is None else [(int(n["centre_px"][0]), int(n["centre_px"][1]), TEXTURES.index(n["texture"]))
                                        for n in p] for p in placed]

    @torch.inference_mode()
    def _translate(self, masks: torch.Tensor, keys: Sequence[tuple[int, int]] = (), placed: Sequence | None = None
                   ) -> torch.Tensor:
        n = masks.shape[0]
        x = self._one_hot(self._pad(masks).long(), NUM_CLASSES).to(self.device)
        x = x.contiguous(memory_format=torch.channels_last)
        kw = {}
        if getattr(getattr(self.tsgan, "translator_config", None), "noise", False):
            # decoder noise of sample (i, attempt j): its own seed (a stream apart from the latent's),
            # padding rows seed 0 — so the texture too is a pure function of (weights, seed, i)
            seeds = self._stream_seeds(keys, 1, 0)
            kw["noise_seeds"] = seeds + [0] * (self.config.block - len(seeds))
        with autocast(self.device):
            y = self.tsgan.translator(x, **kw)
        hu = unit_to_hu(y[:n, 0].float().clamp(-1, 1)).clamp(HU_MIN, HU_MAX)
        m = masks[:n].to(hu.device)
        if self.body_textured:
            from ..models.body_texture import body_alpha, body_conditions

            # the body field: a fifth seed stream, drawn for the block's condition maps
            hu = self._composite_texture(hu, m, keys, self.tsgan.body_texture, 4, body_alpha,
                                         body_conditions(self._pad(m)))
        if self.atlas is not None:
            # the body's atlas entry: a sixth seed stream picks among the nearest (see synth.atlas);
            # registered at the block's shape like every stage, padding rows (no body) left alone
            seeds = self._stream_seeds(keys, 5, n)[:n] + [0] * (self.config.block - n)
            pm = self._pad(m)
            hu, entries = self.atlas.apply(self._pad(hu), pm, seeds, self.spacing_mm)
            hu = hu[:n].clamp(HU_MIN, HU_MAX)
            self._atlas_entries.update(zip(keys, entries[:n]))
        redraw = self.nodule_textured and not self._real_context
        # the nodule components and their windows, labelled once for the lung texture and the redraw
        wins = self.tsgan.nodule_texture.windows(m.to(self.device)) if redraw else None
        if self.textured and not self._real_context:
            # (in a real slice only the new nodules and their rim are kept, where the lung field is never
            # blended in: a field drawn there would be thrown away)
            from ..models.lung_texture import lung_alpha, lung_conditions

            lm = m
            if redraw:
                # the nodules the nodule model redraws lie on textured lung, as real nodules do (its
                # context is then parenchyma up to the hole, not the translator's smooth margin)
                lm = torch.where(self.tsgan.nodule_texture.redrawn(m.to(self.device), wins).to(m.device),
                                 MaskClass.LEFT_LUNG, m)
            if self.lung_library is not None:  # real lung tiles, quilted by the same third stream (on the
                # placement workers when there are any: the quilt is host work, as the placement is)
                run = {"run": self.lidc.map} if self.lidc is not None and self.lidc.workers > 0 else {}
                hu = self._composite_texture(hu, lm, keys, self.lung_library, 2, lung_alpha, boxes_always=True,
                                             sample_kw=run)
            else:
                cond = lung_conditions(self._pad(m)) if self.tsgan.lung_texture.cfg.cond_channels else None
                hu = self._composite_texture(hu, lm, keys, self.tsgan.lung_texture, 2, lung_alpha, cond)  # a third stream
        if redraw:
            # each nodule redrawn from the slice around it (lungs, body, vessels as drawn so far): a seventh stream
            # (a placed LIDC nodule's density follows its size and texture class: NoduleInpainter.draw_density)
            hu = self.tsgan.nodule_texture.render(hu, m, self._stream_seeds(keys, 6, n)[:n],
                                                  self._nodule_textures(keys, placed), wins=wins,
                                                  spacing_mm=self.spacing_mm).clamp(HU_MIN, HU_MAX)
        if self.backgrounds is not None:
            # the background of sample (i, attempt j): a fourth seed stream (see synth.background)
            hu = self.backgrounds.paste(hu, m, self._stream_seeds(keys, 3, n), self.spacing_mm).clamp(HU_MIN, HU_MAX)
        return hu

    def _stream_seeds(self, keys: Sequence[tuple[int, int]], stream: int, n: int) -> list[int]:
        """Seeds of seed stream ``stream`` for samples (i, attempt j): a pure function of (seed, i, j),
        never of the batch or the device (keyless calls: 0..n-1)."""
        return [sample_seed(self.config.seed, i, j + (stream << 32)) for i, j in keys] or list(range(n))

    def _composite_texture(self, hu: torch.Tensor, masks: torch.Tensor, keys, model, stream: int, alpha,
                           cond: torch.Tensor | None = None, boxes_always: bool = False,
                           sample_kw: dict | None = None) -> torch.Tensor:
        """``hu`` with the texture field of ``model`` blended in where ``alpha`` of the masks says,
        seeded per sample from ``stream`` for the whole block (padding rows seed 0). On a CPU each
        field is drawn only around where it is needed (the same values there, a fraction of the
        work); on an accelerator as one batch. ``boxes_always``: a field whose values depend on the
        boxes (the lung library's quilt starts at them) gets them on every device. ``sample_kw``: more
        keywords for ``model.sample_hu``."""
        from ..models.lung_texture import composite

        n = hu.shape[0]
        seeds = self._stream_seeds(keys, stream, n)[:n] + [0] * (self.config.block - n)
        cpu = self.device.type == "cpu"

        def field(boxes: torch.Tensor) -> torch.Tensor:
            pad = torch.zeros((len(seeds) - n, 4), dtype=boxes.dtype, device=boxes.device)
            return model.sample_hu(*hu.shape[1:], seeds, self.device, self.spacing_mm, cond=cond,
                                   boxes=torch.cat([boxes, pad]) if cpu or boxes_always else None,
                                   **(sample_kw or {}))[:n]

        return composite(hu, masks, field, alpha=alpha).clamp(HU_MIN, HU_MAX)

    @property
    def body_textured(self) -> bool:
        """Whether body texture is composited: the weights hold a model and the config allows it."""
        return self.config.body_texture and getattr(self.tsgan, "body_texture", None) is not None

    @property
    def nodule_textured(self) -> bool:
        """Whether nodules are redrawn: the weights hold a nodule texture model and the config allows it."""
        return self.config.nodule_texture and getattr(self.tsgan, "nodule_texture", None) is not None

    @property
    def textured(self) -> bool:
        """Whether the lungs get a field (the lung library's or the weights' texture model): the config allows it
        and there is one."""
        if not self.config.lung_texture or self.config.lungs == "translator":
            return False
        return self.lung_library is not None or getattr(self.tsgan, "lung_texture", None) is not None

    # ---- public API -----------------------------------------------------------------------------
    def generate(self, indices: Sequence[int], progress=None) -> SyntheticBatch:
        """Samples for the given indices (any order, any count), each gated and conditioned."""
        indices = [int(i) for i in indices]
        if any(i < 0 for i in indices):
            raise NoduleSynthError("indices must be ≥ 0")
        cfg, B = self.config, self.config.block
        pending = [(i, 0) for i in dict.fromkeys(indices)]
        accepted: dict[int, tuple[int, torch.Tensor, np.ndarray]] = {}
        ready: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []
        results: dict[int, tuple[torch.Tensor, torch.Tensor, np.ndarray, int]] = {}

        def reject(i: int, j: int, why: str) -> tuple[int, int]:
            self.stats.rejected[why] += 1
            if j + 1 >= cfg.max_attempts:
                raise NoduleSynthError(
                    f"sample {i}: no mask passed the quality gate and conditions in {cfg.max_attempts} attempts "
                    f"(last reason: {why}); the conditions may be unsatisfiable for these weights "
                    f"({self.stats.summary()})"
                )
            return (i, j + 1)

        def flush(force: bool) -> list[tuple[int, int]]:
            """Translate full blocks of gated masks; a slice with NaN/inf HU (e.g. a half-precision
            overflow) is rejected like a failed gate and re-drawn, never returned with boxes."""
            retry = []
            while ready and (len(ready) >= B or force):
                chunk, ready[:] = ready[:B], ready[B:]
                masks = torch.stack([c[2] for c in chunk])
                hu = self._translate(masks, [(c[0], c[1]) for c in chunk]).cpu()
                finite = torch.isfinite(hu).flatten(1).all(1).tolist()
                # one device→host copy per block, not one per sample (each a sync on a GPU)
                masks = masks.cpu()
                bxs = torch.cat([c[3].detach().reshape(-1, 4) for c in chunk]).float().cpu().numpy()
                bxs = np.split(bxs, np.cumsum([len(c[3]) for c in chunk])[:-1])
                for k, (i, j, _, _) in enumerate(chunk):
                    if not finite[k]:
                        retry.append(reject(i, j, NON_FINITE))
                        continue
                    self.stats.accepted += 1
                    results[i] = (hu[k], masks[k], bxs[k], j)
                if progress is not None:
                    progress(sum(finite))
            return retry

        while pending or ready:
            if not pending:
                pending = flush(True)
                continue
            keys, pending = pending[:B], pending[B:]
            masks = self._masks(keys)
            job = self.lidc.submit(masks, keys) if self.lidc is not None else None  # LIDC: gate + nodules
            retry = flush(False)  # earlier full blocks translate meanwhile (the workers place this one)
            if job is not None:
                masks, passed, reasons, boxes = self.lidc.collect(job, masks.device)
            else:
                passed, reasons, boxes = quality_gate(masks, cfg, self.spacing_mm)
            self.stats.attempts += len(keys)
            for k, ((i, j), ok, why) in enumerate(zip(keys, passed.tolist(), reasons)):
                if ok:
                    ready.append((i, j, masks[k], boxes[k]))
                else:
                    retry.append(reject(i, j, why))
            pending = retry + pending  # retries first: keeps memory bounded and order deterministic
        out = [results[i] for i in indices]
        return SyntheticBatch(
            images_hu=torch.stack([o[0] for o in out]) if out else torch.zeros(0, self.image_size, self.image_size),
            masks=torch.stack([o[1] for o in out]) if out else torch.zeros(0, self.image_size, self.image_size, dtype=torch.uint8),
            boxes=[o[2] for o in out],
            provenance=[self.provenance(i, o[3]) for i, o in zip(indices, out)],
        )

    def translate(self, masks, names: Sequence[str] | None = None, add_nodules: bool | None = None) -> SyntheticBatch:
        """Mask-in mode: translate user label masks (H,W)/(B,H,W), values 0..5, to HU slices + boxes.
        No gate is applied (the user owns the masks); boxes come from the given nodule pixels."""
        m = validate_masks(masks, self.image_size)
        names = list(names) if names is not None else None
        keys = named_keys(names) if names is not None else [(k, 0) for k in range(len(m))]
        placed = [None] * len(m)
        if self.config.add_nodules if add_nodules is None else add_nodules:  # user/real masks get LIDC nodules
            m, placed = self.lidc.add_to(m, names)
        hus, boxes = [], []
        for s in range(0, len(m), self.config.block):
            part = m[s : s + self.config.block].to(self.device)
            hus.append(self._translate(part, keys[s : s + self.config.block], placed[s : s + self.config.block]).cpu())
            bad = (~torch.isfinite(hus[-1]).flatten(1).all(1)).nonzero().flatten().tolist()
            if bad:
                which = names[s + bad[0]] if names is not None else str(s + bad[0])
                raise NoduleSynthError(f"mask {which}: the translator produced NaN/inf HU ({len(bad)} slice(s) in this "
                                       "block); not returned as a labelled slice — check the weights and the precision")
            with torch.inference_mode():
                boxes += [b.detach().float().cpu().numpy().reshape(-1, 4) for b in masks_to_boxes_batch(part)]
        names = list(names) if names is not None else [str(k) for k in range(len(m))]
        prov = [
            {"source": "mask-in", "model": str(getattr(self.tsgan, "source", "unknown")),
             "revision": str(getattr(self.tsgan, "revision", "unknown")), "mask": n, "index": k,
             "seed": int(self.config.seed), "lung_texture": self.textured, **self._lungs_record(*keys[k]),
             "body_texture": self.body_textured,
             "nodule_texture": self.nodule_textured,
             "background": self._background_record(*keys[k]), "body": self._body_record(*keys[k]),
             **({"nodule_mode": "lidc", "nodules": placed[k]} if placed[k] is not None else {})}
            for k, n in enumerate(names)
        ]
        return SyntheticBatch(torch.cat(hus) if hus else torch.zeros(0, self.image_size, self.image_size), m, boxes, prov)

    def add_nodules_to_real(self, images_hu, masks, names: Sequence[str], no_room: str = "raise") -> SyntheticBatch:
        """Real slices + LIDC nodules (a copy-paste augmentation with a translated texture): nodules are
        placed into the real masks (their own nodules kept and avoided), the modified masks translated,
        and only the new nodules pasted into the real HU with a soft edge (Gaussian σ 0.6 px alpha: the
        partial-volume rim real outlines have); with a nodule texture model, each new nodule and its
        rim are then redrawn from the real pixels around it. Every other pixel stays the real scan's.
        Slice k is seeded by ``names[k]`` (unique), so it never depends on the slices beside it. A slice
        the nodules do not fit raises (``no_room="raise"``) or stays as it was (``"keep"``: provenance
        ``nodules`` [] and ``no_room`` says why)."""
        from scipy.ndimage import gaussian_filter

        if self.lidc is None:
            raise NoduleSynthError("add_nodules_to_real: needs nodules='lidc'")
        if no_room not in ("raise", "keep"):
            raise NoduleSynthError(f"no_room: 'raise' or 'keep', got {no_room!r}")
        hu = np.asarray(images_hu, np.float32).reshape(-1, self.image_size, self.image_size)
        old = validate_masks(masks, self.image_size, name="real masks")
        names = list(names)
        keys = named_keys(names)
        skipped: list | None = [] if no_room == "keep" else None
        new, placed = self.lidc.add_to(old, names, skipped)
        # only the nodules and their rim are used: the body around them stays the translator's, never
        # another patient's from the atlas
        atlas, self.atlas, self._real_context = self.atlas, None, True  # nodules are redrawn below, on the scan
        try:
            out = self.translate(new, names, add_nodules=False) if len(new) else None
        finally:
            self.atlas, self._real_context = atlas, False
        res = hu.copy()
        fresh = (new == MaskClass.NODULE) & (old != MaskClass.NODULE)
        for k in range(len(new)):
            f = fresh[k].numpy()
            alpha = np.maximum(gaussian_filter(f.astype(np.float32), 0.6) * 2, 0).clip(0, 1)
            alpha[f] = 1.0
            alpha[alpha < 0.02] = 0.0  # beyond the rim the real pixels stay exactly the scan's
            res[k] = alpha * out.images_hu[k].numpy() + (1 - alpha) * hu[k]
        if self.nodule_textured and len(new):
            # the new nodules redrawn from the real scan around them (its vessels, its noise); the
            # scan's own nodules are context, never redrawn
            only_new = torch.where(fresh, MaskClass.NODULE, MaskClass.BODY)
            res = self.tsgan.nodule_texture.render(torch.from_numpy(res).to(self.device), only_new.to(self.device),
                                                   self._stream_seeds(keys, 6, 0),
                                                   self._nodule_textures(None, placed), spacing_mm=self.spacing_mm
                                                   ).clamp(HU_MIN, HU_MAX).cpu().numpy()
        why = dict(skipped or [])
        # the translator's body, background and lungs are discarded here, so their records are not kept
        prov = [{"source": "real+lidc-nodules", "real": n, "model": str(getattr(self.tsgan, "source", "unknown")),
                 "revision": str(getattr(self.tsgan, "revision", "unknown")), "seed": int(self.config.seed),
                 "nodule_texture": self.nodule_textured, "nodule_mode": "lidc", "nodules": placed[k],
                 **({"no_room": why[k]} if k in why else {})}
                for k, n in enumerate(names)]
        return SyntheticBatch(torch.from_numpy(res), new, out.boxes if out is not None else [], prov)
