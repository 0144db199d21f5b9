"""`pixart-tune` command line: each subcommand is a thin wrapper over a library function."""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError


def _train(args) -> None:
    from .trainer import train

    train(args.recipe, args.overrides)


def _cache(args) -> None:
    from .cache import build_cache
    from .config import load_config
    from .models import resolve_base

    cfg = load_config(args.recipe, args.overrides)
    index = build_cache(cfg, resolve_base(cfg.model.base))
    print(index.summary())
    print(f"cache: {index.cache_dir}; skipped examples listed in {index.cache_dir / 'skipped.jsonl'}")


def _tiny_model(args) -> None:
    from .tiny import write_tiny_pipeline

    path = write_tiny_pipeline(args.dir, seed=args.seed)
    print(f"wrote the tiny PixArt-alpha pipeline (Hub layout) to {path}")


def _generate(args) -> None:
    from .inference import generate, load_pipeline

    if args.lora and not args.base:
        args.base = _base_of_adapter(args.lora[0])
    lora = dict(zip(args.lora, args.scale if len(args.scale) == len(args.lora) else args.scale[:1] * len(args.lora)))
    pipe = load_pipeline(args.base or "embedded:tiny", lora=lora or None, device=args.device, dtype=args.dtype)
    paths = generate(
        pipe, args.prompt, out=args.out, negative_prompt=args.negative_prompt, height=args.height,
        width=args.width, steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed,
    )  # fmt: skip
    print(f"wrote {', '.join(map(str, paths))} (parameters in {paths[0].with_suffix('.json')})")


def _base_of_adapter(lora: str) -> str:
    """The base model an adapter records in adapter_config.json."""
    import json

    from .inference import _adapter_folder

    cfg = json.loads((__import__("pathlib").Path(_adapter_folder(lora)) / "adapter_config.json").read_text())
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise SystemExit(f"error: {lora} does not record its base model; pass --base")
    return base


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pixart-tune", description="Fine-tune PixArt-alpha: LoRA or full.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train per a recipe YAML (key=value overrides allowed)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="dotted key=value, e.g. train.lr=5e-5")
    p.set_defaults(func=_train)

    p = sub.add_parser("cache", help="build or update the feature cache of a recipe, and print counts")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_cache)

    p = sub.add_parser("tiny-model", help="write the embedded tiny PixArt to a folder in the Hub layout")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_tiny_model)

    p = sub.add_parser("generate", help="generate images with a base model and optional LoRA adapters")
    p.add_argument("--prompt", required=True, action="append", help="repeat for a batch of prompts")
    p.add_argument("--lora", action="append", default=[], help="adapter folder, run dir or Hub id (repeatable)")
    p.add_argument("--scale", type=float, action="append", default=None, help="LoRA scale, one per --lora")
    p.add_argument("--base", help="base model (default: the one the adapter records, else embedded:tiny)")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=4.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device")
    p.add_argument("--dtype", choices=["fp32", "bf16"])
    p.add_argument("--out", default="out.png", help="a .png path, or a folder for several images")
    p.set_defaults(func=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "scale", 0) is None:
        args.scale = [1.0]
    try:
        args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
