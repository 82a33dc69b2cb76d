"""Stable sort of assignments by expert: the ``lightning_moe::sort_by_expert`` op.

Shape legend: E experts, N assignments.

On CUDA with the extension loaded, a counting sort (``src_cuda/sort_by_expert.cu``) gives the
order, its inverse, the per-expert counts and their cumulative sums in three small launches with no
host sync; elsewhere :func:`lightning_moe.ops.reference.sort_by_expert` computes the same. ``torch.compile`` traces the
custom op; eager calls go to the kernel directly (see :mod:`lightning_moe.ops.permute`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_moe.ops import reference
from lightning_moe.ops.extension import require_extension, use_cuda_kernels

# The kernel keeps one int32 counter per expert in shared memory.
MAX_KERNEL_EXPERTS = 8192


def _sort(expert_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    order, inverse, tokens_per_expert, _ = require_extension().sort_by_expert(expert_ids, num_experts)
    return order, inverse, tokens_per_expert


@torch.library.custom_op("lightning_moe::sort_by_expert", mutates_args=())
def _sort_by_expert_cuda(expert_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    return _sort(expert_ids, num_experts)


@_sort_by_expert_cuda.register_fake
def _(expert_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    num_assignments = expert_ids.shape[0]
    return (
        expert_ids.new_empty(num_assignments),
        expert_ids.new_empty(num_assignments),
        expert_ids.new_empty(num_experts),
    )


def sort_by_expert(expert_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Stable expert-sorted order of assignments, without a host sync.

    Args:
        expert_ids: (N,) int64 expert of each assignment, each in ``[0, num_experts)``.
        num_experts: E.

    Returns:
        ``order`` (N,) int64, the assignment at each sorted position, assignments of one expert in
        their original order; ``inverse`` (N,) int64, the sorted position of each assignment
        (``inverse[order] == arange(N)``); ``tokens_per_expert`` (E,) int64.
    """
    if _kernel_takes(expert_ids, num_experts):
        expert_ids = expert_ids.long().contiguous()
        if torch.compiler.is_compiling():
            return torch.ops.lightning_moe.sort_by_expert(expert_ids, num_experts)
        return _sort(expert_ids, num_experts)  # eager: skip the custom-op dispatch (see ops.permute)
    return reference.sort_by_expert(expert_ids, num_experts)


def sort_by_expert_with_ends(expert_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`sort_by_expert`, and where each expert's assignments end in the sorted order.

    Returns:
        ``order``, ``inverse`` and ``tokens_per_expert`` as :func:`sort_by_expert` gives them, and
        ``expert_ends`` (E,) int32, ``cumsum(tokens_per_expert)``: the row ends the grouped GEMMs
        take. Eager on CUDA the sort's own scan writes them, three launches fewer than a cumsum.
    """
    if _kernel_takes(expert_ids, num_experts) and not torch.compiler.is_compiling():
        return require_extension().sort_by_expert(expert_ids.long().contiguous(), num_experts)
    order, inverse, tokens_per_expert = sort_by_expert(expert_ids, num_experts)
    return order, inverse, tokens_per_expert, torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)


def _kernel_takes(expert_ids: Tensor, num_experts: int) -> bool:
    return use_cuda_kernels(expert_ids) and num_experts <= MAX_KERNEL_EXPERTS
