"""`pixart-tune` command line: each subcommand is a thin wrapper over a library function."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .config import ConfigError


def _train(args) -> None:
    from .trainer import train

    train(args.recipe, args.overrides)


def _cache(args) -> None:
    from accelerate import Accelerator

    from .cache import build_cache
    from .config import load_config
    from .models import resolve_base

    cfg = load_config(args.recipe, args.overrides)
    acc = Accelerator()  # under `accelerate launch`, each process encodes its share
    index = build_cache(cfg, resolve_base(cfg.model.base), acc.device, show_progress=acc.is_main_process,
                        rank=acc.process_index, world_size=acc.num_processes, barrier=acc.wait_for_everyone,
                        verify=args.verify)  # fmt: skip
    if acc.is_main_process:
        print(index.summary())
        print(f"cache: {index.cache_dir}; skipped examples listed in {index.cache_dir / 'skipped.jsonl'}")


def _tiny_model(args) -> None:
    from .tiny import write_tiny_pipeline

    path = write_tiny_pipeline(args.dir, seed=args.seed)
    print(f"wrote the tiny PixArt-alpha pipeline (Hub layout) to {path}")


def _generate(args) -> None:
    from .inference import generate, load_pipeline

    base = args.base
    if not base and args.lora:
        from .export import base_for

        base = base_for(args.lora[0], None)
    scales, seeds = args.scale or [1.0], args.seed or [0]
    if len(scales) not in (1, len(args.lora)):
        raise ValueError(f"{len(args.lora)} --lora but {len(scales)} --scale: give one --scale, or one per --lora")
    pipe = load_pipeline(
        base or "embedded:tiny", lora=args.lora or None, scale=scales if len(scales) > 1 else scales[0],
        device=args.device, dtype=args.dtype, assume_alpha=args.assume_alpha, scheduler=args.scheduler,
        t5_quantization=args.t5_quantization, cpu_offload=args.cpu_offload, vae_tiling=args.vae_tiling,
        vae_slicing=args.vae_slicing, fuse=args.fuse, compile=args.compile,
    )  # fmt: skip
    paths = generate(
        pipe, args.prompt, out=args.out, negative_prompt=args.negative_prompt, height=args.height,
        width=args.width, steps=args.steps, guidance_scale=args.guidance_scale,
        seed=seeds[0] if len(seeds) == 1 else seeds, images_per_prompt=args.images_per_prompt,
        resolution_binning=not args.no_binning, clean_caption=args.clean_caption,
    )  # fmt: skip
    print(f"wrote {', '.join(map(str, paths))} (parameters in {paths[0].with_suffix('.json')})")


def _export(args) -> None:
    from .export import export_adapter

    path, info = export_adapter(args.adapter, args.out, format=args.format, base=args.base, assume_alpha=args.assume_alpha)
    assumed = f", alpha ASSUMED {info['alpha']:g}" if info.get("alpha_assumed") else f", alpha {info['alpha']:g}"
    print(f"wrote {path} ({args.format}; read {info['format']} {info['path']}: rank {info['rank']}{assumed})")


def _merge(args) -> None:
    from .export import merge_adapter
    from .models import DTYPES

    out = merge_adapter(args.adapter, args.out, scale=args.scale, base=args.base, pipeline=args.pipeline,
                        assume_alpha=args.assume_alpha, dtype=DTYPES[args.dtype] if args.dtype else None,
                        overwrite=args.overwrite)  # fmt: skip
    what = "pipeline (PixArtAlphaPipeline.from_pretrained)" if args.pipeline else "transformer (PixArtTransformer2DModel.from_pretrained)"
    print(f"wrote {out}: {args.adapter} merged at scale {args.scale:g}, a full diffusers {what}")


def _convert(args) -> None:
    from .export import convert_checkpoint

    out, direction = convert_checkpoint(args.src, args.out, to=args.to, use_ema=args.use_ema, config=args.config,
                                        overwrite=args.overwrite)  # fmt: skip
    what = "diffusers transformer folder" if direction == "diffusers" else "original-layout .safetensors"
    print(f"wrote {out} ({what}) from {args.src}")


def _push(args) -> None:
    from .hub import push_to_hub  # prints the URL itself

    push_to_hub(args.adapter, args.repo, private=args.private, base_model=args.base_model,
                **({"commit_message": args.message} if args.message else {}))  # fmt: skip


def _alpha(text: str) -> float | str:
    """--assume-alpha: a number, or 'rank' (alpha = rank, scale 1)."""
    if text == "rank":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'rank', got {text!r}") from None


ASSUME_ALPHA_HELP = ("alpha for LoRA files that store none (the official script's: it trained with 8); "
                     "a number or 'rank'")  # fmt: skip


class _Parser(argparse.ArgumentParser):
    """Usage mistakes as one line that says where to look, not the whole usage block."""

    def error(self, message):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pixart-tune", description="Fine-tune PixArt-alpha: LoRA or full.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train per a recipe YAML (key=value overrides allowed)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="dotted key=value, e.g. train.lr=5e-5")
    p.set_defaults(func=_train)

    p = sub.add_parser("cache", help="build or update the feature cache of a recipe, and print counts")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--verify", action="store_true", help="check every cached file's checksum; re-encode damaged ones")
    p.set_defaults(func=_cache)

    p = sub.add_parser("tiny-model", help="write the embedded tiny PixArt to a folder in the Hub layout")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_tiny_model)

    p = sub.add_parser("generate", help="generate images with a base model and optional LoRA adapters")
    p.add_argument("--prompt", required=True, action="append", help="repeat for a batch of prompts")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--lora", action="append", default=[],
                   help="adapter: PEFT folder, run dir, LoRA file (peft/diffusers/kohya/official) or Hub id (repeatable)")
    p.add_argument("--scale", type=float, action="append", help="LoRA scale: one for all, or one per --lora")
    p.add_argument("--assume-alpha", type=_alpha, help=ASSUME_ALPHA_HELP)
    p.add_argument("--base", help="base model (default: the one the adapter records, else embedded:tiny)")
    p.add_argument("--height", type=int, help="any size; default the model's (1024 for 1024-MS)")
    p.add_argument("--width", type=int)
    p.add_argument("--no-binning", action="store_true",
                   help="generate at exactly --height x --width instead of the nearest trained aspect-ratio bucket")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=4.5)
    p.add_argument("--scheduler", help="dpm-solver (default, the checkpoint's), ddim, euler, euler-a, sa-solver")
    p.add_argument("--seed", type=int, action="append", help="one for all (seed, seed+1, ...) or one per image")
    p.add_argument("--images-per-prompt", type=int, default=1)
    p.add_argument("--clean-caption", action=argparse.BooleanOptionalAction, default=None,
                   help="PixArt's caption cleaning (default: on when beautifulsoup4 and ftfy are installed)")
    p.add_argument("--device")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--t5-quantization", choices=["8bit", "4bit"], help="T5 through bitsandbytes (low VRAM)")
    p.add_argument("--cpu-offload", action="store_true", help="each model visits the GPU only while it runs (GPU only)")
    p.add_argument("--vae-tiling", action="store_true", help="decode large images tile by tile (low VRAM)")
    p.add_argument("--vae-slicing", action="store_true", help="decode a batch one image at a time (low VRAM)")
    p.add_argument("--fuse", action="store_true", help="fold the adapters into the weights (faster steps)")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks (GPU; first call slow)")
    p.add_argument("--out", default="out.png", help="a .png path, or a folder for several images")
    p.set_defaults(func=_generate, friendly=True)

    p = sub.add_parser("export", help="write an adapter as a PEFT folder, a diffusers file or a kohya file")
    p.add_argument("adapter", help="PEFT folder, run dir (uses final/), or a LoRA file in any supported format")
    p.add_argument("--format", required=True, choices=["peft", "diffusers", "kohya"])
    p.add_argument("--out", required=True, help="peft: a folder; diffusers: a .safetensors or a folder; kohya: a .safetensors")
    p.add_argument("--base", help="base model to record (default: the one the adapter records)")
    p.add_argument("--assume-alpha", type=_alpha, help=ASSUME_ALPHA_HELP)
    p.set_defaults(func=_export, friendly=True)

    p = sub.add_parser("merge", help="fold an adapter into its base: a full diffusers transformer (or pipeline)")
    p.add_argument("adapter", help="PEFT folder, run dir (uses final/), LoRA file or Hub id")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--base", help="base model (default: the one the adapter records)")
    p.add_argument("--pipeline", action="store_true", help="write a whole pipeline: merged transformer + the base's other parts")
    p.add_argument("--assume-alpha", type=_alpha, help=ASSUME_ALPHA_HELP)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="saved dtype (default fp32, as diffusers loads the base)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_merge, friendly=True)

    p = sub.add_parser("convert", help="original PixArt checkpoint (.pth/.safetensors) <-> diffusers transformer")
    p.add_argument("src", help="an original .pth/.safetensors (-> diffusers folder) or a diffusers folder (-> original)")
    p.add_argument("--out", required=True)
    p.add_argument("--to", choices=["diffusers", "original"], help="optional: confirms the direction SRC implies")
    p.add_argument("--use-ema", action="store_true", help="take state_dict_ema from a training checkpoint")
    p.add_argument("--config", help="1024, 512 or 256 (default: inferred), or JSON / a config.json of transformer kwargs")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_convert, friendly=True)

    p = sub.add_parser("push", help="upload a LoRA (run dir or adapter folder) with a model card to the Hub")
    p.add_argument("adapter", help="a run directory (uses final/, config.yaml, samples/) or a PEFT adapter folder")
    p.add_argument("--repo", required=True, help="user/name or org/name; created if needed")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--message", help="commit message")
    p.add_argument("--base-model", help="the base's Hub id, where the run trained on a local copy of it")
    p.set_defaults(func=_push, friendly=True)
    return parser


def _one_line(exc: BaseException, limit: int = 800) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _training_errors() -> tuple[type[Exception], ...]:
    """Errors of `train` / `cache` that are about the user's input or run, not bugs: one line each."""
    from .checkpoint import CheckpointError
    from .data.captions import CaptionCleaningUnavailable
    from .data.sources import DataError
    from .features import CacheCorruptedError
    from .lora import LoraTargetError
    from .models import BaseModelError
    from .trainer import NonFiniteLoss

    return (CheckpointError, DataError, CacheCorruptedError, LoraTargetError, BaseModelError, NonFiniteLoss,
            CaptionCleaningUnavailable, FileNotFoundError)  # fmt: skip


class _NoCpu4bitKernelNotice(logging.Filter):
    """bitsandbytes, imported by diffusers and peft, logs on CPUs with AVX512-BF16 that it cannot load
    its 4-bit CPU GEMM from the `kernels` package: the first line of the CPU quickstart, about a kernel
    that only a 4-bit T5 on the CPU runs (load_text_encoder gives that advice itself, where it applies).
    Its other messages pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward")


def quiet_third_party_notices() -> None:
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _NoCpu4bitKernelNotice) for f in log.filters):
        log.addFilter(_NoCpu4bitKernelNotice())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_third_party_notices()
    # User errors (missing files, unknown formats, missing alpha, bad sizes) end in one line, no
    # traceback; PIXART_TUNE_TRACEBACK=1 shows the traceback anyway.
    user_errors = (ValueError, OSError, ImportError) if getattr(args, "friendly", False) else _training_errors()
    try:
        args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # train saves a checkpoint first (TrainingInterrupted says where)
        print(f"\n{exc or 'interrupted'}", file=sys.stderr)
        return 130
    except user_errors as exc:
        if os.environ.get("PIXART_TUNE_TRACEBACK") == "1":
            raise
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
