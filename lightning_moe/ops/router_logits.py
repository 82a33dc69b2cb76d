"""A router's float32 logits and their gradients: the ``lightning_moe::router_logits`` op.

Shape legend: T tokens, D model dim, E experts.

``logits_TE = x_TD @ weight_ED.T`` in float32, for ``x_TD`` in float32, bfloat16 or float16 and a
float32 weight, computed by the kernels of ``src_cuda/router_logits.cu``: x is read in its own dtype
(no float32 copy of it forward or backward), ``grad_x`` is written once in x's dtype, ``grad_weight``
is summed over chunks of tokens in a fixed order (no atomics, the same result on every run), and
nothing synchronises with the host. The kernels take 1 to :data:`MAX_KERNEL_EXPERTS` experts and
any D; they are fastest when rows of x are 16 bytes aligned (D a multiple of 8 in bfloat16 or
float16, of 4 in float32).

:func:`router_logits` takes the kernels when :func:`kernels_accept` the inputs (a bfloat16 or
float16 weight is widened to float32 first), and :func:`lightning_moe.ops.reference.router_logits`
otherwise (CPU, float64, more experts, no extension), which computes the same float32 product
without keeping a float32 copy of x either.

The kernels are registered as ``torch.library`` custom ops, which ``torch.compile`` traces through;
eager calls take the same kernels through a plain ``autograd.Function`` (see
:mod:`lightning_moe.ops.permute`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_moe.ops import reference
from lightning_moe.ops.extension import require_extension, use_cuda_kernels

# Above this many experts cuBLAS on a float32 copy of x wins (kRouterLogitsMaxExperts in router_logits.h).
MAX_KERNEL_EXPERTS = 256
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _forward(x_TD: Tensor, weight_ED: Tensor) -> Tensor:
    return require_extension().router_logits_forward(x_TD, weight_ED)


def _grad_x(grad_TE: Tensor, weight_ED: Tensor, x_dtype: torch.dtype) -> Tensor:
    return require_extension().router_logits_grad_x(grad_TE, weight_ED, x_dtype)


def _grad_weight(grad_TE: Tensor, x_TD: Tensor) -> Tensor:
    return require_extension().router_logits_grad_weight(grad_TE, x_TD)


@torch.library.custom_op("lightning_moe::router_logits", mutates_args=())
def _router_logits_cuda(x_TD: Tensor, weight_ED: Tensor) -> Tensor:
    return _forward(x_TD, weight_ED)


@_router_logits_cuda.register_fake
def _(x_TD: Tensor, weight_ED: Tensor) -> Tensor:
    return x_TD.new_empty(x_TD.shape[0], weight_ED.shape[0], dtype=torch.float32)


@torch.library.custom_op("lightning_moe::router_logits_grad_x", mutates_args=())
def _router_logits_grad_x_cuda(grad_TE: Tensor, weight_ED: Tensor, x_dtype: torch.dtype) -> Tensor:
    return _grad_x(grad_TE, weight_ED, x_dtype)


@_router_logits_grad_x_cuda.register_fake
def _(grad_TE: Tensor, weight_ED: Tensor, x_dtype: torch.dtype) -> Tensor:
    return grad_TE.new_empty(grad_TE.shape[0], weight_ED.shape[1], dtype=x_dtype)


@torch.library.custom_op("lightning_moe::router_logits_grad_weight", mutates_args=())
def _router_logits_grad_weight_cuda(grad_TE: Tensor, x_TD: Tensor) -> Tensor:
    return _grad_weight(grad_TE, x_TD)


@_router_logits_grad_weight_cuda.register_fake
def _(grad_TE: Tensor, x_TD: Tensor) -> Tensor:
    return grad_TE.new_empty(grad_TE.shape[1], x_TD.shape[1], dtype=torch.float32)


def _setup_context(ctx: Any, inputs: tuple[Tensor, Tensor], output: Tensor | None) -> None:
    ctx.save_for_backward(*inputs)  # x in its own dtype: no float32 copy is kept


def _backward(ctx: Any, grad_TE: Tensor) -> tuple[Tensor | None, Tensor | None]:
    x_TD, weight_ED = ctx.saved_tensors
    grad_TE = grad_TE.float().contiguous()
    grad_x = grad_weight = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.lightning_moe.router_logits_grad_x(grad_TE, weight_ED, x_TD.dtype)
    if ctx.needs_input_grad[1]:
        grad_weight = torch.ops.lightning_moe.router_logits_grad_weight(grad_TE, x_TD)
    return grad_x, grad_weight


_router_logits_cuda.register_autograd(_backward, setup_context=_setup_context)


class _RouterLogitsFunction(torch.autograd.Function):
    """The eager path: the same kernels as the custom op, at less host time per call."""

    @staticmethod
    def forward(ctx: Any, x_TD: Tensor, weight_ED: Tensor) -> Tensor:
        _setup_context(ctx, (x_TD, weight_ED), None)
        return _forward(x_TD, weight_ED)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_TE: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x_TD, weight_ED = ctx.saved_tensors
        grad_TE = grad_TE.float().contiguous()
        grad_x = _grad_x(grad_TE, weight_ED, x_TD.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = _grad_weight(grad_TE, x_TD) if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight


def kernels_accept(x_TD: Tensor, weight_ED: Tensor) -> bool:
    """Whether :func:`router_logits` can take these inputs.

    True for a 2-D ``x_TD`` in float32, bfloat16 or float16 with D >= 1, a float32 (E, D)
    ``weight_ED`` with 1 <= E <= :data:`MAX_KERNEL_EXPERTS`, both on CUDA, and the extension
    loaded. The device comes last, so CPU tensors never trigger a build.
    """
    if x_TD.dim() != 2 or weight_ED.dim() != 2:
        return False
    num_experts, dim = weight_ED.shape
    return (
        x_TD.shape[1] == dim >= 1
        and 1 <= num_experts <= MAX_KERNEL_EXPERTS
        and x_TD.dtype in KERNEL_DTYPES
        and weight_ED.dtype == torch.float32
        and use_cuda_kernels(x_TD, weight_ED)
    )


def router_logits(x_TD: Tensor, weight_ED: Tensor) -> Tensor:
    """Float32 (float64 for float64 inputs) router logits ``x_TD @ weight_ED.T``, whatever the
    tokens' dtype and autocast.

    Args:
        x_TD: (T, D) tokens of any floating dtype.
        weight_ED: (E, D) router weight.

    Returns:
        (T, E) logits; gradients flow to both inputs, each in its own dtype.
    """
    # A half-precision weight (a model cast whole to bf16) is widened for the kernels: an (E, D)
    # copy, small next to the tokens, and its gradient is narrowed back by autograd. Off CUDA the
    # reference takes the weight as it is, so no copy is made there.
    widen = weight_ED.is_cuda and weight_ED.dtype in (torch.bfloat16, torch.float16)
    weight_f32 = weight_ED.float() if widen else weight_ED
    if kernels_accept(x_TD, weight_f32):
        return _kernel_router_logits(x_TD, weight_f32)
    return reference.router_logits(x_TD, weight_ED)


def _kernel_router_logits(x_TD: Tensor, weight_ED: Tensor) -> Tensor:
    """The kernels, for inputs that :func:`kernels_accept` (float32 weight, CUDA)."""
    x_TD, weight_ED = x_TD.contiguous(), weight_ED.contiguous()
    if torch.compiler.is_compiling():
        return torch.ops.lightning_moe.router_logits(x_TD, weight_ED)
    return _RouterLogitsFunction.apply(x_TD, weight_ED)
