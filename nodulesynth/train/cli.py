"""Train the TSGAN stages: `train masks` (StyleGAN), `train translator` (DL-Pix2Pix), `train lung-texture`
(the lung-parenchyma texture GAN), `train export`.

Every training flag is built from a field of the run's config dataclass (``MaskTrainConfig``,
``TranslatorTrainConfig`` and their ``model`` configs): name, type, default and help live once,
in the dataclass. Flags are parsed with no argparse defaults, so only what the user typed
overrides the dataclass (or, for the translator, the ``--preset``).

Multi-GPU: launch the same command with `torchrun --nproc_per_node=N -m nodulesynth train ...`.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import types
import typing
from typing import Any

MODEL_SKIP = {"in_classes", "out_channels", "num_classes"}  # fixed by the 6 mask classes / 1 CT channel


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(base type, is_list) of a field annotation: drops None from unions, picks list over str."""
    args = [a for a in typing.get_args(tp) if a is not type(None)] if _is_union(tp) else [tp]
    lists = [a for a in args if typing.get_origin(a) is list]
    return (lists[0], True) if lists else (args[0], False)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def add_config_arguments(p: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """One flag per field of dataclass ``cls`` (nested dataclass fields recurse, dest ``model.x``)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta, tp = f.metadata, hints[f.name]
        if meta.get("cli") is False or (prefix and f.name in MODEL_SKIP):
            continue
        if dataclasses.is_dataclass(tp):
            add_config_arguments(p, tp, prefix=f"{f.name}.")
            continue
        default = _default(f)
        base, _ = _unwrap(tp)
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        text = meta.get("help") or f"{prefix.rstrip('.') or 'run'} config field {f.name}"
        kw: dict[str, Any] = {"dest": prefix + f.name, "default": argparse.SUPPRESS}
        if base is bool:
            if default and "flag" not in meta:
                flag, text = "--no-" + f.name.replace("_", "-"), f"disable: {text}"
            kw["action"] = "store_false" if default else "store_true"
        else:
            origin = typing.get_origin(base)
            if meta.get("append"):
                kw.update(action="append", type=str)
            elif origin is tuple:
                elems = typing.get_args(base)
                kw.update(type=elems[0], nargs="+" if Ellipsis in elems else len(elems))
            else:
                kw["type"] = base
            if "choices" in meta:
                kw["choices"] = meta["choices"]
            kw["metavar"] = flag.lstrip("-").replace("-", "_").upper()
            if default is dataclasses.MISSING:
                kw["required"] = True
            elif default is not None:
                shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
                text += f" (default: {shown}" + (f"; {meta['none_if']} = none" if "none_if" in meta else "") + ")"
        p.add_argument(flag, help=text, **kw)


def config_values(cls: type, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(top-level fields, {nested field: its fields}) that were given on the command line."""
    given = vars(args)
    hints = typing.get_type_hints(cls)
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            nested[f.name] = {k.split(".", 1)[1]: v for k, v in given.items() if k.startswith(f.name + ".")}
        elif f.name in given:
            v = given[f.name]
            if "none_if" in f.metadata and v == f.metadata["none_if"]:
                v = None
            top[f.name] = tuple(v) if typing.get_origin(_unwrap(tp)[0]) is tuple else v
    return top, nested


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..models.pix2pix import TranslatorConfig  # noqa: F401  (type hints of the configs)
    from .body_texture import BodyTextureTrainConfig
    from .lung_texture import LungTextureTrainConfig
    from .masks import MaskTrainConfig
    from .nodule_texture import NoduleTextureTrainConfig
    from .translator import PRESETS, TranslatorTrainConfig

    sub = parser.add_subparsers(dest="train_command", metavar="STAGE", required=True)
    m = sub.add_parser("masks", help="progressive mask StyleGAN (paper §3.1)")
    add_config_arguments(m, MaskTrainConfig)
    t = sub.add_parser("translator", help="DL-Pix2Pix mask → CT translator (paper §3.2)")
    t.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="start from a named configuration: paper (§4.2 exactly: whole slices, batch 1), its "
                        "Table 4 ablations pix2pix / pix2pix-lia / pix2pix-dwmh, texture (all texture "
                        "options), or lung-texture (texture with the lungs freed from the paired losses); "
                        "other flags override it")
    add_config_arguments(t, TranslatorTrainConfig)
    x = sub.add_parser("lung-texture", help="lung-parenchyma texture GAN on real lung patches (composited into the "
                                            "translated lungs)")
    add_config_arguments(x, LungTextureTrainConfig)
    y = sub.add_parser("body-texture", help="body texture GAN on real body patches, conditioned on where in the body "
                                            "it draws (composited into the translated body)")
    add_config_arguments(y, BodyTextureTrainConfig)
    n = sub.add_parser("nodule-texture", help="nodule inpainting GAN on real nodule crops (redraws each generated "
                                              "nodule and its rim)")
    add_config_arguments(n, NoduleTextureTrainConfig)

    e = sub.add_parser("export", help="assemble a TSGAN folder (from_pretrained layout) from two runs")
    e.add_argument("--masks", required=True,
                   help="mask StyleGAN run folder, or a weights folder to take it from (pretrained: the shipped one)")
    e.add_argument("--translator", required=True,
                   help="translator run folder, or a weights folder to take it from (pretrained: the shipped one)")
    e.add_argument("--lung-texture", default=None,
                   help="lung texture run folder, or a weights folder to take it from (default: none)")
    e.add_argument("--body-texture", default=None,
                   help="body texture run folder, or a weights folder to take it from (default: none)")
    e.add_argument("--nodule-texture", default=None,
                   help="nodule texture run folder, or a weights folder to take it from (default: none)")
    e.add_argument("--out", required=True, help="TSGAN folder to write")
    e.add_argument("--overwrite", action="store_true")
    e.add_argument("--card", default=None, help="extra markdown text for the model card")
    e.add_argument("--fp16", action="store_true", help="store the weights in fp16, as pretrained/ ships them "
                   "(half the size; they load back as fp32)")


# stages without presets: command → (module of nodulesynth.train, run config, train function)
_STAGES = {"masks": ("masks", "MaskTrainConfig", "train_masks"),
           "lung-texture": ("lung_texture", "LungTextureTrainConfig", "train_lung_texture"),
           "body-texture": ("body_texture", "BodyTextureTrainConfig", "train_body_texture"),
           "nodule-texture": ("nodule_texture", "NoduleTextureTrainConfig", "train_nodule_texture")}


def _stage(command: str):
    """(run config class, train function) of a ``_STAGES`` command, imported lazily."""
    import importlib

    mod, run_cls, train = _STAGES[command]
    module = importlib.import_module(f"nodulesynth.train.{mod}")
    return getattr(module, run_cls), getattr(module, train)


def build_config(args: argparse.Namespace):
    """The run config a parsed `train STAGE` command line describes."""
    if args.train_command in _STAGES:
        run_cls, _ = _stage(args.train_command)
        top, nested = config_values(run_cls, args)
        model_cls = next(f for f in dataclasses.fields(run_cls) if f.name == "model").default_factory
        return run_cls(**top, model=model_cls(**nested["model"]))
    from .translator import TranslatorTrainConfig, preset_config

    top, nested = config_values(TranslatorTrainConfig, args)
    return preset_config(getattr(args, "preset", None), model=nested["model"], **top)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.train_command != "export":  # before any data is read: clear of inputs, writable
        from ..io import check_out_dir

        cfg = build_config(args)
        data = cfg.data if isinstance(cfg.data, (list, tuple)) else [cfg.data]
        check_out_dir(cfg.out, cfg.overwrite, reuse=cfg.resume,
                      inputs=[*(("--data", d) for d in data), ("--vgg-weights", getattr(cfg, "vgg_weights", None))])
    if args.train_command in _STAGES:
        out = _stage(args.train_command)[1](cfg)
    elif args.train_command == "translator":
        from .translator import train_translator

        out = train_translator(cfg)
    else:
        from .engine import export_tsgan

        import torch

        out = export_tsgan(args.masks, args.translator, args.out, args.card, overwrite=args.overwrite,
                           dtype=torch.float16 if args.fp16 else None, lung_texture=args.lung_texture,
                           body_texture=args.body_texture, nodule_texture=args.nodule_texture)
    print(out)
    return 0
