"""The Triton form of gemm_plus_lowrank (Hopper only): values against fp32, the routing rule, and a LoRA
linear's forward and backward through it against the cuBLAS pair."""

import importlib.util

import pytest
import torch

hopper = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
pytestmark = pytest.mark.skipif(not hopper or importlib.util.find_spec("triton") is None,
                                reason="needs a Hopper GPU and Triton")  # fmt: skip


def _operands(m, k, n, r, transposed, bias, seed=0):
    """x (M, K); w (K, N) and b (r, N) as the forward passes them (transposed views of W (N, K) and
    s*B (N, r)) or as the backward does (W itself and A (r, K) as stored)."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)

    x, h = rand(m, k), rand(m, r)
    w = (rand(n, k) / k**0.5).t() if transposed else rand(k, n) / k**0.5
    b = rand(n, r).t() if transposed else rand(r, n)
    return x, w, h, b, (rand(n) if bias else None)


@pytest.mark.parametrize("k,n", [(1152, 1152), (1152, 4608), (256, 200)])
@pytest.mark.parametrize("transposed", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_matches_fp32(k, n, transposed, bias):
    from pixart_tune import lowrank_triton

    x, w, h, b, bias_t = _operands(2048 + 37, k, n, 16, transposed, bias)  # rows not a multiple of any tile
    assert lowrank_triton.wanted(x, w, h, b, bias_t)
    got = lowrank_triton.gemm_plus_lowrank(x, w, h, b, bias_t)
    want = x.float() @ w.float() + h.float() @ b.float() + (0 if bias_t is None else bias_t.float())
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    assert ((got.float() - want).abs().max() / want.abs().max()).item() < 1e-2
    # rounded once from fp32: no worse than the cuBLAS pair, which rounds the adapter term first
    pair = torch.mm(h, b) if bias_t is None else torch.addmm(bias_t, h, b)
    pair = pair.addmm_(x, w)
    assert (got.float() - want).abs().mean() <= (pair.float() - want).abs().mean() * 1.05


@pytest.mark.parametrize("r", [32, 64, 128])
def test_larger_ranks_fit_the_shared_memory_or_go_to_cublas(r):
    """Rank 32 and 64 (lora.rank) take the kernel with a shallower pipeline; at 128 its tiles do not fit
    the shared memory, and the op's cuBLAS pair answers instead of a launch failure."""
    from pixart_tune import lowrank_triton
    from pixart_tune.lora_ops import gemm_plus_lowrank as op

    x, w, h, b, bias = _operands(4096, 1152, 1152, r, True, True)
    want = x.float() @ w.float() + h.float() @ b.float() + bias.float()
    assert lowrank_triton.wanted(x, w, h, b, bias) == (r < 128)
    got = op(x, w, h, b, bias)
    assert ((got.float() - want).abs().max() / want.abs().max()).item() < 1e-2


@pytest.mark.parametrize("transposed", [True, False])
def test_a_block_diagonal_b_adds_each_tiles_own_block(transposed):
    """groups = 3 (a joint q/k/v projection): b is block diagonal, (3 x 16, 3 x 1152); the kernel adds
    only each output tile's block, which equals the full product since the rest of b is zeros."""
    from pixart_tune import lowrank_triton

    x, w, h, _, bias = _operands(4096 + 37, 1152, 3 * 1152, 48, transposed, True)
    g = torch.Generator(device="cuda").manual_seed(5)
    blocks = [torch.randn(1152, 16, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3)]
    b = torch.block_diag(*blocks)  # (3456, 48)
    b = b.t() if transposed else b.t().contiguous()  # (48, 3456): the forward's view, or stored row-major
    assert lowrank_triton.wanted(x, w, h, b, bias, groups=3)
    assert not lowrank_triton.wanted(x, w, h, b, bias, groups=5)  # 48 ranks do not split in 5
    got = lowrank_triton.gemm_plus_lowrank(x, w, h, b, bias, groups=3)
    want = x.float() @ w.float() + h.float() @ b.float() + bias.float()
    assert ((got.float() - want).abs().max() / want.abs().max()).item() < 1e-2


def test_the_op_routes_here_only_where_wanted(monkeypatch):
    from pixart_tune import lowrank_triton
    from pixart_tune.lora_ops import gemm_plus_lowrank as op  # importing lora_ops registers the op

    x, w, h, b, bias = _operands(4096, 1152, 1152, 16, True, True)
    calls = []
    real = lowrank_triton.gemm_plus_lowrank
    monkeypatch.setattr(lowrank_triton, "gemm_plus_lowrank", lambda *a: calls.append(1) or real(*a))
    op(x, w, h, b, bias)
    assert calls == [1]
    xl, wl, hl, bl, _ = _operands(4096, 4608, 1152, 16, True, False)  # long reduction: cuBLAS
    assert not lowrank_triton.wanted(xl, wl, hl, bl, None)
    op(xl, wl, hl, bl, None)
    assert calls == [1]
    assert not lowrank_triton.wanted(x[:100], w, h[:100], b, bias)  # too few rows
    assert not lowrank_triton.wanted(x, w, h[:, :8].contiguous(), b[:8], bias)  # rank 8: below tl.dot's 16
    assert not lowrank_triton.wanted(x.float(), w.float(), h.float(), b.float(), bias.float())
    assert not lowrank_triton.wanted(x[:, ::2], w[::2], h, b, bias)  # x not row-major
    monkeypatch.setenv("PIXART_TUNE_TRITON_LORA", "0")
    assert not lowrank_triton.wanted(x, w, h, b, bias)


@pytest.mark.parametrize("n,groups", [(1152, 1), (4608, 1), (3 * 1152, 3), (192, 1)])
@pytest.mark.parametrize("m", [2048 + 37, 32768])
def test_thin_pair_matches_fp32_from_one_read(n, groups, m):
    """dy (s B) and dy^T h from one kernel: against fp32 products; with groups, the diagonal blocks of
    dy^T h and zeros elsewhere (all a joint projection's B gradients use)."""
    from pixart_tune import lowrank_triton

    g = torch.Generator(device="cuda").manual_seed(3)
    d = torch.randn(m, n, device="cuda", dtype=torch.bfloat16, generator=g)  # rows not a multiple of any tile
    h = torch.randn(m, 16 * groups, device="cuda", dtype=torch.bfloat16, generator=g)
    p = torch.block_diag(*(torch.randn(n // groups, 16, device="cuda", dtype=torch.bfloat16, generator=g)
                           for _ in range(groups)))  # fmt: skip
    assert lowrank_triton.wanted_thin_pair(d, p, h, groups)
    v, dtb = lowrank_triton.thin_pair(d, p, h, groups)
    keep = torch.block_diag(*[torch.ones(n // groups, 16, device="cuda")] * groups)
    want_v, want_g = d.float() @ p.float(), (d.float().t() @ h.float()) * keep
    assert v.dtype == torch.bfloat16 and v.shape == (m, 16 * groups)
    assert dtb.dtype == torch.float32 and dtb.shape == (n, 16 * groups)
    assert ((v.float() - want_v).abs().max() / want_v.abs().max()).item() < 1e-2
    assert ((dtb - want_g).abs().max() / want_g.abs().max()).item() < 1e-4  # fp32 sums: no bf16 rounding
    assert (dtb[keep == 0] == 0).all()


@pytest.mark.parametrize("groups", [1, 3])
def test_thin_pair_reads_h_from_padded_rows(groups):
    """h as the joined LoRA linear keeps it, a view of [x | h] (rows K + r apart): taken, and the same
    results, bit for bit, as from a contiguous copy."""
    from pixart_tune import lowrank_triton

    g = torch.Generator(device="cuda").manual_seed(5)
    bf = {"device": "cuda", "dtype": torch.bfloat16}
    m, k, n, r = 4096, 1152, 1152 * groups, 16 * groups
    d, xw = torch.randn(m, n, **bf, generator=g), torch.randn(m, k + r, **bf, generator=g)
    p = torch.block_diag(*(torch.randn(n // groups, 16, **bf, generator=g) for _ in range(groups)))
    h = xw[:, k:]  # (M, r), rows k + r apart
    assert lowrank_triton.wanted_thin_pair(d, p, h, groups)
    for got, want in zip(lowrank_triton.thin_pair(d, p, h, groups), lowrank_triton.thin_pair(d, p, h.contiguous(), groups)):
        assert torch.equal(got, want)
    assert not lowrank_triton.wanted_thin_pair(d, p, xw[:, : 2 * r : 2], groups)  # columns not adjacent


def test_thin_pair_routing():
    from pixart_tune import lowrank_triton

    g = torch.Generator(device="cuda").manual_seed(4)
    bf = {"device": "cuda", "dtype": torch.bfloat16}
    d, h = torch.randn(4096, 1152, **bf, generator=g), torch.randn(4096, 16, **bf, generator=g)
    p = torch.randn(1152, 16, **bf, generator=g)
    assert lowrank_triton.wanted_thin_pair(d, p, h)
    assert not lowrank_triton.wanted_thin_pair(d[:100], p, h[:100])  # too few rows
    assert not lowrank_triton.wanted_thin_pair(d[:, :1000], p[:1000], h)  # d not row-major
    assert not lowrank_triton.wanted_thin_pair(d, p[:, :8].contiguous(), h[:, :8].contiguous())  # rank 8
    assert not lowrank_triton.wanted_thin_pair(d.float(), p.float(), h.float())
    for r in (32, 64):  # lora.rank 32 and 64 take it too; more ranks than 64 in all do not
        pr, hr = torch.randn(1152, r, **bf), torch.randn(4096, r, **bf)
        assert lowrank_triton.wanted_thin_pair(d, pr, hr)
        v, dtb = lowrank_triton.thin_pair(d, pr, hr)
        assert ((dtb - d.float().t() @ hr.float()).abs().max() / dtb.abs().max()).item() < 1e-4
        assert ((v.float() - d.float() @ pr.float()).abs().max() / v.float().abs().max()).item() < 1e-2
    assert not lowrank_triton.wanted_thin_pair(d, torch.randn(1152, 128, **bf), torch.randn(4096, 128, **bf))
    d3, h3 = torch.randn(4096, 3 * 200, **bf), torch.randn(4096, 48, **bf)  # blocks of 200 columns
    assert not lowrank_triton.wanted_thin_pair(d3, torch.randn(600, 48, **bf), h3, groups=3)  # tiles would straddle
    assert lowrank_triton.wanted_thin_pair(d3[:, :576].contiguous(), torch.randn(576, 48, **bf), h3, groups=3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_tensors_on_another_gpu_stay_on_cublas_and_are_right():
    """Triton launches on the current device (and its scratch is allocated there): operands on another
    GPU, as in a process that did not make its GPU current, take the cuBLAS pair, on their own GPU."""
    from pixart_tune import lowrank_triton
    from pixart_tune.lora_ops import gemm_plus_lowrank

    torch.cuda.set_device(0)
    x, w, h, b, bias = (t.to("cuda:1") for t in _operands(4096, 1152, 1152, 16, True, True))
    want = x.float() @ w.float() + h.float() @ b.float() + bias.float()

    def rel_err(got):
        assert got.device == x.device
        return ((got.float() - want).abs().max() / want.abs().max()).item()

    assert not lowrank_triton.wanted(x, w, h, b, bias)
    assert rel_err(gemm_plus_lowrank(x, w, h, b, bias)) < 1e-2
    with torch.cuda.device(1):  # made current, the same call takes the kernel
        assert lowrank_triton.wanted(x, w, h, b, bias)
        assert rel_err(lowrank_triton.gemm_plus_lowrank(x, w, h, b, bias)) < 1e-2


def _lora_case(n: int, device: str = "cuda"):
    """A LoRA linear 1152 -> n at 4096 tokens: x, W, bias, A and B (trainable), an incoming gradient."""
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(2, 2048, 1152, device=device, generator=g)
    weight = torch.randn(n, 1152, device=device, dtype=torch.bfloat16, generator=g) / 34
    bias = torch.randn(n, device=device, dtype=torch.bfloat16, generator=g)
    a = (torch.randn(16, 1152, device=device, generator=g) / 34).requires_grad_()
    b = (torch.randn(n, 16, device=device, generator=g) / 4).requires_grad_()
    return x, weight, bias, a, b, torch.randn(2, 2048, n, device=device, generator=g)


def _lora_linear_run(case, fp8=None):
    """lora_linear under bf16 autocast: y and the gradients of x, A and B."""
    from pixart_tune.lora_fused import lora_linear

    x, weight, bias, a, b, dy = case
    xi = x.clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        y = lora_linear(xi, weight, bias, a, b, 2.0, fp8=fp8)
    return (y, *torch.autograd.grad(y, (xi, a, b), dy))


def test_lora_linear_forward_and_backward_match_the_cublas_pair(monkeypatch):
    case = _lora_case(1152)
    fused = _lora_linear_run(case)
    monkeypatch.setenv("PIXART_TUNE_TRITON_LORA", "0")
    pair = _lora_linear_run(case)
    for got, want in zip(fused, pair):
        assert ((got.float() - want.float()).abs().max() / want.float().abs().max()).item() < 1e-2


# --------------------------------------------------------------------------------------------
# The fp8 form (gemm_scaled_plus_lowrank; train.fp8)


def _fp8_operands(m, k, n, r, groups=1, seed=0):
    """float8 x (M, K) and W (N, K) with their row scales, a 16-bit h (M, r) and b (r, N) (block diagonal
    in `groups` blocks, as the forward's view of s*B (N, r)), a bias."""
    from pixart_tune.fp8 import quantize_rowwise

    g = torch.Generator(device="cuda").manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)

    (xq, sx), (wq, sw) = quantize_rowwise(rand(m, k)), quantize_rowwise(rand(n, k) / k**0.5)
    b = torch.block_diag(*[rand(n // groups, r // groups) for _ in range(groups)]).t()  # (r, N) view
    return xq, sx, wq, sw, rand(m, r), b, rand(n)


def _fp8_want(xq, sx, wq, sw, h, b, bias):
    return (xq.float() * sx) @ (wq.float() * sw).t() + h.float() @ b.float() + bias.float()


@pytest.mark.parametrize("k,n,groups", [(1152, 3456, 3), (1152, 4608, 1), (4608, 1152, 1), (1152, 1152, 1)])
def test_fp8_kernel_matches_fp32_of_the_same_fp8_values(k, n, groups):
    """PixArt's fp8 layers (train.fp8): the joint q/k/v forward, the FF up and down projections (the
    backward's dy @ W^T has the same shapes), at rows that are not a multiple of any tile."""
    from pixart_tune import lowrank_triton

    ops = _fp8_operands(4096 + 37, k, n, 16 * groups, groups)
    assert lowrank_triton.wanted_scaled(*ops, groups=groups)
    got = lowrank_triton.gemm_scaled_plus_lowrank(*ops, groups=groups)
    want = _fp8_want(*ops)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    # Same fp8 operands: only the fp32 accumulation order and the one bf16 rounding differ (measured
    # 0.003-0.005 at M = 32768).
    assert ((got.float() - want).abs().max() / want.abs().max()).item() < 1e-2


def test_the_fp8_op_routes_here_only_where_wanted(monkeypatch):
    """What the kernel declines goes to torch._scaled_mm plus the low-rank product, with the same result."""
    from pixart_tune import lowrank_triton
    from pixart_tune.lora_ops import gemm_scaled_plus_lowrank as op

    xq, sx, wq, sw, h, b, bias = ops = _fp8_operands(4096, 1152, 1152, 16)
    want = _fp8_want(*ops)
    calls = []
    real = lowrank_triton.gemm_scaled_plus_lowrank
    monkeypatch.setattr(lowrank_triton, "gemm_scaled_plus_lowrank", lambda *a: calls.append(1) or real(*a))

    def rel_err(got):
        return ((got.float() - want).abs().max() / want.abs().max()).item()

    assert rel_err(op(*ops)) < 1e-2 and calls == [1]
    assert not lowrank_triton.wanted_scaled(xq, sx, wq.t().contiguous().t(), sw, h, b, bias)  # W not K-major
    assert not lowrank_triton.wanted_scaled(xq, sx.repeat(1, 2)[:, :1], wq, sw, h, b, bias)  # strided scales
    assert not lowrank_triton.wanted_scaled(xq.float(), sx, wq.float(), sw, h, b, bias)  # not fp8
    assert not lowrank_triton.wanted_scaled(xq, sx, wq, sw, h.float(), b.float(), bias.float())  # 16-bit adapter only
    monkeypatch.setenv("PIXART_TUNE_TRITON_LORA", "0")
    assert not lowrank_triton.wanted_scaled(*ops)
    assert rel_err(op(*ops)) < 1e-2 and calls == [1]  # torch._scaled_mm + the low-rank product


def test_fp8_lora_linear_on_the_gpu_matches_the_bf16_one():
    """A LoRA FF up-projection with both directions in fp8, against the same layer in bf16 (kernels)."""
    from pixart_tune.fp8 import FP8Weights

    case = _lora_case(4608)
    copies = FP8Weights(case[1], True, True).as_args()
    for got, want in zip(_lora_linear_run(case, copies), _lora_linear_run(case)):
        err = ((got.float() - want.float()).norm() / want.float().norm()).item()
        assert err < 0.05  # fp8's rounding of x, dy and W (y, dx); dA and dB read dy, x A^T only


def test_the_fp8_kernel_writes_each_rows_max_and_the_op_falls_back_to_the_same(monkeypatch):
    """row_max (lora_ff.py's scale bounds): max |y| of each row, atomically over the row's tiles."""
    from pixart_tune.lora_ops import gemm_scaled_plus_lowrank_row_max as op

    ops = _fp8_operands(4096 + 37, 1152, 4608, 16)
    want = _fp8_want(*ops)
    y, row_max = op(*ops)
    assert row_max.shape == (4096 + 37,) and row_max.dtype == torch.float32
    # from the fp32 accumulator: within the bf16 rounding of y's own max
    torch.testing.assert_close(row_max, y.float().abs().amax(-1), rtol=1e-2, atol=0)
    assert ((y.float() - want).abs().max() / want.abs().max()).item() < 1e-2
    monkeypatch.setenv("PIXART_TUNE_TRITON_LORA", "0")
    _, row_max_torch = op(*ops)  # torch._scaled_mm + the low-rank product, the max taken by torch
    torch.testing.assert_close(row_max_torch, row_max, rtol=1e-2, atol=0)
