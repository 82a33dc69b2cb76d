"""Shard the experts of MoE layers over an expert-parallel group.

After sharding, expert-parallel rank r of P keeps global experts ``[r * E / P, (r + 1) * E / P)``
of each layer (their current values, so a model built or loaded whole keeps its weights), and
the layer exchanges rows with the other ranks through an :class:`AllToAllDispatcher`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from lightning_moe.layers.experts import GroupedExperts, ModuleListExperts
from lightning_moe.layers.moe import MoE
from lightning_moe.parallel.dispatcher import AllToAllDispatcher


def moe_layers(module: nn.Module) -> Iterator[tuple[str, MoE]]:
    """``(qualified name, layer)`` for every MoE layer inside ``module``."""
    return ((name, layer) for name, layer in module.named_modules() if isinstance(layer, MoE))


def expert_parameter_names(module: nn.Module) -> list[str]:
    """Qualified names of the routed experts' parameters: those that expert parallelism shards.

    Shared experts and routers are replicated like any other parameter and are not included.
    """
    names: list[str] = []
    for layer_name, layer in moe_layers(module):
        prefix = f"{layer_name}.experts." if layer_name else "experts."
        names.extend(prefix + name for name, _ in layer.experts.named_parameters())
    return names


def local_expert_range(num_experts: int, rank: int, group_size: int) -> tuple[int, int]:
    """Global experts ``[first, last)`` held by expert-parallel ``rank`` of ``group_size``."""
    if num_experts % group_size:
        raise ValueError(
            f"num_experts={num_experts} is not divisible by expert_parallel_size={group_size}; choose an "
            "expert_parallel_size that divides the num_experts of every MoE layer."
        )
    per_rank = num_experts // group_size
    return rank * per_rank, (rank + 1) * per_rank


def shard_experts(layer: MoE, rank: int, group_size: int, group: dist.ProcessGroup | None) -> None:
    """Keep only this rank's experts in ``layer`` and route its tokens through ``group``.

    Args:
        layer: An MoE layer holding all its experts.
        rank: This process's rank in the expert-parallel group.
        group_size: Expert-parallel size P.
        group: The expert-parallel process group; ``None`` when P is 1.
    """
    first, last = local_expert_range(layer.num_experts, rank, group_size)
    experts = layer.experts
    if experts.expert_offset != 0 or experts.num_experts != layer.num_experts:
        raise RuntimeError("This MoE layer's experts are already sharded.")
    if isinstance(experts, GroupedExperts):
        for name, param in list(experts.named_parameters(recurse=False)):
            setattr(experts, name, nn.Parameter(param.detach()[first:last].clone(), requires_grad=param.requires_grad))
    elif isinstance(experts, ModuleListExperts):
        experts.experts = nn.ModuleList(list(experts.experts)[first:last])
    else:
        raise TypeError(f"Cannot shard experts of type {type(experts).__name__}.")
    experts.num_experts = last - first
    experts.expert_offset = first
    if group_size > 1:
        assert group is not None
        layer.dispatcher = AllToAllDispatcher(group, layer.num_experts)


def unshard_experts(layer: MoE, group: dist.ProcessGroup) -> None:
    """Gather every rank's experts back into ``layer`` (a collective over the expert-parallel group).

    Afterwards the layer holds all its experts again and runs without a dispatcher, as before
    :func:`shard_experts`.
    """
    experts = layer.experts
    if experts.num_experts == layer.num_experts:
        return
    group_size = dist.get_world_size(group)
    if isinstance(experts, GroupedExperts):
        for name, param in list(experts.named_parameters(recurse=False)):
            pieces = [torch.empty_like(param) for _ in range(group_size)]
            dist.all_gather(pieces, param.detach().contiguous(), group=group)
            setattr(experts, name, nn.Parameter(torch.cat(pieces), requires_grad=param.requires_grad))
    else:
        device = next(iter(experts.parameters()), torch.empty(0)).device
        gathered: list[list[nn.Module]] = [[] for _ in range(group_size)]
        dist.all_gather_object(gathered, [module.cpu() for module in experts.experts], group=group)
        experts.experts = nn.ModuleList([module.to(device) for modules in gathered for module in modules])
    experts.num_experts = layer.num_experts
    experts.expert_offset = 0
    layer.dispatcher = None
