"""Which transformer layers a LoRA adapts, and wrapping the transformer with peft.

Presets name layers by the suffixes diffusers uses inside PixArt's transformer blocks, which are
unambiguous there. 'all-linear' lists every nn.Linear by full name (adaLN, caption projection,
embedders, proj_out): never the patch-embedding Conv2d `pos_embed.proj`, which peft's bare
`proj` target would also catch.
"""

from __future__ import annotations

from torch import nn

from .config import LoraConfig as LoraSettings

PRESETS = {
    "attention": ["to_q", "to_k", "to_v", "to_out.0"],
    "attention+ff": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"],
}
ALL_LINEAR = "all-linear"


class LoraTargetError(ValueError):
    """lora.targets names no layer, or a layer LoRA must not adapt."""


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)  # peft's rule for list targets


def resolve_targets(transformer: nn.Module, targets: str | list[str]) -> list[str]:
    """Turn `lora.targets` into peft `target_modules`, checking every match is an nn.Linear."""
    modules = dict(transformer.named_modules())
    if isinstance(targets, str):
        if targets == ALL_LINEAR:
            return sorted(n for n, m in modules.items() if isinstance(m, nn.Linear))
        if targets not in PRESETS:
            raise LoraTargetError(
                f"lora.targets: unknown preset {targets!r}; use one of {sorted(PRESETS) + [ALL_LINEAR]} "
                "or a list of module names"
            )
        targets = PRESETS[targets]
    for target in targets:
        hits = [n for n in modules if _matches(n, target)]
        if not hits:
            raise LoraTargetError(f"lora.targets: {target!r} matches no module of the transformer")
        wrong = [n for n in hits if not isinstance(modules[n], nn.Linear)]
        if wrong:
            raise LoraTargetError(
                f"lora.targets: {target!r} matches {wrong[0]} ({type(modules[wrong[0]]).__name__}), which is not a "
                "Linear layer; name the Linear layers explicitly (e.g. 'transformer_blocks.0.attn1.to_q')"
            )
    return list(targets)


def lora_config(transformer: nn.Module, settings: LoraSettings, base_model: str):
    """A peft LoraConfig from our settings. alpha defaults to the rank (scale 1.0)."""
    from peft import LoraConfig

    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha if settings.alpha is not None else settings.rank,
        lora_dropout=settings.dropout,
        target_modules=resolve_targets(transformer, settings.targets),
        use_dora=settings.dora,
        use_rslora=settings.rslora,
        init_lora_weights=True,  # B = 0: the adapted model starts equal to the base
    )
    # Recorded in adapter_config.json, where peft and diffusers users look for the base model.
    config.base_model_name_or_path = base_model
    return config


def add_lora(transformer: nn.Module, settings: LoraSettings, base_model: str):
    """Freeze the transformer and wrap it with a trainable LoRA (a peft PeftModel)."""
    from peft import get_peft_model

    transformer.requires_grad_(False)
    # peft copies the base model's `name_or_path` into the adapter config: give it ours.
    transformer.name_or_path = base_model
    return get_peft_model(transformer, lora_config(transformer, settings, base_model))
