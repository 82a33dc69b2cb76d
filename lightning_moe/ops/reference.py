"""Pure-PyTorch references of the CUDA kernels: the CPU path, the fallback, and the test oracle.

Shape legend: T tokens, D model dim, E experts, N assignments.

Each function computes exactly what its kernel in ``src_cuda/`` computes, in plain differentiable
PyTorch ops, and none synchronises with the host. Assignments are token-major: ``token_ids`` is
sorted non-decreasing, so token t's assignments are contiguous. Sums are accumulated in float32
(float64 for float64 inputs, so that ``gradcheck`` can run on these references).
"""

from __future__ import annotations

import torch
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
    # A histogram and a prefix sum rather than searchsorted: inductor could not lower searchsorted
    # over the router's token ids (torch 2.11), and this needs no sortedness to be exact.
    counts_T = torch.zeros(num_tokens, dtype=torch.int64, device=token_ids.device)
    counts_T.scatter_add_(0, token_ids, torch.ones_like(token_ids, dtype=torch.int64))
    return torch.cat([counts_T.new_zeros(1), torch.cumsum(counts_T, dim=0)])


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
