"""CPU recipe: retrain both TSGAN stages on the prepared real corpus, whole patients held out.

    python benchmarks/retrain.py --prepared prepared --out runs/retrain --minutes 40
    python benchmarks/retrain.py --prepared prepared --out RUN2 --stage translator --preset paper \
        --masks-run runs/retrain/masks          # another translator preset, same mask StyleGAN

Data: ``nodulesynth prepare`` folders under --prepared that carry patient-level splits; only their
TRAIN split is used (the trainers' default), so val/test patients stay unseen for evaluation.
  full slices (512², 0.8 mm): tcga, pyradiomics, lidc-sample → stage 1 (all slices) and stage 2
  nodule crops (128², native spacing): lidc-crops           → stage 2 only (not whole anatomy)
Stage 2 rescales every slice to --spacing mm, takes random --crop crops and draws the folders in
the --weights shares (default: half full slices, half crops; among full slices every train
patient equally likely, so a one-patient volume does not weigh like 28 TCGA patients).
Stage 1 trains the anatomy mask StyleGAN on all full slices at --mask-res, patients equally
likely (nodules come from the LIDC library at generation time, so slices without nodules are
anatomy data too).

Each stage gets --minutes of wall time: a few calibration steps (through the trainers' hooks)
measure the step time, the schedule (translator epochs; mask steps per level) is sized so that
the LR decay / progressive growing end inside the budget, and the trainers' time budget stops the
run as a safety net. Writes OUT/masks/ and OUT/translator/ (runs: checkpoints, samples,
metrics.csv), OUT/weights/ (a TSGAN folder, fp16, loadable by ``TSGAN.from_pretrained``) and
OUT/recipe.json (arguments, calibration, data per folder: slices and patients used).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

SLICE_SETS = ("tcga", "pyradiomics", "lidc-sample")
CROP_SETS = ("lidc-crops",)


def _folders(root: Path, names) -> list[str]:
    return [str(root / n) for n in names if (root / n / "index.json").is_file()]


def calibrate(trainer, steps: int, warmup: int = 2, known: float | None = None) -> float:
    """Seconds per training step, timed through the stage hooks in a scratch folder (nothing of
    the real run is touched). Includes data loading. With ``known`` only the data side is set up
    (steps per epoch) and ``known`` is returned."""
    from nodulesynth.train import engine

    with tempfile.TemporaryDirectory() as tmp:
        trainer.out = Path(tmp)
        trainer.setup()
        if known:
            return known
        engine.seed_everything(trainer.cfg.seed)
        trainer.build()
        times, last = [], time.monotonic()
        for k, batch in enumerate(trainer.batches(0, warmup + steps)):
            trainer.train_step(batch)
            now = time.monotonic()
            if k >= warmup:
                times.append(now - last)
            last = now
    return sorted(times)[len(times) // 2]


def translator_config(args, data: list[str], weights: str):
    from nodulesynth.train.translator import preset_config

    model = {"ngf": args.ngf, "ndf": args.ndf, "num_downs": args.num_downs, "dwmh_depth": min(5, args.num_downs)}
    return preset_config(args.preset, model=model, data=data, data_weights=weights, out=str(args.out / "translator"),
                         spacing_mm=args.spacing if args.crop and args.spacing > 0 else None, crop_size=args.crop,
                         init_weights=args.init_weights, batch_size=args.batch, lr=args.lr,
                         num_workers=args.workers, checkpoint_every=args.checkpoint_every, log_every=25,
                         seed=args.seed, device=args.device, overwrite=args.overwrite, resume=args.resume)


def train_translator_stage(args, data: list[str], weights: str) -> dict:
    from nodulesynth.train.translator import TranslatorTrainer, train_translator

    cfg = translator_config(args, data, weights)
    probe = TranslatorTrainer(translator_config(args, data, weights))
    sec = calibrate(probe, args.calibration_steps, known=args.step_seconds)
    budget = args.minutes * 60
    steps = max(1, int(budget * 0.92 / sec))  # leave room for checkpoints, previews, export
    saved = _saved(Path(cfg.out), "epochs") if args.resume else None
    cfg.epochs = saved[0] if saved else max(1, round(steps / probe.steps_per_epoch))
    cfg.time_budget_s = budget
    print(f"translator: {sec:.3f} s/step, {probe.steps_per_epoch} steps/epoch → {cfg.epochs} epochs "
          f"({cfg.epochs * probe.steps_per_epoch} steps) in {args.minutes} min", flush=True)
    run = train_translator(cfg)
    return {"seconds_per_step": sec, "epochs": cfg.epochs, "steps_per_epoch": probe.steps_per_epoch,
            "run": str(run), "data": probe.sources.summary()}


def mask_config(args, data: list[str]):
    from nodulesynth.models.stylegan import MaskGANConfig
    from nodulesynth.train.masks import MaskTrainConfig

    model = MaskGANConfig(resolution=args.mask_res, z_dim=512, fmap_base=512, fmap_max=64, fmap_min=8)
    return MaskTrainConfig(data=data, out=str(args.out / "masks"), model=model, nodule_only=False,
                           data_weights=default_weights(data, []),  # each train patient equally likely
                           batch_sizes=(32, 32, 32, 16, 16, 8), steps_per_level=100, sample_every=500,
                           eval_samples=64, checkpoint_every=args.checkpoint_every, log_every=25, seed=args.seed,
                           device=args.device, overwrite=args.overwrite, resume=args.resume)


def _saved(run: Path, *keys: str) -> list | None:
    """Schedule fields of an existing run's config.json (a resumed run keeps its schedule)."""
    path = run / "config.json"
    if not path.is_file():
        return None
    cfg = json.loads(path.read_text())
    return [cfg[k] for k in keys]


def train_mask_stage(args, data: list[str]) -> dict:
    from nodulesynth.train.masks import MaskTrainer, train_masks

    cfg = mask_config(args, data)
    saved = _saved(Path(cfg.out), "steps_per_level", "final_level_steps", "sample_every") if args.resume else None
    probe = MaskTrainer(mask_config(args, data))
    per_level = calibrate_levels(probe, args.calibration_steps)
    if saved:
        cfg.steps_per_level, cfg.final_level_steps, cfg.sample_every = saved
    else:
        final_share = 3  # the target resolution gets 3× the steps of each lower level
        budget = args.minutes * 60 * 0.92
        spl = max(2, int(budget / (sum(per_level[:-1]) + final_share * per_level[-1])))
        cfg.steps_per_level, cfg.final_level_steps = spl, final_share * spl
        cfg.sample_every = max(50, spl // 2)
    cfg.time_budget_s = args.minutes * 60
    print(f"masks: s/step per level {[round(t, 3) for t in per_level]} → {cfg.steps_per_level} steps per level, "
          f"{cfg.final_level_steps} at {args.mask_res}² in {args.minutes} min", flush=True)
    run = train_masks(cfg)
    return {"seconds_per_step_by_level": per_level, "steps_per_level": cfg.steps_per_level,
            "final_level_steps": cfg.final_level_steps, "run": str(run), "data": probe.sources.summary()}


def calibrate_levels(trainer, steps: int) -> list[float]:
    """Median seconds per step at every resolution (past the fade-in), one trainer, scratch folder."""
    from nodulesynth.train import engine

    spl = trainer.cfg.steps_per_level
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        trainer.out = Path(tmp)
        trainer.setup()
        engine.seed_everything(trainer.cfg.seed)
        trainer.build()
        for level in range(trainer.cfg.model.num_levels):
            start = level * spl + (spl // 2 if level else 0)
            times, last = [], time.monotonic()
            for k, batch in enumerate(trainer.batches(start, start + steps + 1)):
                trainer.train_step(batch)
                now = time.monotonic()
                if k >= 1:
                    times.append(now - last)
                last = now
            out.append(sorted(times)[len(times) // 2])
    return out


def default_weights(slices: list[str], crops: list[str]) -> str:
    """Half the draws from full slices, half from crops; among the full-slice folders each train
    PATIENT is equally likely (one 33-slice patient must not weigh as much as 28 TCGA patients)."""
    from nodulesynth.train.sources import SliceSources

    patients = [s["patients"] for s in SliceSources(slices, "train").summary()]
    half = sum(patients)
    shares = list(patients) + [half / len(crops)] * len(crops) if crops else list(patients)
    return ",".join(f"{w:g}" for w in shares)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prepared", type=Path, default=Path("prepared"), help="folder of prepared datasets")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--minutes", type=float, default=40.0, help="wall time per stage")
    p.add_argument("--stage", choices=("both", "masks", "translator", "export"), default="both",
                   help="export: only assemble OUT/weights from finished runs (two stages trained side by side)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--preset", default="texture", help="translator preset (train translator --preset)")
    p.add_argument("--spacing", type=float, default=0.8,
                   help="common pixel spacing of stage 2 (mm); 0 = each set at its own (the 128² LIDC crops are "
                        "~0.7 mm: rescaled to 0.8 they are too small for a 128 crop)")
    p.add_argument("--init-weights", default=None,
                   help="translator: start from this translator (a weights folder or a run's export/)")
    p.add_argument("--crop", type=int, default=64,
                   help="stage 2 training crop (multiple of 2**num_downs); 0 = whole 512² slices, no nodule crops")
    p.add_argument("--weights", default=None,
                   help="shares of the stage 2 folders in order (default: full slices 1:1 with the crops, "
                        "full-slice folders by their train patients)")
    p.add_argument("--ngf", type=int, default=24)
    p.add_argument("--ndf", type=int, default=32)
    p.add_argument("--num-downs", type=int, default=6)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--mask-res", type=int, default=128)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--calibration-steps", type=int, default=6)
    p.add_argument("--step-seconds", type=float, default=None,
                   help="translator: size the schedule from this step time instead of calibrating (a GPU shared "
                        "by several runs calibrates badly); --minutes still stops the run")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0: torch's default). On a shared, loaded machine 1 is fastest: "
                        "measured 0.21 vs 2.6 s per level-0 mask step at load 11 on 2 cores")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--masks-run", type=Path, default=None,
                   help="with --stage translator: the finished mask run to export the weights with")
    p.add_argument("--lung-texture", default="pretrained",
                   help="lung texture model the exported weights carry (a run or weights folder; 'none': without), "
                        "so a new translator is judged as it would ship (default: the shipped one)")
    p.add_argument("--resume", action="store_true", help="continue both runs from their checkpoints")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    slices, crops = _folders(args.prepared, SLICE_SETS), _folders(args.prepared, CROP_SETS)
    if not slices:
        sys.exit(f"--prepared {args.prepared}: none of {', '.join(SLICE_SETS)} is a prepared dataset")
    data2 = slices + (crops if args.crop else [])  # whole slices: one size per batch
    weights = args.weights or default_weights(slices, crops if args.crop else [])
    args.out.mkdir(parents=True, exist_ok=True)
    recipe = {"argv": sys.argv, "args": {k: str(v) for k, v in vars(args).items()}, "torch_threads": torch.get_num_threads()}
    if args.stage == "export" and (args.out / "recipe.json").is_file():  # keep the training run's record
        recipe = {**json.loads((args.out / "recipe.json").read_text()), "export_argv": sys.argv}
    hardware = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "CPU"
    recipe.setdefault("hardware", hardware)
    t0 = time.monotonic()
    if args.stage in ("both", "masks"):
        recipe["masks"] = train_mask_stage(args, slices)
    if args.stage in ("both", "translator"):
        recipe["translator"] = train_translator_stage(args, data2, weights)
    if args.stage != "export":
        recipe["wall_minutes"] = round((time.monotonic() - t0) / 60, 1)
    masks_run, tr_run = args.masks_run or args.out / "masks", args.out / "translator"
    if (masks_run / "export").is_dir() and (tr_run / "export").is_dir():
        from nodulesynth.models.export import export_tsgan

        ra = recipe["args"]  # on --stage export: the training run's own arguments and data
        used = [d["path"] for d in recipe.get("translator", {}).get("data", [])] or data2
        card = (f"Retrained on {recipe['hardware']} with benchmarks/retrain.py ({ra['minutes']} min per stage, "
                f"preset {ra['preset']}); "
                f"data: train split of {', '.join(Path(d).name for d in used)}"
                + (f"; translator started from {ra['init_weights']}" if ra.get("init_weights", "None") != "None" else "")
                + "; see recipe.json.")
        export_tsgan(masks_run, tr_run, args.out / "weights", card, overwrite=True, dtype=torch.float16,
                     lung_texture=None if args.lung_texture == "none" else args.lung_texture)
        recipe["weights"] = str(args.out / "weights")
    (args.out / "recipe.json").write_text(json.dumps(recipe, indent=2, default=str))
    print(json.dumps({k: v for k, v in recipe.items() if k in ("wall_minutes", "weights")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
