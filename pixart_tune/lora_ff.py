"""A PixArt feed-forward whose two LoRA linears and GELU run as one autograd function (train.fp8).

The feed-forward is up (1152 -> 4608), tanh GELU, down (4608 -> 1152). With fp8 copies on both
linears (fp8.py) the down-projection's forward quantises g = gelu(h) and the up-projection's input
gradient quantises dh = gelu'(h) dg, both rows 4608 wide. Scaled by their own row maxima, Inductor
reads those rows twice and spends what the fp8 GEMM saves (scripts/results/NOTES.md). Here the scales come
from bounds the GEMM before already knows, so the quantisation is elementwise and fuses into the GELU
(forward) and its gradient (backward):

    |gelu(h)| <= |h|                 the up-projection's kernel writes max |h| per row
    |gelu'(h) dg| <= 1.13 |dg|        the down-projection's input-gradient kernel writes max |dg| per row

A loose scale costs next to nothing: e4m3 keeps its 3-bit mantissa over 2^-6..448 of it. Autograd
passes only gradients from layer to layer, hence one function for the three steps. The maths is the
module-by-module forward's (lora_fused.adapter_forward / adapter_backward for each linear); only the
fp8 scales of g and dh differ. Engaged where both linears are vanilla fused LoRA layers with fp8
copies in both directions, the activation is tanh GELU and dropout is off; otherwise the usual forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .lora_fused import _fp8_copies, _vanilla_adapter, adapter_backward, adapter_forward, compute_dtype, give_forward

GELU_TANH_MAX_SLOPE = 1.13  # max |d/dh| of PixArt's tanh GELU: 1.12899, at h = 1.418


class _LoraFeedForward(torch.autograd.Function):
    # Per linear, 8 tensors (weight, bias, lora_a, lora_b, w8, w8_scale, w8_t, w8_t_scale), up then down,
    # then the two scalings: autograd routes gradients to top-level tensor arguments only.
    @staticmethod
    def forward(ctx, x: Tensor, *args):
        # x (..., 1152); weights (N, K), fp8 copies and biases frozen (checked by the caller)
        w1, bias1, a1, bb1, w8_1, ws_1, w8t_1, wst_1 = args[:8]
        w2, bias2, a2, bb2, w8_2, ws_2, w8t_2, wst_2 = args[8:16]
        s1, s2 = args[16:]
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)  # (M, K)
            h, u1, h_max = adapter_forward(x2, w1, bias1, a1, bb1, s1, 1, w8_1, ws_1, row_max=True)  # (M, 4608)
            g = F.gelu(h, approximate="tanh")  # (M, 4608)
            y, u2, _ = adapter_forward(g, w2, bias2, a2, bb2, s2, 1, w8_2, ws_2, x_bound=h_max[:, None])
        ctx.save_for_backward(x2, u1, h, g, u2, w1, a1, bb1, w8t_1, wst_1, w2, a2, bb2, w8t_2, wst_2)
        ctx.scalings, ctx.dtype, ctx.x_shape, ctx.x_dtype = (s1, s2), dtype, x.shape, x.dtype
        return y.reshape(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x2, u1, h, g, u2, w1, a1, bb1, w8t_1, wst_1, w2, a2, bb2, w8t_2, wst_2 = ctx.saved_tensors
        s1, s2 = ctx.scalings
        need = ctx.needs_input_grad  # x, then the 16 tensors: lora_a / lora_b at 3, 4 (up) and 11, 12 (down)
        with torch.autocast(dy.device.type, enabled=False):
            dy2 = dy.reshape(-1, dy.shape[-1]).to(ctx.dtype)  # (M, 1152)
            dg, grad_a2, grad_b2, dg_max = adapter_backward(dy2, g, u2, w2, a2, bb2, s2, (True, need[11], need[12]),
                                                            w8t_2, wst_2, row_max=True)  # fmt: skip
            dh = torch.ops.aten.gelu_backward(dg, h, approximate="tanh")  # (M, 4608)
            bound = GELU_TANH_MAX_SLOPE * dg_max[:, None]
            dx, grad_a1, grad_b1, _ = adapter_backward(dh, x2, u1, w1, a1, bb1, s1, (need[0], need[3], need[4]),
                                                       w8t_1, wst_1, dy_bound=bound)  # fmt: skip
        dx = None if dx is None else dx.reshape(ctx.x_shape).to(ctx.x_dtype)
        return (dx, None, None, grad_a1, grad_b1, None, None, None, None,
                None, None, grad_a2, grad_b2, None, None, None, None, None, None)  # fmt: skip


def _layer_args(layer) -> tuple | None:
    """((weight, bias, lora_a, lora_b, w8, w8_scale, w8_t, w8_t_scale), scaling) of a vanilla fused LoRA
    linear with fp8 copies in both directions and a frozen bias, else None."""
    name = _vanilla_adapter(layer) if hasattr(layer, "lora_A") else None
    copies = None if name is None else _fp8_copies(layer)
    if copies is None or any(t is None for t in copies):
        return None
    base = layer.base_layer
    if base.bias is not None and base.bias.requires_grad:
        return None
    return (base.weight, base.bias, layer.lora_A[name].weight, layer.lora_B[name].weight, *copies), layer.scaling[name]


def tanh_gelu_linears(ff: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(up, down), the two linears of diffusers' FeedForward `ff` where it is up-projection, tanh GELU,
    down-projection with no dropout active (PixArt's), else None."""
    net = getattr(ff, "net", None)
    if net is None or len(net) < 3 or getattr(net[0], "approximate", None) != "tanh":
        return None
    if any(not isinstance(m, nn.Dropout) or (m.p and m.training) for m in list(net)[1:2] + list(net)[3:]):
        return None
    return getattr(net[0], "proj", None), net[2]


def lora_feed_forward(ff: nn.Module, x: Tensor) -> Tensor | None:
    """diffusers' FeedForward `ff` on x through the fused function, or None where it does not apply."""
    linears = tanh_gelu_linears(ff)
    if linears is None:
        return None
    up, down = _layer_args(linears[0]), _layer_args(linears[1])
    if up is None or down is None:
        return None
    return _LoraFeedForward.apply(x, *up[0], *down[0], up[1], down[1])


def _fused_ff_forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
    out = None if (args or kwargs) else lora_feed_forward(self, hidden_states)
    return self._plain_forward(hidden_states, *args, **kwargs) if out is None else out


_FUSED_FF_CLASSES: dict[type, type] = {}


def fuse_feed_forwards(model: nn.Module) -> int:
    """Give every diffusers FeedForward of `model` the forward above (a subclass, as fuse_lora_linears
    does for the linears); it runs the usual forward wherever lora_feed_forward does not apply (no fp8
    copies, another activation, dropout). Returns how many modules were changed."""
    from diffusers.models.attention import FeedForward

    return give_forward(model, FeedForward, _fused_ff_forward, "_plain_forward", _FUSED_FF_CLASSES)
