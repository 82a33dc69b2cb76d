"""A dropless layer's experts from tokens to tokens in one autograd node: the eager fast path.

Shape legend: T tokens, D model dim, F expert hidden, E experts, N assignments.

:func:`expert_mlp` runs, for expert-sorted assignments, the same kernels as the composition
``permute -> grouped_linear(w1) [, grouped_linear(w3)] -> activation or glu -> grouped_linear(w2)
-> unpermute`` of :mod:`lightning_moe.ops`, in the same order, and saves the same tensors for the
backward, so its outputs and gradients are bit for bit those of the composition. What it saves is
host time: the composition is five autograd nodes, each of which costs the host a Python
``autograd.Function`` call forward and an engine visit backward (about 55 us per node and step on
an H200 machine, where a layer with 128 rows per expert issued its kernels slower than the GPU ran
them). It takes two nodes, not one: permute and the first projection(s), then the activation, the
second projection and the combine. A node holds what it saved, and the gradients it was given,
until its whole backward is done, so one node would keep the activations alive beside both weight
gradients; split there, the peak memory of plain experts is that of the composition. Gated experts
(the GLUs) give their first node two projections, whose weight gradients it then holds together,
where the composition casts and accumulates one before it makes the other: their peak can be one
projection's weight gradient higher, which is why :class:`lightning_moe.layers.experts.GroupedExperts`
takes this path for plain experts only.

With one assignment per token (a top-1 token-choice routing, dropless), the caller passes the
sort's ``order`` and two row kernels go: the second projection's kernel writes the combined output
in token order beside its rows, and the first projection's input gradient is written in token order
by its own kernel, so the permutation's backward has nothing left to do (the epilogues of
:func:`lightning_moe.ops.grouped_linear.forward_and_combine_tokens` and
:func:`~lightning_moe.ops.grouped_linear.input_grad_to_tokens`, with the row kernels' arithmetic).

It is eager only: under ``torch.compile`` the layer keeps the composition, whose custom ops the
compiler traces. :func:`expert_mlp_usable` says when it applies (bfloat16, and the grouped GEMM
kernels of :mod:`lightning_moe.ops.grouped_linear` usable); experts with biases do not take it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_moe.ops.activation import _backward_kernel as _activation_backward
from lightning_moe.ops.activation import _forward as _activation
from lightning_moe.ops.extension import use_cuda_kernels
from lightning_moe.ops.grouped_linear import _forward as _linear
from lightning_moe.ops.grouped_linear import _input_grad as _linear_input_grad
from lightning_moe.ops.grouped_linear import _weight_grad as _linear_weight_grad
from lightning_moe.ops.grouped_linear import (
    forward_and_combine_tokens,
    grouped_linear_usable,
    input_grad_to_tokens,
    token_epilogues_usable,
)
from lightning_moe.ops.permute import _backward_kernel as _permute_backward
from lightning_moe.ops.permute import _forward as _permute
from lightning_moe.ops.reference import GLU_GATES
from lightning_moe.ops.token_grad import TokenGradSum
from lightning_moe.ops.unpermute import _backward_kernel as _unpermute_backward
from lightning_moe.ops.unpermute import _forward as _unpermute


def expert_mlp_usable(x_TD: Tensor, num_rows: int, num_experts: int, d_model: int, d_hidden: int) -> bool:
    """Whether :func:`expert_mlp` runs for tokens like ``x_TD`` and ``num_rows`` assignments over
    ``num_experts`` experts of ``d_model`` x ``d_hidden``: eager (not compiling), bfloat16 tokens
    on CUDA with the extension loaded, and sizes that
    :func:`lightning_moe.ops.grouped_linear.grouped_linear_usable` takes."""
    if torch.compiler.is_compiling() or x_TD.dtype != torch.bfloat16 or not use_cuda_kernels(x_TD):
        return False
    return grouped_linear_usable(num_rows, num_experts, d_model, d_hidden, x_TD.device)


def expert_mlp(
    x_TD: Tensor,
    inverse: Tensor,
    token_offsets: Tensor,
    weights: Tensor,
    expert_ends: Tensor,
    w1_EFD: Tensor,
    w2_EDF: Tensor,
    w3_EFD: Tensor | None,
    activation: str,
    out_dtype: torch.dtype,
    order: Tensor | None = None,
    token_grads: TokenGradSum | None = None,
) -> Tensor:
    """``out[t] = sum over t's assignments a of weights[a] * mlp_e(x[t])``, e the expert of a.

    ``mlp_e(x) = w2[e] @ act(w1[e] @ x)``, or ``w2[e] @ (act(w1[e] @ x) * (w3[e] @ x))`` for the
    GLUs. Call only where :func:`expert_mlp_usable` holds.

    Args:
        x_TD: (T, D) bfloat16 tokens.
        inverse: (N,) int64 expert-sorted position of each token-major assignment, from
            :func:`lightning_moe.ops.sort_by_expert`.
        token_offsets: (T + 1,) int64 where each token's assignments start.
        weights: (N,) float32 combine weight of each assignment.
        expert_ends: (E,) int32 where each expert's rows end in the sorted order,
            ``cumsum(tokens_per_expert)``, from :func:`lightning_moe.ops.sort_by_expert_with_ends`.
        w1_EFD: (E, F, D) bfloat16 first projection.
        w2_EDF: (E, D, F) bfloat16 second projection.
        w3_EFD: (E, F, D) bfloat16 gate projection of the GLUs ``"swiglu"`` and ``"geglu"``, else None.
        activation: The experts' activation by name (:mod:`lightning_moe.layers.activations`).
        out_dtype: dtype of the result.
        order: Only where every token has exactly one assignment (then N = T and assignment t is
            token t's): the sort's ``order``, (N,) int64, the assignment at each sorted position.
            The combine and the permutation's backward are then written by the GEMM kernels
            themselves, with the same results. None: the row kernels run.
        token_grads: The sum of ``x_TD``'s gradients that the router's node of the same tokens
            joined (:mod:`lightning_moe.ops.token_grad`): the gradient of ``x_TD`` is handed to it,
            to be added into the router's, rather than returned to autograd. None: returned.

    Returns:
        (T, D) in ``out_dtype``; gradients flow to ``x_TD``, ``weights`` and the expert weights.
    """
    if (w3_EFD is None) == (activation in GLU_GATES):
        raise ValueError(f"expert_mlp needs w3 exactly for the GLU activations, got activation {activation!r}.")
    expert_weights = (w1_EFD, w2_EDF) if w3_EFD is None else (w1_EFD, w2_EDF, w3_EFD)
    if any(w.dtype != torch.bfloat16 for w in expert_weights):
        raise ValueError(f"expert_mlp needs bfloat16 weights, got {[w.dtype for w in expert_weights]}.")
    kernel_activation = GLU_GATES.get(activation, activation)
    if expert_ends.dtype != torch.int32:
        raise ValueError(f"expert_mlp needs int32 expert_ends (the sort's cumulative counts), got {expert_ends.dtype}.")
    ends_E = expert_ends.contiguous()
    inverse, weights = inverse.contiguous(), weights.contiguous()
    w1_EFD, w3_EFD = w1_EFD.contiguous(), None if w3_EFD is None else w3_EFD.contiguous()
    if order is not None:
        if order.shape[0] != x_TD.shape[0] or inverse.shape[0] != x_TD.shape[0]:
            raise ValueError(
                f"expert_mlp takes order only for one assignment per token, got {inverse.shape[0]} assignments "
                f"of {x_TD.shape[0]} tokens."
            )
        order = order.contiguous() if token_epilogues_usable() else None
    # The token-order epilogues: the input gradient of plain experts, the combine into bf16.
    input_order = order if w3_EFD is None else None
    output_order = order if out_dtype == torch.bfloat16 else None
    x_TD = x_TD.contiguous()
    projected = _ExpertInputFunction.apply(
        x_TD, inverse, token_offsets, ends_E, w1_EFD, w3_EFD, input_order, token_grads
    )
    a_NF, gate_NF = projected if w3_EFD is not None else (projected, None)
    w2_EDF = w2_EDF.contiguous()
    args = (a_NF, gate_NF, kernel_activation, w2_EDF, ends_E, inverse, weights, token_offsets, out_dtype, output_order)
    return _ExpertOutputFunction.apply(*args)


class _ExpertInputFunction(torch.autograd.Function):
    """Permute, then the first projection(s): ``x_ND @ w1[e].T`` (and ``x_ND @ w3[e].T``)."""

    @staticmethod
    def forward(
        ctx: Any,
        x_TD: Tensor,
        inverse: Tensor,
        token_offsets: Tensor,
        ends_E: Tensor,
        w1_EFD: Tensor,
        w3_EFD: Tensor | None,
        order: Tensor | None,
        token_grads: TokenGradSum | None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        x_ND = _permute(x_TD, inverse, token_offsets)
        ctx.save_for_backward(x_ND, inverse, token_offsets, ends_E, w1_EFD, w3_EFD, order)
        ctx.x_dtype, ctx.token_grads = x_TD.dtype, token_grads
        a_NF = _linear(x_ND, w1_EFD, ends_E)
        return a_NF if w3_EFD is None else (a_NF, _linear(x_ND, w3_EFD, ends_E))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_a: Tensor, grad_gate: Tensor | None = None) -> tuple[Tensor | None, ...]:
        x_ND, inverse, token_offsets, ends_E, w1, w3, order = ctx.saved_tensors
        needs_x, _, _, _, needs_w1, needs_w3, _, _ = ctx.needs_input_grad
        grad_a = grad_a.contiguous()
        if grad_gate is not None:
            grad_gate = grad_gate.contiguous()
        grad_x = grad_w1 = grad_w3 = None
        # The token gradient first: the permuted one is freed before the weight gradients are made,
        # as the composition frees it, so that the peak memory is no higher than the composition's.
        if needs_x and order is not None:  # plain experts, one assignment per token
            grad_x = input_grad_to_tokens(grad_a, w1, ends_E, order)
        elif needs_x:
            grad_x_ND = _linear_input_grad(grad_a, w1, ends_E)
            if w3 is not None:
                assert grad_gate is not None
                grad_x_ND = grad_x_ND + _linear_input_grad(grad_gate, w3, ends_E)
            grad_x = _permute_backward(grad_x_ND, inverse, token_offsets, ctx.x_dtype)
            del grad_x_ND
        if grad_x is not None and ctx.token_grads is not None and ctx.token_grads.give(grad_x):
            grad_x = None  # the router's node adds it into its own gradient of the same tokens
        if needs_w1:
            grad_w1 = _linear_weight_grad(grad_a, x_ND, ends_E)
        if w3 is not None and needs_w3:
            assert grad_gate is not None
            grad_w3 = _linear_weight_grad(grad_gate, x_ND, ends_E)
        return grad_x, None, None, None, grad_w1, grad_w3, None, None


class _ExpertOutputFunction(torch.autograd.Function):
    """The activation, the second projection ``hidden_NF @ w2[e].T`` and the weighted combine."""

    @staticmethod
    def forward(
        ctx: Any,
        a_NF: Tensor,
        gate_NF: Tensor | None,
        kernel_activation: str,
        w2_EDF: Tensor,
        ends_E: Tensor,
        inverse: Tensor,
        weights: Tensor,
        token_offsets: Tensor,
        out_dtype: torch.dtype,
        order: Tensor | None,
    ) -> Tensor:
        hidden_NF = _activation(a_NF, gate_NF, kernel_activation)
        if order is not None:  # one assignment per token, combined into bf16 by the GEMM
            y_ND, out_TD = forward_and_combine_tokens(hidden_NF, w2_EDF, ends_E, order, weights)
        else:
            y_ND = _linear(hidden_NF, w2_EDF, ends_E)
            out_TD = _unpermute(y_ND, inverse, weights, token_offsets, out_dtype)
        ctx.save_for_backward(a_NF, gate_NF, hidden_NF, y_ND, w2_EDF, ends_E, inverse, weights, token_offsets)
        ctx.kernel_activation = kernel_activation
        return out_TD

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_TD: Tensor) -> tuple[Tensor | None, ...]:
        a_NF, gate_NF, hidden_NF, y_ND, w2, ends_E, inverse, weights, token_offsets = ctx.saved_tensors
        needs_a, needs_gate, _, needs_w2, _, _, needs_weights, _, _, _ = ctx.needs_input_grad
        grad_y, grad_weights = _unpermute_backward(grad_TD, y_ND, inverse, weights, token_offsets)
        grad_w2 = _linear_weight_grad(grad_y, hidden_NF, ends_E) if needs_w2 else None
        grad_a = grad_gate = None
        if needs_a or needs_gate:
            grad_hidden = _linear_input_grad(grad_y, w2, ends_E)
            grad_a, grad_gate = _activation_backward(grad_hidden, a_NF, gate_NF, ctx.kernel_activation)
        return grad_a, grad_gate, None, grad_w2, None, None, grad_weights if needs_weights else None, None, None, None
