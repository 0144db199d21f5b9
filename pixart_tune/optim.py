"""Optimisers and learning-rate schedules named in recipes (train.optimizer, train.lr_scheduler)."""

from __future__ import annotations

import math
import warnings

import torch

from .config import TrainConfig


def make_optimizer(params: list[torch.nn.Parameter], t: TrainConfig, device=None) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA), 8-bit AdamW (bitsandbytes), Adafactor, CAME or Prodigy over fp32 params.

    `device`: where the params will train. The trainer builds the optimizer before accelerate moves the
    model there, so the params' own device (the CPU, then) would pick torch's foreach AdamW, which
    makes several passes over the weights and their state where the fused kernel makes one."""
    if t.optimizer == "adamw":
        on_cuda = torch.device(device).type == "cuda" if device is not None else all(p.is_cuda for p in params)
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=on_cuda or None)
    if t.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=t.lr, weight_decay=t.weight_decay)
    if t.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # External lr (no relative step): the recipe's lr and schedule mean the same as for AdamW.
        return Adafactor(params, lr=t.lr, weight_decay=t.weight_decay, scale_parameter=False, relative_step=False)
    if t.optimizer == "came":
        from came_pytorch import CAME

        # PixArt-Sigma's optimizer: Adafactor's factored second moments (a row and a column per weight
        # matrix instead of AdamW's full-size one; the first moment stays full size, so half of AdamW's
        # state) plus the paper's confidence term. Betas and eps are the paper's (Luo et al. 2023), as
        # PixArt-Sigma's training configs set them (with lr 2e-5, no weight decay).
        return CAME(params, lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16))
    if t.optimizer == "prodigy":
        from prodigyopt import Prodigy

        if t.lr < 0.1:
            warnings.warn(f"Prodigy estimates the step size itself; train.lr is a multiplier, usually 1.0 (got {t.lr})", stacklevel=2)
        return Prodigy(params, lr=t.lr, weight_decay=t.weight_decay, safeguard_warmup=t.warmup_steps > 0)
    raise ValueError(f"train.optimizer {t.optimizer!r} is not available")


def lr_factor(step: int, t: TrainConfig) -> float:
    """Multiplier of train.lr after `step` optimizer steps: linear warmup, then the schedule."""
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    if t.lr_scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if t.lr_scheduler == "linear":
        return max(0.0, 1.0 - progress)
    return 1.0


def make_lr_schedule(optimizer: torch.optim.Optimizer, t: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, t))
