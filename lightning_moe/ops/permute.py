"""Rows of tokens to rows of assignments in expert order: the ``lightning_moe::permute`` op.

Shape legend: T tokens, D model dim, N assignments.

Forward: ``x_ND[inverse[a]] = x_TD[t]`` for each assignment a of token t. Backward:
``grad_x[t] = sum over t's assignments a of grad_ND[inverse[a]]``, summed in float32 in a fixed
order (no atomics), so gradients are the same on every run. On CUDA with the extension loaded the
kernels of ``src_cuda/permute.cu`` run; elsewhere :func:`lightning_moe.ops.reference.permute`.

The kernels are registered as ``torch.library`` custom ops, which ``torch.compile`` traces through.
Eager calls take the same kernels through a plain ``autograd.Function`` instead: the custom-op
dispatch measured about 240 us of host time per forward + backward on an H200 machine, which for
small layers is longer than the kernels themselves.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_moe.ops import reference
from lightning_moe.ops.extension import require_extension, use_cuda_kernels

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _forward(x: Tensor, inverse: Tensor, token_offsets: Tensor) -> Tensor:
    return require_extension().permute_forward(x, inverse, token_offsets)


def _backward_kernel(grad_sorted: Tensor, inverse: Tensor, token_offsets: Tensor, x_dtype: torch.dtype) -> Tensor:
    return require_extension().permute_backward(grad_sorted.contiguous(), inverse, token_offsets, x_dtype)


@torch.library.custom_op("lightning_moe::permute", mutates_args=())
def _permute_cuda(x: Tensor, inverse: Tensor, token_offsets: Tensor) -> Tensor:
    return _forward(x, inverse, token_offsets)


@_permute_cuda.register_fake
def _(x: Tensor, inverse: Tensor, token_offsets: Tensor) -> Tensor:
    return x.new_empty(inverse.shape[0], x.shape[1])


@torch.library.custom_op("lightning_moe::permute_backward", mutates_args=())
def _permute_backward_cuda(grad_sorted: Tensor, inverse: Tensor, token_offsets: Tensor, x_dtype: torch.dtype) -> Tensor:
    return _backward_kernel(grad_sorted, inverse, token_offsets, x_dtype)


@_permute_backward_cuda.register_fake
def _(grad_sorted: Tensor, inverse: Tensor, token_offsets: Tensor, x_dtype: torch.dtype) -> Tensor:
    return grad_sorted.new_empty(token_offsets.shape[0] - 1, grad_sorted.shape[1], dtype=x_dtype)


def _setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, Tensor], output: Tensor | None) -> None:
    x, inverse, token_offsets = inputs
    ctx.save_for_backward(inverse, token_offsets)
    ctx.x_dtype = x.dtype


def _backward(ctx: Any, grad_sorted: Tensor) -> tuple[Tensor, None, None]:
    inverse, token_offsets = ctx.saved_tensors
    grad_x = torch.ops.lightning_moe.permute_backward(grad_sorted.contiguous(), inverse, token_offsets, ctx.x_dtype)
    return grad_x, None, None


_permute_cuda.register_autograd(_backward, setup_context=_setup_context)


class _PermuteFunction(torch.autograd.Function):
    """The eager path: the same kernels as the custom op, at less host time per call."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, inverse: Tensor, token_offsets: Tensor) -> Tensor:
        _setup_context(ctx, (x, inverse, token_offsets), None)
        return _forward(x, inverse, token_offsets)

    @staticmethod
    def backward(ctx: Any, grad_sorted: Tensor) -> tuple[Tensor, None, None]:
        inverse, token_offsets = ctx.saved_tensors
        return _backward_kernel(grad_sorted, inverse, token_offsets, ctx.x_dtype), None, None


def permute(x_TD: Tensor, token_ids: Tensor, inverse: Tensor, token_offsets: Tensor | None = None) -> Tensor:
    """One row of ``x_TD`` per assignment, in expert-sorted order.

    Args:
        x_TD: (T, D) tokens.
        token_ids: (N,) int64 token of each assignment, sorted non-decreasing (token-major).
        inverse: (N,) int64 sorted position of each assignment, from :func:`sort_by_expert`.
        token_offsets: Optional (T + 1,) int64 from :func:`token_offsets`, to share between ops.

    Returns:
        (N, D) in ``x_TD``'s dtype: row ``inverse[a]`` is ``x_TD[token_ids[a]]``.
    """
    if x_TD.dtype in KERNEL_DTYPES and x_TD.dim() == 2 and use_cuda_kernels(x_TD, token_ids, inverse):
        if token_offsets is None:
            token_offsets = reference.token_offsets(token_ids, x_TD.shape[0])
        args = (x_TD.contiguous(), inverse.contiguous(), token_offsets)
        if torch.compiler.is_compiling():
            return torch.ops.lightning_moe.permute(*args)
        return _PermuteFunction.apply(*args)
    return reference.permute(x_TD, token_ids, inverse)
