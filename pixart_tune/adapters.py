"""LoRA adapters on a live PixArt transformer: find and read them, inject, scale, fuse.

diffusers has no LoRA loader for PixArt (PixArtTransformer2DModel lacks PeftAdapterMixin), so we
inject peft LoRA layers into the transformer in place: it stays a plain transformer, several
adapters can be active with their own scales, and scales or adapters change without reloading.
Adapters come in every format `lora_formats.load_lora` reads (PEFT folder, diffusers or kohya file,
the official script's file with an explicit `assume_alpha`), from a local path, a run directory
(its final/) or a Hub repo id. A fused adapter costs nothing per step (peft's merge adds
scale * B @ A to each weight once); an unfused one adds two small matmuls per adapted layer.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from .models import looks_like_hub_id

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
LORA_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class AdapterError(ValueError):
    """An adapter that cannot be found or read: says which and what to do."""


# ---- finding and reading adapters ---------------------------------------------------------------


def _is_hub_id(name: str) -> bool:
    # A missing "dir/x.safetensors" is a mistyped file, not a repo: say so rather than ask the Hub.
    return looks_like_hub_id(name) and not Path(name).suffix


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
    return inject_adapter(t, *read_adapter(lora, assume_alpha=assume_alpha), name, scale)


def inject_adapter(t, weights, info: dict, name: str, scale: float | None) -> dict:
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
