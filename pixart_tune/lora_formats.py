"""LoRA files users exchange, read and written through one in-memory form (`Lora`).

    format     files                                    keys (m = module path, e.g. transformer_blocks.0.attn1.to_q)
    peft       <dir>/adapter_config.json                base_model.model.<m>.lora_A.weight / .lora_B.weight
               <dir>/adapter_model.safetensors          alpha: lora_alpha / alpha_pattern in the JSON
    diffusers  pytorch_lora_weights.safetensors         transformer.<m>.lora_A.weight / .lora_B.weight
                                                        alpha: header "lora_adapter_metadata" (below)
    kohya      <name>.safetensors                       lora_transformer_<m, dots as _>.lora_down.weight / .lora_up.weight
                                                        / .alpha (a scalar tensor per module)
    official   PixArt's train_pixart_lora_hf.py extra   unet.base_model.model.<m>.lora_A.weight; NO alpha (trained with
               file (read only)                         PEFT's default lora_alpha=8) -> `assume_alpha` is required

The diffusers header follows diffusers' own scheme, so `PeftAdapterMixin.load_lora_adapter` reads it:
`lora_adapter_metadata` = JSON of LoraConfig kwargs under the component prefix ("transformer.r",
"transformer.lora_alpha", "transformer.target_modules", "transformer.rank_pattern",
"transformer.alpha_pattern", ...). Every file we write also carries "pixart_tune" = JSON
{"format", "rank", "alpha", "base_model"}.

A LoRA adds  W' = W + (alpha / r) * B @ A  with A (r, in) and B (out, r); for a conv, A (r, in, kh, kw)
and B (out, r, 1, 1).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # = diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
PIXART_META_KEY = "pixart_tune"
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
OFFICIAL_SCRIPT_ALPHA = 8  # PEFT's default lora_alpha, which train_pixart_lora_hf.py never overrides
FORMATS = ("peft", "diffusers", "kohya")
_PREFIXES = {  # key prefix -> format, most specific first
    "unet.base_model.model.": "official",
    "transformer.": "diffusers",
    "base_model.model.": "peft",
}
_KOHYA_PREFIXES = ("lora_transformer_", "lora_unet_")


class MissingAlphaError(ValueError):
    """A LoRA file without alpha, loaded without `assume_alpha`."""


@dataclass
class Lora:
    """LoRA weights by module path: layers[m] = (A (r, in), B (out, r)); alphas[m] = alpha (scale alpha/r)."""

    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    alphas: dict[str, float]

    def __post_init__(self):
        if set(self.layers) != set(self.alphas):
            raise ValueError(f"alphas must name exactly the LoRA modules; differ at {sorted(set(self.layers) ^ set(self.alphas))[:5]}")
        for m, (a, b) in self.layers.items():
            if a.shape[0] != b.shape[1]:
                raise ValueError(f"{m}: A {tuple(a.shape)} and B {tuple(b.shape)} disagree on the rank")

    @classmethod
    def uniform(cls, layers: dict, alpha: float) -> Lora:
        return cls(dict(layers), {m: float(alpha) for m in layers})

    def rank_of(self, m: str) -> int:
        return self.layers[m][0].shape[0]

    def scale_of(self, m: str) -> float:
        return self.alphas[m] / self.rank_of(m)

    @property
    def rank(self) -> int:  # the most common rank; others are in rank_pattern
        return Counter(self.rank_of(m) for m in self.layers).most_common(1)[0][0]

    @property
    def alpha(self) -> float:  # the most common alpha; others are in alpha_pattern
        return Counter(self.alphas.values()).most_common(1)[0][0]

    @property
    def rank_pattern(self) -> dict[str, int]:
        return {m: self.rank_of(m) for m in self.layers if self.rank_of(m) != self.rank}

    @property
    def alpha_pattern(self) -> dict[str, float]:
        return {m: a for m, a in self.alphas.items() if a != self.alpha}

    def with_unit_scale(self) -> Lora:
        """The same LoRA with each alpha/r folded into B and alpha = r: identical outputs, and
        correct in loaders that ignore alpha (they apply B @ A at scale 1)."""
        layers = {m: (a, b * self.scale_of(m)) for m, (a, b) in self.layers.items()}
        return Lora(layers, {m: float(self.rank_of(m)) for m in self.layers})


# ---- peft bridge -------------------------------------------------------------------------------


def lora_to_peft_config(lora: Lora, *, target_modules=None, base_model: str | None = None):
    """A peft LoraConfig for `lora`: r / lora_alpha = the common values, per-module exceptions as
    `^<module path>` rank_pattern / alpha_pattern; targets = exactly the LoRA's modules by default."""
    from peft import LoraConfig

    if target_modules is not None:  # peft's rule: a target is a module path or a dotted suffix of one
        loose = [m for m in lora.layers if not any(m == t or m.endswith("." + t) for t in target_modules)]
        if loose:
            raise ValueError(f"target_modules {list(target_modules)} leave out LoRA modules {loose[:5]}")
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        target_modules=sorted(target_modules or lora.layers),
        rank_pattern={f"^{m}": r for m, r in lora.rank_pattern.items()},
        alpha_pattern={f"^{m}": a for m, a in lora.alpha_pattern.items()},
    )
    config.base_model_name_or_path = base_model
    return config


def lora_to_peft_state(lora: Lora, prefix: str = "") -> dict[str, torch.Tensor]:
    """peft state-dict keys `<prefix><m>.lora_A.weight` / `.lora_B.weight` (no adapter name)."""
    out = {}
    for m, (a, b) in lora.layers.items():
        out[f"{prefix}{m}.lora_A.weight"] = a
        out[f"{prefix}{m}.lora_B.weight"] = b
    return out


def apply_lora(model, lora: Lora, *, adapter_name: str = "default"):
    """Add `lora` as adapter `adapter_name` to a plain transformer (in place) or a PeftModel; returns it."""
    from peft import PeftModel, inject_adapter_in_model, set_peft_model_state_dict

    config = lora_to_peft_config(lora)
    if isinstance(model, PeftModel):
        model.add_adapter(adapter_name, config)
        prefix = "base_model.model."
    else:
        inject_adapter_in_model(config, model, adapter_name=adapter_name)
        prefix = ""
    result = set_peft_model_state_dict(model, lora_to_peft_state(lora, prefix), adapter_name=adapter_name)
    missing = [k for k in result.missing_keys if ".lora_" in k and f".{adapter_name}." in k]
    if result.unexpected_keys or missing:
        raise ValueError(f"LoRA does not fit the model: unexpected {result.unexpected_keys[:5]}, missing {missing[:5]}")
    return model


def lora_from_peft_model(model, adapter_name: str = "default") -> Lora:
    """Read adapter `adapter_name` out of a peft-wrapped model (PeftModel or injected in place)."""
    from peft.tuners.lora import LoraLayer

    layers, alphas = {}, {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        if module.use_dora.get(adapter_name) or getattr(module, "lora_bias", {}).get(adapter_name):
            raise ValueError(f"{name}: DoRA / LoRA-bias adapters have no plain A/B form; these formats cannot hold them")
        r, alpha = module.r[adapter_name], module.lora_alpha[adapter_name]
        if module.use_rslora.get(adapter_name):  # rsLoRA scales by alpha/sqrt(r): same product as alpha*sqrt(r)/r
            alpha = alpha * math.sqrt(r)
        m = name.removeprefix("base_model.model.")
        layers[m] = (module.lora_A[adapter_name].weight.detach().clone(), module.lora_B[adapter_name].weight.detach().clone())
        alphas[m] = float(alpha)
    if not layers:
        raise ValueError(f"the model holds no LoRA adapter named {adapter_name!r}")
    return Lora(layers, alphas)


# ---- writing -----------------------------------------------------------------------------------


def _save_safetensors(tensors: dict, path: Path, metadata: dict) -> None:
    """Atomic safetensors write (temporary name, then rename)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata={"format": "pt", **metadata})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def kohya_name(module: str) -> str:
    return "lora_transformer_" + module.replace(".", "_")


def save_lora(path, lora: Lora, *, format: str, base_model: str | None = None, target_modules=None) -> Path:
    """Write `lora` as `format` ("peft" folder, "diffusers" or "kohya" file); returns the main file's path.

    For "diffusers", a `path` not ending in .safetensors is a folder that gets pytorch_lora_weights.safetensors.
    `target_modules` (peft/diffusers configs) defaults to the exact module paths of the LoRA."""
    if format not in FORMATS:
        raise ValueError(f"unknown LoRA format {format!r}; choose one of {FORMATS}")
    path = Path(path)
    if format == "diffusers":
        # ComfyUI and diffusers (given a file path) skip the header and apply scale 1 = alpha/r only
        # when alpha == r; folding alpha/r into B makes the file's strength right in every loader.
        lora = lora.with_unit_scale()
    config = lora_to_peft_config(lora, target_modules=target_modules, base_model=base_model)
    ours = {PIXART_META_KEY: json.dumps({"format": format, "rank": lora.rank, "alpha": lora.alpha, "base_model": base_model})}
    if format == "peft":
        _save_safetensors(lora_to_peft_state(lora, "base_model.model."), path / PEFT_WEIGHTS, ours)
        with tempfile.TemporaryDirectory(dir=path) as tmp:  # peft writes the JSON; then move it in atomically
            config.save_pretrained(tmp)
            os.replace(Path(tmp) / PEFT_CONFIG, path / PEFT_CONFIG)
        return path / PEFT_WEIGHTS
    if format == "diffusers":
        path = path if path.suffix == ".safetensors" else path / DIFFUSERS_FILE
        kwargs = dict(r=config.r, lora_alpha=config.lora_alpha, target_modules=sorted(config.target_modules),
                      rank_pattern=config.rank_pattern, alpha_pattern=config.alpha_pattern,
                      use_dora=False, use_rslora=False, lora_bias=False)
        header = {LORA_ADAPTER_METADATA_KEY: json.dumps({f"transformer.{k}": v for k, v in kwargs.items()}, indent=2, sort_keys=True)}
        _save_safetensors(lora_to_peft_state(lora, "transformer."), path, header | ours)
        return path
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: a kohya LoRA is one .safetensors file; give a name ending in .safetensors")
    tensors = {}
    for m, (a, b) in lora.layers.items():
        tensors[f"{kohya_name(m)}.lora_down.weight"] = a
        tensors[f"{kohya_name(m)}.lora_up.weight"] = b
        tensors[f"{kohya_name(m)}.alpha"] = torch.tensor(lora.alphas[m], dtype=torch.float32)
    kohya_meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(lora.rank), "ss_network_alpha": str(lora.alpha)}
    _save_safetensors(tensors, path, kohya_meta | ours)
    return path


# ---- reading -----------------------------------------------------------------------------------


def _read(path: Path) -> tuple[dict, dict]:
    """(tensors, safetensors header metadata) of a LoRA weights file; pickles only via weights_only."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    return torch.load(path, map_location="cpu", weights_only=True), {}


def _collect(tensors: dict, prefix: str, down: str, up: str, where: str) -> dict[str, list]:
    """{module: [A, B, alpha tensor or None]} from keys `<prefix><module><down|up|.alpha>`."""
    parts, unknown = {}, []
    for k, v in tensors.items():
        rest = k[len(prefix):] if k.startswith(prefix) else None
        for slot, suffix in enumerate((down, up, ".alpha")):
            if rest is not None and rest.endswith(suffix):
                parts.setdefault(rest[: -len(suffix)], [None, None, None])[slot] = v
                break
        else:
            unknown.append(k)
    if unknown:
        raise ValueError(f"{where}: keys this plain-LoRA reader does not know (DoRA, LoRA bias, LyCORIS?): {unknown[:5]}")
    broken = [m for m, (a, b, _) in parts.items() if a is None or b is None]
    if broken:
        raise ValueError(f"{where}: modules with only one of A/B: {broken[:5]}")
    return parts


def _alphas_from_config(cfg: dict, parts: dict) -> dict[str, float]:
    """Per-module alpha from LoraConfig kwargs (lora_alpha, alpha_pattern; rsLoRA folded into alpha)."""
    from peft.utils.other import get_pattern_key

    if cfg.get("use_dora") or cfg.get("lora_bias"):
        raise ValueError("DoRA / LoRA-bias adapters are not plain LoRAs; load them with peft directly")
    pattern = cfg.get("alpha_pattern") or {}
    alphas = {}
    for m, (a, _, _) in parts.items():
        key = get_pattern_key(pattern.keys(), m)
        alpha = float(pattern.get(key, cfg["lora_alpha"]))
        alphas[m] = alpha * math.sqrt(a.shape[0]) if cfg.get("use_rslora") else alpha
    return alphas


def _missing_alpha(parts: dict, assume_alpha, what: str, where: str) -> dict[str, float]:
    if assume_alpha is None:
        r = Counter(a.shape[0] for a, _, _ in parts.values()).most_common(1)[0][0]
        raise MissingAlphaError(
            f"{where}: this {what} stores no alpha, yet a LoRA's strength is alpha/rank (rank {r}), so "
            f"loading it needs an explicit assumption. Files from PixArt's train_pixart_lora_hf.py were trained "
            f"with PEFT's default lora_alpha={OFFICIAL_SCRIPT_ALPHA} (scale {OFFICIAL_SCRIPT_ALPHA / r:g} at rank {r}): "
            f"pass assume_alpha={OFFICIAL_SCRIPT_ALPHA} (CLI: --assume-alpha {OFFICIAL_SCRIPT_ALPHA}). If its author "
            f"meant alpha = rank (scale 1.0, what ComfyUI assumes), pass assume_alpha='rank' (--assume-alpha {r})."
        )
    return {m: float(a.shape[0] if assume_alpha == "rank" else assume_alpha) for m, (a, _, _) in parts.items()}


def pixart_module_names(num_layers: int = 28) -> list[str]:
    """Every module path of a PixArt-alpha transformer (1024-MS, so the size embedders are included)."""
    from accelerate import init_empty_weights
    from diffusers import PixArtTransformer2DModel

    from .tiny import TINY_TRANSFORMER  # names do not depend on widths

    with init_empty_weights():
        model = PixArtTransformer2DModel(**{**TINY_TRANSFORMER, "num_layers": num_layers})
    return [n for n, _ in model.named_modules() if n]


def _kohya_modules(parts: dict, module_names, where: str) -> dict:
    """Map kohya's `transformer_blocks_0_attn1_to_q` back to `transformer_blocks.0.attn1.to_q`."""
    if module_names is None:
        blocks = [int(x) for k in parts for x in re.findall(r"^transformer_blocks_(\d+)_", k)]
        module_names = pixart_module_names(max(blocks, default=0) + 1)
    by_flat = {n.replace(".", "_"): n for n in module_names}
    unknown = [k for k in parts if k not in by_flat]
    if unknown:
        raise ValueError(f"{where}: kohya names that match no PixArt module: {unknown[:5]}; pass module_names=[...] of your model")
    return {by_flat[k]: v for k, v in parts.items()}


def load_lora(path, *, assume_alpha: float | str | None = None, module_names=None) -> tuple[Lora, dict]:
    """Read a LoRA in any supported format (see the module docstring) -> (Lora, info).

    info: format, path, rank, alpha, alpha_assumed, base_model, target_modules (when the file says).
    `assume_alpha` (a number, or "rank") is used only for files that carry no alpha; without it such
    a file raises MissingAlphaError. `module_names` resolves kohya names (default: PixArt's)."""
    path = Path(path)
    config = None
    if path.is_dir():
        if (path / PEFT_CONFIG).is_file():
            config = json.loads((path / PEFT_CONFIG).read_text())
            path = next((path / n for n in (PEFT_WEIGHTS, "adapter_model.bin") if (path / n).is_file()), path / PEFT_WEIGHTS)
        else:
            files = sorted(path.glob("*.safetensors"))
            named = [f for f in files if f.name == DIFFUSERS_FILE]
            if not named and len(files) != 1:
                raise FileNotFoundError(f"{path}: no {PEFT_CONFIG}, no {DIFFUSERS_FILE} and not exactly one .safetensors")
            path = (named or files)[0]
    elif (path.parent / PEFT_CONFIG).is_file() and path.name.startswith("adapter_model"):
        config = json.loads((path.parent / PEFT_CONFIG).read_text())
    where = str(path)
    tensors, header = _read(path)
    keys = list(tensors)
    info = {"path": where, "alpha_assumed": False, "base_model": None, "target_modules": None}
    if keys and all(k.startswith(_KOHYA_PREFIXES) for k in keys):
        info["format"] = "kohya"
        prefix = next(p for p in _KOHYA_PREFIXES if keys[0].startswith(p))
        parts = _kohya_modules(_collect(tensors, prefix, ".lora_down.weight", ".lora_up.weight", where), module_names, where)
    else:
        prefix = next((p for p in _PREFIXES if keys and all(k.startswith(p) for k in keys)), "")
        info["format"] = "peft" if config is not None else _PREFIXES.get(prefix, "peft-bare")
        parts = _collect(tensors, prefix, ".lora_A.weight", ".lora_B.weight", where)
    if not parts:
        raise ValueError(f"{where}: holds no LoRA weights")
    if config is None and LORA_ADAPTER_METADATA_KEY in header:  # diffusers' scheme: "<component>.<kwarg>"
        meta = json.loads(header[LORA_ADAPTER_METADATA_KEY])
        config = {k.removeprefix("transformer."): v for k, v in meta.items() if k.startswith("transformer.")}
    if config is not None and config.get("lora_alpha") is not None:
        alphas = _alphas_from_config(config, parts)
        info["base_model"] = config.get("base_model_name_or_path")
        info["target_modules"] = config.get("target_modules")
    elif all(al is not None for _, _, al in parts.values()):
        alphas = {m: float(al) for m, (_, _, al) in parts.items()}
    elif info["format"] == "kohya" and assume_alpha is None:  # kohya's own rule: no .alpha means alpha = rank
        warnings.warn(f"{where}: kohya LoRA without (some) .alpha tensors: using kohya's convention alpha = rank there", stacklevel=2)
        alphas = {m: float(a.shape[0] if al is None else al) for m, (a, _, al) in parts.items()}
        info["alpha_assumed"] = True
    else:
        what = {"official": "PixArt official-script (unet.base_model.model.*) file",
                "peft": "PEFT weights file without its adapter_config.json"}.get(info["format"], f"{info['format']} LoRA file")
        alphas, info["alpha_assumed"] = _missing_alpha(parts, assume_alpha, what, where), True
    if PIXART_META_KEY in header and info["base_model"] is None:
        info["base_model"] = json.loads(header[PIXART_META_KEY]).get("base_model")
    lora = Lora({m: (a, b) for m, (a, b, _) in parts.items()}, alphas)
    info.update(rank=lora.rank, alpha=lora.alpha)
    return lora, info
