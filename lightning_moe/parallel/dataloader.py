"""Keep every rank at the same number of batches, since each forward exchanges tokens collectively.

A rank that ran one forward more than its peers would wait forever in the expert all-to-all.
Lightning's distributed sampler already evens out map-style datasets; this guards the rest
(custom samplers, ``use_distributed_sampler=False``, iterable datasets of unequal length).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist


class EvenBatches:
    """Wrap a dataloader so that all ranks yield the same number of batches.

    With a known length on every rank, all ranks take the shortest length (one all-reduce, here);
    otherwise the ranks agree before each batch whether all of them still have one.

    Args:
        dataloader: The rank's dataloader.
        device: Device for the agreement tensors (the backend's device).
        rank: This rank, for the warning.
    """

    def __init__(self, dataloader: Any, device: torch.device, rank: int) -> None:
        self.dataloader = dataloader
        self._device = device
        try:
            local_length = len(dataloader)
        except TypeError:
            local_length = -1
        lengths = torch.tensor([local_length], device=device)
        dist.all_reduce(lengths, op=dist.ReduceOp.MIN)
        shortest = int(lengths[0])
        self.length: int | None = shortest if shortest >= 0 else None
        if self.length is not None and local_length > self.length:
            warnings.warn(
                f"Rank {rank} has {local_length} batches but another rank has only {self.length}; every rank stops "
                f"after {self.length} so that the expert exchange cannot hang. Give every rank the same number of "
                "batches (e.g. keep Lightning's distributed sampler) to use them all.",
                stacklevel=2,
            )

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("This dataloader has no length on every rank.")
        return self.length

    def __iter__(self) -> Iterator[Any]:
        iterator = iter(self.dataloader)
        if self.length is not None:
            for _ in range(self.length):
                yield next(iterator)
            return
        while True:
            batch = next(iterator, _EXHAUSTED)
            everyone_has_one = torch.tensor([batch is not _EXHAUSTED], dtype=torch.int32, device=self._device)
            dist.all_reduce(everyone_has_one, op=dist.ReduceOp.MIN)
            if not bool(everyone_has_one):
                return
            yield batch

    def __getattr__(self, name: str) -> Any:
        # Lightning inspects `sampler`, `batch_size`, `dataset` and friends on its dataloaders.
        if name == "dataloader":  # not yet set, e.g. while unpickling
            raise AttributeError(name)
        return getattr(self.dataloader, name)


_EXHAUSTED = object()
