"""A block's token GEMMs on quack's Hopper kernels, the feed-forward's GELU inside them (train.quack_gemms).

Over the 4096 image tokens of a 1024 px sample, each block runs four trainable linears: the joint q/k/v
projection (1152 -> 3456), the attention's out projection (1152 -> 1152) and the feed-forward, up
(1152 -> 4608), tanh GELU, down (4608 -> 1152); the cross-attention's are folded (cross_attention.py).
quack (`quack-kernels`, the CuTe DSL GEMMs that flash-attn-4 installs) has warp-specialised Hopper
GEMMs whose epilogue runs while the next tile's mainloop does, so elementwise work there is nearly free:

    forward    h, g = x W1^T + b1, gelu(h)         one kernel writes both (cuBLAS + Inductor: two)
    backward   dh = gelu'(h) * (dy W2),  g         one kernel (cuBLAS + Inductor: two), g rewritten for dW2

At M = 32768 tokens (1024 px, batch 8; ms per call, `python scripts/probe_kernels.py quack-gemms`),
on an H200: the feed-forward's forward 0.47 against 0.63 (cuBLAS's GEMM with the bias, then
Inductor's GELU), its input gradient through the GELU 0.57 against 0.74. On an H100 quack's plain
GEMMs beat cuBLAS's by 3-12% on the forward and input-gradient products (dy W) at these shapes and
lose on the weight gradients (dy^T x, a transposed operand), which stay on cuBLAS, as do the bias
gradients (sums over the tokens). In training, a full fine-tune on an H100: 22.1 samples/s against
21.4, and 39.6 GiB peak against 47.5 (g = gelu(h) is no longer kept for the backward;
scripts/results/2026-11-27-h100-quack-gemms-full-ab.json). The maths is the plain modules' up to
rounding (fp32 accumulation, one bf16 rounding of each output, the GELU taken from the fp32
pre-activation), and tests compare the two on the tiny model.

Used where quack imports and the GPU is Hopper (sm90: where it was measured), in a block's
self-attention on FA4's processor (fa4.py: the joint projection and the out projection) and in every
feed-forward whose linears are plain nn.Linear layers with a tanh GELU and no active dropout: a full
fine-tune, or a frozen feed-forward of a LoRA run. Everywhere else, and where a shape does not suit
(too few rows, widths that are not multiples of 8), the usual modules run.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .lora_fused import compute_dtype, give_forward

MIN_ROWS = 2048  # fewer tokens than this: too few output tiles to fill the GPU; cuBLAS picks better
GELU = "gelu_tanh_approx"  # quack's name for PyTorch's gelu(approximate="tanh")


@functools.cache
def _quack():
    """quack.gemm_interface, with its compile-cache fingerprint taught to skip what it cannot key.

    quack keys each compiled epilogue by a fingerprint of the Python objects its code reaches. With
    the CUTLASS DSL that flash-attn-4 4.0.0b36 pulls in (4.8.1), that walk reaches DSL internals
    (a ContextVar of source locations, a code object's method) and raises TypeError before any
    kernel is built. Those objects hold no maths, so they are keyed by their type: at worst a kernel
    is compiled again, never reused wrongly.
    """
    from quack.gemm_runtime import identity

    if not getattr(identity.semantic_value_key, "pixart_tune_fallback", False):
        strict = identity.semantic_value_key

        def keyed_by_type_where_unkeyable(value, seen):
            try:
                return strict(value, seen)
            except TypeError:
                return ("opaque", type(value).__module__, type(value).__qualname__)

        keyed_by_type_where_unkeyable.pixart_tune_fallback = True
        identity.semantic_value_key = keyed_by_type_where_unkeyable  # looked up as a module global
    from quack import gemm_interface

    return gemm_interface


def quack_installed() -> bool:
    return importlib.util.find_spec("quack") is not None


def quack_runs_on(device: torch.device) -> bool:
    """Whether the kernels here run on `device`: CUDA, Hopper (sm90), quack importable."""
    return (torch.device(device).type == "cuda" and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device)[0] == 9 and quack_installed())  # fmt: skip


def _on_quack(*tensors: Tensor) -> bool:
    """The quack kernels take these (M, K) / (N, K) operands: Hopper, 16-bit, aligned rows, enough rows."""
    a = tensors[0]
    return (a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and a.shape[0] >= MIN_ROWS
            and all(t.shape[-1] % 8 == 0 for t in tensors) and quack_runs_on(a.device))  # fmt: skip


# The four products, as operators opaque to torch.compile (as lora_fused's are): each runs quack's
# eager path, whose launch plans are cached per shape, and falls back to PyTorch where quack does not
# apply (CPU tests, other GPUs, odd shapes). Operands (M, K) activations and (N, K) weights, one dtype.
def _linear(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    """x @ w^T + bias: (M, N)."""
    if _on_quack(x, w):
        return _quack().gemm(x, w.t(), bias=bias, tuned=False)
    return F.linear(x, w, bias)


def _input_grad(dy: Tensor, w: Tensor) -> Tensor:
    """dy @ w: (M, K) for dy (M, N)."""
    if _on_quack(dy, w.t()):
        return _quack().gemm(dy, w, tuned=False)
    return dy @ w


def _gelu_linear(x: Tensor, w: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """h = x @ w^T + bias and gelu(h) (tanh form): both (M, N)."""
    if _on_quack(x, w):
        return _quack().gemm_act(x, w.t(), bias=bias, activation=GELU, tuned=False)
    h = F.linear(x, w, bias)
    return h, F.gelu(h, approximate="tanh")


def _gelu_input_grad(dy: Tensor, w: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """dh = gelu'(h) * (dy @ w) and gelu(h), for dy (M, N), w (N, K), h (M, K): both (M, K)."""
    if _on_quack(dy, w.t(), h):
        return _quack().gemm_dact(dy, w, h, activation=GELU, tuned=False)
    dg = dy @ w
    return torch.ops.aten.gelu_backward(dg, h, approximate="tanh"), F.gelu(h, approximate="tanh")


_LIB = torch.library.Library("pixart_tune", "FRAGMENT")
_LIB.define("quack_linear(Tensor x, Tensor w, Tensor? bias) -> Tensor")
_LIB.impl("quack_linear", _linear, "CompositeExplicitAutograd")
_LIB.define("quack_input_grad(Tensor dy, Tensor w) -> Tensor")
_LIB.impl("quack_input_grad", _input_grad, "CompositeExplicitAutograd")
_LIB.define("quack_gelu_linear(Tensor x, Tensor w, Tensor? bias) -> (Tensor, Tensor)")
_LIB.impl("quack_gelu_linear", _gelu_linear, "CompositeExplicitAutograd")
_LIB.define("quack_gelu_input_grad(Tensor dy, Tensor w, Tensor h) -> (Tensor, Tensor)")
_LIB.impl("quack_gelu_input_grad", _gelu_input_grad, "CompositeExplicitAutograd")
_ops = torch.ops.pixart_tune


@torch.library.register_fake("pixart_tune::quack_linear")
def _(x, w, bias):
    return x.new_empty(x.shape[0], w.shape[0])


@torch.library.register_fake("pixart_tune::quack_input_grad")
def _(dy, w):
    return dy.new_empty(dy.shape[0], w.shape[1])


@torch.library.register_fake("pixart_tune::quack_gelu_linear")
def _(x, w, bias):
    return x.new_empty(x.shape[0], w.shape[0]), x.new_empty(x.shape[0], w.shape[0])


@torch.library.register_fake("pixart_tune::quack_gelu_input_grad")
def _(dy, w, h):
    return h.new_empty(h.shape), h.new_empty(h.shape)


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
        y = _ops.quack_linear(x2, weight.to(dtype), b)  # (M, N)
        ctx.save_for_backward(x2, weight, bias)
        ctx.dtype, ctx.x_shape, ctx.x_dtype = dtype, x.shape, x.dtype
        return y.reshape(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x2, weight, bias = ctx.saved_tensors
        dy2 = _flat(dy, ctx.dtype)  # (M, N)
        need_x, need_w, need_b = ctx.needs_input_grad
        dx = _ops.quack_input_grad(dy2, weight.to(ctx.dtype)).reshape(ctx.x_shape).to(ctx.x_dtype) if need_x else None
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
        h, g = _ops.quack_gelu_linear(x2, cast[0], cast[1])  # (M, 4C) each
        y = _ops.quack_linear(g, cast[2], cast[3])  # (M, C)
        # g is not kept: the backward's fused kernel writes it again for dW2 (302 MB a layer at batch 8)
        ctx.save_for_backward(x2, h, w1, b1, w2, b2)
        ctx.dtype, ctx.x_shape, ctx.x_dtype = dtype, x.shape, x.dtype
        return y.reshape(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x2, h, w1, b1, w2, b2 = ctx.saved_tensors
        need = ctx.needs_input_grad  # x, w1, b1, w2, b2
        dy2 = _flat(dy, ctx.dtype)  # (M, C)
        dh, g = _ops.quack_gelu_input_grad(dy2, w2.to(ctx.dtype), h)  # (M, 4C) each
        grad_w2, grad_b2 = _weight_grads(dy2, g, w2, b2, (need[3], need[4]))
        grad_w1, grad_b1 = _weight_grads(dh, x2, w1, b1, (need[1], need[2]))
        dx = _ops.quack_input_grad(dh, w1.to(ctx.dtype)).reshape(ctx.x_shape).to(ctx.x_dtype) if need[0] else None
        return dx, grad_w1, grad_b1, grad_w2, grad_b2


def _plain_linear(layer) -> bool:
    return type(layer) is nn.Linear


def quack_feed_forward(ff: nn.Module, x: Tensor) -> Tensor | None:
    """diffusers' FeedForward `ff` on x through _GeluFeedForward, or None where it does not apply (not
    a tanh GELU between two plain linears, or dropout active)."""
    net = getattr(ff, "net", None)
    if net is None or len(net) < 3 or getattr(net[0], "approximate", None) != "tanh":
        return None
    if any(not isinstance(m, nn.Dropout) or (m.p and m.training) for m in list(net)[1:2] + list(net)[3:]):
        return None
    up, down = getattr(net[0], "proj", None), net[2]
    if not (_plain_linear(up) and _plain_linear(down)):
        return None
    return _GeluFeedForward.apply(x, up.weight, up.bias, down.weight, down.bias)


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
            processor.linear = quack_linear
            changed += 1
    return changed
