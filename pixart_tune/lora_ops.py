"""The fused LoRA linear's products as PyTorch operators opaque to torch.compile (what lora_fused.py's
functions call, and quack_gemm.py's joined LoRA linear):

    gemm_plus_lowrank                   x W + h B (+ bias): the low-rank product, the big GEMM adding into it
                                        in place (one Triton kernel on Hopper: lowrank_triton.py)
    thin_pair                           dy (s B) and dy^T h from one read of dy (a LoRA's dh and B gradient)
    beside_room, write_lowrank_         [x | 0], then x A^T written into it in place: [x | x A^T] for one GEMM
                                        over the adapter joined to the reduction
    gemm_scaled_plus_lowrank(_row_max)  the fp8 form of gemm_plus_lowrank (fp8.py), and with max |y| per row

Each runs a Triton kernel where lowrank_triton's routing rule takes it, and PyTorch's maths elsewhere
(the CPU tests, other GPUs, odd shapes); why they are opaque operators is said at gemm_plus_lowrank's.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch import Tensor

from .fp8 import fp8_mm


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
    return y, abs_row_max(y)


def abs_row_max(y: Tensor) -> Tensor:
    """max |y| of each row of y (M, N): (M,) fp32."""
    return y.abs().amax(-1).float()


_LIB.define("gemm_scaled_plus_lowrank_row_max(Tensor x, Tensor x_scale, Tensor w, Tensor w_scale, Tensor h, Tensor b, "
            "Tensor? bias, int groups=1) -> (Tensor, Tensor)")  # fmt: skip
_LIB.impl("gemm_scaled_plus_lowrank_row_max", _gemm_scaled_plus_lowrank_row_max, "CompositeExplicitAutograd")
gemm_scaled_plus_lowrank_row_max = torch.ops.pixart_tune.gemm_scaled_plus_lowrank_row_max.default


@torch.library.register_fake("pixart_tune::gemm_scaled_plus_lowrank_row_max")
def _(x, x_scale, w, w_scale, h: Tensor, b, bias, groups: int = 1) -> tuple[Tensor, Tensor]:
    return h.new_empty(x.shape[0], w.shape[0]), x_scale.new_empty(x.shape[0])
