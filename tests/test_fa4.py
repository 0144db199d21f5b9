"""train.attention=fa4: the attention operator, the self-attention processor, head padding, start-up checks.

FlashAttention-4 itself runs only on Hopper/Blackwell GPUs. On CPU the operator runs its reference
maths and the processor is given an SDPA kernel with the same contract: together they check
everything of ours (the operator's autograd wiring and fake shapes, layout, padding, scale, compile).
"""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch
from conftest import assert_compiled_block_is_one_graph, tiny_forward, tiny_lora

from pixart_tune import fa4
from pixart_tune.config import TrainConfig
from pixart_tune.fa4 import (
    FA4SelfAttention,
    choose_head_padding,
    fa4_installed,
    install_dq_fix,
    padded_attention,
    sdpa_attention,
    use_fa4,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _qkv(d, n=24, seed=0, dtype=torch.float32):
    """Packed (B, N, 3, H, D): q, k, v of batch 2, 3 heads."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, n, 3, 3, d, generator=g, dtype=dtype).requires_grad_()


@pytest.mark.parametrize("d", [72, 64, 16])
def test_padded_attention_equals_unpadded_values_and_grads(d):
    qkv = _qkv(d)
    seen = []

    def kernel(qkv, scale):
        seen.append((qkv.shape[-1], scale))
        return sdpa_attention(qkv, scale)

    out = padded_attention(qkv, kernel)
    ref = sdpa_attention(qkv, d**-0.5)
    assert out.shape == ref.shape == qkv[:, :, 0].shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    go = torch.randn_like(out)
    grad, ref_grad = torch.autograd.grad(out, qkv, go)[0], torch.autograd.grad(ref, qkv, go)[0]
    assert grad.shape == qkv.shape
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
    padded = -(-d // 32) * 32
    assert seen == [(padded, d**-0.5)]  # the kernel saw padded heads and the true scale


def test_sdpa_attention_is_attention_over_b_n_3_h_d():
    qkv = _qkv(8, n=5)
    out = sdpa_attention(qkv, 0.5)
    # per batch and head: softmax(q k^T * scale) v
    qh, kh, vh = (t.detach().permute(0, 2, 1, 3) for t in qkv.unbind(2))
    manual = torch.softmax(qh @ kh.transpose(-1, -2) * 0.5, dim=-1) @ vh
    torch.testing.assert_close(out.detach(), manual.permute(0, 2, 1, 3), rtol=1e-5, atol=1e-6)


def _transformer(tiny_base):
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel.from_pretrained(tiny_base, subfolder="transformer")


def test_processor_on_the_tiny_model_matches_diffusers_attention(tiny_base):
    plain = _transformer(tiny_base)
    fast = copy.deepcopy(plain)
    calls = []

    def kernel(qkv, scale):
        calls.append(qkv.shape)
        return sdpa_attention(qkv, scale)

    assert use_fa4(fast, kernel=kernel) == len(fast.transformer_blocks)
    for block in fast.transformer_blocks:
        assert isinstance(block.attn1.processor, FA4SelfAttention)
        assert not isinstance(block.attn2.processor, FA4SelfAttention)  # cross-attention untouched
    ref, out = tiny_forward(plain), tiny_forward(fast)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    blocks, heads, head_dim = len(fast.transformer_blocks), plain.config.num_attention_heads, plain.config.attention_head_dim
    assert len(calls) == blocks and all(c[2:] == (3, heads, -(-head_dim // 32) * 32) for c in calls)


def test_processor_without_padding_passes_the_true_head_dim(tiny_base):
    plain = _transformer(tiny_base)
    fast = copy.deepcopy(plain)
    calls = []

    def kernel(qkv, scale):
        calls.append(qkv.shape[-1])
        return sdpa_attention(qkv, scale)

    use_fa4(fast, kernel=kernel, pad_multiple=1)
    torch.testing.assert_close(tiny_forward(fast), tiny_forward(plain), rtol=1e-5, atol=1e-5)
    assert set(calls) == {plain.config.attention_head_dim}


def test_choose_head_padding_tries_the_fix_then_pads(monkeypatch):
    events = []
    monkeypatch.setattr(fa4, "install_dq_fix", lambda: events.append("install") or True)
    monkeypatch.setattr(fa4, "_remove_dq_fix", lambda: events.append("remove"))
    assert choose_head_padding(72, check=lambda d: True) == (1, "unpadded") and events == []
    answers = iter([False, True])
    assert choose_head_padding(72, check=lambda d: next(answers)) == (1, "unpadded, with the dq fix")
    assert events == ["install"]
    events.clear()
    multiple, how = choose_head_padding(72, check=lambda d: False)
    assert multiple == fa4.HEAD_MULTIPLE and "padded" in how and events == ["install", "remove"]


def test_install_dq_fix_changes_only_the_hopper_non_swapped_tiling(monkeypatch):
    """Against a stand-in for flash-attn-4's private conversion step (same signature)."""
    seen = []

    def convert(accum, output, scale, cu_seqlens, seqused, arch, dtype, hdim, block_size, *, hdim_multiple_of=32,
                fake_mode=False):  # fmt: skip
        seen.append((arch, hdim_multiple_of))

    convert.compile_cache = {}
    interface = types.SimpleNamespace(_bwd_postprocess_convert=convert)
    cute = types.ModuleType("flash_attn.cute")
    cute.interface = interface
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", interface)
    assert install_dq_fix() and install_dq_fix()  # idempotent: wrapped once
    fixed = interface._bwd_postprocess_convert
    assert fixed is not convert and fixed.compile_cache is convert.compile_cache and fixed.original is convert
    fixed(0, 0, 1.0, None, None, 90, "bf16", 72, 64, hdim_multiple_of=32, fake_mode=False)
    fixed(0, 0, 1.0, None, None, 90, "bf16", 72, 64, hdim_multiple_of=64, fake_mode=False)  # dKV_swapAB: agrees already
    fixed(0, 0, 1.0, None, None, 100, "bf16", 72, 64, hdim_multiple_of=32, fake_mode=False)  # Blackwell: untouched
    assert seen == [(90, 16), (90, 64), (100, 32)]
    assert choose_head_padding(72, check=lambda d: True) == (1, "unpadded, with the dq fix")  # says so
    fa4._remove_dq_fix()
    assert interface._bwd_postprocess_convert is convert


def test_lora_gradients_flow_through_the_processor(tiny_base):
    model = tiny_lora(tiny_base, targets="attention")
    fast = copy.deepcopy(model)
    use_fa4(fast, kernel=sdpa_attention)

    def grads(m):
        m.zero_grad()
        with torch.enable_grad():
            out = m(hidden_states=torch.ones(2, 4, 16, 16), encoder_hidden_states=torch.ones(2, 7, 32) * 0.1,
                    timestep=torch.tensor([10, 700]), encoder_attention_mask=torch.ones(2, 7),
                    added_cond_kwargs={"resolution": torch.tensor([[128.0, 128.0]] * 2),
                                       "aspect_ratio": torch.tensor([[1.0]] * 2)}).sample  # fmt: skip
            out.square().mean().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}

    ref, got = grads(model), grads(fast)
    assert ref.keys() == got.keys() and any("attn1.to_q" in n for n in got)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6, msg=n)


def test_processor_refuses_a_mask_or_cross_attention(tiny_base):
    attn = _transformer(tiny_base).transformer_blocks[0].attn1
    x = torch.randn(1, 4, attn.to_q.in_features)
    proc = FA4SelfAttention(sdpa_attention)
    with pytest.raises(ValueError, match="self-attention without a mask"):
        proc(attn, x, attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="self-attention without a mask"):
        proc(attn, x, encoder_hidden_states=x)


def test_operator_values_and_gradients_are_attentions():
    """The operator (its CPU kernel: the reference maths) and its registered backward against SDPA."""
    qkv = _qkv(8, n=6, dtype=torch.float64)
    out, lse = torch.ops.pixart_tune.flash_attention(qkv, 0.4)
    ref = sdpa_attention(qkv, 0.4)
    torch.testing.assert_close(out, ref)
    q, k, _ = qkv.unbind(2)
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k) * 0.4
    torch.testing.assert_close(lse, scores.logsumexp(-1).float())
    go = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, qkv, go)[0], torch.autograd.grad(ref, qkv, go)[0])


def test_operator_passes_opcheck():
    """Fake shapes and strides, autograd registration, schema: torch.library's own checks."""
    torch.library.opcheck(torch.ops.pixart_tune.flash_attention.default, (_qkv(8, n=6), 0.4))


class _Holder(torch.nn.Module):
    """A one-block stand-in for the transformer (use_fa4 finds `transformer_blocks`)."""

    def __init__(self, block):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList([block])


def _block_inputs(block, tokens, device="cpu", dtype=torch.float32):
    g = torch.Generator(device=device).manual_seed(0)
    dim = block.attn1.to_q.in_features

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    bias = torch.tensor([[0.0] * 5, [0.0] * 3 + [-10000.0] * 2], device=device, dtype=dtype)[:, None, :]
    return randn(2, tokens, dim).requires_grad_(), {"encoder_hidden_states": randn(2, 5, block.attn2.to_k.in_features),
                                                   "encoder_attention_mask": bias, "timestep": randn(2, 6 * dim)}  # fmt: skip


@pytest.mark.parametrize("lora", [False, True])
def test_a_compiled_block_with_the_operator_is_one_graph(tiny_base, lora):
    """No graph break around the attention or in the joint q/k/v projection, plain or with fused LoRA
    linears (fullgraph=True would raise on one): a compiled block is one graph, and compiled and eager
    agree in values and gradients."""
    from pixart_tune.lora_fused import fuse_lora_linears

    if lora:
        model = tiny_lora(tiny_base, targets="attention+ff")
        fuse_lora_linears(model)
        block = model.base_model.model.transformer_blocks[0]
    else:
        block = _transformer(tiny_base).transformer_blocks[0]

    def operator(qkv, scale):  # what _fa4 calls on a GPU (here the operator's CPU kernel runs)
        return torch.ops.pixart_tune.flash_attention(qkv, scale)[0]

    use_fa4(_Holder(block), kernel=operator, pad_multiple=1)
    assert_compiled_block_is_one_graph(block, *_block_inputs(block, 16))


@pytest.mark.skipif(fa4_installed(), reason="flash-attn-4 is installed here")
def test_use_fa4_without_the_package_names_the_fix(tiny_base):
    with pytest.raises(RuntimeError, match="pip install flash-attn-4.*train.attention=cudnn"):
        use_fa4(_transformer(tiny_base))


def test_config_takes_fa4():
    assert TrainConfig(attention="fa4").attention == "fa4"
    with pytest.raises(ValueError):
        TrainConfig(attention="fa3")


HOPPER_FA4 = (
    torch.cuda.is_available()
    and torch.cuda.get_device_capability()[0] >= 9
    and fa4_installed()
)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER_FA4, reason="needs flash-attn-4 and a Hopper/Blackwell GPU")
@pytest.mark.parametrize("d, multiple", [(72, 32), (72, "chosen"), (64, 1)])
def test_fa4_kernel_matches_fp32_attention_on_gpu(d, multiple):
    """PixArt's head dim 72 padded to 96 and as use_fa4 would choose (unpadded where the dq check,
    with the fix if needed, passes), and an unpadded 64, against fp32 math attention."""
    if multiple == "chosen":
        multiple, how = choose_head_padding(d)
        print(how)
    qkv = _qkv(d, n=1024).detach().cuda().bfloat16().requires_grad_()  # FA4 reads q, k, v as strided views
    out = padded_attention(qkv, multiple=multiple)
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, qkv, go)[0].unbind(2)  # dq, dk, dv: written into one buffer's views
    wide = qkv.detach().float().requires_grad_()
    ref = sdpa_attention(wide, d**-0.5)
    ref_grads = torch.autograd.grad(ref, wide, go.float())[0].unbind(2)
    for a, b in zip((out, *grads), (ref, *ref_grads)):
        err = ((a.float() - b).abs().max() / b.abs().max()).item()
        assert err < 2e-2, err  # bf16 inputs; a wrong dq (the unpadded bug) gives ~1.0


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER_FA4, reason="needs flash-attn-4 and a Hopper/Blackwell GPU")
@pytest.mark.parametrize("lora", [False, True])
def test_compiled_block_with_fa4_matches_eager_on_gpu(tiny_base, lora):
    """FA4's operator inside an Inductor-compiled block (one graph) against the same block eager, plain
    and with fused LoRA linears (the joint q/k/v projection; at the tiny LoRA's rank 4 its products run
    on cuBLAS: test_lowrank_triton checks the Triton kernel's block-diagonal form)."""
    from pixart_tune.lora_fused import fuse_lora_linears

    if lora:
        model = tiny_lora(tiny_base, targets="attention+ff")
        fuse_lora_linears(model)
        block = model.base_model.model.transformer_blocks[0].cuda().bfloat16()
    else:
        block = _transformer(tiny_base).transformer_blocks[0].cuda().bfloat16()
    use_fa4(_Holder(block), pad_multiple=1)
    x, kwargs = _block_inputs(block, 1024 if lora else 256, "cuda", torch.bfloat16)
    # Not the key biases: their gradient is zero in exact arithmetic (a key bias shifts all of a query's
    # scores alike, which the softmax ignores), so both sides hold rounding noise only.
    trainable = [p for n, p in block.named_parameters() if p.requires_grad and not n.endswith("to_k.bias")]

    def run(fn):
        out = fn(x, **kwargs)
        return out, *torch.autograd.grad(out.float().square().sum(), [x, *trainable])

    eager = run(block)
    compiled = run(torch.compile(block, fullgraph=True))
    for i, (a, b) in enumerate(zip(compiled, eager)):  # out, dx, then each trainable parameter's gradient
        err = ((a.float() - b.float()).norm() / b.float().norm()).item()  # bf16 both ways: rounding only
        assert err < 2e-2, (i, err)
