"""Expert-parallel token dispatch: rows travel to the rank that holds their expert, and back.

Shape legend: E global experts, L local experts per rank, P expert-parallel ranks (E = P * L),
N rows this rank sends, M rows it receives, D model dim.

Rank r of the expert-parallel group holds global experts ``[r * L, (r + 1) * L)``. The layer hands
over rows sorted by global expert, so the rows for each destination rank are already contiguous.
Received rows arrive grouped by source rank; they are regrouped by local expert for the experts,
and the regrouping is undone before the rows go back.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_moe.parallel.all_to_all import all_to_all


class AllToAllDispatcher:
    """A :class:`~lightning_moe.layers.moe.TokenDispatcher` over an expert-parallel group.

    Every rank of the group must call :meth:`dispatch` and :meth:`combine` once per forward of
    the layer, in the same order, also when it has no tokens: the exchange is collective.

    Args:
        group: The expert-parallel process group (P ranks).
        num_experts: Global number of experts E, divisible by P.
    """

    def __init__(self, group: dist.ProcessGroup, num_experts: int) -> None:
        self.group = group
        self.group_size = dist.get_world_size(group)
        if num_experts % self.group_size:
            raise ValueError(
                f"num_experts={num_experts} is not divisible by the expert-parallel size {self.group_size}; "
                "choose an expert_parallel_size that divides every MoE layer's num_experts."
            )
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.group_size
        self._send_splits: list[int] = []
        self._recv_splits: list[int] = []
        self._local_order: Tensor | None = None

    def dispatch(self, x_ND: Tensor, tokens_per_expert: Tensor) -> tuple[Tensor, Tensor]:
        """Send rows sorted by global expert to their experts' ranks.

        Args:
            x_ND: (N, D) rows sorted by global expert.
            tokens_per_expert: (E,) rows per global expert on this rank.

        Returns:
            (M, D) rows for the local experts, grouped by local expert, and (L,) their counts.
        """
        counts_PL = tokens_per_expert.reshape(self.group_size, self.num_local_experts)
        # recv_PL[s, l]: rows that rank s sends to local expert l of this rank.
        recv_PL = torch.empty_like(counts_PL)
        dist.all_to_all_single(recv_PL, counts_PL.contiguous(), group=self.group)
        # The one host sync of the exchange: all_to_all needs its split sizes on the host.
        send_and_recv = torch.stack([counts_PL.sum(dim=1), recv_PL.sum(dim=1)]).tolist()
        self._send_splits, self._recv_splits = send_and_recv
        received_MD = all_to_all(x_ND, self._recv_splits, self._send_splits, self.group)
        self._local_order = _source_major_to_expert_major(recv_PL, total=sum(self._recv_splits))
        return received_MD[self._local_order], recv_PL.sum(dim=0)

    def combine(self, y_MD: Tensor) -> Tensor:
        """Return local expert outputs (M, D), in :meth:`dispatch`'s order, to their source ranks.

        Returns:
            (N, D) rows in the order this rank sent them.
        """
        assert self._local_order is not None, "combine() must follow dispatch()"
        source_major_MD = torch.empty_like(y_MD).index_copy(0, self._local_order, y_MD)
        return all_to_all(source_major_MD, self._send_splits, self._recv_splits, self.group)


def _source_major_to_expert_major(recv_PL: Tensor, total: int) -> Tensor:
    """Row order that regroups rows laid out (source rank, local expert) into (local expert, source rank).

    Args:
        recv_PL: (P, L) rows from source rank s for local expert l.
        total: M, the sum of ``recv_PL`` (known on the host already).

    Returns:
        (M,) int64 indices into the source-major rows.
    """
    starts_PL = (torch.cumsum(recv_PL.reshape(-1), dim=0) - recv_PL.reshape(-1)).reshape(recv_PL.shape)
    # Visit blocks expert-major: for each local expert, each source rank's block in rank order.
    block_starts = starts_PL.t().reshape(-1)
    block_sizes = recv_PL.t().reshape(-1)
    blocks = torch.arange(block_sizes.numel(), device=recv_PL.device)
    block_of_row = torch.repeat_interleave(blocks, block_sizes, output_size=total)
    first_row_of_block = torch.cumsum(block_sizes, dim=0) - block_sizes
    offset_in_block = torch.arange(total, device=recv_PL.device) - first_row_of_block[block_of_row]
    return block_starts[block_of_row] + offset_in_block
