"""A LoRA linear whose adapter rides inside the base layer's matmuls (same maths as peft's forward).

peft computes `base(x) + lora_B(lora_A(x)) * scaling` as separate kernels: the base GEMM writes its
(M, N) output, the up-projection writes another (M, N) tensor and an add sums them; under autocast
lora_A also casts x to fp32 and back, and autograd keeps that extra bf16 copy of x for the backward.
Here the adapter term enters the base GEMM as its C operand (cuBLAS reads it in the epilogue, `addmm`
with beta = 1), and the backward is written out, keeping only x itself and the (M, r) projection:

    forward   h  = x @ A^T                      (M, r)
              l  = bias + h @ (s B)^T           (M, N)  the small GEMM writes the adapter term once
              y  = l + x @ W^T                  (M, N)  read as C by the base GEMM: no separate add
    backward  dh = dy @ (s B)                   (M, r)
              dx = dy @ (W + s B A)             (M, K)  one GEMM on the merged weight (merged_weight)
              dA = dh^T @ x,  dB = s dy^T @ h   the adapter's weight gradients (W is frozen)

The forward's sum is one opaque operator (`gemm_plus_lowrank`, lora_ops.py; so is dx = dh @ A + dy @ W over few
rows, where merging W costs more than it saves): the small GEMM allocates the output and the base
GEMM accumulates into it in place (`addmm_`, beta = 1); on Hopper one Triton kernel does both.
Left to torch.compile, an out-of-place `addmm` with a full C first copies C into a fresh output: 32 ms
a step of device-to-device copies at batch 8, 1024 px on an H100 (scripts/results/NOTES.md).

The result equals peft's up to rounding (one bf16 rounding of the sum instead of two); tests compare
the two on the tiny model. Engaged only where it is exactly vanilla LoRA: one active adapter, not
merged, no dropout, no DoRA, a frozen nn.Linear base; otherwise peft's own forward runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fp8 import quantize_rowwise, quantize_with, scale_for
from .lora_ops import (
    abs_row_max,
    gemm_plus_lowrank,
    gemm_scaled_plus_lowrank,
    gemm_scaled_plus_lowrank_row_max,
    thin_pair,
)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the matmuls run in: autocast's where autocast is on, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def adapter_forward(x2: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scaling: float,
                    groups: int = 1, w8: Tensor | None = None, w8_scale: Tensor | None = None,
                    x_bound: Tensor | None = None, row_max: bool = False):  # fmt: skip
    """One LoRA linear's forward on x2 (M, K), already in the compute dtype, autocast off.

    Returns y = x2 W^T + bias + scaling (x2 A^T) B^T (M, N), h = x2 A^T (M, r) for the backward, and
    max |y| per row (M,) fp32 where row_max else None. w8 (N, K), w8_scale (N, 1): fp8 copies of W, or
    None for the compute dtype. x2 is quantised per row, by its own max or by x_bound (M, 1)."""
    dtype = x2.dtype
    a, b = lora_a.to(dtype), (lora_b * scaling).to(dtype)
    h = x2 @ a.t()  # (M, r)
    bias = None if bias is None else bias.to(dtype)
    if w8 is None:
        y = gemm_plus_lowrank(x2, weight.to(dtype).t(), h, b.t(), bias, groups)  # (M, N)
        return y, h, abs_row_max(y) if row_max else None
    y, y_max = _scaled_gemm(x2, x_bound, w8, w8_scale, h, b.t(), bias, groups, row_max)
    return y, h, y_max


def _scaled_gemm(t: Tensor, bound: Tensor | None, w8: Tensor, w8_scale: Tensor, h: Tensor, b: Tensor,
                 bias: Tensor | None, groups: int, row_max: bool) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """t (M, K) quantised per row (by its own max, or by bound (M, 1)), then the fp8 op: (y, max |y| per
    row or None). Under torch.compile the quantisation fuses into the kernel that produced t."""
    tq, t_scale = quantize_rowwise(t) if bound is None else (quantize_with(t, scale := scale_for(bound)), scale)
    if row_max:
        return gemm_scaled_plus_lowrank_row_max(tq, t_scale, w8, w8_scale, h, b, bias, groups)
    return gemm_scaled_plus_lowrank(tq, t_scale, w8, w8_scale, h, b, bias, groups), None


# Input gradients over at least this many rows (tokens) run on the merged weight W + s B A: its
# (N, K) copy costs about what one GEMM over a few hundred rows does, so shorter ones (the text
# tokens' k and v projections) keep the low-rank sum.
MERGED_INPUT_GRAD_ROWS = 2048


def merged_weight(weight: Tensor, b: Tensor, a: Tensor) -> Tensor:
    """W + b a (N, K) in b's dtype, rounded once (cuBLAS's addmm accumulates in fp32): a LoRA layer's
    effective weight for weight (N, K), b = s B (N, r) and a = A (r, K), for its input gradient.

    dy W + (dy s B) A is dy (W + s B A) re-associated. The first is what the forward computes for y
    (its adapter term kept apart, so that a small s B A is not lost in W's rounding); for dx the
    merged form is one GEMM instead of a GEMM plus a low-rank term, and its extra rounding (W + s B A
    to bf16, at most half a unit in the last place of each weight) is the size of the rounding the
    frozen bf16 W already carries, below dx's own bf16 rounding."""
    return torch.addmm(weight.to(b.dtype), b, a)


def adapter_backward(dy2: Tensor, x2: Tensor, h: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float,
                     needs: tuple[bool, bool, bool], w8_t: Tensor | None = None, w8_t_scale: Tensor | None = None,
                     dy_bound: Tensor | None = None, row_max: bool = False, groups: int = 1):  # fmt: skip
    """The backward of adapter_forward for dy2 (M, N) in the compute dtype, autocast off: (dx (M, K),
    dA, dB, max |dx| per row where row_max else None); `needs` says which of dx, dA, dB to compute.

        dh = dy (s B)      dx = dh A + dy W      dA = dh^T x      dB = s dy^T h

    with dx as dy (W + s B A) over many rows in the compute dtype (merged_weight), and dh with dB from
    one read of dy (thin_pair; `groups` as adapter_forward's). w8_t (K, N), w8_t_scale (K, 1): fp8
    copies of W^T, or None; dy2 is quantised per row by its own max or by dy_bound (M, 1)."""
    dtype = dy2.dtype
    a, b = lora_a.to(dtype), (lora_b * scaling).to(dtype)
    dx = grad_a = grad_b = dx_max = None
    if needs[2]:
        dh, grad_b = thin_pair(dy2, b, h, groups)  # (M, r); dy^T h (N, r) fp32
        grad_b = grad_b.mul_(scaling).to(lora_b.dtype)
    else:
        dh = dy2 @ b  # (M, r)
    if needs[0] and w8_t is not None:
        dx, dx_max = _scaled_gemm(dy2, dy_bound, w8_t, w8_t_scale, dh, a, None, 1, row_max)
    elif needs[0]:
        if dy2.shape[0] >= MERGED_INPUT_GRAD_ROWS:
            dx = dy2 @ merged_weight(weight, b, a)  # (M, K): one plain GEMM
        else:
            dx = gemm_plus_lowrank(dy2, weight.to(dtype), dh, a, None)  # (M, K)
        dx_max = abs_row_max(dx) if row_max else None
    if needs[1]:
        grad_a = (dh.t() @ x2).to(lora_a.dtype)  # (r, K)
    return dx, grad_a, grad_b, dx_max


def lora_linear_backward(ctx, dy2: Tensor, x2: Tensor, h: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor,
                         w8_t: Tensor | None = None, w8_t_scale: Tensor | None = None) -> tuple:  # fmt: skip
    """(dx, d bias, dA, dB) of a LoRA linear with a frozen base weight, for the autograd functions whose
    inputs open with (x, weight, bias, lora_a, lora_b) and whose ctx holds scaling, groups, dtype, x_shape,
    x_dtype and bias_dtype (None: no bias gradient): adapter_backward on dy2 (M, N) in the compute dtype,
    x2 (M, K) and h = x2 A^T (M, r), then dx in the input's shape and dtype."""
    if ctx.needs_input_grad[1]:
        raise RuntimeError("a fused LoRA linear keeps its base weight frozen")
    with torch.autocast(dy2.device.type, enabled=False):
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4])
        dx, grad_a, grad_b, _ = adapter_backward(dy2, x2, h, weight, lora_a, lora_b, ctx.scaling, needs, w8_t,
                                                 w8_t_scale, groups=ctx.groups)  # fmt: skip
    dx = None if dx is None else dx.reshape(ctx.x_shape).to(ctx.x_dtype)
    grad_bias = dy2.float().sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None else None
    return dx, grad_bias, grad_a, grad_b


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scaling: float,
                groups: int, w8: Tensor | None, w8_scale: Tensor | None, w8_t: Tensor | None,
                w8_t_scale: Tensor | None):  # fmt: skip
        # x (..., K); weight (N, K) frozen; bias (N,) frozen or None; lora_a (r, K); lora_b (N, r), block
        # diagonal in `groups` blocks where joint_projection stacked several layers (else groups = 1).
        # w8 (N, K), w8_t (K, N): fp8 copies of the weight for the forward / the input gradient, with
        # their scales (N, 1) / (K, 1); None where that GEMM runs in the compute dtype (fp8.py).
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):  # every cast below is explicit
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)  # (M, K)
            y, h, _ = adapter_forward(x2, weight, bias, lora_a, lora_b, scaling, groups, w8, w8_scale)
        ctx.save_for_backward(x2, h, weight, lora_a, lora_b, w8_t, w8_t_scale)
        ctx.scaling, ctx.groups, ctx.dtype, ctx.x_shape, ctx.x_dtype = scaling, groups, dtype, x.shape, x.dtype
        ctx.bias_dtype = bias.dtype if bias is not None and bias.requires_grad else None
        return y.reshape(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x2, h, weight, lora_a, lora_b, w8_t, w8_t_scale = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).to(ctx.dtype)  # (M, N)
        dx, grad_bias, grad_a, grad_b = lora_linear_backward(ctx, dy2, x2, h, weight, lora_a, lora_b, w8_t, w8_t_scale)
        return dx, None, grad_bias, grad_a, grad_b, None, None, None, None, None, None


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scaling: float,
                groups: int = 1, fp8=None) -> Tensor:  # fmt: skip
    """y = x W^T + bias + scaling * (x A^T) B^T, with the fused kernels above (`groups`: see joint_projection).
    fp8: (w8, w8_scale, w8_t, w8_t_scale), fp8 copies of the weight per direction (fp8.FP8Weights)."""
    return _LoraLinear.apply(x, weight, bias, lora_a, lora_b, scaling, groups, *(fp8 or (None,) * 4))


def _vanilla_adapter(layer) -> str | None:
    """The one adapter name if `layer` runs exactly vanilla LoRA right now, else None."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in layer.lora_variant or layer.fan_in_fan_out:
        return None
    if not isinstance(layer.lora_dropout[name], nn.Identity) or type(layer.base_layer) is not nn.Linear:
        return None
    if layer.base_layer.weight.requires_grad:  # the fused backward has no weight gradient for W
        return None
    return name


def _fused_forward(self, x: Tensor, *args, **kwargs) -> Tensor:
    name = None if (args or kwargs) else _vanilla_adapter(self)
    if name is None:
        return self._peft_forward(x, *args, **kwargs)
    base = self.base_layer
    return lora_linear(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name],
                       fp8=_fp8_copies(self))  # fmt: skip


def _fp8_copies(layer) -> tuple | None:
    """The fp8 copies fp8.apply_fp8 attached to `layer` as lora_linear's `fp8` argument, or None."""
    held = layer._modules.get("fp8")
    return None if held is None else held.as_args()


_FUSED_CLASSES: dict[type, type] = {}


def fuse_lora_linears(model: nn.Module) -> int:
    """Give every peft LoRA nn.Linear of `model` the fused forward (a subclass, so peft's saving,
    merging and isinstance checks are unchanged). Returns how many layers were changed."""
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    return give_forward(model, PeftLoraLinear, _fused_forward, "_peft_forward", _FUSED_CLASSES)


def give_forward(model: nn.Module, base: type, forward, plain_name: str, classes: dict[type, type]) -> int:
    """Give every module of `model` whose class derives from `base` the method `forward`, through one
    subclass per class (cached in `classes`) that keeps the class's own forward as `plain_name`; all
    else about the class stays. Returns how many modules were changed (changed ones are skipped)."""
    changed = 0
    for module in model.modules():
        cls = type(module)
        if issubclass(cls, base) and cls not in classes.values():
            if cls not in classes:
                classes[cls] = type(f"Fused{cls.__name__}", (cls,), {
                    "forward": forward, plain_name: cls.forward, "__module__": forward.__module__,
                })  # fmt: skip
            module.__class__ = classes[cls]
            changed += 1
    return changed


def joinable(layer) -> tuple[nn.Linear, str | None] | None:
    """(the nn.Linear holding its weight, its LoRA adapter's name or None) where `layer` can join a
    joint projection, else None."""
    if type(layer) is nn.Linear:
        return layer, None
    name = _vanilla_adapter(layer) if type(layer) in _FUSED_CLASSES.values() else None
    return None if name is None else (layer.base_layer, name)


def joint_projection(x: Tensor, layers, linear=F.linear, lora_product=lora_linear) -> Tensor | None:
    """x through several linears of the same input at once: (..., N_1 + N_2 + ...), or None where one
    of them can't join (then call them one by one).

    Used for a block's q, k and v. One GEMM over the stacked weights [W_1; W_2; ...] reads x once
    instead of once per layer, and its backward writes one dx (a ΣN_i-deep reduction) instead of one
    per layer for autograd to add up. The LoRAs ride along: their A's stack into one (Σr_i, K) and
    their scaled B's form a block diagonal (ΣN_i, Σr_i), so x A^T is also read once, and each output
    slice stays exactly its layer's y_i = x W_i^T + b_i + s_i (x A_i^T) B_i^T (up to rounding). The
    stacks are built every call from the layers' own parameters (small copies: 8 MB a block for
    PixArt's q, k, v in bf16), so saving, merging and the optimizer see the usual separate layers.

    Joins: plain nn.Linear layers (a full fine-tune, or a frozen model), or fused vanilla LoRA layers
    (fuse_lora_linears) mixed with frozen nn.Linear ones; biases all present or all absent. `linear`
    (F.linear's signature) runs the product where none has a LoRA (quack_gemm.quack_linear, say), and
    `lora_product` (lora_linear's signature) where one has (quack_gemm.joined_lora_linear, say).
    """
    joined = [joinable(layer) for layer in layers]
    if any(j is None for j in joined):
        return None
    bases, names = zip(*joined)
    lora = any(name is not None for name in names)
    if len({base.bias is None for base in bases}) != 1 or (lora and any(b.weight.requires_grad for b in bases)):
        return None  # (the fused LoRA backward gives no weight gradients)
    weight = torch.cat([base.weight for base in bases])  # (ΣN_i, K)
    bias = None if bases[0].bias is None else torch.cat([base.bias for base in bases])  # (ΣN_i,)
    if not lora:
        return linear(x, weight, bias)
    a_parts, b_blocks = [], []
    for layer, base, name in zip(layers, bases, names):
        if name is None:  # a frozen layer without a LoRA: a zero-width block, zeros in its rows
            b_blocks.append(base.weight.new_zeros(base.out_features, 0))
        else:
            a_parts.append(layer.lora_A[name].weight)  # (r_i, K)
            b_blocks.append(layer.lora_B[name].weight * layer.scaling[name])  # (N_i, r_i)
    dtype = a_parts[0].dtype
    a = torch.cat([t.to(dtype) for t in a_parts])  # (Σr_i, K)
    b = torch.block_diag(*(t.to(dtype) for t in b_blocks))  # (ΣN_i, Σr_i)
    # Equal blocks (every layer with a LoRA of one rank, one width): lowrank_triton adds each output
    # tile's own block only, at the cost of one layer's rank instead of all of theirs.
    same = len({(block.shape, name is None) for block, name in zip(b_blocks, names)}) == 1
    # fp8 forward copies on every layer (fp8.FP8_LAYERS: q, k, v): per-row scales stack like the rows.
    # The input gradient stays in the compute dtype (its dy comes from the attention kernel).
    copies = [None if name is None else _fp8_copies(layer) for layer, name in zip(layers, names)]
    fp8 = None
    if all(c is not None and c[0] is not None for c in copies):
        fp8 = (torch.cat([c[0] for c in copies]), torch.cat([c[1] for c in copies]), None, None)
    return lora_product(x, weight, bias, a, b, 1.0, groups=len(layers) if same else 1, fp8=fp8)
