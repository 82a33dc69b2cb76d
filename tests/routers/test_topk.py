"""TopKRouter against a float64 per-token reference.

Shape legend: T tokens, D model dim, E experts, K top-k.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_moe.routers import TopKRouter

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


def per_token_assignments(routing, num_tokens: int) -> list[dict[int, tuple[float, float]]]:
    result: list[dict[int, tuple[float, float]]] = [{} for _ in range(num_tokens)]
    for t, e, w, p in zip(
        routing.token_ids.tolist(),
        routing.expert_ids.tolist(),
        routing.weights.tolist(),
        routing.priorities.tolist(),
        strict=True,
    ):
        assert e not in result[t], "an expert was assigned twice to one token"
        result[t][e] = (w, p)
    return result


def assert_matches_reference(routing, expected: dict, num_tokens: int) -> None:
    actual = per_token_assignments(routing, num_tokens)
    for t, (got, want) in enumerate(zip(actual, expected["per_token"], strict=True)):
        assert set(got) == set(want), f"token {t}: experts {sorted(got)} != {sorted(want)}"
        for e in want:
            assert got[e] == pytest.approx(want[e], rel=1e-5, abs=1e-7), f"token {t}, expert {e}"
    assert routing.aux_loss.item() == pytest.approx(expected["aux"], rel=1e-5, abs=1e-6)
    assert routing.z_loss.item() == pytest.approx(expected["z"], rel=1e-5, abs=1e-6)


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
