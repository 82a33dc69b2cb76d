"""TopKRouter against a float64 per-token reference.

Shape legend: T tokens, D model dim, E experts, K top-k.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_moe.routers import TopKRouter
from tests.routers.routing_checks import assert_matches_reference

D_MODEL = 16

CASES = [
    pytest.param(num_tokens, num_experts, top_k, seed, id=f"T{num_tokens}-E{num_experts}-K{top_k}-seed{seed}")
    for num_tokens, num_experts, top_k, seed in [
        (0, 4, 2, 0),
        (1, 4, 1, 1),
        (7, 8, 2, 2),
        (33, 8, 3, 3),
        (33, 4, 4, 4),
    ]
]


def reference(router: TopKRouter, x_TD: torch.Tensor) -> dict:
    """Per-token float64 loop: experts, weights, priorities, balance and z losses."""
    weight_ED = router.weight.detach().double()
    num_experts, top_k = router.num_experts, router.top_k
    per_token, counts, prob_sums, z_terms = [], [0] * num_experts, [0.0] * num_experts, []
    for x_D in x_TD.double():
        logits = (weight_ED @ x_D).tolist()
        log_norm = math.log(sum(math.exp(v) for v in logits))
        probs = [math.exp(v - log_norm) for v in logits]
        top = sorted(range(num_experts), key=lambda e: -probs[e])[:top_k]
        total = sum(probs[e] for e in top) if router.normalize else 1.0
        per_token.append({e: (probs[e] / total, probs[e]) for e in top})
        for e in top:
            counts[e] += 1
        prob_sums = [s + p for s, p in zip(prob_sums, probs, strict=True)]
        z_terms.append(log_norm**2)
    num_tokens = len(per_token)
    aux = 0.0
    if num_tokens:
        aux = num_experts * sum(
            c / (num_tokens * top_k) * s / num_tokens for c, s in zip(counts, prob_sums, strict=True)
        )
    return {"per_token": per_token, "aux": aux, "z": sum(z_terms) / num_tokens if num_tokens else 0.0}


@pytest.mark.parametrize("normalize", [True, False], ids=["normalize", "raw"])
@pytest.mark.parametrize("num_tokens, num_experts, top_k, seed", CASES)
def test_matches_reference(num_tokens: int, num_experts: int, top_k: int, seed: int, normalize: bool) -> None:
    torch.manual_seed(seed)
    router = TopKRouter(D_MODEL, num_experts, top_k, normalize=normalize)
    x_TD = torch.randn(num_tokens, D_MODEL)
    routing = router.route(x_TD)
    assert routing.token_ids.tolist() == [t for t in range(num_tokens) for _ in range(top_k)]
    assert routing.weights.dtype == routing.priorities.dtype == torch.float32
    assert_matches_reference(routing, reference(router, x_TD), num_tokens)


def test_weights_are_in_descending_probability_order() -> None:
    torch.manual_seed(0)
    routing = TopKRouter(D_MODEL, 8, 3).route(torch.randn(5, D_MODEL))
    priorities_TK = routing.priorities.view(5, 3)
    assert torch.all(priorities_TK[:, :-1] >= priorities_TK[:, 1:])


@pytest.mark.parametrize("loss", ["aux_loss", "z_loss"])
def test_losses_reach_router_weight(loss: str) -> None:
    torch.manual_seed(0)
    router = TopKRouter(D_MODEL, 8, 2)
    getattr(router.route(torch.randn(7, D_MODEL)), loss).backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_bf16_input_gives_float32_routing() -> None:
    torch.manual_seed(0)
    router = TopKRouter(D_MODEL, 4, 2)
    x_TD = torch.randn(7, D_MODEL).bfloat16()
    routing = router.route(x_TD)
    assert routing.weights.dtype == torch.float32
    assert_matches_reference(routing, reference(router, x_TD.float()), 7)


def test_routing_carries_the_tokens_per_expert() -> None:
    torch.manual_seed(0)
    routing = TopKRouter(D_MODEL, 8, 3).route(torch.randn(33, D_MODEL))
    assert routing.tokens_per_expert is not None
    assert torch.equal(routing.tokens_per_expert, torch.bincount(routing.expert_ids, minlength=8))


def test_equal_probabilities_go_to_the_lower_expert() -> None:
    router = TopKRouter(D_MODEL, 8, 3)
    with torch.no_grad():
        router.weight.zero_()
    routing = router.route(torch.randn(4, D_MODEL))
    assert routing.expert_ids.tolist() == [0, 1, 2] * 4
