"""FlashAttention-4 for the self-attention of the transformer blocks (`train.attention: fa4`).

At 1024 px the self-attention (4096 tokens, 16 heads of 72) is the largest cost of a training step
(README "What bounds the training step"). cuDNN runs head dim 72 as slowly as 96: its kernels round
the head up. FlashAttention-4 (`pip install flash-attn-4`, CuTe DSL kernels compiled on first use)
does the forward and backward at this shape in less time on Hopper, measured in scripts/bench.py.

Three things shape this module:
- flash-attn-4 (4.0.0b36 and every earlier 4.0 beta) returns a wrong dq on Hopper for head dims
  that are a multiple of 16 but not of 32 (72 among them): the backward kernel lays its fp32 dq
  accumulator out in head tiles rounded to 16 (80 for 72), the step that converts it to bf16 reads
  tiles rounded to 32 (96). `use_fa4` checks dq against fp32 attention on a small input first. If
  it is wrong, it makes the conversion step use the kernel's tiling (`install_dq_fix`, one argument
  of flash-attn's private `_bwd_postprocess_convert`) and checks again. Only if that fails too are
  the heads zero-padded to a multiple of 32 (exact: zero columns add nothing to q.k, the extra
  output columns are sliced off, the softmax scale stays 1/sqrt(72)), which costs copies and FLOPs.
  On an H100 at 1024 px: cuDNN 6.85 ms, FA4 padded 5.86 ms, FA4 unpadded with the fix 5.06-5.14 ms for
  one layer's forward+backward, dq within bf16 rounding of fp32 attention.
- The kernels are called through an operator (`pixart_tune::flash_attention`, with its backward)
  that torch.compile keeps whole, so a regionally compiled block is one graph, not two around a
  graph break (+4.5% and +5.4% samples/s for the LoRA recipe on two H100s; README, Performance).
  The operator calls flash-attn-4's private `_flash_attn_fwd` and `_flash_attn_bwd`: its public
  function is an autograd.Function, which cannot sit inside an operator. It takes q, k and v packed,
  (B, N, 3, H, D), as the joint q/k/v projection makes them (lora_fused.joint_projection).
- Off CUDA, the operator runs the same maths in fp32 or wider (`_reference_forward`), so its wiring
  (the saved tensors, the backward, the fake shapes torch.compile traces with) is tested on CPU.

The cross-attention (text tokens, masked) does not use FA4. cuDNN does one layer's forward and
backward at batch 8 in 0.68 ms, FA4 with the mask as per-sample key counts (`seqused_k`) in 0.88 ms
(`scripts/probe_kernels.py cross-attention` on an H100), and FA4 with key counts failed a check
against fp32 attention at smaller shapes. For captions up to 64 tokens cross_attention.py folds
the whole cross-attention into a few GEMMs instead; longer ones stay on SDPA.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .lora_fused import joint_projection, lora_linear
from .speed import plain_attention, transformer_blocks

HEAD_MULTIPLE = 32  # pad heads to this when the dq check fails (see the module docstring)


def fa4_installed() -> bool:
    """Whether FlashAttention-4 imports here. A `flash_attn` package alone is not enough: it may be
    FlashAttention-2, which has no `cute` (FA4) module."""
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        import flash_attn.cute  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache  # looked up on every attention call (the raise is not cached)
def _interface():
    """flash-attn-4's interface module, with the two entry points the operator below calls."""
    try:
        from flash_attn.cute import interface
    except ImportError as exc:
        raise RuntimeError(
            "train.attention=fa4 needs FlashAttention-4: pip install flash-attn-4 "
            f"(and a Hopper or Blackwell GPU); or set train.attention=cudnn. ({exc})"
        ) from exc
    if not all(hasattr(interface, f) for f in ("_flash_attn_fwd", "_flash_attn_bwd")):
        raise RuntimeError(
            "this flash-attn-4 lacks _flash_attn_fwd/_flash_attn_bwd (pixart-tune is verified with 4.0.0b36): "
            "pip install flash-attn-4==4.0.0b36, or set train.attention=cudnn"
        )
    return interface


# FA4's forward and backward as operators that torch.compile keeps as opaque nodes of its graph.
# They take q, k and v packed as one qkv (B, N, 3, H, D) tensor, the output of the joint q/k/v
# projection (lora_fused.joint_projection), and the backward returns dqkv in that same layout: FA4
# reads q, k, v as strided views and writes dq, dk, dv into views of one buffer, so neither way
# copies them apart or together (three separate gradients would be concatenated for the joint
# projection's backward: a 226 MB copy a block at batch 8, 1024 px). out (B, N, H, D); lse (B, H, N)
# fp32, the softmax's log-sum-exp that the backward needs.
_LIB = torch.library.Library("pixart_tune", "FRAGMENT")
_LIB.define("flash_attention(Tensor qkv, float scale) -> (Tensor, Tensor)")
_LIB.define("flash_attention_backward(Tensor dout, Tensor qkv, Tensor out, Tensor lse, float scale) -> Tensor")


def _flash_forward(qkv: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    q, k, v = qkv.unbind(2)  # strided views: FA4 reads them in place (it copies only misaligned layouts)
    out, lse, *_ = _interface()._flash_attn_fwd(q, k, v, softmax_scale=scale, return_lse=True)
    return out, lse


def _flash_backward(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, scale: float) -> Tensor:
    dqkv = torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)  # dense, as the fake below says
    dq, dk, dv = dqkv.unbind(2)
    # Through the module attribute: install_dq_fix patches a function this one calls.
    _interface()._flash_attn_bwd(*qkv.unbind(2), out.contiguous(), dout.contiguous(), lse, scale, dq=dq, dk=dk, dv=dv)
    return dqkv


def _wide(t: Tensor) -> Tensor:
    """fp32 for half-precision tensors (what FA4 accumulates in); float64 stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _reference_probs(q: Tensor, k: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """softmax(q k^T * scale), widened: (P (B, H, N, N), lse (B, H, N))."""
    s = torch.einsum("bnhd,bmhd->bhnm", _wide(q), _wide(k)) * scale
    lse = s.logsumexp(-1)
    return (s - lse[..., None]).exp(), lse


def _reference_forward(qkv, scale) -> tuple[Tensor, Tensor]:
    """The maths FA4 implements, widened: the operator's CPU kernel (tests and opcheck run on it)."""
    q, k, v = qkv.unbind(2)
    p, lse = _reference_probs(q, k, scale)
    out = torch.einsum("bhnm,bmhd->bnhd", p, _wide(v))
    return out.to(q.dtype).contiguous(), lse.float()  # dense, as FA4's outputs are


def _reference_backward(dout, qkv, out, lse, scale) -> Tensor:
    """FlashAttention's backward, widened: dS = P * (dO V^T - rowsum(dO * O)), from the recomputed P."""
    q, k, v = qkv.unbind(2)
    p, _ = _reference_probs(q, k, scale)
    do = _wide(dout)
    dv = torch.einsum("bhnm,bnhd->bmhd", p, do)
    dp = torch.einsum("bnhd,bmhd->bhnm", do, _wide(v))
    delta = (do * _wide(out)).sum(-1).transpose(1, 2)  # (B, H, N)
    ds = p * (dp - delta[..., None])
    dq = torch.einsum("bhnm,bmhd->bnhd", ds, _wide(k)) * scale
    dk = torch.einsum("bhnm,bnhd->bmhd", ds, _wide(q)) * scale
    return torch.stack((dq, dk, dv), dim=2).to(qkv.dtype)  # (B, N, 3, H, D), dense


_LIB.impl("flash_attention", _flash_forward, "CUDA")
_LIB.impl("flash_attention_backward", _flash_backward, "CUDA")
_LIB.impl("flash_attention", _reference_forward, "CPU")
_LIB.impl("flash_attention_backward", _reference_backward, "CPU")


@torch.library.register_fake("pixart_tune::flash_attention")
def _(qkv, scale):
    b, n, _, h, d = qkv.shape
    return qkv.new_empty(b, n, h, d), qkv.new_empty(b, h, n, dtype=torch.float32)


@torch.library.register_fake("pixart_tune::flash_attention_backward")
def _(dout, qkv, out, lse, scale):
    return qkv.new_empty(qkv.shape)


def _setup_context(ctx, inputs, output):
    qkv, scale = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)
    ctx.scale = scale
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse):
    if dout is None:  # only lse was used downstream: nothing computed here depends on it
        return None, None
    qkv, out, lse = ctx.saved_tensors
    return torch.ops.pixart_tune.flash_attention_backward(dout, qkv, out, lse, ctx.scale), None


torch.library.register_autograd("pixart_tune::flash_attention", _backward, setup_context=_setup_context)


def _fa4(qkv: Tensor, scale: float) -> Tensor:
    """qkv (B, N, 3, H, D) in, (B, N, H, D) out, through the operator above.

    FA4 takes fp16/bf16 CUDA tensors only; anything else (an fp32 evaluation, say) goes to SDPA.
    """
    if not qkv.is_cuda or qkv.dtype not in (torch.float16, torch.bfloat16):
        return sdpa_attention(qkv, scale)
    return torch.ops.pixart_tune.flash_attention(qkv, scale)[0]


def sdpa_attention(qkv: Tensor, scale: float) -> Tensor:
    """The same contract as _fa4 through torch's SDPA (which wants (B, H, N, D) each)."""
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2)


def padded_attention(qkv: Tensor, kernel=_fa4, multiple: int = HEAD_MULTIPLE) -> Tensor:
    """Attention over qkv (B, N, 3, H, D) with D zero-padded to a multiple of `multiple` for `kernel`.

    `kernel(qkv, scale)` takes the padded (B, N, 3, H, D') tensor and the scale for the true D.
    """
    d = qkv.shape[-1]
    pad = -d % multiple
    out = kernel(F.pad(qkv, (0, pad)) if pad else qkv, d**-0.5)
    return out[..., :d] if pad else out


class FA4SelfAttention:
    """Attention processor for a block's self-attention (diffusers' Attention, no mask, no norms).

    q, k and v come from one joint projection (lora_fused.joint_projection: one GEMM over
    [W_q; W_k; W_v], the LoRAs' terms included) and go to the kernel packed, as they came out. Where
    a projection can't join (DoRA, peft's own LoRA forward), the three run apart and are stacked:
    a copy of q, k and v that the joint path does not make.
    """

    def __init__(self, kernel=_fa4, pad_multiple: int = HEAD_MULTIPLE):
        self.kernel = kernel  # tests pass an SDPA-based kernel to check the layout and padding on CPU
        self.pad_multiple = pad_multiple  # 1 = no padding
        # the plain linears' product (F.linear's signature) and the LoRA one (lora_fused.lora_linear's):
        # quack_gemm.use_quack_gemms swaps in its own
        self.linear, self.lora_linear = F.linear, lora_linear

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, **kwargs) -> Tensor:  # fmt: skip
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("FA4SelfAttention is for self-attention without a mask")
        b, n, _ = hidden_states.shape  # (B, N, C) tokens
        projections = (attn.to_q, attn.to_k, attn.to_v)
        qkv = joint_projection(hidden_states, projections, self.linear, self.lora_linear)  # (B, N, 3C), or None
        if qkv is None:
            qkv = torch.stack([proj(hidden_states) for proj in projections], dim=2)  # (B, N, 3, C)
        qkv = qkv.view(b, n, 3, attn.heads, -1)  # (B, N, 3, H, D)
        out = padded_attention(qkv, self.kernel, self.pad_multiple)  # (B, N, H, D)
        out = out.reshape(b, n, -1).to(qkv.dtype)  # (B, N, C)
        proj = attn.to_out[0]
        out = self.linear(out, proj.weight, proj.bias) if type(proj) is nn.Linear else proj(out)
        return attn.to_out[1](out)  # dropout (identity in PixArt)


def install_dq_fix() -> bool:
    """Make flash-attn-4's dq conversion step on Hopper read the accumulator in the backward kernel's
    head tiling (rounded to 16, not 32). Idempotent; False where this flash-attn-4 has no such step."""
    import inspect

    from flash_attn.cute import interface

    convert = interface._bwd_postprocess_convert
    if getattr(convert, "pixart_tune_dq_fix", False):
        return True
    if "hdim_multiple_of" not in inspect.signature(convert).parameters or not hasattr(convert, "compile_cache"):
        return False

    def fixed(accum, output, scale, cu_seqlens, seqused, arch, *args, hdim_multiple_of=32, **kwargs):
        if arch // 10 == 9 and hdim_multiple_of == 32:  # SM90 without dKV_swapAB: the kernel tiles by 16
            hdim_multiple_of = 16
        return convert(accum, output, scale, cu_seqlens, seqused, arch, *args, hdim_multiple_of=hdim_multiple_of, **kwargs)

    fixed.compile_cache = convert.compile_cache
    fixed.pixart_tune_dq_fix, fixed.original = True, convert
    interface._bwd_postprocess_convert = fixed
    return True


def _dq_fix_installed() -> bool:
    try:
        from flash_attn.cute import interface
    except ImportError:
        return False
    return bool(getattr(interface._bwd_postprocess_convert, "pixart_tune_dq_fix", False))


def _remove_dq_fix() -> None:
    from flash_attn.cute import interface

    original = getattr(interface._bwd_postprocess_convert, "original", None)
    if original is not None:
        interface._bwd_postprocess_convert = original


def dq_is_right(head_dim: int, kernel=_fa4) -> bool:
    """FA4's output and all three gradients at this head dim against fp32 attention, on a small input."""
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(2, 256, 3, 2, head_dim, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    do = torch.randn(2, 256, 2, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
    out = kernel(qkv, head_dim**-0.5)
    got = (out, *torch.autograd.grad(out, qkv, do)[0].unbind(2))
    wide = qkv.detach().float().requires_grad_()
    ref = sdpa_attention(wide, head_dim**-0.5)
    want = (ref, *torch.autograd.grad(ref, wide, do.float())[0].unbind(2))  # out, dq, dk, dv
    return all(((a.float() - b).abs().max() / b.abs().max()).item() < 2e-2 for a, b in zip(got, want))


def choose_head_padding(head_dim: int, check=dq_is_right) -> tuple[int, str]:
    """(pad multiple, how): 1 where FA4 is right unpadded (as is, or with install_dq_fix), else HEAD_MULTIPLE."""
    if check(head_dim):  # right as it is, or with the fix an earlier call installed
        return 1, "unpadded, with the dq fix" if _dq_fix_installed() else "unpadded"
    if install_dq_fix() and check(head_dim):
        return 1, "unpadded, with the dq fix"
    _remove_dq_fix()
    return HEAD_MULTIPLE, f"heads zero-padded to a multiple of {HEAD_MULTIPLE}"


def use_fa4(model: nn.Module, kernel=_fa4, pad_multiple: int | None = None) -> int:
    """Give every block's self-attention (attn1) the FA4 processor. Returns how many were changed.

    Checks that flash-attn-4 imports and the GPU is Hopper or newer first, so a run fails at start-up
    with the fix named, not at its first step; then checks dq at the model's head dim and picks the
    padding (choose_head_padding) unless `pad_multiple` is given.
    """
    blocks = transformer_blocks(model)
    attn = blocks[0].attn1
    if kernel is _fa4:
        _interface()
        if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
            raise RuntimeError("train.attention=fa4 needs a Hopper (sm90) or Blackwell GPU; set train.attention=cudnn")
        if pad_multiple is None:
            head_dim = attn.inner_dim // attn.heads
            pad_multiple, how = choose_head_padding(head_dim)
            if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
                print(f"train.attention=fa4: FlashAttention-4 self-attention, head dim {head_dim}: {how}")
    pad_multiple = HEAD_MULTIPLE if pad_multiple is None else pad_multiple
    for block in blocks:
        attn = block.attn1
        if not plain_attention(attn):
            raise ValueError("FA4SelfAttention supports PixArt's plain self-attention only")
        attn.set_processor(FA4SelfAttention(kernel, pad_multiple))
    return len(blocks)
