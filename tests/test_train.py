"""Trainers (CPU, tiny nets): exact resume, progressive growing, L1 descent, outputs, export, CLI."""
from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import threading

import numpy as np
import pytest
import torch

from nodulesynth.data.slices import SliceRecord, write_slice_dataset
from nodulesynth.errors import NoduleSynthError
from nodulesynth.masks.classes import MaskClass
from nodulesynth.models.pix2pix import TranslatorConfig
from nodulesynth.models.stylegan import MaskGANConfig
from nodulesynth.train import MaskTrainConfig, TranslatorTrainConfig, engine, train_masks, train_translator
from nodulesynth.train.masks import fade_reals, masks_to_fractions, schedule


def synth_slices(n: int, size: int, seed: int = 0, nodule_every: int = 2):
    """Ellipse 'chests' (body, two lungs, trachea) with a round nodule in every ``nodule_every``-th slice."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    masks = np.zeros((n, size, size), np.uint8)
    images = np.zeros((n, size, size), np.int16)
    records = []
    for i in range(n):
        cx, cy = 0.5 + rng.uniform(-0.03, 0.03, 2)
        m = np.zeros((size, size), np.uint8)
        m[((xx - cx) / 0.42) ** 2 + ((yy - cy) / 0.33) ** 2 < 1] = MaskClass.BODY
        m[((xx - cx + 0.17) / 0.13) ** 2 + ((yy - cy) / 0.22) ** 2 < 1] = MaskClass.RIGHT_LUNG  # image left
        m[((xx - cx - 0.17) / 0.13) ** 2 + ((yy - cy) / 0.22) ** 2 < 1] = MaskClass.LEFT_LUNG
        m[((xx - cx) / 0.03) ** 2 + ((yy - cy + 0.12) / 0.03) ** 2 < 1] = MaskClass.TRACHEA
        has = i % nodule_every == 0
        if has:
            nx, ny = cx + rng.choice([-0.17, 0.17]), cy + rng.uniform(-0.1, 0.1)
            m[(xx - nx) ** 2 + (yy - ny) ** 2 < 0.09**2] = MaskClass.NODULE
        hu = np.array([-1024, 40, -850, -850, -1000, 30], np.float32)[m] + rng.normal(0, 20, (size, size))
        masks[i], images[i] = m, hu.clip(-1024, 3000).astype(np.int16)
        records.append(SliceRecord("1.2.3", float(i), i, (0.8, 0.8), np.zeros((0, 4), np.float32), "phantom", has))
    return images, masks, records


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    images, masks, records = synth_slices(8, 64)
    return str(write_slice_dataset(tmp_path_factory.mktemp("slices"), images, masks, records))


MASK_MODEL = dict(resolution=8, z_dim=16, w_dim=16, mapping_layers=2, fmap_base=64, fmap_max=16, fmap_min=8)
TR_MODEL = dict(ngf=4, ndf=4, num_downs=5, dwmh_depth=2, dwmh_window=4, dwmh_heads=2)


def mask_cfg(data, out, **kw) -> MaskTrainConfig:
    base = dict(data=data, out=str(out), model=MaskGANConfig(**MASK_MODEL), steps_per_level=4, batch_sizes=(4,),
                checkpoint_every=100, sample_every=3, log_every=1, eval_samples=8, device="cpu")
    return MaskTrainConfig(**{**base, **kw})


def tr_cfg(data, out, **kw) -> TranslatorTrainConfig:
    base = dict(data=data, out=str(out), model=TranslatorConfig(**TR_MODEL), epochs=2, batch_size=2, crop_size=32,
                checkpoint_every=100, log_every=1, num_workers=0, num_samples=2, device="cpu")
    return TranslatorTrainConfig(**{**base, **kw})


def read_metrics(run) -> list[dict]:
    with open(os.path.join(run, "metrics.csv"), newline="") as fh:
        return list(csv.DictReader(fh))


def assert_same_state(a, b, path=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}.{i}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"tensor {path} differs"
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), path
    else:
        assert a == b, path


def final_state(run):
    st = engine.load_checkpoint(engine.latest_checkpoint(run))
    st.pop("rng")  # RNG equality is implied by the weights; keep the comparison on training state
    return st


# ----------------------------------------------------------------------------- unit pieces
def test_schedule_fades_in_each_level():
    assert schedule(0, 10, 3) == (0, 1.0)
    assert schedule(10, 10, 3) == (1, 0.0)
    assert schedule(12, 10, 3) == (1, 0.4)
    assert schedule(15, 10, 3) == (1, 1.0)
    assert schedule(29, 10, 3) == (2, 1.0)
    assert schedule(99, 10, 3) == (2, 1.0)  # past the end: stays at the last level


def test_real_masks_become_class_fractions_and_fade():
    labels = torch.zeros(1, 8, 8, dtype=torch.uint8)
    labels[0, :2, :2] = MaskClass.NODULE
    frac = masks_to_fractions(labels, 4)
    assert frac.shape == (1, 6, 4, 4) and torch.allclose(frac.sum(1), torch.ones(1, 4, 4))
    assert frac[0, MaskClass.NODULE, 0, 0] == 1 and frac[0, MaskClass.NODULE].sum() == 1
    assert torch.equal(fade_reals(frac, 1.0), frac)
    low = fade_reals(frac, 0.0)
    assert torch.allclose(low[0, MaskClass.NODULE, :2, :2], torch.full((2, 2), 0.25))


def test_checkpoint_state_round_trip_and_corrupt(tmp_path):
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), betas=(0.0, 0.99))
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"opt": opt.state_dict(), "net": net.state_dict(), "rng": engine.rng_state(), "step": 7}
    path = engine.save_checkpoint(tmp_path, 7, state)
    back = engine.load_checkpoint(path)
    assert_same_state(state, back)
    opt2 = torch.optim.Adam(torch.nn.Linear(3, 2).parameters())
    opt2.load_state_dict(back["opt"])  # loads into a real optimiser
    engine.set_rng_state(back["rng"])
    assert engine.latest_checkpoint(tmp_path) == path
    (path / "state.safetensors").write_bytes(b"garbage")
    with pytest.raises(NoduleSynthError, match="checkpoint"):
        engine.load_checkpoint(path)


def test_index_stream_resumes_mid_epoch():
    info = engine.DistInfo()
    a = engine.IndexStream(np.arange(5), seed=3, info=info)
    first = a.take(7)  # crosses an epoch boundary
    b = engine.IndexStream(np.arange(5), seed=3, info=info)
    b.load_state_dict(a.state_dict())
    assert a.take(6) == b.take(6)
    assert sorted(i for i, _ in first[:5]) == list(range(5))  # an epoch is a permutation


def test_augment_flip_swaps_lungs_and_is_seeded():
    from nodulesynth.train.augment import AugmentConfig, PairAugment

    images, masks, _ = synth_slices(1, 32)
    flip_only = PairAugment(AugmentConfig(p_flip=1.0, p_affine=0, p_intensity=0, p_noise=0))
    img, m = flip_only(images[0].astype(np.float32), masks[0], seed=1)
    expect = masks[0][:, ::-1].copy()
    left, right = expect == MaskClass.LEFT_LUNG, expect == MaskClass.RIGHT_LUNG
    expect[left], expect[right] = MaskClass.RIGHT_LUNG, MaskClass.LEFT_LUNG
    assert np.array_equal(m, expect)
    assert np.allclose(img, images[0][:, ::-1], atol=0.05)  # HU survives the [0, 1] round trip
    full = PairAugment()
    a, b = full(images[0].astype(np.float32), masks[0], 5), full(images[0].astype(np.float32), masks[0], 5)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert set(np.unique(a[1])) <= set(range(6))


# ----------------------------------------------------------------------------- mask StyleGAN
@pytest.fixture(scope="module")
def mask_runs(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("maskruns")
    full = train_masks(mask_cfg(data_dir, root / "full"))
    part = train_masks(mask_cfg(data_dir, root / "part", max_steps=5))
    part_done = part.joinpath("export").exists()
    resumed = train_masks(mask_cfg(data_dir, root / "part", resume=True))
    return full, resumed, part_done


def test_mask_critic_augmentation_keeps_masks_and_exact_resume(data_dir, tmp_path):
    """--augment-p: reals and fakes reach the critic shifted/scaled/rotated, still class fractions
    (background outside the frame), differentiable, p = 0 the identity; resume stays bit-identical."""
    from nodulesynth.models.pix2pix import one_hot
    from nodulesynth.train.masks import augment_geometry

    lab = torch.zeros(8, 32, 32, dtype=torch.long)
    lab[:, 8:24, 6:26], lab[:, 12:20, 8:14] = MaskClass.BODY, MaskClass.LEFT_LUNG
    x = one_hot(lab, 6).requires_grad_(True)
    torch.manual_seed(1)
    y = augment_geometry(x, 1.0)
    assert torch.allclose(y.sum(1), torch.ones(8, 32, 32), atol=1e-5) and float(y.detach().min()) >= -1e-6
    assert (y.argmax(1) != lab).any() and bool((y.argmax(1)[:, 0, :] == MaskClass.BACKGROUND).all())
    y.sum().backward()
    assert x.grad is not None
    assert torch.equal(augment_geometry(x.detach(), 0.0), x.detach())
    with pytest.raises(NoduleSynthError, match="--augment-p"):
        train_masks(mask_cfg(data_dir, tmp_path / "bad", augment_p=1.5))
    full = train_masks(mask_cfg(data_dir, tmp_path / "full", augment_p=0.5))
    train_masks(mask_cfg(data_dir, tmp_path / "part", augment_p=0.5, max_steps=5))
    resumed = train_masks(mask_cfg(data_dir, tmp_path / "part", augment_p=0.5, resume=True))
    assert_same_state(final_state(full), final_state(resumed))


def test_mask_trainer_places_lidc_nodules_and_resumes_exactly(tmp_path):
    """--place-nodules: copies of nodule-free real masks get one LIDC outline each, in a lung, the
    rest of the mask untouched and the same copies every time; the critic's reals then hold nodule
    pixels; resume stays bit-identical; a share outside 0..1 is refused."""
    from nodulesynth.data.slices import SliceRecord
    from nodulesynth.train.masks import placed_copies

    images, masks, _ = synth_slices(6, 128, nodule_every=1000)  # only slice 0 has its own nodule
    records = [SliceRecord("1.2.9", float(i), i, (2.5, 2.5), np.zeros((0, 4), np.float32), "phantom", i == 0)
               for i in range(6)]
    data = str(write_slice_dataset(tmp_path / "d", images, masks, records))
    copies, placed = placed_copies(masks, [2.5] * 6, 2, 0, np.arange(6))
    assert placed == 12 and np.array_equal(copies, placed_copies(masks, [2.5] * 6, 2, 0, np.arange(6))[0])
    lungs = np.isin(masks, (MaskClass.LEFT_LUNG, MaskClass.RIGHT_LUNG, MaskClass.BODY))
    for c in copies:
        new = (c == MaskClass.NODULE) & (masks != MaskClass.NODULE)
        assert new.reshape(6, -1).any(1).all() and lungs[new].all()  # a nodule in every copy, in lung/wall
        assert np.array_equal(c[~new], masks[~new])  # nothing else moved, slice 0's own nodule kept
    assert not np.array_equal(copies[0], copies[1])
    with pytest.raises(NoduleSynthError, match="--place-nodules"):
        train_masks(mask_cfg(data, tmp_path / "bad", place_nodules=1.5))
    bare = masks.copy()
    bare[bare == MaskClass.NODULE] = MaskClass.RIGHT_LUNG
    bare_data = str(write_slice_dataset(tmp_path / "bare", images, bare, records))
    frac = lambda run: max(float(r["real_nodule_frac"]) for r in read_metrics(run) if r["real_nodule_frac"])  # noqa: E731
    assert frac(train_masks(mask_cfg(bare_data, tmp_path / "plain", nodule_only=False))) == 0
    on = train_masks(mask_cfg(bare_data, tmp_path / "on", nodule_only=False, place_nodules=1.0))
    assert frac(on) > 5e-4 and json.loads((on / "run.json").read_text())["placed_nodule_copies"] == [24, 24]
    full = train_masks(mask_cfg(data, tmp_path / "full", nodule_only=False, place_nodules=0.5))
    train_masks(mask_cfg(data, tmp_path / "part", nodule_only=False, place_nodules=0.5, max_steps=5))
    resumed = train_masks(mask_cfg(data, tmp_path / "part", nodule_only=False, place_nodules=0.5, resume=True))
    assert_same_state(final_state(full), final_state(resumed))


def test_mask_resume_is_bit_identical(mask_runs):
    full, resumed, part_done = mask_runs
    assert part_done  # max_steps is a normal stop: export written
    assert_same_state(final_state(full), final_state(resumed))


def test_mask_run_grows_and_logs_nodule_rate(mask_runs):
    full, _, _ = mask_runs
    rows = read_metrics(full)
    assert [int(r["level"]) for r in rows] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [float(r["alpha"]) for r in rows[4:]] == [0.0, 0.5, 1.0, 1.0]
    measured = [r for r in rows if r["ema_nodule_rate"]]
    # a rate over eval_samples=8 masks: a multiple of 1/8 (a pixel fraction or a mean prob would not be)
    assert measured and all(float(r["ema_nodule_rate"]) * 8 == round(float(r["ema_nodule_rate"]) * 8) for r in measured)
    assert float(measured[-1]["real_nodule_rate"]) > 0  # nodule slices only: nodules visible at 8×8
    assert list((full / "samples").glob("step-*.png"))
    assert (full / "export" / "mask_generator.safetensors").is_file()


@pytest.mark.skipif(signal.getsignal(signal.SIGINT) is signal.SIG_IGN,
                    reason="SIGINT is ignored in this process (started in the background), as the trainer respects")
def test_sigint_checkpoints_and_exits(data_dir, tmp_path):
    cfg = mask_cfg(data_dir, tmp_path / "run", steps_per_level=10_000, time_budget_s=120)
    done = threading.Event()

    def interrupt_once_training():  # not on a fixed timer: on a loaded machine setup can outlast it
        rows = tmp_path / "run" / "metrics.csv"
        while not done.wait(0.05):
            if rows.is_file() and len(rows.read_text().splitlines()) >= 3:  # header + 2 steps: in the loop
                os.kill(os.getpid(), signal.SIGINT)
                return

    thread = threading.Thread(target=interrupt_once_training, daemon=True)
    thread.start()
    try:
        out = train_masks(cfg)
    finally:
        done.set()
        thread.join()
    ckpt = engine.latest_checkpoint(out)
    assert ckpt is not None and 0 < int(ckpt.name.split("-")[1]) < 20_000
    assert not (out / "export").exists()  # interrupted: checkpoint only
    with pytest.raises(NoduleSynthError, match="not empty"):
        train_masks(cfg)  # refuses to clobber a run without --resume/--overwrite


# ----------------------------------------------------------------------------- translator
@pytest.fixture(scope="module")
def translator_runs(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("trruns")
    full = train_translator(tr_cfg(data_dir, root / "full"))
    train_translator(tr_cfg(data_dir, root / "part", max_steps=3))
    resumed = train_translator(tr_cfg(data_dir, root / "part", resume=True))
    return full, resumed


def test_translator_resume_is_bit_identical(translator_runs):
    full, resumed = translator_runs
    assert_same_state(final_state(full), final_state(resumed))
    rows = read_metrics(full)
    assert len(rows) == 8 and float(rows[-1]["lr"]) < float(rows[0]["lr"])  # linear decay in the 2nd half
    from nodulesynth.models.losses import PerceptualLoss

    expected = "vgg19" if PerceptualLoss.try_create(None) is not None else "feature_matching"
    assert json.loads((full / "run.json").read_text())["perceptual"] == expected
    assert list((full / "samples").glob("step-*.png"))


def test_translator_steps_lower_l1(data_dir, tmp_path):
    cfg = tr_cfg(data_dir, tmp_path / "run", epochs=10, batch_size=8, augment=False, lr=5e-3, checkpoint_every=1000)
    rows = read_metrics(train_translator(cfg))
    l1 = [float(r["l1"]) for r in rows]
    assert np.mean(l1[-3:]) < 0.8 * np.mean(l1[:3]), l1


def test_export_pairs_a_retrained_stage_with_a_weights_folders_other(mask_runs, tmp_path):
    """train export --masks RUN --translator pretrained: the run's mask StyleGAN, the shipped translator
    bit for bit, the shipped translator's training record and spacing; a folder that is neither fails."""
    from nodulesynth.models.tsgan import TSGAN

    folder = engine.export_tsgan(mask_runs[0], "pretrained", tmp_path / "masks+shipped")
    got, shipped = TSGAN.from_pretrained(folder), TSGAN.from_pretrained("pretrained")
    assert got.mask_generator.cfg.resolution == MASK_MODEL["resolution"]
    for (k, a), b in zip(got.translator.state_dict().items(), shipped.translator.state_dict().values()):
        assert torch.equal(a, b), k
    assert got.meta["translator_training"] == shipped.meta["translator_training"]
    assert got.meta["mask_training"]["trainer"] == "masks" and got.spacing_mm == 0.8
    with pytest.raises(NoduleSynthError, match="not a weights folder"):
        engine.export_tsgan(mask_runs[0], tmp_path, tmp_path / "o")


def test_export_loads_as_tsgan(mask_runs, translator_runs, tmp_path):
    from nodulesynth.models.tsgan import TSGAN

    folder = engine.export_tsgan(mask_runs[0], translator_runs[0], tmp_path / "tsgan", "test card")
    model = TSGAN.from_pretrained(str(folder))
    assert model.image_size == 64 and "test card" in (folder / "README.md").read_text(encoding="utf-8")
    masks, images = model(torch.randn(2, 16))
    assert masks.shape == (2, 64, 64) and images.shape == (2, 1, 64, 64)


def test_cli_train_and_errors(data_dir, mask_runs, translator_runs, tmp_path, capsys):
    from nodulesynth.train import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    out = tmp_path / "exp"
    args = parser.parse_args(["export", "--masks", str(mask_runs[0]), "--translator", str(translator_runs[0]),
                              "--out", str(out)])
    assert cli.run(args) == 0 and (out / "tsgan.json").is_file()
    half = tmp_path / "exp16"  # --fp16: stored as pretrained/ ships, smaller, loads back as fp32
    assert cli.run(parser.parse_args(["export", "--masks", str(mask_runs[0]), "--translator", str(translator_runs[0]),
                                      "--out", str(half), "--fp16"])) == 0
    from safetensors import safe_open

    with safe_open(half / "translator.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert (half / "translator.safetensors").stat().st_size < 0.6 * (out / "translator.safetensors").stat().st_size
    args = parser.parse_args(["masks", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r"),
                              "--resolution", "8", "--device", "cpu"])
    with pytest.raises(NoduleSynthError, match="nope"):
        cli.run(args)
    args = parser.parse_args(["translator", "--data", data_dir, "--out", str(tmp_path / "r2"), "--resume"])
    with pytest.raises(NoduleSynthError, match="at least --crop-size 256"):
        cli.run(args)  # 64-px slices are smaller than the default crop: never padded
    args = parser.parse_args(["translator", "--data", data_dir, "--out", str(tmp_path / "r2"), "--crop-size", "0"])
    with pytest.raises(NoduleSynthError, match="multiple of 2\\*\\*num_downs = 256"):
        cli.run(args)  # whole 64-px slices cannot go through the default 8-down UNet
    args = parser.parse_args(["translator", "--data", data_dir, "--out", str(tmp_path / "r2"), "--resume",
                              "--num-downs", "5", "--crop-size", "32"])
    with pytest.raises(NoduleSynthError, match="no checkpoint"):
        cli.run(args)
    assert not (tmp_path / "r" / "config.json").exists()  # failed runs leave no folder behind


def test_cli_main_reports_one_line_error(tmp_path, capsys):
    from nodulesynth.cli import main

    rc = main(["train", "masks", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "missing" in err[0]
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- the shared loop (engine.Trainer)
class ToyTrainer(engine.Trainer):
    """Linear regression through the Trainer hooks: the loop's contract without any GAN."""

    name = "toy"
    metric_fields = ("loss",)

    def __init__(self, cfg, nan_at=None):
        super().__init__(cfg)
        self.nan_at = nan_at

    def setup(self):
        self.x = torch.linspace(-1, 1, 16)[:, None]
        self.stream = engine.IndexStream(np.arange(16), self.cfg.seed, self.info)

    def build(self):
        self.net = torch.nn.Linear(1, 1)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=0.25)

    def total_steps(self):
        return 12

    def batches(self, step, stop_at):
        for _ in range(step, stop_at):
            yield (torch.tensor([i for i, _ in self.stream.take(4)]),)

    def train_step(self, batch):
        x = self.x[batch[0]]
        loss = (self.net(x) - (3 * x + 1) + 0.1 * torch.randn_like(x)).square().mean()
        if self.nan_at is not None and self.step + 1 >= self.nan_at:
            loss = loss * float("nan")
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return {"loss": loss.detach()}

    def state_dict(self):
        return {"net": self.net.state_dict(), "opt": self.opt.state_dict(), "data": self.stream.state_dict()}

    def load_state_dict(self, st):
        self.net.load_state_dict(st["net"]); self.opt.load_state_dict(st["opt"]); self.stream.load_state_dict(st["data"])

    def export(self):
        (self.out / "export").mkdir(exist_ok=True)
        torch.save(self.net.state_dict(), self.out / "export" / "net.pt")


def toy_cfg(out, **kw):
    return engine.RunConfig(**{**dict(data="unused", out=str(out), checkpoint_every=4, log_every=2, device="cpu"), **kw})


def test_trainer_loop_resumes_bit_identical_and_logs(tmp_path):
    full = ToyTrainer(toy_cfg(tmp_path / "full")).fit()
    ToyTrainer(toy_cfg(tmp_path / "part", max_steps=5)).fit()  # stops between checkpoints: checkpoints step 5
    assert engine.latest_checkpoint(tmp_path / "part").name == "step-00000005"
    resumed = ToyTrainer(toy_cfg(tmp_path / "part", resume=True)).fit()
    assert_same_state(final_state(full), final_state(resumed))
    assert [int(r["step"]) for r in read_metrics(full)] == [2, 4, 6, 8, 10, 12]
    assert [int(r["step"]) for r in read_metrics(resumed)] == [2, 4, 5, 6, 8, 10, 12]  # 5: where part stopped
    assert (full / "export" / "net.pt").is_file() and "toy" in (full / "run.json").read_text()
    assert final_state(full)["net"]["weight"].item() > 1.0  # it did learn (towards 3 from ~0)


def test_trainer_stops_on_nan_loss_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(NoduleSynthError, match=r"diverged.*between steps 4 and 6.*step-00000004"):
        ToyTrainer(toy_cfg(tmp_path / "run"), nan_at=6).fit()
    assert [p.name for p in engine.list_checkpoints(tmp_path / "run")] == ["step-00000004"]
    assert not (tmp_path / "run" / "export").exists()
    st = engine.load_checkpoint(engine.latest_checkpoint(tmp_path / "run"))
    assert torch.isfinite(st["net"]["weight"]).all()


def test_resume_refuses_non_finite_or_misfit_checkpoints(tmp_path):
    from safetensors.torch import load_file, save_file

    run = ToyTrainer(toy_cfg(tmp_path / "run", max_steps=4)).fit()
    ckpt = engine.latest_checkpoint(run)
    tensors = load_file(str(ckpt / "state.safetensors"))
    export_before = (run / "export" / "net.pt").read_bytes()
    bad = dict(tensors, **{"net.weight": torch.full_like(tensors["net.weight"], float("nan"))})
    save_file(bad, str(ckpt / "state.safetensors"))
    with pytest.raises(NoduleSynthError, match="NaN/inf in net.weight"):
        ToyTrainer(toy_cfg(run, resume=True)).fit()
    assert (run / "export" / "net.pt").read_bytes() == export_before  # nothing trained, nothing overwritten
    save_file(dict(tensors, **{"net.weight": torch.zeros(3, 3)}), str(ckpt / "state.safetensors"))
    with pytest.raises(NoduleSynthError, match="does not fit this run"):
        ToyTrainer(toy_cfg(run, resume=True)).fit()
    (ckpt / "state.json").write_text('{"format": "nodulesynth-checkpoint"}')
    with pytest.raises(NoduleSynthError, match="not a nodulesynth checkpoint"):
        ToyTrainer(toy_cfg(run, resume=True)).fit()
    with pytest.raises(NoduleSynthError, match="NaN/inf"):  # never written either
        engine.save_checkpoint(tmp_path / "x", 1, {"w": torch.tensor([float("inf")])})


# ----------------------------------------------------------------------------- stage hooks, one by one
def _ready(trainer, out):
    trainer.out = out
    trainer.setup()
    engine.seed_everything(0)
    trainer.build()
    return trainer


def test_translator_hooks_one_by_one(data_dir, tmp_path):
    from nodulesynth.train.translator import TranslatorTrainer

    t = _ready(TranslatorTrainer(tr_cfg(data_dir, tmp_path)), tmp_path)
    assert t.crop == 32 and t.steps_per_epoch == 4 and t.total_steps() == 8 and t.image_size == 64
    labels, real = next(iter(t.batches(0, 1)))
    assert labels.shape == (2, 32, 32) and real.shape == (2, 1, 32, 32) and -1 <= real.min() <= real.max() <= 1
    before = {k: v.clone() for k, v in t.G.state_dict().items()}
    losses = t.train_step((labels, real))
    assert set(losses) == {"d_loss", "g_gan", "l1", "perc", "fm", "lung_stats", "g_total"}
    assert losses["lung_stats"] == 0  # off unless asked for
    assert all(torch.isfinite(v) for v in losses.values()) and losses["fm"] > 0  # no VGG here: FM stands in
    assert any(not torch.equal(before[k], v) for k, v in t.G.state_dict().items())
    assert t.stream.state_dict() == {"epoch": 0, "pos": 2}  # the trainer's stream moved by one batch
    st = t.state_dict()
    t2 = _ready(TranslatorTrainer(tr_cfg(data_dir, tmp_path)), tmp_path)
    t2.load_state_dict(st)
    assert_same_state(t2.state_dict(), st)
    t.step = 1
    t.preview()
    assert (tmp_path / "samples" / "step-00000001.png").is_file()
    assert t.log_values(losses)["epoch"] == 0.25


def test_lung_texture_frees_the_lungs_from_pixel_l1(data_dir, tmp_path):
    """--preset lung-texture: shuffling the real lungs' pixels inside each 16-px block leaves the L1
    as it was (only the lungs' coarse density counts there) and the lung-statistics loss is on."""
    from nodulesynth.train.translator import PRESETS, TranslatorTrainer

    keys = ("lung_lowpass", "lambda_lung_stats", "lambda_l1", "l1_lowpass")
    cfg = lambda out: tr_cfg(data_dir, out, **{k: PRESETS["lung-texture"][k] for k in keys})  # noqa: E731
    t = _ready(TranslatorTrainer(cfg(tmp_path / "a")), tmp_path / "a")
    labels, real = next(iter(t.batches(0, 1)))
    lung = (labels == 2) | (labels == 3)
    assert lung.any()
    shuffled = real.clone()
    g = torch.Generator().manual_seed(0)
    for b, y, x in ((b, y, x) for b in range(2) for y in (0, 16) for x in (0, 16)):
        block, inside = shuffled[b, 0, y:y + 16, x:x + 16], lung[b, y:y + 16, x:x + 16]
        block[inside] = block[inside][torch.randperm(int(inside.sum()), generator=g)]
    assert not torch.equal(shuffled, real)
    losses = t.train_step((labels, real))
    t2 = _ready(TranslatorTrainer(cfg(tmp_path / "b")), tmp_path / "b")
    losses2 = t2.train_step((labels, shuffled))
    assert float(losses["lung_stats"]) > 0
    assert float(losses["l1"]) == pytest.approx(float(losses2["l1"]), abs=1e-6)


def test_mask_hooks_one_by_one(data_dir, tmp_path):
    from nodulesynth.train.masks import MaskTrainer

    t = _ready(MaskTrainer(mask_cfg(data_dir, tmp_path)), tmp_path)
    assert t.total_steps() == 8 and len(t.sources) == 4  # nodule slices only
    level, alpha, real = next(iter(t.batches(4, 5)))  # first step of level 1: fade-in starts
    assert (level, alpha) == (1, 0.0) and real.shape == (4, 6, 8, 8)
    losses = t.train_step((level, alpha, real))
    assert {"d_loss", "g_loss", "gp", "wdist"} <= set(losses) and t.images_seen == 4
    ev = t.evaluate()
    with torch.no_grad():  # recomputed independently: masks of the fixed eval latents with a nodule pixel
        labels = t.G_ema(t.eval_z, level=t.level, alpha=t.alpha, noise_mode="const").argmax(1)
    assert ev["real_nodule_rate"] == 1.0
    assert ev["ema_nodule_rate"] == (labels == MaskClass.NODULE).flatten(1).any(1).float().mean().item()
    assert t.log_values(losses)["resolution"] == 8


# ----------------------------------------------------------------------------- mixed data, splits, weights
def test_index_stream_weights_shares_and_resume():
    info = engine.DistInfo()
    groups = np.array([0] * 4 + [1] * 12)
    s = engine.IndexStream(np.arange(16), seed=1, info=info, groups=groups, weights=[3, 1])
    first = s.take(16)
    assert sum(i < 4 for i, _ in first) == 12  # group 0 (4 slices) gets 3/4 of the draws: over-sampled
    b = engine.IndexStream(np.arange(16), seed=1, info=info, groups=groups, weights=[3, 1])
    b.load_state_dict(s.state_dict())
    assert s.take(20) == b.take(20)
    ranks = [engine.IndexStream(np.arange(16), 1, engine.DistInfo(r, 2, r), groups, [3, 1]).take(8) for r in (0, 1)]
    assert sorted(i for r in ranks for i, _ in r) == sorted(i for i, _ in first)  # ranks split one epoch


def test_translator_mixes_slices_and_crops_at_one_spacing(data_dir, tmp_path):
    from nodulesynth.train.translator import TranslatorTrainer

    images, masks, records = synth_slices(6, 64, seed=3)
    for i, r in enumerate(records):  # crops at a finer native spacing, patients split 4 train / 2 test
        r.spacing_mm, r.patient, r.split = (0.5, 0.5), f"p{i}", "train" if i < 4 else "test"
    records[0].spacing_mm = (0.25, 0.25)  # 64 px at 0.25 mm → 20 px at 0.8 mm: smaller than the crop
    crops = str(write_slice_dataset(tmp_path / "crops", images, masks, records))
    cfg = tr_cfg([data_dir, crops], tmp_path / "run", spacing_mm=0.8, data_weights="1,3", max_steps=3)
    t = _ready(TranslatorTrainer(cfg), tmp_path / "run")
    by_ds = [s["slices"] for s in t.sources.summary()]
    assert by_ds == [8, 3]  # crops: 4 train patients, one too small at 0.8 mm, test patients never used
    drawn = [g for g, _ in copy_stream(t.stream).take(t.stream.per_epoch)]
    assert sum(g >= 8 for g in drawn) == round(0.75 * len(drawn))
    hu, mask = t.pairs.load(9)  # a crop resampled 64 px × 0.5/0.8 = 40 px
    assert hu.shape == mask.shape == (40, 40) and set(np.unique(mask)) <= set(range(6))
    out = train_translator(cfg)
    assert (out / "export" / "translator.safetensors").is_file()
    with pytest.raises(NoduleSynthError, match="2 weights for 1"):
        train_translator(tr_cfg(data_dir, tmp_path / "bad", data_weights="1,2"))


def copy_stream(stream):
    import copy

    return copy.deepcopy(stream)


# ----------------------------------------------------------------------------- flags from the dataclasses
def test_cli_flags_come_from_the_config_dataclasses(data_dir, tmp_path):
    from nodulesynth.train import cli
    from nodulesynth.train.translator import PRESETS

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    base = ["--data", data_dir, "--out", str(tmp_path / "r")]
    cfg = cli.build_config(parser.parse_args(["translator", *base]))
    assert cfg == TranslatorTrainConfig(data=[data_dir], out=str(tmp_path / "r"))  # every default from the dataclass
    cfg = cli.build_config(parser.parse_args(["masks", *base, "--z-dim", "32", "--batch-size", "8", "4", "--all-slices"]))
    assert cfg.model == MaskGANConfig(z_dim=32) and cfg.model.w_dim == 32 and cfg.batch_sizes == (8, 4)
    assert cfg.nodule_only is False and cfg.steps_per_level == MaskTrainConfig(data="", out="").steps_per_level
    cfg = cli.build_config(parser.parse_args(["translator", *base, "--preset", "pix2pix", "--lambda-l1", "50",
                                              "--crop-size", "0", "--noise", "--upsample", "bilinear"]))
    assert (cfg.model.lia, cfg.model.dwmh, cfg.model.noise, cfg.model.upsample) == (False, False, True, "bilinear")
    assert cfg.lambda_l1 == 50 and cfg.crop_size is None and cfg.batch_size == PRESETS["paper"]["batch_size"]
    paper = cli.build_config(parser.parse_args(["translator", *base, "--preset", "paper"]))
    assert (paper.model.lia, paper.model.dwmh, paper.model.num_d, paper.lambda_l1, paper.lambda_perc) == \
        (True, True, 1, 200.0, 10.0)
    assert (paper.lung_lowpass, paper.lambda_lung_stats) == (0, 0)
    lt = cli.build_config(parser.parse_args(["translator", *base, "--preset", "lung-texture", "--lung-lowpass", "8"]))
    assert (lt.lung_lowpass, lt.lambda_lung_stats, lt.model.noise, lt.model.num_d) == (8, 50.0, True, 2)


def test_train_refuses_unwritable_or_data_overlapping_out(data_dir, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK) and os.geteuid() == 0:  # root writes anyway: use a path under a file
            target = tmp_path / "file" / "run"
            (tmp_path / "file").write_text("x")
        else:
            target = locked / "run"
        with pytest.raises(NoduleSynthError, match="--out"):
            train_translator(tr_cfg(data_dir, target))
    finally:
        locked.chmod(0o700)
    with pytest.raises(NoduleSynthError, match="--data"):
        train_translator(tr_cfg(data_dir, os.path.join(data_dir, "run")))
    assert not os.path.exists(os.path.join(data_dir, "run"))


def test_init_weights_fine_tunes_from_the_shipped_translator(tmp_path):
    """--init-weights starts from a weights folder's translator (its architecture replaces the config's)."""
    from nodulesynth.errors import NoduleSynthError
    from nodulesynth.models.tsgan import TSGAN
    from nodulesynth.train.translator import TranslatorTrainConfig, _init_architecture, _init_generator

    cfg = TranslatorTrainConfig(data=[str(tmp_path)], out=str(tmp_path / "run"), init_weights="pretrained")
    cfg.model = _init_architecture(cfg)
    G = _init_generator(cfg)
    shipped = TSGAN.from_pretrained("pretrained").translator
    assert cfg.model.num_downs == shipped.cfg.num_downs and cfg.model.ngf == shipped.cfg.ngf
    assert G.training
    for (k, a), b in zip(G.state_dict().items(), shipped.state_dict().values()):
        assert torch.equal(a.float(), b.float()), k
    with pytest.raises(NoduleSynthError, match="no translator.safetensors"):
        _init_architecture(TranslatorTrainConfig(data=[str(tmp_path)], out=str(tmp_path / "r2"), init_weights=str(tmp_path)))


def test_init_weights_run_records_and_resumes_the_init_architecture(data_dir, translator_runs, tmp_path):
    """The run folder's config.json holds the network that trains (the init's, not the flags'), and
    --resume of such a run passes its architecture check."""
    full, _ = translator_runs
    init = str(full / "export")
    flags = dict(model=TranslatorConfig(**{**TR_MODEL, "ngf": 8}), init_weights=init)  # ngf 8 on the flags, 4 in the init
    run = train_translator(tr_cfg(data_dir, tmp_path / "ft", max_steps=2, **flags))
    saved = json.loads((run / "config.json").read_text())["model"]
    assert saved["ngf"] == TR_MODEL["ngf"] and saved["ndf"] == TR_MODEL["ndf"]
    train_translator(tr_cfg(data_dir, tmp_path / "ft", max_steps=3, resume=True, **flags))
    assert json.loads((run / "export" / "translator.json").read_text())["config"]["ngf"] == TR_MODEL["ngf"]


def test_init_weights_with_noise_starts_from_the_same_output(tmp_path):
    """--init-weights + --noise adds decoder noise at zero scale: the output equals the init network's."""
    import dataclasses

    from nodulesynth.models.tsgan import TSGAN
    from nodulesynth.train.translator import TranslatorTrainConfig, _init_architecture, _init_generator

    cfg = TranslatorTrainConfig(data=[str(tmp_path)], out=str(tmp_path / "run"), init_weights="pretrained")
    cfg.model = _init_architecture(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, noise=True)))
    G = _init_generator(cfg).eval()
    shipped = TSGAN.from_pretrained("pretrained").translator.float().eval()
    assert cfg.model.noise and G.noises is not None and shipped.noises is None
    assert all(float(n.weight.detach().abs().max()) == 0 for n in G.noises)
    onehot = torch.nn.functional.one_hot(torch.randint(0, 6, (1, 128, 128)), 6).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        assert torch.allclose(G(onehot, noise_seeds=[3]), shipped(onehot), atol=1e-5)
        G.noises[0].weight.fill_(1.0)  # once learned, the noise changes the output
        assert not torch.allclose(G(onehot, noise_seeds=[3]), shipped(onehot), atol=1e-3)


def test_mask_fine_tune_starts_at_full_resolution_and_warms_the_critic(data_dir, mask_runs, tmp_path):
    """--init-weights: G starts as the given generator (its config replaces the model flags), every
    step is at the full resolution, and during --critic-warmup only the fresh critic learns."""
    from nodulesynth.train.masks import MaskTrainer

    full = mask_runs[0]
    cfg = mask_cfg(data_dir, tmp_path, init_weights=str(full / "export"), critic_warmup=2, final_level_steps=3,
                   model=MaskGANConfig(resolution=64), nodule_only=False)
    t = _ready(MaskTrainer(cfg), tmp_path)
    assert cfg.model.resolution == 8 and t.total_steps() == 3 and len(t.sources) == 8
    init = {k: v.detach().clone() for k, v in t.G.named_parameters()}  # (buffers: w_avg tracks anyway)
    d0 = {k: v.detach().clone() for k, v in t.D.named_parameters()}
    for step, batch in enumerate(t.batches(0, 3)):
        level, alpha, real = batch
        assert (level, alpha) == (cfg.model.num_levels - 1, 1.0) and real.shape[-1] == 8
        t.step = step
        t.train_step(batch)
        moved = any(not torch.equal(v, dict(t.G.named_parameters())[k]) for k, v in init.items())
        assert moved == (step >= 2), step
    assert any(not torch.equal(v, dict(t.D.named_parameters())[k]) for k, v in d0.items())
    with pytest.raises(NoduleSynthError, match="no mask_generator.safetensors"):
        _ready(MaskTrainer(mask_cfg(data_dir, tmp_path / "x", init_weights=str(tmp_path))), tmp_path / "x")


def test_sources_leave_out_patients_held_out_in_another_dataset(tmp_path):
    """Each collection splits its own patients: a patient who is TRAIN in one --data folder and
    held out in another (an LIDC patient in both the sample slices and the nodule crops) trains in
    neither, so the held-out evaluation never sees a patient a model learnt from."""
    from nodulesynth.data.slices import write_slice_dataset
    from nodulesynth.train.sources import SliceSources

    images, masks, records = synth_slices(4, 32)
    for r, (p, s) in zip(records, [("P1", "train"), ("P1", "train"), ("P2", "train"), ("P3", "train")]):
        r.patient, r.split = p, s
    a = write_slice_dataset(tmp_path / "a", images, masks, records)
    images, masks, records = synth_slices(2, 32)
    for r, (p, s) in zip(records, [("P1", "test"), ("P4", "train")]):
        r.patient, r.split = p, s
    b = write_slice_dataset(tmp_path / "b", images, masks, records)
    src = SliceSources([str(a), str(b)], "train")
    assert [src.record(int(g)).patient for g in src.indices] == ["P2", "P3", "P4"] and src.excluded == 2
    assert len(SliceSources([str(a)], "train")) == 4  # alone, dataset a keeps its own split
    assert len(SliceSources([str(a), str(b)], None)) == 6  # "all" leaves nobody out
