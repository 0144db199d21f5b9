"""Adapters and checkpoints out: the library side of `pixart-tune export | merge | convert`.

    export_adapter("runs/my-lora", "my-lora.safetensors", format="kohya")     # any readable LoRA -> a format
    merge_adapter("runs/my-lora", "merged/", scale=0.8, pipeline=True)         # base + LoRA folded, full model
    convert_checkpoint("PixArt-XL-2-1024-MS.pth", "converted/")               # original <-> diffusers

An adapter is anything `inference.resolve_adapter` finds (PEFT folder, run directory, LoRA file of
any supported format, Hub id). The base model defaults to the one the adapter records.
Every write goes to a temporary name first and is renamed into place at the end.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .adapters import read_adapter, recorded_base, resolve_adapter
from .atomic import atomic_dir
from .tiny import EMBEDDED_TINY

SUFFIXES = {"peft": "", "diffusers": ".safetensors", "kohya": ".safetensors"}
MERGE_RECORD = "pixart_tune_merge.json"


def base_for(adapter, base: str | None) -> str:
    """`base`, else the base model the adapter records; a clear error when neither is there."""
    base = base or recorded_base(adapter)
    if not base:
        raise ValueError(f"{adapter} does not record its base model (files from other tools rarely do): "
                         "pass --base (base=) with the model it was trained on")  # fmt: skip
    return base


def export_adapter(adapter, out, *, format: str, base: str | None = None, assume_alpha=None) -> tuple[Path, dict]:
    """Write the adapter as `format` ('peft' folder, 'diffusers' or 'kohya' .safetensors); returns
    (written path, info of the source). The base model (given or recorded) is written along."""
    from .lora_formats import FORMATS, save_lora

    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    lora, info = read_adapter(adapter, assume_alpha=assume_alpha)
    base = base or info.get("base_model") or recorded_base(adapter)
    out = Path(out)
    if format == "kohya" and out.suffix != ".safetensors":
        raise ValueError(f"{out}: a kohya LoRA is one file; give --out a name ending in .safetensors")
    if format == "peft" and out.suffix:
        raise ValueError(f"{out}: a PEFT adapter is a folder; give --out a folder name (no suffix)")
    targets = info.get("target_modules")
    covers = isinstance(targets, list) and all(any(m == t or m.endswith("." + t) for t in targets) for m in lora.layers)
    # Keep a PEFT config's own target list (readable, portable); else the exact module paths.
    path = save_lora(out, lora, format=format, base_model=base, target_modules=targets if covers else None)
    return path, info


def _merge_record(info: dict, base: str, scale: float) -> str:
    keys = ("source", "format", "rank", "alpha", "alpha_assumed")
    return json.dumps({"base": base, "scale": scale, "adapter": {k: info.get(k) for k in keys}}, indent=2) + "\n"


def _link_or_copy(src, dst) -> None:
    """Hard link when possible (no second copy of a 19 GB T5 on disk), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def merge_adapter(adapter, out, *, scale: float = 1.0, base: str | None = None, pipeline: bool = False,
                  assume_alpha=None, dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:  # fmt: skip
    """Fold the adapter into its base transformer at `scale` and save a diffusers transformer folder
    at `out` (or, with `pipeline`, a whole pipeline folder: the merged transformer/ next to the base's
    other components, loadable by `PixArtAlphaPipeline.from_pretrained(out)`). The merge is done in
    fp32 and saved in fp32 (how diffusers loads the base) unless `dtype` is given. Writes pixart_tune_merge.json beside."""
    from diffusers import PixArtTransformer2DModel

    from .merge import merge_lora_into_transformer
    from .models import resolve_base

    source = resolve_adapter(adapter)
    base = base_for(source, base)
    lora, info = read_adapter(source, assume_alpha=assume_alpha)  # fails fast, before loading any model
    info["source"] = str(adapter)
    out = Path(out).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty: choose another --out, or pass --overwrite")
    folder = resolve_base(base) if base == EMBEDDED_TINY or not Path(base).expanduser().exists() else str(Path(base).expanduser())
    local = Path(folder)
    if pipeline and not local.is_dir():  # a Hub id: the pipeline's files from the Hub cache
        from diffusers import PixArtAlphaPipeline

        local = Path(PixArtAlphaPipeline.download(folder))
        folder = str(local)
    if pipeline and not (local / "model_index.json").is_file():
        raise ValueError(f"--pipeline needs a whole pipeline as base (a folder with model_index.json or a Hub id); "
                         f"{base} is not one. Merge the transformer alone (no --pipeline) instead")  # fmt: skip
    whole = local.is_dir() and (local / "transformer").is_dir() or not local.is_dir()
    kwargs = {"dtype": dtype} if dtype is not None else {}
    transformer = PixArtTransformer2DModel.from_pretrained(folder, subfolder="transformer" if whole else None, **kwargs)
    merge_lora_into_transformer(transformer, lora, scale)
    with atomic_dir(out) as stage:
        transformer.save_pretrained(stage / "transformer" if pipeline else stage, safe_serialization=True)
        if pipeline:
            for item in local.iterdir():
                if item.name == "transformer" or item.name.startswith("."):
                    continue
                if item.is_dir():
                    shutil.copytree(item, stage / item.name, copy_function=_link_or_copy)
                else:
                    _link_or_copy(item, stage / item.name)
        (stage / MERGE_RECORD).write_text(_merge_record(info, base, scale))
    return out


def _config_arg(config: str | dict | None):
    """--config: a preset name ('1024', '512', '256'), inline JSON, or a diffusers transformer config.json."""
    if config is None or isinstance(config, dict):
        return config
    from .convert import PRESETS

    if config in PRESETS:
        return config
    text = config
    if not config.lstrip().startswith("{"):
        path = Path(config).expanduser()
        if not path.is_file():
            raise ValueError(f"--config {config!r}: not a preset ({', '.join(PRESETS)}), inline JSON or a config.json file")
        text = path.read_text()
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--config {config!r}: not valid JSON ({exc})") from None
    return {k: v for k, v in kwargs.items() if not k.startswith("_")}


def convert_checkpoint(src, out, *, to: str | None = None, use_ema: bool = False, config=None,
                       overwrite: bool = False) -> tuple[Path, str]:  # fmt: skip
    """Convert an original PixArt checkpoint (.pth / .safetensors) to a diffusers transformer folder,
    or a diffusers transformer folder (or a pipeline folder's transformer/) to one original-layout
    .safetensors. The direction comes from `src`; `to` ('diffusers' / 'original') only confirms it.
    Returns (written path, direction)."""
    from .convert import convert_diffusers_to_original, convert_original_to_diffusers

    src = Path(src).expanduser()
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or folder")
    if to not in (None, "diffusers", "original"):
        raise ValueError(f"--to must be 'diffusers' or 'original', not {to!r}")
    direction = "original" if src.is_dir() else "diffusers"
    if to and to != direction:
        what = "a folder (diffusers transformer)" if src.is_dir() else "a file (original checkpoint)"
        raise ValueError(f"{src} is {what}, which converts to {direction}, not {to}: "
                         "give an original .pth/.safetensors file to get diffusers, a diffusers folder to get original")  # fmt: skip
    out = Path(out).expanduser()
    if direction == "diffusers":
        if src.suffix not in (".pth", ".pt", ".bin", ".ckpt", ".safetensors"):
            raise ValueError(f"{src}: expected an original PixArt checkpoint (.pth or .safetensors)")
        try:
            written = convert_original_to_diffusers(src, out, config=_config_arg(config), use_ema=use_ema, overwrite=overwrite)
        except FileExistsError:
            raise FileExistsError(f"{out} already exists and is not empty: choose another --out, or pass --overwrite") from None
        except ValueError as exc:
            raise ValueError(str(exc) if str(src) in str(exc) else f"{src}: {exc}") from None
        return written, direction
    if use_ema or config is not None:
        raise ValueError("--use-ema and --config apply to original checkpoints only (file -> diffusers)")
    folder = src / "transformer" if (src / "transformer" / "config.json").is_file() else src
    if not (folder / "config.json").is_file():
        raise ValueError(f"{src}: a folder without config.json (nor transformer/config.json): not a diffusers "
                         "transformer; convert takes an original .pth/.safetensors file or a diffusers folder")  # fmt: skip
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: the original layout is written as one .safetensors (never a pickle); give a .safetensors name")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists: choose another --out, or pass --overwrite")
    return convert_diffusers_to_original(folder, out), direction
