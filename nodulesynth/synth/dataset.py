"""`SyntheticNoduleDataset`: TSGAN samples (optionally mixed with real slices) as a torch Dataset.

Mixing rule (one meaning only): ``ratio`` is the synthetic:real COUNT ratio. With ``real`` holding
R slices in ``real_split`` (default "train": the prepared dataset's patient-level split), ``ratio=2.0`` adds round(2.0·R) synthetic samples (the paper's Table 3 adds 500…2,500
synthetic images to its real training slices, "real+2000" being best). Without ``ratio``, ``n`` synthetic samples are added to all real slices; without ``real``,
the dataset is ``n`` synthetic samples. Indices [0, R) are the real slices, [R, R+n_synth) synthetic
sample 0, 1, … — so ``len(ds) = R + n_synth``.

Synthetic samples are generated lazily in blocks of ``batch_size`` consecutive indices (one batched
forward on the device) and kept in an LRU cache of ``cache_blocks`` blocks. Sample i depends only
on (weights, seed, i) — never on batch size, access order or workers (see synth.pipeline).
Workers: on CPU each DataLoader worker generates the blocks it needs itself (deterministic, same
bits). CUDA generation belongs in the main process: use ``num_workers=0``, or call
``pregenerate()`` first (keeps everything in RAM, ≈3 bytes/pixel) and then use any number of workers.
``block_sampler()`` visits indices block by block (blocks and items shuffled), so each block is
generated once per epoch instead of once per item under random access.
"""
from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

from ..errors import NoduleSynthError
from ..hu import hu_to_unit, unit_to_hu, window
from ..masks.classes import MaskClass
from ..runtime import resolve_device
from .pipeline import GenerationConfig, Synthesizer, check_seed

OUTPUTS = ("hu", "window", "unit")


def load_tsgan(weights: Any, device: torch.device, revision: str | None = None):
    """TSGAN instance as is (moved to device), else TSGAN.from_pretrained(weights)."""
    from ..models.tsgan import TSGAN

    if isinstance(weights, TSGAN):
        return weights.to(device).eval()
    if weights is None or isinstance(weights, (str, os.PathLike)):
        return TSGAN.from_pretrained("pretrained" if weights is None else str(weights), revision=revision, device=str(device))
    raise NoduleSynthError(f"weights: expected 'pretrained', a folder, a hub repo id or a TSGAN, got {type(weights).__name__}")


def open_real(real: Any):
    """A prepared slice dataset folder or SliceDataset instance → SliceDataset."""
    from ..data.slices import SliceDataset, require_labelled

    if isinstance(real, SliceDataset):
        return require_labelled(real, "real:")
    if not os.path.isdir(str(real)):
        raise NoduleSynthError(f"real: {real}: not a folder (expected a dataset written by `nodulesynth prepare`)")
    return require_labelled(SliceDataset(real), "real:")


MIX_NAMES = {"n": "n", "ratio": "ratio", "real": "real="}


def check_mix(n: Any, ratio: Any, has_real: bool, names: dict | None = None) -> None:
    """Value checks of n / ratio under the one mixing rule, before any data is opened (the Dataset
    and the CLI share them; ``names`` renames the arguments in messages, e.g. to --n / --ratio)."""
    nm = {**MIX_NAMES, **(names or {})}
    if ratio is not None:
        if not has_real:
            raise NoduleSynthError(f"{nm['ratio']}: needs {nm['real']} (ratio is the synthetic:real count ratio)")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (np.isfinite(ratio) and ratio > 0):
            raise NoduleSynthError(f"{nm['ratio']}: must be > 0 (synthetic:real count ratio), got {ratio!r}")
        return
    if n is None or isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise NoduleSynthError(f"{nm['n']}: number of synthetic samples required (an int), got {n!r}")
    if n < 0 or (n == 0 and not has_real):
        raise NoduleSynthError(f"{nm['n']}: must be > 0, got {n}")


def mixed_counts(n: int | None, n_real: int, ratio: float | None, has_real: bool, names: dict | None = None) -> int:
    """Number of synthetic samples under the module's one mixing rule (see module docstring)."""
    check_mix(n, ratio, has_real, names)
    if ratio is not None:
        n_synth = int(round(ratio * n_real))
        if n is not None and n != n_synth:
            nm = {**MIX_NAMES, **(names or {})}
            raise NoduleSynthError(
                f"{nm['n']}={n} contradicts {nm['ratio']}={ratio} with {n_real} real slices (→ {n_synth} synthetic); "
                "give one of them"
            )
        return n_synth
    return int(n)


def check_real_size(real, size: int, name: str = "real") -> None:
    """Real slices must have the model's size (they share one dataset and one box convention)."""
    if real is not None and tuple(real.images.shape[1:]) != (size, size):
        raise NoduleSynthError(
            f"{name}: slices are {real.images.shape[1]}×{real.images.shape[2]} but the model generates "
            f"{size}×{size}; prepare the real data with --size {size}"
        )


def check_real_spacing(real, indices, spacing_mm: float, name: str = "real") -> None:
    """Real slices that get LIDC nodules must have the model's pixel spacing: the outlines are scaled
    to it, so on other pixels the added nodules would have the wrong size in mm."""
    for i in indices:
        got = tuple(float(v) for v in real.records[int(i)].spacing_mm)
        if any(abs(g - spacing_mm) > 0.01 * spacing_mm for g in got):
            raise NoduleSynthError(
                f"{name}: slice {int(i)} has pixel spacing {list(got)} mm but nodules are added at the model's "
                f"{spacing_mm:g} mm (their sizes would be wrong); prepare the real data with --spacing {spacing_mm:g}")


def real_provenance(record, index: int) -> dict:
    """Provenance of real slice ``index`` (one definition for the Dataset, the CLI and every export)."""
    prov = {"source": str(getattr(record, "source", "real")), "series_uid": str(getattr(record, "series_uid", "")),
            "z_mm": float(getattr(record, "z_mm", float("nan"))), "slice_index": int(getattr(record, "slice_index", -1)),
            "index": int(index)}
    patient = getattr(record, "patient", None)
    if patient:
        prov["patient"] = str(patient)
    spacing = getattr(record, "spacing_mm", None)
    if spacing is not None:
        prov["spacing_mm"] = [float(v) for v in spacing]
    return prov


class SyntheticNoduleDataset(Dataset):
    """Detection-ready items: ``{"image": (1,H,W) float32, "mask": (H,W) uint8 labels, "boxes": (K,4)
    float32 xyxy pixels, "labels": (K,) int64 (1 = nodule), "source": "synthetic"|"inserted"|"real",
    "provenance": dict}``. ``output`` picks the image scale: "hu" (HU), "window" (lung window
    [-1000, 400] HU → [0,1], as exported PNGs; the paper states no window), "unit" (network range [-1,1]).
    ``synthetic="inserted"`` makes the synthetic samples real TRAIN slices without a nodule with LIDC
    nodules inserted (:mod:`synth.insert`) instead of generated slices."""

    def __init__(
        self,
        n: int | None = None,
        weights: Any = "pretrained",
        seed: int = 0,
        device: str | torch.device = "auto",
        batch_size: int = 16,
        real: Any = None,
        ratio: float | None = None,
        transform: Callable | None = None,
        output: str = "hu",
        conditions: dict | GenerationConfig | None = None,
        revision: str | None = None,
        cache_blocks: int | None = 4,
        real_split: str | None = "train",
        synthetic: str = "generated",
    ):
        from .insert import MODES as SYNTHETIC_MODES

        if output not in OUTPUTS:
            raise NoduleSynthError(f"output: must be one of {', '.join(OUTPUTS)}, got {output!r}")
        if synthetic not in SYNTHETIC_MODES:
            raise NoduleSynthError(f"synthetic: must be one of {', '.join(SYNTHETIC_MODES)}, got {synthetic!r}")
        if synthetic == "inserted" and real is None:
            raise NoduleSynthError("synthetic='inserted': needs real= (its TRAIN slices without a nodule are the lungs "
                                   "the nodules go into)")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise NoduleSynthError(f"batch_size: must be an int ≥ 1, got {batch_size!r}")
        self.real = open_real(real) if real is not None else None
        # real slices: the prepared dataset's TRAIN split by default (whole patients held out for
        # val/test; see data.splits); real_split=None or "all" takes every slice
        from ..data.splits import split_indices

        self.real_index = split_indices(self.real, real_split) if self.real is not None else np.zeros(0, np.int64)
        if self.real is not None and len(self.real_index) == 0:
            raise NoduleSynthError(f"real: {self.real.root} has no slices in split {real_split!r}")
        self.n_real = len(self.real_index)
        self.n_synth = mixed_counts(n, self.n_real, ratio, self.real is not None)
        self.device = resolve_device(device)
        self.weights, self.revision = weights, revision
        self.output, self.batch_size, self.cache_blocks = output, batch_size, cache_blocks
        self.transform = _compose(transform)
        given = dataclasses.asdict(conditions) if isinstance(conditions, GenerationConfig) else dict(conditions or {})
        if given.get("seed", seed) != seed:
            raise NoduleSynthError(f"conditions: seed={given['seed']} conflicts with seed={seed}; pass the seed once")
        check_seed(seed)
        if isinstance(conditions, GenerationConfig):
            cfg = dataclasses.replace(conditions, seed=seed, batch_size=batch_size)
        else:
            fields = {f.name for f in dataclasses.fields(GenerationConfig)}
            unknown = set(conditions or {}) - fields
            if unknown:
                raise NoduleSynthError(f"conditions: unknown key(s) {sorted(unknown)}; valid: {sorted(fields)}")
            cfg = GenerationConfig(**{**(conditions or {}), "seed": seed, "batch_size": batch_size})
        cfg.validate()
        if cfg.add_nodules and self.real is None:
            raise NoduleSynthError("conditions: add_nodules needs real= (the slices that get the nodules); generated "
                                   "slices always have them (num_nodules sets how many)")
        self.config = cfg
        # Cache blocks are whole forward-pass blocks: a smaller batch would be padded anyway (wasted
        # compute), and block size never changes which samples come out.
        self.batch_size = -(-max(batch_size, cfg.block) // cfg.block) * cfg.block
        self._synth: Synthesizer | None = None
        self._cache: OrderedDict[int, dict] = OrderedDict()
        self._pregenerated = False
        if self.n_synth or (self.n_real and cfg.add_nodules):
            self.synthesizer  # load weights now: a missing file is reported at construction
            check_real_size(self.real, self.synthesizer.image_size)
        if self.n_real and cfg.add_nodules:
            check_real_spacing(self.real, self.real_index, float(self.synthesizer.spacing_mm))
        self.inserted = None  # synthetic="inserted": the backgrounds, TRAIN slices without a nodule whatever real_split
        if synthetic == "inserted" and self.n_synth:
            from .insert import InsertionSource

            self.inserted = InsertionSource.from_real(self.real, split_indices(self.real, "train"),
                                                      float(self.synthesizer.spacing_mm))

    # ---- generation ---------------------------------------------------------------------------
    @property
    def synthesizer(self) -> Synthesizer:
        if self._synth is None:
            self._synth = Synthesizer(load_tsgan(self.weights, self.device, self.revision), self.config)
        return self._synth

    def __getstate__(self):  # workers reload weights by name instead of receiving a pickled model
        state = self.__dict__.copy()
        if isinstance(self.weights, (str, os.PathLike)) or self.weights is None:
            state["_synth"] = None
        if not self._pregenerated:
            state["_cache"] = OrderedDict()
        return state

    def _generate_block(self, b: int) -> dict:
        if self.device.type == "cuda" and get_worker_info() is not None:
            raise NoduleSynthError(
                "SyntheticNoduleDataset: CUDA generation must run in the main process; use num_workers=0, "
                "or call ds.pregenerate() before creating a DataLoader with workers"
            )
        if isinstance(b, tuple):  # ("real", block): real slices with LIDC nodules added
            return self._real_nodule_block(b[1])
        lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, self.n_synth)
        out = (self.synthesizer.generate(range(lo, hi)) if self.inserted is None
               else self.inserted.generate(self.synthesizer, range(lo, hi)))
        return {
            "hu": out.images_hu.round().to(torch.int16).numpy(),  # integer HU, like real CT
            "masks": out.masks.numpy(),
            "boxes": out.boxes,
            "provenance": out.provenance,
        }

    def _real_nodule_block(self, b: int) -> dict:
        """``conditions={"add_nodules": True}``: real slices b·bs … get LIDC nodules (the conditions),
        translated texture pasted with a soft edge (Synthesizer.add_nodules_to_real), each seeded by its
        name "real<j>" (j: its index in the prepared set), so never by the batch size; a slice the
        nodules do not fit stays as it was (provenance ``no_room``). `generate --real --add-nodules`
        writes the same slices."""
        from .insert import add_to_real_slices

        rows = [int(r) for r in self.real_index[b * self.batch_size:(b + 1) * self.batch_size]]
        out = add_to_real_slices(self.synthesizer, self.real, rows, [f"real{r}" for r in rows])
        return {"hu": out.images_hu.round().to(torch.int16).numpy(), "masks": out.masks.numpy(),
                "boxes": out.boxes, "provenance": out.provenance}

    def _block(self, b: int) -> dict:
        if b in self._cache:
            self._cache.move_to_end(b)
            return self._cache[b]
        blk = self._generate_block(b)
        self._cache[b] = blk
        if not self._pregenerated and self.cache_blocks is not None:
            while len(self._cache) > self.cache_blocks:
                self._cache.popitem(last=False)
        return blk

    def pregenerate(self, progress: bool = True) -> "SyntheticNoduleDataset":
        """Generate every synthetic sample now and keep it (then any DataLoader workers are fine)."""
        from tqdm.auto import tqdm

        self._pregenerated = True
        nblocks = -(-self.n_synth // self.batch_size)
        with tqdm(total=self.n_synth, unit="img", desc="generating", disable=not progress) as bar:
            for b in range(nblocks):
                bar.update(len(self._block(b)["provenance"]))
        return self

    @property
    def stats(self):
        """Quality-gate counts (drawn / accepted / rejected by reason) of this process."""
        return self.synthesizer.stats

    # ---- items ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.n_real + self.n_synth

    def raw(self, i: int) -> dict:
        """Item i before transform: int16 HU, uint8 mask, float32 boxes (numpy), source, provenance."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for dataset of length {len(self)}")
        i = i % len(self)
        if i < self.n_real and self.config.add_nodules:  # real slice + LIDC nodules, made per block
            blk = self._block(("real", i // self.batch_size))
            k = i % self.batch_size
            return {"hu": blk["hu"][k], "mask": blk["masks"][k], "boxes": blk["boxes"][k],
                    "source": "real", "provenance": blk["provenance"][k]}
        if i < self.n_real:
            item = self.real[int(self.real_index[i])]
            rec = item["record"]
            prov = real_provenance(rec, int(self.real_index[i]))
            return {"hu": np.asarray(item["image_hu"]), "mask": np.asarray(item["mask"]),
                    "boxes": np.asarray(item["boxes"], np.float32).reshape(-1, 4), "source": "real", "provenance": prov}
        s = i - self.n_real
        blk = self._block(s // self.batch_size)
        k = s % self.batch_size
        return {"hu": blk["hu"][k], "mask": blk["masks"][k], "boxes": blk["boxes"][k],
                "source": "synthetic" if self.inserted is None else "inserted", "provenance": blk["provenance"][k]}

    def __getitem__(self, i: int) -> dict:
        r = self.raw(int(i))
        hu = r["hu"].astype(np.float32)
        mask, boxes = r["mask"], r["boxes"]
        if self.output == "window":
            x01 = window(hu)
        else:
            x01 = (hu_to_unit(hu) + 1) / 2
        labels = np.ones(len(boxes), dtype=np.int64)
        if self.transform is not None:
            # A column-index probe rides along as an extra mask: if the transform mirrored the
            # image left↔right, the patient's left lung now lies on the image's left, so the lung
            # labels are swapped to keep "left lung = image right" (radiological convention).
            probe = np.broadcast_to(np.arange(1, mask.shape[1] + 1, dtype=np.float32), mask.shape).copy()
            t = self.transform(image=x01[..., None], mask=mask, masks=[probe], bboxes=boxes, labels=labels)
            x01 = np.asarray(t["image"], np.float32)[..., 0]
            mask = np.asarray(t["mask"])
            if mirrored(np.asarray(t["masks"][0])):
                mask = swap_lungs(mask)
            boxes = np.asarray(t["bboxes"], np.float32).reshape(-1, 4)
            labels = np.asarray(t["labels"], np.int64).reshape(-1)
        if self.output == "window":
            img = x01
        elif self.output == "unit":
            img = x01 * 2 - 1
        else:
            img = unit_to_hu(x01 * 2 - 1)
        return {
            "image": torch.from_numpy(np.array(img, dtype=np.float32))[None],  # copies: never alias the cache/memmap
            "mask": torch.from_numpy(np.array(mask, dtype=np.uint8)),
            "boxes": torch.from_numpy(np.array(boxes, dtype=np.float32).reshape(-1, 4)),
            "labels": torch.from_numpy(labels),
            "source": r["source"],
            "provenance": r["provenance"],
        }

    def block_sampler(self, shuffle: bool = True, seed: int = 0) -> "BlockSampler":
        return BlockSampler(self, shuffle, seed)


class BlockSampler(Sampler[int]):
    """Visits the dataset one generation block at a time (block order and order within a block
    shuffled, reshuffled every epoch), so lazy generation costs one forward per block per epoch."""

    def __init__(self, ds: SyntheticNoduleDataset, shuffle: bool = True, seed: int = 0):
        check_seed(seed, "block_sampler: seed")
        self.ds, self.shuffle, self.seed, self.epoch = ds, shuffle, seed, 0

    def __len__(self) -> int:
        return len(self.ds)

    def __iter__(self) -> Iterator[int]:
        bs, n_real = self.ds.batch_size, self.ds.n_real
        units = [np.arange(s, min(s + bs, n_real)) for s in range(0, n_real, bs)]
        units += [n_real + np.arange(s, min(s + bs, self.ds.n_synth)) for s in range(0, self.ds.n_synth, bs)]
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch])
            units = [rng.permutation(u) for u in units]
            units = [units[k] for k in rng.permutation(len(units))]
        self.epoch += 1
        for u in units:
            yield from (int(i) for i in u)


def mirrored(probe: np.ndarray) -> bool:
    """Did a transform mirror the image left↔right? ``probe`` is the transformed column-index ramp
    (1..W; 0 where padding came in): mirrored when it mostly decreases along x."""
    p = np.asarray(probe, np.float32)
    both = (p[:, 1:] > 0) & (p[:, :-1] > 0)
    return float(np.sign(np.diff(p, axis=1))[both].sum()) < 0


def swap_lungs(mask: np.ndarray) -> np.ndarray:
    """Left ↔ right lung labels (the anatomy moved with a mirror; the convention did not)."""
    out = mask.copy()
    out[mask == MaskClass.LEFT_LUNG] = MaskClass.RIGHT_LUNG
    out[mask == MaskClass.RIGHT_LUNG] = MaskClass.LEFT_LUNG
    return out


def collate_fn(batch: list[dict]) -> tuple[torch.Tensor | list[torch.Tensor], list[dict]]:
    """Detection collate: (images stacked (B,1,H,W) — a list if sizes differ, targets list of dicts)."""
    images = [b["image"] for b in batch]
    same = all(im.shape == images[0].shape for im in images)
    targets = [{k: v for k, v in b.items() if k != "image"} for b in batch]
    return (torch.stack(images) if same else images), targets


def _compose(transform):
    """albumentations transforms → a Compose that moves boxes (pascal_voc) and labels with the image."""
    if transform is None:
        return None
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations as A

    if isinstance(transform, A.Compose):
        if "bboxes" not in getattr(transform, "processors", {}):
            raise NoduleSynthError("transform: A.Compose needs bbox_params=A.BboxParams(format='pascal_voc', "
                                   "label_fields=['labels']) so boxes move with the image")
        return transform
    if isinstance(transform, (list, tuple)) or isinstance(transform, A.BasicTransform):
        ts = list(transform) if isinstance(transform, (list, tuple)) else [transform]
        return A.Compose(ts, bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"]))
    raise NoduleSynthError(
        "transform: expected albumentations transforms (a list or A.Compose with "
        "bbox_params=A.BboxParams(format='pascal_voc', label_fields=['labels']))"
    )
