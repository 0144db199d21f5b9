"""One Triton GEMM for `x @ w + h @ b (+ bias)`: the LoRA term enters the accumulator before the single store.

lora_fused.py sums the adapter term into the base GEMM with two cuBLAS calls: the rank-r product writes
the (M, N) output, the base GEMM reads it back as C and writes it again. That extra write and read of
an (M, N) tensor is what the adapter costs beyond its small GEMMs. Here one persistent kernel (TMA
loads, wgmma) accumulates x @ w over K in fp32, adds h @ b as one more rank-r MMA, adds the bias and
writes the output once, rounded once. The kernel builds its TMA descriptors on the device: host-built
ones cost about 0.1 ms of Python per call to launch, which at ~400 calls a step the CPU cannot spare.

Measured on an H100 at PixArt's 1024 px shapes, batch 8 (M = 32768 tokens, r = 16; ms per call,
`python scripts/probe_kernels.py lowrank-triton`; the base GEMM alone in brackets):

    (K, N)          cuBLAS pair   this kernel
    1152 -> 1152    0.169         0.145     (0.122) attention projections, forward and input gradient
    1152 -> 4608    0.604-0.645   0.511     (0.464) FF up-projection forward, FF down input gradient
    4608 -> 1152    0.489-0.495   0.492-0.509  long reductions: cuBLAS's mainloop pulls ahead

so `wanted()` sends short reductions (K <= 2048) here and leaves long ones to cuBLAS. The rule is fixed,
not timed at run time, so the same run picks the same kernels (and rounding) every time. Hopper only
(sm90: TMA descriptors; measured there); anything else, and any layout the kernel does not take, stays
on the cuBLAS pair. PIXART_TUNE_TRITON_LORA=0 turns it off.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_REDUCTION = 2048  # K above this: cuBLAS (see the table above)
MIN_ROWS = 2048  # fewer rows than this: too few tiles to fill the GPU, cuBLAS picks better
BK = 64  # the mainloop's reduction tile
_SHARED_MEMORY = 232448  # bytes a block may use on Hopper (227 KiB, the opt-in maximum of sm90)


@triton.jit
def _gemm_plus_lowrank_kernel(x_ptr, w_ptr, h_ptr, b_ptr, y_ptr, bias_ptr, M, N, K, x_rows, w_rows, h_rows, b_rows,
                              R_ALL, group_cols, R: tl.constexpr, W_TRANSPOSED: tl.constexpr, B_TRANSPOSED: tl.constexpr,
                              HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                              GROUP_M: tl.constexpr, STAGES: tl.constexpr, NUM_SMS: tl.constexpr):  # fmt: skip
    # TMA descriptors built on the device (cheaper to launch than host-built ones). w is (K, N) logically;
    # W_TRANSPOSED: stored as (N, K) row-major (the forward's W.t()); likewise b (r, N) / stored (N, r).
    # *_rows: the row strides of the stored operands. b may be block diagonal (see `gemm_plus_lowrank`):
    # output columns [g * group_cols, (g + 1) * group_cols) take ranks [g * R, (g + 1) * R) of the R_ALL.
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[x_rows, 1], block_shape=[BM, BK])
    if W_TRANSPOSED:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[w_rows, 1], block_shape=[BN, BK])
    else:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[K, N], strides=[w_rows, 1], block_shape=[BK, BN])
    h_desc = tl.make_tensor_descriptor(h_ptr, shape=[M, R_ALL], strides=[h_rows, 1], block_shape=[BM, R])
    if B_TRANSPOSED:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, R_ALL], strides=[b_rows, 1], block_shape=[BN, R])
    else:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[R_ALL, N], strides=[b_rows, 1], block_shape=[R, BN])
    y_desc = tl.make_tensor_descriptor(y_ptr, shape=[M, N], strides=[N, 1], block_shape=[BM, BN])
    # Persistent: each program walks output tiles NUM_SMS apart, GROUP_M row tiles at a time so that
    # neighbouring programs share w tiles in L2.
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    k_tiles = tl.cdiv(K, BK)
    group = GROUP_M * num_n
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS, flatten=True, num_stages=STAGES):
        first_m = (tile // group) * GROUP_M
        group_rows = min(num_m - first_m, GROUP_M)
        off_m = (first_m + (tile % group) % group_rows) * BM
        off_n = ((tile % group) // group_rows) * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for ki in range(k_tiles):
            a = x_desc.load([off_m, ki * BK])  # (BM, BK); rows/columns past the edge load as zeros
            if W_TRANSPOSED:
                w = w_desc.load([off_n, ki * BK]).T
            else:
                w = w_desc.load([ki * BK, off_n])  # (BK, BN)
            acc = tl.dot(a, w, acc)
        r0 = (off_n // group_cols) * R  # this tile's block of ranks (a tile never straddles two)
        h = h_desc.load([off_m, r0])  # (BM, R)
        if B_TRANSPOSED:
            b = b_desc.load([off_n, r0]).T
        else:
            b = b_desc.load([r0, off_n])  # (R, BN)
        acc = tl.dot(h, b, acc)
        if HAS_BIAS:
            cols = off_n + tl.arange(0, BN)
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        y_desc.store([off_m, off_n], acc.to(y_desc.dtype))


def _layout(t: Tensor) -> bool | None:
    """For a 2-D (rows, cols) operand: False if row-major, True if the transpose of a row-major
    tensor (what `W.t()` gives), None if neither (the kernel's TMA loads need one of the two)."""
    if t.stride(1) == 1 and t.stride(0) == t.shape[1]:
        return False
    if t.stride(0) == 1 and t.stride(1) == t.shape[0]:
        return True
    return None


@functools.cache
def _hopper_sms(device_index: int) -> int:
    """The SM count of this GPU if it is Hopper (sm90), else 0. Cached: asked on every call."""
    props = torch.cuda.get_device_properties(device_index)
    return props.multi_processor_count if props.major == 9 else 0


def _scratch(size: int, alignment: int, stream) -> Tensor:
    """Global memory for the descriptors the kernel builds (Triton asks through its allocator hook)."""
    return torch.empty(size, device="cuda", dtype=torch.int8)


def _tiles(n: int, groups: int) -> tuple[int, int]:
    """(BM, BN): the H100's fastest of 15 tile configs tried, per shape. A block-diagonal b needs tiles
    that do not straddle two blocks: BN = 128, which divides the 1152 columns of each of q, k, v."""
    return (128, 256) if n >= 2048 and groups == 1 else (256, 128)


def _stages(bm: int, bn: int, r: int) -> int:
    """Mainloop pipeline depth that fits the shared memory (3 where it fits, else 2, else 0: no fit).
    Per stage an x and a w tile; once, the h and b tiles and the output tile the TMA store reads."""
    for stages in (3, 2):
        if 2 * (stages * (bm + bn) * BK + (bm + bn) * r + bm * bn) + 256 <= _SHARED_MEMORY:
            return stages
    return 0


def wanted(x: Tensor, w: Tensor, h: Tensor, b: Tensor, bias: Tensor | None, groups: int = 1) -> bool:
    """Whether this kernel takes the call: Hopper, one 16-bit dtype, short reduction, enough rows, rank
    (per block, for a block-diagonal b) a power of two from 16 (tl.dot's smallest K) whose tiles fit
    the shared memory, layouts/alignments TMA can load, tensors on the current device. Cheap: it runs
    on every call."""
    if not x.is_cuda or os.environ.get("PIXART_TUNE_TRITON_LORA") == "0" or not _hopper_sms(x.get_device()):
        return False
    if x.get_device() != torch.cuda.current_device():  # Triton launches (and _scratch allocates) on that one
        return False
    (m, k), n, r_all = x.shape, w.shape[1], h.shape[1]
    r, (bm, bn) = r_all // groups, _tiles(n, groups)
    if r * groups != r_all or n % groups or (groups > 1 and (n // groups) % bn):
        return False
    if k > MAX_REDUCTION or m < MIN_ROWS or r < 16 or r > 128 or r & (r - 1) or k % 8 or n % 8:
        return False
    if not _stages(bm, bn, r):
        return False
    tensors = (x, w, h, b) if bias is None else (x, w, h, b, bias)
    if x.dtype not in (torch.bfloat16, torch.float16) or any(t.dtype != x.dtype for t in tensors):
        return False
    if _layout(x) is not False or _layout(h) is not False or _layout(w) is None or _layout(b) is None:
        return False
    return all(t.data_ptr() % 16 == 0 for t in tensors) and (bias is None or bias.is_contiguous())


def gemm_plus_lowrank(x: Tensor, w: Tensor, h: Tensor, b: Tensor, bias: Tensor | None, groups: int = 1) -> Tensor:
    """x (M, K) @ w (K, N) + h (M, r) @ b (r, N) (+ bias (N,)) -> (M, N) in x's dtype. With groups > 1, b
    is block diagonal: output columns [g N/groups, (g+1) N/groups) take only ranks [g r/groups, ...),
    the rest of b being zeros that the kernel skips. Call only where `wanted()` says yes."""
    (m, k), n, r_all = x.shape, w.shape[1], h.shape[1]
    bm, bn = _tiles(n, groups)
    w_t, b_t = _layout(w), _layout(b)
    w_stored, b_stored = (w.t() if w_t else w), (b.t() if b_t else b)  # row-major, as in memory
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    sms = _hopper_sms(x.get_device())
    triton.set_allocator(_scratch)  # per call: the backward runs on autograd's own thread
    grid = (min(sms, triton.cdiv(m, bm) * triton.cdiv(n, bn)),)
    _gemm_plus_lowrank_kernel[grid](x, w_stored, h, b_stored, y, y if bias is None else bias, m, n, k, x.stride(0),
                                    w_stored.stride(0), h.stride(0), b_stored.stride(0), r_all, n // groups,
                                    r_all // groups, w_t, b_t, bias is not None, bm, bn, BK, 4,
                                    _stages(bm, bn, r_all // groups), sms, num_warps=8)  # fmt: skip
    return y
