"""FP8 matmuls for the frozen base weights of a LoRA run's busiest layers (opt-in, `train.fp8`; Hopper).

A LoRA layer's frozen W needs no weight gradient, so two GEMMs per layer remain: the forward and the
input gradient. With fp8 copies of W attached (`apply_fp8`), the fused LoRA linear (lora_fused.py) runs
them in float8_e4m3fn with one fp32 scale per row, the adapter's low-rank term added in the same kernel
(lowrank_triton.py; twice bf16's peak rate on an H100):

    forward     y  = x @ W^T     x (M, K) scaled per row (token),  W (N, K) per output channel
    grad-input  dx = dy @ W      dy (M, N) scaled per row (token), W^T (K, N) per input channel

Each GEMM wants its own copy of W, scaled along the dimension it keeps. x and dy are quantised on the
fly; under torch.compile that fuses into the kernel that produces them, where that kernel is one of
Inductor's (a norm, a GELU, a gated residual). So fp8 is attached only where that holds and it pays,
per direction (FP8_LAYERS, measured on an H100: scripts/results/NOTES.md): the self-attention's q/k/v
forward (their input is norm1's output; the input gradient comes from the attention kernel) and both
directions of the feed-forward, which lora_ff.py runs as one function so that its 4608-wide rows take
bounds as scales instead of row maxima. The bf16 weights stay: merging, saving and peft's own forward are
untouched, and the adapters, norms and attention stay in bf16/fp32.

Where the Triton kernel does not run (CPU, other GPUs, shapes it declines) the same fp8 values go
through `torch._scaled_mm` (sm90+) or are dequantised and multiplied in fp32, so the quantisation
error is the same everywhere and testable on a CPU.

Call `apply_fp8(model)` after the LoRA is added, before compiling, and on the module that DDP wraps
(it marks the fp8 buffers DDP-ignored by name). A later `.to(dtype)` keeps the fp8 copies. Not for
DoRA (it reads the full base weight every step).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .speed import transformer_blocks

E4M3_MAX = 448.0  # largest finite float8_e4m3fn value
MIN_SCALE = 1e-12  # floor of a row's scale: an all-zero row quantises to zeros, not 0/0 = NaN

# Layers of a PixArt block that get fp8 copies: {name in the block: (forward, input gradient)}. The
# others stay bf16: to_out's input comes from the attention kernel (quantising it is a pass of its own
# and costs what the fp8 GEMM saves), the cross-attention's are small or fed by attention as well.
FP8_LAYERS = {
    "attn1.to_q": (True, False),
    "attn1.to_k": (True, False),
    "attn1.to_v": (True, False),
    "ff.net.0.proj": (True, True),
    "ff.net.2": (True, True),
}


def quantize_rowwise(t: Tensor, dim: int = -1) -> tuple[Tensor, Tensor]:
    """float8_e4m3fn copy of `t` with one fp32 scale per slice along `dim`: t ~= t_fp8.float() * scale.

    For t (M, K) and dim=-1: t_fp8 (M, K), scale (M, 1). Pure tensor ops (no .item(), no branches on
    values), so it traces under torch.compile and fuses into one kernel there.
    """
    amax = t.abs().amax(dim=dim, keepdim=True).float()  # max |t| is exact in any float dtype
    scale = scale_for(amax)
    return quantize_with(t, scale), scale


def scale_for(bound: Tensor) -> Tensor:
    """The fp32 scale that maps |values| <= bound onto e4m3's range (bound: an amax, or any upper bound)."""
    return (bound.float() / E4M3_MAX).clamp(min=MIN_SCALE)


def quantize_with(t: Tensor, scale: Tensor) -> Tensor:
    """t / scale in float8_e4m3fn, for a scale from scale_for (broadcast against t). A loose bound costs
    little: e4m3 keeps its 3-bit mantissa over 2^-6..448, so only values 2^15 below it lose precision."""
    # bf16/fp32 t divided by an fp32 scale computes in fp32. The clamp catches the rare quotient that
    # rounds just above 448 (and a bound a rounding short): a cast out of e4m3's range may give NaN
    # rather than saturate on some paths.
    return (t / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def scaled_mm_supported(device: torch.device) -> bool:
    """Whether `torch._scaled_mm` takes row-wise scales here: NVIDIA sm90+ (ROCm uses other fp8 types)."""
    return (device.type == "cuda" and torch.version.hip is None and hasattr(torch, "_scaled_mm")
            and torch.cuda.get_device_capability(device) >= (9, 0))  # fmt: skip


def fp8_mm(a: Tensor, sa: Tensor, b: Tensor, sb: Tensor, out_dtype: torch.dtype) -> Tensor:
    """(a * sa) @ (b * sb)^T in out_dtype, for a (M, K) e4m3 with sa (M, 1) and b (N, K) e4m3 with sb (N, 1)."""
    if scaled_mm_supported(a.device):
        # _scaled_mm wants mat1 row-major and mat2 column-major: b.t() of a row-major (N, K) b is a
        # column-major (K, N). Row-wise scales are fp32 (M, 1) and (1, N); (N, 1).t() is contiguous.
        # Row-wise scaling only writes bf16. K and N must be multiples of 16 (apply_fp8 checks).
        y = torch._scaled_mm(a.contiguous(), b.t(), scale_a=sa, scale_b=sb.t(), out_dtype=torch.bfloat16)
        return y.to(out_dtype)
    # Fallback: the same fp8 values, dequantised, multiplied in fp32. Autocast off, else CPU/CUDA
    # autocast would run this mm in bf16 and change the numerics the fallback stands for.
    with torch.autocast(a.device.type, enabled=False):
        return torch.mm(a.float() * sa, (b.float() * sb).t()).to(out_dtype)


class FP8Weights(nn.Module):
    """The fp8 copies of one frozen LoRA base weight W (N, K), per direction (None where that GEMM
    stays bf16). Attached to the LoRA layer as `.fp8` by apply_fp8; lora_fused reads it.

    Non-persistent buffers: derived from the base checkpoint, so neither saved nor expected on load.
    """

    BUFFERS = ("forward_weight", "forward_scale", "backward_weight", "backward_scale")

    def __init__(self, weight: Tensor, forward: bool, backward: bool):
        super().__init__()
        w_fwd, s_fwd = quantize_rowwise(weight) if forward else (None, None)  # (N, K) e4m3, (N, 1) fp32
        # W^T quantised per row = W per input channel, stored row-major (K, N) as the input gradient needs it.
        w_bwd, s_bwd = quantize_rowwise(weight.t().contiguous()) if backward else (None, None)
        for name, value in zip(self.BUFFERS, (w_fwd, s_fwd, w_bwd, s_bwd)):
            self.register_buffer(name, value, persistent=False)

    def as_args(self) -> tuple[Tensor | None, ...]:
        """(forward weight, its scale, input-gradient weight, its scale): lora_linear's `fp8` argument."""
        return tuple(self._buffers[name] for name in self.BUFFERS)

    def _apply(self, fn, recurse=True):
        # nn.Module.to(dtype)/.half()/.float() cast every floating buffer, and float8 counts as one:
        # these copies and their fp32 scales follow the device only.
        for name in self.BUFFERS:
            buf = self._buffers[name]
            if buf is not None:
                moved = fn(buf)
                self._buffers[name] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        return self

    def extra_repr(self) -> str:
        return f"forward={self.forward_weight is not None}, input_gradient={self.backward_weight is not None}"


def _lora_layers(block: nn.Module):
    """(name, layer) for the FP8_LAYERS of one block that carry a peft LoRA."""
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    for name in FP8_LAYERS:
        try:
            layer = block.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(layer, PeftLoraLinear):
            yield name, layer


@torch.no_grad()
def apply_fp8(model: nn.Module) -> int:
    """Attach fp8 copies of the frozen base weights (FP8Weights) to the LoRA layers of PixArt's blocks
    named in FP8_LAYERS. Returns how many layers have them now (0: no LoRA on those layers).

    Raises ValueError, with nothing attached, for a DoRA adapter or a trainable base weight. Layers whose
    sizes are not multiples of 16 (a `_scaled_mm` rule) stay bf16.
    """
    blocks = transformer_blocks(model)
    found = [(i, name, layer) for i, block in enumerate(blocks) for name, layer in _lora_layers(block)]
    for i, name, layer in found:
        where = f"transformer_blocks.{i}.{name}"
        if len(layer.lora_magnitude_vector):
            raise ValueError(f"apply_fp8: {where} is DoRA, which reads the full-precision base weight every step; "
                             "train DoRA without fp8")  # fmt: skip
        if layer.base_layer.weight.requires_grad:
            raise ValueError(f"apply_fp8: {where} has a trainable base weight; fp8 copies are for frozen weights "
                             "(LoRA training), nothing was attached")  # fmt: skip
    ignore, count = [], 0
    for i, name, layer in found:
        base = layer.base_layer
        if "fp8" not in layer._modules and base.in_features % 16 == 0 and base.out_features % 16 == 0:
            layer.fp8 = FP8Weights(base.weight, *FP8_LAYERS[name])
        if "fp8" in layer._modules:
            count += 1
            ignore += [f"transformer_blocks.{i}.{name}.fp8.{b}" for b, _ in layer.fp8.named_buffers()]
    # DDP (broadcast_buffers=True, accelerate's default) would broadcast every buffer from rank 0 on
    # every forward: the fp8 copies are identical on all ranks, so tell DDP to leave them alone.
    prefix = next(n for n, m in model.named_modules() if m is blocks).removesuffix("transformer_blocks")
    model._ddp_params_and_buffers_to_ignore = sorted({*getattr(model, "_ddp_params_and_buffers_to_ignore", ()),
                                                      *(prefix + n for n in ignore)})  # fmt: skip
    return count

