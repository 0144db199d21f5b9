"""The inference helper: a PixArtAlphaPipeline with LoRA adapters, ready for 1024 px generation.

The adapters themselves (reading, injecting, scaling, fusing) live in adapters.py; this module
builds the pipeline around them, picks schedulers, generates and times.

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

from .adapters import (  # noqa: F401  (re-exported: the adapter API is part of the inference helper)
    AdapterError,
    adapters,
    add_adapter,
    compile_transformer,
    fuse_adapters,
    inject_adapter,
    is_fused,
    read_adapter,
    recorded_base,
    remove_adapter,
    resolve_adapter,
    set_adapters,
    unfuse_adapters,
)
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
        inject_adapter(pipe.transformer, weights, info, f"adapter{i}", s)
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
