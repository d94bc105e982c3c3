"""Assemble a TSGAN weights folder (``TSGAN.save_pretrained`` layout) from two finished training
runs, or one run and the other stage of a weights folder: what ``nodulesynth train export`` does.

It also records the pixel spacing of the training slices in ``tsgan.json`` (``meta.spacing_mm``):
every mm quantity downstream (size conditions, the quality gate's 3 mm, exported provenance) is
pixels × this spacing, so weights trained at another ``prepare --spacing`` must say so.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import NoduleSynthError
from ..io import check_out_dir

if TYPE_CHECKING:
    import torch


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise NoduleSynthError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(d, dict):
        raise NoduleSynthError(f"{path}: expected a JSON object")
    return d


def data_spacing_mm(data: str | os.PathLike) -> float:
    """The one in-plane spacing (mm/pixel) of a prepared slice dataset (its index.json records)."""
    index = Path(data) / "index.json"
    if not index.is_file():
        raise NoduleSynthError(f"{data}: no index.json (not a prepared slice dataset)")
    records = _read_json(index).get("records") or []
    values = set()
    for r in records:
        sp = r.get("spacing_mm") if isinstance(r, dict) else None
        if not isinstance(sp, (list, tuple)) or not sp:
            raise NoduleSynthError(f"{index}: a record lacks spacing_mm")
        values.update(round(float(v), 6) for v in sp)
    if not values:
        raise NoduleSynthError(f"{index}: no records, so no pixel spacing")
    if len(values) != 1:
        raise NoduleSynthError(f"{index}: slices have different pixel spacings {sorted(values)} mm; a TSGAN "
                               "needs one spacing (prepare all data with the same --spacing)")
    return values.pop()


def run_spacing_mm(run: Path) -> float | None:
    """Spacing of a training run: ``run.json`` "spacing_mm" if the trainer recorded it, else the
    spacing of the dataset its ``config.json`` names (None when that folder is gone)."""
    if (run / "run.json").is_file():
        sp = _read_json(run / "run.json").get("spacing_mm")
        if sp is not None:
            return float(sp)
    if (run / "config.json").is_file():
        data = _read_json(run / "config.json").get("data")
        found = {}
        for d in (data if isinstance(data, list) else [data] if data else []):  # trainers take several --data
            for folder in (Path(d), run.parent / d):  # as given, or relative to the run
                if (folder / "index.json").is_file():
                    found[str(d)] = data_spacing_mm(folder)
                    break
        if len(set(found.values())) > 1:
            raise NoduleSynthError(f"{run / 'config.json'}: its data folders have different pixel spacings {found} mm")
        if found:
            return next(iter(found.values()))
    return None


_TRAINING_KEY = {"mask_generator": "mask_training", "translator": "translator_training",
                 "lung_texture": "lung_texture_training", "body_texture": "body_texture_training",
                 "nodule_texture": "nodule_texture_training"}


def _stage_source(arg: str | os.PathLike, name: str, flag: str) -> tuple[Path, dict | None, float | None]:
    """(folder holding ``name.safetensors``, its training record, its pixel spacing) of a training
    run (its export/) or of a weights folder ("pretrained", a TSGAN folder): so one stage can be
    retrained and paired with the other stage of shipped weights."""
    from .tsgan import DEFAULT_WEIGHTS_DIR

    path = Path(DEFAULT_WEIGHTS_DIR) if str(arg) == "pretrained" else Path(arg)
    if (path / "export" / f"{name}.safetensors").is_file():
        record = _read_json(path / "run.json") if (path / "run.json").is_file() else None
        return path / "export", record, run_spacing_mm(path)
    if (path / f"{name}.safetensors").is_file() and (path / "tsgan.json").is_file():
        meta = _read_json(path / "tsgan.json").get("meta") or {}
        sp = meta.get("spacing_mm")
        return path, meta.get(_TRAINING_KEY[name]), float(sp) if isinstance(sp, (int, float)) else None
    raise NoduleSynthError(f"{flag} {arg}: no export/{name}.safetensors (train it to the end or until max_steps "
                           "first) and not a weights folder (tsgan.json beside it)")


def export_tsgan(mask_run: str | os.PathLike, translator_run: str | os.PathLike, out: str | os.PathLike,
                 model_card_extra: str | None = None, overwrite: bool = False,
                 spacing_mm: float | None = None, dtype: "torch.dtype | None" = None,
                 data_note: str | None = None, lung_texture: str | os.PathLike | None = None,
                 body_texture: str | os.PathLike | None = None,
                 nodule_texture: str | os.PathLike | None = None) -> Path:
    """Write ``out`` from ``mask_run`` and ``translator_run``: each a training run (its export/) or a
    weights folder ("pretrained": the shipped one); ``spacing_mm`` overrides the spacing read from
    them (needed only when a run's data folders are gone); ``dtype`` (torch.float16 for shipping)
    and ``data_note`` (one line: what the weights saw) are optional; ``lung_texture``,
    ``body_texture`` and ``nodule_texture`` add the texture model of that run or weights folder
    (none by default)."""
    from .io import load_module
    from .pix2pix import DLPix2PixGenerator, TranslatorConfig
    from .stylegan import MaskGANConfig, MaskGenerator
    from .tsgan import TSGAN

    out = Path(out)
    (mask_dir, mask_rec, mask_sp), (tr_dir, tr_rec, tr_sp) = (
        _stage_source(mask_run, "mask_generator", "--masks"), _stage_source(translator_run, "translator", "--translator"))
    if spacing_mm is None:
        found = {arg: sp for arg, sp in (("--masks", mask_sp), ("--translator", tr_sp)) if sp is not None}
        if len({round(v, 6) for v in found.values()}) > 1:
            raise NoduleSynthError(f"the two runs were trained at different pixel spacings {found} mm; "
                                   "train both stages on data prepared with the same --spacing")
        if not found:
            raise NoduleSynthError(f"--masks {mask_run} / --translator {translator_run}: cannot tell the pixel spacing "
                                   "of the training data (their data folders named in config.json are gone); "
                                   "pass spacing_mm")
        spacing_mm = next(iter(found.values()))
    if not (isinstance(spacing_mm, (int, float)) and math.isfinite(spacing_mm) and 0 < spacing_mm <= 20):
        raise NoduleSynthError(f"spacing_mm: must be a pixel size in mm (0 < spacing ≤ 20), got {spacing_mm!r}")
    mask_g = load_module(MaskGenerator, MaskGANConfig, mask_dir, "mask_generator")
    translator = load_module(DLPix2PixGenerator, TranslatorConfig, tr_dir, "translator")
    meta: dict[str, Any] = {"mask_run": str(mask_run), "translator_run": str(translator_run)}
    textures, inputs = {}, [("--masks", mask_run), ("--translator", translator_run)]
    for name, run in (("lung_texture", lung_texture), ("body_texture", body_texture),
                      ("nodule_texture", nodule_texture)):
        if run is None:
            continue
        from .tsgan import TEXTURES

        config_cls, attr, module_cls = TEXTURES[name]
        flag = "--" + name.replace("_", "-")
        tex_dir, tex_rec, _ = _stage_source(run, name, flag)
        textures[attr] = load_module(module_cls, config_cls, tex_dir, name)
        inputs.append((flag, run))
        meta[f"{name}_run"] = str(run)
        if tex_rec is not None:
            meta[f"{name}_training"] = tex_rec
    for key, record in (("mask_training", mask_rec), ("translator_training", tr_rec)):
        if record is not None:
            meta[key] = record
    meta["spacing_mm"] = float(spacing_mm)
    if data_note:
        meta["data"] = data_note
    image_size = meta.get("translator_training", {}).get("image_size", 512)
    model = TSGAN(mask_g, translator, {**meta, "image_size": image_size}, **textures)
    check_out_dir(out, overwrite, inputs=inputs)
    model.save_pretrained(out, card_extra=model_card_extra, overwrite=overwrite, dtype=dtype)
    return out
