"""pixart_tune: fine-tuning and LoRA adaptation of PixArt-alpha.

    from pixart_tune import load_pipeline
    pipe = load_pipeline("PixArt-alpha/PixArt-XL-2-1024-MS", lora="runs/my-lora/final")
    pipe("a photo of sks dog").images[0].save("dog.png")

Names are imported on first use, so `import pixart_tune` stays light (no diffusers, no peft).
"""

from importlib import import_module

_EXPORTS = {
    "Config": "config",
    "ConfigError": "config",
    "load_config": "config",
    "train": "trainer",
    "build_cache": "cache",
    "load_pipeline": "inference",
    "generate": "inference",
    "add_adapter": "adapters",
    "remove_adapter": "adapters",
    "set_adapters": "adapters",
    "fuse_adapters": "adapters",
    "unfuse_adapters": "adapters",
    "set_scheduler": "inference",
    "benchmark_latency": "inference",
    "export_adapter": "export",
    "merge_adapter": "export",
    "convert_checkpoint": "export",
    "push_to_hub": "hub",
    "load_lora": "lora_formats",
    "save_lora": "lora_formats",
    "EMBEDDED_TINY": "tiny",
    "build_tiny_pipeline": "tiny",
    "write_tiny_pipeline": "tiny",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'pixart_tune' has no attribute {name!r}")


def __dir__():
    return __all__
