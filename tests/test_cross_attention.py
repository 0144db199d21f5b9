"""The folded cross-attention (cross_attention.py) against diffusers' processor: values, gradients, fallbacks."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_forward, tiny_lora, tiny_out_and_grads

from pixart_tune.cross_attention import FoldedCrossAttention, fold_cross_attention
from pixart_tune.lora_fused import fuse_lora_linears
from pixart_tune.speed import transformer_blocks

pytestmark = pytest.mark.usefixtures("one_thread")


def _assert_same_training(plain, folded, rtol=1e-4):
    ref_out, ref_grads = tiny_out_and_grads(plain)
    out, grads = tiny_out_and_grads(folded)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=rtol, atol=1e-6, msg=n)
    return grads


class _Counting:
    """Wraps a processor and counts the calls that reach it."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


def _count_plain_calls(model) -> list[_Counting]:
    counters = []
    for block in transformer_blocks(model):
        processor = block.attn2.processor
        processor.plain = _Counting(processor.plain)
        counters.append(processor.plain)
    return counters


def test_folded_lora_model_matches_the_plain_one_with_gradients(tiny_base):
    plain = tiny_lora(tiny_base, targets="attention+ff")
    fuse_lora_linears(plain)
    folded = copy.deepcopy(plain)
    assert fold_cross_attention(folded) == len(transformer_blocks(folded)) > 0
    counters = _count_plain_calls(folded)
    grads = _assert_same_training(plain, folded)
    assert all(c.calls == 0 for c in counters)  # every block folded (7 tokens x the tiny model's heads)
    # the adapters on attn2's q and out projections get their gradient through the folded keys and values
    assert any("attn2.to_q.lora_A" in n for n in grads) and any("attn2.to_out.0.lora_B" in n for n in grads)
    assert all(grads[n].abs().sum() > 0 for n in grads if "attn2" in n)


def test_folded_full_fine_tune_matches_with_weight_and_bias_gradients(tiny_base):
    from diffusers import PixArtTransformer2DModel

    plain = PixArtTransformer2DModel.from_pretrained(tiny_base, subfolder="transformer").requires_grad_(True)
    folded = copy.deepcopy(plain)
    fold_cross_attention(folded)
    grads = _assert_same_training(plain, folded)
    for name in ("attn2.to_q.weight", "attn2.to_q.bias", "attn2.to_out.0.weight", "attn2.to_k.weight"):
        assert grads[f"transformer_blocks.0.{name}"].abs().sum() > 0, name


def test_long_captions_and_unfoldable_layers_run_the_plain_processor_unchanged(tiny_base):
    plain = tiny_lora(tiny_base, targets="attention+ff")  # peft's own forward: not foldable
    unfused = copy.deepcopy(plain)
    fold_cross_attention(unfused)
    fuse_lora_linears(plain)
    too_long = copy.deepcopy(plain)
    fold_cross_attention(too_long, max_columns=8)  # 7 caption tokens x the tiny model's heads > 8
    ref = tiny_forward(plain)
    for model in (unfused, too_long):
        counters = _count_plain_calls(model)
        out = tiny_forward(model)
        assert all(c.calls == 1 for c in counters)
        if model is too_long:
            assert torch.equal(out, ref)  # the very same kernels


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_folded_under_autocast_is_close_and_keeps_fp32_grads(tiny_base, dtype):
    plain = tiny_lora(tiny_base, targets="attention+ff")
    fuse_lora_linears(plain)
    folded = copy.deepcopy(plain)
    fold_cross_attention(folded)
    with torch.autocast("cpu", dtype=dtype):
        ref_out, ref_grads = tiny_out_and_grads(plain)
        out, grads = tiny_out_and_grads(folded)
    assert out.dtype == ref_out.dtype == dtype  # the matmuls ran in the autocast dtype
    assert ((out.float() - ref_out.float()).abs().max() / ref_out.float().abs().max()).item() < 2e-2
    for n in grads:
        assert grads[n].dtype == torch.float32
        if "attn2" in n:
            err = ((grads[n] - ref_grads[n]).norm() / ref_grads[n].norm()).item()
            assert err < 3e-2, (n, err)


def test_fold_refuses_a_cross_attention_it_cannot_represent(tiny_base):
    from diffusers import PixArtTransformer2DModel

    model = PixArtTransformer2DModel.from_pretrained(tiny_base, subfolder="transformer")
    model.transformer_blocks[0].attn2.residual_connection = True
    with pytest.raises(ValueError, match="plain cross-attention"):
        fold_cross_attention(model)
    assert not any(isinstance(b.attn2.processor, FoldedCrossAttention) for b in model.transformer_blocks)



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_folded_on_cuda_is_as_close_to_fp32_as_sdpa(dtype):
    """PixArt's attn2 sizes (16 heads of 72), bf16 or fp16 autocast, fused rank-16 LoRAs: the folded
    processor (fp32 scores from cuBLAS) against an fp32 reference, no further from it than diffusers'."""
    from diffusers.models.attention_processor import Attention
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    attn = Attention(1152, cross_attention_dim=1152, heads=16, dim_head=72, bias=True, out_bias=True)
    attn = inject_adapter_in_model(LoraConfig(r=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), attn)
    for name, p in attn.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    fuse_lora_linears(attn)
    attn = attn.to("cuda", dtype).float()  # weights representable in dtype: the reference sees the same ones
    x, ctx, dout = (torch.randn(*shape, device="cuda") for shape in ((2, 512, 1152), (2, 19, 1152), (2, 512, 1152)))
    mask = torch.zeros(2, 1, 19, device="cuda")
    mask[1, :, 11:] = -10000.0  # the second caption keeps 11 tokens

    def run(low_precision: bool) -> dict:
        attn.zero_grad()
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=dtype, enabled=low_precision):
            out = attn(xi, encoder_hidden_states=ctx, attention_mask=mask)
        out.float().backward(dout)
        grads = {n: p.grad.clone() for n, p in attn.named_parameters() if p.grad is not None}
        return {"out": out.float(), "dx": xi.grad, **grads}

    want, plain = run(False), run(True)
    attn.set_processor(FoldedCrossAttention(attn.processor))
    folded = run(True)
    assert want.keys() == plain.keys() == folded.keys() and len(want) == 2 + 2 * 4  # out, dx, A and B of 4 LoRAs

    def err(got, k):
        return ((got[k] - want[k]).norm() / want[k].norm()).item()

    for k in want:
        assert err(folded, k) < max(2 * err(plain, k), 1e-3), (k, err(folded, k), err(plain, k))


def test_padded_length_rounds_up_to_the_key_multiple():
    from pixart_tune.cross_attention import KEY_MULTIPLE, padded_length

    assert [padded_length(n) for n in (1, KEY_MULTIPLE, KEY_MULTIPLE + 1, 64, 65)] == [
        KEY_MULTIPLE, KEY_MULTIPLE, 2 * KEY_MULTIPLE, 64, 64 + KEY_MULTIPLE]  # fmt: skip


def test_folded_lora_weight_is_built_in_fp32_under_autocast(tiny_base):
    from pixart_tune.cross_attention import _effective_linear

    model = tiny_lora(tiny_base, targets="attention+ff")
    fuse_lora_linears(model)
    layer = transformer_blocks(model)[0].attn2.to_q
    name = layer.active_adapters[0]
    want = layer.base_layer.weight + layer.scaling[name] * (layer.lora_B[name].weight @ layer.lora_A[name].weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the trainer calls the processor
        weight, _ = _effective_linear(layer)
    assert weight.dtype == torch.float32
    torch.testing.assert_close(weight, want, rtol=1e-6, atol=1e-7)
