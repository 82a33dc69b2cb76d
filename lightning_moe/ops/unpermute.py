"""The weighted combine of expert outputs back into token order: the ``lightning_moe::unpermute`` op.

Shape legend: T tokens, D model dim, N assignments.

Forward: ``out[t] = sum over t's assignments a of weights[a] * y_ND[inverse[a]]``, in float32.
Backward: ``grad_y[inverse[a]] = weights[a] * grad_out[t]`` and
``grad_weights[a] = dot(grad_out[t], y_ND[inverse[a]])``. Both directions visit each token's
assignments in order, without atomics, so the results are the same on every run. On CUDA with the
extension loaded the kernels of ``src_cuda/unpermute.cu`` run; elsewhere
:func:`lightning_moe.ops.reference.unpermute`. Like :mod:`lightning_moe.ops.permute`, ``torch.compile``
traces the custom ops and eager calls take the same kernels through a plain ``autograd.Function``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_moe.ops import reference
from lightning_moe.ops.extension import require_extension, use_cuda_kernels
from lightning_moe.ops.permute import KERNEL_DTYPES


def _forward(
    y_sorted: Tensor, inverse: Tensor, weights: Tensor, token_offsets: Tensor, out_dtype: torch.dtype
) -> Tensor:
    return require_extension().unpermute_forward(y_sorted, inverse, weights, token_offsets, out_dtype)


def _backward_kernel(
    grad_out: Tensor, y_sorted: Tensor, inverse: Tensor, weights: Tensor, token_offsets: Tensor
) -> tuple[Tensor, Tensor]:
    grad_y, grad_weights = require_extension().unpermute_backward(
        grad_out.contiguous(), y_sorted, inverse, weights, token_offsets
    )
    return grad_y, grad_weights


@torch.library.custom_op("lightning_moe::unpermute", mutates_args=())
def _unpermute_cuda(
    y_sorted: Tensor, inverse: Tensor, weights: Tensor, token_offsets: Tensor, out_dtype: torch.dtype
) -> Tensor:
    return _forward(y_sorted, inverse, weights, token_offsets, out_dtype)


@_unpermute_cuda.register_fake
def _(y_sorted: Tensor, inverse: Tensor, weights: Tensor, token_offsets: Tensor, out_dtype: torch.dtype) -> Tensor:
    return y_sorted.new_empty(token_offsets.shape[0] - 1, y_sorted.shape[1], dtype=out_dtype)


@torch.library.custom_op("lightning_moe::unpermute_backward", mutates_args=())
def _unpermute_backward_cuda(
    grad_out: Tensor, y_sorted: Tensor, inverse: Tensor, weights: Tensor, token_offsets: Tensor
) -> tuple[Tensor, Tensor]:
    return _backward_kernel(grad_out, y_sorted, inverse, weights, token_offsets)


@_unpermute_backward_cuda.register_fake
def _(
    grad_out: Tensor, y_sorted: Tensor, inverse: Tensor, weights: Tensor, token_offsets: Tensor
) -> tuple[Tensor, Tensor]:
    return torch.empty_like(y_sorted), torch.empty_like(weights)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor | None) -> None:
    y_sorted, inverse, weights, token_offsets, _ = inputs
    ctx.save_for_backward(y_sorted, inverse, weights, token_offsets)


def _backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, Tensor, None, None]:
    y_sorted, inverse, weights, token_offsets = ctx.saved_tensors
    grad_y, grad_weights = torch.ops.lightning_moe.unpermute_backward(
        grad_out.contiguous(), y_sorted, inverse, weights, token_offsets
    )
    return grad_y, None, grad_weights, None, None


_unpermute_cuda.register_autograd(_backward, setup_context=_setup_context)


class _UnpermuteFunction(torch.autograd.Function):
    """The eager path: the same kernels as the custom op, at less host time per call."""

    @staticmethod
    def forward(
        ctx: Any, y_sorted: Tensor, inverse: Tensor, weights: Tensor, token_offsets: Tensor, out_dtype: torch.dtype
    ) -> Tensor:
        _setup_context(ctx, (y_sorted, inverse, weights, token_offsets, out_dtype), None)
        return _forward(y_sorted, inverse, weights, token_offsets, out_dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, Tensor, None, None]:
        y_sorted, inverse, weights, token_offsets = ctx.saved_tensors
        grad_y, grad_weights = _backward_kernel(grad_out, y_sorted, inverse, weights, token_offsets)
        return grad_y, None, grad_weights, None, None


def unpermute(
    y_ND: Tensor,
    token_ids: Tensor,
    inverse: Tensor,
    weights: Tensor,
    num_tokens: int,
    out_dtype: torch.dtype = torch.float32,
    token_offsets: Tensor | None = None,
) -> Tensor:
    """Sum each token's weighted expert outputs, in float32.

    Args:
        y_ND: (N, D) expert outputs in expert-sorted order.
        token_ids: (N,) int64 token of each assignment, sorted non-decreasing (token-major).
        inverse: (N,) int64 sorted position of each assignment, from :func:`sort_by_expert`.
        weights: (N,) float32 combine weight of each assignment.
        num_tokens: T.
        out_dtype: dtype of the result (float32, bfloat16 or float16 on the CUDA path).
        token_offsets: Optional (T + 1,) int64 from :func:`token_offsets`, to share between ops.

    Returns:
        (T, D) in ``out_dtype``; tokens without assignments get zeros.
    """
    on_kernel = y_ND.dtype in KERNEL_DTYPES and out_dtype in KERNEL_DTYPES and weights.dtype == torch.float32
    if on_kernel and y_ND.dim() == 2 and use_cuda_kernels(y_ND, token_ids, inverse, weights):
        if token_offsets is None:
            token_offsets = reference.token_offsets(token_ids, num_tokens)
        args = (y_ND.contiguous(), inverse.contiguous(), weights.contiguous(), token_offsets, out_dtype)
        if torch.compiler.is_compiling():
            return torch.ops.lightning_moe.unpermute(*args)
        return _UnpermuteFunction.apply(*args)
    return reference.unpermute(y_ND, token_ids, inverse, weights, num_tokens, out_dtype)
