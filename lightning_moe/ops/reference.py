"""Pure-PyTorch references of the CUDA kernels: the CPU path, the fallback, and the test oracle.

Shape legend: T tokens, D model dim, E experts, K top-k, N assignments, F expert hidden.

Each function computes exactly what its kernel in ``src_cuda/`` computes, in plain differentiable
PyTorch ops, and none synchronises with the host. Assignments are token-major: ``token_ids`` is
sorted non-decreasing, so token t's assignments are contiguous. Sums are accumulated in float32
(float64 for float64 inputs, so that ``gradcheck`` can run on these references).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def expert_histogram(expert_ids: Tensor, num_experts: int) -> Tensor:
    """Assignments per expert, ``(E,)`` int64, without the host sync of ``torch.bincount`` on CUDA.

    Args:
        expert_ids: (N,) int64 expert of each assignment.
        num_experts: E.
    """
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=expert_ids.device)
    return counts_E.scatter_add_(0, expert_ids, torch.ones_like(expert_ids, dtype=torch.int64))


def token_offsets(token_ids: Tensor, num_tokens: int) -> Tensor:
    """Where each token's assignments start: token t's are ``[offsets[t], offsets[t + 1])``.

    Args:
        token_ids: (N,) int64 token of each assignment, sorted non-decreasing.
        num_tokens: T.

    Returns:
        (T + 1,) int64 with ``offsets[0] == 0`` and ``offsets[T] == N``.
    """
    # One op (a binary search per token on CUDA), which inductor lowers; searchsorted over the
    # router's token ids it could not (torch 2.11).
    return torch._convert_indices_from_coo_to_csr(token_ids, num_tokens)


def sort_by_expert(expert_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Stable expert-sorted order of assignments.

    Args:
        expert_ids: (N,) int64 expert of each assignment.
        num_experts: E.

    Returns:
        ``order`` (N,) int64, the assignment at each sorted position (assignments of one expert
        keep their relative order); ``inverse`` (N,) int64, the sorted position of each assignment,
        so ``inverse[order] == arange(N)``; ``tokens_per_expert`` (E,) int64.
    """
    order = torch.argsort(expert_ids, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return order, inverse, expert_histogram(expert_ids, num_experts)


def capacity_mask(expert_ids: Tensor, priorities: Tensor, token_ids: Tensor, num_experts: int, capacity: int) -> Tensor:
    """Which assignments fit in their expert's capacity.

    Each expert keeps its ``capacity`` assignments of highest priority, ties going to the lower
    token index. Priorities compare as ``torch.sort`` compares them: -0.0 equals 0.0 and NaN ranks
    above every number.

    Args:
        expert_ids: (N,) int64 expert of each assignment.
        priorities: (N,) selection score of each assignment.
        token_ids: (N,) int64 token of each assignment.
        num_experts: E.
        capacity: Assignments each expert may keep, >= 0.

    Returns:
        (N,) bool, True where the assignment is kept.
    """
    # Stable sorts from the least to the most significant key: token asc, priority desc, expert asc.
    order = torch.argsort(token_ids, stable=True)
    order = order[torch.argsort(priorities[order], descending=True, stable=True)]
    order = order[torch.argsort(expert_ids[order], stable=True)]
    counts_E = expert_histogram(expert_ids, num_experts)
    starts_E = torch.cumsum(counts_E, dim=0) - counts_E
    rank_in_expert = torch.arange(order.numel(), device=order.device) - starts_E[expert_ids[order]]
    kept = torch.empty_like(expert_ids, dtype=torch.bool)
    kept[order] = rank_in_expert < capacity
    return kept


def permute(x_TD: Tensor, token_ids: Tensor, inverse: Tensor) -> Tensor:
    """One row per assignment, in expert-sorted order: ``x_ND[inverse[a]] = x_TD[token_ids[a]]``.

    Args:
        x_TD: (T, D) tokens.
        token_ids: (N,) int64 token of each assignment.
        inverse: (N,) int64 sorted position of each assignment (from :func:`sort_by_expert`).

    Returns:
        (N, D) in ``x_TD``'s dtype. Its gradient sums each token's rows back.
    """
    order = torch.empty_like(inverse)
    order[inverse] = torch.arange(inverse.numel(), device=inverse.device)
    return x_TD[token_ids[order]]


def unpermute(
    y_ND: Tensor,
    token_ids: Tensor,
    inverse: Tensor,
    weights: Tensor,
    num_tokens: int,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Weighted sum of each token's expert outputs: ``out[t] = sum_a weights[a] * y_ND[inverse[a]]``.

    Args:
        y_ND: (N, D) expert outputs in expert-sorted order.
        token_ids: (N,) int64 token of each assignment.
        inverse: (N,) int64 sorted position of each assignment.
        weights: (N,) combine weight of each assignment (float32).
        num_tokens: T.
        out_dtype: dtype of the result.

    Returns:
        (T, D) in ``out_dtype``, summed in float32 (float64 for float64 inputs); tokens without
        assignments get zeros.
    """
    accumulate = torch.promote_types(torch.promote_types(y_ND.dtype, weights.dtype), torch.float32)
    weighted_ND = y_ND[inverse].to(accumulate) * weights.to(accumulate).unsqueeze(-1)
    out_TD = weighted_ND.new_zeros(num_tokens, y_ND.shape[-1])
    return out_TD.index_add(0, token_ids, weighted_ND).to(out_dtype)


def topk_route(
    logits_TE: Tensor, top_k: int, scoring: str, normalize: bool, bias_E: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """A token-choice router's picks and loss sums (see :func:`lightning_moe.ops.topk_route`).

    Args:
        logits_TE: (T, E) float32 or float64 router logits.
        top_k: K, between 1 and E.
        scoring: ``"softmax"`` or ``"sigmoid"``.
        normalize: Renormalise each token's picked weights to sum to 1.
        bias_E: Optional (E,) selection bias of sigmoid scoring (ignored by softmax).

    Returns:
        ``expert_ids_TK`` (T, K) int64, best first; ``weights_TK`` (T, K); ``priorities_TK``
        (T, K), detached; ``tokens_per_expert_E`` (E,) int64; ``prob_sum_E`` (E,) and
        ``lse_sq_sum`` (), the sums over tokens of the probabilities and of ``logsumexp^2``;
        ``balance_loss`` and ``z_loss`` (), from :func:`route_losses`.
    """
    if scoring == "softmax":
        scores_TE = torch.softmax(logits_TE, dim=-1)
        # The logits order p as p does, without the ties that rounding p makes.
        keys_TE = logits_TE.detach()
        masses_TE = scores_TE
    else:
        scores_TE = torch.sigmoid(logits_TE)
        keys_TE = scores_TE.detach() if bias_E is None else scores_TE.detach() + bias_E
        masses_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
    # A stable descending sort: equal keys go to the lower expert, as in the kernel.
    expert_ids_TK = torch.sort(keys_TE, dim=-1, descending=True, stable=True).indices[:, :top_k]
    picked_TK = scores_TE.gather(1, expert_ids_TK)
    weights_TK = picked_TK
    if normalize:
        picked_sum_T1 = picked_TK.sum(dim=-1, keepdim=True)
        if scoring == "sigmoid":  # so that picked scores that all underflow give zeros, not NaN
            picked_sum_T1 = picked_sum_T1.clamp_min(torch.finfo(torch.float32).tiny)
        weights_TK = picked_TK / picked_sum_T1
    priorities_TK = keys_TE.gather(1, expert_ids_TK) if scoring == "sigmoid" else picked_TK.detach()
    tokens_per_expert_E = expert_histogram(expert_ids_TK.reshape(-1), logits_TE.shape[-1])
    lse_sq_sum = torch.logsumexp(logits_TE, dim=-1).square().sum()
    prob_sum_E = masses_TE.sum(dim=0)
    losses = route_losses(tokens_per_expert_E, prob_sum_E, lse_sq_sum, logits_TE.shape[0], top_k)
    return expert_ids_TK, weights_TK, priorities_TK, tokens_per_expert_E, prob_sum_E, lse_sq_sum, *losses


def route_losses(
    tokens_per_expert_E: Tensor, prob_sum_E: Tensor, lse_sq_sum: Tensor, num_tokens: int, top_k: int
) -> tuple[Tensor, Tensor]:
    """The Switch balance loss ``E * sum_e (tokens_per_expert_E[e] / (T * K)) * (prob_sum_E[e] / T)``
    and the z-loss ``lse_sq_sum / T`` of T = ``num_tokens`` tokens with K = ``top_k`` picks each;
    both 0 when there are no tokens (zeros connected to the sums, so gradients still flow, as zeros)."""
    if num_tokens == 0:
        return prob_sum_E.sum() * 0, lse_sq_sum * 0
    counts_E = tokens_per_expert_E.to(prob_sum_E.dtype)
    balance_loss = torch.dot(counts_E, prob_sum_E) * balance_loss_scale(prob_sum_E.shape[0], num_tokens, top_k)
    return balance_loss, lse_sq_sum / num_tokens


def balance_loss_scale(num_experts: int, num_tokens: int, top_k: int) -> float:
    """``E / (T * K * T)``: the balance loss is this times ``sum_e tokens_per_expert[e] * prob_sum[e]``
    (``src_cuda/topk_route.cu`` computes the same in double); T > 0."""
    return num_experts / (num_tokens * top_k * num_tokens)


def grouped_linear(x_NK: Tensor, w_EMK: Tensor, ends_E: Tensor) -> Tensor:
    """``x[r] @ w[e].T`` for the rows r of each expert e: every expert's matmul over all rows, each
    row then taking its own expert's (E times the work of the kernel; for tests).

    Args:
        x_NK: (N, K) rows sorted by expert.
        w_EMK: (E, M, K) expert weights.
        ends_E: (E,) cumulative rows per expert, ``ends_E[-1] == N``.

    Returns:
        (N, M) in the inputs' dtype.
    """
    rows = torch.arange(x_NK.shape[0], device=x_NK.device)
    expert_N = torch.searchsorted(ends_E.to(torch.int64), rows, right=True)
    out_NM = x_NK.new_zeros(x_NK.shape[0], w_EMK.shape[1])
    for e in range(w_EMK.shape[0]):
        out_NM = torch.where((expert_N == e)[:, None], x_NK @ w_EMK[e].t(), out_NM)
    return out_NM


# The plain expert activations by name (as in :mod:`lightning_moe.layers.activations`), and the one
# each GLU gates with.
PLAIN_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}
GLU_GATES: dict[str, str] = {"swiglu": "silu", "geglu": "gelu"}


def activation(a_NF: Tensor, name: str) -> Tensor:
    """A plain expert activation ``act(a_NF)``: ``"gelu"`` (the erf GELU), ``"gelu_tanh"``,
    ``"relu"`` or ``"silu"``, as in :mod:`lightning_moe.layers.activations`."""
    return PLAIN_ACTIVATIONS[name](a_NF)


def glu(a_NF: Tensor, b_NF: Tensor, kind: str) -> Tensor:
    """The gated activation of GLU experts: ``act(a_NF) * b_NF``.

    Args:
        a_NF: (N, F) pre-activations ``x @ w1.T``.
        b_NF: (N, F) gate values ``x @ w3.T``.
        kind: ``"swiglu"`` (act = SiLU) or ``"geglu"`` (act = the erf GELU), as in
            :mod:`lightning_moe.layers.activations`.

    Returns:
        (N, F) in the promoted dtype of the inputs.
    """
    return activation(a_NF, GLU_GATES[kind]) * b_NF


# Device types torch.autocast accepts; on any other, autocast cannot be on in the first place.
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager[Any]:
    if device_type in _AUTOCAST_DEVICES:
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _logits_dtype(x_TD: Tensor, weight_ED: Tensor) -> torch.dtype:
    """float32, or float64 when an input is float64 (so that gradcheck can run)."""
    return torch.promote_types(torch.promote_types(x_TD.dtype, weight_ED.dtype), torch.float32)


class _RouterLogits(torch.autograd.Function):
    """``x @ w.T`` in float32 whose backward makes the float32 copy of x again instead of keeping it."""

    @staticmethod
    def forward(ctx: Any, x_TD: Tensor, weight_ED: Tensor) -> Tensor:
        ctx.save_for_backward(x_TD, weight_ED)
        with _autocast_off(x_TD.device.type):
            dtype = _logits_dtype(x_TD, weight_ED)
            return x_TD.to(dtype) @ weight_ED.to(dtype).t()

    @staticmethod
    def backward(ctx: Any, grad_TE: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x_TD, weight_ED = ctx.saved_tensors
        grad_x = grad_weight = None
        with _autocast_off(grad_TE.device.type):
            dtype = _logits_dtype(x_TD, weight_ED)
            grad_TE = grad_TE.to(dtype)
            if ctx.needs_input_grad[0]:
                grad_x = (grad_TE @ weight_ED.to(dtype)).to(x_TD.dtype)
            if ctx.needs_input_grad[1]:
                grad_weight = (grad_TE.t() @ x_TD.to(dtype)).to(weight_ED.dtype)
        return grad_x, grad_weight


def router_logits(x_TD: Tensor, weight_ED: Tensor) -> Tensor:
    """Float32 (float64 for float64 inputs) router logits ``x_TD @ weight_ED.T``.

    Written plainly, ``x.float() @ weight.t()`` keeps the float32 copy of x (T, D) alive until the
    backward pass, and under ``torch.autocast`` runs the matmul in the autocast dtype, so the logits
    would not be float32 at all. Here the copy is made again in the backward instead of kept, and
    autocast is off for both matmuls.

    Args:
        x_TD: (T, D) tokens of any floating dtype.
        weight_ED: (E, D) router weight of any floating dtype.

    Returns:
        (T, E) logits; gradients flow to both inputs, each in its own dtype.
    """
    return _RouterLogits.apply(x_TD, weight_ED)
