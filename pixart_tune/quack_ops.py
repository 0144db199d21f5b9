"""quack's Hopper GEMMs as PyTorch operators: what quack_gemm.py's autograd functions call.

Six products, each an operator opaque to torch.compile (`torch.ops.pixart_tune.quack_*`), with
operands (M, K) activations and (N, K) weights in one 16-bit dtype:

    quack_linear                    x W^T + b
    quack_input_grad                dy W
    quack_gelu_linear               h = x W^T + b and gelu(h) (tanh form), one kernel
    quack_gelu_input_grad           gelu'(h) (dy W) and gelu(h), one kernel
    quack_gelu_input_and_bias_grad  the same and the sum of gelu'(h) (dy W) over the rows (fp32)
    quack_gemm_plus_lowrank         x W + h B: the low-rank product, the big GEMM adding into it in place

Each runs quack's eager path (its launch plans are cached per shape) where the GPU is Hopper, the
dtype 16-bit, the rows many enough and the widths multiples of 8, and PyTorch's maths elsewhere (the
CPU tests, other GPUs, odd shapes). Also here: quack's import with its fingerprint shim, whether quack
runs on a device, and the start-up check of its kernels against fp32 (quack_problem).
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor

MIN_ROWS = 2048  # fewer tokens than this: too few output tiles to fill the GPU; cuBLAS picks better
GELU = "gelu_tanh_approx"  # quack's name for PyTorch's gelu(approximate="tanh")
# quack's GEMMs are persistent: one CTA per SM works through the output tiles. With the dynamic scheduler
# each CTA takes its next tile from an atomic counter; with the static one (quack's default for plain
# GEMMs) it owns a fixed list. Under FSDP2 and DDP, NCCL's kernels hold some SMs while a GEMM runs, and
# a static list waits for them whole: on 2x H200, FSDP2's full fine-tune ran at 39.37 samples/s with
# the static GEMMs against 41.46 without quack (scripts/results/NOTES.md, "Two GPUs").
DYNAMIC = True


@functools.cache
def _quack():
    """quack.gemm_interface, with its compile-cache fingerprint taught to skip what it cannot key.

    quack keys each compiled epilogue by a fingerprint of the Python objects its code reaches. With
    the CUTLASS DSL that flash-attn-4 4.0.0b36 pulls in (4.8.1), that walk reaches DSL internals
    (a ContextVar of source locations, a code object's method) and raises TypeError before any
    kernel is built. Those objects hold no maths, so they are keyed by their type: at worst a kernel
    is compiled again, never reused wrongly.
    """
    from quack.gemm_runtime import identity

    if not getattr(identity.semantic_value_key, "pixart_tune_fallback", False):
        strict = identity.semantic_value_key

        def keyed_by_type_where_unkeyable(value, seen):
            try:
                return strict(value, seen)
            except TypeError:
                return ("opaque", type(value).__module__, type(value).__qualname__)

        keyed_by_type_where_unkeyable.pixart_tune_fallback = True
        identity.semantic_value_key = keyed_by_type_where_unkeyable  # looked up as a module global
    from quack import gemm_interface

    return gemm_interface


def _dgelu_dbias_mod():
    """quack's GELU-gradient epilogue with the bias gradient's row reduction (its epilogue library)."""
    _quack()  # the fingerprint shim, before quack's epilogue library compiles anything
    from quack.epilogue.library import dgelu_dbias_mod

    return dgelu_dbias_mod


@functools.cache
def quack_installed() -> bool:
    return importlib.util.find_spec("quack") is not None


@functools.cache
def _hopper(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] == 9


def quack_runs_on(device: torch.device) -> bool:
    """Whether the kernels here run on `device`: CUDA, Hopper (sm90), quack importable. Cached: the
    operators ask on every call."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available() or not quack_installed():
        return False
    return _hopper(torch.cuda.current_device() if device.index is None else device.index)


@functools.cache
def quack_problem() -> str | None:
    """None where each quack kernel used here runs and agrees with fp32 PyTorch on a small problem
    (bf16, 2048 rows), else what failed: a start-up check, so that a quack release that changed its
    interface or maths leaves the run on the usual kernels instead of stopping it at its first step.
    Needs a Hopper GPU with quack (quack_runs_on). Compiles the kernels (seconds, once a process)."""
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).to(torch.bfloat16)

    m, k, n, r = MIN_ROWS, 64, 128, 16
    x, w, bias, dy, h = randn(m, k), randn(n, k, scale=k**-0.5), randn(n, scale=0.1), randn(m, n), randn(m, k)
    u, b = randn(m, r), randn(r, n, scale=0.1)
    f = [t.float() for t in (x, w, bias, dy, h, u, b)]
    checks = {  # name: (the operator's result, on quack at this shape; the fp32 reference)
        "gemm": (lambda: _linear(x, w, bias), lambda: F.linear(*f[:3])),
        "input gradient": (lambda: _input_grad(dy, w), lambda: f[3] @ f[1]),
        "GELU epilogue": (lambda: _gelu_linear(x, w, bias)[1], lambda: F.gelu(F.linear(*f[:3]), approximate="tanh")),
        "GELU-gradient epilogue": (lambda: _gelu_input_grad(dy, w, h)[0],
                                   lambda: torch.ops.aten.gelu_backward(f[3] @ f[1], f[4], approximate="tanh")),
        "bias-gradient epilogue": (lambda: _gelu_input_and_bias_grad(dy, w, h)[2],
                                   lambda: torch.ops.aten.gelu_backward(f[3] @ f[1], f[4], approximate="tanh").sum(0)),
        "in-place add": (lambda: _gemm_plus_lowrank(x, w.t(), u, b, None), lambda: f[5] @ f[6] + f[0] @ f[1].t()),
    }  # fmt: skip
    for name, (got, want) in checks.items():
        try:
            result, ref = got().float(), want()
        except Exception as exc:  # noqa: BLE001 - any failure means: do not use quack here
            return f"{name}: {type(exc).__name__}: {exc}"
        err = ((result - ref).abs().max() / ref.abs().max()).item()
        if not err < 2e-2:
            return f"{name}: relative error {err:.3g} against fp32"
    return None


def _on_quack(*tensors: Tensor) -> bool:
    """The quack kernels take these (M, K) / (N, K) operands: Hopper, 16-bit, aligned rows, enough rows."""
    a = tensors[0]
    return (a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and a.shape[0] >= MIN_ROWS
            and all(t.shape[-1] % 8 == 0 for t in tensors) and quack_runs_on(a.device))  # fmt: skip


# The products, as operators opaque to torch.compile (as lora_fused's are): each runs quack's
# eager path, whose launch plans are cached per shape, and falls back to PyTorch where quack does not
# apply (CPU tests, other GPUs, odd shapes). Operands (M, K) activations and (N, K) weights, one dtype.
def _linear(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    """x @ w^T + bias: (M, N)."""
    if _on_quack(x, w):
        return _quack().gemm(x, w.t(), bias=bias, tuned=False, dynamic_scheduler=DYNAMIC)
    return F.linear(x, w, bias)


def _input_grad(dy: Tensor, w: Tensor) -> Tensor:
    """dy @ w: (M, K) for dy (M, N)."""
    if _on_quack(dy, w.t()):
        return _quack().gemm(dy, w, tuned=False, dynamic_scheduler=DYNAMIC)
    return dy @ w


def _gelu_linear(x: Tensor, w: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """h = x @ w^T + bias and gelu(h) (tanh form): both (M, N)."""
    if _on_quack(x, w):
        return _quack().gemm_act(x, w.t(), bias=bias, activation=GELU, tuned=False, dynamic_scheduler=DYNAMIC)
    h = F.linear(x, w, bias)
    return h, F.gelu(h, approximate="tanh")


def _gelu_input_grad(dy: Tensor, w: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """dh = gelu'(h) * (dy @ w) and gelu(h), for dy (M, N), w (N, K), h (M, K): both (M, K)."""
    if _on_quack(dy, w.t(), h):
        return _quack().gemm_dact(dy, w, h, activation=GELU, tuned=False, dynamic_scheduler=DYNAMIC)
    dg = dy @ w
    return torch.ops.aten.gelu_backward(dg, h, approximate="tanh"), F.gelu(h, approximate="tanh")


def _gelu_input_and_bias_grad(dy: Tensor, w: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """_gelu_input_grad's dh and gelu(h), and db = dh summed over the rows in fp32 (K,): the bias
    gradient of the layer that made h, summed in the same kernel's epilogue from the unrounded dh
    (cuBLAS + Inductor: a further pass over dh, 302 MB a layer at batch 8)."""
    if _on_quack(dy, w.t(), h):
        out = _dgelu_dbias_mod()(dy, w, h, out={"D": torch.empty_like(h), "postact": torch.empty_like(h)},
                                 tuned=False, dynamic_scheduler=DYNAMIC)  # fmt: skip
        return out["D"], out["postact"], out["dbias"]
    dh, g = _gelu_input_grad(dy, w, h)
    return dh, g, dh.sum(0, dtype=torch.float32)


def _gemm_plus_lowrank(x: Tensor, w: Tensor, h: Tensor, b: Tensor, bias: Tensor | None) -> Tensor:
    """x @ w + h @ b (+ bias) for x (M, K), w (K, N), h (M, r), b (r, N): lora_fused's sum for long
    reductions, the big GEMM on quack's kernel adding into the low-rank product in place."""
    out = torch.mm(h, b) if bias is None else torch.addmm(bias, h, b)  # (M, N)
    if _on_quack(x, w.t()):
        _quack().gemm_add_inplace(x, w, out, tuned=False, dynamic_scheduler=DYNAMIC)
        return out
    return out.addmm_(x, w)


_LIB = torch.library.Library("pixart_tune", "FRAGMENT")
for _schema, _impl in (  # each operator's name opens its schema
    ("quack_linear(Tensor x, Tensor w, Tensor? bias) -> Tensor", _linear),
    ("quack_input_grad(Tensor dy, Tensor w) -> Tensor", _input_grad),
    ("quack_gelu_linear(Tensor x, Tensor w, Tensor? bias) -> (Tensor, Tensor)", _gelu_linear),
    ("quack_gelu_input_grad(Tensor dy, Tensor w, Tensor h) -> (Tensor, Tensor)", _gelu_input_grad),
    ("quack_gelu_input_and_bias_grad(Tensor dy, Tensor w, Tensor h) -> (Tensor, Tensor, Tensor)",
     _gelu_input_and_bias_grad),
    ("quack_gemm_plus_lowrank(Tensor x, Tensor w, Tensor h, Tensor b, Tensor? bias) -> Tensor", _gemm_plus_lowrank),
):  # fmt: skip
    _LIB.define(_schema)
    _LIB.impl(_schema.split("(")[0], _impl, "CompositeExplicitAutograd")
ops = torch.ops.pixart_tune  # ops.quack_linear(...) and the others


@torch.library.register_fake("pixart_tune::quack_linear")
def _(x, w, bias):
    return x.new_empty(x.shape[0], w.shape[0])


@torch.library.register_fake("pixart_tune::quack_input_grad")
def _(dy, w):
    return dy.new_empty(dy.shape[0], w.shape[1])


@torch.library.register_fake("pixart_tune::quack_gelu_linear")
def _(x, w, bias):
    return x.new_empty(x.shape[0], w.shape[0]), x.new_empty(x.shape[0], w.shape[0])


@torch.library.register_fake("pixart_tune::quack_gelu_input_grad")
def _(dy, w, h):
    return h.new_empty(h.shape), h.new_empty(h.shape)


@torch.library.register_fake("pixart_tune::quack_gelu_input_and_bias_grad")
def _(dy, w, h):
    return h.new_empty(h.shape), h.new_empty(h.shape), h.new_empty(h.shape[1], dtype=torch.float32)


@torch.library.register_fake("pixart_tune::quack_gemm_plus_lowrank")
def _(x, w, h, b, bias):
    return x.new_empty(x.shape[0], w.shape[1])
