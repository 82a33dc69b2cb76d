"""Capacity, permutation and combination of routed assignments.

Shape legend: T tokens, D model dim, E experts, N assignments.

These are the steps between the router and the experts: decide which assignments fit in each
expert's capacity, sort the survivors into expert-contiguous order, and sum the weighted expert
outputs back into token order. The sort runs the CUDA kernel of :mod:`lightning_moe.ops` where it
can; none of these synchronises with the host to count assignments.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_moe import ops


def expert_capacity(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """Assignments each expert may take: ``ceil(capacity_factor * T * K / E)``."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def capacity_mask(expert_ids: Tensor, priorities: Tensor, token_ids: Tensor, num_experts: int, capacity: int) -> Tensor:
    """Which assignments fit in their expert's capacity.

    Each expert keeps its ``capacity`` assignments of highest priority; ties go to the lower token
    index, so the result is deterministic (no race decides who is dropped).

    Args:
        expert_ids: (N,) int64 expert of each assignment.
        priorities: (N,) float32 selection score of each assignment.
        token_ids: (N,) int64 token of each assignment.
        num_experts: E.
        capacity: Assignments each expert may keep.

    Returns:
        (N,) bool, True where the assignment is kept.
    """
    # Stable sorts from the least to the most significant key: token asc, priority desc, expert asc.
    order = torch.argsort(token_ids, stable=True)
    order = order[torch.argsort(priorities[order], descending=True, stable=True)]
    order = order[torch.argsort(expert_ids[order], stable=True)]
    counts_E = ops.expert_histogram(expert_ids, num_experts)
    starts_E = torch.cumsum(counts_E, dim=0) - counts_E
    rank_in_expert = torch.arange(order.numel(), device=order.device) - starts_E[expert_ids[order]]
    kept = torch.empty_like(expert_ids, dtype=torch.bool)
    kept[order] = rank_in_expert < capacity
    return kept


def sort_by_expert(expert_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """Stable expert-contiguous order of assignments.

    Args:
        expert_ids: (N,) int64 expert of each assignment.
        num_experts: E.

    Returns:
        ``order`` (N,) such that ``expert_ids[order]`` is sorted, assignments of one expert keeping
        their original relative order, and ``tokens_per_expert`` (E,) int64.
    """
    order, _, tokens_per_expert = ops.sort_by_expert(expert_ids, num_experts)
    return order, tokens_per_expert


def combine(y_ND: Tensor, token_ids: Tensor, weights: Tensor, num_tokens: int) -> Tensor:
    """``out[t] = sum over assignments a of token t of weights[a] * y[a]``, accumulated in float32.

    Args:
        y_ND: (N, D) expert outputs, one row per assignment.
        token_ids: (N,) int64 token of each row.
        weights: (N,) float32 combine weight of each row.
        num_tokens: T.

    Returns:
        (T, D) float32.
    """
    weighted_ND = y_ND.float() * weights.unsqueeze(-1)
    out_TD = weighted_ND.new_zeros(num_tokens, y_ND.shape[-1])
    return out_TD.index_add(0, token_ids, weighted_ND)
