"""Measuring a model on its cached training data: the mean objective under fixed noise.

Used by the tests (does training lower the loss?) and handy for users comparing adapters: the same
seed gives the same timesteps, noise and posterior samples for the base and for every adapter.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .cache import build_cache
from .config import Config, load_config
from .features import CachedFeatures, collate
from .loss import LossFn, sample_generators
from .models import DTYPES, load_transformer, resolve_base


@torch.no_grad()
def dataset_loss(cfg: Config | str | Path, lora: str | Path | None = None, *, seed: int = 1234, draws: int = 4,
                 device: str = "cpu") -> float:  # fmt: skip
    """Mean loss over every cached example, `draws` noise draws each, with caption dropout off."""
    if not isinstance(cfg, Config):
        cfg = load_config(cfg)
    base = resolve_base(cfg.model.base)
    index = build_cache(cfg, base, device, show_progress=False)
    dataset = CachedFeatures(index)
    transformer = load_transformer(base, DTYPES[cfg.model.weight_dtype], cfg.model.revision).to(device).eval()
    model = transformer
    if lora is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(transformer, str(lora)).to(device).eval()
    loss_fn = LossFn(cfg, base, transformer, dataset.null, device, caption_dropout=0.0)
    total, count = 0.0, 0
    for i in range(len(dataset)):
        batch = {k: v.to(device) for k, v in collate([dataset[i]]).items()}
        for d in range(draws):
            gens = sample_generators(seed, step=d, micro=0, first=i, count=1, device=device)
            total += float(loss_fn(model, batch, gens).sum())
            count += 1
    return total / count
