"""What a lent GPU session carries, built here ahead of time (issues 11 and 13).

    python benchmarks/device_pack.py pack --prepared prepared      # here: .devpack/ + .whl/
    python benchmarks/device_pack.py unpack .devpack /tmp/prepared  # there (benchmarks/device_session.sh)

Why: a device call carries at most 64 MiB with the working tree (~23 MiB), and the GPU image lacks
some of our packages. Only what the trainers read travels: the TRAIN split (``split_indices``, as
the trainers pick it) of the prepared 512² slice sets (tcga, pyradiomics, lidc-sample: 88 of their
117 slices, 30 of 39 patients; held-out KID is measured back here, where the Inception weights are),
~14 MB as xz-compressed .npy, losslessly; the wheels the GPU image lacks for training and the tests
(albumentations and its needs, pycocotools) are ~8 MB. SimpleITK (53 MB) cannot travel: the test
modules that read real CT files are skipped there, and nothing on the GPU path imports it.

``pack`` also writes ``.devpack/MANIFEST.json`` (sizes, SHA-256 of every decompressed array) and
``unpack`` checks it, so a truncated transfer fails loudly instead of training on garbage. Both
folders are git-ignored (``.gitignore``); a session names them in the device call's carry.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

SETS = ("tcga", "pyradiomics", "lidc-sample")
# Packages the GPU image lacks (device KINDS.md lists what it holds), pinned to what this checkout's
# environment runs, with their own needs that the image lacks too.
WHEELS = ("albumentations", "albucore", "pydantic", "pydantic-core", "simsimd", "stringzilla",
          "annotated-types", "typing-inspection", "pycocotools")
PIP_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                 "manylinux2014_x86_64", "manylinux1_x86_64")
CARRY_LIMIT = 64 * 2**20
# The LIDC nodule crops (128² of real parenchyma, 713 patients) do not fit whole (≈ 75 MiB packed):
# the pack carries an evenly spaced subset of their TRAIN crops (≈ 10 KiB each packed), never a
# held-out patient's.
CROP_SET, MAX_CROPS = "lidc-crops", None  # None: as many as fit under CARRY_LIMIT − MARGIN
CROP_BYTES = 12_500  # packed bytes a crop with its mask (measured 11–12.2 KiB): the first guess at the subset
MARGIN = 2 * 2**20   # left free under CARRY_LIMIT: what a session commits before its device call


def train_subset(src: Path, dest: Path, n: int | None = None) -> int:
    """Write the TRAIN records of the prepared dataset ``src`` (``n`` of them evenly spaced over the
    index, so over patients, when ``n`` is given) as a prepared dataset in ``dest``; returns how many."""
    from nodulesynth.data.slices import SliceDataset, write_slice_dataset
    from nodulesynth.data.splits import split_indices

    ds = SliceDataset(src)
    pick = split_indices(ds, "train")
    if n is not None:
        pick = pick[np.linspace(0, len(pick) - 1, min(n, len(pick))).round().astype(int)]  # distinct: step ≥ 1
    write_slice_dataset(dest, np.asarray(ds.images[pick]), np.asarray(ds.masks[pick]),
                        [ds.records[int(i)] for i in pick], meta=ds.meta)
    return len(pick)


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def pack(prepared: Path, out: Path, max_crops: int | None = MAX_CROPS, budget: int | None = None) -> dict:
    """Write ``out``: the TRAIN split of SETS, then of CROP_SET (``max_crops`` of them; ``None``: as
    many as fit in ``budget`` bytes for the whole pack)."""
    for name in SETS:
        if not (prepared / name / "index.json").is_file():
            raise SystemExit(f"--prepared {prepared}: {name}/index.json missing (run `nodulesynth prepare` first)")
    for folder in (out, out.with_name(out.name + ".tmp")):  # replace only a pack this script wrote
        if folder.exists() and any(folder.iterdir()) and not (folder / "MANIFEST.json").is_file() \
                and not (folder / ".train").is_dir():
            raise SystemExit(f"--out {out}: {folder} exists and is not a device pack; not replacing it")
    if out.exists():
        shutil.rmtree(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / ".train").mkdir()
    manifest = {"sets": {}, "split": "train", "train_records": {}}
    for name in SETS:
        manifest["train_records"][name] = train_subset(prepared / name, tmp / ".train" / name)
        manifest["sets"][name] = _write_set(tmp / ".train" / name, tmp / name)
    crops, left = prepared / CROP_SET, None
    if max_crops is None and budget is not None:  # fill what the slices leave of the budget
        left = budget - sum(f.stat().st_size for f in tmp.glob("*/*.xz"))
        max_crops = max(0, int(left // CROP_BYTES))
    while max_crops and (crops / "index.json").is_file():
        shutil.rmtree(tmp / ".train" / CROP_SET, ignore_errors=True)
        shutil.rmtree(tmp / CROP_SET, ignore_errors=True)
        n = train_subset(crops, tmp / ".train" / CROP_SET, max_crops)
        manifest["crops_subset"] = {"of": str(crops), "split": "train", "n": n}
        manifest["sets"][CROP_SET] = _write_set(tmp / ".train" / CROP_SET, tmp / CROP_SET)
        size = sum(f.stat().st_size for f in (tmp / CROP_SET).glob("*.xz"))
        if left is None or size <= left:
            break
        max_crops = int(n * left / size * 0.98)  # the estimate was low for this subset: shrink to fit, write again
    if not max_crops:  # none asked for, or none fits
        manifest.pop("crops_subset", None)
        manifest["sets"].pop(CROP_SET, None)
        shutil.rmtree(tmp / CROP_SET, ignore_errors=True)
    shutil.rmtree(tmp / ".train")
    (tmp / "MANIFEST.json").write_text(json.dumps(manifest, indent=2))
    tmp.rename(out)
    manifest["bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return manifest


def _write_set(src: Path, dest: Path) -> dict:
    """xz-compress one prepared dataset's arrays into ``dest``; returns their MANIFEST entry."""
    dest.mkdir()
    shutil.copy2(src / "index.json", dest / "index.json")
    entry = {}
    for arr in ("images", "masks"):
        a = np.load(src / f"{arr}.npy")  # read once: compressed and hashed from memory
        with lzma.open(dest / f"{arr}.npy.xz", "wb", preset=6) as fh:
            np.save(fh, a)
        entry[arr] = {"shape": list(a.shape), "dtype": str(a.dtype), "sha256": _sha(a),
                      "bytes_xz": (dest / f"{arr}.npy.xz").stat().st_size}
    return entry


def fetch_wheels(dest: Path) -> int:
    """Linux x86-64 / CPython 3.12 wheels (the GPU image's Python) of WHEELS, at this environment's
    versions, with pip download (no dependencies resolved: the list is complete for that image)."""
    from importlib.metadata import version

    pins = [f"{n}=={version(n)}" for n in WHEELS]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", *[a for p in PIP_PLATFORMS for a in ("--platform", p)], "-d", str(dest), *pins]
    subprocess.run(cmd, check=True)
    return sum(p.stat().st_size for p in dest.glob("*.whl"))


def unpack(src: Path, dest: Path) -> None:
    manifest = json.loads((src / "MANIFEST.json").read_text())
    for name, entry in manifest["sets"].items():
        (dest / name).mkdir(parents=True, exist_ok=True)
        for arr, facts in entry.items():
            with lzma.open(src / name / f"{arr}.npy.xz", "rb") as fh:
                a = np.load(fh)
            if list(a.shape) != facts["shape"] or _sha(a) != facts["sha256"]:
                raise SystemExit(f"{src / name / (arr + '.npy.xz')}: content does not match MANIFEST.json (truncated copy?)")
            np.save(dest / name / f"{arr}.npy", a)
        shutil.copy2(src / name / "index.json", dest / name / "index.json")
    print(f"unpacked {', '.join(manifest['sets'])} into {dest}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack")
    a.add_argument("--prepared", type=Path, default=Path("prepared"))
    a.add_argument("--out", type=Path, default=Path(".devpack"))
    a.add_argument("--wheels", default=".whl", help="wheel folder to fill ('' to skip)")
    a.add_argument("--max-crops", type=int, default=MAX_CROPS,
                   help=f"TRAIN LIDC crops to carry from {CROP_SET}/ when it is there (0: none; "
                        f"default: as many as fit beside the tracked files and the wheels)")
    u = sub.add_parser("unpack")
    u.add_argument("src", type=Path)
    u.add_argument("dest", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "unpack":
        unpack(args.src, args.dest)
        return 0
    wheels = Path(args.wheels) if args.wheels else None
    wheel_bytes = fetch_wheels(wheels) if wheels is not None else \
        sum(f.stat().st_size for f in Path(".whl").glob("*.whl"))  # not refetched, but still carried
    rest = tracked_bytes() + wheel_bytes
    m = pack(args.prepared, args.out, args.max_crops, budget=CARRY_LIMIT - MARGIN - rest)
    total = m["bytes"] + rest
    print(f"{args.out}: {m['bytes'] / 2**20:.1f} MiB ({m.get('crops_subset', {}).get('n', 0)} crops); wheels "
          f"{wheel_bytes / 2**20:.1f} MiB; with the tracked files {total / 2**20:.1f} MiB travel "
          f"(limit {CARRY_LIMIT / 2**20:.0f} MiB)")
    if total > CARRY_LIMIT:
        print(f"too large for a device call: lower --max-crops (now {args.max_crops})", file=sys.stderr)
        return 1
    return 0


def tracked_bytes() -> int:
    """Size of the files git tracks here (they travel with every device call); 0 outside a checkout."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return 0
    return sum(Path(f).stat().st_size for f in out.decode().split("\0") if f and Path(f).is_file())


if __name__ == "__main__":
    raise SystemExit(main())
