"""The text cross-attention with its q and out projections folded into the keys and values.

PixArt's cross-attention (attn2 of each block) projects all 4096 image tokens of a 1024 px sample to
queries, attends over the caption's few T5 tokens, and projects the result back:

    out = sum_h softmax(scale (x W_q,h^T + b_q,h) k_h^T) v_h W_o,h^T + b_o      x (N, C), k_h, v_h (L, D)

with W_q,h the head's D rows of W_q (D, C) and W_o,h its D columns of W_o (C, D). The two projections
over the image tokens are the expensive part. Matrix products associate, so they fold into the keys
and values, per sample and head:

    k'_h = scale k_h W_q,h    (L, C)   c_h = scale k_h b_q,h   (L,)    v'_h = v_h W_o,h^T   (L, C)
    out  = softmax_h(x k'^T + c + mask) v' + b_o      x k'^T: (N, H L), the scores of all heads at once

That is two GEMMs of width H L over the image tokens where there were two of width C (1152) plus
the attention kernel; their backward is four of width H L. Captions are padded only to the longest
in the batch (features.py), so for short ones H L is small: 16 x 20 = 320. On an H100 at batch 8,
1024 px, one layer's forward and backward then take 0.71 ms against 1.78 for diffusers' processor
(cuDNN attention, fused LoRA linears), and the two break even near 80 tokens, where H L = 1280
(scripts/probe_kernels.py cross-attention-fold; scripts/results/NOTES.md). So the processor folds up to
`max_columns` (64 tokens) and runs diffusers' processor for longer captions.

The fold is exact maths; only the rounding moves (bf16 k' instead of bf16 q). The scores and their
gradient are kept in fp32, as the fused attention kernels keep them, and the folding itself (small
products of the weights) runs in fp32, so a LoRA on W_q or W_o gets its gradient through k' and v'
in fp32. tests/test_cross_attention.py compares it with diffusers' processor, values and gradients
(and, on a GPU, both against fp32: the fold is no further from it).

Folds where attn2's q and out projections are plain nn.Linear (a full fine-tune, a frozen layer) or
fused vanilla LoRA layers (lora_fused.py); anything else (DoRA, peft's own forward, dropout in the
adapter) runs the plain processor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .lora_fused import compute_dtype, joinable
from .speed import plain_attention, transformer_blocks

# Fold while heads x caption tokens stays at or below this: 64 tokens of PixArt's 16 heads, where the
# fold took 1.48 ms against 1.73 on an H100 (at 80 tokens 1.81 against 1.80; scripts/probe_kernels.py
# cross-attention-fold).
MAX_COLUMNS = 1024
KEY_MULTIPLE = 4  # caption lengths are rounded up to this (padded_length)
MASKED = -10000.0  # the additive bias of a masked key, as diffusers' PixArt makes its mask


def _bmm_fp32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b batched, (B, M, K) @ (B, K, N), accumulated and returned in fp32 (inputs in any dtype)."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        return torch.bmm(a, b, out_dtype=torch.float32)  # cuBLAS writes its fp32 accumulator
    return torch.bmm(a.float(), b.float())


class _FoldedScoresAttention(torch.autograd.Function):
    """softmax over each head's L columns of (x k'^T + bias), times v'; the backward written out so
    that the scores' gradient stays fp32 until the GEMMs that consume it."""

    @staticmethod
    def forward(ctx, x: Tensor, kq: Tensor, vo: Tensor, bias: Tensor, heads: int) -> Tensor:
        # x (B, N, C) compute dtype; kq (B, H L, C) and vo (B, H L, C_out) compute dtype; bias (B, 1, H L) fp32
        b, n, _ = x.shape
        scores = _bmm_fp32(x, kq.transpose(1, 2)) + bias  # (B, N, H L) fp32
        p = torch.softmax(scores.view(b, n, heads, -1), dim=-1).view(b, n, -1).to(x.dtype)  # (B, N, H L)
        ctx.save_for_backward(x, kq, vo, p)
        ctx.heads = heads
        return torch.bmm(p, vo)  # (B, N, C_out)

    @staticmethod
    def backward(ctx, dout: Tensor):
        x, kq, vo, p = ctx.saved_tensors
        b, n, _ = x.shape
        dout = dout.to(x.dtype)
        dp = _bmm_fp32(dout, vo.transpose(1, 2)).view(b, n, ctx.heads, -1)  # (B, N, H, L) fp32
        pf = p.float().view(b, n, ctx.heads, -1)
        ds = (pf * (dp - (pf * dp).sum(-1, keepdim=True))).view(b, n, -1)  # softmax's backward, fp32
        ds16 = ds.to(x.dtype)
        dx = torch.bmm(ds16, kq)  # (B, N, C)
        dkq = _bmm_fp32(ds16.transpose(1, 2), x)  # (B, H L, C) fp32: reduced over N
        dvo = _bmm_fp32(p.transpose(1, 2), dout)  # (B, H L, C_out) fp32
        dbias = ds.sum(1, keepdim=True)  # (B, 1, H L)
        return dx, dkq, dvo, dbias, None


def _effective_linear(layer: nn.Module) -> tuple[Tensor, Tensor | None] | None:
    """(W + s B A, bias) of a plain or fused vanilla LoRA linear, fp32 (C_out, C_in); None where the
    layer can't be folded (lora_fused.joinable)."""
    joined = joinable(layer)
    if joined is None:
        return None
    base, name = joined
    weight = base.weight.float()
    if name is not None:
        lora_b, lora_a = layer.lora_B[name].weight.float(), layer.lora_A[name].weight.float()
        with torch.autocast(weight.device.type, enabled=False):  # the processor runs under autocast: keep fp32
            weight = weight + layer.scaling[name] * (lora_b @ lora_a)  # (C_out, r) @ (r, C_in)
    return weight, None if base.bias is None else base.bias.float()


def padded_length(length: int) -> int:
    """The caption length the fold computes with: `length` rounded up to a multiple of KEY_MULTIPLE.

    Written as comparisons, not arithmetic: under torch.compile a caption length that changes from
    batch to batch is symbolic, and these comparisons become guards that leave a constant, so the
    softmax over each head's keys compiles for a fixed width (a few graphs, one per multiple) instead
    of a dynamic one (Inductor's softmax backward took 0.16 ms instead of 0.03 on an H100 at 20 tokens)."""
    padded = KEY_MULTIPLE
    while length > padded:
        padded += KEY_MULTIPLE
    return padded


def folded_cross_attention(x: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, q_proj: tuple, out_proj: tuple,
                           heads: int, dtype: torch.dtype) -> Tensor:  # fmt: skip
    """The cross-attention with W_q and W_o folded into the keys and values (module docstring).

    x (B, N, C) image tokens; k, v (B, L, H D) the caption's keys and values; mask None or diffusers'
    additive bias (B, 1, L); q_proj = (W_q (H D, C), b_q or None), out_proj = (W_o (C_out, H D), b_o
    or None), fp32. Returns (B, N, C_out) in `dtype`, the dtype the matmuls run in.
    """
    b, length, _ = k.shape
    wq, bq = q_proj
    wo, bo = out_proj
    d = wq.shape[0] // heads
    scale = d**-0.5
    keys = padded_length(length)  # L' >= L: the padding keys are masked out below
    with torch.autocast(x.device.type, enabled=False):  # fp32 folding, the rest in `dtype`, all explicit
        kf = F.pad(k.float(), (0, 0, 0, keys - length)).view(b, keys, heads, d)  # (B, L', H, D)
        vf = F.pad(v.float(), (0, 0, 0, keys - length)).view(b, keys, heads, d)
        kq = torch.einsum("blhd,hdc->bhlc", kf, wq.view(heads, d, -1)) * scale  # (B, H, L', C)
        vo = torch.einsum("blhd,chd->bhlc", vf, wo.view(wo.shape[0], heads, d))  # (B, H, L', C_out)
        if bo is not None:  # each head's softmax row sums to 1, so P v' + b_o = P (v' + b_o / H): no pass over the output
            vo = vo + bo / heads
        bias = (mask.float().view(b, 1, length) if mask is not None else kf.new_zeros(b, 1, length))
        bias = F.pad(bias, (0, keys - length), value=MASKED)  # (B, 1, L')
        if bq is not None:
            bias = bias + torch.einsum("blhd,hd->bhl", kf, bq.view(heads, d)) * scale  # (B, H, L')
        bias = bias.expand(b, heads, keys).reshape(b, 1, heads * keys)
        return _FoldedScoresAttention.apply(x.to(dtype), kq.reshape(b, heads * keys, -1).to(dtype),
                                            vo.reshape(b, heads * keys, -1).to(dtype), bias, heads)  # fmt: skip


class FoldedCrossAttention:
    """Attention processor for a block's cross-attention (attn2): the folded form up to `max_columns`
    heads x caption tokens where the q and out projections allow it, else `plain` (the processor the
    module had)."""

    def __init__(self, plain, max_columns: int = MAX_COLUMNS):
        self.plain = plain
        self.max_columns = max_columns

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **kwargs) -> Tensor:  # fmt: skip
        # The longest caption folded: a multiple of KEY_MULTIPLE. One comparison, so that under torch.compile
        # longer captions keep a single graph for diffusers' processor (padded_length would add a guard per multiple).
        longest = self.max_columns // attn.heads // KEY_MULTIPLE * KEY_MULTIPLE
        foldable = encoder_hidden_states is not None and encoder_hidden_states.shape[1] <= longest
        foldable = foldable and hidden_states.ndim == 3 and (attention_mask is None or attention_mask.ndim == 3)
        q_proj, out_proj = (_effective_linear(attn.to_q), _effective_linear(attn.to_out[0])) if foldable else (None, None)
        if q_proj is None or out_proj is None:
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        k, v = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)  # (B, L, H D)
        out = folded_cross_attention(hidden_states, k, v, attention_mask, q_proj, out_proj, attn.heads,
                                     compute_dtype(hidden_states))  # fmt: skip
        return attn.to_out[1](out)  # dropout (identity in PixArt)


def fold_cross_attention(model: nn.Module, max_columns: int = MAX_COLUMNS) -> int:
    """Give every block's cross-attention (attn2) the folded processor. Returns how many were changed."""
    attns = [block.attn2 for block in transformer_blocks(model) if getattr(block, "attn2", None) is not None]
    if not all(plain_attention(attn) and not attn.norm_cross for attn in attns):  # all checked before any is changed
        raise ValueError("FoldedCrossAttention supports PixArt's plain cross-attention only")
    attns = [attn for attn in attns if not isinstance(attn.processor, FoldedCrossAttention)]
    for attn in attns:
        attn.set_processor(FoldedCrossAttention(attn.processor, max_columns))
    return len(attns)
