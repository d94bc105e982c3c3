"""Issue 14, "silent substitutions" and "evaluation hygiene": nothing is quietly swapped for
something else (hub errors → shipped weights, a typo'd path → hub id, broken configs/weights →
late tracebacks, huge seeds → small seeds, NaN outputs → labelled images)."""
from __future__ import annotations

import json

import httpx2
import numpy as np
import pytest
import torch
from huggingface_hub import errors as hf_errors

import nodulesynth.models.tsgan as tsgan_mod
from nodulesynth.errors import NoduleSynthError
from nodulesynth.models.tsgan import TSGAN
from test_tsgan_io import tiny_tsgan


# ----------------------------------------------------------------------------- 1. hub fallback
def _response(code: int) -> httpx2.Response:
    return httpx2.Response(code, request=httpx2.Request("GET", "https://huggingface.co/api/models/someone/x"))


def _wrapped(outer: Exception, cause: Exception) -> Exception:
    """What huggingface_hub 2.x raises: a LocalEntryNotFoundError ``from`` the real failure."""
    try:
        try:
            raise cause
        except Exception as c:
            raise outer from c
    except Exception as e:  # noqa: BLE001
        return e


OFFLINE = {
    "HF_HUB_OFFLINE": lambda: _wrapped(hf_errors.LocalEntryNotFoundError("offline"), hf_errors.OfflineModeIsEnabled("x")),
    "connect error": lambda: _wrapped(hf_errors.LocalEntryNotFoundError("no net"), httpx2.ConnectError("refused")),
    "timeout": lambda: httpx2.ConnectTimeout("timed out"),
    "bare offline": lambda: hf_errors.LocalEntryNotFoundError("offline, nothing cached"),
}
NOT_OFFLINE = {
    "HTTP 500 wrapped": lambda: _wrapped(hf_errors.LocalEntryNotFoundError("hub down"),
                                         hf_errors.HfHubHTTPError("500 Server Error", response=_response(500))),
    "HTTP 500": lambda: hf_errors.HfHubHTTPError("500 Server Error", response=_response(500)),
    "permission error on the cache": lambda: PermissionError(13, "Permission denied", "/root/.cache/huggingface"),
    "repo not found": lambda: hf_errors.RepositoryNotFoundError("404", response=_response(404)),
    "revision not found": lambda: hf_errors.RevisionNotFoundError("404", response=_response(404)),
    "gated": lambda: hf_errors.GatedRepoError("403", response=_response(403)),
    "incomplete snapshot": lambda: hf_errors.IncompleteSnapshotError("partial download"),
}


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    folder = tmp_path / "shipped"
    tiny_tsgan().save_pretrained(folder)
    monkeypatch.setattr(tsgan_mod, "DEFAULT_WEIGHTS_DIR", folder)
    return folder


def _stub_hub(monkeypatch, make_error):
    import huggingface_hub

    calls = []

    def fake(repo_id, revision=None, allow_patterns=None, **_):
        calls.append(repo_id)
        raise make_error()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return calls


@pytest.mark.parametrize("case", sorted(OFFLINE))
def test_hub_offline_or_unreachable_falls_back(case, shipped, monkeypatch, caplog):
    calls = _stub_hub(monkeypatch, OFFLINE[case])
    model = TSGAN.from_pretrained("someone/tsgan-lidc")
    assert calls == ["someone/tsgan-lidc"] and model.source == f"local:{shipped.resolve()}"
    assert "falling back to the shipped weights" in caplog.text


@pytest.mark.parametrize("case", sorted(NOT_OFFLINE))
def test_hub_errors_other_than_offline_are_raised_never_substituted(case, shipped, monkeypatch):
    calls = _stub_hub(monkeypatch, NOT_OFFLINE[case])
    with pytest.raises(NoduleSynthError, match=r"--weights someone/tsgan-lidc@v2: .*(hub|revision)"):
        TSGAN.from_pretrained("someone/tsgan-lidc", revision="v2")
    assert calls == ["someone/tsgan-lidc"]


@pytest.mark.parametrize("weights", ["w/nope", "./nope", "~/nope-nodulesynth", "w/sub/nope", "w\\nope", "-x/y"])
def test_path_like_weights_are_an_error_never_the_hub_or_shipped(weights, shipped, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w").mkdir()  # `w/nope`: a typo of a folder beside an existing w/
    calls = _stub_hub(monkeypatch, OFFLINE["HF_HUB_OFFLINE"])
    with pytest.raises(NoduleSynthError, match="no such folder"):
        TSGAN.from_pretrained(weights)
    assert calls == []


def test_dataset_weights_typo_is_an_error(shipped, tmp_path, monkeypatch):
    from nodulesynth.synth.dataset import SyntheticNoduleDataset

    monkeypatch.chdir(tmp_path)
    (tmp_path / "w").mkdir()
    calls = _stub_hub(monkeypatch, OFFLINE["HF_HUB_OFFLINE"])
    with pytest.raises(NoduleSynthError, match="w/nope: no such folder"):
        SyntheticNoduleDataset(2, weights="w/nope", device="cpu")
    assert calls == []


# ----------------------------------------------------------------------------- 2. configs at load
def _edit(path, **changes):
    d = json.loads(path.read_text(encoding="utf-8"))
    target = d["config"] if "config" in d else d
    for k, v in changes.items():
        if k.startswith("meta."):
            d.setdefault("meta", {})[k[5:]] = v
        else:
            target[k] = v
    path.write_text(json.dumps(d))


@pytest.mark.parametrize("file,field,value,match", [
    ("tsgan.json", "image_size", "big", r"tsgan\.json: image_size='big': must be an integer power of two"),
    ("tsgan.json", "image_size", 100, r"tsgan\.json: image_size=100: must be an integer power of two"),
    ("tsgan.json", "image_size", 8, r"tsgan\.json: image_size=8: must be a multiple of 2\*\*num_downs = 16"),
    ("tsgan.json", "image_size", True, r"image_size=True"),
    ("tsgan.json", "version", "one", r"tsgan\.json: version='one'"),
    ("tsgan.json", "meta.spacing_mm", -0.8, r"tsgan\.json: meta\.spacing_mm=-0\.8"),
    ("tsgan.json", "meta.spacing_mm", "0.8", r"meta\.spacing_mm='0\.8'"),
    ("translator.json", "ngf", -3, r"translator\.json: TranslatorConfig\.ngf=-3: must be ≥ 1"),
    ("translator.json", "ngf", 4.5, r"TranslatorConfig\.ngf=4\.5: must be an integer"),
    ("translator.json", "lia", "yes", r"TranslatorConfig\.lia='yes': must be true or false"),
    ("translator.json", "dropout", float("nan"), r"TranslatorConfig\.dropout=nan: must be a finite number"),
    ("translator.json", "dropout", 3.0, r"TranslatorConfig\.dropout=3\.0: must be in \[0, 1\]"),
    ("translator.json", "in_classes", 5, r"translator\.json: in_classes=5: must be 6"),
    ("translator.json", "dwmh_heads", 3, r"translator\.json: the config does not describe a buildable"),
    ("mask_generator.json", "resolution", "big", r"MaskGANConfig\.resolution='big': must be an integer"),
    ("mask_generator.json", "resolution", 32, r"tsgan\.json: image_size=16: smaller than the mask generator"),
    ("mask_generator.json", "z_dim", 0, r"MaskGANConfig\.z_dim=0: must be ≥ 1"),
    ("mask_generator.json", "fmap_base", 10**9, r"mask_generator\.safetensors: does not match"),
])
def test_bad_config_values_fail_at_load_with_file_and_field(tmp_path, file, field, value, match):
    folder = tmp_path / "w"
    tiny_tsgan().save_pretrained(folder)
    _edit(folder / file, **{field: value})
    with pytest.raises(NoduleSynthError, match=match):
        TSGAN.from_pretrained(folder)


# ----------------------------------------------------------------------------- 4. NaN weights
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_at_load(tmp_path, bad):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "w"
    tiny_tsgan().save_pretrained(folder)
    path = folder / "translator.safetensors"
    state = load_file(str(path))
    key = sorted(k for k, v in state.items() if v.is_floating_point())[0]
    state[key] = state[key].clone()
    state[key].view(-1)[0] = bad
    save_file(state, str(path))
    with pytest.raises(NoduleSynthError, match=rf"translator\.safetensors: 1 tensor\(s\) hold NaN or inf values \({key}"):
        TSGAN.from_pretrained(folder)


# ----------------------------------------------------------------------------- 3. seeds
@pytest.mark.parametrize("seed", [2**63, 2**64 + 5, -1, 1.5, True, "7"])
def test_seeds_that_would_alias_or_are_not_ints_are_refused(seed, shipped):
    from nodulesynth.synth.dataset import SyntheticNoduleDataset
    from nodulesynth.synth.pipeline import GenerationConfig

    with pytest.raises(NoduleSynthError, match=r"seed: must be an integer in \[0, 2\*\*63 - 1\]"):
        GenerationConfig(seed=seed).validate()
    with pytest.raises(NoduleSynthError, match=r"seed: must be an integer in \[0, 2\*\*63 - 1\]"):
        SyntheticNoduleDataset(2, weights=str(shipped), seed=seed, device="cpu")


def test_largest_seed_is_accepted_and_distinct(shipped):
    from nodulesynth.synth.pipeline import MAX_SEED, GenerationConfig, sample_seed

    GenerationConfig(seed=MAX_SEED).validate()
    assert sample_seed(MAX_SEED, 0, 0) != sample_seed(MAX_SEED - 2**63 + 1, 0, 0)


def test_generate_cli_refuses_a_huge_seed_in_one_line(shipped, tmp_path, capsys):
    from nodulesynth.cli import main

    rc = main(["generate", "--n", "2", "--out", str(tmp_path / "o"), "--weights", str(shipped), "--device", "cpu",
               "--seed", str(2**64 + 5)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "seed" in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- 4. NaN outputs
def _nan_synth(nan_rows):
    """A synthesizer whose translator output is NaN for the given (call, row) pairs."""
    from nodulesynth.synth.pipeline import GenerationConfig, Synthesizer

    synth = Synthesizer(tiny_tsgan(), GenerationConfig(seed=0, block=4, gate=False, min_nodules=0, max_attempts=3,
                                                       nodules="stylegan"))
    real, calls = synth._translate, []

    def translate(masks, *args, **kwargs):
        hu = real(masks, *args, **kwargs).clone()
        for c, r in nan_rows:
            if c == len(calls) and r < len(hu):
                hu[r, 0, 0] = float("nan") if r % 2 == 0 else float("inf")
        calls.append(len(masks))
        return hu

    synth._translate = translate
    return synth


def test_non_finite_generated_slices_are_rejected_and_redrawn():
    clean = _nan_synth([]).generate(range(4))
    synth = _nan_synth([(0, 1), (0, 2)])
    out = synth.generate(range(4))
    assert torch.isfinite(out.images_hu).all()
    assert synth.stats.rejected["non-finite HU"] == 2 and synth.stats.accepted == 4
    assert [p["attempt"] for p in out.provenance] == [0, 1, 1, 0]
    assert torch.equal(out.images_hu[[0, 3]], clean.images_hu[[0, 3]])


def test_always_non_finite_output_is_an_error_not_a_labelled_slice():
    synth = _nan_synth([(c, 0) for c in range(10)])
    with pytest.raises(NoduleSynthError, match=r"sample 0: .*3 attempts.*non-finite HU"):
        synth.generate(range(2))
    masks = np.zeros((2, 16, 16), np.uint8)
    with pytest.raises(NoduleSynthError, match=r"mask a\.npy: the translator produced NaN/inf HU"):
        _nan_synth([(0, 0)]).translate(masks, names=["a.npy", "b.npy"])


# ----------------------------------------------------------------------------- 6. spacing, 10. one card
def _runs(tmp_path, spacing=(0.7, 0.7), translator_spacing=None):
    """Two finished-run folders (export/ + run.json + config.json naming a prepared data folder)."""
    from nodulesynth.models.io import save_module

    model = tiny_tsgan()
    runs = {}
    for name, net, cfg, sp in (("mask_generator", model.mask_generator, model.mask_config, spacing),
                               ("translator", model.translator, model.translator_config, translator_spacing or spacing)):
        run, data = tmp_path / f"run-{name}", tmp_path / f"data-{name}"
        save_module(net, cfg, run / "export", name)
        data.mkdir()
        (data / "index.json").write_text(json.dumps({"meta": {}, "records": [{"spacing_mm": list(sp)}] * 3}))
        (run / "config.json").write_text(json.dumps({"data": str(data)}))
        (run / "run.json").write_text(json.dumps({"trainer": name, "step": 7, "image_size": 16}))
        runs[name] = run
    return runs["mask_generator"], runs["translator"]


def test_train_export_records_training_spacing_and_the_generator_uses_it(tmp_path, capsys):
    from nodulesynth.cli import main
    from nodulesynth.synth.pipeline import GenerationConfig, Synthesizer

    masks, translator = _runs(tmp_path)
    out = tmp_path / "tsgan"
    assert main(["train", "export", "--masks", str(masks), "--translator", str(translator), "--out", str(out)]) == 0
    assert json.loads((out / "tsgan.json").read_text(encoding="utf-8"))["meta"]["spacing_mm"] == 0.7
    model = TSGAN.from_pretrained(out)
    assert model.spacing_mm == 0.7
    assert Synthesizer(model, GenerationConfig(gate=False, min_nodules=0)).spacing_mm == 0.7
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "Pixel spacing: 0.7 mm per pixel" in card and "not for" in card and "diagnosis" in card


def test_export_refuses_unknown_or_conflicting_spacing(tmp_path):
    import shutil

    from nodulesynth.models.export import export_tsgan

    masks, translator = _runs(tmp_path / "a", translator_spacing=(0.8, 0.8))
    with pytest.raises(NoduleSynthError, match="different pixel spacings"):
        export_tsgan(masks, translator, tmp_path / "o1")
    masks, translator = _runs(tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "data-mask_generator")
    shutil.rmtree(tmp_path / "b" / "data-translator")
    with pytest.raises(NoduleSynthError, match="cannot tell the pixel spacing"):
        export_tsgan(masks, translator, tmp_path / "o2")
    export_tsgan(masks, translator, tmp_path / "o3", spacing_mm=0.65)
    assert TSGAN.from_pretrained(tmp_path / "o3").spacing_mm == 0.65


def test_one_model_card_writer():
    """models/card.py writes every card: save_pretrained, train export and the shipped-weights recipe."""
    from pathlib import Path

    import nodulesynth.train.engine as engine
    from nodulesynth.models import export

    assert engine.export_tsgan is export.export_tsgan
    root = Path(__file__).resolve().parents[1]
    writers = [p.relative_to(root).as_posix() for p in [*root.glob("nodulesynth/**/*.py"), *root.glob("benchmarks/*.py")]
               if "## Intended use" in p.read_text(encoding="utf-8") or "library_name: nodulesynth" in p.read_text(encoding="utf-8")
               or "def _model_card" in p.read_text(encoding="utf-8")]
    assert writers == ["nodulesynth/models/card.py"]
    assert "export_tsgan" in (root / "benchmarks" / "default_weights.py").read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- 7. one nodule size
def test_one_nodule_size_definition_for_conditions_gate_and_statistics():
    """A 2×10 px nodule at 1 mm/px is 10 mm (longest in-plane extent) for the statistics, the size
    conditions and the gate alike; a 2×2 px one (2 mm) fails the gate's 3 mm minimum."""
    from nodulesynth.masks.classes import MaskClass as C
    from nodulesynth.metrics.nodules import nodule_size_mm, nodule_stats
    from nodulesynth.synth.pipeline import GenerationConfig, quality_gate

    m = np.full((3, 64, 64), C.BODY, np.uint8)
    m[:, 10:50, 6:28], m[:, 10:50, 36:58] = C.RIGHT_LUNG, C.LEFT_LUNG
    m[0, 20:22, 10:20] = C.NODULE  # 2 × 10 px sliver: 10 mm long, ~3.6 mm equivalent diameter
    m[1, 20:26, 10:16] = C.NODULE  # 6 × 6 px: 6 mm
    m[2, 20:22, 10:12] = C.NODULE  # 2 × 2 px: 2 mm
    stats = nodule_stats(m, 1.0)
    assert stats.sizes_mm.tolist() == [10.0, 6.0, 2.0]
    assert nodule_size_mm(np.array([[10, 20, 20, 22]]), 1.0).tolist() == [10.0]
    t = torch.from_numpy(m)
    passed, why, _ = quality_gate(t, GenerationConfig(min_size_mm=8), 1.0)
    assert passed.tolist() == [True, False, False] and why[1:] == ["nodule condition", "invalid nodule"]
    passed, why, _ = quality_gate(t, GenerationConfig(max_size_mm=7), 1.0)
    assert passed.tolist() == [False, True, False]
    passed, _, _ = quality_gate(t, GenerationConfig(min_nodule_mm=1.5), 1.0)
    assert passed.tolist() == [True, True, True]


# ----------------------------------------------------------------------------- 8. flips swap lungs
@pytest.fixture
def real_scene(tmp_path):
    from scenes import scene_mask

    from nodulesynth.data.slices import SliceRecord, write_slice_dataset

    m = scene_mask([(45, 30, 3)])
    hu = np.where(m == 0, -1000, np.where(m == 1, 40, -850)).astype(np.int16)
    rec = SliceRecord("s1", 0.0, 0, (1.0, 1.0), np.array([[42, 27, 49, 34]], np.float32), "phantom", True)
    return write_slice_dataset(tmp_path / "real", hu[None], m[None], [rec]), m


@pytest.mark.parametrize("flip,swapped", [("HorizontalFlip", True), ("VerticalFlip", False), (None, False)])
def test_albumentations_mirror_swaps_left_and_right_lung_labels(real_scene, flip, swapped):
    import albumentations as A

    from nodulesynth.masks.classes import MaskClass as C
    from nodulesynth.synth.dataset import SyntheticNoduleDataset

    folder, m = real_scene
    transform = [getattr(A, flip)(p=1.0)] if flip else [A.RandomBrightnessContrast(p=1.0)]
    item = SyntheticNoduleDataset(0, real=folder, transform=transform, device="cpu")[0]
    mask = item["mask"].numpy()
    expect = m[:, ::-1] if flip == "HorizontalFlip" else m[::-1] if flip else m
    if swapped:
        expect = np.where(expect == C.LEFT_LUNG, C.RIGHT_LUNG, np.where(expect == C.RIGHT_LUNG, C.LEFT_LUNG, expect))
    assert np.array_equal(mask, expect)
    # the convention holds after any of them: the patient's left lung lies on the image's right
    assert np.nonzero(mask == C.LEFT_LUNG)[1].mean() > np.nonzero(mask == C.RIGHT_LUNG)[1].mean()
    assert item["boxes"].shape == (1, 4)


# ----------------------------------------------------------------------------- 9. paper citations
def test_no_paper_citation_for_what_the_paper_does_not_say():
    """The paper states no display window (its PSNR uses MAX = 4095 on 12-bit CT): nothing may
    attribute the [-1000, 400] HU lung window to it."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "nodulesynth"
    bad = re.compile(r"paper, Sec\. 4: \[-1000|paper's lung window|as the paper's detectors saw", re.I)
    hits = [f"{p.relative_to(root)}:{i}" for p in root.rglob("*.py")
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if bad.search(line)]
    assert hits == []


def test_export_reads_spacing_from_several_data_folders(tmp_path):
    from nodulesynth.models.export import export_tsgan

    masks, translator = _runs(tmp_path)
    other = tmp_path / "data-other"
    other.mkdir()
    (other / "index.json").write_text(json.dumps({"meta": {}, "records": [{"spacing_mm": [0.9, 0.9]}]}))
    for run in (masks, translator):
        cfg = json.loads((run / "config.json").read_text(encoding="utf-8"))
        (run / "config.json").write_text(json.dumps({"data": [cfg["data"], str(other)]}))
    with pytest.raises(NoduleSynthError, match="different pixel spacings"):
        export_tsgan(masks, translator, tmp_path / "o")
    (other / "index.json").write_text(json.dumps({"meta": {}, "records": [{"spacing_mm": [0.7, 0.7]}]}))
    export_tsgan(masks, translator, tmp_path / "o")
    assert TSGAN.from_pretrained(tmp_path / "o").spacing_mm == 0.7


def test_generate_cli_weights_typo_is_one_line_never_the_shipped_weights(shipped, tmp_path, monkeypatch, capsys):
    from nodulesynth.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "w").mkdir()
    calls = _stub_hub(monkeypatch, OFFLINE["HF_HUB_OFFLINE"])
    rc = main(["generate", "--n", "2", "--out", "o", "--weights", "w/nope", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "w/nope: no such folder" in err and len(err.splitlines()) == 1 and calls == []
    assert not (tmp_path / "o").exists()
