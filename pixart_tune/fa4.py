"""FlashAttention-4 for the self-attention of the transformer blocks (`train.attention: fa4`).

At 1024 px the self-attention (4096 tokens, 16 heads of 72) is the largest cost of a training step
(README "What bounds the training step"). cuDNN runs head dim 72 as slowly as 96: its kernels round
the head up. FlashAttention-4 (`pip install flash-attn-4`, CuTe DSL kernels compiled on first use)
does the forward and backward at this shape in less time on Hopper, measured in scripts/bench.py.

Two things shape this module:
- flash-attn-4 4.0.0b36's Hopper backward returns a wrong dq for head dims 72 and 80 (its kernel
  lays out the fp32 dq accumulator in tiles of 80 while the conversion step reads tiles of 96; seen
  on an H100). So the heads are zero-padded to a multiple of 32 and the output sliced back: zero
  columns add nothing to q.k and produce zero output columns, and the softmax scale stays
  1/sqrt(72). The padded path was checked against fp32 math attention on the H100 (GPU test below).
- The kernels are opaque to torch.compile, so the call is excluded from compilation; regional
  compile then compiles each block's graph before and after it (the q/k/v padding fuses into the
  projections' epilogue there).

Cross-attention (120 text tokens, masked) stays on SDPA, where cuDNN is faster at that shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .speed import transformer_blocks

HEAD_MULTIPLE = 32  # pad heads to this (see the module docstring)


def _flash_attn_func():
    try:
        from flash_attn.cute import flash_attn_func
    except ImportError as exc:
        raise RuntimeError(
            "train.attention=fa4 needs FlashAttention-4: pip install flash-attn-4 "
            f"(and a Hopper or Blackwell GPU); or set train.attention=cudnn. ({exc})"
        ) from exc
    return flash_attn_func


@torch.compiler.disable
def _fa4(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """(B, N, H, D) in, (B, N, H, D) out; FA4's own autograd gives the backward.

    FA4 takes fp16/bf16 CUDA tensors only; anything else (an fp32 evaluation, say) goes to SDPA.
    """
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return sdpa_attention(q, k, v, scale)
    out = _flash_attn_func()(q, k, v, softmax_scale=scale)
    return out[0] if isinstance(out, tuple) else out


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """The same contract as _fa4 through torch's SDPA (which wants (B, H, N, D))."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


def padded_attention(q: Tensor, k: Tensor, v: Tensor, kernel=_fa4) -> Tensor:
    """Attention over (B, N, H, D) tensors with D zero-padded to a multiple of HEAD_MULTIPLE for `kernel`.

    `kernel(q, k, v, scale)` takes padded (B, N, H, D') tensors and the scale for the true D.
    """
    d = q.shape[-1]
    pad = -d % HEAD_MULTIPLE
    if pad:
        q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
    out = kernel(q, k, v, d**-0.5)
    return out[..., :d] if pad else out


class FA4SelfAttention:
    """Attention processor for a block's self-attention (diffusers' Attention, no mask, no norms)."""

    def __init__(self, kernel=_fa4):
        self.kernel = kernel  # tests pass an SDPA-based kernel to check the layout and padding on CPU

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, **kwargs) -> Tensor:  # fmt: skip
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("FA4SelfAttention is for self-attention without a mask")
        b, n, _ = hidden_states.shape  # (B, N, C) tokens
        heads = attn.heads
        q, k, v = (proj(hidden_states).view(b, n, heads, -1) for proj in (attn.to_q, attn.to_k, attn.to_v))
        out = padded_attention(q, k, v, self.kernel)  # (B, N, H, D)
        out = attn.to_out[0](out.reshape(b, n, -1).to(q.dtype))
        return attn.to_out[1](out)  # dropout (identity in PixArt)


def use_fa4(model: nn.Module, kernel=_fa4) -> int:
    """Give every block's self-attention (attn1) the FA4 processor. Returns how many were changed.

    Checks that flash-attn-4 imports and the GPU is Hopper or newer first, so a run fails at start-up
    with the fix named, not at its first step.
    """
    if kernel is _fa4:
        _flash_attn_func()
        if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
            raise RuntimeError("train.attention=fa4 needs a Hopper (sm90) or Blackwell GPU; set train.attention=cudnn")
    blocks = transformer_blocks(model)
    for block in blocks:
        attn = block.attn1
        plain = attn.norm_q is None and attn.norm_k is None and attn.spatial_norm is None and attn.group_norm is None
        if not plain or attn.residual_connection or attn.rescale_output_factor != 1.0:
            raise ValueError("FA4SelfAttention supports PixArt's plain self-attention only")
        attn.set_processor(FA4SelfAttention(kernel))
    return len(blocks)
