"""Sharded generation equals the single-process run: torchrun with 2 gloo ranks on CPU, manual
--start-index parts merged with `nodulesynth merge`; a failing rank fails the run and leaves nothing."""
from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scenes import scene_mask

from nodulesynth.cli import main

FORMATS = "coco,yolo,nifti,dicom,monai"
VOLATILE = {".nodulesynth"}  # holds the writer's pid


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from nodulesynth.data.slices import SliceRecord, write_slice_dataset
    from nodulesynth.masks.boxes import mask_to_boxes
    from nodulesynth.models.pix2pix import TranslatorConfig
    from nodulesynth.models.stylegan import MaskGANConfig
    from nodulesynth.models.tsgan import TSGAN

    root = tmp_path_factory.mktemp("shard")
    torch.manual_seed(4)
    model = TSGAN.from_configs(
        MaskGANConfig(resolution=16, z_dim=32, w_dim=32, mapping_layers=2, fmap_base=256, fmap_max=32),
        TranslatorConfig(ngf=8, ndf=8, num_downs=6, dwmh_depth=3, dwmh_window=4, dwmh_heads=2), image_size=64)
    weights = str(model.save_pretrained(root / "tiny"))
    masks = np.stack([scene_mask([(18, 30, 3)])] * 4)
    recs = [SliceRecord(series_uid=f"1.2.{k % 2}", z_mm=float(k), slice_index=k, spacing_mm=(0.7, 0.75),
                        boxes=mask_to_boxes(masks[k]), source="lidc", has_nodule=True) for k in range(4)]
    real = write_slice_dataset(root / "real", np.full(masks.shape, -800, np.int16), masks, recs)
    return root, weights, str(real)


def _files(d: Path) -> dict[str, bytes]:
    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_file() and p.name not in VOLATILE:
            data = p.read_bytes()
            if p.name == "annotations.json":  # creation time differs between any two runs
                j = json.loads(data)
                j["info"].pop("date_created")
                data = json.dumps(j).encode()
            if p.name == "data.yaml":  # names its own folder
                data = data.replace(d.resolve().as_posix().encode(), b"OUT")
            out[str(p.relative_to(d))] = data
    return out


def _assert_same(a: Path, b: Path, skip: tuple[str, ...] = ()) -> None:
    fa, fb = _files(a), _files(b)
    for k in skip:
        fa.pop(k), fb.pop(k)
    assert sorted(fa) == sorted(fb)
    assert [k for k in fa if fa[k] != fb[k]] == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8", **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def single(setup):
    root, weights, real = setup
    out = root / "single"
    assert main(["generate", "--n", "5", "--real", real, "--out", str(out), "--weights", weights, "--device", "cpu",
                 "--format", FORMATS, "--val-fraction", "0.5", "--preview", "--batch-size", "2",
                 "--workers", "1"]) == 0  # the worker-process path; sharded runs below write inline
    return out


def test_torchrun_two_ranks_equal_single_run(setup, single):
    """Two gloo ranks, at another batch size, write the single run's files (every format, DICOM UIDs included)."""
    root, weights, real = setup
    out = root / "torchrun"
    # torchrun's own parser would take `--n` for its --nnodes/--nproc-per-node: `--` ends its options
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "nodulesynth", "--", "generate", "--n", "5", "--real", real, "--out", str(out), "--weights", weights,
           "--device", "cpu", "--format", FORMATS, "--val-fraction", "0.5", "--preview", "--batch-size", "3"]
    r = subprocess.run(cmd, env=_env(), capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same(single, out)
    assert (out / "preview.png").is_file() and not (out / ".shards").exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".torchrun.tmp")]


def test_torchrun_real_slices_with_added_nodules_equal_single_run(setup, tmp_path):
    """--real --add-nodules sharded: the ranks split the real slices, each slice seeded by its name,
    so two ranks at batch size 1 write the single run's files (batch size 4)."""
    from nodulesynth.data.slices import SliceRecord, write_slice_dataset
    from nodulesynth.masks.boxes import mask_to_boxes

    _, weights, _ = setup
    masks = np.stack([scene_mask([(18, 30, 2)] if k % 2 else []) for k in range(5)])
    recs = [SliceRecord(series_uid=f"1.2.{k}", z_mm=float(k), slice_index=k, spacing_mm=(6.4, 6.4),
                        boxes=mask_to_boxes(masks[k]), source="lidc", has_nodule=bool(k % 2), patient=f"P{k}",
                        split="val" if k == 3 else "train") for k in range(5)]
    real = str(write_slice_dataset(tmp_path / "real", np.where(masks == 1, 40, -850).astype(np.int16), masks, recs))
    args = ["generate", "--n", "1", "--real", real, "--add-nodules", "--num-nodules", "1", "--weights", weights,
            "--device", "cpu", "--image-format", "npy"]
    assert main([*args, "--out", str(tmp_path / "single"), "--batch-size", "4"]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "nodulesynth",
           "--", *args, "--out", str(tmp_path / "ranks"), "--batch-size", "1"]
    r = subprocess.run(cmd, env=_env(), capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same(tmp_path / "single", tmp_path / "ranks")
    man = json.loads((tmp_path / "ranks" / "manifest.json").read_text())
    assert man["n_real_nodules_added"] + man["n_real_no_room"] == 4 and man["n_real"] == 5


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_cli_process_keeps_its_heap():
    """The CLI's own process keeps freed memory (runtime.keep_heap; the torchrun run above used it and
    wrote the in-process run's files); NODULESYNTH_KEEP_HEAP=0 leaves the allocator alone."""
    code = "from nodulesynth.runtime import keep_heap; print(keep_heap())"
    for env, want in ((_env(), "True"), (_env(NODULESYNTH_KEEP_HEAP="0"), "False")):
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert r.stdout.strip() == want, r.stderr


def test_a_failing_rank_fails_the_run_and_leaves_nothing(setup, tmp_path):
    _, weights, _ = setup
    out = tmp_path / "o"
    code = ("import sys, nodulesynth.synth.pipeline as p\n"
            "from nodulesynth.errors import NoduleSynthError\n"
            "if sys.argv[1] == '1':\n"
            "    def boom(self, *a, **k): raise NoduleSynthError('simulated failure')\n"
            "    p.Synthesizer.generate = boom\n"
            "from nodulesynth.cli import main\n"
            f"sys.exit(main(['generate', '--n', '4', '--out', {str(out)!r}, '--weights', {weights!r}, "
            "'--device', 'cpu']))\n")
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              encoding="utf-8", errors="replace", env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                                  MASTER_ADDR="127.0.0.1", MASTER_PORT=port)) for r in (0, 1)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [2, 2], results
    assert "rank 1: simulated failure" in results[0][1]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_start_index_parts_merge_into_the_single_run(setup, tmp_path, capsys):
    _, weights, _ = setup
    common = ["--weights", weights, "--device", "cpu", "--format", "coco,yolo,monai", "--preview", "--seed", "2"]
    assert main(["generate", "--n", "5", "--out", str(tmp_path / "whole")] + common) == 0
    assert main(["generate", "--n", "3", "--out", str(tmp_path / "p0")] + common) == 0
    assert main(["generate", "--n", "2", "--start-index", "3", "--out", str(tmp_path / "p1")] + common) == 0
    assert main(["merge", str(tmp_path / "p1"), str(tmp_path / "p0"), "--out", str(tmp_path / "merged")]) == 0
    # preview.png of manual parts is the first part's (8 slices of a single run need a first part of ≥ 8)
    _assert_same(tmp_path / "whole", tmp_path / "merged", skip=("preview.png",))
    assert (tmp_path / "merged" / "preview.png").read_bytes() == (tmp_path / "p0" / "preview.png").read_bytes()
    assert (tmp_path / "p0" / "manifest.json").is_file()  # parts are left intact
    capsys.readouterr()
    # a gap, or parts of another seed, are refused with one line
    assert main(["merge", str(tmp_path / "p1"), "--out", str(tmp_path / "m2")]) == 0  # one part alone is fine
    assert main(["generate", "--n", "1", "--start-index", "4", "--out", str(tmp_path / "p2")] + common) == 0
    assert main(["merge", str(tmp_path / "p0"), str(tmp_path / "p2"), "--out", str(tmp_path / "m3")]) == 2
    assert "overlap or leave a gap" in capsys.readouterr().err
    assert main(["generate", "--n", "2", "--start-index", "3", "--out", str(tmp_path / "q1")] + common[:-1] + ["3"]) == 0
    assert main(["merge", str(tmp_path / "p0"), str(tmp_path / "q1"), "--out", str(tmp_path / "m4")]) == 2
    assert "seed differs" in capsys.readouterr().err
    (tmp_path / "p1" / "coco" / "images" / "synth_000004.png").unlink()  # a damaged part
    assert main(["merge", str(tmp_path / "p0"), str(tmp_path / "p1"), "--out", str(tmp_path / "m5")]) == 2
    assert "synth_000004.png is listed in manifest.json but missing" in capsys.readouterr().err
    assert not any((tmp_path / m).exists() for m in ("m3", "m4", "m5"))
