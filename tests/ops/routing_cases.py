"""Routing cases shared by the op tests, and brute-force oracles written as plain Python loops.

Shape legend: T tokens, D model dim, E experts, K top-k, N assignments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Case:
    """A token-major routing: ``token_ids`` sorted, each token's experts distinct."""

    num_tokens: int
    num_experts: int
    token_ids: Tensor  # (N,) int64
    expert_ids: Tensor  # (N,) int64
    weights: Tensor  # (N,) float32


def make_case(
    name: str, generator: torch.Generator, num_tokens: int = 37, num_experts: int = 8, top_k: int = 2
) -> Case:
    """Build the routing case ``name`` (one of :data:`CASE_NAMES`) from ``generator``."""
    if name == "one_token":
        num_tokens = 1
    if name == "top_k_equals_E":
        top_k = num_experts
    if name == "one_expert_takes_all":
        top_k = 1
    choices = num_experts if name != "zero_token_experts" else 3  # experts 3.. never chosen
    expert_ids_TK = torch.stack([torch.randperm(choices, generator=generator)[:top_k] for _ in range(num_tokens)])
    if name == "one_expert_takes_all":
        expert_ids_TK.fill_(num_experts - 1)
    token_ids = torch.arange(num_tokens).repeat_interleave(top_k)
    expert_ids = expert_ids_TK.reshape(-1)
    if name == "dropped_assignments":  # as capacity leaves it: some tokens keep 0 or 1 assignment
        kept = torch.rand(token_ids.shape, generator=generator) < 0.6
        token_ids, expert_ids = token_ids[kept], expert_ids[kept]
    weights = torch.rand(token_ids.shape, generator=generator)
    return Case(num_tokens, num_experts, token_ids, expert_ids, weights)


CASE_NAMES = [
    "random",
    "zero_token_experts",
    "one_expert_takes_all",
    "one_token",
    "top_k_equals_E",
    "dropped_assignments",
]


def loop_sort(expert_ids: Tensor, num_experts: int) -> tuple[list[int], list[int], list[int]]:
    """Stable sort by expert, its inverse and the counts, by Python loops."""
    ids = expert_ids.tolist()
    order = [a for e in range(num_experts) for a in range(len(ids)) if ids[a] == e]
    inverse = [0] * len(ids)
    for position, a in enumerate(order):
        inverse[a] = position
    counts = [ids.count(e) for e in range(num_experts)]
    return order, inverse, counts


def loop_permute(x_TD: Tensor, token_ids: Tensor, inverse: list[int]) -> Tensor:
    """Row ``inverse[a]`` is ``x_TD[token_ids[a]]``."""
    rows = [None] * len(inverse)
    for a, t in enumerate(token_ids.tolist()):
        rows[inverse[a]] = x_TD[t]
    return torch.stack(rows) if rows else x_TD.new_zeros(0, x_TD.shape[1])


def loop_unpermute(y_ND: Tensor, token_ids: Tensor, inverse: list[int], weights: Tensor, num_tokens: int) -> Tensor:
    """``out[t] = sum over t's assignments of weights[a] * y_ND[inverse[a]]``, in float64."""
    out = torch.zeros(num_tokens, y_ND.shape[1], dtype=torch.float64)
    for a, t in enumerate(token_ids.tolist()):
        out[t] += weights[a].double() * y_ND[inverse[a]].double()
    return out


PRIORITY_KINDS = ["distinct", "few_values", "all_equal"]


def make_priorities(kind: str, num_assignments: int, generator: torch.Generator) -> Tensor:
    """(N,) float32 priorities of kind ``kind`` (one of :data:`PRIORITY_KINDS`).

    ``few_values`` draws from five values, -0.0 and 0.0 among them, so most priorities tie.
    """
    if kind == "distinct":
        return torch.randn(num_assignments, generator=generator)
    if kind == "few_values":
        values = torch.tensor([-1.5, -0.0, 0.0, 0.25, 1.0])
        return values[torch.randint(0, values.numel(), (num_assignments,), generator=generator)]
    return torch.full((num_assignments,), 0.5)


def make_skewed_routing(
    num_assignments: int, num_experts: int, generator: torch.Generator, top_k: int = 4
) -> tuple[Tensor, Tensor]:
    """Token-major ``(token_ids, expert_ids)`` of N assignments over experts of uneven popularity.

    Each token picks ``min(top_k, E)`` distinct experts; the last token fewer when N is not a
    multiple of that.
    """
    top_k = min(top_k, num_experts)
    num_tokens = -(-num_assignments // top_k)
    if num_tokens == 0:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    popularity = torch.rand(num_experts, generator=generator) ** 3 + 1e-3
    expert_ids_TK = torch.multinomial(popularity.expand(num_tokens, -1), top_k, generator=generator)
    token_ids = torch.arange(num_tokens).repeat_interleave(top_k)
    return token_ids[:num_assignments], expert_ids_TK.reshape(-1)[:num_assignments]


def capacities_to_try(expert_ids: Tensor, num_experts: int) -> list[int]:
    """Capacities from 0 to above the largest expert load, the interesting ones near it."""
    max_load = int(torch.bincount(expert_ids, minlength=num_experts).max()) if expert_ids.numel() else 0
    candidates = {0, 1, 2, max_load // 2, max_load - 1, max_load, max_load + 1, expert_ids.numel() + 1}
    return sorted(c for c in candidates if c >= 0)


def loop_capacity_mask(
    expert_ids: Tensor, priorities: Tensor, token_ids: Tensor, num_experts: int, capacity: int
) -> list[bool]:
    """Each expert's ``capacity`` assignments of highest priority (Python floats), ties to the lower token."""
    experts, scores, tokens = expert_ids.tolist(), priorities.double().tolist(), token_ids.tolist()
    kept = [False] * len(experts)
    for e in range(num_experts):
        assignments = [a for a in range(len(experts)) if experts[a] == e]
        # Python's 0.0 == -0.0, so those two tie and the token decides, as in torch.sort.
        for a in sorted(assignments, key=lambda a: (-scores[a], tokens[a]))[:capacity]:
            kept[a] = True
    return kept
