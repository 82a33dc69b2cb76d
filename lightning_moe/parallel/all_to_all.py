"""A differentiable all-to-all with variable split sizes.

Shape legend: N rows sent by this rank, M rows received by it, D row width.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def all_to_all(x_ND: Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup) -> Tensor:
    """Send ``input_splits[r]`` consecutive rows of ``x_ND`` to rank r of ``group`` and receive
    ``output_splits[r]`` rows from it; the backward pass sends the gradients the other way.

    Args:
        x_ND: (N, D) rows, grouped by destination rank.
        output_splits: Rows received from each rank of the group (sums to M).
        input_splits: Rows sent to each rank of the group (sums to N).
        group: The expert-parallel process group.

    Returns:
        (M, D) rows grouped by source rank.
    """
    return _AllToAll.apply(x_ND, output_splits, input_splits, group)


def _exchange(x_ND: Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup) -> Tensor:
    out_MD = x_ND.new_empty((sum(output_splits), *x_ND.shape[1:]))
    dist.all_to_all_single(
        out_MD, x_ND.contiguous(), output_split_sizes=output_splits, input_split_sizes=input_splits, group=group
    )
    return out_MD


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x_ND: Tensor, output_splits: list[int], input_splits: list[int], group: Any) -> Tensor:
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        return _exchange(x_ND, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx: Any, grad_MD: Tensor) -> tuple[Tensor, None, None, None]:
        return _exchange(grad_MD, ctx.input_splits, ctx.output_splits, ctx.group), None, None, None
