"""The inference helper: a PixArtAlphaPipeline with LoRA adapters, ready for 1024 px generation.

diffusers has no LoRA loader for PixArt (PixArtTransformer2DModel lacks PeftAdapterMixin), so we
inject peft LoRA layers into the pipeline's transformer in place: the pipeline keeps a plain
transformer, several adapters can be active with their own scales, and scales or adapters change
without reloading the base.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .models import DTYPES, resolve_base


def _adapter_folder(lora: str) -> str:
    """A local adapter folder, a run directory (its final/), or a Hub repo id -> a local folder."""
    path = Path(lora).expanduser()
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            return str(path)
        if (path / "final" / "adapter_config.json").is_file():
            return str(path / "final")
        raise FileNotFoundError(f"{lora} holds no adapter_config.json (nor final/adapter_config.json): not a PEFT adapter")
    if lora.count("/") == 1:
        from huggingface_hub import snapshot_download

        return snapshot_download(lora, allow_patterns=["adapter_config.json", "adapter_model.safetensors"])
    raise FileNotFoundError(f"LoRA {lora!r} is neither a folder nor a Hub repo id")


def add_adapter(transformer, lora: str, name: str) -> None:
    """Load a PEFT adapter (folder or Hub id) into `transformer` under `name`, in place."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(_adapter_folder(lora))
    config = LoraConfig.from_pretrained(str(folder))
    inject_adapter_in_model(config, transformer, adapter_name=name)
    state = load_file(str(folder / "adapter_model.safetensors"))
    # PEFT folders prefix keys with base_model.model.; set_peft_model_state_dict wants module paths.
    state = {k.removeprefix("base_model.model."): v for k, v in state.items()}
    result = set_peft_model_state_dict(transformer, state, adapter_name=name)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"adapter {lora}: keys that match no layer of this transformer: {result.unexpected_keys[:5]}")
    lora_params = [p for n, p in transformer.named_parameters() if f".{name}." in n]
    for p in lora_params:  # adapters follow the base's device and dtype
        p.data = p.data.to(transformer.device, transformer.dtype)
        p.requires_grad_(False)


def set_adapters(transformer, scales: dict[str, float]) -> None:
    """Activate exactly these adapters, each at its scale (1.0 = as trained; 0 = off)."""
    from peft.tuners.lora import LoraLayer

    names = list(scales)
    for module in transformer.modules():
        if isinstance(module, LoraLayer):
            present = [n for n in names if n in module.lora_A]
            module.set_adapter(present)
            for n in present:
                module.set_scale(n, scales[n])


def load_pipeline(
    base: str,
    lora: str | list[str] | dict[str, float] | None = None,
    scale: float | list[float] = 1.0,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
):
    """A PixArtAlphaPipeline for `base` (Hub id, folder or 'embedded:tiny') with LoRA adapters applied.

    `lora`: one adapter (folder, run dir or Hub id), a list, or {adapter: scale}. Adapters are named
    'adapter0', 'adapter1', ...; change scales later with `set_adapters(pipe.transformer, {...})`.
    """
    from diffusers import PixArtAlphaPipeline

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if dtype == torch.float16:
        raise ValueError("fp16 gives NaNs in T5 and noise in PixArt (diffusers#7693); use bf16 or fp32")
    # torch_dtype at load, never .to(dtype) afterwards: that bypasses T5's fp32-kept modules.
    pipe = PixArtAlphaPipeline.from_pretrained(resolve_base(base), torch_dtype=dtype).to(device)
    if lora:
        if isinstance(lora, dict):
            items = list(lora.items())
        else:
            loras = [lora] if isinstance(lora, str) else list(lora)
            scales = scale if isinstance(scale, list) else [scale] * len(loras)
            items = list(zip(loras, scales))
        for i, (path, _) in enumerate(items):
            add_adapter(pipe.transformer, str(path), f"adapter{i}")
        set_adapters(pipe.transformer, {f"adapter{i}": s for i, (_, s) in enumerate(items)})
    return pipe


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
    seed: int = 0,
    images_per_prompt: int = 1,
) -> list[Path]:
    """Generate and write PNGs plus a JSON of the parameters used. `out`: a .png path or a folder."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    images = pipe(
        prompt=prompts, negative_prompt=negative_prompt, height=height, width=width,
        num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator,
        num_images_per_prompt=images_per_prompt,
    ).images  # fmt: skip
    out = Path(out)
    if out.suffix.lower() == ".png" and len(images) == 1:
        paths = [out]
    else:
        folder = out.with_suffix("") if out.suffix else out
        paths = [folder / f"{i:03d}.png" for i in range(len(images))]
    for path, image in zip(paths, images):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    params = dict(prompt=prompts, negative_prompt=negative_prompt, height=images[0].height, width=images[0].width,
                  steps=steps, guidance_scale=guidance_scale, seed=seed, files=[str(p) for p in paths])  # fmt: skip
    paths[0].with_suffix(".json").write_text(json.dumps(params, indent=2))
    return paths
