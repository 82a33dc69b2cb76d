"""Float32 tensors cast to bfloat16 or float16 whose gradient is cast back in one vectorised pass:
:func:`cast`, and :func:`fork_cast` for a tensor used both as it is and cast.

Under mixed precision the experts' float32 weights are cast to the compute dtype at every forward
pass, and each backward pass casts their bfloat16 gradients back to float32; for MoE models the
experts hold most of the parameters. PyTorch's float32 to bfloat16 copy is vectorised, but its
bfloat16 (or float16) to float32 copy converts one element at a time: on an H200 it moved about
2 TB/s on the expert weights' gradients. The backward of :func:`cast` runs the kernel of
``src_cuda/cast.cu`` instead, which reads and writes 16-byte vectors; converting to float32 is
exact, so the values are those of PyTorch's copy.

Under ``torch.compile`` the plain ``x.to(dtype)`` is traced instead: inductor writes its own
vectorised casts and can fuse them with their neighbours.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_moe.ops.extension import require_extension, use_cuda_kernels

NARROW_DTYPES = (torch.bfloat16, torch.float16)
# The kernel moves 16-byte vectors from the start of the tensor.
ALIGNMENT_BYTES = 16


def to_float(x: Tensor, addend: Tensor | None = None) -> Tensor:
    """``x.float()``, or ``addend + x.float()``, for a bfloat16 or float16 ``x``, through the kernel
    where it applies (contiguous CUDA tensors starting on a 16-byte boundary, a float32 addend of
    ``x``'s shape, the extension loaded)."""
    tensors = (x,) if addend is None else (x, addend)
    if x.dtype in NARROW_DTYPES and (addend is None or (addend.dtype == torch.float32 and addend.shape == x.shape)):
        if all(_kernel_layout(t) for t in tensors) and use_cuda_kernels(*tensors):
            return require_extension().cast_to_float(x, addend)
    return x.float() if addend is None else addend + x.float()


def _kernel_layout(t: Tensor) -> bool:
    return t.is_cuda and t.is_contiguous() and t.data_ptr() % ALIGNMENT_BYTES == 0


class _CastFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, dtype: torch.dtype) -> Tensor:
        return x.to(dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return to_float(grad), None


def cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x.to(dtype)``, with the same values and gradient; for a float32 CUDA tensor cast to
    bfloat16 or float16 the gradient is cast back by :func:`to_float`.

    Args:
        x: Tensor of any dtype and shape.
        dtype: The dtype to cast to.

    Returns:
        ``x`` itself when it already has ``dtype``, else a new tensor; gradients flow to ``x``.
    """
    if x.dtype == dtype:
        return x
    if x.dtype == torch.float32 and dtype in NARROW_DTYPES and x.is_cuda and not torch.compiler.is_compiling():
        if x.requires_grad and torch.is_grad_enabled() and use_cuda_kernels(x):
            return _CastFunction.apply(x, dtype)
    return x.to(dtype)


class _ForkCastFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not zeros
        return x, x.to(dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_x: Tensor | None, grad_cast: Tensor | None) -> tuple[Tensor | None, None]:
        if grad_cast is None:
            return grad_x, None
        return to_float(grad_cast, None if grad_x is None else grad_x.contiguous()), None


def fork_cast(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(x, x.to(dtype))``, for two consumers of ``x`` of which one takes it in ``dtype``.

    Autograd would cast the second output's gradient back to float32 and then add the first's;
    for a float32 CUDA ``x`` cast to bfloat16 or float16 one kernel does both (:func:`to_float`
    with an addend), reading each gradient once. The MoE layer gives the first output to the router
    and the second, in the experts' compute dtype, to the permutation.

    Args:
        x: Tensor of any dtype and shape.
        dtype: The dtype of the second output.

    Returns:
        ``x`` (or a view of it) and its cast; gradients of both flow to ``x``.
    """
    if x.dtype == torch.float32 and dtype in NARROW_DTYPES and x.is_cuda and not torch.compiler.is_compiling():
        if x.requires_grad and torch.is_grad_enabled() and use_cuda_kernels(x):
            return _ForkCastFunction.apply(x, dtype)
    return x, cast(x, dtype)
