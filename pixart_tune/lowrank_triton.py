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

The same kernel takes float8 x and W with per-row scales (`gemm_scaled_plus_lowrank`, train.fp8;
fp8.py). `python scripts/probe_kernels.py fp8-gemms`, against the bf16 op as routed: 0.27 ms against
0.42 for the joint q/k/v projection (1152 -> 3456, three rank-16 blocks), 0.34 against 0.51 at
1152 -> 4608, 0.27 against 0.48 at 4608 -> 1152 (so no K limit there). It can also write each row's
max |y| (lora_ff.py's fp8 scale bounds).

Below it, `thin_pair`: a LoRA backward's two thin products of its output gradient, dy (s B) and dy^T h,
from one read of dy (lora_ops.thin_pair routes there).
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
BK = 64  # the mainloop's reduction tile (16-bit operands)
BK_FP8 = 128  # the same for float8 operands: the same bytes per stage
_SHARED_MEMORY = 232448  # bytes a block may use on Hopper (227 KiB, the opt-in maximum of sm90)


@triton.jit
def _gemm_plus_lowrank_kernel(x_ptr, w_ptr, h_ptr, b_ptr, y_ptr, bias_ptr, x_scale_ptr, w_scale_ptr, row_max_ptr, M, N,
                              K, x_rows, w_rows, h_rows, b_rows, R_ALL, group_cols, R: tl.constexpr,
                              W_TRANSPOSED: tl.constexpr, B_TRANSPOSED: tl.constexpr, HAS_BIAS: tl.constexpr,
                              SCALED: tl.constexpr, ROW_MAX: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                              BK: tl.constexpr, GROUP_M: tl.constexpr, STAGES: tl.constexpr,
                              NUM_SMS: tl.constexpr):  # fmt: skip
    # TMA descriptors built on the device (cheaper to launch than host-built ones). w is (K, N) logically;
    # W_TRANSPOSED: stored as (N, K) row-major (the forward's W.t()); likewise b (r, N) / stored (N, r).
    # *_rows: the row strides of the stored operands. b may be block diagonal (see `gemm_plus_lowrank`):
    # output columns [g * group_cols, (g + 1) * group_cols) take ranks [g * R, (g + 1) * R) of the R_ALL.
    # SCALED: x and w are float8 with one fp32 scale per row of x (M,) and per output column (N,): the
    # fp32 sum x @ w is rescaled before the (16-bit) low-rank term joins it. fp8 wgmma reads w K-major.
    # ROW_MAX: also max |y| of each row into row_max (M,) fp32, zeroed by the caller (atomic max over the
    # row's tiles: the result does not depend on their order).
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
        if SCALED:
            rows = off_m + tl.arange(0, BM)
            cols = off_n + tl.arange(0, BN)
            x_scale = tl.load(x_scale_ptr + rows, mask=rows < M, other=0.0)  # (BM,) fp32
            w_scale = tl.load(w_scale_ptr + cols, mask=cols < N, other=0.0)  # (BN,) fp32
            acc = acc * x_scale[:, None] * w_scale[None, :]
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
        if ROW_MAX:
            rows = off_m + tl.arange(0, BM)
            tl.atomic_max(row_max_ptr + rows, tl.max(tl.abs(acc), axis=1), mask=rows < M)
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
    Per stage an x and a w tile; once, the h and b tiles and the output tile the TMA store reads. fp8
    operands run BK_FP8 = 2 BK deep: the same bytes per stage, so the same count."""
    for stages in (3, 2):
        if 2 * (stages * (bm + bn) * BK + (bm + bn) * r + bm * bn) + 256 <= _SHARED_MEMORY:
            return stages
    return 0


def _fits(x: Tensor, n: int, h: Tensor, groups: int) -> bool:
    """The checks both forms share: Hopper, the current device, enough rows, a rank (per block) that is
    a power of two from 16 (tl.dot's smallest K), blocks that tiles do not straddle, tiles that fit, h
    (M, r) row-major."""
    if not x.is_cuda or os.environ.get("PIXART_TUNE_TRITON_LORA") == "0" or not _hopper_sms(x.get_device()):
        return False
    if x.get_device() != torch.cuda.current_device():  # Triton launches (and _scratch allocates) on that one
        return False
    m, r_all = x.shape[0], h.shape[1]
    r, (bm, bn) = r_all // groups, _tiles(n, groups)
    if r * groups != r_all or n % groups or (groups > 1 and (n // groups) % bn):
        return False
    if m < MIN_ROWS or r < 16 or r > 128 or r & (r - 1) or n % 8 or not _stages(bm, bn, r):
        return False
    return _layout(h) is False and h.data_ptr() % 16 == 0


def _low_rank_ok(h: Tensor, b: Tensor, bias: Tensor | None, dtype: torch.dtype) -> bool:
    """h, b (and bias) in `dtype`, in layouts and alignments TMA loads."""
    tensors = (h, b) if bias is None else (h, b, bias)
    if any(t.dtype != dtype for t in tensors) or _layout(b) is None:
        return False
    return all(t.data_ptr() % 16 == 0 for t in tensors) and (bias is None or bias.is_contiguous())


def wanted(x: Tensor, w: Tensor, h: Tensor, b: Tensor, bias: Tensor | None, groups: int = 1) -> bool:
    """Whether this kernel takes `gemm_plus_lowrank(x, w, ...)`: the shared checks (_fits), one 16-bit
    dtype, a short reduction, layouts/alignments TMA can load. Cheap: it runs on every call."""
    k, n = x.shape[1], w.shape[1]
    if k > MAX_REDUCTION or k % 8 or not _fits(x, n, h, groups):
        return False
    if x.dtype not in (torch.bfloat16, torch.float16) or w.dtype != x.dtype or not _low_rank_ok(h, b, bias, x.dtype):
        return False
    return _layout(x) is False and _layout(w) is not None and x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0


def wanted_scaled(x: Tensor, x_scale: Tensor, w: Tensor, w_scale: Tensor, h: Tensor, b: Tensor, bias: Tensor | None,
                  groups: int = 1) -> bool:  # fmt: skip
    """Whether this kernel takes `gemm_scaled_plus_lowrank(...)`: the shared checks (_fits), float8_e4m3fn
    x (M, K) and w (N, K) both row-major (fp8 wgmma reads both K-major), contiguous fp32 scales, a 16-bit
    low-rank term. Any K: at K = 4608 this fp8 mainloop still beats cuBLAS's (scripts/results/NOTES.md)."""
    (m, k), n = x.shape, w.shape[0]
    if k % 16 or not _fits(x, n, h, groups) or h.dtype not in (torch.bfloat16, torch.float16):
        return False
    if x.dtype != torch.float8_e4m3fn or w.dtype != x.dtype or not _low_rank_ok(h, b, bias, h.dtype):
        return False
    scales_ok = all(s.dtype == torch.float32 and s.is_contiguous() and s.numel() == len_
                    for s, len_ in ((x_scale, m), (w_scale, n)))  # fmt: skip
    return scales_ok and _layout(x) is False and _layout(w) is False and x.data_ptr() % 16 == w.data_ptr() % 16 == 0


def _launch(x, w, w_transposed: bool, h, b, bias, groups: int, x_scale=None, w_scale=None, row_max=None) -> Tensor:
    """Run the kernel: x (M, K) row-major; w stored row-major, (N, K) if w_transposed else (K, N);
    row_max: a zeroed (M,) fp32 tensor that gets max |y| per row, or None."""
    m, k = x.shape
    n, r_all = (w.shape[0] if w_transposed else w.shape[1]), h.shape[1]
    bm, bn = _tiles(n, groups)
    b_t = _layout(b)
    b_stored = b.t() if b_t else b  # row-major, as in memory
    y = torch.empty(m, n, device=x.device, dtype=h.dtype)
    sms = _hopper_sms(x.get_device())
    triton.set_allocator(_scratch)  # per call: the backward runs on autograd's own thread
    grid = (min(sms, triton.cdiv(m, bm) * triton.cdiv(n, bn)),)
    scaled = x_scale is not None
    _gemm_plus_lowrank_kernel[grid](x, w, h, b_stored, y, y if bias is None else bias, x_scale if scaled else y,
                                    w_scale if scaled else y, y if row_max is None else row_max, m, n, k, x.stride(0),
                                    w.stride(0), h.stride(0), b_stored.stride(0), r_all, n // groups,
                                    r_all // groups, w_transposed, b_t, bias is not None, scaled, row_max is not None,
                                    bm, bn, BK_FP8 if scaled else BK, 4, _stages(bm, bn, r_all // groups), sms,
                                    num_warps=8)  # fmt: skip
    return y


def gemm_plus_lowrank(x: Tensor, w: Tensor, h: Tensor, b: Tensor, bias: Tensor | None, groups: int = 1) -> Tensor:
    """x (M, K) @ w (K, N) + h (M, r) @ b (r, N) (+ bias (N,)) -> (M, N) in x's dtype. With groups > 1, b
    is block diagonal: output columns [g N/groups, (g+1) N/groups) take only ranks [g r/groups, ...),
    the rest of b being zeros that the kernel skips. Call only where `wanted()` says yes."""
    w_t = _layout(w)
    return _launch(x, w.t() if w_t else w, w_t, h, b, bias, groups)


def gemm_scaled_plus_lowrank(x: Tensor, x_scale: Tensor, w: Tensor, w_scale: Tensor, h: Tensor, b: Tensor,
                             bias: Tensor | None, groups: int = 1, row_max: Tensor | None = None) -> Tensor:  # fmt: skip
    """(x * x_scale) @ (w * w_scale)^T + h @ b (+ bias) -> (M, N) in h's dtype, for float8 x (M, K) and
    w (N, K) with fp32 scales per row (M, 1) and (N, 1); h, b, groups as in gemm_plus_lowrank. The fp8
    product accumulates in fp32 and is rescaled before the low-rank term joins it. Call only where
    `wanted_scaled()` says yes. row_max: a zeroed (M,) fp32 tensor that gets max |result| per row."""
    return _launch(x, w, True, h, b, bias, groups, x_scale, w_scale, row_max)


# --- The adapter's two thin backward products from one read of dy -----------------------------------
#
# A LoRA layer's backward multiplies its output gradient dy (M, N) twice by a rank-r factor:
# dh = dy @ (s B) (M, r), a reduction over N, and dB ∝ dy^T @ h (N, r), a reduction over M. As two GEMMs
# each reads all of dy (226 MB for the joint q/k/v projection at batch 8, 1024 px; 302 MB for the
# feed-forward's 4608-wide gradient). Here each program takes BM rows of dy and sweeps their N columns
# once: it accumulates its rows' dh in registers and writes its rows' share of dy^T @ h, one (N, r)
# fp32 partial sum per program, which a sum over the programs finishes. Deterministic: no atomics.


@triton.jit
def _thin_pair_kernel(d_ptr, p_ptr, h_ptr, v_ptr, part_ptr, M, N, d_rows, p_rows, h_rows, R_ALL, group_cols,
                      R: tl.constexpr, R_PAD: tl.constexpr, GROUPED: tl.constexpr, BM: tl.constexpr,
                      BN: tl.constexpr):  # fmt: skip
    # d (M, N) row-major; p (N, R_ALL) row-major (a dense block diagonal where GROUPED: output columns
    # [g group_cols, (g + 1) group_cols) carry ranks [g R, (g + 1) R)); h (M, R_ALL). Writes v = d @ p
    # (M, R_ALL) and, per program, part[pid] = d[rows]^T @ h[rows] (N, R) on the diagonal blocks only.
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)
    row_ok = rows < M
    ranks = tl.arange(0, R_PAD)  # R_ALL padded to a power of two (tl.arange); the pad loads as zeros
    rank_ok = ranks < R_ALL
    own = tl.arange(0, R)
    v = tl.zeros((BM, R_PAD), dtype=tl.float32)
    if not GROUPED:
        h = tl.load(h_ptr + rows[:, None] * h_rows + own[None, :], mask=row_ok[:, None], other=0.0)  # (BM, R)
    for n0 in range(0, N, BN):  # pipelined by the launch's num_stages
        cols = n0 + tl.arange(0, BN)
        col_ok = cols < N
        d = tl.load(d_ptr + rows[:, None] * d_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0)  # (BM, BN)  # fmt: skip
        p = tl.load(p_ptr + cols[:, None] * p_rows + ranks[None, :], mask=col_ok[:, None] & rank_ok[None, :],
                    other=0.0)  # (BN, R_PAD)  # fmt: skip
        v = tl.dot(d, p, v)
        if GROUPED:  # this column tile's block of ranks (BN divides group_cols: a tile never straddles two)
            r0 = (n0 // group_cols) * R
            h = tl.load(h_ptr + rows[:, None] * h_rows + r0 + own[None, :], mask=row_ok[:, None], other=0.0)
        g = tl.dot(tl.trans(d), h)  # (BN, R) fp32: these rows' share of d^T h
        tl.store(part_ptr + (pid * N + cols[:, None]) * R + own[None, :], g, mask=col_ok[:, None])
    tl.store(v_ptr + rows[:, None] * R_ALL + ranks[None, :], v.to(v_ptr.dtype.element_ty),
             mask=row_ok[:, None] & rank_ok[None, :])  # fmt: skip


def _thin_tiles(m: int, r_all: int, sms: int) -> tuple[int, int]:
    """(rows per program, columns per step of its sweep). Rows: the largest of 256, 128, 64 that still
    gives three quarters of a wave of programs (fewer, larger programs: fewer partial sums to add).
    Columns: 128 up to 32 ranks, else 64 (p's tile, padded to 64 ranks, would overflow the shared memory).
    On an H100 at M = 32768 (`python scripts/probe_kernels.py thin-pair`), 256 x 128 ran 0.044 ms against
    0.060 for the two GEMMs at N = 1152 and 0.138 against 0.219 at N = 4608; 256 x 64 0.128 against
    0.170 for the joint q/k/v projection's three rank-16 blocks."""
    rows = next((bm for bm in (256, 128) if triton.cdiv(m, bm) >= sms * 3 // 4), 64)
    return rows, 128 if r_all <= 32 else 64


def wanted_thin_pair(d: Tensor, p: Tensor, h: Tensor, groups: int = 1) -> bool:
    """Whether thin_pair below takes d (M, N), p (N, R) and h (M, R): Hopper (as the GEMM above), the
    current device, enough rows, one 16-bit dtype, row-major operands (h's rows may be strided), a
    per-block rank that is a power of two from 16, at most 64 ranks in all (the registers of dh's
    accumulator), blocks that the column tiles do not straddle."""
    if not d.is_cuda or os.environ.get("PIXART_TUNE_TRITON_LORA") == "0" or not _hopper_sms(d.get_device()):
        return False
    if d.get_device() != torch.cuda.current_device():
        return False
    (m, n), r_all = d.shape, p.shape[1]
    r = r_all // groups
    if m < MIN_ROWS or r * groups != r_all or n % groups or r < 16 or r_all > 64 or r & (r - 1):
        return False
    if groups > 1 and (n // groups) % _thin_tiles(m, r_all, 1)[1]:  # a column tile within one block
        return False
    if d.dtype not in (torch.bfloat16, torch.float16) or p.dtype != d.dtype or h.dtype != d.dtype:
        return False
    if m * n >= 2**31:  # the kernel's offsets are 32-bit
        return False
    # h's rows may be padded (a view of [x | x A^T]: quack_gemm's joined LoRA linear); d and p row-major
    h_rows_ok = h.stride(1) == 1 and h.stride(0) >= r_all
    return _layout(d) is False and _layout(p) is False and h_rows_ok and h.shape == (m, r_all) and p.shape[0] == n


def thin_pair(d: Tensor, p: Tensor, h: Tensor, groups: int = 1) -> tuple[Tensor, Tensor]:
    """(d @ p (M, R) in d's dtype, d^T @ h (N, R) fp32) for d (M, N), p (N, R), h (M, R), reading d once.
    With groups > 1, p is block diagonal (as gemm_plus_lowrank's b) and only the diagonal blocks of
    d^T @ h are computed; the rest of it is zeros. Call only where `wanted_thin_pair()` says yes."""
    (m, n), r_all = d.shape, p.shape[1]
    r = r_all // groups
    bm, bn = _thin_tiles(m, r_all, _hopper_sms(d.get_device()))
    programs = triton.cdiv(m, bm)
    v = torch.empty(m, r_all, device=d.device, dtype=d.dtype)
    partial = torch.empty(programs, n, r, device=d.device, dtype=torch.float32)
    _thin_pair_kernel[(programs,)](d, p, h, v, partial, m, n, d.stride(0), p.stride(0), h.stride(0), r_all, n // groups,
                                   r, triton.next_power_of_2(r_all), groups > 1, bm, bn,
                                   num_warps=8 if bm == 256 else 4, num_stages=3)  # fmt: skip
    g = partial.sum(0)  # (N, r)
    if groups == 1:
        return v, g
    full = g.new_zeros(n, r_all)
    for i in range(groups):  # the diagonal blocks
        rows = slice(i * (n // groups), (i + 1) * (n // groups))
        full[rows, i * r:(i + 1) * r] = g[rows]
    return v, full
