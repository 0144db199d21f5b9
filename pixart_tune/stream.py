"""A bf16 residual stream for runs whose adaLN tables are fp32 (full fine-tunes, fp32-weight LoRA).

Each PixArt block modulates with `scale_shift_table (6, C) + t (B, 6C)`. Under bf16 autocast `t` comes
out of a linear in bf16, but a trained table is an fp32 master, so the sum, and with it the shift,
scale and gate, is fp32. The gate multiplies each branch's output before the residual add, so the
whole residual stream (B, N, C) turns fp32 after the first block: every residual add, norm input and
saved activation then moves twice the bytes of a LoRA run's stream, whose bf16 table keeps it bf16.

`bf16_stream_forward` is diffusers' `BasicTransformerBlock.forward` for PixArt's kind of block
(ada_norm_single: no GLIGEN fuser, no positional embedding inside the block, no feed-forward
chunking) with one change: the table is cast to the stream's dtype before the sum. The stream then
stays in the dtype PatchEmbed hands the first block (bf16 under bf16 autocast), as Megatron-LM's
default (no fp32 residual connection) and a LoRA run's blocks do. The master and its gradient stay
fp32: the cast's backward sums into the fp32 gradient. Without autocast the cast is a no-op and the
maths is diffusers' own.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from .speed import transformer_blocks


def bf16_stream_forward(
    self,
    hidden_states: torch.Tensor,  # (B, N, C): bf16 under bf16 autocast
    attention_mask: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,  # (B, L, C) caption tokens
    encoder_attention_mask: torch.Tensor | None = None,
    timestep: torch.Tensor | None = None,  # (B, 6C) from the model's adaln_single
    cross_attention_kwargs: dict | None = None,
    # unused by PixArt's blocks; kept so that diffusers' calls (gradient checkpointing's, positional) bind
    class_labels: torch.Tensor | None = None,
    added_cond_kwargs: dict | None = None,
) -> torch.Tensor:
    kwargs = cross_attention_kwargs or {}
    table = self.scale_shift_table.to(hidden_states.dtype)  # (6, C): the one change from diffusers
    modulation = table[None] + timestep.reshape(hidden_states.shape[0], 6, -1)  # (B, 6, C)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=1)  # (B, 1, C) each

    norm_hidden_states = self.norm1(hidden_states) * (1 + scale_msa) + shift_msa
    attn_output = self.attn1(norm_hidden_states, attention_mask=attention_mask, **kwargs)
    hidden_states = gate_msa * attn_output + hidden_states

    # PixArt's cross-attention reads the stream itself (no norm before it) and is not gated
    attn_output = self.attn2(hidden_states, encoder_hidden_states=encoder_hidden_states,
                             attention_mask=encoder_attention_mask, **kwargs)  # fmt: skip
    hidden_states = attn_output + hidden_states

    norm_hidden_states = self.norm2(hidden_states) * (1 + scale_mlp) + shift_mlp
    return gate_mlp * self.ff(norm_hidden_states) + hidden_states


def _is_plain_pixart_block(block: nn.Module) -> bool:
    """The blocks `bf16_stream_forward` reproduces: every PixArt checkpoint's."""
    return (
        getattr(block, "norm_type", None) == "ada_norm_single"
        and block.pos_embed is None
        and block.attn2 is not None
        and not block.only_cross_attention
        and getattr(block, "fuser", None) is None
        and block._chunk_size is None
    )


def use_bf16_stream(model: nn.Module) -> int:
    """Give every PixArt block of `model` `bf16_stream_forward`; returns how many blocks took it.

    Call before compiling (a compiled block calls whatever its `forward` is then)."""
    blocks = [b for b in transformer_blocks(model) if _is_plain_pixart_block(b)]
    for block in blocks:
        block.forward = types.MethodType(bf16_stream_forward, block)
    return len(blocks)
