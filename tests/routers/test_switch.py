"""SwitchRouter against a float64 per-token reference, jitter and validation.

Shape legend: T tokens, D model dim, E experts.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_moe.routers import SwitchRouter

D_MODEL = 16

CASES = [
    pytest.param(num_tokens, num_experts, seed, id=f"T{num_tokens}-E{num_experts}-seed{seed}")
    for num_tokens, num_experts, seed in [(0, 4, 0), (1, 4, 1), (7, 8, 2), (33, 8, 3), (33, 1, 4)]
]


def reference(router: SwitchRouter, x_TD: torch.Tensor) -> dict:
    """Per-token float64 loop: the argmax expert, its probability, balance and z losses."""
    num_experts = router.num_experts
    choices, counts, prob_sums, z_terms = [], [0] * num_experts, [0.0] * num_experts, []
    for x_D in x_TD.double():
        logits = (router.weight.detach().double() @ x_D).tolist()
        log_norm = math.log(sum(math.exp(v) for v in logits))
        probs = [math.exp(v - log_norm) for v in logits]
        best = max(range(num_experts), key=lambda e: probs[e])
        choices.append((best, probs[best]))
        counts[best] += 1
        prob_sums = [s + p for s, p in zip(prob_sums, probs, strict=True)]
        z_terms.append(log_norm**2)
    num_tokens = len(choices)
    aux = (
        num_experts * sum(c * s for c, s in zip(counts, prob_sums, strict=True)) / num_tokens**2 if num_tokens else 0.0
    )
    return {"choices": choices, "aux": aux, "z": sum(z_terms) / num_tokens if num_tokens else 0.0}


def assert_matches_reference(routing, expected: dict) -> None:
    num_tokens = len(expected["choices"])
    assert routing.token_ids.tolist() == list(range(num_tokens))
    assert routing.expert_ids.tolist() == [e for e, _ in expected["choices"]]
    want_probs = [p for _, p in expected["choices"]]
    assert routing.weights.tolist() == pytest.approx(want_probs, rel=1e-5, abs=1e-7)
    assert routing.priorities.tolist() == pytest.approx(want_probs, rel=1e-5, abs=1e-7)
    assert routing.aux_loss.item() == pytest.approx(expected["aux"], rel=1e-5, abs=1e-6)
    assert routing.z_loss.item() == pytest.approx(expected["z"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("num_tokens, num_experts, seed", CASES)
def test_eval_matches_reference(num_tokens: int, num_experts: int, seed: int) -> None:
    torch.manual_seed(seed)
    router = SwitchRouter(D_MODEL, num_experts).eval()
    x_TD = torch.randn(num_tokens, D_MODEL)
    assert_matches_reference(router.route(x_TD), reference(router, x_TD))


@pytest.mark.parametrize("num_tokens, num_experts, seed", CASES)
def test_training_with_fixed_jitter_matches_reference(num_tokens: int, num_experts: int, seed: int) -> None:
    torch.manual_seed(seed)
    router = SwitchRouter(D_MODEL, num_experts, jitter_eps=0.1).train()
    x_TD = torch.randn(num_tokens, D_MODEL)
    jitter_TD = torch.empty(num_tokens, D_MODEL).uniform_(0.9, 1.1)
    assert_matches_reference(router.route(x_TD, jitter=jitter_TD), reference(router, x_TD * jitter_TD))


def test_jitter_only_in_training() -> None:
    torch.manual_seed(0)
    router = SwitchRouter(D_MODEL, 8, jitter_eps=0.05)
    x_TD = torch.randn(33, D_MODEL)
    first, second = router.train().route(x_TD), router.route(x_TD)
    assert not torch.equal(first.weights, second.weights)
    router.eval()
    first, second = router.route(x_TD), router.route(x_TD, jitter=torch.full((33, D_MODEL), 2.0))
    assert torch.equal(first.expert_ids, second.expert_ids) and torch.equal(first.weights, second.weights)
    assert_matches_reference(first, reference(router, x_TD))


def test_zero_jitter_trains_like_eval() -> None:
    torch.manual_seed(0)
    router = SwitchRouter(D_MODEL, 8, jitter_eps=0.0)
    x_TD = torch.randn(33, D_MODEL)
    assert torch.equal(router.train().route(x_TD).weights, router.eval().route(x_TD).weights)


def test_jitter_stays_within_eps() -> None:
    torch.manual_seed(0)
    router = SwitchRouter(D_MODEL, 4, jitter_eps=0.01).train()
    x_TD = torch.randn(33, D_MODEL)
    # Bounds on the multiplier bound the logits: |logit(jittered) - logit| <= eps * sum_d |w_d x_d|.
    bound_TE = 0.01 * (x_TD.abs() @ router.weight.detach().abs().t())
    clean_TE = router.logits(x_TD)
    for _ in range(5):
        jittered_TE = router.logits(router._jittered(x_TD, None))
        assert torch.all((jittered_TE - clean_TE).abs() <= bound_TE + 1e-6)


@pytest.mark.parametrize("top_k", [0, 2, 3])
def test_rejects_top_k_other_than_one(top_k: int) -> None:
    with pytest.raises(ValueError, match="switch routes each token to one expert; use top_k=1"):
        SwitchRouter(D_MODEL, 4, top_k)


@pytest.mark.parametrize(
    "jitter_eps, error",
    [
        pytest.param(-0.1, ValueError, id="negative"),
        pytest.param(1.0, ValueError, id="one"),
        pytest.param("0.01", TypeError, id="string"),
    ],
)
def test_rejects_bad_jitter_eps(jitter_eps: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="jitter_eps"):
        SwitchRouter(D_MODEL, 4, 1, jitter_eps=jitter_eps)  # type: ignore[arg-type]


def test_jitter_of_wrong_shape_is_rejected() -> None:
    router = SwitchRouter(D_MODEL, 4).train()
    with pytest.raises(ValueError, match="jitter must have the shape"):
        router.route(torch.randn(3, D_MODEL), jitter=torch.ones(3, 1))


@pytest.mark.parametrize("loss", ["aux_loss", "z_loss"])
def test_losses_reach_router_weight(loss: str) -> None:
    torch.manual_seed(0)
    router = SwitchRouter(D_MODEL, 8).train()
    getattr(router.route(torch.randn(7, D_MODEL)), loss).backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
