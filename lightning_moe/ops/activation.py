"""The experts' activations, fused: the ``lightning_moe::activation`` op.

Shape legend: N rows, F expert hidden.

Plain experts apply ``act(a)`` to ``a = x @ w1.T``; SwiGLU (act = SiLU) and GeGLU (act = the erf
GELU) experts gate it with ``b = x @ w3.T``: ``act(a) * b``. Eager PyTorch runs a gated activation
as two kernels forward and about four backward, each a pass over (N, F) tensors, and keeps
``act(a)`` for the backward; its erf GELU is bound by arithmetic rather than by memory. On CUDA
with the extension loaded the kernels of ``src_cuda/activation.cu`` do either in one elementwise
launch each way, in float32, rounding each output once; the backward recomputes ``act(a)`` from
the saved inputs. The erf in the GELU is evaluated to within 1.5e-7 (below float32's resolution of
values near 1) from one exponential rather than by ``erff``. Elementwise, so the results are the
same on every run. Elsewhere (CPU, float64, mixed dtypes, no extension) the functions of
:mod:`lightning_moe.layers.activations` and :func:`lightning_moe.ops.reference.glu` run.

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
KernelActivation = Literal["gelu", "gelu_tanh", "relu", "silu"]
KERNEL_ACTIVATIONS: tuple[str, ...] = get_args(KernelActivation)


def _forward(a_NF: Tensor, gate_NF: Tensor | None, name: str) -> Tensor:
    return require_extension().activation_forward(a_NF, gate_NF, name)


def _backward_kernel(grad_NF: Tensor, a_NF: Tensor, gate_NF: Tensor | None, name: str) -> tuple[Tensor, Tensor | None]:
    grad_a, grad_gate = require_extension().activation_backward(grad_NF.contiguous(), a_NF, gate_NF, name)
    return grad_a, grad_gate


@torch.library.custom_op("lightning_moe::activation", mutates_args=())
def _activation_cuda(a_NF: Tensor, gate_NF: Tensor | None, name: str) -> Tensor:
    return _forward(a_NF, gate_NF, name)


@_activation_cuda.register_fake
def _(a_NF: Tensor, gate_NF: Tensor | None, name: str) -> Tensor:
    return torch.empty_like(a_NF)


@torch.library.custom_op("lightning_moe::activation_backward", mutates_args=())
def _activation_backward_cuda(
    grad_NF: Tensor, a_NF: Tensor, gate_NF: Tensor | None, name: str
) -> tuple[Tensor, Tensor]:
    grad_a, grad_gate = _backward_kernel(grad_NF, a_NF, gate_NF, name)
    # A custom op returns tensors only: no gate, no gradient, shown as an empty tensor.
    return grad_a, a_NF.new_empty(0) if grad_gate is None else grad_gate


@_activation_backward_cuda.register_fake
def _(grad_NF: Tensor, a_NF: Tensor, gate_NF: Tensor | None, name: str) -> tuple[Tensor, Tensor]:
    return torch.empty_like(a_NF), a_NF.new_empty(0) if gate_NF is None else torch.empty_like(gate_NF)


def _setup_context(ctx: Any, inputs: tuple[Tensor, Tensor | None, str], output: Tensor | None) -> None:
    a_NF, gate_NF, name = inputs
    ctx.save_for_backward(a_NF, gate_NF)  # not act(a): the backward recomputes it
    ctx.name = name


def _backward(ctx: Any, grad_NF: Tensor) -> tuple[Tensor, Tensor | None, None]:
    a_NF, gate_NF = ctx.saved_tensors
    grad_a, grad_gate = torch.ops.lightning_moe.activation_backward(grad_NF.contiguous(), a_NF, gate_NF, ctx.name)
    return grad_a, None if gate_NF is None else grad_gate, None


_activation_cuda.register_autograd(_backward, setup_context=_setup_context)


class _ActivationFunction(torch.autograd.Function):
    """The eager path: the same kernels as the custom op, at less host time per call."""

    @staticmethod
    def forward(ctx: Any, a_NF: Tensor, gate_NF: Tensor | None, name: str) -> Tensor:
        _setup_context(ctx, (a_NF, gate_NF, name), None)
        return _forward(a_NF, gate_NF, name)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_NF: Tensor) -> tuple[Tensor, Tensor | None, None]:
        a_NF, gate_NF = ctx.saved_tensors
        grad_a, grad_gate = _backward_kernel(grad_NF, a_NF, gate_NF, ctx.name)
        return grad_a, grad_gate, None


def _run_kernels(a_NF: Tensor, gate_NF: Tensor | None, name: str) -> Tensor:
    args = (a_NF.contiguous(), None if gate_NF is None else gate_NF.contiguous(), name)
    if torch.compiler.is_compiling():
        return torch.ops.lightning_moe.activation(*args)
    return _ActivationFunction.apply(*args)


def _kernels_apply(a_NF: Tensor, gate_NF: Tensor | None = None) -> bool:
    tensors = (a_NF,) if gate_NF is None else (a_NF, gate_NF)
    return a_NF.dtype in KERNEL_DTYPES and all(t.dtype == a_NF.dtype for t in tensors) and use_cuda_kernels(*tensors)


def activation(a_NF: Tensor, name: KernelActivation) -> Tensor:
    """``act(a_NF)`` for the activation called ``name``, as in :mod:`lightning_moe.layers.activations`.

    Args:
        a_NF: (N, F) pre-activations ``x @ w1.T`` (any shape works: the op is elementwise).
        name: ``"gelu"`` (the erf GELU), ``"gelu_tanh"``, ``"relu"`` or ``"silu"``.

    Returns:
        ``a_NF``'s shape and dtype; gradients flow to ``a_NF``.
    """
    if name not in KERNEL_ACTIVATIONS:
        raise ValueError(f"Unknown activation {name!r}; choose one of {', '.join(map(repr, KERNEL_ACTIVATIONS))}.")
    if _kernels_apply(a_NF):
        return _run_kernels(a_NF, None, name)
    return reference.activation(a_NF, name)


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
    if _kernels_apply(a_NF, b_NF):
        return _run_kernels(a_NF, b_NF, reference.GLU_GATES[kind])
    return reference.glu(a_NF, b_NF, kind)
