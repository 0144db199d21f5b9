"""Exponential moving average of the trained weights (LoRA or full), optionally kept on the CPU."""

from __future__ import annotations

import torch


class EMA:
    """shadow <- decay * shadow + (1 - decay) * param, for every trainable parameter, in fp32."""

    def __init__(self, named_params: dict[str, torch.nn.Parameter], decay: float, on_cpu: bool = False):
        self.decay = decay
        self.params = named_params
        device = "cpu" if on_cpu else None
        self.shadow = {n: p.detach().float().to(device or p.device, copy=True) for n, p in named_params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self.params.items():
            s = self.shadow[name]
            s.lerp_(p.detach().to(s.device, torch.float32), 1.0 - self.decay)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange live weights and EMA weights (call twice to undo): for saving or sampling with EMA."""
        for name, p in self.params.items():
            live = p.detach().clone()
            p.copy_(self.shadow[name].to(p.device, p.dtype))
            self.shadow[name].copy_(live.to(self.shadow[name].device, torch.float32))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: s.cpu() for n, s in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[0]}")
        for n, s in self.shadow.items():
            s.copy_(state[n].to(s.device))
