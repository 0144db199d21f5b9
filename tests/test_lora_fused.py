"""The fused LoRA linear (lora_fused.py) against peft's own forward: values, gradients, fallbacks."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_forward, tiny_lora
from torch import nn

from pixart_tune.lora_fused import fuse_lora_linears, gemm_plus_lowrank, lora_linear

pytestmark = pytest.mark.usefixtures("one_thread")


def _tensors(bias=True, seed=0, m=10, k=24, n=40, r=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, m, k, generator=g).requires_grad_()
    w = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g) if bias else None
    a = (torch.randn(r, k, generator=g) / k**0.5).requires_grad_()
    bb = torch.randn(n, r, generator=g).requires_grad_()
    return x, w, b, a, bb


@pytest.mark.parametrize("bias", [True, False])
def test_lora_linear_equals_the_formula_with_gradients(bias):
    x, w, b, a, bb = _tensors(bias)
    y = lora_linear(x, w, b, a, bb, 0.5)
    ref = x @ w.t() + (b if bias else 0) + 0.5 * (x @ a.t()) @ bb.t()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, a, bb), dy)
    want = torch.autograd.grad(ref, (x, a, bb), dy)
    for g, r in zip(got, want):
        assert g.shape == r.shape and g.dtype == r.dtype
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_lora_linear_under_bf16_autocast_is_close_and_keeps_fp32_grads():
    x, w, b, a, bb = _tensors(m=64, k=64, n=96, r=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(x, w.bfloat16(), b.bfloat16(), a, bb, 1.0)
    assert y.dtype == torch.bfloat16
    ref = x @ w.t() + b + (x @ a.t()) @ bb.t()
    assert ((y.float() - ref).abs().max() / ref.abs().max()).item() < 2e-2
    y.float().square().mean().backward()
    assert a.grad.dtype == torch.float32 and bb.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


def _loss_and_grads(model, seed=1):
    model.zero_grad()
    out = tiny_forward(model, seed, grad=True)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _lora_linears(model) -> int:
    from peft.tuners.lora.layer import Linear

    return sum(isinstance(m, Linear) for m in model.modules())


@pytest.fixture(scope="module")
def pair(tiny_base):
    plain = tiny_lora(tiny_base, targets="attention+ff")
    fused = copy.deepcopy(plain)
    return plain, fused, fuse_lora_linears(fused)


def test_fused_model_matches_peft_outputs_and_gradients(pair):
    plain, fused, changed = pair
    assert changed == _lora_linears(plain) > 0
    ref_out, ref_grads = _loss_and_grads(plain)
    out, grads = _loss_and_grads(fused)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and any("lora_A" in n for n in grads)
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_fused_model_saves_the_same_adapter(pair):
    from peft import get_peft_model_state_dict

    plain, fused, _ = pair
    a, b = get_peft_model_state_dict(plain), get_peft_model_state_dict(fused)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fusing_twice_changes_nothing_more(pair):
    _, fused, _ = pair
    classes = [type(m) for m in fused.modules()]
    assert fuse_lora_linears(fused) == 0
    assert [type(m) for m in fused.modules()] == classes


def test_disabled_adapter_and_dropout_fall_back_to_peft(pair, tiny_base):
    plain, fused, _ = pair
    with torch.no_grad():
        with plain.disable_adapter():
            ref = tiny_forward(plain)
        with fused.disable_adapter():
            out = tiny_forward(fused)
        assert not torch.allclose(out, tiny_forward(fused), atol=1e-3)  # the adapter does matter
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    dropped = tiny_lora(tiny_base, targets="attention+ff", dropout=0.5)
    fused_dropped = copy.deepcopy(dropped)
    fuse_lora_linears(fused_dropped)
    dropped.eval(), fused_dropped.eval()  # dropout off in eval: peft's path, same result
    torch.testing.assert_close(_loss_and_grads(fused_dropped)[0], _loss_and_grads(dropped)[0], rtol=1e-5, atol=1e-5)


def test_a_trainable_base_weight_falls_back_to_peft(pair):
    plain, fused, _ = pair
    plain, fused = copy.deepcopy(plain), copy.deepcopy(fused)
    for model in (plain, fused):
        model.base_model.model.transformer_blocks[0].attn1.to_q.base_layer.weight.requires_grad_(True)
    ref_out, ref_grads = _loss_and_grads(plain)
    out, grads = _loss_and_grads(fused)
    name = next(n for n in grads if "transformer_blocks.0.attn1.to_q.base_layer.weight" in n)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6)


def test_traces_under_torch_compile_without_graph_breaks():
    layer = nn.Linear(24, 40)
    x, _, _, a, bb = _tensors()

    def forward(x, a, bb):
        return lora_linear(x, layer.weight.detach(), layer.bias.detach(), a, bb, 2.0)

    compiled = torch.compile(forward, backend="aot_eager", fullgraph=True)  # fails on any graph break
    y, ref = compiled(x, a, bb), forward(x, a, bb)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(torch.autograd.grad(y.square().sum(), (x, a, bb)), torch.autograd.grad(ref.square().sum(), (x, a, bb))):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_gemm_plus_lowrank_op_values_and_registration(bias):
    g = torch.Generator().manual_seed(2)
    x, w, h, b = (torch.randn(*shape, generator=g) for shape in [(12, 24), (40, 24), (12, 4), (4, 40)])
    c = torch.randn(40, generator=g) if bias else None
    out = gemm_plus_lowrank(x, w.t(), h, b, c)  # w.t(): the op takes strided views, as the layer passes them
    torch.testing.assert_close(out, x @ w.t() + h @ b + (c if bias else 0), rtol=1e-5, atol=1e-5)
    torch.library.opcheck(gemm_plus_lowrank, (x, w.t(), h, b, c))  # schema, fake tensor, no aliasing


def test_compiled_graphs_sum_in_place_through_the_op():
    """Traced by torch.compile, forward and backward each run the opaque op once and no addmm: an
    out-of-place addmm with a full C is what copies C (the 32 ms a step the op removes)."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    layer = nn.Linear(24, 40)
    x, _, _, a, bb = _tensors()
    backend = AotEagerAndRecordGraphs()
    compiled = torch.compile(lambda x, a, bb: lora_linear(x, layer.weight.detach(), layer.bias.detach(), a, bb, 2.0),
                             backend=backend, fullgraph=True)  # fmt: skip
    compiled(x, a, bb).sum().backward()
    for graph in (*backend.fw_graphs, *backend.bw_graphs):
        code = graph.code
        assert code.count("pixart_tune.gemm_plus_lowrank") == 1 and "aten.addmm" not in code, code


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_matches_peft_under_cuda_autocast(pair):
    """bf16 autocast on the GPU (cuBLAS addmm with a full C): the fused model against peft's."""
    plain, fused, _ = pair
    plain, fused = copy.deepcopy(plain).cuda(), copy.deepcopy(fused).cuda()
    g = torch.Generator().manual_seed(3)
    inputs = dict(hidden_states=torch.randn(2, 4, 16, 16, generator=g).cuda(),
                  encoder_hidden_states=torch.randn(2, 7, 32, generator=g).cuda(), timestep=torch.tensor([10, 700]).cuda(),
                  encoder_attention_mask=torch.ones(2, 7).cuda(),
                  added_cond_kwargs={"resolution": torch.tensor([[128.0, 128.0]] * 2).cuda(),
                                     "aspect_ratio": torch.tensor([[1.0]] * 2).cuda()})  # fmt: skip
    results = []
    for model in (plain, fused):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(**inputs).sample
        out.float().square().mean().backward()
        results.append((out.float(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (ref, ref_grads), (out, grads) = results
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 2e-2
    for n in grads:
        err = ((grads[n] - ref_grads[n]).norm() / ref_grads[n].norm()).item()
        assert err < 3e-2, (n, err)
