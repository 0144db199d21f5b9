"""A block's token GEMMs on quack's Hopper kernels, the feed-forward's GELU inside them (train.quack_gemms).

Over the 4096 image tokens of a 1024 px sample, each block runs four trainable linears: the joint q/k/v
projection (1152 -> 3456), the attention's out projection (1152 -> 1152) and the feed-forward, up
(1152 -> 4608), tanh GELU, down (4608 -> 1152); the cross-attention's are folded (cross_attention.py).
quack (`quack-kernels`, the CuTe DSL GEMMs that flash-attn-4 installs) has warp-specialised Hopper
GEMMs whose epilogue runs while the next tile's mainloop does, so elementwise work there is nearly free:

    forward    h, g = x W1^T + b1, gelu(h)         one kernel writes both (cuBLAS + Inductor: two)
    backward   dh = gelu'(h) * (dy W2),  g,        one kernel (cuBLAS + Inductor: two), g rewritten for dW2,
               db1 = sum over the tokens of dh        and b1's gradient summed in its epilogue (Inductor: a pass over dh)

On an H100 at M = 32768 tokens (1024 px, batch 8; ms per call, `python scripts/probe_kernels.py
quack-gemms`): the feed-forward's forward 0.49 against 0.69 (cuBLAS's GEMM with the bias, then
Inductor's GELU), its input gradient through the GELU 0.59 against 0.78. quack's plain products run
3-20% faster than cuBLAS's here, except the up-projection's input gradient (a 4608-deep reduction into
1152 columns), which is within 2% either way between machines. Its weight gradients (dy^T x, a
transposed operand) were slower in a first probe and stay on cuBLAS; the bias gradients (sums over the
tokens) stay with Inductor, except the up-projection's. In training on H100s, ABAB in one process (the records
2026-11-27-h100-quack-gemms-*.json in scripts/results): a full fine-tune ran at 22.06-22.11
samples/s against 21.42-21.44 on one machine, 21.29-21.43 against 20.78-20.86 on another, and peaks
at 39.6 GiB against 47.5 (g = gelu(h) is no longer kept for the backward). A LoRA on attention and
feed-forward (the function below) ran at 23.71-23.93 against 23.37-23.45, peaking at 29.5 GiB
against 37.2. The maths is the plain modules' up to rounding (fp32 accumulation, one bf16 rounding
of each output, the GELU taken from the fp32 pre-activation), and tests compare the two on the tiny model.

Used where quack imports and the GPU is Hopper (sm90: where it was measured): in a block's
self-attention on FA4's processor (fa4.py: the joint projection and the out projection, where they
are plain nn.Linear layers) and in every feed-forward with a tanh GELU and no active dropout whose
two linears are plain nn.Linear layers (a full fine-tune, a frozen feed-forward) or both fused vanilla
LoRA layers without fp8 copies (lora_fused.py; with train.fp8, lora_ff.py's function runs). Everywhere
else, and where a shape does not suit (too few rows, widths that are not multiples of 8), the usual
modules and kernels run. The products themselves, as operators, are in quack_ops.py; here are the
autograd functions that call them and the installer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .lora_ff import tanh_gelu_linears
from .lora_fused import (
    _fp8_copies,
    compute_dtype,
    give_forward,
    joinable,
    lora_linear,
    lora_linear_backward,
    merged_weight,
)
from .lora_ops import beside_room, thin_pair, write_lowrank_
from .quack_ops import MIN_ROWS, ops


def _flat(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x.reshape(-1, x.shape[-1]).to(dtype).contiguous()  # (M, features)


def _weight_grads(dy2: Tensor, x2: Tensor, weight: Tensor, bias: Tensor | None, needs: tuple[bool, bool]):
    """(dW, db) of a linear from dy2 (M, N) and its input x2 (M, K), in the parameters' dtypes (fp32
    masters get the bf16 product widened, as autocast's linear gives them); None where not needed."""
    grad_w = (dy2.t() @ x2).to(weight.dtype) if needs[0] else None  # (N, K), cuBLAS
    grad_b = dy2.sum(0, dtype=torch.float32).to(bias.dtype) if needs[1] and bias is not None else None
    return grad_w, grad_b


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None):
        # x (..., K); weight (N, K), bias (N,) in any float dtype (fp32 masters): the product runs in
        # autocast's dtype, as F.linear's would.
        dtype = compute_dtype(x)
        x2 = _flat(x, dtype)
        b = None if bias is None else bias.to(dtype)
        y = ops.quack_linear(x2, weight.to(dtype), b)  # (M, N)
        ctx.save_for_backward(x2, weight, bias)
        ctx.dtype, ctx.x_shape, ctx.x_dtype = dtype, x.shape, x.dtype
        return y.reshape(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x2, weight, bias = ctx.saved_tensors
        dy2 = _flat(dy, ctx.dtype)  # (M, N)
        need_x, need_w, need_b = ctx.needs_input_grad
        dx = ops.quack_input_grad(dy2, weight.to(ctx.dtype)).reshape(ctx.x_shape).to(ctx.x_dtype) if need_x else None
        return (dx, *_weight_grads(dy2, x2, weight, bias, (need_w, need_b)))


def quack_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """F.linear(x, weight, bias) on quack's GEMMs (PyTorch's where they do not apply)."""
    return _Linear.apply(x, weight, bias)


class _GeluFeedForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None):
        # x (..., C); w1 (4C, C) up, w2 (C, 4C) down, biases (4C,) / (C,): diffusers' FeedForward with
        # the tanh GELU, in autocast's dtype.
        dtype = compute_dtype(x)
        x2 = _flat(x, dtype)  # (M, C)
        cast = [None if t is None else t.to(dtype) for t in (w1, b1, w2, b2)]
        h, g = ops.quack_gelu_linear(x2, cast[0], cast[1])  # (M, 4C) each
        y = ops.quack_linear(g, cast[2], cast[3])  # (M, C)
        # g is not kept: the backward's fused kernel writes it again for dW2 (302 MB a layer at batch 8)
        ctx.save_for_backward(x2, h, w1, b1, w2, b2)
        ctx.dtype, ctx.x_shape, ctx.x_dtype = dtype, x.shape, x.dtype
        return y.reshape(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x2, h, w1, b1, w2, b2 = ctx.saved_tensors
        need = ctx.needs_input_grad  # x, w1, b1, w2, b2
        dy2 = _flat(dy, ctx.dtype)  # (M, C)
        if need[2] and b1 is not None:  # b1's gradient summed in the GELU-gradient kernel's epilogue
            dh, g, grad_b1 = ops.quack_gelu_input_and_bias_grad(dy2, w2.to(ctx.dtype), h)  # (M, 4C), (4C,) fp32
            grad_b1 = grad_b1.to(b1.dtype)
        else:
            (dh, g), grad_b1 = ops.quack_gelu_input_grad(dy2, w2.to(ctx.dtype), h), None  # (M, 4C) each
        grad_w2, grad_b2 = _weight_grads(dy2, g, w2, b2, (need[3], need[4]))
        grad_w1 = _weight_grads(dh, x2, w1, None, (need[1], False))[0]
        dx = ops.quack_input_grad(dh, w1.to(ctx.dtype)).reshape(ctx.x_shape).to(ctx.x_dtype) if need[0] else None
        return dx, grad_w1, grad_b1, grad_w2, grad_b2


def _joined_operands(x2: Tensor, weight: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """The two operands of a LoRA linear whose adapter joins the base GEMM's reduction, one GEMM giving
    x W^T + (x A^T) (s B)^T: xw = [x | x A^T | 0] (M, K + r') and [W | s B | 0] (N, K + r').

    x2 (M, K), weight (N, K), a = A (r, K) and b = s B (N, r), all in the compute dtype. xw is made where
    x is (lora_ops.beside_room: no copy of x under torch.compile) and x A^T written into it in place
    (write_lowrank_); the weight is zero-padded to xw's width."""
    xw = beside_room(x2, a.shape[0])  # (M, K + r'): [x | 0]
    write_lowrank_(xw, a)  # [x | x A^T | 0]
    pad = xw.shape[1] - weight.shape[1] - b.shape[1]
    ww = torch.cat([weight, b] + ([b.new_zeros(b.shape[0], pad)] if pad else []), dim=1)  # (N, K + r')
    return xw, ww


def _joined_parts(xw: Tensor, weight: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """x (M, K) and x A^T (M, r) back out of _joined_operands' xw = [x | x A^T | 0], as views (the
    backward keeps xw rather than both)."""
    k, r = weight.shape[1], a.shape[0]
    return xw[:, :k], xw[:, k : k + r]


class _LoraGeluFeedForward(torch.autograd.Function):
    """The feed-forward with a LoRA on both linears (frozen weights and biases): the up-projection's
    adapter term rides in the GELU kernel's reduction; the input gradients, through the GELU and
    after it, run on the merged weights:

        forward   u1 = x A1^T          h, g = [x | u1] [W1 | s B1]^T + b1, gelu(h)     (one kernel;
                                       u1 written beside x: lora_ops.write_lowrank_)
                  u2 = g A2^T          y = g W2^T + u2 (s B2)^T + b2
        backward  dh, g = gelu'(h) * (dy (W2 + s B2 A2)), gelu(h)   (one kernel)
                  dx = dh (W1 + s B1 A1)
                  v2 = dy (s B2),  v1 = dh (s B1)
                  dA2 = v2^T g,  dB2 = s dy^T u2,  dA1 = v1^T x,  dB1 = s dh^T u1
                  (v2 with dy^T u2, and v1 with dh^T u1, from one read of dy, dh: lora_ops.thin_pair)

    lora_fused's per-layer maths (adapter_forward / adapter_backward, the input gradients on the
    merged weights as there: lora_fused.merged_weight) in another order of sums; g is not kept (the
    backward's kernel writes it again)."""

    @staticmethod
    def forward(ctx, x: Tensor, w1, b1, a1, bb1, w2, b2, a2, bb2, s1: float, s2: float):
        # x (..., C); w1 (4C, C), w2 (C, 4C) and the biases frozen; a1 (r, C), bb1 (4C, r), a2 (r, 4C), bb2 (C, r)
        dtype = compute_dtype(x)
        x2 = _flat(x, dtype)  # (M, C)
        a1c, b1s, a2c, b2s = a1.to(dtype), (bb1 * s1).to(dtype), a2.to(dtype), (bb2 * s2).to(dtype)
        xw, w1u = _joined_operands(x2, w1.to(dtype), a1c, b1s)  # [x | u1 | 0] (M, C + r'), [W1 | s B1 | 0]
        h, g = ops.quack_gelu_linear(xw, w1u, None if b1 is None else b1.to(dtype))  # (M, 4C)
        u2 = g @ a2c.t()  # (M, r)
        y = ops.quack_gemm_plus_lowrank(g, w2.to(dtype).t(), u2, b2s.t(), None if b2 is None else b2.to(dtype))
        ctx.save_for_backward(xw, h, u2, w1, a1, bb1, w2, a2, bb2)  # x and u1 kept as xw
        ctx.scalings, ctx.dtype, ctx.x_shape, ctx.x_dtype = (s1, s2), dtype, x.shape, x.dtype
        return y.reshape(*x.shape[:-1], -1)  # (..., C)

    @staticmethod
    def backward(ctx, dy: Tensor):
        xw, h, u2, w1, a1, bb1, w2, a2, bb2 = ctx.saved_tensors
        (s1, s2), dtype = ctx.scalings, ctx.dtype
        x2, u1 = _joined_parts(xw, w1, a1)  # (M, C), (M, r)
        need = ctx.needs_input_grad  # x, w1, b1, a1, bb1, w2, b2, a2, bb2, s1, s2
        if need[1] or need[2] or need[5] or need[6]:
            raise RuntimeError("the LoRA feed-forward keeps its base weights and biases frozen")
        a1c, b1s, a2c, b2s = a1.to(dtype), (bb1 * s1).to(dtype), a2.to(dtype), (bb2 * s2).to(dtype)
        dy2 = _flat(dy, dtype)  # (M, C)
        dh, g = ops.quack_gelu_input_grad(dy2, merged_weight(w2, b2s, a2c), h)  # (M, 4C) each
        # v2 = dy (s B2) and dy^T u2, v1 = dh (s B1) and dh^T u1: each pair from one read of its gradient
        v2, grad_b2 = thin_pair(dy2, b2s, u2)  # (M, r), (C, r) fp32
        v1, grad_b1 = thin_pair(dh, b1s, u1)  # (M, r), (4C, r) fp32
        dx = None
        if need[0]:
            dx = ops.quack_input_grad(dh, merged_weight(w1, b1s, a1c)).reshape(ctx.x_shape).to(ctx.x_dtype)
        grad_a1 = (v1.t() @ x2).to(a1.dtype) if need[3] else None  # (r, C)
        grad_b1 = grad_b1.mul_(s1).to(bb1.dtype) if need[4] else None  # (4C, r)
        grad_a2 = (v2.t() @ g).to(a2.dtype) if need[7] else None  # (r, 4C)
        grad_b2 = grad_b2.mul_(s2).to(bb2.dtype) if need[8] else None  # (C, r)
        return dx, None, None, grad_a1, grad_b1, None, None, grad_a2, grad_b2, None, None


class _JoinedLoraLinear(torch.autograd.Function):
    """A LoRA linear (frozen base) whose adapter term joins the base GEMM's reduction, on quack:

        forward   xw = [x | x A^T]                  (M, K + r'): x written there by the kernel that makes it
                  y  = xw [W | s B]^T + b           one GEMM, K + r' deep
        backward  lora_fused.adapter_backward, with x and h = x A^T read from xw

    For the joint q/k/v projection (K = 1152, three rank-16 blocks: 48 more columns of reduction) on an
    H100 at M = 32768 (`python scripts/probe_kernels.py kcat`): 0.364 ms against 0.414 for lowrank_triton's
    kernel, which adds the adapter term in its epilogue but whose mainloop is slower than quack's. It
    pays only where x comes from a kernel that can write it into [x | 0] (the block's norm): building
    xw by a copy costs 0.057 ms. So it runs where the projection's input is a norm's output (FA4's
    q/k/v projection), not where it is another kernel's (the out projection reads FA4's output).
    The result is lora_fused's up to rounding (the adapter's term summed in the GEMM's fp32 accumulator)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scaling: float,
                groups: int):  # fmt: skip
        # x (..., K); weight (N, K) and bias (N,) frozen; lora_a (r, K); lora_b (N, r), block diagonal in
        # `groups` blocks for a joint projection (lora_fused.joint_projection)
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):  # every cast below is explicit
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)  # (M, K)
            a, b = lora_a.to(dtype), (lora_b * scaling).to(dtype)
            xw, ww = _joined_operands(x2, weight.to(dtype), a, b)  # [x | x A^T | 0] (M, K + r'), [W | s B | 0]
            y = ops.quack_linear(xw, ww, None if bias is None else bias.to(dtype))
        ctx.save_for_backward(xw, weight, lora_a, lora_b)
        ctx.scaling, ctx.groups, ctx.dtype, ctx.x_shape, ctx.x_dtype = scaling, groups, dtype, x.shape, x.dtype
        ctx.bias_dtype = bias.dtype if bias is not None and bias.requires_grad else None
        return y.reshape(*x.shape[:-1], -1)  # (..., N)

    @staticmethod
    def backward(ctx, dy: Tensor):
        xw, weight, lora_a, lora_b = ctx.saved_tensors
        x2, h = _joined_parts(xw, weight, lora_a)  # (M, K), (M, r)
        dx, grad_bias, grad_a, grad_b = lora_linear_backward(ctx, _flat(dy, ctx.dtype), x2, h, weight, lora_a, lora_b)
        return dx, None, grad_bias, grad_a, grad_b, None, None


def joined_lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                       scaling: float, groups: int = 1, fp8=None) -> Tensor:  # fmt: skip
    """lora_fused.lora_linear with the adapter joined to the reduction (_JoinedLoraLinear) where quack's
    GEMM takes it (enough rows, no fp8 copies); lora_linear itself elsewhere."""
    if fp8 is not None or x.numel() < MIN_ROWS * x.shape[-1]:
        return lora_linear(x, weight, bias, lora_a, lora_b, scaling, groups, fp8)
    return _JoinedLoraLinear.apply(x, weight, bias, lora_a, lora_b, scaling, groups)


def _lora_args(layer) -> tuple | None:
    """((weight, bias, lora_a, lora_b), scaling) of a fused vanilla LoRA linear (lora_fused.joinable)
    with a frozen bias and no fp8 copies (those run lora_ff.py's function), else None."""
    joined = joinable(layer)
    if joined is None or joined[1] is None or _fp8_copies(layer) is not None:
        return None
    base, name = joined
    if base.bias is not None and base.bias.requires_grad:
        return None
    return (base.weight, base.bias, layer.lora_A[name].weight, layer.lora_B[name].weight), layer.scaling[name]


def quack_feed_forward(ff: nn.Module, x: Tensor) -> Tensor | None:
    """diffusers' FeedForward `ff` on x through _GeluFeedForward (plain linears) or _LoraGeluFeedForward
    (fused vanilla LoRA linears), or None where neither applies (another activation, dropout active,
    other layers)."""
    linears = tanh_gelu_linears(ff)
    if linears is None:
        return None
    up, down = linears
    if type(up) is nn.Linear and type(down) is nn.Linear:
        return _GeluFeedForward.apply(x, up.weight, up.bias, down.weight, down.bias)
    lora_up, lora_down = _lora_args(up), _lora_args(down)
    if lora_up is None or lora_down is None:
        return None
    return _LoraGeluFeedForward.apply(x, *lora_up[0], *lora_down[0], lora_up[1], lora_down[1])


def _quack_ff_forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
    out = None if (args or kwargs) else quack_feed_forward(self, hidden_states)
    return self._before_quack_forward(hidden_states, *args, **kwargs) if out is None else out


_QUACK_FF_CLASSES: dict[type, type] = {}


def use_quack_gemms(model: nn.Module) -> int:
    """Put the blocks' token GEMMs on quack (see the module's docstring): every diffusers FeedForward
    gets the forward above (a subclass, as lora_fused.give_forward makes), and FA4's self-attention
    processors (fa4.py) their linear. Returns how many modules were changed. Call after fa4.use_fa4."""
    from diffusers.models.attention import FeedForward

    from .fa4 import FA4SelfAttention
    from .speed import transformer_blocks

    changed = give_forward(model, FeedForward, _quack_ff_forward, "_before_quack_forward", _QUACK_FF_CLASSES)
    for block in transformer_blocks(model):
        processor = block.attn1.processor
        if isinstance(processor, FA4SelfAttention) and processor.linear is not quack_linear:
            processor.linear, processor.lora_linear = quack_linear, joined_lora_linear
            changed += 1
    return changed
