"""FP8 matmuls for the frozen base linears of a LoRA run (opt-in; pays off on Hopper, sm90+).

A frozen nn.Linear needs no weight gradient, so only two GEMMs per layer remain, and both run in
float8_e4m3fn with one fp32 scale per row through `torch._scaled_mm` (twice bf16's peak rate on an
H100; quantising x and dy on the fly costs some memory traffic of its own):

    forward     y  = x @ W^T     x (M, K) scaled per row (token),  W (N, K) per output channel
    grad-input  dx = dy @ W      dy (M, N) scaled per row (token), W^T (K, N) per input channel

Each GEMM wants its own copy of W, scaled along the dimension it keeps, so both are quantised once
(2 bytes per weight in all, the size of one bf16 copy) and the original weight is dropped. Nothing of
x is saved for backward. LoRA A/B, norms and attention stay in the usual bf16/fp32 path. Where
row-wise `_scaled_mm` is missing (CPU, GPUs before sm90) the same fp8 values are dequantised and
multiplied in fp32, so the quantisation error is the same everywhere and testable on a CPU.

Call `apply_fp8(model)` after the LoRA is added (peft wraps nn.Linear, not FP8Linear), before
compiling, and on the module that DDP wraps (it marks the fp8 buffers DDP-ignored by name). A later
`.to(dtype)` keeps the fp8 copies. Not for DoRA (it reads the full base weight every step) nor for
merging/fusing adapters: those need the original weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .speed import transformer_blocks

E4M3_MAX = 448.0  # largest finite float8_e4m3fn value
MIN_SCALE = 1e-12  # floor of a row's scale: an all-zero row quantises to zeros, not 0/0 = NaN
_FP8_BUFFERS = ("weight_fp8", "weight_scale", "weight_t_fp8", "weight_t_scale")


def quantize_rowwise(t: Tensor, dim: int = -1) -> tuple[Tensor, Tensor]:
    """float8_e4m3fn copy of `t` with one fp32 scale per slice along `dim`: t ~= t_fp8.float() * scale.

    For t (M, K) and dim=-1: t_fp8 (M, K), scale (M, 1). Pure tensor ops (no .item(), no branches on
    values), so it traces under torch.compile and fuses into one kernel there.
    """
    amax = t.abs().amax(dim=dim, keepdim=True).float()  # max |t| is exact in any float dtype
    scale = (amax / E4M3_MAX).clamp(min=MIN_SCALE)
    # bf16/fp32 t divided by an fp32 scale computes in fp32. The clamp catches the rare quotient that
    # rounds just above 448: a cast out of e4m3's range may give NaN rather than saturate on some paths.
    t_fp8 = (t / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return t_fp8, scale


def scaled_mm_supported(device: torch.device) -> bool:
    """Whether `torch._scaled_mm` takes row-wise scales here: NVIDIA sm90+ (ROCm uses other fp8 types)."""
    return (device.type == "cuda" and torch.version.hip is None and hasattr(torch, "_scaled_mm")
            and torch.cuda.get_device_capability(device) >= (9, 0))  # fmt: skip


def _fp8_mm(a: Tensor, sa: Tensor, b: Tensor, sb: Tensor, use_scaled_mm: bool) -> Tensor:
    """(a * sa) @ (b * sb)^T in bf16, for a (M, K) e4m3 with sa (M, 1) and b (N, K) e4m3 with sb (N, 1)."""
    if use_scaled_mm:
        # _scaled_mm wants mat1 row-major and mat2 column-major: b.t() of a row-major (N, K) b is a
        # column-major (K, N). Row-wise scales are fp32 (M, 1) and (1, N); (N, 1).t() is contiguous.
        # Row-wise scaling only writes bf16. K and N must be multiples of 16 (checked at construction).
        return torch._scaled_mm(a.contiguous(), b.t(), scale_a=sa, scale_b=sb.t(), out_dtype=torch.bfloat16)
    # Fallback: the same fp8 values, dequantised, multiplied in fp32. Autocast off, else CPU/CUDA
    # autocast would run this mm in bf16 and change the numerics the fallback stands for.
    with torch.autocast(a.device.type, enabled=False):
        return torch.mm(a.float() * sa, (b.float() * sb).t()).to(torch.bfloat16)


class _FP8MatmulFrozenWeight(torch.autograd.Function):
    """y = x @ W^T with W frozen: no weight gradient, and nothing of x saved for backward."""

    @staticmethod
    def forward(ctx, x, w_fp8, w_scale, wt_fp8, wt_scale, use_scaled_mm):
        # x (..., K) any float dtype; w_fp8 (N, K), w_scale (N, 1); wt_fp8 (K, N), wt_scale (K, 1).
        ctx.x_shape, ctx.x_dtype, ctx.use_scaled_mm = x.shape, x.dtype, use_scaled_mm
        ctx.save_for_backward(wt_fp8, wt_scale)
        x_fp8, x_scale = quantize_rowwise(x.reshape(-1, x.shape[-1]))  # (M, K), (M, 1)
        y = _fp8_mm(x_fp8, x_scale, w_fp8, w_scale, use_scaled_mm)  # (M, N) bf16
        return y.reshape(*x.shape[:-1], w_fp8.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        wt_fp8, wt_scale = ctx.saved_tensors
        g_fp8, g_scale = quantize_rowwise(grad_y.reshape(-1, grad_y.shape[-1]))  # (M, N), (M, 1)
        dx = _fp8_mm(g_fp8, g_scale, wt_fp8, wt_scale, ctx.use_scaled_mm)  # dy @ W: (M, K) bf16
        return dx.reshape(ctx.x_shape).to(ctx.x_dtype), None, None, None, None, None


class FP8Linear(nn.Module):
    """A frozen nn.Linear whose matmuls run in fp8 (see the module docstring). Build with `from_linear`.

    It has no `weight`. What peft's LoRA Linear does with its base layer while training (no merge,
    no DoRA) is only `self.base_layer(x)` and the dtype of the result; `base_layer.weight` is read
    by merge/unmerge, DoRA, and `_move_adapter_to_device_of_base_layer` when an adapter is added,
    where `getattr(base, "weight", None)` is None and the move is skipped. A dequantised weight per
    access would cost a full-size matmul operand per step and silently give merges fp8-rounded
    weights, so any other `.weight` access raises an AttributeError that says why.
    """

    def __init__(self, weight_fp8: Tensor, weight_scale: Tensor, weight_t_fp8: Tensor, weight_t_scale: Tensor,
                 bias: Tensor | None = None):  # fmt: skip
        super().__init__()
        self.out_features, self.in_features = weight_fp8.shape  # (N, K)
        # Non-persistent: derived from the base checkpoint, so neither saved nor expected on load.
        self.register_buffer("weight_fp8", weight_fp8, persistent=False)  # (N, K) e4m3, W per output channel
        self.register_buffer("weight_scale", weight_scale, persistent=False)  # (N, 1) fp32
        self.register_buffer("weight_t_fp8", weight_t_fp8, persistent=False)  # (K, N) e4m3, W^T per input channel
        self.register_buffer("weight_t_scale", weight_t_scale, persistent=False)  # (K, 1) fp32
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias.detach(), requires_grad=False))
        self.use_scaled_mm = scaled_mm_supported(weight_fp8.device)  # the GEMM path, fixed per device

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> FP8Linear:
        """Quantise a frozen nn.Linear; the result holds no reference to its weight."""
        w = linear.weight  # (N, K)
        if linear.in_features % 16 or linear.out_features % 16:
            raise ValueError(f"FP8Linear needs in/out features divisible by 16 (a _scaled_mm rule), got "
                             f"{linear.in_features} -> {linear.out_features}")  # fmt: skip
        if w.requires_grad:
            raise ValueError("FP8Linear is for frozen linears: this weight requires grad (it would stop training)")
        if not w.is_floating_point():
            raise ValueError(f"FP8Linear needs a float weight, got {w.dtype}")
        # W^T quantised per row = W per input channel, stored row-major (K, N) as backward needs it.
        return cls(*quantize_rowwise(w), *quantize_rowwise(w.t().contiguous()), linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        y = _FP8MatmulFrozenWeight.apply(x, self.weight_fp8, self.weight_scale, self.weight_t_fp8,
                                         self.weight_t_scale, self.use_scaled_mm)  # fmt: skip
        # Return what nn.Linear would: the autocast dtype under autocast, else x's dtype. peft casts
        # base + LoRA back to the base output's dtype, so a bf16 result here would round the adapter's
        # contribution in an fp32 run and mix dtypes downstream.
        device = x.device.type
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        y = y.to(out_dtype)
        return y if self.bias is None else y + self.bias.to(out_dtype)

    def __getattr__(self, name: str):
        if name == "weight":
            raise AttributeError("FP8Linear keeps only fp8 copies of its weight (no `weight`): merge, fuse or "
                                 "DoRA need the original layer, so load the model again without apply_fp8")
        return super().__getattr__(name)

    def _apply(self, fn, recurse=True):
        # nn.Module.to(dtype)/.half()/.float() cast every floating buffer, and float8 counts as one: the
        # fp8 copies and fp32 scales only follow the device; the bias follows the usual rules.
        stashed = {name: self._buffers.pop(name) for name in _FP8_BUFFERS}
        try:
            super()._apply(fn, recurse)
            for name, buf in stashed.items():
                moved = fn(buf)
                stashed[name] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        finally:
            self._buffers.update(stashed)
        self.use_scaled_mm = scaled_mm_supported(self.weight_fp8.device)
        return self

    def extra_repr(self) -> str:
        path = "_scaled_mm" if self.use_scaled_mm else "dequantised fp32 fallback"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {path}"


def apply_fp8(model: nn.Module) -> int:
    """Swap the frozen nn.Linears inside PixArt's transformer_blocks (the `base_layer` of peft LoRA
    layers, and linears LoRA does not target) for FP8Linear, in place. Returns how many were swapped.

    Skipped: the LoRA A/B layers, linears whose sizes are not multiples of 16, and everything outside
    the blocks (patch embedding, caption projection, adaLN-single, proj_out). Raises ValueError, with
    nothing swapped, for a trainable linear in the blocks (e.g. a full fine-tune) or a DoRA adapter.
    """
    blocks = transformer_blocks(model)
    adapter_ids = set()  # peft's trainable adapter sub-modules (lora_A, lora_B, ...)
    for module in blocks.modules():
        if getattr(module, "lora_magnitude_vector", None):  # a non-empty ModuleDict
            raise ValueError("apply_fp8: DoRA reads the full-precision base weight every step; train DoRA without fp8")
        for attr in getattr(module, "adapter_layer_names", ()):
            holder = getattr(module, attr, None)
            if isinstance(holder, nn.Module):
                adapter_ids.update(id(m) for m in holder.modules())
    swaps = []  # (parent, attribute, linear)
    for parent_name, parent in blocks.named_modules():
        for name, child in parent.named_children():
            if not isinstance(child, nn.Linear) or id(child) in adapter_ids:
                continue
            if child.weight.requires_grad:
                raise ValueError(f"apply_fp8: transformer_blocks.{parent_name}.{name} is trainable; fp8 applies "
                                 "to frozen base linears only (LoRA training), nothing was converted")  # fmt: skip
            if child.in_features % 16 == 0 and child.out_features % 16 == 0:
                swaps.append((parent, name, child))
    converted = {}  # a linear shared by two parents becomes one FP8Linear
    for parent, name, child in swaps:
        if id(child) not in converted:
            converted[id(child)] = FP8Linear.from_linear(child)
        setattr(parent, name, converted[id(child)])
    # DDP (broadcast_buffers=True, accelerate's default) would broadcast every buffer from rank 0 on
    # every forward: the fp8 weights are identical on all ranks, so tell DDP to leave them alone.
    ignore = [f"{n}.{b}" for n, m in model.named_modules() if isinstance(m, FP8Linear) for b in _FP8_BUFFERS]
    model._ddp_params_and_buffers_to_ignore = sorted({*getattr(model, "_ddp_params_and_buffers_to_ignore", ()),
                                                      *ignore})  # fmt: skip
    return len(swaps)
