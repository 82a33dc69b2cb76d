"""Expert capacity: which assignments each expert keeps when its capacity is limited.

Shape legend: E experts, N assignments.

The permutation and combination steps around the experts live in :mod:`lightning_moe.ops` (CUDA
kernels with pure-PyTorch references).
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
