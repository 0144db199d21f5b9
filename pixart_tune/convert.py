"""Original PixArt-alpha checkpoints (`.pth`, or `.safetensors` in the same key layout) <-> diffusers.

The key map (H = hidden width, 1152 for PixArt-XL/2; N = block index):

    original                               diffusers
    x_embedder.proj                        pos_embed.proj                 conv (H, 4, 2, 2)
    y_embedder.y_proj.fc1 / fc2            caption_projection.linear_1 / linear_2
    t_embedder.mlp.0 / mlp.2               adaln_single.emb.timestep_embedder.linear_1 / linear_2
    csize_embedder.mlp.0 / mlp.2           adaln_single.emb.resolution_embedder.linear_1 / linear_2  (1024-MS)
    ar_embedder.mlp.0 / mlp.2              adaln_single.emb.aspect_ratio_embedder.linear_1 / linear_2 (1024-MS)
    t_block.1                              adaln_single.linear            (6H, H)
    blocks.N.attn.qkv  (3H, H) split in 3  transformer_blocks.N.attn1.to_q / to_k / to_v
    blocks.N.attn.proj                     transformer_blocks.N.attn1.to_out.0
    blocks.N.cross_attn.q_linear           transformer_blocks.N.attn2.to_q
    blocks.N.cross_attn.kv_linear (2H, H)  transformer_blocks.N.attn2.to_k / to_v
    blocks.N.cross_attn.proj               transformer_blocks.N.attn2.to_out.0
    blocks.N.mlp.fc1 / fc2                 transformer_blocks.N.ff.net.0.proj / ff.net.2
    blocks.N.scale_shift_table (6, H)      transformer_blocks.N.scale_shift_table
    final_layer.linear                     proj_out
    final_layer.scale_shift_table (2, H)   scale_shift_table
    pos_embed (1, tokens, H)               - (diffusers recomputes the same sin-cos table)
    y_embedder.y_embedding (120, 4096)     - (the learned null caption; diffusers uses T5("") instead)

The two dropped tensors are handed back (`dropped=`) and stored beside a converted model as
`pixart_original_extras.safetensors`, so diffusers -> original restores them exactly. Without them,
the way back writes `pos_embed` from the sin-cos table diffusers computes (the same formula as the
original code) and leaves `y_embedding` out: the original code then keeps its random init for the
null caption, which only its own classifier-free guidance uses.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import warnings
from pathlib import Path

import torch

from .atomic import atomic_dir

EXTRAS_FILE = "pixart_original_extras.safetensors"
DROPPED_KEYS = ("pos_embed", "y_embedder.y_embedding")
PRESETS = {"1024": 128, "512": 64, "256": 32}  # config name -> transformer sample_size (latent px)

_TOP = {  # original module -> diffusers module; each carries .weight and .bias
    "x_embedder.proj": "pos_embed.proj",
    "y_embedder.y_proj.fc1": "caption_projection.linear_1",
    "y_embedder.y_proj.fc2": "caption_projection.linear_2",
    "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2",
    "t_block.1": "adaln_single.linear",
    "final_layer.linear": "proj_out",
}
_MICRO = {  # 1024-MS only: the resolution and aspect-ratio embedders
    "csize_embedder.mlp.0": "adaln_single.emb.resolution_embedder.linear_1",
    "csize_embedder.mlp.2": "adaln_single.emb.resolution_embedder.linear_2",
    "ar_embedder.mlp.0": "adaln_single.emb.aspect_ratio_embedder.linear_1",
    "ar_embedder.mlp.2": "adaln_single.emb.aspect_ratio_embedder.linear_2",
}
_BLOCK = {  # per block; a tuple target means the original tensor is split along dim 0
    "attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "attn.proj": ("attn1.to_out.0",),
    "cross_attn.q_linear": ("attn2.to_q",),
    "cross_attn.kv_linear": ("attn2.to_k", "attn2.to_v"),
    "cross_attn.proj": ("attn2.to_out.0",),
    "mlp.fc1": ("ff.net.0.proj",),
    "mlp.fc2": ("ff.net.2",),
}


class CheckpointRefused(ValueError):
    """A checkpoint that would need arbitrary unpickling to load."""


def _key_plan(num_layers: int, micro: bool) -> list[tuple[str, tuple[str, ...]]]:
    """Every (original key, diffusers keys) pair of a model; several diffusers keys = a split."""
    plan = [("final_layer.scale_shift_table", ("scale_shift_table",))]
    for src, dst in (_TOP | _MICRO if micro else _TOP).items():
        plan += [(f"{src}.{p}", (f"{dst}.{p}",)) for p in ("weight", "bias")]
    for n in range(num_layers):
        plan.append((f"blocks.{n}.scale_shift_table", (f"transformer_blocks.{n}.scale_shift_table",)))
        for src, dsts in _BLOCK.items():
            for p in ("weight", "bias"):
                plan.append((f"blocks.{n}.{src}.{p}", tuple(f"transformer_blocks.{n}.{d}.{p}" for d in dsts)))
    return plan


def _count_layers(keys, prefix: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(rf"{re.escape(prefix)}(\d+)\.", k))}
    if found and found != set(range(max(found) + 1)):
        raise ValueError(f"block indices are not contiguous: missing {sorted(set(range(max(found) + 1)) - found)}")
    return len(found)


def _check_keys(have, want, what: str) -> None:
    missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or unexpected:
        raise ValueError(f"{what}: missing keys {missing or 'none'}; unexpected keys {unexpected or 'none'}")


def original_to_diffusers(state_dict: dict, *, num_layers: int | None = None, dropped: dict | None = None) -> dict:
    """Map an original PixArt state dict to diffusers `PixArtTransformer2DModel` keys (strict).

    `num_layers` defaults to the number of `blocks.N` found. Pass a dict as `dropped` to receive
    `pos_embed` and `y_embedder.y_embedding`, which diffusers has no place for."""
    sd = dict(state_dict)
    for k in DROPPED_KEYS:
        if k in sd and dropped is not None:
            dropped[k] = sd[k]
        sd.pop(k, None)
    num_layers = _count_layers(sd, "blocks.") if num_layers is None else num_layers
    plan = _key_plan(num_layers, micro=any(k.startswith(("csize_embedder.", "ar_embedder.")) for k in sd))
    _check_keys(sd, [src for src, _ in plan], "original PixArt checkpoint")
    out = {}
    for src, dsts in plan:
        # clone: chunks are views of one storage, which safetensors refuses to save
        for dst, part in zip(dsts, sd[src].chunk(len(dsts), dim=0), strict=True):
            out[dst] = part.clone() if len(dsts) > 1 else part
    return out


def diffusers_to_original(state_dict: dict, *, extra: dict | None = None) -> dict:
    """Map a diffusers PixArt transformer state dict to the original layout (strict).

    `extra` may hold `pos_embed` / `y_embedder.y_embedding` (as `dropped` by the other direction);
    they are put back verbatim. Without them neither key is written (see the module docstring)."""
    num_layers = _count_layers(state_dict, "transformer_blocks.")
    micro = any(k.startswith("adaln_single.emb.resolution_embedder.") for k in state_dict)
    plan = _key_plan(num_layers, micro)
    _check_keys(state_dict, [d for _, dsts in plan for d in dsts], "diffusers PixArt transformer")
    out = {src: torch.cat([state_dict[d] for d in dsts]) if len(dsts) > 1 else state_dict[dsts[0]] for src, dsts in plan}
    for k, v in (extra or {}).items():
        if k not in DROPPED_KEYS:
            raise ValueError(f"extra holds {k!r}; only {DROPPED_KEYS} can be restored")
        out[k] = v
    return out


def _unwrap(obj, use_ema: bool, where: str) -> dict:
    """The tensor dict inside a training checkpoint ({'state_dict', 'state_dict_ema', ...})."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a dict of tensors, found {type(obj).__name__}")
    wanted = "state_dict_ema" if use_ema else "state_dict"
    if use_ema and wanted not in obj:
        raise ValueError(f"{where}: use_ema=True but the file has no 'state_dict_ema' (keys: {sorted(obj)[:10]})")
    if not use_ema and wanted not in obj and "state_dict_ema" in obj:
        raise ValueError(f"{where}: the file holds only 'state_dict_ema': pass use_ema=True")
    sd = obj.get(wanted, obj)
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)} if sd is obj else sd
    if sd and all(k.startswith("module.") for k in sd):  # saved from a DDP-wrapped model
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{where}: no tensor state dict found under {wanted!r} or at the top level")
    return sd


def load_original_checkpoint(path: str | os.PathLike, use_ema: bool = False) -> dict:
    """Read an original-layout checkpoint: `.pth` (tensors and plain containers only) or `.safetensors`.

    Unwraps `state_dict` / `state_dict_ema` (EMA when `use_ema`) and a DDP `module.` prefix."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return _unwrap(load_file(path), use_ema, where=str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointRefused(
            f"Refused to load {path}: it holds pickled Python objects beyond tensors and plain containers, "
            f"and unpickling those can run arbitrary code from the file (torch.load weights_only=True said: "
            f"{str(e).splitlines()[0]}). If you trust the file, extract its state dict yourself and save it "
            "with safetensors.torch.save_file, then convert that."
        ) from None
    return _unwrap(obj, use_ema, str(path))


def _interpolation_scale(pos_embed: torch.Tensor, sample_size: int, patch: int) -> float | None:
    """The diffusers `interpolation_scale` reproducing a stored sin-cos `pos_embed` (None = default)."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    grid = sample_size // patch
    default = max(sample_size // 64, 1)
    for scale in (default, 0.5, 1, 2, 3, 4):
        table = get_2d_sincos_pos_embed(pos_embed.shape[-1], grid, base_size=grid, interpolation_scale=scale, output_type="pt")
        if table.numel() == pos_embed.numel() and torch.allclose(table.float().view_as(pos_embed), pos_embed.float(), atol=1e-4):
            return None if scale == default else float(scale)
    warnings.warn("stored pos_embed matches no sin-cos table diffusers makes; using the default interpolation_scale", stacklevel=3)
    return None


def infer_config(sd: dict, config: str | dict | None = None) -> dict:
    """`PixArtTransformer2DModel` kwargs for an original-layout state dict (before the key map).

    Sizes come from tensor shapes; sample_size from `csize_embedder` (1024-MS -> 128), else from the
    `pos_embed` token count; `config` may name a preset ("1024"/"512"/"256") or give explicit kwargs."""
    overrides = dict(config) if isinstance(config, dict) else {}
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"unknown config {config!r}; choose one of {sorted(PRESETS)} or pass a dict")
        overrides["sample_size"] = PRESETS[config]
    hidden, in_ch, patch, _ = sd["x_embedder.proj.weight"].shape  # conv (H, 4, p, p)
    if "sample_size" not in overrides:
        if "csize_embedder.mlp.0.weight" in sd:
            overrides["sample_size"] = 128  # diffusers turns micro-conditions on exactly at 128
        elif "pos_embed" in sd:
            overrides["sample_size"] = math.isqrt(sd["pos_embed"].shape[1]) * patch
        else:
            raise ValueError("cannot tell the resolution from the weights (no csize_embedder, no pos_embed): pass config='512' or '256'")
    if "num_attention_heads" not in overrides:
        head_dim = overrides.get("attention_head_dim", 72)  # PixArt-XL/2: 16 heads x 72
        if hidden % head_dim:
            raise ValueError(f"hidden width {hidden} is not a multiple of head dim {head_dim}: pass config={{'num_attention_heads': ..., 'attention_head_dim': ...}}")
        overrides.setdefault("attention_head_dim", head_dim)
        overrides["num_attention_heads"] = hidden // head_dim
    overrides.setdefault("attention_head_dim", hidden // overrides["num_attention_heads"])
    if "pos_embed" in sd and "interpolation_scale" not in overrides:
        overrides["interpolation_scale"] = _interpolation_scale(sd["pos_embed"], overrides["sample_size"], patch)
    return dict(
        in_channels=in_ch,
        out_channels=sd["final_layer.linear.weight"].shape[0] // (patch * patch),  # (p*p*C_out, H)
        num_layers=_count_layers(sd, "blocks."),
        cross_attention_dim=hidden,
        caption_channels=sd["y_embedder.y_proj.fc1.weight"].shape[1],  # (H, 4096)
        patch_size=patch,
        attention_bias="blocks.0.attn.qkv.bias" in sd,
        activation_fn="gelu-approximate",
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        num_embeds_ada_norm=1000,
    ) | overrides


def convert_original_to_diffusers(pth, out_dir, *, config: str | dict | None = None, use_ema: bool = False, overwrite: bool = False) -> Path:
    """Convert an original checkpoint to a diffusers transformer folder (safetensors only).

    Writes config.json, diffusion_pytorch_model.safetensors and, when the checkpoint had them,
    pixart_original_extras.safetensors (pos_embed, y_embedding) for an exact way back."""
    from accelerate import init_empty_weights
    from diffusers import PixArtTransformer2DModel
    from safetensors.torch import save_file

    original = load_original_checkpoint(pth, use_ema=use_ema)
    kwargs = infer_config(original, config)
    dropped: dict = {}
    sd = original_to_diffusers(original, num_layers=kwargs["num_layers"], dropped=dropped)
    with init_empty_weights():  # parameters on "meta": no 2.4 GB random init; buffers stay real
        model = PixArtTransformer2DModel(**kwargs)
    result = model.load_state_dict(sd, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{pth}: weights do not fit the inferred config {kwargs}: missing {result.missing_keys}, unexpected {result.unexpected_keys}")
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} is not empty; pass overwrite=True to replace it")
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if dropped:
            save_file({k: v.contiguous() for k, v in dropped.items()}, str(tmp / EXTRAS_FILE), metadata={"format": "pt", "source": str(pth)})
    return out_dir


def convert_diffusers_to_original(diffusers_dir, out_file, *, extra: dict | None = None) -> Path:
    """Write a diffusers transformer folder as one `.safetensors` in the original key layout.

    `extra` (or the folder's pixart_original_extras.safetensors) restores pos_embed / y_embedding;
    otherwise pos_embed is the sin-cos table the model computes and y_embedding is left out."""
    from diffusers import PixArtTransformer2DModel
    from safetensors.torch import load_file, save_file

    out_file = Path(out_file)
    if out_file.suffix != ".safetensors":
        raise ValueError(f"{out_file}: only .safetensors is written (no pickles); use a .safetensors name")
    diffusers_dir = Path(diffusers_dir)
    model = PixArtTransformer2DModel.from_pretrained(diffusers_dir)
    if extra is None and (diffusers_dir / EXTRAS_FILE).is_file():
        extra = load_file(diffusers_dir / EXTRAS_FILE)
    extra = dict(extra or {})
    if "pos_embed" not in extra:
        extra["pos_embed"] = model.pos_embed.pos_embed.to(model.dtype)  # (1, tokens, H)
    if "y_embedder.y_embedding" not in extra:
        warnings.warn("no y_embedder.y_embedding to restore: the original code will use a random null caption", stacklevel=2)
    sd = diffusers_to_original(model.state_dict(), extra=extra)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.tmp")
    meta = {"format": "pt", "pixart_tune": json.dumps({"layout": "pixart-original", "config": dict(model.config)}, default=str)}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata=meta)
    os.replace(tmp, out_file)
    return out_file
