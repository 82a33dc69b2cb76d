"""The sort_by_expert kernel against a stable sort, on a GPU."""

from __future__ import annotations

import pytest
import torch

from lightning_moe import ops
from lightning_moe.ops import reference
from tests.ops.gpu_checks import GPU_MARKS, on_cuda, poison_cached_memory
from tests.ops.routing_cases import CASE_NAMES, loop_sort, make_case

pytestmark = GPU_MARKS


@pytest.mark.parametrize("name", CASE_NAMES)
def test_sort_by_expert_matches_the_stable_sort(name: str, generator: torch.Generator) -> None:
    case = on_cuda(make_case(name, generator))
    poison_cached_memory()
    order, inverse, counts = ops.sort_by_expert(case.expert_ids, case.num_experts)
    expected = loop_sort(case.expert_ids.cpu(), case.num_experts)
    assert (order.tolist(), inverse.tolist(), counts.tolist()) == expected


@pytest.mark.parametrize(("num_assignments", "num_experts"), [(98_304, 64), (65_536, 8), (100_003, 1024), (777, 8192)])
def test_sort_by_expert_at_scale(num_assignments: int, num_experts: int, generator: torch.Generator) -> None:
    expert_ids = torch.randint(0, num_experts, (num_assignments,), generator=generator).cuda()
    poison_cached_memory()
    order, inverse, counts = ops.sort_by_expert(expert_ids, num_experts)
    expected = reference.sort_by_expert(expert_ids, num_experts)
    for got, want in zip((order, inverse, counts), expected, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize(("num_assignments", "num_experts"), [(0, 8), (1, 1), (8192, 64), (100_003, 1024)])
def test_the_sort_writes_each_experts_end(num_assignments: int, num_experts: int, generator: torch.Generator) -> None:
    """The scan's ends are the cumulative counts, in int32, for empty experts and no assignments too."""
    expert_ids = torch.randint(0, num_experts, (num_assignments,), generator=generator).cuda()
    poison_cached_memory()
    order, inverse, counts, ends = ops.sort_by_expert_with_ends(expert_ids, num_experts)
    expected = reference.sort_by_expert(expert_ids, num_experts)
    for got, want in zip((order, inverse, counts), expected, strict=True):
        assert torch.equal(got, want)
    assert ends.dtype == torch.int32 and torch.equal(ends, expected[2].cumsum(0).int())
