"""The pure-PyTorch references of the kernels against brute-force loops, and their gradients."""

from __future__ import annotations

import pytest
import torch

from lightning_moe import ops
from lightning_moe.ops import reference
from tests.ops.routing_cases import (
    CASE_NAMES,
    PRIORITY_KINDS,
    capacities_to_try,
    loop_capacity_mask,
    loop_permute,
    loop_sort,
    loop_unpermute,
    make_case,
    make_priorities,
)


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_sort_by_expert_matches_loops(name: str, generator: torch.Generator) -> None:
    case = make_case(name, generator)
    order, inverse, counts = reference.sort_by_expert(case.expert_ids, case.num_experts)
    expected_order, expected_inverse, expected_counts = loop_sort(case.expert_ids, case.num_experts)
    assert order.tolist() == expected_order
    assert inverse.tolist() == expected_inverse
    assert counts.tolist() == expected_counts
    assert counts.dtype == order.dtype == inverse.dtype == torch.int64


@pytest.mark.parametrize("name", CASE_NAMES)
def test_sort_with_ends_on_cpu_adds_the_running_counts(name: str, generator: torch.Generator) -> None:
    """Without the kernels, sort_by_expert_with_ends is the sort and an int32 cumsum of its counts."""
    from lightning_moe import ops

    case = make_case(name, generator)
    order, inverse, counts, ends = ops.sort_by_expert_with_ends(case.expert_ids, case.num_experts)
    expected_order, expected_inverse, expected_counts = loop_sort(case.expert_ids, case.num_experts)
    assert (order.tolist(), inverse.tolist(), counts.tolist()) == (expected_order, expected_inverse, expected_counts)
    running = [sum(expected_counts[: e + 1]) for e in range(case.num_experts)]
    assert ends.dtype == torch.int32 and ends.tolist() == running


def test_sort_by_expert_of_nothing() -> None:
    order, inverse, counts = reference.sort_by_expert(torch.zeros(0, dtype=torch.int64), 4)
    assert order.shape == inverse.shape == (0,)
    assert counts.tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_token_offsets_bound_each_tokens_assignments(name: str, generator: torch.Generator) -> None:
    case = make_case(name, generator)
    offsets = reference.token_offsets(case.token_ids, case.num_tokens)
    token_list = case.token_ids.tolist()
    assert offsets.shape == (case.num_tokens + 1,)
    for t in range(case.num_tokens):
        assert token_list[offsets[t] : offsets[t + 1]] == [t] * token_list.count(t)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_permute_matches_loops(name: str, generator: torch.Generator) -> None:
    case = make_case(name, generator)
    x_TD = torch.randn(case.num_tokens, 6, generator=generator)
    _, inverse, _ = reference.sort_by_expert(case.expert_ids, case.num_experts)
    x_ND = reference.permute(x_TD, case.token_ids, inverse)
    torch.testing.assert_close(x_ND, loop_permute(x_TD, case.token_ids, inverse.tolist()), rtol=0, atol=0)


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_unpermute_matches_loops(name: str, dtype: torch.dtype, generator: torch.Generator) -> None:
    case = make_case(name, generator)
    y_ND = torch.randn(case.token_ids.numel(), 6, generator=generator).to(dtype)
    _, inverse, _ = reference.sort_by_expert(case.expert_ids, case.num_experts)
    out = reference.unpermute(y_ND, case.token_ids, inverse, case.weights, case.num_tokens)
    expected = loop_unpermute(y_ND, case.token_ids, inverse.tolist(), case.weights, case.num_tokens)
    assert out.dtype == torch.float32  # summed in float32 whatever y's dtype
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_unpermute_gives_zeros_to_tokens_without_assignments() -> None:
    token_ids = torch.tensor([0, 0, 2])
    y_ND = torch.ones(3, 4)
    out = reference.unpermute(y_ND, token_ids, torch.tensor([2, 0, 1]), torch.ones(3), num_tokens=4)
    assert out[1].abs().sum() == 0 and out[3].abs().sum() == 0
    assert out[0].tolist() == [2.0] * 4


@pytest.mark.parametrize("name", ["random", "dropped_assignments", "top_k_equals_E"])
def test_gradients_of_references(name: str, generator: torch.Generator) -> None:
    case = make_case(name, generator, num_tokens=5, num_experts=4)
    _, inverse, _ = reference.sort_by_expert(case.expert_ids, case.num_experts)
    x_TD = torch.randn(case.num_tokens, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    y_ND = torch.randn(case.token_ids.numel(), 3, generator=generator, dtype=torch.float64, requires_grad=True)
    weights = case.weights.double().requires_grad_()

    def permute(x: torch.Tensor) -> torch.Tensor:
        return reference.permute(x, case.token_ids, inverse)

    def unpermute(y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return reference.unpermute(y, case.token_ids, inverse, w, case.num_tokens, out_dtype=torch.float64)

    assert torch.autograd.gradcheck(permute, (x_TD,))
    assert torch.autograd.gradcheck(unpermute, (y_ND, weights))


def test_expert_histogram_counts_like_bincount(generator: torch.Generator) -> None:
    expert_ids = torch.randint(0, 7, (100,), generator=generator)
    assert ops.expert_histogram(expert_ids, 9).tolist() == torch.bincount(expert_ids, minlength=9).tolist()


@pytest.mark.parametrize("name", CASE_NAMES)
def test_wrappers_take_the_reference_on_cpu(name: str, generator: torch.Generator) -> None:
    case = make_case(name, generator)
    x_TD = torch.randn(case.num_tokens, 8, generator=generator)
    order, inverse, counts = ops.sort_by_expert(case.expert_ids, case.num_experts)
    expected = reference.sort_by_expert(case.expert_ids, case.num_experts)
    for got, want in zip((order, inverse, counts), expected, strict=True):
        assert torch.equal(got, want)
    x_ND = ops.permute(x_TD, case.token_ids, inverse)
    assert torch.equal(x_ND, reference.permute(x_TD, case.token_ids, inverse))
    out = ops.unpermute(x_ND, case.token_ids, inverse, case.weights, case.num_tokens)
    assert torch.equal(out, reference.unpermute(x_ND, case.token_ids, inverse, case.weights, case.num_tokens))


@pytest.mark.parametrize("kind", PRIORITY_KINDS)
@pytest.mark.parametrize("name", CASE_NAMES)
def test_capacity_mask_matches_loops(name: str, kind: str, generator: torch.Generator) -> None:
    case = make_case(name, generator, num_tokens=61)
    priorities = make_priorities(kind, case.token_ids.numel(), generator)
    args = (case.expert_ids, priorities, case.token_ids, case.num_experts)
    for capacity in capacities_to_try(case.expert_ids, case.num_experts):
        kept = reference.capacity_mask(*args, capacity)
        assert kept.dtype == torch.bool
        assert kept.tolist() == loop_capacity_mask(*args, capacity), f"capacity {capacity}"
        assert torch.equal(ops.capacity_mask(*args, capacity), kept)  # the wrapper takes the reference on CPU


@pytest.mark.parametrize("capacity", [0, 3])
def test_capacity_mask_of_nothing(capacity: int) -> None:
    empty = torch.zeros(0, dtype=torch.int64)
    kept = ops.capacity_mask(empty, torch.zeros(0), empty, 4, capacity)
    assert kept.shape == (0,) and kept.dtype == torch.bool


def test_capacity_mask_orders_zeros_and_nans_like_torch_sort() -> None:
    priorities = torch.tensor([0.0, float("nan"), -0.0, 1.0, float("nan"), -float("nan")])
    token_ids = torch.arange(6)
    expert_ids = torch.zeros(6, dtype=torch.int64)
    # NaN first (all NaNs equal), then 1.0, then 0.0 and -0.0 as equals: the lower token wins.
    expected = [[1, 4, 5], [1, 3, 4, 5], [0, 1, 3, 4, 5]]
    for capacity, kept_tokens in zip([3, 4, 5], expected, strict=True):
        kept = reference.capacity_mask(expert_ids, priorities, token_ids, 1, capacity)
        assert kept.nonzero().flatten().tolist() == kept_tokens


def test_capacity_mask_rejects_a_negative_capacity() -> None:
    ids = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="capacity must be >= 0"):
        ops.capacity_mask(ids, torch.zeros(3), ids, 1, -1)
