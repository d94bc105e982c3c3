"""Generate synthetic lung-nodule CT slices as a COCO and/or YOLO dataset (`nodulesynth generate`).

Writes into a temp folder renamed to --out at the end (Ctrl-C leaves nothing); an existing
non-empty --out is refused unless --overwrite. Layout: --format coco → OUT/images + annotations.json;
yolo → OUT/images/{train,val}, labels/, data.yaml; both → OUT/coco and OUT/yolo. OUT/manifest.json
lists every item's provenance; --preview adds OUT/preview.png.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from ..errors import NoduleSynthError
from ..io import atomic_dir, check_out_dir, write_json
from ..runtime import resolve_device
from .pipeline import GenerationConfig, Synthesizer, validate_masks

MASK_SUFFIXES = (".png", ".npy")
PREVIEW_ITEMS = 8


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=None, help="number of synthetic slices (derived from --ratio when mixing)")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty, unless --overwrite)")
    p.add_argument("--format", choices=("coco", "yolo", "both"), default="coco")
    p.add_argument("--seed", type=int, default=0, help="sample i is a pure function of (weights, seed, i)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, default=16, help="samples per generation call (speed only, never results); networks run in fixed 16-row blocks")
    p.add_argument("--weights", default="pretrained", help="'pretrained' (shipped), a folder, or a hub repo id")
    p.add_argument("--revision", default=None, help="hub revision of --weights")
    p.add_argument("--real", default=None, help="prepared real slice dataset folder to mix in (nodulesynth prepare)")
    p.add_argument("--ratio", type=float, default=None,
                   help="synthetic:real count ratio with --real (2.0 = twice as many synthetic as real slices)")
    p.add_argument("--masks", default=None, help="translate these label masks (.png/.npy, values 0..5) instead of sampling")
    p.add_argument("--min-size-mm", type=float, default=None, help="every nodule at least this size (rejection sampling)")
    p.add_argument("--max-size-mm", type=float, default=None, help="every nodule at most this size (rejection sampling)")
    p.add_argument("--num-nodules", type=int, default=None, help="exact number of nodules per slice (rejection sampling)")
    p.add_argument("--image-format", choices=("png", "png16", "npy"), default="png",
                   help="COCO images: 8-bit lung window [-1000,400] HU (default), 16-bit HU+1024, or int16 HU .npy")
    p.add_argument("--val-fraction", type=float, default=0.1, help="YOLO validation share (random, seeded)")
    p.add_argument("--workers", type=int, default=None, help="image encoding threads (default: all cores)")
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


def _check_args(args: argparse.Namespace) -> None:
    if args.masks is None and args.ratio is None and (args.n is None or args.n <= 0):
        raise NoduleSynthError(f"--n: must be a positive number of slices, got {args.n}")
    if args.n is not None and args.n <= 0 and not (args.real and args.n == 0):
        raise NoduleSynthError(f"--n: must be > 0, got {args.n}")
    if args.ratio is not None:
        if args.real is None:
            raise NoduleSynthError("--ratio: needs --real DIR (it is the synthetic:real count ratio)")
        if not (np.isfinite(args.ratio) and args.ratio > 0):
            raise NoduleSynthError(f"--ratio: must be > 0, got {args.ratio}")
    if args.masks is not None and (args.ratio is not None or args.n is not None):
        raise NoduleSynthError("--masks: translates every mask in the folder; do not combine it with --n or --ratio")
    if args.batch_size < 1:
        raise NoduleSynthError(f"--batch-size: must be ≥ 1, got {args.batch_size}")
    if args.seed < 0:
        raise NoduleSynthError(f"--seed: must be ≥ 0, got {args.seed}")
    if not 0 <= args.val_fraction < 1:
        raise NoduleSynthError(f"--val-fraction: must be in [0, 1), got {args.val_fraction}")
    if args.workers is not None and args.workers < 1:
        raise NoduleSynthError(f"--workers: must be ≥ 1, got {args.workers}")
    if args.format in ("yolo",) and args.image_format != "png":
        raise NoduleSynthError("--image-format: YOLO datasets use 8-bit PNG; png16/npy only apply to COCO")
    if args.num_nodules is not None and args.num_nodules < 1:
        raise NoduleSynthError(f"--num-nodules: must be ≥ 1, got {args.num_nodules}")
    if args.real is not None and not Path(args.real).is_dir():
        raise NoduleSynthError(f"--real {args.real}: not a folder (expected a dataset written by `nodulesynth prepare`)")


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .. import __version__
    from ..export.coco import CocoWriter, ParallelEncoder
    from ..export.yolo import YoloWriter
    from ..viz import preview_grid
    from .dataset import load_tsgan, mixed_counts, open_real

    _check_args(args)
    device = resolve_device(args.device)
    inputs = [("--masks", args.masks), ("--real", args.real)]
    if str(args.weights) == "pretrained":
        from ..models.tsgan import DEFAULT_WEIGHTS_DIR

        inputs.append(("--weights", DEFAULT_WEIGHTS_DIR))
    elif Path(args.weights).expanduser().exists():  # a local weights folder, not a hub id
        inputs.append(("--weights", args.weights))
    out = check_out_dir(args.out, args.overwrite, inputs=inputs)
    cfg = GenerationConfig(seed=args.seed, batch_size=args.batch_size, min_size_mm=args.min_size_mm,
                           max_size_mm=args.max_size_mm, num_nodules=args.num_nodules)
    cfg.validate()
    mask_files = _mask_files(args.masks) if args.masks else []
    real = open_real(args.real) if args.real else None
    n_real = len(real) if real is not None else 0
    n_synth = 0 if mask_files else mixed_counts(args.n, n_real, args.ratio, real is not None)

    tsgan = load_tsgan(args.weights, device, args.revision)
    synth = Synthesizer(tsgan, cfg)
    size = synth.image_size
    print(f"weights: {getattr(tsgan, 'source', args.weights)} (revision {getattr(tsgan, 'revision', 'unknown')}) "
          f"on {device}, {size}×{size}")
    stems = [f.stem for f in mask_files]
    clash = sorted({x for x in stems if stems.count(x) > 1})
    if clash:
        raise NoduleSynthError(f"--masks {args.masks}: several files share the name(s) {clash} (e.g. a.png and a.npy); "
                               "their outputs would overwrite each other")
    masks_in = [(f, _load_mask(f, size)) for f in mask_files]  # validate every file before writing anything
    n_masks = sum(len(m) for _, m in masks_in)
    if real is not None and tuple(real.images.shape[1:]) != (size, size):
        raise NoduleSynthError(f"--real {args.real}: slices are {real.images.shape[1]}×{real.images.shape[2]}, "
                               f"the model generates {size}×{size}")
    total = n_real + n_synth + n_masks
    rng = np.random.default_rng(args.seed)
    val = set(rng.permutation(total)[: int(round(args.val_fraction * total))].tolist()) if args.format != "coco" else set()
    info = {"weights": str(getattr(tsgan, "source", args.weights)), "revision": str(getattr(tsgan, "revision", "")),
            "seed": args.seed, "source": "nodulesynth generate", "n_synthetic": n_synth, "n_real": n_real,
            "n_mask_in": n_masks, "block": cfg.block}

    manifest: list[dict] = []
    with atomic_dir(out, args.overwrite, inputs=inputs, progress=lambda: len(manifest) / max(total, 1)) as tmp:
        encoder = ParallelEncoder(args.workers)
        try:
            coco_root = tmp / "coco" if args.format == "both" else tmp
            yolo_root, yolo_final = ((tmp / "yolo", out / "yolo") if args.format == "both" else (tmp, out))
            coco = CocoWriter(coco_root, args.image_format, info, encoder) if args.format != "yolo" else None
            yolo = YoloWriter(yolo_root, yolo_final, encoder) if args.format != "coco" else None
            preview = []
            t0 = time.perf_counter()

            def emit(name, hu, mask, boxes, source, prov):
                k = len(manifest)
                split = "val" if k in val else "train"
                extra = {"source": source, "seed": prov.get("seed"), "index": prov.get("index"), "provenance": prov}
                if coco is not None:
                    coco.add(name, hu, mask, boxes, extra)
                if yolo is not None:
                    yolo.add(name, hu, boxes, split)
                manifest.append({"name": name, "split": split if yolo else None, **extra})
                if len(preview) < PREVIEW_ITEMS and args.preview and (source != "real" or n_synth + n_masks == 0):
                    preview.append((hu, mask, boxes))
                bar.update(1)

            with tqdm(total=total, unit="img", desc="generate", dynamic_ncols=True) as bar:
                for k in range(n_real):
                    it = real[k]
                    rec = it["record"]
                    prov = {"source": str(getattr(rec, "source", "real")), "series_uid": str(getattr(rec, "series_uid", "")),
                            "z_mm": float(getattr(rec, "z_mm", float("nan"))), "index": k}
                    emit(f"real_{k:06d}", np.asarray(it["image_hu"]), np.asarray(it["mask"]),
                         np.asarray(it["boxes"], np.float32), "real", prov)
                for s in range(0, n_synth, args.batch_size):
                    b = synth.generate(range(s, min(s + args.batch_size, n_synth)))
                    hu = b.images_hu.round().short().numpy()
                    for k, prov in enumerate(b.provenance):
                        emit(f"synth_{prov['index']:06d}", hu[k], b.masks[k].numpy(), b.boxes[k], "synthetic", prov)
                for f, m in masks_in:
                    for s in range(0, len(m), args.batch_size):
                        part = m[s : s + args.batch_size]
                        names = [f.stem if len(m) == 1 else f"{f.stem}_{s + k:04d}" for k in range(len(part))]
                        b = synth.translate(part, names)
                        hu = b.images_hu.round().short().numpy()
                        for k, prov in enumerate(b.provenance):
                            emit(f"mask_{names[k]}", hu[k], b.masks[k].numpy(), b.boxes[k], "mask-in", prov)
                encoder.wait()
            elapsed = time.perf_counter() - t0
            gate = synth.stats.summary() if n_synth else "not applied"
            if coco is not None:
                coco.close({"quality_gate": gate})
            if yolo is not None:
                yolo.close()
            if preview:
                preview_grid(tmp / "preview.png", [p[0] for p in preview], [p[1] for p in preview], [p[2] for p in preview])
            write_json(tmp / "manifest.json", {"version": __version__, **info, "format": args.format,
                                               "image_format": args.image_format, "quality_gate": gate,
                                               "items": manifest})
        finally:
            encoder.close()
    print(f"wrote {total} slices ({n_synth} synthetic, {n_real} real, {n_masks} mask-in) to {out} "
          f"in {elapsed:.1f} s ({total / max(elapsed, 1e-9):.2f} img/s); quality gate: {gate}")
    return 0
