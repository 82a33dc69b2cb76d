"""Gradient synchronisation and clipping for parameters split into replicated and expert parts.

Under expert parallelism (EP ranks per group, W ranks in all) a local expert's gradient after the
backward pass already sums the contributions of the tokens of every rank in its EP group, each
rank's loss being its own micro-batch mean. The single-process gradient of the global batch is
the mean over the W ranks' losses, so expert gradients are summed over the expert-data-parallel
replicas and divided by W. Replicated parameters are averaged over all W ranks (by DDP).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor


@torch.no_grad()
def sync_expert_gradients(
    expert_params: Iterable[Tensor], expert_data_group: dist.ProcessGroup | None, world_size: int
) -> None:
    """Turn local expert gradients into single-process gradients of the global batch.

    Args:
        expert_params: This rank's expert parameters.
        expert_data_group: Ranks holding the same experts; ``None`` when there is one such rank.
        world_size: W, the number of data-parallel ranks (all ranks).
    """
    params = list(expert_params)
    if not params:
        return
    grads: list[Tensor] = []
    for param in params:
        # A rank whose experts got no token has no gradient; its replicas may have one.
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        grads.append(param.grad)
    flat = torch.cat([g.reshape(-1) for g in grads])
    if expert_data_group is not None and dist.get_world_size(expert_data_group) > 1:
        dist.all_reduce(flat, group=expert_data_group)
    flat.div_(world_size)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


@torch.no_grad()
def gradient_norm(
    replicated_params: Iterable[Tensor],
    expert_params: Iterable[Tensor],
    expert_group: dist.ProcessGroup | None,
    norm_type: float = 2.0,
) -> Tensor:
    """The norm of the whole model's gradient, as one process would compute it.

    Replicated gradients are identical on every rank and are counted once; expert gradients are
    counted on the rank that holds them and combined over the expert-parallel group.

    Args:
        replicated_params: Parameters every rank holds (their gradients already synchronised).
        expert_params: This rank's expert parameters (gradients already synchronised).
        expert_group: The expert-parallel group; ``None`` when EP is 1.
        norm_type: 2.0, any p > 0, or ``inf``.

    Returns:
        The norm (float32 scalar).
    """
    replicated = [p.grad for p in replicated_params if p.grad is not None]
    experts = [p.grad for p in expert_params if p.grad is not None]
    device = (replicated + experts)[0].device if replicated + experts else torch.device("cpu")
    replicated_part = _norm_power(replicated, norm_type, device)
    expert_part = _norm_power(experts, norm_type, device)
    if expert_group is not None and dist.get_world_size(expert_group) > 1:
        op = dist.ReduceOp.MAX if math.isinf(norm_type) else dist.ReduceOp.SUM
        dist.all_reduce(expert_part, op=op, group=expert_group)
    if math.isinf(norm_type):
        return torch.maximum(replicated_part, expert_part)
    return (replicated_part + expert_part) ** (1.0 / norm_type)


@torch.no_grad()
def clip_grad_norm_(
    replicated_params: Iterable[Tensor],
    expert_params: Iterable[Tensor],
    max_norm: float,
    expert_group: dist.ProcessGroup | None,
    norm_type: float = 2.0,
) -> Tensor:
    """Clip all gradients by the norm of the whole model's gradient (:func:`gradient_norm`), as
    one process would.

    Args:
        replicated_params: Parameters every rank holds (their gradients already synchronised).
        expert_params: This rank's expert parameters (gradients already synchronised).
        max_norm: Largest allowed total norm.
        expert_group: The expert-parallel group; ``None`` when EP is 1.
        norm_type: 2.0, any p > 0, or ``inf``.

    Returns:
        The total norm before clipping (float32 scalar).
    """
    replicated, experts = list(replicated_params), list(expert_params)
    total = gradient_norm(replicated, experts, expert_group, norm_type)
    clip_coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for param in replicated + experts:
        if param.grad is not None:
            param.grad.mul_(clip_coef.to(param.grad.dtype))
    return total


def _norm_power(grads: list[Tensor], norm_type: float, device: torch.device) -> Tensor:
    """``sum |g|^p`` over all elements (or ``max |g|`` for inf), float32, on ``device``."""
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    if math.isinf(norm_type):
        return torch.stack([g.detach().abs().max().float() for g in grads]).max()
    return torch.stack([g.detach().float().norm(norm_type) ** norm_type for g in grads]).sum()
