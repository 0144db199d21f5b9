"""Exponential moving average of the trained weights (LoRA or full), optionally kept on the CPU.

Under FSDP each process holds a shard of every parameter (a DTensor); the EMA then keeps the same
shard of each shadow weight, and only `state_dict` gathers them (every process must call it)."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def _local(p: torch.Tensor) -> torch.Tensor:
    """This process's part of a parameter: its shard under FSDP, else the whole tensor."""
    return p.to_local() if isinstance(p, DTensor) else p


class EMA:
    """shadow <- decay * shadow + (1 - decay) * param, for every trainable parameter, in fp32."""

    def __init__(self, named_params: dict[str, torch.nn.Parameter], decay: float, on_cpu: bool = False):
        self.decay = decay
        self.params = named_params
        self.shadow = {}
        for n, p in named_params.items():
            local = _local(p).detach()
            self.shadow[n] = local.float().to("cpu" if on_cpu else local.device, copy=True)

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self.params.items():
            s = self.shadow[name]
            s.lerp_(_local(p).detach().to(s.device, torch.float32), 1.0 - self.decay)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange live weights and EMA weights (call twice to undo): for saving or sampling with EMA."""
        for name, p in self.params.items():
            live = _local(p).detach()
            previous = live.clone()
            live.copy_(self.shadow[name].to(live.device, live.dtype))
            self.shadow[name].copy_(previous.to(self.shadow[name].device, torch.float32))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The full EMA weights on the CPU (collective under FSDP: every process must call it)."""
        out = {}
        for n, s in self.shadow.items():
            p = self.params[n]
            if isinstance(p, DTensor):
                whole = DTensor.from_local(
                    s.to(p.device), p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
                )
                s = whole.full_tensor()
            out[n] = s.cpu()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from full weights (as state_dict wrote them); each process keeps its shard."""
        missing = set(self.shadow) - set(state)
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[0]}")
        for n, s in self.shadow.items():
            value, p = state[n], self.params[n]
            if isinstance(p, DTensor):
                value = distribute_tensor(value.to(p.device, torch.float32), p.device_mesh, p.placements).to_local()
            s.copy_(value.to(s.device))
