"""Speed switches of the training step: the fast module paths, compiling the transformer, the SDPA kernel.

Regional compile (`train.compile: regional`) compiles each transformer block on its own: all 28
blocks share one compiled graph, so warm-up takes seconds instead of minutes and the speed is that
of whole-model compile (shared/PERF.md). The attention preference puts a kernel first in SDPA's
priority list: at 1024 px, cuDNN's fused attention runs PixArt's self-attention (head dim 72) much
faster than flash or memory-efficient attention on Hopper. `fa4` (fa4.py) goes further for the
self-attention. `auto` (the default) picks the fastest of these that this machine has
(`resolve_attention`). On Hopper the compiled blocks also use Inductor's Programmatic Dependent
Launch (`compile_options`). `apply_speed_paths` swaps in the faster modules the recipe asks for (FA4's
self-attention, the folded cross-attention, the bf16 residual stream, the quack GEMMs), each in its
own module.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch
import torch._dynamo
from torch import nn

_BACKENDS = {
    "cudnn": "CUDNN_ATTENTION",
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The PixArt transformer's block list, through a peft wrapper if there is one."""
    for module in model.modules():
        blocks = getattr(module, "transformer_blocks", None)
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise ValueError("no transformer_blocks found: not a PixArt transformer")


def plain_attention(attn: nn.Module) -> bool:
    """Whether a diffusers Attention is PixArt's plain kind (no q/k, spatial or group norms, no residual
    connection, no output rescaling): what the processors of fa4.py and cross_attention.py implement."""
    norms = (attn.norm_q, attn.norm_k, attn.spatial_norm, attn.group_norm)
    return all(n is None for n in norms) and not attn.residual_connection and attn.rescale_output_factor == 1.0


def compile_options(device: torch.device) -> dict:
    """Inductor options for compiling the training step on `device` (scoped to our compiled modules).

    On Hopper and newer, Programmatic Dependent Launch (`triton.enable_pdl`, off in Inductor by default):
    each of Inductor's kernels may be launched while the one before it drains, and waits for it inside
    the kernel, before its first dependent load. That trims the launch gaps between the step's many
    short kernels: +0.3 to +0.7% a step at 1024 px on H100s (README, Performance). Setting
    TORCHINDUCTOR_ENABLE_PDL in the environment (=0 turns it off) leaves the choice to Inductor.
    """
    import torch._inductor.config as inductor

    if device.type != "cuda" or torch.version.hip is not None or "TORCHINDUCTOR_ENABLE_PDL" in os.environ:
        return {}
    if not hasattr(inductor.triton, "enable_pdl"):  # an older torch: the option does not exist
        return {}
    return {"triton.enable_pdl": True} if torch.cuda.get_device_capability(device) >= (9, 0) else {}


def apply_speed_paths(model: nn.Module, t) -> None:
    """The faster module paths `t` (the recipe's TrainConfig) asks for, on the model as it trains (after
    the LoRA and its fused linears): FA4's self-attention processor, the folded cross-attention, the
    bf16 residual stream, then the quack GEMMs (which take over FA4's projections, so they come last).
    Each checks what it can run on and leaves the rest as it was."""
    if t.attention == "fa4":
        from .fa4 import use_fa4

        use_fa4(model)
    if t.fold_cross_attention:
        from .cross_attention import fold_cross_attention

        fold_cross_attention(model)
    if t.bf16_stream and t.mixed_precision == "bf16":
        from .stream import use_bf16_stream

        use_bf16_stream(model)
    if t.quack_gemms and t.mixed_precision != "no":
        from .quack_gemm import use_quack_gemms
        from .quack_ops import quack_problem, quack_runs_on

        if quack_runs_on(torch.device("cuda")):
            problem = quack_problem()
            if problem is not None:
                warnings.warn(f"train.quack_gemms: quack's kernels failed their start-up check ({problem}); this "
                              "run goes on with cuBLAS and Inductor's kernels (train.quack_gemms=false skips the "
                              "check)", stacklevel=2)  # fmt: skip
            elif use_quack_gemms(model) and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
                print("train.quack_gemms: the blocks' feed-forward and FA4's projections run on quack's GEMMs")


def apply_compile(model: nn.Module, mode: str) -> nn.Module:
    """'none' | 'regional' (each block, in place) | 'full' (the whole model). Returns the model to call."""
    if mode == "none":
        return model
    # Every aspect-ratio bucket is a new shape; the default limit (8) would fall back to eager.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    options = compile_options(next(model.parameters()).device) or None
    if mode == "regional":
        for block in transformer_blocks(model):
            block.compile(options=options)
        return model
    return torch.compile(model, options=options)


def resolve_attention(preference: str, device) -> str:
    """`auto` made concrete for the training step on `device`; other preferences are returned as given.

    fa4 where flash-attn-4 imports and the GPU is Hopper or newer (the fastest measured: README,
    Performance), else cudnn on CUDA (faster than SDPA's own first choice at head dim 72), else
    `auto`: SDPA's own choice (CPU).
    """
    from .fa4 import fa4_installed  # here: fa4.py imports this module

    device = torch.device(device)
    if preference != "auto" or device.type != "cuda":
        return preference
    return "fa4" if torch.cuda.get_device_capability(device)[0] >= 9 and fa4_installed() else "cudnn"


def attention_context(preference: str):
    """A context manager that makes SDPA try `preference` first (falling back to the others)."""
    if preference == "auto":
        return contextlib.nullcontext()
    if preference == "fa4":  # self-attention runs FA4 (fa4.py); the cross-attention left to SDPA wants cuDNN
        preference = "cudnn"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = getattr(SDPBackend, _BACKENDS[preference])
    rest = [getattr(SDPBackend, b) for b in _BACKENDS.values() if b != _BACKENDS[preference]]
    return sdpa_kernel([first, *rest], set_priority=True)
