"""What a lent GPU session carries, built here ahead of time (issues 11 and 13).

    python benchmarks/device_pack.py pack --prepared prepared      # here: .devpack/ + .whl/
    python benchmarks/device_pack.py unpack .devpack /tmp/prepared  # there (benchmarks/device_session.sh)

Why: a device call carries at most 64 MiB with the working tree (~23 MiB), and the GPU image lacks
some of our packages. The prepared 512² slice sets (tcga, pyradiomics, lidc-sample: 117 slices of 39
patients, every split, so the session can evaluate on the held-out patients too) are 91 MB as .npy
but ~18 MB as xz-compressed .npy, losslessly; the wheels the GPU image lacks for training and the
tests (albumentations and its needs, pycocotools) are ~8 MB. SimpleITK (53 MB) cannot travel: the
test modules that read real CT files are skipped there, and nothing on the GPU path imports it.

``pack`` also writes ``.devpack/MANIFEST.json`` (sizes, SHA-256 of every decompressed array) and
``unpack`` checks it, so a truncated transfer fails loudly instead of training on garbage. Both
folders are git-ignored (``.git/info/exclude``); a session names them in the device call's carry.
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
CROP_SET, MAX_CROPS = "lidc-crops", 1200  # ≈ 12 MiB: with the tracked tree (22 MiB), the slices and wheels, < 64


def crop_subset(prepared: Path, dest: Path, n: int) -> int:
    """Write ``n`` TRAIN crops of ``prepared/lidc-crops`` (evenly spaced over the index, so over
    patients) as a prepared dataset in ``dest``; returns how many."""
    from nodulesynth.data.slices import SliceDataset, write_slice_dataset
    from nodulesynth.data.splits import split_indices

    ds = SliceDataset(prepared / CROP_SET)
    train = split_indices(ds, "train")
    pick = train[np.linspace(0, len(train) - 1, min(n, len(train))).round().astype(int)]  # distinct: step ≥ 1
    write_slice_dataset(dest, np.asarray(ds.images[pick]), np.asarray(ds.masks[pick]),
                        [ds.records[int(i)] for i in pick], meta=ds.meta)
    return len(pick)


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def pack(prepared: Path, out: Path, wheels: Path | None, max_crops: int = MAX_CROPS) -> dict:
    for name in SETS:
        if not (prepared / name / "index.json").is_file():
            raise SystemExit(f"--prepared {prepared}: {name}/index.json missing (run `nodulesynth prepare` first)")
    if out.exists():
        shutil.rmtree(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    manifest = {"sets": {}}
    sources = {name: prepared / name for name in SETS}
    if max_crops > 0 and (prepared / CROP_SET / "index.json").is_file():
        sources[CROP_SET] = tmp / ".crops-subset"
        manifest["crops_subset"] = {"of": str(prepared / CROP_SET), "split": "train",
                                    "n": crop_subset(prepared, sources[CROP_SET], max_crops)}
    for name, src in sources.items():
        (tmp / name).mkdir()
        shutil.copy2(src / "index.json", tmp / name / "index.json")
        entry = {}
        for arr in ("images", "masks"):
            a = np.load(src / f"{arr}.npy")  # read once: compressed and hashed from memory
            with lzma.open(tmp / name / f"{arr}.npy.xz", "wb", preset=6) as fh:
                np.save(fh, a)
            entry[arr] = {"shape": list(a.shape), "dtype": str(a.dtype), "sha256": _sha(a),
                          "bytes_xz": (tmp / name / f"{arr}.npy.xz").stat().st_size}
        manifest["sets"][name] = entry
    shutil.rmtree(tmp / ".crops-subset", ignore_errors=True)
    (tmp / "MANIFEST.json").write_text(json.dumps(manifest, indent=2))
    tmp.rename(out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    manifest["bytes"] = size
    if wheels is not None:
        manifest["wheel_bytes"] = fetch_wheels(wheels)
    return manifest


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
                   help=f"TRAIN LIDC crops to carry from {CROP_SET}/ when it is there (0: none)")
    u = sub.add_parser("unpack")
    u.add_argument("src", type=Path)
    u.add_argument("dest", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "unpack":
        unpack(args.src, args.dest)
        return 0
    wheels = Path(args.wheels) if args.wheels else None
    m = pack(args.prepared, args.out, wheels, args.max_crops)
    if wheels is None and Path(".whl").is_dir():  # not refetched, but still carried
        m["wheel_bytes"] = sum(p.stat().st_size for p in Path(".whl").glob("*.whl"))
    total = m["bytes"] + m.get("wheel_bytes", 0) + tracked_bytes()
    print(f"{args.out}: {m['bytes'] / 2**20:.1f} MiB; wheels {m.get('wheel_bytes', 0) / 2**20:.1f} MiB; with the "
          f"tracked files {total / 2**20:.1f} MiB travel (limit {CARRY_LIMIT / 2**20:.0f} MiB)")
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
