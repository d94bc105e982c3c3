"""Weights I/O (safetensors + JSON) and TSGAN loading: local folders, the shipped default, hub fallback."""
from __future__ import annotations

import json
import logging

import pytest
import torch

import nodulesynth.models.tsgan as tsgan_mod
from nodulesynth.errors import NoduleSynthError
from nodulesynth.models.io import load_module, save_module
from nodulesynth.models.pix2pix import DLPix2PixGenerator, TranslatorConfig, one_hot
from nodulesynth.models.stylegan import MaskGANConfig, MaskGenerator
from nodulesynth.models.tsgan import TSGAN


def tiny_configs() -> tuple[MaskGANConfig, TranslatorConfig]:
    mask = MaskGANConfig(resolution=16, z_dim=8, w_dim=8, mapping_layers=2, fmap_base=64, fmap_max=8, fmap_min=4)
    translator = TranslatorConfig(ngf=4, ndf=4, num_downs=4, dwmh_depth=3, dwmh_heads=4)
    return mask, translator


def tiny_tsgan(seed: int = 0) -> TSGAN:
    torch.manual_seed(seed)
    return TSGAN.from_configs(*tiny_configs(), image_size=16, meta={"steps": 123})


def test_round_trip_bit_identical_fp32(tmp_path):
    _, cfg = tiny_configs()
    torch.manual_seed(0)
    net = DLPix2PixGenerator(cfg).eval()
    save_module(net, cfg, tmp_path, "translator")
    assert json.loads((tmp_path / "translator.json").read_text(encoding="utf-8"))["config"]["ngf"] == 4
    back = load_module(DLPix2PixGenerator, TranslatorConfig, tmp_path, "translator")
    assert not back.training
    a, b = net.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = one_hot(torch.randint(0, 6, (1, 16, 16)))
    assert torch.equal(net(x), back(x))


def test_fp16_round_trip_is_close_and_fp32(tmp_path):
    mask_cfg, _ = tiny_configs()
    torch.manual_seed(0)
    net = MaskGenerator(mask_cfg).eval()
    path = save_module(net, mask_cfg, tmp_path, "mask_generator", dtype=torch.float16)
    full = save_module(net, mask_cfg, tmp_path / "fp32", "mask_generator")
    assert path.stat().st_size < 0.6 * full.stat().st_size
    back = load_module(MaskGenerator, MaskGANConfig, tmp_path, "mask_generator")
    assert all(p.dtype == torch.float32 for p in back.parameters())
    for k, v in net.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=1e-3, atol=1e-3)


def test_missing_corrupt_and_mismatched_files(tmp_path):
    _, cfg = tiny_configs()
    net = DLPix2PixGenerator(cfg)
    with pytest.raises(NoduleSynthError, match="translator.json"):
        load_module(DLPix2PixGenerator, TranslatorConfig, tmp_path, "translator")
    save_module(net, cfg, tmp_path, "translator")
    weights = tmp_path / "translator.safetensors"
    good = weights.read_bytes()
    # corrupt: truncated, and garbage
    for bad in (good[: len(good) // 2], b"\x00" * 64):
        weights.write_bytes(bad)
        with pytest.raises(NoduleSynthError, match=r"translator\.safetensors.*corrupt"):
            load_module(DLPix2PixGenerator, TranslatorConfig, tmp_path, "translator")
    weights.unlink()
    with pytest.raises(NoduleSynthError, match=r"translator\.safetensors: weights file not found"):
        load_module(DLPix2PixGenerator, TranslatorConfig, tmp_path, "translator")
    weights.write_bytes(good)
    meta_path = tmp_path / "translator.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    # shape mismatch: config says a wider network than the weights hold
    meta["config"]["ngf"] = 8
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(NoduleSynthError, match=r"translator\.safetensors: does not match.*wrong shapes"):
        load_module(DLPix2PixGenerator, TranslatorConfig, tmp_path, "translator")
    # unexpected keys: the weights have LIA blocks the config switches off
    meta["config"].update(ngf=4, lia=False)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(NoduleSynthError, match=r"unexpected skips\.0\.down\.bias.*more"):
        load_module(DLPix2PixGenerator, TranslatorConfig, tmp_path, "translator")
    # a config for a different network / unknown fields / broken JSON
    with pytest.raises(NoduleSynthError, match="expected a MaskGANConfig"):
        load_module(MaskGenerator, MaskGANConfig, tmp_path, "translator")
    meta["config"]["warp_drive"] = True
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(NoduleSynthError, match="unknown TranslatorConfig fields warp_drive"):
        load_module(DLPix2PixGenerator, TranslatorConfig, tmp_path, "translator")
    meta_path.write_text("{")
    with pytest.raises(NoduleSynthError, match="translator.json: not a readable JSON"):
        load_module(DLPix2PixGenerator, TranslatorConfig, tmp_path, "translator")


def test_save_pretrained_and_from_pretrained_local(tmp_path, caplog):
    model = tiny_tsgan()
    out = tmp_path / "export"
    model.save_pretrained(out)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(tsgan_mod.LAYOUT)
    info = json.loads((out / "tsgan.json").read_text(encoding="utf-8"))
    assert info["format"] == "nodulesynth-tsgan" and info["image_size"] == 16 and info["meta"] == {"steps": 123}
    assert "TSGAN" in (out / "README.md").read_text(encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="nodulesynth.models.tsgan"):
        back = TSGAN.from_pretrained(str(out))
    assert back.source == f"local:{out.resolve()}" and back.source in caplog.text
    assert len(back.revision) == 12 and int(back.revision, 16) >= 0
    assert back.image_size == 16 and back.meta["steps"] == 123
    assert back.mask_config == model.mask_config and back.translator_config == model.translator_config
    z = torch.randn(2, 8)
    masks, images = back(z)
    ref_masks, ref_images = model.eval()(z)
    assert masks.dtype == torch.uint8 and masks.shape == (2, 16, 16) and images.shape == (2, 1, 16, 16)
    assert torch.equal(masks, ref_masks) and torch.equal(images, ref_images)
    # re-export into the same folder replaces it; a custom card is kept verbatim; revision follows content
    tiny_tsgan(seed=1).save_pretrained(out, model_card="my card")
    assert (out / "README.md").read_text(encoding="utf-8") == "my card"
    assert TSGAN.from_pretrained(out).revision != back.revision
    # an unrelated non-empty folder is never clobbered
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(NoduleSynthError, match="not empty"):
        model.save_pretrained(other)
    assert (other / "notes.txt").exists()


def test_default_folder_without_weights_tells_user_to_train(tmp_path, monkeypatch):
    monkeypatch.setattr(tsgan_mod, "DEFAULT_WEIGHTS_DIR", tmp_path / "pretrained")
    with pytest.raises(NoduleSynthError, match="train them.*--weights"):
        TSGAN.from_pretrained()
    with pytest.raises(NoduleSynthError, match="not a TSGAN weights folder"):
        TSGAN.from_pretrained(tmp_path)
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(NoduleSynthError, match="is a file"):
        TSGAN.from_pretrained(tmp_path / "file.bin")


def test_hub_repo_offline_falls_back_to_shipped_folder(tmp_path, monkeypatch, caplog):
    import huggingface_hub.constants

    shipped = tmp_path / "pretrained"
    tiny_tsgan().save_pretrained(shipped)
    monkeypatch.setattr(tsgan_mod, "DEFAULT_WEIGHTS_DIR", shipped)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with caplog.at_level(logging.WARNING, logger="nodulesynth.models.tsgan"):
        model = TSGAN.from_pretrained("someone/tsgan-lidc", revision="main")
    assert model.source == f"local:{shipped.resolve()}"
    assert "falling back to the shipped weights" in caplog.text and "someone/tsgan-lidc@main" in caplog.text
    with pytest.raises(NoduleSynthError, match="no such folder"):
        TSGAN.from_pretrained("no/such/folder/here")  # path-like: never sent to the hub
    with pytest.raises(NoduleSynthError, match="no such folder"):
        TSGAN.from_pretrained("./runs/export_typo")


def test_hub_download_is_used_when_reachable(tmp_path, monkeypatch):
    """snapshot_download (stubbed: no network here) → loaded from its snapshot, source names repo@sha."""
    import huggingface_hub

    snap = tmp_path / "hub" / "snapshots" / ("ab" * 20)
    tiny_tsgan().save_pretrained(snap)
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **_):
        calls.append((repo_id, revision, allow_patterns))
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = TSGAN.from_pretrained("someone/tsgan-lidc", revision="v1")
    assert calls == [("someone/tsgan-lidc", "v1", tsgan_mod.HUB_PATTERNS)]
    assert model.source == f"hub:someone/tsgan-lidc@{'ab' * 20}" and model.revision == "ab" * 20
