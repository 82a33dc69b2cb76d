"""Expert capacity: which assignments each expert keeps when its capacity is limited.

Shape legend: E experts, N assignments.

The mask itself is :func:`lightning_moe.ops.capacity_mask` (a CUDA kernel with a pure-PyTorch
reference), like the permutation and combination steps around the experts.
"""

from __future__ import annotations

import math

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
    return ops.capacity_mask(expert_ids, priorities, token_ids, num_experts, capacity)
