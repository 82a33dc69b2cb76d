"""NoisyTopKRouter against a float64 per-token reference of the noisy logits, gates and losses.

Shape legend: T tokens, D model dim, E experts, K top-k.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_moe.routers import NoisyTopKRouter
from tests.routers.routing_checks import assert_matches_reference

D_MODEL = 16

CASES = [
    pytest.param(num_tokens, num_experts, top_k, seed, id=f"T{num_tokens}-E{num_experts}-K{top_k}-seed{seed}")
    for num_tokens, num_experts, top_k, seed in [
        (0, 4, 2, 0),
        (1, 4, 1, 1),
        (7, 8, 2, 2),
        (33, 6, 3, 3),
        (33, 8, 2, 4),
        (7, 4, 4, 5),
    ]
]


def make_router(num_experts: int, top_k: int) -> NoisyTopKRouter:
    router = NoisyTopKRouter(D_MODEL, num_experts, top_k)
    with torch.no_grad():
        # A nonzero noise weight makes the noise std differ across tokens and experts.
        router.noise_weight.normal_(0.0, 0.5)
    return router


def phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def cv_squared(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / len(values) / mean**2


def reference(router: NoisyTopKRouter, x_TD: torch.Tensor, noise_TE: torch.Tensor | None) -> dict:
    """Per-token float64 loop following Shazeer et al. 2017; ``noise_TE=None`` means eval (no noise)."""
    num_experts, top_k = router.num_experts, router.top_k
    importance, load, per_token, z_terms = [0.0] * num_experts, [0.0] * num_experts, [], []
    for t, x_D in enumerate(x_TD.double()):
        clean = (router.weight.detach().double() @ x_D).tolist()
        raw_std = (router.noise_weight.detach().double() @ x_D).tolist()
        std = [math.log1p(math.exp(v)) for v in raw_std]
        noisy = (
            clean if noise_TE is None else [c + n * s for c, n, s in zip(clean, noise_TE[t].tolist(), std, strict=True)]
        )
        top = sorted(range(num_experts), key=lambda e: -noisy[e])[:top_k]
        kept_norm = sum(math.exp(noisy[e]) for e in top)
        all_norm = sum(math.exp(v) for v in noisy)
        per_token.append({e: (math.exp(noisy[e]) / kept_norm, math.exp(noisy[e]) / all_norm) for e in top})
        for e in top:
            importance[e] += math.exp(noisy[e]) / kept_norm
        for e in range(num_experts):
            if noise_TE is None or top_k == num_experts:
                load[e] += 1.0 if e in top else 0.0
            else:
                threshold = sorted((noisy[j] for j in range(num_experts) if j != e), reverse=True)[top_k - 1]
                load[e] += phi((clean[e] - threshold) / std[e])
        z_terms.append(math.log(sum(math.exp(v) for v in clean)) ** 2)
    num_tokens = len(per_token)
    aux = cv_squared(importance) + cv_squared(load) if num_tokens else 0.0
    return {"per_token": per_token, "aux": aux, "z": sum(z_terms) / num_tokens if num_tokens else 0.0}


@pytest.mark.parametrize("num_tokens, num_experts, top_k, seed", CASES)
def test_training_with_fixed_noise_matches_reference(num_tokens: int, num_experts: int, top_k: int, seed: int) -> None:
    torch.manual_seed(seed)
    router = make_router(num_experts, top_k).train()
    x_TD = torch.randn(num_tokens, D_MODEL)
    noise_TE = torch.randn(num_tokens, num_experts)
    routing = router.route(x_TD, noise=noise_TE)
    assert routing.token_ids.tolist() == [t for t in range(num_tokens) for _ in range(top_k)]
    assert_matches_reference(routing, reference(router, x_TD, noise_TE), num_tokens)


@pytest.mark.parametrize("num_tokens, num_experts, top_k, seed", CASES)
def test_eval_is_noiseless_with_hard_load(num_tokens: int, num_experts: int, top_k: int, seed: int) -> None:
    torch.manual_seed(seed)
    router = make_router(num_experts, top_k).eval()
    x_TD = torch.randn(num_tokens, D_MODEL)
    # Eval ignores any noise it is given.
    routing = router.route(x_TD, noise=torch.randn(num_tokens, num_experts))
    assert_matches_reference(routing, reference(router, x_TD, None), num_tokens)


def test_noise_drawn_in_training_only() -> None:
    torch.manual_seed(0)
    router = make_router(8, 2)
    x_TD = torch.randn(33, D_MODEL)
    first, second = router.train().route(x_TD), router.route(x_TD)
    assert not torch.equal(first.weights, second.weights)
    first, second = router.eval().route(x_TD), router.route(x_TD)
    assert torch.equal(first.expert_ids, second.expert_ids) and torch.equal(first.weights, second.weights)


def test_zero_noise_std_falls_back_to_hard_load() -> None:
    torch.manual_seed(0)
    router = NoisyTopKRouter(D_MODEL, 8, 2).train()
    x_TD = torch.randn(7, D_MODEL)
    x_TD[:, 0] = 1.0
    with torch.no_grad():
        # softplus(-1e4) underflows to exactly 0: no noise, so routing is certain.
        router.noise_weight[:, 0] = -1e4
    routing = router.route(x_TD, noise=torch.randn(7, 8))
    assert_matches_reference(routing, reference(router, x_TD, None), 7)
    routing.aux_loss.backward()
    assert torch.isfinite(router.weight.grad).all() and torch.isfinite(router.noise_weight.grad).all()


def test_noise_weight_starts_at_zero() -> None:
    router = NoisyTopKRouter(D_MODEL, 4)
    assert torch.equal(router.noise_weight, torch.zeros(4, D_MODEL))
    router.reset_parameters()
    assert torch.equal(router.noise_weight, torch.zeros(4, D_MODEL))


def test_noise_of_wrong_shape_is_rejected() -> None:
    router = NoisyTopKRouter(D_MODEL, 4).train()
    with pytest.raises(ValueError, match="noise must have shape"):
        router.route(torch.randn(3, D_MODEL), noise=torch.randn(3, 5))


@pytest.mark.parametrize("loss", ["aux_loss", "z_loss"])
def test_losses_reach_router_weight(loss: str) -> None:
    torch.manual_seed(0)
    router = make_router(8, 2).train()
    getattr(router.route(torch.randn(7, D_MODEL)), loss).backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_load_loss_reaches_noise_weight() -> None:
    torch.manual_seed(0)
    router = NoisyTopKRouter(D_MODEL, 8, 2).train()
    router.route(torch.randn(33, D_MODEL)).aux_loss.backward()
    assert router.noise_weight.grad is not None and router.noise_weight.grad.abs().sum() > 0
