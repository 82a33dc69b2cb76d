"""GShardRouter against a float64 per-token reference, and its random routing of second experts.

Shape legend: T tokens, D model dim, E experts.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_moe.routers import GShardRouter

D_MODEL = 16

CASES = [
    pytest.param(num_tokens, num_experts, seed, id=f"T{num_tokens}-E{num_experts}-seed{seed}")
    for num_tokens, num_experts, seed in [(0, 4, 0), (1, 4, 1), (7, 8, 2), (33, 8, 3), (33, 2, 4)]
]


def reference(router: GShardRouter, x_TD: torch.Tensor, uniform_T: torch.Tensor | None) -> dict:
    """Per-token float64 loop; ``uniform_T=None`` means eval (both experts always kept)."""
    num_experts = router.num_experts
    per_token, first_counts, prob_sums, z_terms = [], [0] * num_experts, [0.0] * num_experts, []
    for t, x_D in enumerate(x_TD.double()):
        logits = (router.weight.detach().double() @ x_D).tolist()
        log_norm = math.log(sum(math.exp(v) for v in logits))
        probs = [math.exp(v - log_norm) for v in logits]
        first, second = sorted(range(num_experts), key=lambda e: -probs[e])[:2]
        g1, g2 = probs[first] / (probs[first] + probs[second]), probs[second] / (probs[first] + probs[second])
        choices = {first: (g1, probs[first])}
        if uniform_T is None or uniform_T[t].item() < 2 * g2:
            choices[second] = (g2, probs[second])
        per_token.append(choices)
        first_counts[first] += 1
        prob_sums = [s + p for s, p in zip(prob_sums, probs, strict=True)]
        z_terms.append(log_norm**2)
    num_tokens = len(per_token)
    aux = (
        num_experts * sum(c * s for c, s in zip(first_counts, prob_sums, strict=True)) / num_tokens**2
        if num_tokens
        else 0.0
    )
    return {"per_token": per_token, "aux": aux, "z": sum(z_terms) / num_tokens if num_tokens else 0.0}


def assert_matches_reference(routing, expected: dict) -> None:
    want_pairs = [(t, e) for t, choices in enumerate(expected["per_token"]) for e in choices]
    got_pairs = list(zip(routing.token_ids.tolist(), routing.expert_ids.tolist(), strict=True))
    # Token-major, first choice before second: the reference lists them in that order too.
    assert got_pairs == want_pairs
    want = [expected["per_token"][t][e] for t, e in want_pairs]
    assert routing.weights.tolist() == pytest.approx([w for w, _ in want], rel=1e-5, abs=1e-7)
    assert routing.priorities.tolist() == pytest.approx([p for _, p in want], rel=1e-5, abs=1e-7)
    assert routing.aux_loss.item() == pytest.approx(expected["aux"], rel=1e-5, abs=1e-6)
    assert routing.z_loss.item() == pytest.approx(expected["z"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("num_tokens, num_experts, seed", CASES)
def test_eval_is_normalised_top2(num_tokens: int, num_experts: int, seed: int) -> None:
    torch.manual_seed(seed)
    router = GShardRouter(D_MODEL, num_experts).eval()
    x_TD = torch.randn(num_tokens, D_MODEL)
    routing = router.route(x_TD, uniform=torch.ones(num_tokens))
    assert routing.expert_ids.numel() == 2 * num_tokens
    assert_matches_reference(routing, reference(router, x_TD, None))


@pytest.mark.parametrize("num_tokens, num_experts, seed", CASES)
def test_training_with_fixed_uniform_matches_reference(num_tokens: int, num_experts: int, seed: int) -> None:
    torch.manual_seed(seed)
    router = GShardRouter(D_MODEL, num_experts).train()
    x_TD = torch.randn(num_tokens, D_MODEL)
    uniform_T = torch.rand(num_tokens)
    assert_matches_reference(router.route(x_TD, uniform=uniform_T), reference(router, x_TD, uniform_T))


def test_second_expert_dropped_exactly_where_uniform_reaches_twice_g2() -> None:
    torch.manual_seed(0)
    router = GShardRouter(D_MODEL, 8)
    x_TD = torch.randn(33, D_MODEL)
    twice_g2_T = 2 * router.eval().route(x_TD).weights.view(33, 2)[:, 1]
    router.train()
    at_threshold = router.route(x_TD, uniform=twice_g2_T)
    assert at_threshold.token_ids.tolist() == list(range(33))
    below_threshold = router.route(x_TD, uniform=torch.nextafter(twice_g2_T, torch.zeros(())))
    assert below_threshold.expert_ids.numel() == 66


def test_dispatch_frequency_is_twice_g2() -> None:
    torch.manual_seed(0)
    router = GShardRouter(D_MODEL, 8)
    with torch.no_grad():
        # Sharper logits spread 2 * g2 over (0, 1) instead of bunching it near 1.
        router.weight.mul_(4.0)
    x_TD = torch.randn(8, D_MODEL)
    twice_g2_T = 2 * router.eval().route(x_TD).weights.view(8, 2)[:, 1]
    draws = 2000
    routing = router.train().route(x_TD.repeat(draws, 1))
    first_or_second_T = torch.bincount(routing.token_ids, minlength=8 * draws).view(draws, 8)
    frequency_T = (first_or_second_T == 2).float().mean(dim=0)
    # Binomial std is at most sqrt(0.25 / 2000) ~ 0.011; 0.05 is over four of them.
    assert frequency_T.tolist() == pytest.approx(twice_g2_T.clamp(max=1).tolist(), abs=0.05)


def test_dropped_second_leaves_first_weight_unchanged() -> None:
    torch.manual_seed(0)
    router = GShardRouter(D_MODEL, 4)
    x_TD = torch.randn(7, D_MODEL)
    both = router.eval().route(x_TD)
    only_first = router.train().route(x_TD, uniform=torch.ones(7))
    assert torch.equal(only_first.expert_ids, both.expert_ids[0::2])
    assert torch.equal(only_first.weights, both.weights[0::2])


@pytest.mark.parametrize("top_k", [1, 3])
def test_rejects_top_k_other_than_two(top_k: int) -> None:
    with pytest.raises(ValueError, match="use top_k=2"):
        GShardRouter(D_MODEL, 4, top_k)


def test_uniform_of_wrong_shape_is_rejected() -> None:
    router = GShardRouter(D_MODEL, 4).train()
    with pytest.raises(ValueError, match="uniform must have shape"):
        router.route(torch.randn(3, D_MODEL), uniform=torch.rand(3, 1))


@pytest.mark.parametrize("loss", ["aux_loss", "z_loss"])
def test_losses_reach_router_weight(loss: str) -> None:
    torch.manual_seed(0)
    router = GShardRouter(D_MODEL, 8).train()
    getattr(router.route(torch.randn(7, D_MODEL)), loss).backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
