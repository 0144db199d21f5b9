"""FP8 base weights of a LoRA run: the quantisation, the fused fp8 LoRA linear, apply_fp8 on a tiny PixArt.

On a CPU the fallback path runs: the same e4m3 values and scales as the Triton kernel or
`torch._scaled_mm` would get, dequantised and multiplied in fp32, so the error figures below are those
of the fp8 recipe itself. The Hopper kernel is checked in test_lowrank_triton.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_forward, tiny_lora
from torch import nn

from pixart_tune.fp8 import E4M3_MAX, FP8_LAYERS, FP8Weights, apply_fp8, fp8_mm, quantize_rowwise
from pixart_tune.lora_fused import fuse_lora_linears, joint_projection, lora_linear
from pixart_tune.lora_ops import gemm_scaled_plus_lowrank

pytestmark = pytest.mark.usefixtures("one_thread")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# --------------------------------------------------------------------------------------------
# Quantisation


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_rowwise_round_trip(dtype):
    torch.manual_seed(0)
    t = (torch.randn(64, 96) * torch.logspace(-4, 4, 64)[:, None]).to(dtype)  # rows 8 decades apart
    t[5] = 0.0
    q, scale = quantize_rowwise(t)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (64, 96)
    assert scale.dtype == torch.float32 and scale.shape == (64, 1)
    back = q.float() * scale
    assert not back.isnan().any() and torch.equal(back[5], torch.zeros(96))
    t, amax = t.float(), t.float().abs().amax(-1)
    # Each row's largest value maps onto +-448, so it comes back exactly (up to the fp32 divide).
    torch.testing.assert_close(back.abs().amax(-1), amax, rtol=1e-6, atol=0)
    # 3 mantissa bits: rounding error <= 1/16 of the value in e4m3's normal range (|q| >= 2^-6) ...
    normal = q.float().abs() >= 2**-6
    assert ((back - t).abs() <= t.abs() / 16)[normal].all()
    # ... and no error in a row beyond 1/16 of that row's largest value (measured 1/28: half of 32, the
    # spacing of e4m3's top binade, over 448).
    assert ((back - t).abs().amax(-1) <= amax / 16).all()
    # Along dim 0: one scale per column.
    q0, s0 = quantize_rowwise(t, dim=0)
    assert s0.shape == (1, 96) and q0.float().abs().amax(0).eq(E4M3_MAX).all()


# --------------------------------------------------------------------------------------------
# The fp8 operator and the fused LoRA linear


def _operands(m=64, k=96, n=80, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    h, b, bias = torch.randn(m, r, generator=g), torch.randn(r, n, generator=g), torch.randn(n, generator=g)
    return x, w, h, b, bias


def test_the_operator_is_the_dequantised_product_plus_the_low_rank_term():
    x, w, h, b, bias = _operands()
    (xq, sx), (wq, sw) = quantize_rowwise(x), quantize_rowwise(w)
    y = gemm_scaled_plus_lowrank(xq, sx, wq, sw, h, b, bias)
    want = (xq.float() * sx) @ (wq.float() * sw).t() + h @ b + bias
    assert y.dtype == torch.float32 and y.shape == (64, 80)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gemm_scaled_plus_lowrank(xq, sx, wq, sw, h, b, None), want - bias, rtol=1e-5, atol=1e-5)
    assert rel(y, x @ w.t() + h @ b + bias) < 0.05  # ... which is the bf16 product within fp8's rounding


def test_fp8_mm_bf16_result_on_the_fallback():
    x, w, *_ = _operands()
    (xq, sx), (wq, sw) = quantize_rowwise(x), quantize_rowwise(w)
    y = fp8_mm(xq, sx, wq, sw, torch.bfloat16)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), (xq.float() * sx) @ (wq.float() * sw).t(), rtol=1e-2, atol=1e-2)


def _copies(w: torch.Tensor, forward: bool, backward: bool):
    return FP8Weights(w, forward, backward).as_args()


@pytest.mark.parametrize("forward, backward", [(True, True), (True, False), (False, True)])
def test_fp8_lora_linear_against_the_plain_one(forward, backward):
    x, w, _, _, bias = _operands()
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(4, 96, generator=g) * 0.1, torch.randn(80, 4, generator=g) * 0.1
    grad = torch.randn(64, 80, generator=g)
    results = []
    for fp8 in (None, _copies(w, forward, backward)):
        leaves = [t.clone().requires_grad_() for t in (x, a, b)] + [bias.clone().requires_grad_()]
        y = lora_linear(leaves[0], w, leaves[3], leaves[1], leaves[2], 2.0, fp8=fp8)
        y.backward(grad)
        results.append((y.detach(), *(t.grad for t in leaves)))
    (y0, dx0, da0, db0, dbias0), (y1, dx1, da1, db1, dbias1) = results
    # The direction that runs in fp8 carries its ~3% rounding (measured 0.01-0.02 here); the other one is
    # exactly the plain path's: dx does not depend on y, and y does not depend on the backward.
    assert (rel(y1, y0) > 1e-4) == forward and rel(y1, y0) < 0.05
    assert (rel(dx1, dx0) > 1e-4) == backward and rel(dx1, dx0) < 0.05
    # The adapter's own gradients read x, dy and x A^T, none of them quantised.
    for got, want in ((da1, da0), (db1, db0), (dbias1, dbias0)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fp8", [False, True])
def test_a_trainable_bias_gets_its_gradient_under_autocast(fp8):
    # The bias is cast to the compute dtype inside the op; the fp32 parameter must still get dy summed.
    x, w, _, _, bias = _operands()
    a, b = torch.randn(4, 96) * 0.1, torch.randn(80, 4) * 0.1
    bias = bias.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(x, w, bias, a, b, 2.0, fp8=_copies(w, True, True) if fp8 else None)
    assert y.dtype == torch.bfloat16
    grad = torch.randn_like(y)
    y.backward(grad)
    assert bias.grad is not None and bias.grad.dtype == torch.float32
    torch.testing.assert_close(bias.grad, grad.float().sum(0), rtol=1e-5, atol=1e-5)


def test_fp8_lora_linear_traces_under_torch_compile_without_graph_breaks():
    x, w, _, _, bias = _operands()
    a, b = torch.randn(4, 96) * 0.1, torch.randn(80, 4) * 0.1
    fp8 = _copies(w, True, True)

    def f(x, a, b):
        return lora_linear(x, w, bias, a, b, 2.0, fp8=fp8)

    runs = []
    for fn in (f, torch.compile(f, backend="aot_eager", fullgraph=True)):
        leaves = [t.clone().requires_grad_() for t in (x, a, b)]
        y = fn(*leaves)
        y.square().sum().backward()
        runs.append((y, *(t.grad for t in leaves)))
    for got, want in zip(*runs):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# The tiny PixArt with a LoRA


@pytest.fixture(scope="module")
def lora_pair(tiny_base):
    model = tiny_lora(tiny_base, targets="attention+ff")
    fp8 = copy.deepcopy(model)
    count = apply_fp8(fp8)
    fuse_lora_linears(model)
    fuse_lora_linears(fp8)
    return model, fp8, count


def _loss(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = model(hidden_states=torch.randn(2, 4, 16, 16, generator=g),
                encoder_hidden_states=torch.randn(2, 7, 32, generator=g), timestep=torch.tensor([10, 700]), encoder_attention_mask=torch.ones(2, 7),
                added_cond_kwargs={"resolution": torch.tensor([[128.0, 128.0]] * 2),
                                   "aspect_ratio": torch.tensor([[1.0]] * 2)}).sample  # fmt: skip
    return out.float().square().mean()


def test_apply_fp8_attaches_copies_to_the_listed_layers(lora_pair):
    _, fp8, count = lora_pair
    blocks = fp8.base_model.model.transformer_blocks
    assert count == len(blocks) * len(FP8_LAYERS) == 10  # tiny PixArt: 2 blocks
    for block in blocks:
        for name, layer in block.named_modules():
            held = layer._modules.get("fp8") if hasattr(layer, "_modules") else None
            assert (held is not None) == (name in FP8_LAYERS), name
            if held is not None:
                forward, backward = FP8_LAYERS[name]
                n, k = layer.base_layer.weight.shape
                assert (held.forward_weight is not None) == forward and (held.backward_weight is not None) == backward
                if forward:
                    assert held.forward_weight.shape == (n, k) and held.forward_weight.dtype == torch.float8_e4m3fn
                if backward:
                    assert held.backward_weight.shape == (k, n) and held.backward_scale.shape == (k, 1)
                assert type(layer.base_layer) is nn.Linear  # the bf16 weight stays: merges still work
    assert not any(".fp8." in key for key in fp8.state_dict())  # derived copies: never saved
    ignored = set(fp8._ddp_params_and_buffers_to_ignore)
    buffers = {n for n, _ in fp8.named_buffers() if ".fp8." in n}
    assert ignored == buffers and "base_model.model.transformer_blocks.0.ff.net.2.fp8.backward_weight" in ignored
    assert apply_fp8(fp8) == count  # idempotent
    assert len([m for m in fp8.modules() if isinstance(m, FP8Weights)]) == count


def test_dtype_casts_keep_the_fp8_copies(lora_pair):
    _, fp8, _ = lora_pair
    held = copy.deepcopy(fp8.base_model.model.transformer_blocks[0].ff.net[2].fp8)
    before = [t.clone() for t in (held.forward_weight, held.forward_scale)]
    held.to(torch.bfloat16).half().float()
    assert held.forward_weight.dtype == torch.float8_e4m3fn and held.forward_scale.dtype == torch.float32
    assert torch.equal(held.forward_weight.float(), before[0].float()) and torch.equal(held.forward_scale, before[1])


def test_lora_still_trains_through_fp8(lora_pair):
    model, fp8, _ = lora_pair
    trainable = {n: p for n, p in fp8.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    fp8.zero_grad()
    model.zero_grad()
    _loss(fp8).backward()
    _loss(model).backward()
    ref = dict(model.named_parameters())
    for name, p in trainable.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # All LoRA gradients at once against the plain fused model's: measured 0.014 relative.
    got = torch.cat([p.grad.flatten() for p in trainable.values()])
    want = torch.cat([ref[n].grad.flatten() for n in trainable])
    assert 1e-4 < rel(got, want) < 0.1


def test_fp8_model_output_stays_close(lora_pair, tiny_base):
    model, fp8, _ = lora_pair
    from diffusers import PixArtTransformer2DModel

    ref = tiny_forward(model).float()  # fp32, no fp8
    no_lora = tiny_forward(PixArtTransformer2DModel.from_pretrained(tiny_base, subfolder="transformer")).float()
    lora_effect = rel(no_lora, ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as training runs (mixed_precision bf16)
        ref_bf16 = tiny_forward(model).float()
        out = tiny_forward(fp8).float()
    # The residual stream dilutes each layer's ~3% error; 0.05 still fails if fp8 dropped the adapter.
    assert lora_effect > 0.05
    assert 1e-4 < rel(out, ref) < 0.05  # the lower bound: the fp8 path really ran
    assert rel(out, ref) < lora_effect / 2
    assert rel(tiny_forward(fp8), ref) < 0.05  # fp32 activations, no autocast
    assert rel(ref_bf16, ref) < 0.05


def test_joint_projection_takes_the_stacked_fp8_copies(lora_pair):
    _, fp8, _ = lora_pair
    attn = fp8.base_model.model.transformer_blocks[0].attn1
    layers = (attn.to_q, attn.to_k, attn.to_v)
    x = torch.randn(2, 64, layers[0].in_features, requires_grad=True)
    joint = joint_projection(x, layers)
    apart = torch.cat([layer(x) for layer in layers], dim=-1)  # each layer with its own fp8 copies
    torch.testing.assert_close(joint, apart, rtol=1e-5, atol=1e-5)
    plain = [layer.fp8 for layer in layers]
    try:
        for layer in layers:
            del layer.fp8
        without = joint_projection(x, layers)
    finally:
        for layer, held in zip(layers, plain):
            layer.fp8 = held
    assert 1e-4 < rel(joint, without) < 0.05  # the joint GEMM really ran in fp8


def test_attention_only_lora_gets_copies_on_q_k_v_only(tiny_base):
    model = tiny_lora(tiny_base, targets="attention")
    assert apply_fp8(model) == 6  # 2 blocks x q, k, v; the plain ff linears stay bf16
    assert "fp8" not in model.base_model.model.transformer_blocks[0].ff.net[2]._modules


def test_apply_fp8_refuses_trainable_base_weights_and_dora(tiny_base):
    model = tiny_lora(tiny_base, targets="attention+ff")
    model.base_model.model.transformer_blocks[1].ff.net[2].base_layer.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"transformer_blocks\.1\.ff\.net\.2 has a trainable base weight"):
        apply_fp8(model)
    assert not any(isinstance(m, FP8Weights) for m in model.modules())  # nothing half-attached
    with pytest.raises(ValueError, match="DoRA"):
        apply_fp8(tiny_lora(tiny_base, targets="attention", dora=True))


def test_fp8_config_needs_lora_and_the_fused_linears():
    from pixart_tune.config import TrainConfig

    with pytest.raises(ValueError, match="fp8 is for LoRA"):
        TrainConfig(method="full", fp8=True)
    with pytest.raises(ValueError, match="fused_lora=true"):
        TrainConfig(fp8=True, fused_lora=False)
    assert TrainConfig(fp8=True).fp8


# --------------------------------------------------------------------------------------------
# The fused feed-forward (lora_ff.py)


@pytest.fixture(scope="module")
def ff_pair(lora_pair):
    from pixart_tune.lora_ff import fuse_feed_forwards

    _, fp8, _ = lora_pair
    fused = copy.deepcopy(fp8)
    assert fuse_feed_forwards(fused) == 2  # one FeedForward per block
    return fp8, fused


def _ff(model, block=0):
    return model.base_model.model.transformer_blocks[block].ff


def test_fused_feed_forward_runs_and_matches_the_layer_by_layer_one(lora_pair, ff_pair, monkeypatch):
    from pixart_tune import lora_ff

    plain = lora_pair[0]  # no fp8: the reference
    apart, fused = ff_pair
    calls = []
    real = lora_ff._LoraFeedForward.apply
    monkeypatch.setattr(lora_ff._LoraFeedForward, "apply", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 64, 48, generator=g)
    grad = torch.randn(2, 64, 48, generator=g)
    results = []
    for model in (plain, apart, fused):
        model.zero_grad()
        xi = x.clone().requires_grad_()
        y = _ff(model)(xi)
        y.backward(grad)
        lora = [p.grad for n, p in _ff(model).named_parameters() if "lora_" in n]
        results.append((y, xi.grad, *lora))
    assert calls == [1]  # only the fused model took the function
    # Against the fp32 path, the fused function's fp8 error is that of the layers run apart: only the
    # scales of gelu(h) and its gradient differ (bounds instead of row maxima), and e4m3's relative
    # precision does not depend on the scale. Measured 0.03-0.05 for both, per tensor (tiny widths).
    for want, layered, got in zip(*results):
        assert rel(got, want) < 0.08
        assert rel(got, want) < 1.5 * rel(layered, want) + 0.005


def test_fused_feed_forward_trains_the_tiny_model_like_the_layers(ff_pair):
    apart, fused = ff_pair
    for model in ff_pair:
        model.zero_grad()
        _loss(model).backward()
    got = torch.cat([p.grad.flatten() for n, p in fused.named_parameters() if p.requires_grad])
    want = torch.cat([p.grad.flatten() for n, p in apart.named_parameters() if p.requires_grad])
    assert rel(got, want) < 0.02


def test_fused_feed_forward_steps_aside_where_it_does_not_apply(lora_pair, ff_pair, tiny_base):
    from pixart_tune.lora_ff import fuse_feed_forwards, lora_feed_forward

    _, fused = ff_pair
    x = torch.randn(1, 8, 48)
    assert lora_feed_forward(_ff(fused), x) is not None
    plain = tiny_lora(tiny_base, targets="attention+ff")  # no fp8 copies
    fuse_lora_linears(plain)
    assert fuse_feed_forwards(plain) == 2 and lora_feed_forward(_ff(plain), x) is None
    torch.testing.assert_close(_ff(plain)(x), _ff(plain)._plain_forward(x))  # the usual forward
    ff = copy.deepcopy(_ff(fused)).train()
    ff.net[1].p = 0.1  # dropout on while training: the layers run apart
    assert lora_feed_forward(ff, x) is None and lora_feed_forward(ff.eval(), x) is not None
    ff.net[0].approximate = "none"
    assert lora_feed_forward(ff, x) is None


def test_fused_feed_forward_traces_under_torch_compile_without_graph_breaks(ff_pair):
    _, fused = ff_pair
    ff = _ff(fused, block=1)
    x = torch.randn(2, 16, 48)
    runs = []
    for fn in (ff, torch.compile(ff, backend="aot_eager", fullgraph=True)):
        ff.zero_grad()
        xi = x.clone().requires_grad_()
        y = fn(xi)
        y.square().sum().backward()
        runs.append((y, xi.grad, *(p.grad for n, p in ff.named_parameters() if "lora_" in n)))
    for got, want in zip(*runs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

