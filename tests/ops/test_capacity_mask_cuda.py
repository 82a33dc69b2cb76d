"""The capacity_mask kernel against its reference on the GPU and on the CPU."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lightning_moe import ops
from lightning_moe.ops import reference
from tests.ops.gpu_checks import GPU_MARKS, poison_cached_memory, poison_small_blocks
from tests.ops.routing_cases import PRIORITY_KINDS, capacities_to_try, make_priorities, make_skewed_routing

pytestmark = GPU_MARKS


def capacity_routing(
    routing: str, num_assignments: int, num_experts: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Token-major ``(token_ids, expert_ids)`` on the CPU: skewed loads, or one expert taking all."""
    if routing == "one_expert_takes_all":
        return torch.arange(num_assignments), torch.full((num_assignments,), num_experts - 1)
    return make_skewed_routing(num_assignments, num_experts, generator)


@pytest.mark.parametrize("kind", PRIORITY_KINDS)
@pytest.mark.parametrize("routing", ["skewed", "one_expert_takes_all"])
@pytest.mark.parametrize("num_assignments", [0, 1, 1000, 4097, 65_536])
@pytest.mark.parametrize("num_experts", [1, 8, 64, 256])
def test_capacity_mask_matches_the_reference(
    num_experts: int, num_assignments: int, routing: str, kind: str, generator: torch.Generator
) -> None:
    token_ids, expert_ids = capacity_routing(routing, num_assignments, num_experts, generator)
    priorities = make_priorities(kind, num_assignments, generator)
    cpu_args = (expert_ids, priorities, token_ids, num_experts)
    args = (expert_ids.cuda(), priorities.cuda(), token_ids.cuda(), num_experts)
    for capacity in capacities_to_try(expert_ids, num_experts):
        poison_cached_memory()
        poison_small_blocks()
        kept = ops.capacity_mask(*args, capacity)
        assert kept.dtype == torch.bool and kept.shape == (num_assignments,)
        assert kept.view(torch.uint8).le(1).all(), "a mask element was never written"
        assert torch.equal(kept, reference.capacity_mask(*args, capacity)), f"capacity {capacity}"
        assert torch.equal(kept.cpu(), reference.capacity_mask(*cpu_args, capacity)), f"capacity {capacity}"


def test_capacity_mask_orders_zeros_and_nans_like_the_cpu(generator: torch.Generator) -> None:
    token_ids, expert_ids = make_skewed_routing(20_000, 8, generator)
    priorities = make_priorities("few_values", expert_ids.numel(), generator)
    priorities[torch.rand(priorities.shape, generator=generator) < 0.1] = float("nan")
    args = (expert_ids.cuda(), priorities.cuda(), token_ids.cuda(), 8)
    for capacity in capacities_to_try(expert_ids, 8):
        kept = ops.capacity_mask(*args, capacity)
        # The CPU's torch.sort is the rule: NaN above every number, -0.0 equal to 0.0.
        expected = reference.capacity_mask(expert_ids, priorities, token_ids, 8, capacity)
        assert torch.equal(kept.cpu(), expected), f"capacity {capacity}"


def test_capacity_mask_of_bfloat16_priorities(generator: torch.Generator) -> None:
    token_ids, expert_ids = make_skewed_routing(10_000, 16, generator)
    priorities = torch.rand(expert_ids.shape, generator=generator).bfloat16()  # many ties after rounding
    capacity = int(torch.bincount(expert_ids).max()) // 2
    kept = ops.capacity_mask(expert_ids.cuda(), priorities.cuda(), token_ids.cuda(), 16, capacity)
    assert torch.equal(kept.cpu(), reference.capacity_mask(expert_ids, priorities, token_ids, 16, capacity))


def test_capacity_mask_is_the_same_on_every_run(generator: torch.Generator) -> None:
    token_ids, expert_ids = make_skewed_routing(65_536, 64, generator)
    priorities = make_priorities("few_values", expert_ids.numel(), generator)
    capacity = int(torch.bincount(expert_ids).max()) // 2
    args = (expert_ids.cuda(), priorities.cuda(), token_ids.cuda(), 64, capacity)
    first = ops.capacity_mask(*args)
    for _ in range(3):
        assert torch.equal(ops.capacity_mask(*args), first)


def test_capacity_mask_does_not_synchronise_with_the_host(generator: torch.Generator) -> None:
    token_ids, expert_ids = make_skewed_routing(4096, 64, generator)
    priorities = make_priorities("few_values", expert_ids.numel(), generator)
    args = (expert_ids.cuda(), priorities.cuda(), token_ids.cuda(), 64, 16)
    ops.capacity_mask(*args)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.capacity_mask(*args)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_compiled_capacity_mask_matches_eager(generator: torch.Generator) -> None:
    token_ids, expert_ids = make_skewed_routing(3000, 8, generator)
    priorities = make_priorities("few_values", expert_ids.numel(), generator)
    args = (expert_ids.cuda(), priorities.cuda(), token_ids.cuda(), 8, 200)
    compiled = torch.compile(ops.capacity_mask, fullgraph=True)
    assert torch.equal(compiled(*args), ops.capacity_mask(*args))
