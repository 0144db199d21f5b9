"""FP8 base linears: the quantisation, one layer against nn.Linear, and a LoRA'd tiny PixArt.

On a CPU the fallback path runs: the same e4m3 values and scales as `torch._scaled_mm` would get,
dequantised and multiplied in fp32, so the error figures below are those of the fp8 recipe itself.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_forward, tiny_lora
from torch import nn

from pixart_tune.fp8 import E4M3_MAX, FP8Linear, _FP8MatmulFrozenWeight, apply_fp8, quantize_rowwise

pytestmark = pytest.mark.usefixtures("one_thread")

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def frozen_linear(k=96, n=80, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, n).requires_grad_(False)


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
# One layer


def test_fp8_linear_matches_linear_forward_and_input_grad():
    linear = frozen_linear()
    fp8 = FP8Linear.from_linear(linear)
    assert (fp8.in_features, fp8.out_features) == (96, 80) and not fp8.use_scaled_mm  # CPU: fallback
    assert not any(p.requires_grad for p in fp8.parameters())
    assert set(fp8.state_dict()) == {"bias"}  # the fp8 copies are derived, never saved

    torch.manual_seed(1)
    x = torch.randn(4, 16, 96, dtype=torch.bfloat16, requires_grad=True)  # M = 64 tokens
    y = fp8(x)
    x_ref = x.detach().float().requires_grad_()
    y_ref = linear(x_ref)
    grad = torch.randn_like(y_ref)
    y.backward(grad.to(y.dtype))
    y_ref.backward(grad)
    assert y.dtype == torch.bfloat16 and y.shape == (4, 16, 80)
    assert x.grad is not None and x.grad.dtype == torch.bfloat16 and x.grad.shape == x.shape
    # Each operand of each GEMM carries ~2-3% relative rounding (e4m3, per-row scales); measured
    # 0.036 forward and 0.035 backward against the fp32 layer.
    assert rel(y, y_ref) < 0.05
    assert rel(x.grad, x_ref.grad) < 0.05


def test_fp8_linear_returns_what_nn_linear_would():
    fp8 = FP8Linear.from_linear(frozen_linear())
    x = torch.randn(3, 96)
    assert fp8(x).dtype == torch.float32  # fp32 run: peft casts base + LoRA to this dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fp8(x).dtype == torch.bfloat16


def test_scaled_mm_arguments_pass_the_cuda_checks():
    # Meta tensors go through _scaled_mm's shape checks with CUDA's rules (row-major mat1, column-major
    # mat2, dims divisible by 16, fp32 contiguous (M, 1) / (1, N) scales), so a CPU catches a wrong
    # layout of the fast path, forward and backward, including non-contiguous inputs and gradients.
    fp8 = FP8Linear.from_linear(frozen_linear()).to("meta")
    bufs = (fp8.weight_fp8, fp8.weight_scale, fp8.weight_t_fp8, fp8.weight_t_scale)
    for x in (torch.empty(4, 16, 96, device="meta", dtype=torch.bfloat16),
              torch.empty(96, 64, device="meta", dtype=torch.bfloat16).t()):  # fmt: skip
        x.requires_grad_()
        y = _FP8MatmulFrozenWeight.apply(x, *bufs, True)
        assert y.shape == (*x.shape[:-1], 80) and y.dtype == torch.bfloat16
        y.transpose(0, 1).sum().backward()  # a non-contiguous incoming gradient
        assert x.grad.shape == x.shape and x.grad.dtype == torch.bfloat16


def test_scaled_mm_path_equals_the_fallback_on_cpu():
    # torch's CPU build has a row-wise _scaled_mm too: it checks the scale/transpose bookkeeping.
    fp8 = FP8Linear.from_linear(frozen_linear())
    x = torch.randn(64, 96, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(64, 80, dtype=torch.bfloat16)
    results = []
    for fast in (False, True):
        fp8.use_scaled_mm = fast
        x.grad = None
        try:
            y = fp8(x)
        except (RuntimeError, NotImplementedError) as e:
            pytest.skip(f"no row-wise _scaled_mm on this CPU build: {e}")
        y.backward(grad)
        results.append((y, x.grad))
    torch.testing.assert_close(results[1], results[0], rtol=1e-2, atol=1e-2)


def test_dtype_casts_keep_the_fp8_weights():
    linear = frozen_linear()
    fp8 = FP8Linear.from_linear(linear)
    x = torch.randn(8, 96)
    before = fp8(x)
    fp8.to(torch.bfloat16)  # as a `.to(weight_dtype)` of the whole model would
    assert fp8.weight_fp8.dtype == fp8.weight_t_fp8.dtype == torch.float8_e4m3fn
    assert fp8.weight_scale.dtype == fp8.weight_t_scale.dtype == torch.float32
    assert fp8.bias.dtype == torch.bfloat16
    torch.testing.assert_close(fp8(x), before, rtol=0, atol=1e-2)  # only the bias went through bf16


def test_fp8_linear_has_no_weight():
    fp8 = FP8Linear.from_linear(frozen_linear())
    assert getattr(fp8, "weight", None) is None  # peft's device probe for new adapters skips the move
    with pytest.raises(AttributeError, match="fp8"):
        fp8.weight  # noqa: B018


@pytest.mark.parametrize("k, n", [(96, 72), (40, 48)])
def test_from_linear_refuses_sizes_not_multiple_of_16(k, n):
    with pytest.raises(ValueError, match="16"):
        FP8Linear.from_linear(frozen_linear(k, n))


def test_from_linear_refuses_a_trainable_linear():
    with pytest.raises(ValueError, match="frozen"):
        FP8Linear.from_linear(nn.Linear(32, 32))


def test_traces_under_torch_compile_without_graph_breaks():
    # aot_eager: dynamo + AOT autograd (forward and backward graphs) without inductor's compile time.
    fp8 = FP8Linear.from_linear(frozen_linear())
    compiled = torch.compile(fp8, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 8, 96, dtype=torch.bfloat16, requires_grad=True)
    y = compiled(x)
    y.float().square().sum().backward()
    x_eager = x.detach().clone().requires_grad_()
    y_eager = fp8(x_eager)
    y_eager.float().square().sum().backward()
    torch.testing.assert_close(y, y_eager, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, x_eager.grad, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# The tiny PixArt with a LoRA


def _frozen_block_linears(model) -> int:
    """Frozen nn.Linears in the blocks with both sizes multiples of 16 (LoRA A/B are trainable)."""
    blocks = model.base_model.model.transformer_blocks
    return sum(isinstance(m, nn.Linear) and not m.weight.requires_grad and m.in_features % 16 == 0
               and m.out_features % 16 == 0 for m in blocks.modules())  # fmt: skip


@pytest.fixture(scope="module")
def lora_pair(tiny_base):
    model = tiny_lora(tiny_base, targets="attention+ff")
    expected = _frozen_block_linears(model)
    fp8 = copy.deepcopy(model)
    return model, fp8, expected, apply_fp8(fp8)


def _loss(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = model(hidden_states=torch.randn(2, 4, 16, 16, generator=g),
                encoder_hidden_states=torch.randn(2, 7, 32, generator=g), timestep=torch.tensor([10, 700]), encoder_attention_mask=torch.ones(2, 7),
                added_cond_kwargs={"resolution": torch.tensor([[128.0, 128.0]] * 2),
                                   "aspect_ratio": torch.tensor([[1.0]] * 2)}).sample  # fmt: skip
    return out.float().square().mean()


def test_apply_fp8_swaps_every_frozen_block_linear(lora_pair):
    model, fp8, expected, count = lora_pair
    # Tiny PixArt: 2 blocks x (4 self-attn + 4 cross-attn + 2 feed-forward) base linears, all 48/192 wide.
    assert count == expected == 20
    blocks = fp8.base_model.model.transformer_blocks
    assert isinstance(blocks[0].attn1.to_q.base_layer, FP8Linear)
    assert isinstance(blocks[1].ff.net[2].base_layer, FP8Linear)
    assert type(blocks[0].attn1.to_q.lora_A["default"]) is nn.Linear  # adapters untouched
    assert _frozen_block_linears(fp8) == 0
    inner = fp8.base_model.model
    for name in ("caption_projection.linear_1", "adaln_single.linear", "proj_out"):  # outside the blocks
        assert type(inner.get_submodule(name)) is nn.Linear
    assert "transformer_blocks.0.attn1.to_q.base_layer.weight_fp8" in " ".join(
        fp8._ddp_params_and_buffers_to_ignore)  # fmt: skip
    assert apply_fp8(fp8) == 0  # idempotent


def test_lora_still_trains_through_fp8(lora_pair):
    model, fp8, _, _ = lora_pair
    trainable = {n: p for n, p in fp8.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert trainable.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    fp8.zero_grad()
    model.zero_grad()
    _loss(fp8).backward()
    _loss(model).backward()
    ref = dict(model.named_parameters())
    for name, p in trainable.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # All LoRA gradients at once against the fp32 model's: measured 0.02 relative.
    got = torch.cat([p.grad.flatten() for p in trainable.values()])
    want = torch.cat([ref[n].grad.flatten() for n in trainable])
    assert rel(got, want) < 0.1


def test_fp8_model_output_stays_close(lora_pair, tiny_base):
    model, fp8, _, _ = lora_pair
    from diffusers import PixArtTransformer2DModel

    ref = tiny_forward(model).float()  # fp32, no fp8
    no_lora = tiny_forward(PixArtTransformer2DModel.from_pretrained(tiny_base, subfolder="transformer")).float()
    lora_effect = rel(no_lora, ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as training runs (mixed_precision bf16)
        ref_bf16 = tiny_forward(model).float()
        out = tiny_forward(fp8).float()
    # Measured: fp8 + autocast 0.007 from fp32, bf16 autocast alone 0.004, the adapter itself ~0.1. The
    # residual stream dilutes each layer's ~3% error; 0.05 still fails if fp8 dropped the adapter.
    assert lora_effect > 0.05
    assert 1e-4 < rel(out, ref) < 0.05  # the lower bound: the fp8 path really ran
    assert rel(out, ref) < lora_effect / 2
    assert rel(tiny_forward(fp8), ref) < 0.05  # fp32 activations, no autocast
    assert rel(ref_bf16, ref) < 0.05


def test_lora_on_attention_only_swaps_the_plain_ff_linears_too(tiny_base):
    model = tiny_lora(tiny_base, targets="attention")
    assert apply_fp8(model) == 20
    assert isinstance(model.base_model.model.transformer_blocks[0].ff.net[0].proj, FP8Linear)


def test_apply_fp8_refuses_trainable_linears_and_dora(tiny_base):
    from diffusers import PixArtTransformer2DModel

    full = PixArtTransformer2DModel.from_pretrained(tiny_base, subfolder="transformer")  # all trainable
    with pytest.raises(ValueError, match="trainable"):
        apply_fp8(full)
    assert not any(isinstance(m, FP8Linear) for m in full.modules())  # nothing half-converted
    with pytest.raises(ValueError, match="DoRA"):
        apply_fp8(tiny_lora(tiny_base, targets="attention", dora=True))


# --------------------------------------------------------------------------------------------
# Hopper: the real kernel


@pytest.mark.skipif(not HOPPER, reason="row-wise torch._scaled_mm needs a CUDA GPU of compute capability 9.0+")
def test_scaled_mm_matches_the_fallback_on_hopper():
    fp8 = FP8Linear.from_linear(frozen_linear(1152, 4608)).cuda()  # PixArt-XL's ff.net.0.proj
    assert fp8.use_scaled_mm
    torch.manual_seed(2)
    x = torch.randn(2, 1024, 1152, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(2, 1024, 4608, device="cuda", dtype=torch.bfloat16)
    results = []
    for fast in (True, False):
        fp8.use_scaled_mm = fast
        x.grad = None
        y = fp8(x)
        y.backward(grad)
        results.append((y.float(), x.grad.float()))
    (y_fast, dx_fast), (y_ref, dx_ref) = results
    # Same fp8 operands: only accumulation order and the final bf16 rounding differ.
    assert rel(y_fast, y_ref) < 1e-2
    assert rel(dx_fast, dx_ref) < 1e-2
