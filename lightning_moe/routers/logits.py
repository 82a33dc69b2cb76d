"""Router logits in float32, whatever the input dtype and autocast.

Shape legend: T tokens, D model dim, E experts.

``x.float() @ weight.float().t()`` written plainly has two costs this avoids: autograd keeps the
float32 copy of ``x`` (T, D) alive until the backward pass, which is 4 bytes per element of
activation memory on top of the (T, D) input it already keeps; and under ``torch.autocast`` the
matmul would run in the autocast dtype, so the logits would not be float32 at all. Here the
float32 copy is made again in the backward pass instead of kept, and autocast is off for the two
matmuls, so logits and gradients are those of the float32 computation.

On CUDA the kernels of :mod:`lightning_moe.ops.router_logits` do the same with no float32 copy at
all (x is read in its own dtype, grad_x written in it), for x in float32, bfloat16 or float16, a
float32 weight (a bfloat16 or float16 one is widened first) and up to 256 experts. The autograd
Function here is their reference, and what runs elsewhere: on CPU, without the extension, for
float64, and for more experts.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

from lightning_moe.ops.router_logits import kernels_accept
from lightning_moe.ops.router_logits import router_logits as kernel_router_logits

# Device types torch.autocast accepts; on any other, autocast cannot be on in the first place.
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager[Any]:
    if device_type in _AUTOCAST_DEVICES:
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _compute_dtype(x_TD: Tensor, weight_ED: Tensor) -> torch.dtype:
    """float32, or float64 when an input is float64 (so that gradcheck can run)."""
    return torch.promote_types(torch.promote_types(x_TD.dtype, weight_ED.dtype), torch.float32)


class _RouterLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x_TD: Tensor, weight_ED: Tensor) -> Tensor:
        ctx.save_for_backward(x_TD, weight_ED)
        with _autocast_off(x_TD.device.type):
            dtype = _compute_dtype(x_TD, weight_ED)
            return x_TD.to(dtype) @ weight_ED.to(dtype).t()

    @staticmethod
    def backward(ctx: Any, grad_TE: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x_TD, weight_ED = ctx.saved_tensors
        grad_x = grad_weight = None
        with _autocast_off(grad_TE.device.type):
            dtype = _compute_dtype(x_TD, weight_ED)
            grad_TE = grad_TE.to(dtype)
            if ctx.needs_input_grad[0]:
                grad_x = (grad_TE @ weight_ED.to(dtype)).to(x_TD.dtype)
            if ctx.needs_input_grad[1]:
                grad_weight = (grad_TE.t() @ x_TD.to(dtype)).to(weight_ED.dtype)
        return grad_x, grad_weight


def router_logits(x_TD: Tensor, weight_ED: Tensor) -> Tensor:
    """Float32 (float64 for float64 inputs) ``x_TD @ weight_ED.T``.

    Args:
        x_TD: (T, D) tokens of any floating dtype.
        weight_ED: (E, D) router weight.

    Returns:
        (T, E) logits; gradients flow to both inputs, each in its own dtype.
    """
    # A half-precision weight (a model cast whole to bf16) is widened first: an (E, D) copy, small
    # next to the tokens, and its gradient is narrowed back by autograd.
    weight_f32 = weight_ED.float() if weight_ED.dtype in (torch.bfloat16, torch.float16) else weight_ED
    if kernels_accept(x_TD, weight_f32):
        return kernel_router_logits(x_TD, weight_f32)
    return _RouterLogits.apply(x_TD, weight_ED)
