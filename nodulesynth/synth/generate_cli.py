"""Generate synthetic lung-nodule CT slices as a detection dataset (`nodulesynth generate`).

Formats (--format, a comma list): coco, yolo, nifti, mha, dicom, monai (see nodulesynth.export);
one format writes into OUT directly, several into OUT/<format>/. OUT/manifest.json lists every
item (source, split, pixel spacing, boxes, provenance, files). Everything is written into a temp
folder renamed to --out at the end (Ctrl-C, SIGTERM or a failed rank leave nothing); an existing
non-empty --out is refused unless --overwrite.

Dataset order: real slices (--real; with --add-nodules the TRAIN ones carry added LIDC nodules, the
same slices as SyntheticNoduleDataset(real=..., conditions={"add_nodules": True})), synthetic samples
start_index.., mask-in slices (--masks).
Under torchrun each rank writes a contiguous range of that order as a shard and rank 0 merges them
(synth.shard, export.merge): the result equals the single-process run. The validation split
(yolo, monai) holds real slices only, whole patients (SliceRecord.patient, else the series).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import NoduleSynthError
from ..io import atomic_dir, check_out_dir
from ..runtime import resolve_device
from .atlas import MODES as BODY_MODES
from .background import MODES as BACKGROUND_MODES
from .insert import MODES as SYNTHETIC_MODES
from .lung_library import MODES as LUNG_MODES
from .pipeline import GenerationConfig, Synthesizer, validate_masks

MASK_SUFFIXES = (".png", ".npy")
PREVIEW_ITEMS = 8
CLI_NAMES = {"n": "--n", "ratio": "--ratio", "real": "--real DIR"}
AUTO_WORKERS_FROM = 64  # below this many slices per process, worker start-up costs more than it saves


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=None, help="number of synthetic slices (derived from --ratio when mixing)")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty, unless --overwrite)")
    p.add_argument("--format", default="coco",
                   help="comma list of coco, yolo, nifti, mha, dicom, monai (both = coco,yolo); several → OUT/<format>/")
    p.add_argument("--seed", type=int, default=0, help="sample i is a pure function of (weights, seed, i)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--truncation-psi", type=float, default=GenerationConfig.truncation_psi,
                   help="StyleGAN truncation of the anatomy masks: < 1 trades variety for typical anatomy (1 = none)")
    p.add_argument("--lungs", choices=LUNG_MODES, default=GenerationConfig.lungs,
                   help="the lungs' interior: library = real TRAIN lung tiles from the shipped library, quilted; "
                        "texture = the weights' lung texture model; translator = the translator's own")
    p.add_argument("--no-lung-texture", dest="lung_texture", action="store_false",
                   help="keep the translator's own lungs (as --lungs translator)")
    p.add_argument("--background", choices=BACKGROUND_MODES, default=GenerationConfig.background,
                   help="outside the patient: scanner (default) = a real scanner background (table, cushions, air "
                        "noise) from the shipped library; translator = the translator's own")
    p.add_argument("--body", choices=BODY_MODES, default=GenerationConfig.body,
                   help="the body (soft tissue, bone, mediastinum): atlas (default) = a real TRAIN body from the "
                        "shipped atlas, registered onto the anatomy; translator = the translator's own")
    p.add_argument("--no-body-texture", dest="body_texture", action="store_false",
                   help="keep the translator's own body even when the weights hold a body texture model")
    p.add_argument("--no-nodule-texture", dest="nodule_texture", action="store_false",
                   help="keep the translator's own nodules even when the weights hold a nodule texture model")
    p.add_argument("--batch-size", type=int, default=16, help="samples per generation call (speed only, never results); networks run in fixed 16-row blocks")
    p.add_argument("--weights", default="pretrained", help="'pretrained' (shipped), a folder, or a hub repo id")
    p.add_argument("--revision", default=None, help="hub revision of --weights")
    p.add_argument("--real", default=None, help="prepared real slice dataset folder to mix in (nodulesynth prepare)")
    p.add_argument("--ratio", type=float, default=None,
                   help="synthetic:real count ratio with --real (2.0 = twice as many synthetic as real slices)")
    p.add_argument("--synthetic", choices=SYNTHETIC_MODES, default="generated",
                   help="what the --n / --ratio synthetic slices are: generated (TSGAN slices) or inserted (copies of "
                        "--real's TRAIN slices without a nodule, each with LIDC nodules inserted; the real slices stay too)")
    p.add_argument("--masks", default=None, help="translate these label masks (.png/.npy, values 0..5) instead of sampling")
    p.add_argument("--nodules", choices=("lidc", "stylegan"), default="lidc",
                   help="lidc (default): real LIDC-IDRI outlines placed into the generated anatomy, conditions met by "
                        "construction; stylegan: the paper's StyleGAN-drawn nodules, conditions by rejection sampling")
    p.add_argument("--min-size-mm", type=float, default=None, help="every nodule at least this size (longest box side, mm)")
    p.add_argument("--max-size-mm", type=float, default=None, help="every nodule at most this size (longest box side, mm)")
    p.add_argument("--num-nodules", type=int, default=None,
                   help="exact number of nodules per slice; 0 gives nodule-free slices (negatives)")
    p.add_argument("--lung", choices=("left", "right"), default=None, help="every nodule in the patient's left/right lung")
    p.add_argument("--texture", choices=("solid", "part-solid", "ground-glass"), default=None,
                   help="--nodules lidc: LIDC texture class (rating 4-5 solid, 3 part-solid, 1-2 ground-glass)")
    p.add_argument("--min-readers", type=int, choices=(1, 2, 3, 4), default=None,
                   help="--nodules lidc: only nodules that at least N of LIDC's 4 readers outlined (LUNA16 keeps N = 3)")
    p.add_argument("--region", type=float, nargs=4, default=None, metavar=("X0", "Y0", "X1", "Y1"),
                   help="nodule centres inside this box, as fractions of the image width/height")
    p.add_argument("--add-nodules", action="store_true",
                   help="with --masks: place LIDC nodules (the conditions above) into each given mask before translating; "
                        "with --real: into each real TRAIN slice (its own nodules kept; only the new nodules and their "
                        "rim change the scan's pixels; validation slices stay as they are)")
    p.add_argument("--image-format", choices=("png", "png16", "npy"), default="png",
                   help="COCO images: 8-bit lung window [-1000,400] HU (default), 16-bit HU+1024, or int16 HU .npy")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of the REAL patients held out as the yolo/monai validation split (whole patients, "
                        "seeded); synthetic slices are always train; no real data or 0 → no validation split")
    p.add_argument("--workers", type=int, default=None,
                   help="export worker processes (encoding off the generator's back; 0 = inline; default: "
                        "inline for < 64 slices, else half the cores, at least 1)")
    p.add_argument("--place-workers", type=int, default=None,
                   help="processes that place the LIDC nodules while the device translates (never changes the "
                        "samples; default: 0 on CPU, on a GPU min(8, cores per rank − 1))")
    p.add_argument("--start-index", type=int, default=0,
                   help="first synthetic sample index (manual sharding, e.g. a SLURM array: part k gets "
                        "--start-index k·n); merge the parts with `nodulesynth merge`")
    p.add_argument("--preview", action="store_true", help="also write OUT/preview.png (masks, slices, boxes)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")


def _mask_files(folder: str) -> list[Path]:
    d = Path(folder)
    if not d.is_dir():
        raise NoduleSynthError(f"--masks {folder}: not a folder")
    files = sorted(f for f in d.iterdir() if f.suffix.lower() in MASK_SUFFIXES)
    if not files:
        raise NoduleSynthError(f"--masks {folder}: no .png or .npy mask files")
    return files


def _load_mask(path: Path, size: int) -> np.ndarray:
    """One mask file → uint8 (B,H,W) (a .npy may hold a batch)."""
    from PIL import Image

    try:
        arr = np.load(path, allow_pickle=False) if path.suffix.lower() == ".npy" else np.asarray(Image.open(path))
    except Exception as e:  # unreadable file → one clear line
        raise NoduleSynthError(f"--masks {path}: cannot read ({e})") from e
    if arr.ndim == 3 and path.suffix.lower() == ".png":
        raise NoduleSynthError(f"--masks {path}: expected a single-channel label PNG (values 0..5), got {arr.shape}")
    return validate_masks(arr, size, name=f"--masks {path}").numpy()


def _check_args(args: argparse.Namespace) -> tuple[str, ...]:
    """Argument checks that need no file; returns the parsed --format list."""
    from ..export.writer import parse_formats
    from .dataset import check_mix

    if args.masks is not None and (args.ratio is not None or args.n is not None):
        raise NoduleSynthError("--masks: translates every mask in the folder; do not combine it with --n or --ratio")
    if args.masks is None:
        check_mix(args.n, args.ratio, args.real is not None, CLI_NAMES)
    if args.batch_size < 1:
        raise NoduleSynthError(f"--batch-size: must be ≥ 1, got {args.batch_size}")
    if args.seed < 0:
        raise NoduleSynthError(f"--seed: must be ≥ 0, got {args.seed}")
    if not 0 <= args.val_fraction < 1:
        raise NoduleSynthError(f"--val-fraction: must be in [0, 1), got {args.val_fraction}")
    for flag, v in (("--workers", args.workers), ("--place-workers", args.place_workers)):
        if v is not None and v < 0:
            raise NoduleSynthError(f"{flag}: must be ≥ 0, got {v}")
    formats = parse_formats(args.format)
    if "yolo" in formats and args.image_format != "png":
        raise NoduleSynthError("--image-format: YOLO datasets use 8-bit PNG; png16/npy only apply to COCO")
    if args.num_nodules is not None and args.num_nodules < 0:
        raise NoduleSynthError(f"--num-nodules: must be ≥ 0 (0: nodule-free slices), got {args.num_nodules}")
    if args.real is not None and not Path(args.real).is_dir():
        raise NoduleSynthError(f"--real {args.real}: not a folder (expected a dataset written by `nodulesynth prepare`)")
    if args.start_index < 0:
        raise NoduleSynthError(f"--start-index: must be ≥ 0, got {args.start_index}")
    if args.synthetic == "inserted" and (args.real is None or args.masks is not None):
        raise NoduleSynthError("--synthetic inserted: needs --real DIR (its TRAIN slices without a nodule get the "
                               "nodules) and no --masks")
    if args.add_nodules and args.real is None and args.masks is None:
        raise NoduleSynthError("--add-nodules: needs --real DIR or --masks DIR (the slices that get the nodules); "
                               "generated slices always have them (--num-nodules sets how many)")
    if args.start_index and (args.real is not None or args.masks is not None):
        raise NoduleSynthError("--start-index: shards synthetic samples only; mix --real / translate --masks in one "
                               "run without --start-index (merge accepts it as a part)")
    return formats


def patient_of(record) -> str:
    """Who a real slice belongs to: SliceRecord.patient when the data records it, else its series."""
    return str(getattr(record, "patient", None) or getattr(record, "series_uid", "") or "unknown")


def patient_split(records, fraction: float, seed: int) -> tuple[set[int], set[int], dict]:
    """(validation indices, left-out indices, description) of the real slices; whole patients only.

    When the real data records its own patient split (``prepare --split-fractions``), it is used as
    is: its val patients are the validation split and its test patients' slices are left out of the
    dataset (they are for the final evaluation). Otherwise ``round(fraction · patients)`` patients
    (at least one, never all) chosen by ``seed`` are held out as validation."""
    patients = sorted({patient_of(r) for r in records})
    rule = "real slices only, whole patients (SliceRecord.patient, else series_uid); synthetic slices are train"
    if records and all(getattr(r, "split", "") in ("train", "val", "test") for r in records):
        val = {i for i, r in enumerate(records) if r.split == "val"}
        test = {i for i, r in enumerate(records) if r.split == "test"}
        return val, test, {"rule": "the real data's own patient split (prepare): val patients validate, test "
                                   "patients' slices are left out; synthetic slices are train",
                           "n_val": len(val), "val_patients": sorted({patient_of(records[i]) for i in val}),
                           "n_test_left_out": len(test), "test_patients": sorted({patient_of(records[i]) for i in test}),
                           **({} if val else {"none_because": "the real data's split has no val patients"})}
    if fraction <= 0 or not records:
        why = "--val-fraction 0" if records else "no real slices (--real)"
        return set(), set(), {"rule": rule, "n_val": 0, "val_patients": [], "none_because": why}
    if len(patients) < 2:
        return set(), set(), {"rule": rule, "n_val": 0, "val_patients": [],
                              "none_because": f"only one real patient ({patients[0]}); none can be held out"}
    k = min(max(1, int(round(fraction * len(patients)))), len(patients) - 1)
    rng = np.random.default_rng(seed)
    val_patients = sorted(patients[i] for i in rng.permutation(len(patients))[:k])
    chosen = set(val_patients)
    val = {i for i, r in enumerate(records) if patient_of(r) in chosen}
    return val, set(), {"rule": rule, "n_val": len(val), "val_patients": val_patients, "val_fraction": fraction}


@dataclasses.dataclass
class Plan:
    """What the whole dataset holds, in order; the same in every rank."""

    real: object | None
    real_idx: list[int]  # the real slices used, in order (a recorded test split is left out)
    n_synth: int
    start_index: int
    masks: list[tuple[str, np.ndarray]]  # (output name, (H,W) mask) per mask-in slice
    val: set[int]
    spacing_mm: tuple[float, float]  # synthetic / mask-in slices
    preview: bool
    add_nodules: bool = False  # real TRAIN slices get LIDC nodules (validation slices never)
    inserted: object | None = None  # --synthetic inserted: the InsertionSource the synthetic samples come from

    @property
    def n_real(self) -> int:
        return len(self.real_idx)

    @property
    def total(self) -> int:
        return self.n_real + self.n_synth + len(self.masks)


@dataclasses.dataclass
class Part:
    records: list
    preview: list
    gate: dict
    counts: dict


def _write_part(plan: Plan, synth: Synthesizer, positions: range, writer, batch_size: int, bar) -> Part:
    """Generate and export the dataset positions ``positions`` (a contiguous range) through ``writer``."""
    from ..export.merge import COUNTS
    from ..export.writer import ExportItem
    from .dataset import real_provenance
    from .insert import add_to_real_slices

    preview: list = []
    counts = dict.fromkeys(COUNTS, 0)
    only_real = plan.n_synth + len(plan.masks) == 0

    def emit(pos: int, name: str, hu, mask, boxes, source: str, spacing, prov: dict) -> None:
        split = "val" if source == "real" and prov["index"] in plan.val else "train"
        writer.add(ExportItem(name, hu, mask, np.asarray(boxes, np.float32).reshape(-1, 4), source,
                              tuple(float(v) for v in spacing), prov, split, plan.start_index + pos))
        counts[{"real": "n_real", "synthetic": "n_synthetic", "inserted": "n_inserted", "mask-in": "n_mask_in"}[source]] += 1
        if plan.preview and len(preview) < PREVIEW_ITEMS and (source != "real" or only_real or "nodules" in prov):
            preview.append((hu, mask, boxes))
        bar.update(1)

    lo, hi = positions.start, positions.stop
    r0, r1 = max(lo, 0), min(hi, plan.n_real)
    for c in range(r0, max(r0, r1), batch_size):
        ks = range(c, min(c + batch_size, r1))
        items = [plan.real[plan.real_idx[k]] for k in ks]
        hus = [np.asarray(it["image_hu"]) for it in items]
        masks = [np.asarray(it["mask"]) for it in items]
        boxes = [it["boxes"] for it in items]
        provs = [real_provenance(it["record"], plan.real_idx[k]) for k, it in zip(ks, items)]
        add = [j for j, k in enumerate(ks) if plan.add_nodules and plan.real_idx[k] not in plan.val]
        if add:  # named as the Dataset names them, so both give the same slices
            rows = [plan.real_idx[ks[j]] for j in add]
            b = add_to_real_slices(synth, plan.real, rows, [f"real{r}" for r in rows])
            hu_new = b.images_hu.round().short().numpy()
            for q, j in enumerate(add):
                hus[j], masks[j], boxes[j], provs[j] = hu_new[q], b.masks[q].numpy(), b.boxes[q], b.provenance[q]
                counts["n_real_no_room" if "no_room" in provs[j] else "n_real_nodules_added"] += 1
        for j, k in enumerate(ks):
            i = plan.real_idx[k]
            emit(k, f"real_{i:06d}", hus[j], masks[j], boxes[j], "real", tuple(items[j]["record"].spacing_mm), provs[j])
    s0, s1 = max(lo, plan.n_real) - plan.n_real, min(hi, plan.n_real + plan.n_synth) - plan.n_real
    for s in range(s0, max(s0, s1), batch_size):
        idx = range(plan.start_index + s, plan.start_index + min(s + batch_size, s1))
        b = synth.generate(idx) if plan.inserted is None else plan.inserted.generate(synth, idx)
        hu = b.images_hu.round().short().numpy()
        kind, stem = ("synthetic", "synth") if plan.inserted is None else ("inserted", "insert")
        for k, prov in enumerate(b.provenance):
            emit(plan.n_real + s + k, f"{stem}_{prov['index']:06d}", hu[k], b.masks[k].numpy(), b.boxes[k],
                 kind, plan.spacing_mm, prov)
    m_off = plan.n_real + plan.n_synth
    m0, m1 = max(lo, m_off) - m_off, min(hi, plan.total) - m_off
    for s in range(m0, max(m0, m1), batch_size):
        chunk = plan.masks[s : min(s + batch_size, m1)]
        b = synth.translate(np.stack([m for _, m in chunk]), [n for n, _ in chunk])
        hu = b.images_hu.round().short().numpy()
        for k, prov in enumerate(b.provenance):
            prov["index"] = s + k  # ordinal among the mask-in slices (translate counts per call)
            emit(m_off + s + k, f"mask_{chunk[k][0]}", hu[k], b.masks[k].numpy(), b.boxes[k], "mask-in",
                 plan.spacing_mm, prov)
    records = writer.drain()
    st = synth.stats
    gate = {"attempts": st.attempts, "accepted": st.accepted, "rejected": dict(sorted(st.rejected.items()))}
    return Part(records, preview, gate, counts)


def _header(args, formats, tsgan, cfg: GenerationConfig, plan: Plan, validation: dict, part: Part) -> dict:
    """manifest.json header (and the COCO info / data.yaml / datalist facts) of a dataset or shard."""
    from .. import __version__
    from ..export.merge import gate_summary
    from ..hu import LUNG_WINDOW

    config = cfg.decisive()
    return {
        "version": __version__, "source": "nodulesynth generate",
        "weights": str(getattr(tsgan, "source", args.weights)), "revision": str(getattr(tsgan, "revision", "")),
        "seed": args.seed, "config": config, "block": cfg.block, "formats": list(formats),
        "image_format": args.image_format, "val_fraction": args.val_fraction, "validation": validation,
        "pixel_spacing_mm": list(plan.spacing_mm),
        "pixel_spacing_note": "[row, col] mm; synthetic and mask-in slices use the model's spacing, real slices "
                              "keep their own (per item)",
        "window_hu": list(LUNG_WINDOW) if args.image_format == "png" or "yolo" in formats else None,
        "start_index": args.start_index, **part.counts,
        "quality_gate": gate_summary(part.gate), "quality_gate_counts": part.gate,
    }


def _workers(args, n: int) -> int:
    if args.workers is not None:
        return args.workers
    return 0 if n < AUTO_WORKERS_FROM else max(1, (os.cpu_count() or 2) // 2)


def run(args: argparse.Namespace) -> int:
    from . import shard

    formats = _check_args(args)
    dist = shard.from_env()
    sync = False
    try:
        rc = _run(args, formats, dist)
        sync = True
        return rc
    except NoduleSynthError:  # raised on every rank, after the same collectives
        sync = True
        raise
    finally:
        shard.close(dist, sync)


def _run(args: argparse.Namespace, formats: tuple[str, ...], dist) -> int:
    from tqdm.auto import tqdm

    from .. import __version__
    from ..export.dicom import DicomContext
    from ..export.merge import PREVIEW_NPZ
    from ..export.writer import DatasetWriter, ExportSpec, finalize, save_preview
    from .dataset import check_real_size, check_real_spacing, load_tsgan, mixed_counts, open_real

    device = resolve_device(args.device)
    if dist.world > 1 and device.type == "cuda" and device.index is None:
        device = resolve_device(f"cuda:{dist.local_rank}")
    inputs = [("--masks", args.masks), ("--real", args.real)]
    if str(args.weights) == "pretrained":
        from ..models.tsgan import DEFAULT_WEIGHTS_DIR

        inputs.append(("--weights", DEFAULT_WEIGHTS_DIR))
    elif Path(args.weights).expanduser().exists():  # a local weights folder, not a hub id
        inputs.append(("--weights", args.weights))
    out = check_out_dir(args.out, args.overwrite, inputs=inputs)
    cfg = GenerationConfig(seed=args.seed, batch_size=args.batch_size, min_size_mm=args.min_size_mm,
                           max_size_mm=args.max_size_mm, num_nodules=args.num_nodules, nodules=args.nodules,
                           lung=args.lung, texture=args.texture, min_readers=args.min_readers,
                           region=tuple(args.region) if args.region else None,
                           add_nodules=args.add_nodules, truncation_psi=args.truncation_psi,
                           place_workers=args.place_workers, lung_texture=args.lung_texture,
                           body_texture=args.body_texture, nodule_texture=args.nodule_texture,
                           background=args.background, body=args.body, lungs=args.lungs)
    cfg.validate()
    mask_files = _mask_files(args.masks) if args.masks else []
    real = open_real(args.real) if args.real else None
    val, left_out, validation = patient_split(real.records if real is not None else [], args.val_fraction, args.seed)
    real_idx = [i for i in range(len(real))] if real is not None else []
    real_idx = [i for i in real_idx if i not in left_out]
    n_real = len(real_idx)
    n_synth = 0 if mask_files else mixed_counts(args.n, n_real, args.ratio, real is not None, CLI_NAMES)

    tsgan = load_tsgan(args.weights, device, args.revision)
    synth = Synthesizer(tsgan, cfg)
    size = synth.image_size
    if dist.rank == 0:
        print(f"weights: {getattr(tsgan, 'source', args.weights)} (revision {getattr(tsgan, 'revision', 'unknown')}) "
              f"on {device}, {size}×{size}" + (f", {dist.world} ranks" if dist.world > 1 else "")
              + (f", {synth.place_workers} nodule placement workers" if synth.place_workers else ""))
    stems = [f.stem for f in mask_files]
    clash = sorted({x for x in stems if stems.count(x) > 1})
    if clash:
        raise NoduleSynthError(f"--masks {args.masks}: several files share the name(s) {clash} (e.g. a.png and a.npy); "
                               "their outputs would overwrite each other")
    masks: list[tuple[str, np.ndarray]] = []
    for f in mask_files:  # validate every file before writing anything
        m = _load_mask(f, size)
        masks += [(f.stem if len(m) == 1 else f"{f.stem}_{j:04d}", m[j]) for j in range(len(m))]
    check_real_size(real, size, f"--real {args.real}")
    spacing = float(synth.spacing_mm)
    add_real = bool(args.add_nodules and real is not None)
    if add_real:
        check_real_spacing(real, [i for i in real_idx if i not in val], spacing, f"--real {args.real}")
    inserted = None
    if args.synthetic == "inserted" and n_synth:
        from .insert import InsertionSource

        inserted = InsertionSource.from_real(real, [i for i in real_idx if i not in val], spacing, f"--real {args.real}")
    plan = Plan(real, real_idx, n_synth, args.start_index, masks, val, (spacing, spacing), args.preview, add_real,
                inserted)
    if dist.rank == 0 and left_out:
        print(f"note: {len(left_out)} real slices of the test patients {validation['test_patients']} are left out "
              "(the real data's own split keeps them for the final evaluation)", file=sys.stderr)
    if dist.rank == 0 and not validation["n_val"] and {"yolo", "monai"} & set(formats):
        print(f"note: no validation split ({validation['none_because']}); synthetic slices are never used for "
              "validation: bring held-out real patients' slices to validate", file=sys.stderr)

    positions = dist.positions(plan.total)
    workers = _workers(args, len(positions))
    date = _dt.date.today().strftime("%Y%m%d")
    t0 = time.perf_counter()
    desc = "generate" if dist.world == 1 else f"generate (rank 0 of {dist.world})"
    done = [0]

    def write(base: Path, spec: ExportSpec) -> Part:
        writer = DatasetWriter(base, spec, workers)
        try:
            with tqdm(total=len(positions), unit="img", desc=desc, dynamic_ncols=True, disable=dist.rank != 0) as bar:
                return _write_part(plan, synth, positions, writer, args.batch_size, bar)
        finally:
            done[0] = len(writer.records)
            writer.close()
            synth.close()

    def spec_for(day: str) -> ExportSpec:
        # what decides the samples (never batch_size): the DICOM UIDs' entropy
        decisive = sorted(cfg.decisive().items())
        key = f"{getattr(tsgan, 'revision', '')}|{decisive}"
        ctx = DicomContext(key, str(getattr(tsgan, "source", args.weights)), str(getattr(tsgan, "revision", "")),
                           __version__, day)
        return ExportSpec(formats, args.image_format, ctx if "dicom" in formats else None)

    progress = lambda: done[0] / max(plan.total, 1)  # noqa: E731 (disk-full estimate of atomic_dir)
    if dist.world == 1:
        with atomic_dir(out, args.overwrite, inputs=inputs, progress=progress) as tmp:
            spec = spec_for(date)
            part = write(tmp, spec)
            header = _header(args, formats, tsgan, cfg, plan, validation, part)
            finalize(tmp, spec, part.records, header, out, part.preview)
    else:
        def shard_work(info: dict) -> Exception | None:
            """Write this rank's shard inside rank 0's temp folder; an error is returned, to be told to all."""
            try:
                shard_dir = Path(info["tmp"]) / ".shards" / f"rank-{dist.rank:05d}"
                shard_dir.mkdir(parents=True, exist_ok=False)
                spec = spec_for(info["date"])
                part = write(shard_dir, spec)
                finalize(shard_dir, spec, part.records, _header(args, formats, tsgan, cfg, plan, validation, part), out)
                save_preview(shard_dir / PREVIEW_NPZ, part.preview)
            except Exception as e:  # Ctrl-C / SIGTERM are not caught: torchrun stops every rank
                return e
            return None

        header = _run_sharded(dist, out, lambda: atomic_dir(out, args.overwrite, inputs=inputs, progress=progress),
                              date, shard_work)
        if dist.rank != 0:
            return 0
    elapsed = time.perf_counter() - t0
    inserted = f"{header['n_inserted']} inserted, " if header.get("n_inserted") else ""
    print(f"wrote {plan.total} slices ({header['n_synthetic']} synthetic, {inserted}{header['n_real']} real, "
          f"{header['n_mask_in']} mask-in) to {out} in {elapsed:.1f} s ({plan.total / max(elapsed, 1e-9):.2f} img/s); "
          f"quality gate: {header['quality_gate']}")
    return 0


def _run_sharded(dist, out: Path, make_tmp, date: str, shard_work) -> dict | None:
    """torchrun: rank 0 owns the temp folder; every rank writes its shard inside it; rank 0 merges
    only when every rank succeeded, else the temp folder goes and every rank fails. Every rank makes
    the same three collectives (temp path, outcomes, final result) so none is left waiting."""
    from ..export.merge import merge_datasets

    if dist.rank != 0:
        info = dist.broadcast(None)
        if info is None:
            raise NoduleSynthError(f"rank 0 could not start the output folder {out}; nothing was written")
        error = shard_work(info)
        dist.all_gather(None if error is None else f"rank {dist.rank}: {error}")
        result = dist.broadcast(None)
        if error is not None:
            raise error
        if result:
            raise NoduleSynthError(result)
        return None
    stage = 0
    try:
        with make_tmp() as tmp:
            info = {"tmp": str(tmp), "date": date}
            dist.broadcast(info)
            stage = 1
            error = shard_work(info)
            failed = [f for f in dist.all_gather(None if error is None else f"rank 0: {error}") if f]
            stage = 2
            if error is not None:
                raise error
            if failed:
                raise NoduleSynthError("; ".join(failed) + f" (nothing was written to {out})")
            header = merge_datasets(sorted((tmp / ".shards").iterdir()), tmp, out, move=True)
            shutil.rmtree(tmp / ".shards")
    except Exception as e:
        if stage == 0:
            dist.broadcast(None)
        elif stage == 2:
            dist.broadcast(str(e) or type(e).__name__)
        raise
    dist.broadcast(None)
    return header
