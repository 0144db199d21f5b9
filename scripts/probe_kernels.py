"""Kernel probes behind the README's "What bounds the training step" and scripts/results/NOTES.md
(GPU only; not benchmarks of ours).

    python scripts/probe_kernels.py lora-gemms [--out F]   # one LoRA linear's GEMMs, three ways
    python scripts/probe_kernels.py fa4-tiles [--out F]    # flash-attn-4's SM90 tile configs at d = 72
    python scripts/probe_kernels.py lowrank-triton [--out F]  # x @ w + h @ b: cuBLAS pair vs one Triton kernel
    python scripts/probe_kernels.py cross-attention [--out F]  # masked text cross-attention: SDPA vs FA4
    python scripts/probe_kernels.py fp8-gemms [--out F]    # train.fp8's GEMMs and quantisation costs
    python scripts/probe_kernels.py cross-attention-fold [--out F]  # attn2 folded (cross_attention.py) vs SDPA
    python scripts/probe_kernels.py linear-gemm-layouts [--out F]  # a trainable linear's GEMMs in each layout
    python scripts/probe_kernels.py quack-gemms [--out F]  # quack_ops.py's operators against cuBLAS (+ Inductor)
    python scripts/probe_kernels.py thin-pair [--out F]    # a LoRA's dh and dB: two GEMMs vs one read of dy
    python scripts/probe_kernels.py kcat [--out F]         # a LoRA projection's forward: Triton vs quack on [x | x A^T]

lora-gemms: at PixArt's 1024 px shapes (batch 8: M = 32768 tokens, r = 16), the forward + input-gradient
GEMMs of a frozen linear alone, then with a LoRA adapter as lora_fused.py runs it (its in-place sums
and the two adapter weight gradients), then with the adapter concatenated onto the base weight, so
that one GEMM reads x (or dy) once for both. Says how much the adapter costs per layer.

lowrank-triton: the sum gemm_plus_lowrank computes, at the same shapes, in the forward's layout (x @ W^T)
and the input gradient's (dy @ W): the base GEMM alone, the cuBLAS pair (PIXART_TUNE_TRITON_LORA=0) and
lowrank_triton's kernel, called directly even where its routing rule would not pick it.

cross-attention: one block's cross-attention at 1024 px (8 x 16 heads x 4096 queries over 120 T5
tokens of 72, samples keeping 120 down to 50 of them), forward and backward: SDPA (cuDNN first, then
its other kernels) with diffusers' additive mask, and flash-attn-4 with the mask as per-sample key counts.

cross-attention-fold: one block's whole cross-attention module (diffusers' Attention at PixArt's sizes,
q/k/v/out projections with fused rank-16 LoRAs, or plain trainable linears for a full fine-tune),
forward and backward under torch.compile, at batch 8 and 1024 px over 10-120 caption tokens: diffusers'
processor (SDPA, cuDNN first) against cross_attention.FoldedCrossAttention. Sets its MAX_COLUMNS.

linear-gemm-layouts: a trainable linear's GEMMs at PixArt's shapes (M = 32768 tokens; q/k/v, out, FF
up, FF down): the forward x W^T + b, and each backward GEMM in both layouts that give the same product,
dx as dy W (autograd's) and as dy (W^T)^T from a transposed copy, dW as dy^T x (autograd's) and as
(x^T dy)^T. Whether a full fine-tune would gain from choosing the layouts itself (NOTES.md, "What did
not help").

thin-pair: a LoRA layer's two thin backward products from its output gradient dy (M = 32768 tokens):
dh = dy (s B) and dy^T h, as two cuBLAS GEMMs and as lowrank_triton.thin_pair's one kernel, under
several tile settings, for the attention's projections, the joint q/k/v projection (three rank-16
blocks) and the feed-forward's 4608-wide gradient.

kcat: a LoRA'd attention projection's forward y = x W^T + b + (x A^T)(s B)^T at M = 32768 tokens (the
joint q/k/v projection, three rank-16 blocks, and the out projection): lowrank_triton's one kernel (the
path now), against quack's plain GEMM on the adapter joined along the reduction, [x | x A^T] [W | s B]^T
(as the LoRA feed-forward's up-projection runs), with and without the cost of building [x | x A^T].

fa4-tiles: the self-attention (8 x 16 heads x 4096 tokens x 72) forward and backward under
flash-attn-4's own tile choice and under others, by swapping its private `_tile_size_*_sm90`
functions (the tile sizes are part of its compile key), with each result checked against fp32
attention. Needs flash-attn-4 and the dq fix of pixart_tune/fa4.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


def timed(fn, iters: int = 30, warmup: int = 5) -> float:
    """Mean ms of fn() over `iters` calls, CUDA events, after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def kernel_ms(fn, iters: int = 20, warmup: int = 5, top: int = 0) -> float | tuple[float, dict]:
    """Mean CUDA kernel time (ms) of fn() from a profiler trace: the GPU's work alone, where `timed` would
    measure the host instead (a compiled module's call and its backward issue work slower than a small
    layer runs). `top` > 0: also the `top` kernels by time, ms per call."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    total = sum(e.device_time_total for e in events) / 1e3 / iters
    if not top:
        return total
    ranked = sorted(events, key=lambda e: -e.device_time_total)[:top]
    return total, {e.key[:80]: round(e.device_time_total / 1e3 / iters, 4) for e in ranked}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|, in fp32."""
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def lora_gemms(m: int = 32768, r: int = 16) -> list[dict]:
    # attention projections, FF up, FF down
    return [_lora_gemm_row(m, k, n, r) for k, n in ((1152, 1152), (1152, 4608), (4608, 1152))]


def _lora_gemm_row(m: int, k: int, n: int, r: int) -> dict:
    from pixart_tune.lora_ops import gemm_plus_lowrank

    x, dy = torch.randn(m, k, device="cuda", dtype=torch.bfloat16), torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    a = torch.randn(r, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    b = torch.randn(n, r, device="cuda", dtype=torch.bfloat16)

    def base():
        return x @ w.t(), dy @ w

    def fused():  # lora_fused.py's GEMMs: y, dx through the in-place op, then dA and dB
        h = x @ a.t()
        y = gemm_plus_lowrank(x, w.t(), h, b.t(), None)
        dh = dy @ b
        return y, gemm_plus_lowrank(dy, w, dh, a, None), dh.t() @ x, dy.t() @ h

    def concatenated():  # [y | h] = x [W; A]^T and [dx | dh] = dy [W | B]: one read of x, one of dy
        out = x @ torch.cat([w, a]).t()
        y, h = out[:, :n], out[:, n:]
        y.addmm_(h, b.t())
        out = dy @ torch.cat([w, b], 1)
        dx, dh = out[:, :k], out[:, k:]
        dx.addmm_(dh, a)
        return y, dx, dh.t() @ x, dy.t() @ h

    want, got = fused(), concatenated()
    err = max(rel_err(p, q) for p, q in zip(got, want))
    row = {"k": k, "n": n, "base_ms": timed(base), "fused_lora_ms": timed(fused),
           "concatenated_ms": timed(concatenated), "concatenated_vs_fused_max_rel_err": err}  # fmt: skip
    row["lora_cost_ms"] = row["fused_lora_ms"] - row["base_ms"]
    print(json.dumps(row), flush=True)
    return row


def lowrank_triton(m: int = 32768, r: int = 16) -> list[dict]:
    rows = []
    for k, n in ((1152, 1152), (1152, 4608), (4608, 1152)):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        h = torch.randn(m, r, device="cuda", dtype=torch.bfloat16)
        for direction, x, wl, b in (("forward", torch.randn(m, k), w.t(), torch.randn(n, r).t()),
                                    ("input grad", torch.randn(m, n), w, torch.randn(r, k))):  # fmt: skip
            rows.append(_lowrank_row(direction, x.to("cuda", torch.bfloat16), wl, h, b.to("cuda", torch.bfloat16)))
    return rows


def _lowrank_row(direction: str, x, w, h, b) -> dict:
    from bench import triton_lora_off  # scripts/ is on sys.path when this runs as a script

    from pixart_tune import lowrank_triton as lt
    from pixart_tune.lora_ops import gemm_plus_lowrank

    with triton_lora_off():
        row = {"k": x.shape[1], "n": w.shape[1], "direction": direction, "base_ms": timed(lambda: x @ w),
               "cublas_pair_ms": timed(lambda: gemm_plus_lowrank(x, w, h, b, None)),
               "triton_ms": timed(lambda: lt.gemm_plus_lowrank(x, w, h, b, None))}  # fmt: skip
    row["routed_to_triton"] = lt.wanted(x, w, h, b, None)
    print(json.dumps(row), flush=True)
    return row


def thin_pair(m: int = 32768, r: int = 16) -> list[dict]:
    rows = []
    for n, groups in ((1152, 1), (3456, 3), (4608, 1)):
        g = torch.Generator(device="cuda").manual_seed(0)
        d, h = (torch.randn(m, c, device="cuda", dtype=torch.bfloat16, generator=g) for c in (n, r * groups))
        p = torch.block_diag(*(torch.randn(n // groups, r, device="cuda", dtype=torch.bfloat16, generator=g)
                               for _ in range(groups)))  # fmt: skip
        rows.append(_thin_pair_row(d, p, h, groups))
    return rows


def _thin_pair_row(d, p, h, groups: int) -> dict:
    from pixart_tune import lowrank_triton as lt

    n, r = p.shape
    keep = torch.block_diag(*[torch.ones(n // groups, r // groups, device="cuda")] * groups)
    want_v, want_g = d.float() @ p.float(), (d.float().t() @ h.float()) * keep
    row = {"n": n, "r": r, "groups": groups, "routed": lt.wanted_thin_pair(d, p, h, groups),
           "two_gemms_ms": timed(lambda: (d @ p, d.t() @ h))}  # fmt: skip
    chosen = lt._thin_tiles
    for bn in (64, 128):
        for bm in (64, 128, 256):
            lt._thin_tiles = lambda m, r_all, sms, tiles=(bm, bn): tiles
            try:
                v, dtb = lt.thin_pair(d, p, h, groups)
                row[f"bn{bn}_bm{bm}_err"] = [rel_err(v, want_v), rel_err(dtb, want_g)]
                row[f"bn{bn}_bm{bm}_ms"] = timed(lambda: lt.thin_pair(d, p, h, groups))
            except Exception as exc:  # noqa: BLE001 - a setting that does not compile is reported
                row[f"bn{bn}_bm{bm}_ms"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            finally:
                lt._thin_tiles = chosen
    row["chosen_ms"] = timed(lambda: lt.thin_pair(d, p, h, groups))
    print(json.dumps(row), flush=True)
    return row


def fa4_tiles() -> list[dict]:
    from flash_attn.cute import flash_attn_func
    from flash_attn.cute import interface as fa

    from pixart_tune.fa4 import install_dq_fix

    install_dq_fix()
    batch, heads, tokens, dim = 8, 16, 4096, 72
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(batch, tokens, heads, dim, device="cuda", dtype=torch.bfloat16, generator=g)
                   for _ in range(4))  # fmt: skip
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    # fp32 reference on 2 of the 8 samples (the kernels run the whole batch; errors are per element)
    ref_in = [t[:2].detach().float().transpose(1, 2).requires_grad_() for t in (q, k, v)]
    ref_out = F.scaled_dot_product_attention(*ref_in)
    ref = [t.transpose(1, 2).detach() for t in (ref_out, *torch.autograd.grad(ref_out, ref_in, do[:2].float().transpose(1, 2)))]
    del ref_in, ref_out

    def attention():
        out = flash_attn_func(q, k, v, softmax_scale=dim**-0.5)
        return out[0] if isinstance(out, tuple) else out

    def forward():
        with torch.no_grad():
            attention()

    def forward_backward():
        torch.autograd.grad(attention(), (q, k, v), do)

    def measure(label: str) -> dict:
        try:
            out = attention()
            results = (out, *torch.autograd.grad(out, (q, k, v), do))
        except Exception as exc:  # noqa: BLE001 - a config the kernels reject is a result too
            return {"config": label, "error": f"{type(exc).__name__}: {str(exc)[:160]}"}
        err = [rel_err(a[:2], b) for a, b in zip(results, ref)]
        fwd, total = timed(forward, 20, 3), timed(forward_backward, 20, 3)
        return {"config": label, "fwd_ms": fwd, "bwd_ms": total - fwd, "rel_err_o_dq_dk_dv": err}

    bwd, fwd = fa.BwdConfig, fa.FwdConfig
    # positional BwdConfig: m, n, stages Q/dO/PdS, SdP/dKV/dQ swapAB, atom layouts MSdP/NdKV/MdQ
    backward_configs = {
        "bwd 80x128 dQ_swapAB (its head dim 128 choice)": bwd(80, 128, 2, 2, 2, True, False, True, 1, 2, 1),
        "bwd 64x128, dQ on both warp groups": bwd(64, 128, 2, 2, 2, True, False, False, 1, 2, 1),
        "bwd 64x128, AtomLayoutMdQ 2": bwd(64, 128, 2, 2, 2, True, False, False, 1, 2, 2),
        "bwd 128x128 (its head dim 64 choice)": bwd(128, 128, 2, 2, 2, True, False, False, 1, 2, 2),
        "bwd 64x128, AtomLayoutMSdP 2": bwd(64, 128, 2, 2, 2, True, False, False, 2, 2, 1, dQ_single_wg=True),
        "bwd 64x144": bwd(64, 144, 2, 2, 2, True, False, False, 1, 2, 1, dQ_single_wg=True),
    }
    forward_configs = {
        "fwd 192x128": fwd(192, 128, False, True), "fwd 192x160": fwd(192, 160, False, True),
        "fwd 192x176": fwd(192, 176, False, True), "fwd 128x128 RS": fwd(128, 128, True, True),
        "fwd 128x144 RS": fwd(128, 144, True, True), "fwd 128x176": fwd(128, 176, False, True),
    }  # fmt: skip
    rows = [measure("flash-attn-4's own choice")]
    for name, configs in (("_tile_size_bwd_sm90", backward_configs), ("_tile_size_fwd_sm90", forward_configs)):
        original = getattr(fa, name)
        try:
            for label, config in configs.items():
                setattr(fa, name, lambda *args, _config=config, **kwargs: _config)
                rows.append(measure(label))
                print(json.dumps(rows[-1]), flush=True)
        finally:
            setattr(fa, name, original)
    return rows


def cross_attention(batch: int = 8, queries: int = 4096, keys: int = 120, heads: int = 16, d: int = 72) -> list[dict]:
    from flash_attn.cute import flash_attn_varlen_func
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pixart_tune.fa4 import choose_head_padding

    choose_head_padding(d)  # installs the dq fix where this flash-attn-4 needs it
    g = torch.Generator(device="cuda").manual_seed(0)
    q, do = (torch.randn(batch, queries, heads, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    k, v = (torch.randn(batch, keys, heads, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    kept = torch.linspace(keys, 50, batch, device="cuda").long()
    bias = torch.where(torch.arange(keys, device="cuda") < kept[:, None], 0.0, -10000.0).to(torch.bfloat16)[:, None, :]

    def sdpa():  # what diffusers' AttnProcessor2_0 runs: (B, H, N, D) with the bias broadcast over heads
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=bias[:, None], scale=d**-0.5)  # fmt: skip
        return out.transpose(1, 2), *torch.autograd.grad(out, (q, k, v), do.transpose(1, 2))

    def fa4():  # the kept tokens come first, so a count per sample is the mask
        out = flash_attn_varlen_func(q, k, v, seqused_k=kept.int(), softmax_scale=d**-0.5)
        out = out[0] if isinstance(out, tuple) else out
        return out, *torch.autograd.grad(out, (q, k, v), do)

    backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(backends, set_priority=True):
        want, got = sdpa(), fa4()
        err = max(rel_err(a, b) for a, b in zip(got, want))
        row = {"shape": [batch, queries, keys, heads, d], "sdpa_cudnn_first_ms": timed(sdpa), "fa4_ms": timed(fa4),
               "fa4_vs_sdpa_max_rel_err": err}  # fmt: skip
    print(json.dumps(row), flush=True)
    return [row]


def fp8_gemms(m: int = 32768, r: int = 16) -> list[dict]:
    """train.fp8's pieces at PixArt's shapes: a LoRA linear's GEMM as the bf16 path routes it against the
    fp8 op (one Triton kernel; torch._scaled_mm alone for scale), and what quantising its input costs
    where Inductor fuses it into the producer (norm + modulation, GELU) or runs it on its own."""
    from pixart_tune.fp8 import quantize_rowwise

    rows = [_fp8_row(m, k, n, r, groups) for k, n, groups in ((1152, 3456, 3), (1152, 1152, 1), (1152, 4608, 1),
                                                               (4608, 1152, 1))]  # fmt: skip

    def rand(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)

    def norm_modulate(t, shift, scale):  # a block's norm1 / norm2 with adaLN-single's modulation
        return (F.layer_norm(t.float(), (t.shape[-1],), eps=1e-6) * (1 + scale) + shift).to(torch.bfloat16)

    t, shift, scale = rand(8, m // 8, 1152), rand(8, 1, 1152).float(), rand(8, 1, 1152).float() * 0.1
    hidden = rand(m, 4608)
    producers = {
        "norm_modulate": lambda: norm_modulate(t, shift, scale),
        "norm_modulate+fp8": lambda: (lambda y: (y, *quantize_rowwise(y)))(norm_modulate(t, shift, scale)),
        "gelu_4608": lambda: F.gelu(hidden, approximate="tanh"),
        "gelu_4608+fp8": lambda: (lambda g: (g, *quantize_rowwise(g)))(F.gelu(hidden, approximate="tanh")),
    }
    row = {name: timed(torch.compile(fn)) for name, fn in producers.items()}
    print(json.dumps(row), flush=True)
    return [*rows, {"producers_ms": row}]


def _fp8_row(m: int, k: int, n: int, r: int, groups: int) -> dict:
    from pixart_tune.fp8 import quantize_rowwise
    from pixart_tune.lora_ops import gemm_plus_lowrank, gemm_scaled_plus_lowrank

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    h = torch.randn(m, r * groups, device="cuda", dtype=torch.bfloat16)
    b = torch.block_diag(*[torch.randn(n // groups, r, device="cuda", dtype=torch.bfloat16)
                           for _ in range(groups)]).t()  # (r * groups, N)  # fmt: skip
    (xq, sx), (wq, sw) = quantize_rowwise(x), quantize_rowwise(w)
    row = {"k": k, "n": n, "groups": groups,
           "bf16_op_ms": timed(lambda: gemm_plus_lowrank(x, w.t(), h, b, None, groups)),
           "fp8_op_ms": timed(lambda: gemm_scaled_plus_lowrank(xq, sx, wq, sw, h, b, None, groups)),
           "scaled_mm_alone_ms": timed(lambda: torch._scaled_mm(xq, wq.t(), sx, sw.t(), out_dtype=torch.bfloat16)),
           "quantize_alone_ms": timed(torch.compile(lambda: quantize_rowwise(x)))}  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def cross_attention_fold(batch: int = 8, queries: int = 4096, width: int = 1152, heads: int = 16) -> list[dict]:
    from diffusers.models.attention_processor import Attention
    from peft import LoraConfig, inject_adapter_in_model

    from pixart_tune.lora_fused import fuse_lora_linears

    rows = []
    for method in ("lora", "full"):
        torch.manual_seed(0)
        attn = Attention(width, cross_attention_dim=width, heads=heads, dim_head=width // heads, bias=True,
                         out_bias=True).cuda()  # fmt: skip
        if method == "lora":
            targets = ["to_q", "to_k", "to_v", "to_out.0"]
            attn = inject_adapter_in_model(LoraConfig(r=16, lora_alpha=16, target_modules=targets), attn)
            for name, p in attn.named_parameters():
                p.requires_grad_("lora_" in name)
                if "lora_B" in name:
                    torch.nn.init.normal_(p, std=0.02)
            attn.to(torch.bfloat16)
            fuse_lora_linears(attn)
        x = torch.randn(batch, queries, width, device="cuda", dtype=torch.bfloat16).requires_grad_()
        for keys in (10, 20, 40, 64, 80, 120):
            rows.append(_fold_row(attn, x, keys, method))
    return rows


def _fold_row(attn, x: torch.Tensor, keys: int, method: str) -> dict:
    import copy

    from pixart_tune.cross_attention import FoldedCrossAttention
    from pixart_tune.speed import attention_context

    batch, _, width = x.shape
    ctx = torch.randn(batch, keys, width, device="cuda", dtype=torch.bfloat16)
    kept = torch.linspace(keys, keys // 2, batch, device="cuda").long()  # diffusers' additive mask, (B, 1, L)
    mask = torch.where(torch.arange(keys, device="cuda") < kept[:, None], 0.0, -10000.0)[:, None, :].to(x.dtype)
    dout = torch.randn_like(x)
    # the reference: the same module in fp32 through diffusers' processor
    wide, x32 = copy.deepcopy(attn).float(), x.detach().float().requires_grad_()
    want = _out_and_grads(wide, lambda: wide(x32, encoder_hidden_states=ctx.float(), attention_mask=mask.float()),
                          x32, dout.float())  # fmt: skip
    plain = attn.processor
    row = {"method": method, "keys": keys, "columns": attn.heads * keys}
    for name, processor in (("sdpa", plain), ("folded", FoldedCrossAttention(plain, max_columns=10**9))):
        torch._dynamo.reset()  # static shapes for each row, as the trainer's padded caption lengths give the fold
        attn.set_processor(processor)
        forward = torch.compile(attn)

        def call(forward=forward):
            return forward(x, encoder_hidden_states=ctx, attention_mask=mask)

        with torch.autocast("cuda", dtype=torch.bfloat16), attention_context("cudnn"):  # the trainer's SDPA order
            got = _out_and_grads(attn, call, x, dout)
            row[f"{name}_max_rel_err_vs_fp32"] = {k: rel_err(got[k], want[k]) for k in want}
            row[f"{name}_wall_ms"] = timed(lambda call=call: call().backward(dout))
            row[f"{name}_gpu_ms"], row[f"{name}_kernels"] = kernel_ms(lambda call=call: call().backward(dout), top=8)
    attn.set_processor(plain)
    row["gpu_speedup"] = row["sdpa_gpu_ms"] / row["folded_gpu_ms"]
    print(json.dumps(row), flush=True)
    return row


def linear_gemm_layouts(m: int = 32768) -> list[dict]:
    # (in, out): the joint q/k/v projection, the attention output, FF up, FF down
    return [_layout_row(m, k, n) for k, n in ((1152, 3456), (1152, 1152), (1152, 4608), (4608, 1152))]


def _layout_row(m: int, k: int, n: int) -> dict:
    x, dy = torch.randn(m, k, device="cuda", dtype=torch.bfloat16), torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    row = {"k": k, "n": n, "forward_ms": timed(lambda: torch.addmm(b, x, w.t())),
           "dx_nn_ms": timed(lambda: dy @ w), "dx_nt_ms": timed(lambda: dy @ w.t().contiguous().t()),
           "dw_dyT_x_ms": timed(lambda: dy.t() @ x), "dw_xT_dy_ms": timed(lambda: (x.t() @ dy).t())}  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def quack_gemms(m: int = 32768) -> list[dict]:
    """quack_ops.py's operators against what runs without them, at PixArt's shapes: each plain product
    (cuBLAS, then the operator), and the feed-forward's GELU kernels against cuBLAS plus Inductor's GELU
    (the GELU gradient's also with the up-projection's bias gradient: a sum after it, or in its epilogue)."""
    ops = torch.ops.pixart_tune
    from pixart_tune import quack_ops  # noqa: F401 - registers the operators

    rows = [_quack_row(m, k, n) for k, n in ((1152, 3456), (1152, 1152), (1152, 4608), (4608, 1152))]
    x, dy = torch.randn(m, 1152, device="cuda", dtype=torch.bfloat16), torch.randn(m, 1152, device="cuda", dtype=torch.bfloat16)
    w1 = torch.randn(4608, 1152, device="cuda", dtype=torch.bfloat16) / 1152**0.5
    b1 = torch.randn(4608, device="cuda", dtype=torch.bfloat16) * 0.1
    w2 = torch.randn(1152, 4608, device="cuda", dtype=torch.bfloat16) / 4608**0.5
    gelu = torch.compile(lambda h: F.gelu(h, approximate="tanh"))
    dgelu = torch.compile(lambda dg, h: torch.ops.aten.gelu_backward(dg, h, approximate="tanh"))
    h = torch.addmm(b1, x, w1.t())
    row = {"ff_up_gelu_cublas_inductor_ms": timed(lambda: gelu(torch.addmm(b1, x, w1.t()))),
           "ff_up_gelu_quack_ms": timed(lambda: ops.quack_gelu_linear(x, w1, b1)),
           "ff_down_dx_dgelu_cublas_inductor_ms": timed(lambda: dgelu(dy @ w2, h)),
           "ff_down_dx_dgelu_quack_ms": timed(lambda: ops.quack_gelu_input_grad(dy, w2, h)),
           # with the up-projection's bias gradient: then a sum over dh, or in the kernel's epilogue
           "ff_down_dx_dgelu_db1_quack_then_sum_ms": timed(lambda: ops.quack_gelu_input_grad(dy, w2, h)[0].sum(0, dtype=torch.float32)),
           "ff_down_dx_dgelu_db1_quack_ms": timed(lambda: ops.quack_gelu_input_and_bias_grad(dy, w2, h)),
           "db1_err": rel_err(ops.quack_gelu_input_and_bias_grad(dy, w2, h)[2], dgelu(dy @ w2, h).float().sum(0)),
           "gelu_err": rel_err(ops.quack_gelu_linear(x, w1, b1)[1], gelu(h)),
           "dgelu_err": rel_err(ops.quack_gelu_input_grad(dy, w2, h)[0], dgelu(dy @ w2, h))}  # fmt: skip
    print(json.dumps(row), flush=True)
    return [*rows, row]


def _quack_row(m: int, k: int, n: int) -> dict:
    ops = torch.ops.pixart_tune
    x, dy = torch.randn(m, k, device="cuda", dtype=torch.bfloat16), torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    row = {"k": k, "n": n, "forward_cublas_ms": timed(lambda: torch.addmm(b, x, w.t())),
           "forward_quack_ms": timed(lambda: ops.quack_linear(x, w, b)),
           "dx_cublas_ms": timed(lambda: dy @ w), "dx_quack_ms": timed(lambda: ops.quack_input_grad(dy, w)),
           "forward_err": rel_err(ops.quack_linear(x, w, b), torch.addmm(b, x, w.t())),
           "dx_err": rel_err(ops.quack_input_grad(dy, w), dy @ w)}  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def kcat(m: int = 32768) -> list[dict]:
    return [_kcat_row(m, 1152, 1152, 16, 1), _kcat_row(m, 1152, 3456, 48, 3)]


def _kcat_row(m: int, k: int, n: int, r: int, groups: int) -> dict:
    from pixart_tune import quack_ops  # noqa: F401 - registers the operators
    from pixart_tune.lora_ops import gemm_plus_lowrank

    ops = torch.ops.pixart_tune
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.1
    a = torch.randn(r, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    blocks = [torch.randn(n // groups, r // groups, device="cuda") * 0.1 for _ in range(groups)]
    b = torch.block_diag(*blocks).to(torch.bfloat16)  # (N, r), block diagonal for the joint projection
    h = x @ a.t()  # (M, r)
    pad = -r % 8
    xw = torch.cat([x, h, h.new_zeros(m, pad)], dim=1)  # (M, K + r + pad)
    ww = torch.cat([w, b, b.new_zeros(n, pad)], dim=1)  # (N, K + r + pad)
    want = torch.addmm(bias.float(), x.float(), w.float().t()) + h.float() @ b.float().t()
    row = {"k": k, "n": n, "r": r, "groups": groups,
           "triton_ms": kernel_ms(lambda: gemm_plus_lowrank(x, w.t(), h, b.t(), bias, groups)),
           "quack_kcat_ms": kernel_ms(lambda: ops.quack_linear(xw, ww, bias)),
           "cat_ms": kernel_ms(lambda: torch.cat([x, h, h.new_zeros(m, pad)], dim=1)),
           "quack_base_ms": kernel_ms(lambda: ops.quack_linear(x, w, bias)),
           "cublas_base_ms": kernel_ms(lambda: torch.addmm(bias, x, w.t())),
           "cublas_pair_ms": kernel_ms(lambda: torch.addmm(bias, h, b.t()).addmm_(x, w.t())),
           "triton_err": rel_err(gemm_plus_lowrank(x, w.t(), h, b.t(), bias, groups), want),
           "quack_kcat_err": rel_err(ops.quack_linear(xw, ww, bias), want)}  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def _out_and_grads(module, call, x: torch.Tensor, dout: torch.Tensor) -> dict:
    """One forward and backward: the output, dx and the trainable parameters' gradients, by name."""
    module.zero_grad()
    x.grad = None
    out = call()
    out.backward(dout)
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return {"out": out.detach(), "dx": x.grad.clone(), **grads}


PROBES = {"lora-gemms": lora_gemms, "fa4-tiles": fa4_tiles, "lowrank-triton": lowrank_triton,
          "cross-attention": cross_attention, "fp8-gemms": fp8_gemms, "cross-attention-fold": cross_attention_fold,
          "linear-gemm-layouts": linear_gemm_layouts, "quack-gemms": quack_gemms, "thin-pair": thin_pair,
          "kcat": kcat}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("probe", choices=PROBES)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("these probes time CUDA kernels: run them on a GPU")
    rows = PROBES[args.probe]()
    result = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "probe": args.probe, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
