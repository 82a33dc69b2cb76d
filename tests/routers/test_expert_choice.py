"""ExpertChoiceRouter against a float64 per-expert reference, and its capacity formula.

Shape legend: T tokens, D model dim, E experts, K average experts per token, C tokens per expert.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_moe.routers import ExpertChoiceRouter

D_MODEL = 16

CASES = [
    pytest.param(*case, id="T{}-E{}-K{}-cf{}-seed{}".format(*case))
    for case in [
        # num_tokens, num_experts, top_k, capacity_factor, seed
        (0, 4, 2, 1.0, 0),
        (1, 4, 2, 1.0, 1),
        (7, 8, 2, 1.0, 2),
        (7, 4, 2, 2.0, 3),
        (33, 8, 2, 1.0, 4),
        (33, 8, 1, 0.5, 5),
        (33, 6, 3, 1.25, 6),
    ]
]


def reference(router: ExpertChoiceRouter, x_TD: torch.Tensor) -> dict:
    """Float64 softmax per token, then each expert's C most probable tokens."""
    num_tokens, num_experts = x_TD.shape[0], router.num_experts
    probs_TE, z_terms = [], []
    for x_D in x_TD.double():
        logits = (router.weight.detach().double() @ x_D).tolist()
        log_norm = math.log(sum(math.exp(v) for v in logits))
        probs_TE.append([math.exp(v - log_norm) for v in logits])
        z_terms.append(log_norm**2)
    capacity = min(num_tokens, math.ceil(router.capacity_factor * num_tokens * router.top_k / num_experts))
    chosen = []
    for e in range(num_experts):
        tokens = sorted(range(num_tokens), key=lambda t: -probs_TE[t][e])[:capacity]
        chosen.append({t: probs_TE[t][e] for t in tokens})
    return {"capacity": capacity, "chosen": chosen, "z": sum(z_terms) / num_tokens if num_tokens else 0.0}


@pytest.mark.parametrize("num_tokens, num_experts, top_k, capacity_factor, seed", CASES)
def test_matches_reference(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float, seed: int) -> None:
    torch.manual_seed(seed)
    router = ExpertChoiceRouter(D_MODEL, num_experts, top_k, capacity_factor=capacity_factor)
    x_TD = torch.randn(num_tokens, D_MODEL)
    routing = router.route(x_TD)
    expected = reference(router, x_TD)
    capacity = expected["capacity"]
    # Token-major, like every router: token ids non-decreasing, each expert exactly C tokens.
    assert torch.all(routing.token_ids[1:] >= routing.token_ids[:-1])
    assert torch.bincount(routing.expert_ids, minlength=num_experts).tolist() == [capacity] * num_experts
    for e, want in enumerate(expected["chosen"]):
        mine = routing.expert_ids == e
        got = dict(zip(routing.token_ids[mine].tolist(), routing.weights[mine].tolist(), strict=True))
        assert set(got) == set(want), f"expert {e}"
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7), f"expert {e}"
    assert torch.equal(routing.priorities, routing.weights.detach())
    assert routing.aux_loss.dtype == torch.float32 and routing.aux_loss.shape == () and routing.aux_loss.item() == 0.0
    assert routing.z_loss.item() == pytest.approx(expected["z"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(
    "num_tokens, num_experts, top_k, capacity_factor, capacity",
    [
        pytest.param(0, 4, 2, 1.0, 0, id="no-tokens"),
        pytest.param(7, 4, 2, 1.0, 4, id="rounds-up"),
        pytest.param(8, 4, 2, 1.0, 4, id="exact"),
        pytest.param(33, 8, 1, 0.5, 3, id="fractional-factor"),
        pytest.param(1, 8, 2, 1.0, 1, id="one-token"),
        pytest.param(3, 2, 2, 2.0, 3, id="capped-at-T"),
        pytest.param(5, 2, 2, 1.0, 5, id="K-equals-E-takes-all"),
    ],
)
def test_capacity_formula(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float, capacity: int) -> None:
    router = ExpertChoiceRouter(D_MODEL, num_experts, top_k, capacity_factor=capacity_factor)
    assert router.capacity(num_tokens) == capacity
    routing = router.route(torch.randn(num_tokens, D_MODEL))
    assert torch.equal(torch.bincount(routing.expert_ids, minlength=num_experts), torch.full((num_experts,), capacity))


def test_each_expert_takes_distinct_tokens() -> None:
    torch.manual_seed(0)
    routing = ExpertChoiceRouter(D_MODEL, 8, 2).route(torch.randn(33, D_MODEL))
    for expert in range(8):
        token_ids_C = routing.token_ids[routing.expert_ids == expert]
        assert token_ids_C.unique().numel() == token_ids_C.numel()


def experts_per_token(routing, num_tokens: int) -> list[set[int]]:
    result: list[set[int]] = [set() for _ in range(num_tokens)]
    for t, e in zip(routing.token_ids.tolist(), routing.expert_ids.tolist(), strict=True):
        result[t].add(e)
    return result


def test_routing_of_a_prefix_depends_on_later_tokens() -> None:
    torch.manual_seed(0)
    router = ExpertChoiceRouter(D_MODEL, 4, 1)
    x_TD = torch.randn(16, D_MODEL)
    alone = experts_per_token(router.route(x_TD[:8]), 8)
    with_later_tokens = experts_per_token(router.route(x_TD), 16)[:8]
    # Not causal: later tokens compete for the experts and change what earlier ones get.
    assert alone != with_later_tokens


@pytest.mark.parametrize(
    "capacity_factor, error",
    [
        pytest.param(0.0, ValueError, id="zero"),
        pytest.param(-1.0, ValueError, id="negative"),
        pytest.param(float("nan"), ValueError, id="nan"),
        pytest.param("1.0", TypeError, id="string"),
    ],
)
def test_rejects_bad_capacity_factor(capacity_factor: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="capacity_factor"):
        ExpertChoiceRouter(D_MODEL, 4, 2, capacity_factor=capacity_factor)  # type: ignore[arg-type]


def test_losses() -> None:
    torch.manual_seed(0)
    router = ExpertChoiceRouter(D_MODEL, 8, 2)
    routing = router.route(torch.randn(7, D_MODEL))
    assert routing.aux_loss.item() == 0.0
    routing.z_loss.backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    router.zero_grad()
    routing = router.route(torch.randn(7, D_MODEL))
    routing.weights.sum().backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
