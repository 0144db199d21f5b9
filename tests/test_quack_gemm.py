"""train.quack_gemms (quack_gemm.py): the feed-forward and projection functions against the plain modules.

quack's kernels run only on Hopper GPUs. Elsewhere the operators run their PyTorch maths, which
checks everything of ours: the autograd functions' gradients and dtypes, the processor and
feed-forward wiring, the operators' fake shapes under torch.compile, and the trainer's switch. The
GPU test compares quack's kernels themselves with fp32.
"""

from __future__ import annotations

import copy
import re
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, assert_compiled_block_is_one_graph, tiny_lora, tiny_out_and_grads
from torch.utils._python_dispatch import TorchDispatchMode

from pixart_tune import quack_gemm, quack_ops
from pixart_tune.fa4 import sdpa_attention, use_fa4
from pixart_tune.quack_gemm import quack_linear, use_quack_gemms
from pixart_tune.quack_ops import quack_runs_on

pytestmark = pytest.mark.usefixtures("one_thread")
OPS = ("quack_linear", "quack_input_grad", "quack_gelu_linear", "quack_gelu_input_grad", "quack_gelu_input_and_bias_grad",
       "quack_gemm_plus_lowrank")


def _fast(tiny_base, quack: bool):
    from diffusers import PixArtTransformer2DModel

    model = PixArtTransformer2DModel.from_pretrained(tiny_base, subfolder="transformer").requires_grad_(True)
    use_fa4(model, kernel=sdpa_attention, pad_multiple=1)
    if quack:
        assert use_quack_gemms(model) == 2 * len(model.transformer_blocks)  # each feed-forward and processor
    return model


class _OpCounter(TorchDispatchMode):
    """Counts the calls of our operators."""

    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "pixart_tune" and func._opname in OPS:
            self.calls[func._opname] += 1
        return func(*args, **(kwargs or {}))


def test_on_the_tiny_model_it_is_the_plain_models_maths(tiny_base):
    """fp32, no autocast: with the feed-forwards and FA4's projections on the operators, the output and
    every gradient are the plain modules' (the same products, in other calls); and every product of
    those layers went through the operators, forward and backward."""
    ref, model = _fast(tiny_base, quack=False), _fast(tiny_base, quack=True)
    assert all(b.attn1.processor.linear is quack_linear for b in model.transformer_blocks)
    assert use_quack_gemms(model) == 0  # installed once
    ref_out, ref_grads = tiny_out_and_grads(ref)
    with _OpCounter() as counter:
        out, grads = tiny_out_and_grads(model)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # per block: forward q/k/v (joint), out and FF down, FF up with its GELU; backward the input
    # gradients of q/k/v, out and FF up, and FF down's through the GELU with FF up's bias gradient
    blocks = len(model.transformer_blocks)
    assert counter.calls == {"quack_linear": 3 * blocks, "quack_gelu_linear": blocks,
                             "quack_input_grad": 3 * blocks, "quack_gelu_input_and_bias_grad": blocks}  # fmt: skip


@pytest.mark.parametrize("joined", [False, True])
@pytest.mark.parametrize("rank", [4, 8])
def test_lora_feed_forwards_give_the_fused_lora_layers_maths(tiny_base, rank, joined, monkeypatch):
    """LoRA on attention and feed-forward (fused linears, as the trainer runs them), fp32: with the
    feed-forwards on _LoraGeluFeedForward the output and the adapters' gradients are the fused
    layers' own. The self-attention's q/k/v projection joins its adapter to quack's reduction
    (_JoinedLoraLinear) where there are rows enough (`joined`: the tiny model's few rows made enough);
    else it, like the out projection, keeps lora_fused's kernels (no quack_linear)."""
    from pixart_tune.lora_fused import fuse_lora_linears

    if joined:
        monkeypatch.setattr(quack_gemm, "MIN_ROWS", 1)

    ref = tiny_lora(tiny_base, targets="attention+ff", rank=rank)
    fuse_lora_linears(ref)
    use_fa4(ref, kernel=sdpa_attention, pad_multiple=1)
    fast = copy.deepcopy(ref)
    assert use_quack_gemms(fast) == 2 * len(fast.base_model.model.transformer_blocks)
    ref_out, ref_grads = tiny_out_and_grads(ref)
    with _OpCounter() as counter:
        out, grads = tiny_out_and_grads(fast)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and any("ff" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    blocks = len(fast.base_model.model.transformer_blocks)
    # per block: the up-projection with its GELU, forward and backward; the down-projection's forward
    # adding into the adapter's term; the up-projection's input gradient on the merged weight
    assert counter.calls == {"quack_gelu_linear": blocks, "quack_gelu_input_grad": blocks,
                             "quack_gemm_plus_lowrank": blocks, "quack_input_grad": blocks,
                             **({"quack_linear": blocks} if joined else {})}  # fmt: skip


def _lora_operands(m=64, k=32, n=3 * 24, r=3 * 4, groups=3, seed=0):
    """x (m, k) and a joint projection's frozen weight, bias, stacked A and block-diagonal scaled B."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    weight, bias = torch.randn(n, k, generator=g) / k**0.5, torch.randn(n, generator=g) * 0.1
    lora_a = torch.randn(r, k, generator=g) / k**0.5
    lora_b = torch.block_diag(*(torch.randn(n // groups, r // groups, generator=g) for _ in range(groups)))
    return x, weight, bias, lora_a, lora_b


@pytest.mark.parametrize("groups", [1, 3])
def test_joined_lora_linear_is_lora_linears_maths(groups, monkeypatch):
    """fp32: [x | x A^T] [W | s B]^T + b and its backward give lora_fused.lora_linear's output and
    gradients (x, A, B), through quack_linear once; with fewer rows than quack takes, lora_linear runs."""
    from pixart_tune.lora_fused import lora_linear

    operands = _lora_operands(r=4 * groups, n=24 * groups, groups=groups)
    want = _lora_out_and_grads(lora_linear, *operands, groups)
    monkeypatch.setattr(quack_gemm, "MIN_ROWS", operands[0].shape[0])
    with _OpCounter() as counter:
        got = _lora_out_and_grads(quack_gemm.joined_lora_linear, *operands, groups)
    assert counter.calls == {"quack_linear": 1}
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(quack_gemm, "MIN_ROWS", operands[0].shape[0] + 1)
    with _OpCounter() as counter:
        _lora_out_and_grads(quack_gemm.joined_lora_linear, *operands, groups)
    assert not counter.calls


def test_lora_linears_give_a_trainable_bias_its_gradient_and_refuse_a_trainable_weight(monkeypatch):
    """Both LoRA linears (joined, and lora_fused's): a bias that requires grad gets dy summed over the
    tokens; a base weight that requires grad stops the backward with an error instead of a wrong zero."""
    from pixart_tune.lora_fused import lora_linear

    x, weight, bias, lora_a, lora_b = _lora_operands(r=4, n=24, groups=1)
    monkeypatch.setattr(quack_gemm, "MIN_ROWS", x.shape[0])  # the joined function runs, not its fallback
    dy = torch.randn(x.shape[0], weight.shape[0], generator=torch.Generator().manual_seed(2))
    for fn in (quack_gemm.joined_lora_linear, lora_linear):
        trainable_bias = bias.clone().requires_grad_()
        out = fn(x, weight, trainable_bias, lora_a.clone().requires_grad_(), lora_b, 0.5)
        (grad_bias,) = torch.autograd.grad(out, [trainable_bias], dy)
        torch.testing.assert_close(grad_bias, dy.sum(0))
        out = fn(x, weight.clone().requires_grad_(), bias, lora_a.clone().requires_grad_(), lora_b, 0.5)
        with pytest.raises(RuntimeError, match="keeps its base weight frozen"):
            out.backward(dy)


def _lora_out_and_grads(fn, x, weight, bias, lora_a, lora_b, groups, scaling=0.5):
    """fn (lora_linear's signature) on x as (2, M/2, K): the output and the gradients of x, A and B for
    a fixed output gradient."""
    dy = torch.randn(x.shape[0], weight.shape[0], generator=torch.Generator().manual_seed(1)).to(x)
    leaves = [t.clone().requires_grad_() for t in (x, lora_a, lora_b)]
    out = fn(leaves[0].view(2, -1, x.shape[1]), weight, bias, leaves[1], leaves[2], scaling, groups)
    return out.reshape(dy.shape), *torch.autograd.grad(out, leaves, dy.view(out.shape))


def test_under_bf16_autocast_fp32_masters_get_fp32_gradients(tiny_base):
    """fp32 masters under CPU bf16 autocast, as a full fine-tune runs: the products run in bf16 (the
    output is bf16, as autocast's linear gives it), the parameters' gradients come back fp32 and close
    to the plain path's."""
    ref, model = _fast(tiny_base, quack=False), _fast(tiny_base, quack=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_out, ref_grads = tiny_out_and_grads(ref)
        out, grads = tiny_out_and_grads(model)
    assert out.dtype == ref_out.dtype
    assert (out.float() - ref_out.float()).abs().max() <= 0.02 * ref_out.float().abs().max()
    for name in grads:
        assert grads[name].dtype == torch.float32, name
    flat = [torch.cat([g.flatten() for g in d.values()]) for d in (grads, ref_grads)]
    assert F.cosine_similarity(*flat, dim=0) > 0.999


def test_frozen_layers_get_no_weight_gradients():
    """A frozen feed-forward (a LoRA run's, say): the input gets its gradient, the weights none."""
    from diffusers.models.attention import FeedForward

    ff = FeedForward(32, activation_fn="gelu-approximate")
    ff.requires_grad_(False)
    x = torch.randn(3, 5, 32, requires_grad=True)
    out = quack_gemm.quack_feed_forward(ff, x)
    torch.testing.assert_close(out, ff(x), rtol=1e-5, atol=1e-6)
    (dx,) = torch.autograd.grad(out.square().sum(), [x])
    (ref_dx,) = torch.autograd.grad(ff(x).square().sum(), [x])
    torch.testing.assert_close(dx, ref_dx, rtol=1e-5, atol=1e-6)


def test_feed_forwards_it_does_not_cover_run_their_own_forward():
    """Another activation, or dropout that is active, and the feed-forward runs as before."""
    from diffusers.models.attention import FeedForward

    assert quack_gemm.quack_feed_forward(FeedForward(32, activation_fn="gelu"), torch.randn(2, 32)) is None
    dropping = FeedForward(32, activation_fn="gelu-approximate", dropout=0.1).train()
    assert quack_gemm.quack_feed_forward(dropping, torch.randn(2, 32)) is None
    assert quack_gemm.quack_feed_forward(dropping.eval(), torch.randn(2, 32)) is not None


@pytest.mark.parametrize("op", OPS)
def test_operators_pass_opcheck(op):
    """Schema, fake shapes and the CompositeExplicitAutograd registration, as torch.compile relies on."""
    g = torch.Generator().manual_seed(0)
    x, w, dy = (torch.randn(*s, generator=g) for s in ((6, 8), (16, 8), (6, 16)))
    args = {"quack_linear": (x, w, torch.randn(16, generator=g)), "quack_input_grad": (dy, w),
            "quack_gelu_linear": (x, w, None), "quack_gelu_input_grad": (dy, w, torch.randn(6, 8, generator=g)),
            "quack_gelu_input_and_bias_grad": (dy, w, torch.randn(6, 8, generator=g)),
            "quack_gemm_plus_lowrank": (x, w.t(), torch.randn(6, 4, generator=g), torch.randn(4, 16, generator=g),
                                        torch.randn(16, generator=g))}[op]  # fmt: skip
    torch.library.opcheck(getattr(torch.ops.pixart_tune, op).default, args)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])])  # fmt: skip
def test_inductor_writes_x_where_its_lowrank_joins_it(device):
    """What the joined reductions rely on, compiled by Inductor: a norm's output x joined with its
    rank-r projection ([x | x A^T]: beside_room, then write_lowrank_; PixArt's q/k/v widths) is written
    by the norm's own kernel into the joined buffer, and write_lowrank_ fills that buffer in place: no
    kernel copies x or the buffer (a copy costs about what the joined GEMM saves on the GPU, where
    Inductor would pad a row of 1200 values and copy the padded buffer for the operator). Values
    equal eager's."""
    from torch._inductor.utils import run_and_get_code

    from pixart_tune.lora_ops import beside_room, write_lowrank_

    def joined(h, a):  # h (M, K), a (r, K)
        x = F.layer_norm(h, (h.shape[1],)) * 1.5 + 0.25
        xw = beside_room(x, a.shape[0])
        write_lowrank_(xw, a)
        return xw

    g = torch.Generator().manual_seed(0)
    h, a = torch.randn(4096, 1152, generator=g).to(device), (torch.randn(48, 1152, generator=g) / 32).to(device)
    torch._dynamo.reset()
    got, (code,) = run_and_get_code(torch.compile(joined, fullgraph=True), h, a)
    torch.testing.assert_close(got, joined(h, a), rtol=1e-4, atol=1e-4)
    assert got.shape == (4096, 1216) and got.stride() == (1216, 1) and (got[:, 1200:] == 0).all()
    kernels = re.findall(r"^(\w+) = async_compile\.(?:cpp_pybinding|triton)\(", code, flags=re.M)
    # the norm's kernel writing x (with the zeros, or a second small kernel for them on the GPU)
    assert 1 <= len(kernels) <= 2 and not any("write_lowrank" in k for k in kernels), code
    assert "write_lowrank_.default(buf" in code and "clone" not in code, code


@pytest.mark.parametrize("lora", [False, True, "joined"])
def test_a_compiled_block_is_one_graph(tiny_base, lora, monkeypatch):
    """No graph break in the feed-forward or the projections, plain or with fused LoRA linears (and the
    joined q/k/v projection, its in-place write_lowrank_ included): a compiled block is one graph,
    and compiled and eager agree."""
    from pixart_tune.lora_fused import fuse_lora_linears

    if lora == "joined":
        monkeypatch.setattr(quack_gemm, "MIN_ROWS", 1)
    if lora:
        model = tiny_lora(tiny_base, targets="attention+ff", rank=8)
        fuse_lora_linears(model)
        use_fa4(model, kernel=sdpa_attention, pad_multiple=1)
        use_quack_gemms(model)
        block = model.base_model.model.transformer_blocks[0]
    else:
        block = _fast(tiny_base, quack=True).transformer_blocks[0]
    dim = block.attn1.to_q.in_features
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, dim, generator=g, requires_grad=True)
    kwargs = {"encoder_hidden_states": torch.randn(2, 5, block.attn2.to_k.in_features, generator=g),
              "timestep": torch.randn(2, 6 * dim, generator=g)}  # fmt: skip
    assert_compiled_block_is_one_graph(block, x, kwargs)


@pytest.mark.parametrize(
    "settings, installed",
    [(["train.mixed_precision=bf16"], True),  # the default: on where quack runs
     (["train.mixed_precision=bf16", "train.quack_gemms=false"], False),
     (["train.mixed_precision=no"], False)],  # fp32: quack's kernels take 16-bit operands only
)  # fmt: skip
def test_the_trainer_uses_it_where_quack_runs(settings, installed, tmp_path, tiny_home, monkeypatch):
    """Through train(), with quack made to look present (its operators then run their PyTorch maths on
    CPU): installed exactly when asked for under 16-bit mixed precision, and the run finishes."""
    from pixart_tune import train

    counts, original = [], quack_gemm.use_quack_gemms
    monkeypatch.setattr(quack_ops, "quack_runs_on", lambda device: True)
    monkeypatch.setattr(quack_ops, "quack_problem", lambda: None)  # its check needs the GPU
    monkeypatch.setattr(quack_gemm, "use_quack_gemms", lambda model: counts.append(original(model)) or counts[-1])
    # attention=math: on a Hopper GPU with flash-attn-4, auto would take FA4, whose projections go on quack too
    train(REPO / "recipes" / "tiny-lora.yaml", [f"output_dir={tmp_path}", f"data.cache_dir={tmp_path / 'c'}",
          "train.log_with=none", "train.method=full", "train.steps=2", "train.attention=math", *settings],
          show_progress=False)  # fmt: skip
    assert counts == ([2] if installed else [])  # the two feed-forwards


def test_a_failed_start_up_check_leaves_the_usual_kernels(tmp_path, tiny_home, monkeypatch):
    """Where quack's kernels fail their check (a changed quack, say), the run warns, names what
    failed, and trains on without them."""
    from pixart_tune import train

    calls = []
    monkeypatch.setattr(quack_ops, "quack_runs_on", lambda device: True)
    monkeypatch.setattr(quack_ops, "quack_problem", lambda: "GELU epilogue: relative error 0.5 against fp32")
    monkeypatch.setattr(quack_gemm, "use_quack_gemms", lambda model: calls.append(model) or 1)
    with pytest.warns(UserWarning, match="start-up check .GELU epilogue: relative error 0.5.*goes on with cuBLAS"):
        final = train(REPO / "recipes" / "tiny-lora.yaml", [f"output_dir={tmp_path}", f"data.cache_dir={tmp_path / 'c'}",
                      "train.log_with=none", "train.mixed_precision=bf16", "train.steps=2"], show_progress=False)  # fmt: skip
    assert calls == [] and (final / "adapter_model.safetensors").is_file()


class _FakeQuack:
    """Stands in for quack's interface on CPU: the same maths in PyTorch, and a note of the tile
    scheduler each GEMM was asked for (quack's default for plain GEMMs is the static one)."""

    def __init__(self):
        self.dynamic = []

    def _note(self, kwargs):
        self.dynamic.append(kwargs.get("dynamic_scheduler", False))

    def gemm(self, a, b, bias=None, **kwargs):
        self._note(kwargs)
        return a @ b if bias is None else a @ b + bias

    def gemm_act(self, a, b, bias=None, activation=None, **kwargs):
        self._note(kwargs)
        h = a @ b if bias is None else a @ b + bias
        return h, F.gelu(h, approximate="tanh")

    def gemm_dact(self, a, b, preact, activation=None, **kwargs):
        self._note(kwargs)
        return torch.ops.aten.gelu_backward(a @ b, preact, approximate="tanh"), F.gelu(preact, approximate="tanh")

    def gemm_add_inplace(self, a, b, out, **kwargs):
        self._note(kwargs)
        out.add_(a @ b)

    def dgelu_dbias(self, a, b, preact, out, **kwargs):
        dx, postact = self.gemm_dact(a, b, preact, **kwargs)
        return {"D": dx, "postact": postact, "dbias": dx.sum(0)}


def test_every_quack_gemm_asks_for_the_dynamic_tile_scheduler(monkeypatch):
    """Under FSDP2 quack's static schedule cost 5% (NCCL's kernels hold SMs beside the persistent
    GEMMs): every operator must ask for the dynamic one, and still give the plain maths."""
    fake = _FakeQuack()
    monkeypatch.setattr(quack_ops, "_quack", lambda: fake)
    monkeypatch.setattr(quack_ops, "_dgelu_dbias_mod", lambda: fake.dgelu_dbias)
    g = torch.Generator().manual_seed(0)
    x, w, dy, h = (torch.randn(*s, generator=g) for s in ((6, 8), (16, 8), (6, 16), (6, 8)))
    bias, u, b = torch.randn(16, generator=g), torch.randn(6, 4, generator=g), torch.randn(4, 16, generator=g)
    calls = {"_linear": (x, w, bias), "_input_grad": (dy, w), "_gelu_linear": (x, w, bias),
             "_gelu_input_grad": (dy, w, h), "_gelu_input_and_bias_grad": (dy, w, h),
             "_gemm_plus_lowrank": (x, w.t(), u, b, bias)}  # fmt: skip
    plain = {name: getattr(quack_ops, name)(*args) for name, args in calls.items()}  # _on_quack: False on CPU
    monkeypatch.setattr(quack_ops, "_on_quack", lambda *tensors: True)
    for name, args in calls.items():
        got = getattr(quack_ops, name)(*args)
        for a, want in zip(got if isinstance(got, tuple) else (got,), plain[name] if isinstance(got, tuple) else (plain[name],)):
            torch.testing.assert_close(a, want, rtol=1e-5, atol=1e-5, msg=name)
    assert fake.dynamic == [True] * len(calls)


def test_quack_runs_only_on_hopper_gpus():
    assert not quack_runs_on(torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and quack_runs_on(torch.device("cuda"))),
                    reason="needs quack and a Hopper GPU")  # fmt: skip
def test_the_start_up_check_passes_on_gpu():
    assert quack_ops.quack_problem() is None


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and quack_runs_on(torch.device("cuda"))),
                    reason="needs quack and a Hopper GPU")  # fmt: skip
@pytest.mark.parametrize("op", OPS)
def test_quack_kernels_match_fp32_on_gpu(op):
    """Each operator on quack's kernels (M = 4096 rows, bf16) against the same maths in fp32."""
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).to(torch.bfloat16)

    m, k, n = 4096, 256, 1024
    x, w, dy, bias, h = randn(m, k), randn(n, k, scale=k**-0.5), randn(m, n), randn(n, scale=0.1), randn(m, k)
    args = {"quack_linear": (x, w, bias), "quack_input_grad": (dy, w), "quack_gelu_linear": (x, w, bias),
            "quack_gelu_input_grad": (dy, w, h), "quack_gelu_input_and_bias_grad": (dy, w, h),
            "quack_gemm_plus_lowrank": (x, w.t(), randn(m, 16), randn(16, n, scale=0.1), bias)}[op]  # fmt: skip
    got = getattr(torch.ops.pixart_tune, op)(*args)
    want = getattr(quack_ops, "_" + op.removeprefix("quack_"))(*(None if a is None else a.double().cpu() for a in args))
    for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        err = ((a.double().cpu() - b).abs().max() / b.abs().max()).item()
        assert err < 1e-2, (op, err)


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and quack_runs_on(torch.device("cuda"))),
                    reason="needs quack and a Hopper GPU")  # fmt: skip
def test_joined_lora_linear_matches_fp32_on_gpu():
    """The joint q/k/v projection's shape of adapter (three rank-16 blocks) joined to quack's reduction,
    bf16 at 4096 rows (thin_pair reading h from the joined buffer's rows): output and gradients of
    x, A and B against lora_linear's maths in fp64 on the CPU."""
    from pixart_tune.lora_fused import lora_linear

    operands = _lora_operands(m=4096, k=256, n=3 * 256, r=48, groups=3)
    got = _lora_out_and_grads(quack_gemm.joined_lora_linear, *(t.cuda().bfloat16() for t in operands), 3)
    want = _lora_out_and_grads(lora_linear, *(t.double() for t in operands), 3)
    for i, (a, b) in enumerate(zip(got, want)):
        err = ((a.double().cpu() - b).abs().max() / b.abs().max()).item()
        assert err < 2e-2, (i, err)
