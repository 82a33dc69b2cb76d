"""The gated activation of GLU experts, ``h = act(a) * b``, fused: the ``lightning_moe::glu`` op.

Shape legend: N rows, F expert hidden.

SwiGLU (act = SiLU) and GeGLU (act = the erf GELU) experts gate ``a = x @ w1.T`` with
``b = x @ w3.T``. Eager PyTorch runs that as two kernels forward and about four backward, each a
pass over (N, F) tensors, and keeps ``act(a)`` for the backward. On CUDA with the extension loaded
the kernels of ``src_cuda/glu.cu`` do it in one elementwise launch each way, in float32, rounding
each output once; the backward recomputes ``act(a)`` from the saved ``a`` and ``b``. Elementwise, so
the results are the same on every run. Elsewhere (CPU, float64, mixed dtypes, no extension)
:func:`lightning_moe.ops.reference.glu` runs.

The kernels are registered as ``torch.library`` custom ops, which ``torch.compile`` traces through;
eager calls take the same kernels through a plain ``autograd.Function`` (see
:mod:`lightning_moe.ops.permute`).
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch
from torch import Tensor

from lightning_moe.ops import reference
from lightning_moe.ops.extension import require_extension, use_cuda_kernels
from lightning_moe.ops.permute import KERNEL_DTYPES

GluKind = Literal["swiglu", "geglu"]
GLU_KINDS: tuple[str, ...] = get_args(GluKind)


def _forward(a_NF: Tensor, b_NF: Tensor, kind: str) -> Tensor:
    return require_extension().glu_forward(a_NF, b_NF, kind)


def _backward_kernel(grad_NF: Tensor, a_NF: Tensor, b_NF: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    grad_a, grad_b = require_extension().glu_backward(grad_NF.contiguous(), a_NF, b_NF, kind)
    return grad_a, grad_b


@torch.library.custom_op("lightning_moe::glu", mutates_args=())
def _glu_cuda(a_NF: Tensor, b_NF: Tensor, kind: str) -> Tensor:
    return _forward(a_NF, b_NF, kind)


@_glu_cuda.register_fake
def _(a_NF: Tensor, b_NF: Tensor, kind: str) -> Tensor:
    return torch.empty_like(a_NF)


@torch.library.custom_op("lightning_moe::glu_backward", mutates_args=())
def _glu_backward_cuda(grad_NF: Tensor, a_NF: Tensor, b_NF: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    return _backward_kernel(grad_NF, a_NF, b_NF, kind)


@_glu_backward_cuda.register_fake
def _(grad_NF: Tensor, a_NF: Tensor, b_NF: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    return torch.empty_like(a_NF), torch.empty_like(b_NF)


def _setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, str], output: Tensor | None) -> None:
    a_NF, b_NF, kind = inputs
    ctx.save_for_backward(a_NF, b_NF)  # not act(a): the backward recomputes it
    ctx.kind = kind


def _backward(ctx: Any, grad_NF: Tensor) -> tuple[Tensor, Tensor, None]:
    a_NF, b_NF = ctx.saved_tensors
    grad_a, grad_b = torch.ops.lightning_moe.glu_backward(grad_NF.contiguous(), a_NF, b_NF, ctx.kind)
    return grad_a, grad_b, None


_glu_cuda.register_autograd(_backward, setup_context=_setup_context)


class _GluFunction(torch.autograd.Function):
    """The eager path: the same kernels as the custom op, at less host time per call."""

    @staticmethod
    def forward(ctx: Any, a_NF: Tensor, b_NF: Tensor, kind: str) -> Tensor:
        _setup_context(ctx, (a_NF, b_NF, kind), None)
        return _forward(a_NF, b_NF, kind)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_NF: Tensor) -> tuple[Tensor, Tensor, None]:
        a_NF, b_NF = ctx.saved_tensors
        grad_a, grad_b = _backward_kernel(grad_NF, a_NF, b_NF, ctx.kind)
        return grad_a, grad_b, None


def glu(a_NF: Tensor, b_NF: Tensor, kind: GluKind) -> Tensor:
    """``act(a_NF) * b_NF``, act SiLU for ``"swiglu"`` and the erf GELU for ``"geglu"``.

    Args:
        a_NF: (N, F) pre-activations ``x @ w1.T`` (any shape works: the op is elementwise).
        b_NF: the gate values ``x @ w3.T``, of ``a_NF``'s shape.
        kind: ``"swiglu"`` or ``"geglu"``.

    Returns:
        (N, F) in the inputs' dtype; gradients flow to both inputs.
    """
    if kind not in GLU_KINDS:
        raise ValueError(f"Unknown GLU kind {kind!r}; choose one of {', '.join(map(repr, GLU_KINDS))}.")
    if a_NF.shape != b_NF.shape:
        raise ValueError(f"glu needs a and b of one shape, got {tuple(a_NF.shape)} and {tuple(b_NF.shape)}.")
    if a_NF.dtype in KERNEL_DTYPES and b_NF.dtype == a_NF.dtype and use_cuda_kernels(a_NF, b_NF):
        args = (a_NF.contiguous(), b_NF.contiguous(), kind)
        if torch.compiler.is_compiling():
            return torch.ops.lightning_moe.glu(*args)
        return _GluFunction.apply(*args)
    return reference.glu(a_NF, b_NF, kind)
