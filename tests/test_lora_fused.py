"""The fused LoRA linear (lora_fused.py) against peft's own forward: values, gradients, fallbacks."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_forward, tiny_lora, tiny_out_and_grads
from torch import nn

from pixart_tune import lora_fused
from pixart_tune.lora_fused import fuse_lora_linears, joint_projection, lora_linear
from pixart_tune.lora_ops import gemm_plus_lowrank, thin_pair

pytestmark = pytest.mark.usefixtures("one_thread")


def _tensors(bias=True, seed=0, m=10, k=24, n=40, r=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, m, k, generator=g).requires_grad_()
    w = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g) if bias else None
    a = (torch.randn(r, k, generator=g) / k**0.5).requires_grad_()
    bb = torch.randn(n, r, generator=g).requires_grad_()
    return x, w, b, a, bb


@pytest.mark.parametrize("merged", [False, True])  # dx on the merged weight (many rows) or the low-rank sum
@pytest.mark.parametrize("bias", [True, False])
def test_lora_linear_equals_the_formula_with_gradients(bias, merged, monkeypatch):
    monkeypatch.setattr(lora_fused, "MERGED_INPUT_GRAD_ROWS", 1 if merged else 10**9)
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


@pytest.mark.parametrize("update", [1e-4, 1e-2])  # s B A below W's rounding (early in training), and above it
def test_the_merged_input_gradient_keeps_bf16_accuracy(update):
    """bf16, as training runs: dx = dy (W + s B A) with the merged weight rounded to bf16 is within bf16
    rounding of the exact (fp64) dx, as close as dy W + (dy s B) A is."""
    g = torch.Generator().manual_seed(0)
    m, k, n, r = 256, 256, 384, 16
    w = (torch.randn(n, k, generator=g) * 0.02).bfloat16()  # a frozen weight of PixArt's scale
    a = (torch.randn(r, k, generator=g) / k**0.5).bfloat16()
    b = (torch.randn(n, r, generator=g) * update).bfloat16()  # s B
    dy = torch.randn(m, n, generator=g).bfloat16()
    exact = dy.double() @ (w.double() + b.double() @ a.double())

    def rms_error(dx):
        return ((dx.double() - exact).square().mean().sqrt() / exact.square().mean().sqrt()).item()

    merged, low_rank_sum = dy @ lora_fused.merged_weight(w, b, a), gemm_plus_lowrank(dy, w, dy @ b, a, None)
    assert merged.dtype == torch.bfloat16
    assert rms_error(merged) < 2**-8 and rms_error(merged) < 1.5 * rms_error(low_rank_sum)


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
    ref_out, ref_grads = tiny_out_and_grads(plain)
    out, grads = tiny_out_and_grads(fused)
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
    torch.testing.assert_close(tiny_out_and_grads(fused_dropped)[0], tiny_out_and_grads(dropped)[0], rtol=1e-5, atol=1e-5)


def test_a_trainable_base_weight_falls_back_to_peft(pair):
    plain, fused, _ = pair
    plain, fused = copy.deepcopy(plain), copy.deepcopy(fused)
    for model in (plain, fused):
        model.base_model.model.transformer_blocks[0].attn1.to_q.base_layer.weight.requires_grad_(True)
    ref_out, ref_grads = tiny_out_and_grads(plain)
    out, grads = tiny_out_and_grads(fused)
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


@pytest.mark.parametrize("groups", [1, 2])
def test_thin_pair_op_values_and_registration(groups):
    """thin_pair: (d @ p, d^T @ h in fp32), with groups > 1 only the diagonal blocks of d^T @ h."""
    g = torch.Generator().manual_seed(3)
    d, h = torch.randn(12, 40, generator=g), torch.randn(12, 4 * groups, generator=g)
    p = torch.block_diag(*(torch.randn(40 // groups, 4, generator=g) for _ in range(groups)))
    v, dtb = thin_pair(d, p, h, groups)
    keep = torch.block_diag(*[torch.ones(40 // groups, 4)] * groups)
    torch.testing.assert_close(v, d @ p, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dtb, (d.t() @ h) * keep, rtol=1e-5, atol=1e-5)
    assert dtb.dtype == torch.float32 and v.dtype == d.dtype
    bf = [t.bfloat16() for t in (d, p, h)]
    assert thin_pair(*bf, groups)[1].dtype == torch.float32  # B's gradient in fp32 whatever dy's dtype
    torch.library.opcheck(thin_pair, (d, p, h, groups))  # schema, fake tensor, no aliasing


def test_write_lowrank_fills_the_room_beside_x():
    """beside_room: [x | 0] with rows rounded up to a multiple of 64 values (at least r zero columns);
    write_lowrank_ puts x A^T in the first r of them, in place, leaving x and the padding as they were."""
    from pixart_tune.lora_ops import beside_room, write_lowrank_

    g = torch.Generator().manual_seed(5)
    x, a = torch.randn(12, 24, generator=g), torch.randn(4, 24, generator=g)
    assert beside_room(x, 40).shape == (12, 64) and beside_room(x, 41).shape == (12, 128)
    assert beside_room(torch.randn(3, 1152), 48).shape == (3, 1216)  # PixArt's q/k/v: 19 tiles of 64, as 1200
    xw = beside_room(x, 4)
    assert xw.shape == (12, 64) and torch.equal(xw[:, :24], x) and (xw[:, 24:] == 0).all()
    write_lowrank_(xw, a)
    torch.testing.assert_close(xw[:, 24:28], x @ a.t(), rtol=1e-5, atol=1e-5)
    assert torch.equal(xw[:, :24], x) and (xw[:, 28:] == 0).all()
    torch.library.opcheck(write_lowrank_, (beside_room(x, 4), a))  # schema (the mutation declared), fake


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


def _projections(model, block=1):
    attn = model.base_model.model.transformer_blocks[block].attn1
    return attn.to_q, attn.to_k, attn.to_v


def _joint_against_one_by_one(layers, x):
    """joint_projection and the layers one by one: outputs and the gradients of x and of every
    trainable parameter, for the same upstream gradient."""
    params = [p for layer in layers for p in layer.parameters() if p.requires_grad]
    joint = joint_projection(x, layers)
    assert joint is not None
    apart = torch.cat([layer(x) for layer in layers], dim=-1)
    torch.testing.assert_close(joint, apart, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(apart)
    for got, want in zip(torch.autograd.grad(joint, [x, *params], dy), torch.autograd.grad(apart, [x, *params], dy)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    return params


def test_joint_projection_of_lora_layers_equals_them_one_by_one(pair):
    _, fused, _ = pair
    layers = _projections(fused)
    x = torch.randn(2, 5, layers[0].in_features).requires_grad_()
    params = _joint_against_one_by_one(layers, x)
    assert len(params) == 6  # A and B of q, k and v, all checked


def test_joint_projection_of_a_frozen_layer_among_loras(tiny_base):
    """LoRA on q and v only: k joins as a frozen nn.Linear (a zero-width block of the diagonal)."""
    model = tiny_lora(tiny_base, targets=["to_q", "to_v"])
    fuse_lora_linears(model)
    layers = _projections(model)
    assert type(layers[1]) is nn.Linear and not layers[1].weight.requires_grad
    x = torch.randn(2, 5, layers[0].in_features).requires_grad_()
    assert len(_joint_against_one_by_one(layers, x)) == 4


def test_joint_projection_of_plain_linears_gives_their_weight_gradients():
    """A full fine-tune's q, k, v: one GEMM over the stacked weights, gradients back to each layer."""
    torch.manual_seed(0)
    layers = [nn.Linear(24, 24), nn.Linear(24, 24), nn.Linear(24, 24)]
    x = torch.randn(2, 5, 24).requires_grad_()
    assert len(_joint_against_one_by_one(layers, x)) == 6  # weight and bias of each


def test_joint_projection_declines_what_cannot_join(pair, tiny_base):
    plain, fused, _ = pair
    x = torch.randn(2, 5, _projections(fused)[0].in_features)
    assert joint_projection(x, _projections(plain)) is None  # peft's own forward (train.fused_lora=false)
    with fused.disable_adapter():
        assert joint_projection(x, _projections(fused)) is None
    mixed = [nn.Linear(24, 24), nn.Linear(24, 24, bias=False)]
    assert joint_projection(torch.randn(3, 24), mixed) is None  # a bias on one layer only
    model = tiny_lora(tiny_base, targets=["to_q", "to_v"])
    fuse_lora_linears(model)
    layers = _projections(model)
    layers[1].weight.requires_grad_(True)  # a trainable plain layer beside LoRAs: the fused backward has no dW
    assert joint_projection(x, layers) is None


def test_the_fa4_processor_runs_the_lora_projections_jointly(pair, monkeypatch):
    """With the fused linears, the processor's q, k, v come from joint_projection, one call per block,
    and the model's outputs and gradients equal peft's (the processor given an SDPA kernel on CPU)."""
    from pixart_tune import fa4

    plain, fused, _ = pair
    fast = copy.deepcopy(fused)
    fa4.use_fa4(fast, kernel=fa4.sdpa_attention, pad_multiple=1)
    joined = []
    monkeypatch.setattr(fa4, "joint_projection", lambda x, layers, *linear: joined.append(
        out := joint_projection(x, layers, *linear)) or out)  # fmt: skip
    ref_out, ref_grads = tiny_out_and_grads(plain)
    out, grads = tiny_out_and_grads(fast)
    blocks = len(fast.base_model.model.transformer_blocks)
    assert len(joined) == blocks and all(t is not None for t in joined)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


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
