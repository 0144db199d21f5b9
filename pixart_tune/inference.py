"""The inference helper: a PixArtAlphaPipeline with LoRA adapters, ready for 1024 px generation.

diffusers has no LoRA loader for PixArt (PixArtTransformer2DModel lacks PeftAdapterMixin), so we
inject peft LoRA layers into the pipeline's transformer in place: the pipeline keeps a plain
transformer, several adapters can be active with their own scales, and scales or adapters change
without reloading the base.

    pipe = load_pipeline("PixArt-alpha/PixArt-XL-2-1024-MS", lora={"runs/style/final": 0.8, "alice/dog": 1.0})
    set_adapters(pipe, {"adapter0": 0.5, "adapter1": 1.0})     # new scales, nothing reloaded
    fuse_adapters(pipe)                                         # fold them into the weights: the fast path
    generate(pipe, ["a photo of sks dog"], out="dog.png", steps=20, seed=1)

Adapters come in every format `lora_formats.load_lora` reads (PEFT folder, diffusers or kohya file,
the official script's file with an explicit `assume_alpha`), from a local path, a run directory
(its final/) or a Hub repo id. Speed: a fused adapter costs nothing per step (peft's merge adds
scale * B @ A to each weight once); an unfused one adds two small matmuls per adapted layer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from .models import DTYPES, load_text_encoder, resolve_base

# CLI name -> diffusers scheduler class; each built with from_config(the pipeline's own scheduler config).
SCHEDULERS = {
    "dpm-solver": "DPMSolverMultistepScheduler",  # what PixArt-alpha ships (DPM-Solver++ 2M)
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "sa-solver": "SASolverScheduler",  # PixArt's own repo offers it; data prediction, as there
}
_SCHEDULER_KWARGS = {"sa-solver": {"algorithm_type": "data_prediction"}}
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
LORA_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class AdapterError(ValueError):
    """An adapter that cannot be found or read: says which and what to do."""


# ---- finding and reading adapters ---------------------------------------------------------------


def _is_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~")) and not Path(name).suffix


def _download_adapter(repo_id: str) -> Path:
    """A Hub adapter repo -> local folder: the PEFT files if it has them, else its .safetensors files."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=list(ADAPTER_FILES)))
        if not (folder / ADAPTER_FILES[0]).is_file():
            folder = Path(snapshot_download(repo_id, allow_patterns=["*.safetensors"]))
    except Exception as exc:  # noqa: BLE001 - every Hub failure means the same thing to the user here
        reason = " ".join(str(exc).split())[:200]
        raise AdapterError(f"{repo_id}: no such local file or folder, and fetching it as a Hub repo id failed "
                           f"({type(exc).__name__}: {reason}); check the path, or the repo id and your login / "
                           "HF_HUB_OFFLINE") from None  # fmt: skip
    if not any(folder.glob("*.safetensors")):
        raise AdapterError(f"Hub repo {repo_id} holds no LoRA weights (no adapter_model.safetensors or .safetensors file)")
    return folder


def resolve_adapter(lora: str | Path) -> Path:
    """A local path that `load_lora` reads, for: a PEFT folder, a run directory (its final/), a LoRA
    file, a folder holding one (pytorch_lora_weights.safetensors or a single .safetensors), or a Hub id."""
    path = Path(lora).expanduser()
    if path.is_file():
        if path.suffix not in LORA_SUFFIXES:
            raise AdapterError(f"{path}: not a LoRA weights file (expected .safetensors, or .bin/.pt/.pth)")
        return path
    if path.is_dir():
        if (path / ADAPTER_FILES[0]).is_file():
            return path
        if (path / "final" / ADAPTER_FILES[0]).is_file():
            return path / "final"
        if any(path.glob("*.safetensors")):
            return path
        raise AdapterError(f"{path}: holds no LoRA (no adapter_config.json, no final/adapter_config.json, no "
                           ".safetensors file); give a PEFT adapter folder, a training run directory or a LoRA file")  # fmt: skip
    if _is_hub_id(str(lora)):
        return _download_adapter(str(lora))
    raise AdapterError(f"{lora}: no such file or folder (nor a Hub repo id 'user/name'); give a PEFT adapter folder, "
                       "a training run directory or a LoRA .safetensors file")  # fmt: skip


def read_adapter(lora: str | Path, *, assume_alpha: float | str | None = None):
    """(Lora, info) for any adapter `resolve_adapter` finds; unreadable files raise AdapterError,
    alpha-less files MissingAlphaError (a ValueError whose message says which --assume-alpha to pass)."""
    from .lora_formats import load_lora

    source = resolve_adapter(lora)
    try:
        weights, info = load_lora(source, assume_alpha=assume_alpha)
    except (FileNotFoundError, OSError, RuntimeError, EOFError) as exc:
        raise AdapterError(f"{source}: cannot read it as a LoRA ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    except Exception as exc:
        if type(exc).__name__ in ("SafetensorError", "UnpicklingError"):
            raise AdapterError(f"{source}: not a readable LoRA file ({exc})") from None
        raise
    info["source"] = str(lora)
    return weights, info


def recorded_base(lora: str | Path) -> str | None:
    """The base model an adapter records: PEFT's base_model_name_or_path, or our safetensors header."""
    source = resolve_adapter(lora)
    if source.is_dir() and (source / ADAPTER_FILES[0]).is_file():
        return json.loads((source / ADAPTER_FILES[0]).read_text()).get("base_model_name_or_path") or None
    files = [source] if source.is_file() else sorted(source.glob("*.safetensors"))
    for f in files:
        if f.suffix != ".safetensors":
            continue
        from safetensors import safe_open

        from .lora_formats import PIXART_META_KEY

        try:
            with safe_open(str(f), framework="pt") as handle:
                meta = (handle.metadata() or {}).get(PIXART_META_KEY)
        except Exception:  # noqa: BLE001 - unreadable files are reported when the weights are read
            return None
        return json.loads(meta).get("base_model") if meta else None
    return None


# ---- adapters on a live transformer --------------------------------------------------------------


def _transformer(pipe_or_transformer):
    return getattr(pipe_or_transformer, "transformer", pipe_or_transformer)


def _is_lora_layer(module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def _lora_layers(transformer):
    """The peft LoRA layers in the module tree (none while fused: they are kept aside then)."""
    return [m for m in transformer.modules() if _is_lora_layer(m)]


def adapters(pipe_or_transformer) -> dict[str, dict]:
    """{name: info} of the adapters loaded by `add_adapter` (source, format, rank, alpha, scale)."""
    t = _transformer(pipe_or_transformer)
    scales = getattr(t, "_pixart_scales", {})
    return {n: {**info, "scale": scales.get(n, 0.0)} for n, info in getattr(t, "_pixart_adapters", {}).items()}


def add_adapter(pipe_or_transformer, lora, name: str, *, scale: float | None = 1.0, assume_alpha=None) -> dict:
    """Load a LoRA (any format, local or Hub id) into the transformer under `name`, in place.

    The new adapter joins the active ones at `scale` (None: loaded but inactive). Returns its info."""
    t = _transformer(pipe_or_transformer)
    layers = _lora_layers(t) + list((getattr(t, "_pixart_fused", None) or {}).values())
    if any(name in m.lora_A for m in layers):
        raise ValueError(f"an adapter named {name!r} is already loaded; choose another name")
    return _inject(t, *read_adapter(lora, assume_alpha=assume_alpha), name, scale)


def _inject(t, weights, info: dict, name: str, scale: float | None) -> dict:
    from .lora_formats import apply_lora

    with _unfolded(t):  # a merged layer would ignore a new adapter: unfold, add, fold again
        known = getattr(t, "_pixart_adapters", {})
        modules = {n for n, _ in t.named_modules()}
        foreign = sorted(m for m in weights.layers if m not in modules)
        try:
            if foreign:
                raise ValueError(f"modules this transformer lacks: {foreign[:3]}")
            apply_lora(t, weights, adapter_name=name)
        except (ValueError, RuntimeError) as exc:  # RuntimeError: shapes that differ
            _delete(t, name)
            _activate(t, getattr(t, "_pixart_scales", {}))
            reason = " ".join(str(exc).split())[:300]
            raise AdapterError(f"{info['source']}: does not fit this transformer ({reason}); is it a LoRA for another model?") from None
        device, dtype = t.device, t.dtype
        for n, p in t.named_parameters():
            if f".{name}." in n:  # adapters follow the base's device and dtype, and never train here
                p.data = p.data.to(device, dtype)
                p.requires_grad_(False)
        t._pixart_adapters = {**known, name: {k: info.get(k) for k in ("source", "path", "format", "rank", "alpha", "alpha_assumed")}}
        scales = dict(getattr(t, "_pixart_scales", {}))
        if scale is not None:
            scales[name] = float(scale)
        _activate(t, scales)
    return t._pixart_adapters[name]


def _delete(t, name: str) -> None:
    for module in _lora_layers(t):
        if name in module.lora_A:
            module.delete_adapter(name)


def remove_adapter(pipe_or_transformer, name: str) -> None:
    """Unload adapter `name` (its weights leave the model); the others keep their scales."""
    t = _transformer(pipe_or_transformer)
    with _unfolded(t):
        if not any(name in m.lora_A for m in _lora_layers(t)):
            raise ValueError(f"no adapter named {name!r}; loaded: {sorted(adapters(t)) or 'none'}")
        _delete(t, name)
        t._pixart_adapters = {k: v for k, v in getattr(t, "_pixart_adapters", {}).items() if k != name}
        _activate(t, {k: v for k, v in getattr(t, "_pixart_scales", {}).items() if k != name})


def _activate(t, scales: dict[str, float]) -> None:
    """Each LoRA layer runs exactly the named adapters it holds, at their scales; scale 0 skips the work."""
    live = [n for n, s in scales.items() if s != 0]
    for module in _lora_layers(t):
        present = [n for n in live if n in module.lora_A]
        module.set_adapter(present, inference_mode=True)
        for n in present:
            module.set_scale(n, scales[n])
    t._pixart_scales = dict(scales)


def set_adapters(pipe_or_transformer, scales: dict[str, float] | list[str] | str) -> None:
    """Activate exactly these adapters, each at its scale (1.0 = as trained; 0 = off); nothing reloads.

    A list or a single name means scale 1.0 each. Fused adapters are unfused, rescaled and fused again."""
    t = _transformer(pipe_or_transformer)
    if isinstance(scales, str):
        scales = [scales]
    scales = {n: 1.0 for n in scales} if not isinstance(scales, dict) else dict(scales)
    with _unfolded(t):  # peft unmerges with the current scales: unfold before changing them
        loaded = {n for m in _lora_layers(t) for n in m.lora_A}
        unknown = sorted(set(scales) - loaded)
        if unknown:
            raise ValueError(f"no adapter named {unknown}; loaded: {sorted(loaded) or 'none'}")
        _activate(t, {n: float(s) for n, s in scales.items()})


# Fusing: peft's merge adds scale * B @ A into each base weight; then the LoRA wrapper itself leaves
# the module tree (kept aside on the transformer), because even a merged peft layer costs a Python
# call with checks per layer per step: ~25% of a 1024 px step on an H200, more than the matmuls saved.


def is_fused(pipe_or_transformer) -> bool:
    return bool(getattr(_transformer(pipe_or_transformer), "_pixart_fused", None))


def _merge(t) -> None:
    if is_fused(t):
        return
    wrappers = {}
    for path, module in list(t.named_modules()):
        if not _is_lora_layer(module):
            continue
        if module.active_adapters:
            module.merge(adapter_names=list(module.active_adapters))
        parent, _, child = path.rpartition(".")
        setattr(t.get_submodule(parent) if parent else t, child, module.base_layer)
        wrappers[path] = module
    t._pixart_fused = wrappers


def _unmerge(t) -> None:
    for path, module in (getattr(t, "_pixart_fused", None) or {}).items():
        parent, _, child = path.rpartition(".")
        setattr(t.get_submodule(parent) if parent else t, child, module)
        module.to(module.base_layer.weight.device)  # kept aside, it missed any .to(device) since
        while module.merged:
            module.unmerge()
    t._pixart_fused = None


@contextlib.contextmanager
def _unfolded(t):
    """Within: adapters unfused (if they were), so they can change; after: fused again."""
    fused = is_fused(t)
    if fused:
        _unmerge(t)
    try:
        yield
    finally:
        if fused:
            _merge(t)


def fuse_adapters(pipe_or_transformer) -> None:
    """Fold the active adapters (at their scales) into the base weights: a step then costs what the
    base model's does. Reversible with `unfuse_adapters` (exact up to float rounding: ~1e-7
    relative in fp32, one ulp in bf16); `set_adapters` / `add_adapter` still work and refold."""
    _merge(_transformer(pipe_or_transformer))


def unfuse_adapters(pipe_or_transformer) -> None:
    """Take fused adapters back out of the base weights (the adapters stay loaded and active)."""
    _unmerge(_transformer(pipe_or_transformer))


def compile_transformer(pipe_or_transformer, **compile_kwargs) -> None:
    """torch.compile each transformer block in place (regional compilation: one block's graph is
    compiled once and reused by all 28, so it compiles in seconds rather than minutes)."""
    t = _transformer(pipe_or_transformer)
    for block in t.transformer_blocks:
        block.compile(**compile_kwargs)


# ---- schedulers ----------------------------------------------------------------------------------


def _scheduler_class(name: str):
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    cls = getattr(diffusers, SCHEDULERS[name], None)
    if cls is None:
        raise ValueError(f"scheduler {name!r} needs diffusers' {SCHEDULERS[name]}, which diffusers {diffusers.__version__} lacks")
    return cls


def set_scheduler(pipe, name: str) -> None:
    """Switch the sampler by name (see SCHEDULERS), always built from the pipeline's original config."""
    cls = _scheduler_class(name)
    if not hasattr(pipe, "_pixart_scheduler_config"):  # the one the checkpoint ships; later switches start from it
        pipe._pixart_scheduler_config = dict(pipe.scheduler.config)
    pipe.scheduler = cls.from_config(pipe._pixart_scheduler_config, **_SCHEDULER_KWARGS.get(name, {}))


def scheduler_name(pipe) -> str:
    cls = type(pipe.scheduler).__name__
    return next((n for n, c in SCHEDULERS.items() if c == cls), cls)


# ---- the pipeline --------------------------------------------------------------------------------


def load_pipeline(
    base: str,
    lora: str | list[str] | dict[str, float] | None = None,
    scale: float | list[float] = 1.0,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    assume_alpha: float | str | None = None,
    scheduler: str | None = None,
    t5_quantization: str | None = None,
    cpu_offload: bool = False,
    vae_tiling: bool = False,
    vae_slicing: bool = False,
    fuse: bool = False,
    compile: bool = False,
):
    """A PixArtAlphaPipeline for `base` (Hub id, folder or 'embedded:tiny') with LoRA adapters applied.

    `lora`: one adapter (PEFT folder, run dir, LoRA file in any supported format, or Hub id), a list,
    or {adapter: scale}; named 'adapter0', 'adapter1', ... Change scales later with
    `set_adapters(pipe, {...})`, add more with `add_adapter`. `assume_alpha` is for files without
    alpha (the official script's). Low VRAM: `t5_quantization` '8bit'/'4bit' (bitsandbytes),
    `cpu_offload` (GPU only: each model visits the GPU only while it runs), `vae_tiling` /
    `vae_slicing`. Speed: `fuse` folds the adapters into the weights, `compile` torch.compiles the
    transformer blocks (after fusing). dtype: bf16 on GPU, fp32 on CPU by default; never fp16."""
    from diffusers import PixArtAlphaPipeline

    cuda = torch.cuda.is_available()
    device = device or ("cuda" if cuda else "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if isinstance(dtype, str):
        names = {**DTYPES, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if dtype not in names:
            raise ValueError(f"dtype {dtype!r}: use 'bf16' or 'fp32'")
        dtype = names[dtype]
    if dtype == torch.float16:
        raise ValueError("fp16 gives NaNs in T5 and noise in PixArt (diffusers#7693); use bf16 or fp32")
    if cpu_offload and not (cuda and device.startswith("cuda")):
        raise ValueError(f"cpu_offload needs a CUDA GPU (device is {device!r}, CUDA available: {cuda}): "
                         "on a CPU everything already lives in RAM; drop --cpu-offload")  # fmt: skip
    if t5_quantization not in (None, "none", "8bit", "4bit"):
        raise ValueError(f"t5_quantization must be '8bit', '4bit' or None, not {t5_quantization!r}")
    t5_quantization = None if t5_quantization == "none" else t5_quantization
    if scheduler:
        _scheduler_class(scheduler)  # a typo fails now, not after minutes of loading
    # Adapters are read (and checked: files, formats, alphas) before minutes of base-model loading.
    loaded = [(read_adapter(path, assume_alpha=assume_alpha), s) for path, s in _adapter_items(lora, scale)]
    folder = resolve_base(base)
    extra = {}
    if t5_quantization:  # T5-XXL is 19 GB in fp32; 8-bit ~5 GB, 4-bit ~3 GB. Computes in `dtype` (never fp16)
        extra["text_encoder"] = load_text_encoder(folder, dtype, t5_quantization)
    # dtype at load, never .to(dtype) afterwards: that bypasses T5's fp32-kept modules (diffusers#7693).
    pipe = PixArtAlphaPipeline.from_pretrained(folder, dtype=dtype, **extra)
    for i, ((weights, info), s) in enumerate(loaded):
        _inject(pipe.transformer, weights, info, f"adapter{i}", s)
    if cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        for name in ("transformer", "vae") + (() if t5_quantization else ("text_encoder",)):
            getattr(pipe, name).to(device)  # a bitsandbytes T5 already sits where it was loaded
    if vae_tiling:
        pipe.vae.enable_tiling()
    if vae_slicing:
        pipe.vae.enable_slicing()
    if scheduler:
        set_scheduler(pipe, scheduler)
    if fuse:
        fuse_adapters(pipe)
    if compile:
        compile_transformer(pipe)
    pipe._pixart_info = {"base": base, "device": device, "dtype": str(dtype).removeprefix("torch."),
                         "t5_quantization": t5_quantization, "cpu_offload": cpu_offload, "vae_tiling": vae_tiling,
                         "vae_slicing": vae_slicing, "compile": compile}  # fmt: skip
    return pipe


def _adapter_items(lora, scale) -> list[tuple[str, float]]:
    if not lora:
        return []
    if isinstance(lora, dict):
        return [(str(k), float(v)) for k, v in lora.items()]
    loras = [lora] if isinstance(lora, (str, Path)) else list(lora)
    scales = list(scale) if isinstance(scale, (list, tuple)) else [scale] * len(loras)
    if len(scales) != len(loras):
        raise ValueError(f"{len(loras)} adapters but {len(scales)} scales: give one scale, or one per adapter")
    return [(str(p), float(s)) for p, s in zip(loras, scales)]


def _bin_size(pipe, height: int, width: int) -> tuple[int, int]:
    """The (h, w) the pipeline really generates at with resolution binning (its own table and rule)."""
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
        ASPECT_RATIO_256_BIN,
        ASPECT_RATIO_512_BIN,
        ASPECT_RATIO_1024_BIN,
    )

    table = {128: ASPECT_RATIO_1024_BIN, 64: ASPECT_RATIO_512_BIN, 32: ASPECT_RATIO_256_BIN}.get(pipe.transformer.config.sample_size)
    if table is None:
        return height, width
    return tuple(pipe.image_processor.classify_height_width_bin(height, width, ratios=table))


def _seeds(seed: int | list[int], n: int) -> list[int]:
    if isinstance(seed, int):
        return [seed + i for i in range(n)]
    seeds = [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} images: give one seed (then seed, seed+1, ...) or one per image")
    return seeds


def _default_clean_caption() -> bool:
    """The pipeline's own default (clean), but only where it can (beautifulsoup4 + ftfy installed)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("bs4", "ftfy"))


@contextlib.contextmanager
def _quiet_bitsandbytes():
    """An 8-bit T5 logs 'MatMul8bitLt: inputs will be cast ... to float16' once per layer per call."""
    log = logging.getLogger("bitsandbytes.autograd._functions")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def generate(
    pipe,
    prompt: str | list[str],
    *,
    out: str | Path,
    negative_prompt: str = "",
    height: int | None = None,
    width: int | None = None,
    steps: int = 20,
    guidance_scale: float = 4.5,
    seed: int | list[int] = 0,
    images_per_prompt: int = 1,
    scheduler: str | None = None,
    resolution_binning: bool = True,
    clean_caption: bool | None = None,
) -> list[Path]:
    """Generate and write PNGs plus a JSON of every parameter used. `out`: a .png path (one image)
    or a folder (000.png, 001.png, ...; the JSON is 000.json).

    Any height/width: with `resolution_binning` the pipeline generates at the nearest trained
    aspect-ratio bucket and resizes to exactly height x width. One seed per image (an int seed s gives
    s, s+1, ...), each image from its own generator: an image depends on its seed, not on the batch.
    `scheduler` (see SCHEDULERS) switches the sampler for this and later calls."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("no prompt given")
    if steps < 2 and not (steps == 1 and type(pipe.scheduler).__name__ == "LCMScheduler"):
        raise ValueError(f"steps={steps}: give at least 2 (the pipeline's one-step path is only for LCM/DMD schedulers)")
    n = len(prompts) * images_per_prompt
    seeds = _seeds(seed, n)  # the pipeline orders images prompt by prompt, each prompt's copies together
    if scheduler:
        set_scheduler(pipe, scheduler)
    if clean_caption is None:
        clean_caption = _default_clean_caption()
    t = pipe.transformer
    size = (height or t.config.sample_size * pipe.vae_scale_factor, width or t.config.sample_size * pipe.vae_scale_factor)
    generated = _bin_size(pipe, *size) if resolution_binning else size
    started = time.perf_counter()
    with _quiet_bitsandbytes():
        images = pipe(
            prompt=prompts, negative_prompt=negative_prompt, height=size[0], width=size[1],
            num_inference_steps=steps, guidance_scale=guidance_scale, num_images_per_prompt=images_per_prompt,
            generator=[torch.Generator(device="cpu").manual_seed(s) for s in seeds],
            use_resolution_binning=resolution_binning, clean_caption=clean_caption,
        ).images  # fmt: skip
    seconds = time.perf_counter() - started
    out = Path(out)
    if out.suffix.lower() == ".png" and len(images) == 1:
        paths = [out]
    else:
        folder = out.with_suffix("") if out.suffix.lower() == ".png" else out
        paths = [folder / f"{i:03d}.png" for i in range(len(images))]
    for path, image in zip(paths, images):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    import diffusers

    from . import __version__

    params = dict(
        prompt=prompts, negative_prompt=negative_prompt, height=images[0].height, width=images[0].width,
        generated_height=generated[0], generated_width=generated[1], resolution_binning=resolution_binning,
        steps=steps, guidance_scale=guidance_scale, scheduler=scheduler_name(pipe),
        scheduler_class=type(pipe.scheduler).__name__, seed=seeds[0], seeds=seeds,
        images_per_prompt=images_per_prompt, clean_caption=clean_caption,
        adapters=[{"name": k, **v} for k, v in adapters(pipe).items()], fused=is_fused(pipe),
        **getattr(pipe, "_pixart_info", {}), seconds=round(seconds, 3),
        versions={"pixart_tune": __version__, "diffusers": diffusers.__version__, "torch": torch.__version__},
        files=[str(p) for p in paths],
    )  # fmt: skip
    paths[0].with_suffix(".json").write_text(json.dumps(params, indent=2, default=str) + "\n")
    return paths


def benchmark_latency(pipe, steps: int = 20, height: int = 1024, width: int = 1024, runs: int = 3, *,
                      prompt: str = "a photo of an astronaut riding a horse on the moon", warmup: int = 1,
                      **call_kwargs) -> float:  # fmt: skip
    """Median seconds of one full `pipe(prompt)` call (T5, `steps` transformer steps with CFG, VAE
    decode) over `runs` timed calls after `warmup` untimed ones (compilation, cuDNN autotune, caches).
    Works for any PixArtAlphaPipeline, ours or one with a PeftModel transformer; the GPU is
    synchronized before and after each timed call."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    kwargs = {"num_inference_steps": steps, "height": height, "width": width, "clean_caption": False, **call_kwargs}
    pipe.set_progress_bar_config(disable=True)
    times = []
    for i in range(warmup + runs):
        generator = torch.Generator(device="cpu").manual_seed(i)
        sync()
        started = time.perf_counter()
        with torch.inference_mode():
            pipe(prompt, generator=generator, **kwargs)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - started)
    return statistics.median(times)
