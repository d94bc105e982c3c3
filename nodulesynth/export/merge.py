"""Merge dataset shards into one dataset (`nodulesynth merge SHARD... --out DIR`).

Shards come from torchrun ranks (done for you by ``generate``) or from manual runs such as a SLURM
array: ``generate --n 1000 --start-index $((1000*TASK)) --out part$TASK``. Shards must come from the
same weights, seed, conditions and formats, and their synthetic index ranges must tile one range
without gaps or overlap; then the merged dataset equals the one ``generate`` writes in one run
(creation dates aside; preview.png equal when the first shard holds at least 8 slices). Files are
hard-linked where possible (else copied), so the shards stay intact; the result appears atomically.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from ..errors import NoduleSynthError
from ..io import atomic_dir
from .coco import read_coco_records
from .monai import read_datalist_records
from .writer import ExportSpec, finalize, load_preview, prepare_folders

# the manifest's slice counts; a merge sums them (real slices with added nodules, or kept as they were
# for want of room, are counted among n_real as well)
COUNTS = ("n_real", "n_synthetic", "n_inserted", "n_mask_in", "n_real_nodules_added", "n_real_no_room")

# Header fields every shard must agree on (anything that changes which samples or files you get).
MUST_AGREE = ("version", "weights", "revision", "seed", "formats", "image_format", "config", "val_fraction",
              "pixel_spacing_mm", "validation")
PREVIEW_NPZ = ".preview.npz"
PREVIEW_ITEMS = 8


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("shards", nargs="+", help="dataset folders written by `nodulesynth generate` (e.g. with --start-index)")
    p.add_argument("--out", required=True, help="merged dataset folder (must not exist or be empty, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")


def _manifest(shard: Path) -> dict:
    path = shard / "manifest.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise NoduleSynthError(f"{shard}: not a nodulesynth dataset (manifest.json missing)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NoduleSynthError(f"{path}: corrupt manifest ({e})") from e


def _transfer(src: Path, dst: Path, move: bool) -> None:
    if move:
        os.replace(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _sum_gate(counts: list[dict]) -> dict:
    out = {"attempts": 0, "accepted": 0, "rejected": {}}
    for c in counts:
        out["attempts"] += c.get("attempts", 0)
        out["accepted"] += c.get("accepted", 0)
        for k, v in c.get("rejected", {}).items():
            out["rejected"][k] = out["rejected"].get(k, 0) + v
    out["rejected"] = dict(sorted(out["rejected"].items()))  # the single run's order, whatever the shards saw
    return out


def gate_summary(c: dict) -> str:
    """The quality-gate line (same text as ``GateStats.summary``), from counts."""
    if not c.get("attempts"):
        return "not applied"
    rej = sorted(c["rejected"].items(), key=lambda kv: (-kv[1], kv[0]))
    reasons = ", ".join(f"{k} {v}" for k, v in rej) or "none"
    return f"{c['accepted']} accepted of {c['attempts']} drawn masks; {sum(c['rejected'].values())} rejected ({reasons})"


def merge_datasets(shards: list[Path], base: Path, final_root: Path, move: bool = False) -> dict:
    """Merge ``shards`` into the (empty, temporary) folder ``base`` that will become ``final_root``."""
    shards = [Path(s) for s in shards]
    mans = [(s, _manifest(s)) for s in shards]
    mans = [m for m in mans if m[1]["items"]] or mans[:1]
    mans.sort(key=lambda sm: sm[1]["items"][0]["position"] if sm[1]["items"] else 0)
    first = mans[0][1]
    for s, m in mans[1:]:
        for k in MUST_AGREE:
            if m.get(k) != first.get(k):
                raise NoduleSynthError(f"{s}: {k} differs from {mans[0][0]} ({m.get(k)!r} vs {first.get(k)!r}); "
                                       "only shards of one generate setting merge into one dataset")
    pos = first["items"][0]["position"] if first["items"] else 0
    names: set[str] = set()
    for s, m in mans:
        for it in m["items"]:
            if it["position"] != pos:
                raise NoduleSynthError(f"{s}: item {it['name']} is at position {it['position']}, expected {pos}: "
                                       "shards overlap or leave a gap (check --start-index and --n of each part)")
            if it["name"] in names:
                raise NoduleSynthError(f"{s}: {it['name']} appears in two shards")
            names.add(it["name"])
            pos += 1
    spec = ExportSpec(tuple(first["formats"]), first["image_format"])
    prepare_folders(spec, base)
    records = []
    for s, m in mans:
        coco_recs = read_coco_records(spec.root(s, "coco"))[1] if "coco" in spec.formats else None
        monai_recs = read_datalist_records(spec.root(s, "monai")) if "monai" in spec.formats else None
        for k, it in enumerate(m["items"]):
            for files in it["files"].values():
                for f in files:
                    if Path(f).is_absolute() or ".." in Path(f).parts:
                        raise NoduleSynthError(f"{s / 'manifest.json'}: file {f!r} lies outside the dataset")
                    if not (s / f).is_file():
                        raise NoduleSynthError(f"{s}: {f} is listed in manifest.json but missing")
                    _transfer(s / f, base / f, move)
            rec = {"manifest": it}
            if coco_recs is not None:
                rec["coco"] = coco_recs[k]
            if monai_recs is not None:
                rec["monai"] = monai_recs[it["name"]]
            records.append(rec)
    gate = _sum_gate([m.get("quality_gate_counts", {}) for _, m in mans])
    header = {k: v for k, v in first.items() if k != "items"}
    header.update(
        **{k: sum(m.get(k, 0) for _, m in mans) for k in COUNTS}, start_index=min(m.get("start_index", 0) for _, m in mans),
        quality_gate=gate_summary(gate), quality_gate_counts=gate,
    )
    preview = None
    if any((s / PREVIEW_NPZ).is_file() for s, _ in mans):  # torchrun shards (a rank with no eligible slice has none)
        preview = [p for s, _ in mans if (s / PREVIEW_NPZ).is_file() for p in load_preview(s / PREVIEW_NPZ)]
        preview = preview[:PREVIEW_ITEMS]
    elif (mans[0][0] / "preview.png").is_file():
        _transfer(mans[0][0] / "preview.png", base / "preview.png", move)
    finalize(base, spec, records, header, final_root, preview)
    return header


def run(args: argparse.Namespace) -> int:
    shards = [Path(s).expanduser().resolve() for s in args.shards]
    for s in shards:
        if not s.is_dir():
            raise NoduleSynthError(f"{s}: not a folder")
    out = Path(args.out).expanduser().resolve()
    for s in shards:
        if out == s or out in s.parents or s in out.parents:
            raise NoduleSynthError(f"--out {out}: is, contains or lies inside the shard {s}")
    with atomic_dir(out, args.overwrite) as tmp:
        header = merge_datasets(shards, tmp, out, move=False)
    print(f"merged {len(shards)} shard(s) into {out}: {header['n_synthetic']} synthetic, {header['n_real']} real, "
          f"{header['n_mask_in']} mask-in slices")
    return 0
