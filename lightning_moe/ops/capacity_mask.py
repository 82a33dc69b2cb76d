"""Expert capacity, which assignments each expert keeps: the ``lightning_moe::capacity_mask`` op.

Shape legend: E experts, N assignments.

Each expert keeps its ``capacity`` assignments of highest priority, ties going to the lower token
index. On CUDA with the extension loaded, ``src_cuda/capacity_mask.cu`` sorts the assignments by
expert and runs one block per expert, which finds its threshold priority by a radix select, with
no host sync; elsewhere :func:`lightning_moe.ops.reference.capacity_mask` computes the same with
three stable argsorts. The mask has no gradient. ``torch.compile`` traces the custom op; eager
calls go to the kernel directly (see :mod:`lightning_moe.ops.permute`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_moe.ops import reference
from lightning_moe.ops.extension import require_extension, use_cuda_kernels
from lightning_moe.ops.sort_by_expert import MAX_KERNEL_EXPERTS

# Converted to float32 for the kernel without changing their order; float64 takes the reference.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _mask(expert_ids: Tensor, priorities: Tensor, num_experts: int, capacity: int) -> Tensor:
    return require_extension().capacity_mask(expert_ids, priorities, num_experts, capacity)


@torch.library.custom_op("lightning_moe::capacity_mask", mutates_args=())
def _capacity_mask_cuda(expert_ids: Tensor, priorities: Tensor, num_experts: int, capacity: int) -> Tensor:
    return _mask(expert_ids, priorities, num_experts, capacity)


@_capacity_mask_cuda.register_fake
def _(expert_ids: Tensor, priorities: Tensor, num_experts: int, capacity: int) -> Tensor:
    return expert_ids.new_empty(expert_ids.shape[0], dtype=torch.bool)


def capacity_mask(expert_ids: Tensor, priorities: Tensor, token_ids: Tensor, num_experts: int, capacity: int) -> Tensor:
    """Which assignments fit in their expert's capacity, without a host sync.

    Args:
        expert_ids: (N,) int64 expert of each assignment, each in ``[0, num_experts)``.
        priorities: (N,) float32 selection score of each assignment; -0.0 equals 0.0 and NaN ranks
            above every number, as in ``torch.sort``.
        token_ids: (N,) int64 token of each assignment, sorted non-decreasing (token-major). The
            kernel relies on this order to break ties and does not read ``token_ids``.
        num_experts: E.
        capacity: Assignments each expert may keep, >= 0.

    Returns:
        (N,) bool, True where the assignment is among its expert's ``capacity`` of highest
        priority (ties going to the lower token index).
    """
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0, got {capacity}.")
    kernel_ok = priorities.dtype in KERNEL_DTYPES and num_experts <= MAX_KERNEL_EXPERTS
    if kernel_ok and use_cuda_kernels(expert_ids, priorities):
        args = (expert_ids.long().contiguous(), priorities.float().contiguous(), num_experts, capacity)
        if torch.compiler.is_compiling():
            return torch.ops.lightning_moe.capacity_mask(*args)
        return _mask(*args)  # eager: skip the custom-op dispatch (see ops.permute)
    return reference.capacity_mask(expert_ids, priorities, token_ids, num_experts, capacity)
