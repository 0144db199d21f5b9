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

The forward's sum is one opaque operator (`gemm_plus_lowrank`; so is dx = dh @ A + dy @ W over few
rows, where merging W costs more than it saves): the small GEMM allocates the output and the base
GEMM accumulates into it in place (`addmm_`, beta = 1); on Hopper one Triton kernel does both.
Left to torch.compile, an out-of-place `addmm` with a full C first copies C into a fresh output: 32 ms
a step of device-to-device copies at batch 8, 1024 px on an H100 (scripts/results/NOTES.md).

The result equals peft's up to rounding (one bf16 rounding of the sum instead of two); tests compare
the two on the tiny model. Engaged only where it is exactly vanilla LoRA: one active adapter, not
merged, no dropout, no DoRA, a frozen nn.Linear base; otherwise peft's own forward runs.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fp8 import fp8_mm, quantize_rowwise, quantize_with, scale_for


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the matmuls run in: autocast's where autocast is on, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


@functools.cache
def _triton_kernel():
    """lowrank_triton (the one-kernel form of the op below) where Triton imports, else None."""
    if importlib.util.find_spec("triton") is None:
        return None
    from . import lowrank_triton

    return lowrank_triton


def _gemm_plus_lowrank(x: Tensor, w: Tensor, h: Tensor, b: Tensor, bias: Tensor | None, groups: int = 1) -> Tensor:
    """x @ w + h @ b (+ bias) for x (M, K), w (K, N), h (M, r), b (r, N), bias (N,): (M, N), one dtype.

    On Hopper, for short reductions, one Triton kernel does it all (lowrank_triton.py). Elsewhere the
    low-rank product (with the bias, through cuBLAS's bias epilogue) writes the fresh output and the
    big GEMM reads it as C and adds in place. `groups` > 1 says b is block diagonal in that many equal
    blocks (a joint projection's LoRAs): the Triton kernel skips its zeros, cuBLAS multiplies them.
    """
    kernel = _triton_kernel() if x.is_cuda else None
    if kernel is not None and kernel.wanted(x, w, h, b, bias, groups):
        return kernel.gemm_plus_lowrank(x, w, h, b, bias, groups)
    out = torch.mm(h, b) if bias is None else torch.addmm(bias, h, b)
    return out.addmm_(x, w)


# An operator opaque to torch.compile, on purpose: traced, the in-place add above would be functionalised
# back into an out-of-place addmm and its copy of C. Registered through torch.library.Library rather than
# @torch.library.custom_op: the op runs ~500 times a training step, and custom_op's Python dispatch layers
# cost about 20 us more per call than this (the step is partly host-bound on some machines). No autograd
# kernel: it is only called inside _LoraLinear's forward and backward, which give the gradients.
_LIB = torch.library.Library("pixart_tune", "FRAGMENT")  # FRAGMENT: other modules may add ops
_LIB.define("gemm_plus_lowrank(Tensor x, Tensor w, Tensor h, Tensor b, Tensor? bias, int groups=1) -> Tensor")
_LIB.impl("gemm_plus_lowrank", _gemm_plus_lowrank, "CompositeExplicitAutograd")
gemm_plus_lowrank = torch.ops.pixart_tune.gemm_plus_lowrank.default


@torch.library.register_fake("pixart_tune::gemm_plus_lowrank")
def _(x: Tensor, w: Tensor, h: Tensor, b: Tensor, bias: Tensor | None, groups: int = 1) -> Tensor:
    return x.new_empty(x.shape[0], w.shape[1])


def _thin_pair(d: Tensor, p: Tensor, h: Tensor, groups: int = 1) -> tuple[Tensor, Tensor]:
    """(d @ p (M, r) in d's dtype, d^T @ h (N, r) fp32) for d (M, N), p (N, r), h (M, r): a LoRA
    layer's dh = dy (s B) and its dB / s = dy^T h, both from its output gradient dy. On Hopper one
    Triton kernel reads d once for both (lowrank_triton.thin_pair); elsewhere two GEMMs. With groups > 1
    p is block diagonal (joint_projection) and only the diagonal blocks of d^T h are kept (zeros
    elsewhere): they are all a joint projection's B gradients use."""
    kernel = _triton_kernel() if d.is_cuda else None
    if kernel is not None and kernel.wanted_thin_pair(d, p, h, groups):
        return kernel.thin_pair(d, p, h, groups)
    g = (d.t() @ h).float()
    if groups > 1:
        n, r = g.shape[0] // groups, g.shape[1] // groups
        keep = torch.block_diag(*[g.new_ones(n, r)] * groups)
        g = g.mul_(keep)
    return d @ p, g


_LIB.define("thin_pair(Tensor d, Tensor p, Tensor h, int groups=1) -> (Tensor, Tensor)")
_LIB.impl("thin_pair", _thin_pair, "CompositeExplicitAutograd")
thin_pair = torch.ops.pixart_tune.thin_pair.default


@torch.library.register_fake("pixart_tune::thin_pair")
def _(d: Tensor, p: Tensor, h: Tensor, groups: int = 1) -> tuple[Tensor, Tensor]:
    return d.new_empty(d.shape[0], p.shape[1]), d.new_empty(d.shape[1], p.shape[1], dtype=torch.float32)


ROOM_MULTIPLE = 64  # beside_room's rows: a multiple of 64 values (128 bytes of bf16), as explained there


def beside_room(x2: Tensor, r: int) -> Tensor:
    """[x2 | 0] (M, K + r'): x2 (M, K) with at least r zero columns after it, for write_lowrank_ to fill.

    Under torch.compile this concatenation of a fresh activation (a norm's output) is where the kernel
    that makes x2 writes it: no copy of x2. The rows are padded to a multiple of ROOM_MULTIPLE values:
    on the GPU Inductor pads the row stride of a buffer whose rows are not a multiple of 128 bytes, and
    an operator (write_lowrank_, quack's GEMMs) takes its operands in their eager layout, so a padded
    buffer is copied, twice (7 ms a step at 1024 px on an H100, with rows of 1152 + 48 and 1152 + 16).
    The padding costs the GEMM that reads it nothing where K is a multiple of its 64-deep tiles
    (PixArt's 1152): 1168 or 1200 columns take 19 such tiles, as 1216 do."""
    width = x2.shape[1] + r
    return torch.cat([x2, x2.new_zeros(x2.shape[0], r + -width % ROOM_MULTIPLE)], dim=1)


def _write_lowrank(xw: Tensor, a: Tensor) -> None:
    """xw[:, K:K+r] = xw[:, :K] @ a^T, in place, for xw (M, K + r') and a (r, K): a LoRA's rank-r
    projection x A^T written beside its input, so that one GEMM over [x | x A^T] [W | s B]^T is the
    layer's output (the adapter's term joins the reduction). cuBLAS writes the (M, r) product straight
    into the strided columns."""
    r, k = a.shape
    torch.mm(xw[:, :k], a.t(), out=xw[:, k : k + r])


# Mutates its input (declared): under torch.compile the concatenation that made xw (beside_room) is a
# fresh intermediate with no other reader, so Inductor runs this in place rather than on a copy.
_LIB.define("write_lowrank_(Tensor(a!) xw, Tensor a) -> ()")
_LIB.impl("write_lowrank_", _write_lowrank, "CompositeExplicitAutograd")
write_lowrank_ = torch.ops.pixart_tune.write_lowrank_.default


@torch.library.register_fake("pixart_tune::write_lowrank_")
def _(xw: Tensor, a: Tensor) -> None:
    return None


def _gemm_scaled_plus_lowrank(x: Tensor, x_scale: Tensor, w: Tensor, w_scale: Tensor, h: Tensor, b: Tensor,
                              bias: Tensor | None, groups: int = 1) -> Tensor:  # fmt: skip
    """(x * x_scale) @ (w * w_scale)^T + h @ b (+ bias): the fp8 form of the op above (fp8.py).

    x (M, K) and w (N, K) float8_e4m3fn with fp32 scales (M, 1), (N, 1); h (M, r), b (r, N), bias (N,)
    and the result (M, N) in the compute dtype. On Hopper one Triton kernel (lowrank_triton.py), else
    the low-rank product plus fp8.fp8_mm (`torch._scaled_mm`, or the dequantised fp32 fallback).
    """
    kernel = _triton_kernel() if x.is_cuda else None
    if kernel is not None and kernel.wanted_scaled(x, x_scale, w, w_scale, h, b, bias, groups):
        return kernel.gemm_scaled_plus_lowrank(x, x_scale, w, w_scale, h, b, bias, groups)
    out = torch.mm(h, b) if bias is None else torch.addmm(bias, h, b)
    return out.add_(fp8_mm(x, x_scale, w, w_scale, out.dtype))


_LIB.define("gemm_scaled_plus_lowrank(Tensor x, Tensor x_scale, Tensor w, Tensor w_scale, Tensor h, Tensor b, "
            "Tensor? bias, int groups=1) -> Tensor")  # fmt: skip
_LIB.impl("gemm_scaled_plus_lowrank", _gemm_scaled_plus_lowrank, "CompositeExplicitAutograd")
gemm_scaled_plus_lowrank = torch.ops.pixart_tune.gemm_scaled_plus_lowrank.default


@torch.library.register_fake("pixart_tune::gemm_scaled_plus_lowrank")
def _(x, x_scale, w, w_scale, h: Tensor, b, bias, groups: int = 1) -> Tensor:
    return h.new_empty(x.shape[0], w.shape[0])


def _gemm_scaled_plus_lowrank_row_max(x: Tensor, x_scale: Tensor, w: Tensor, w_scale: Tensor, h: Tensor, b: Tensor,
                                      bias: Tensor | None, groups: int = 1) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The op above, and max |result| of each row (M,) fp32: a bound for quantising what is computed
    from the result (lora_ff.py). The Triton kernel takes it from its fp32 accumulator."""
    kernel = _triton_kernel() if x.is_cuda else None
    if kernel is not None and kernel.wanted_scaled(x, x_scale, w, w_scale, h, b, bias, groups):
        row_max = torch.zeros(x.shape[0], device=x.device, dtype=torch.float32)
        return kernel.gemm_scaled_plus_lowrank(x, x_scale, w, w_scale, h, b, bias, groups, row_max), row_max
    y = _gemm_scaled_plus_lowrank(x, x_scale, w, w_scale, h, b, bias, groups)
    return y, _row_max(y)


def _row_max(y: Tensor) -> Tensor:
    """max |y| of each row of y (M, N): (M,) fp32."""
    return y.abs().amax(-1).float()


_LIB.define("gemm_scaled_plus_lowrank_row_max(Tensor x, Tensor x_scale, Tensor w, Tensor w_scale, Tensor h, Tensor b, "
            "Tensor? bias, int groups=1) -> (Tensor, Tensor)")  # fmt: skip
_LIB.impl("gemm_scaled_plus_lowrank_row_max", _gemm_scaled_plus_lowrank_row_max, "CompositeExplicitAutograd")
gemm_scaled_plus_lowrank_row_max = torch.ops.pixart_tune.gemm_scaled_plus_lowrank_row_max.default


@torch.library.register_fake("pixart_tune::gemm_scaled_plus_lowrank_row_max")
def _(x, x_scale, w, w_scale, h: Tensor, b, bias, groups: int = 1) -> tuple[Tensor, Tensor]:
    return h.new_empty(x.shape[0], w.shape[0]), x_scale.new_empty(x.shape[0])


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
        return y, h, _row_max(y) if row_max else None
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
        dx_max = _row_max(dx) if row_max else None
    if needs[1]:
        grad_a = (dh.t() @ x2).to(lora_a.dtype)  # (r, K)
    return dx, grad_a, grad_b, dx_max


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
        if ctx.needs_input_grad[1]:
            raise RuntimeError("the fused LoRA linear keeps its base weight frozen")
        with torch.autocast(dy.device.type, enabled=False):
            dy2 = dy.reshape(-1, dy.shape[-1]).to(ctx.dtype)  # (M, N)
            needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4])
            dx, grad_a, grad_b, _ = adapter_backward(dy2, x2, h, weight, lora_a, lora_b, ctx.scaling, needs, w8_t,
                                                     w8_t_scale, groups=ctx.groups)  # fmt: skip
        dx = None if dx is None else dx.reshape(ctx.x_shape).to(ctx.x_dtype)
        grad_bias = dy2.float().sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None else None
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
