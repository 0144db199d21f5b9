"""Fold a LoRA into the transformer's weights, so it runs with no adapter code at all.

For each adapted layer with weight W (out, in), A (r, in), B (out, r):

    W <- W + scale * (alpha / r) * B @ A        computed in fp32, then cast back to W's dtype

A conv layer (peft's Conv2d LoRA: A (r, in, kh, kw) a conv, B (out, r, 1, 1) a 1x1 conv) folds the
same way with A flattened to (r, in*kh*kw) and the product reshaped to (out, in, kh, kw).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_dir
from .lora_formats import Lora, load_lora


def _target(transformer: nn.Module, module: str) -> nn.Module:
    try:
        layer = transformer.get_submodule(module)
    except AttributeError:
        raise ValueError(f"LoRA module {module!r} is not in this transformer: is the LoRA for another model?") from None
    if hasattr(layer, "base_layer"):  # a peft LoraLayer: its own adapter would be counted twice
        raise ValueError(f"{module} already carries a peft adapter: merge into the plain base transformer "
                         "(or call peft's merge_and_unload on the adapted one)")
    if not isinstance(getattr(layer, "weight", None), torch.Tensor):
        raise ValueError(f"LoRA module {module!r} is a {type(layer).__name__} without a weight")
    return layer


@torch.no_grad()
def merge_lora_into_transformer(transformer: nn.Module, lora: Lora, scale: float = 1.0) -> nn.Module:
    """Add `scale` x the LoRA's delta to the weights of `transformer` (in place); returns it.

    scale 1.0 = the adapter as trained; 0.5 = half strength, as peft's `set_scale(adapter, 0.5)`."""
    layers = {m: _target(transformer, m) for m in lora.layers}  # check every module before changing any
    for m, layer in layers.items():
        a, b = lora.layers[m]  # A (r, in[, kh, kw]), B (out, r[, 1, 1])
        w = layer.weight  # (out, in[, kh, kw])
        delta = b.flatten(1).float() @ a.flatten(1).float()  # (out, r) @ (r, in*kh*kw) -> (out, in*kh*kw)
        if delta.numel() != w.numel():
            raise ValueError(f"{m}: LoRA delta {tuple(delta.shape)} does not fit weight {tuple(w.shape)}")
        delta = delta.to(w.device).view(w.shape) * (scale * lora.scale_of(m))
        w.copy_((w.float() + delta).to(w.dtype))
    return transformer


def merge_lora_to_folder(base, lora_path, out_dir, *, scale: float = 1.0, assume_alpha=None,
                         torch_dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Load the transformer of `base` (pipeline folder, transformer folder or Hub id), merge the LoRA
    file/folder `lora_path` at `scale`, and save the merged transformer to `out_dir` (safetensors).

    Use it with `PixArtAlphaPipeline.from_pretrained(base, transformer=PixArtTransformer2DModel.from_pretrained(out_dir))`."""
    from diffusers import PixArtTransformer2DModel

    local = Path(base)
    subfolder = None if (local / "config.json").is_file() and not (local / "transformer").is_dir() else "transformer"
    transformer = PixArtTransformer2DModel.from_pretrained(base, subfolder=subfolder, torch_dtype=torch_dtype)
    lora, _ = load_lora(lora_path, assume_alpha=assume_alpha)
    merge_lora_into_transformer(transformer, lora, scale)
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} is not empty; pass overwrite=True to replace it")
    with atomic_dir(out_dir) as tmp:  # a crash never leaves a half-written model at out_dir
        transformer.save_pretrained(tmp, safe_serialization=True)
    return out_dir
