"""SigmoidRouter against a float64 per-token reference; the balance bias and group-limited routing.

Shape legend: T tokens, D model dim, E experts, K top-k, G expert groups.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_moe.routers import SigmoidRouter
from tests.routers.routing_checks import assert_matches_reference

D_MODEL = 16

CASES = [
    pytest.param(*case, id="T{}-E{}-K{}-G{}-top{}-seed{}".format(*case))
    for case in [
        # num_tokens, num_experts, top_k, num_groups, top_groups, seed
        (0, 8, 2, 4, 2, 0),
        (1, 4, 2, 1, 1, 1),
        (7, 8, 2, 1, 1, 2),
        (7, 8, 2, 4, 2, 3),
        (33, 12, 3, 3, 1, 4),
        (33, 6, 2, 6, 3, 5),
        (33, 8, 8, 2, 2, 6),
        (33, 16, 4, 8, 3, 7),
    ]
]


def make_router(num_experts: int, top_k: int, num_groups: int, top_groups: int) -> SigmoidRouter:
    router = SigmoidRouter(D_MODEL, num_experts, top_k, num_groups=num_groups, top_groups=top_groups)
    with torch.no_grad():
        router.weight.mul_(3.0)
        # A bias of the order of the score gaps changes some selections.
        router.bias.uniform_(-0.3, 0.3)
    return router


def reference(router: SigmoidRouter, x_TD: torch.Tensor) -> dict:
    """Per-token float64 loop: group filter, biased top-k, unbiased renormalised weights, losses."""
    num_experts, top_k, num_groups = router.num_experts, router.top_k, router.num_groups
    group_size = num_experts // num_groups
    bias = router.bias.double().tolist()
    per_token, allowed_groups, counts, normalised_sums, z_terms = [], [], [0] * num_experts, [0.0] * num_experts, []
    for x_D in x_TD.double():
        logits = (router.weight.detach().double() @ x_D).tolist()
        scores = [1.0 / (1.0 + math.exp(-v)) for v in logits]
        biased = [s + b for s, b in zip(scores, bias, strict=True)]
        group_scores = [
            sum(sorted(biased[g * group_size : (g + 1) * group_size], reverse=True)[: min(2, group_size)])
            for g in range(num_groups)
        ]
        groups = set(sorted(range(num_groups), key=lambda g: -group_scores[g])[: router.top_groups])
        eligible = [e for e in range(num_experts) if e // group_size in groups]
        top = sorted(eligible, key=lambda e: -biased[e])[:top_k]
        total = sum(scores[e] for e in top)
        per_token.append({e: (scores[e] / total, biased[e]) for e in top})
        allowed_groups.append(groups)
        for e in top:
            counts[e] += 1
        normalised_sums = [n + s / sum(scores) for n, s in zip(normalised_sums, scores, strict=True)]
        z_terms.append(math.log(sum(math.exp(v) for v in logits)) ** 2)
    num_tokens = len(per_token)
    aux = 0.0
    if num_tokens:
        aux = num_experts * sum(
            c / (num_tokens * top_k) * n / num_tokens for c, n in zip(counts, normalised_sums, strict=True)
        )
    z = sum(z_terms) / num_tokens if num_tokens else 0.0
    return {"per_token": per_token, "groups": allowed_groups, "aux": aux, "z": z}


@pytest.mark.parametrize("num_tokens, num_experts, top_k, num_groups, top_groups, seed", CASES)
def test_matches_reference(
    num_tokens: int, num_experts: int, top_k: int, num_groups: int, top_groups: int, seed: int
) -> None:
    torch.manual_seed(seed)
    router = make_router(num_experts, top_k, num_groups, top_groups)
    x_TD = torch.randn(num_tokens, D_MODEL)
    routing = router.route(x_TD)
    assert routing.token_ids.tolist() == [t for t in range(num_tokens) for _ in range(top_k)]
    assert_matches_reference(routing, reference(router, x_TD), num_tokens)


@pytest.mark.parametrize("num_experts, top_k, num_groups, top_groups", [(8, 2, 4, 2), (12, 3, 3, 1), (16, 4, 8, 3)])
def test_group_limited_routing_picks_only_from_top_groups(
    num_experts: int, top_k: int, num_groups: int, top_groups: int
) -> None:
    torch.manual_seed(0)
    router = make_router(num_experts, top_k, num_groups, top_groups)
    x_TD = torch.randn(33, D_MODEL)
    routing = router.route(x_TD)
    allowed_groups = reference(router, x_TD)["groups"]
    group_size = num_experts // num_groups
    for t, e in zip(routing.token_ids.tolist(), routing.expert_ids.tolist(), strict=True):
        assert e // group_size in allowed_groups[t]
    # The restriction binds: some token would pick another group's expert without it.
    free = SigmoidRouter(D_MODEL, num_experts, top_k)
    free.load_state_dict(router.state_dict())
    assert not torch.equal(free.route(x_TD).expert_ids, routing.expert_ids)


def test_selection_follows_bias_and_weights_ignore_it() -> None:
    torch.manual_seed(0)
    router = SigmoidRouter(D_MODEL, 8, top_k=2)
    x_TD = torch.randn(7, D_MODEL)
    scores_TE = torch.sigmoid(x_TD.double() @ router.weight.detach().double().t())
    with torch.no_grad():
        router.bias[5] = 10.0
    routing = router.route(x_TD)
    expert_ids_TK, weights_TK = routing.expert_ids.view(7, 2), routing.weights.view(7, 2)
    assert torch.all(expert_ids_TK[:, 0] == 5)
    picked_TK = scores_TE.gather(1, expert_ids_TK)
    assert torch.allclose(weights_TK.double(), picked_TK / picked_TK.sum(-1, keepdim=True), rtol=1e-5)
    assert torch.allclose(routing.priorities.view(7, 2)[:, 0].double(), scores_TE[:, 5] + 10.0, rtol=1e-6)


def skewed_router(bias_update_rate: float) -> tuple[SigmoidRouter, torch.Tensor]:
    """A router that sends nearly every token to expert 0, and the tokens it routes."""
    torch.manual_seed(0)
    router = SigmoidRouter(D_MODEL, 4, top_k=1, bias_update_rate=bias_update_rate)
    x_TD = torch.randn(64, D_MODEL)
    x_TD[:, 0] = 1.0
    with torch.no_grad():
        router.weight[0, 0] = 3.0
    return router, x_TD


def test_update_bias_lowers_overloaded_and_raises_underloaded() -> None:
    router, x_TD = skewed_router(bias_update_rate=0.05)
    counts_E = torch.bincount(router.train().route(x_TD).expert_ids, minlength=4)
    assert torch.equal(router.pending_tokens_per_expert, counts_E)
    router.update_bias()
    expected_E = torch.where(counts_E.float() > counts_E.float().mean(), -0.05, 0.05)
    assert torch.allclose(router.bias, expected_E)
    assert router.bias[0] < 0 and torch.equal(router.pending_tokens_per_expert, torch.zeros(4, dtype=torch.int64))


def test_repeated_updates_reduce_imbalance() -> None:
    router, x_TD = skewed_router(bias_update_rate=0.01)
    router.train()
    imbalances = []
    for _ in range(80):
        counts_E = torch.bincount(router.route(x_TD).expert_ids, minlength=4).float()
        imbalances.append((counts_E.max() / counts_E.mean()).item())
        router.update_bias()
    assert imbalances[0] > 3.0
    # Near balance the sign update makes the bias oscillate by one step, so the load does too.
    assert max(imbalances[-10:]) < 1.4


def test_update_bias_uses_given_counts_and_clears_pending() -> None:
    router = SigmoidRouter(D_MODEL, 4, bias_update_rate=0.1).train()
    router.route(torch.randn(7, D_MODEL))
    router.update_bias(torch.tensor([10.0, 0.0, 5.0, 1.0]))  # mean 4
    assert torch.allclose(router.bias, torch.tensor([-0.1, 0.1, -0.1, 0.1]))
    assert int(router.pending_tokens_per_expert.sum()) == 0


def test_update_bias_without_tokens_is_a_no_op() -> None:
    router = SigmoidRouter(D_MODEL, 4)
    router.update_bias()
    assert torch.equal(router.bias, torch.zeros(4))


def test_update_bias_rejects_counts_of_wrong_shape() -> None:
    with pytest.raises(ValueError, match="tokens_per_expert must have shape"):
        SigmoidRouter(D_MODEL, 4).update_bias(torch.ones(5))


def test_eval_does_not_count_tokens() -> None:
    router = SigmoidRouter(D_MODEL, 4).eval()
    router.route(torch.randn(7, D_MODEL))
    assert int(router.pending_tokens_per_expert.sum()) == 0


def test_bias_is_a_saved_float32_buffer_not_a_parameter() -> None:
    router = SigmoidRouter(D_MODEL, 4)
    with torch.no_grad():
        router.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    state = router.state_dict()
    assert "bias" in state and "pending_tokens_per_expert" not in state
    assert router.bias.dtype == torch.float32
    assert all(parameter is not router.bias for parameter in router.parameters())
    restored = SigmoidRouter(D_MODEL, 4)
    restored.load_state_dict(state)
    assert torch.equal(restored.bias, router.bias)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        pytest.param({"num_groups": 3}, ValueError, r"num_groups=3 .*num_experts=8", id="groups-not-dividing"),
        pytest.param({"num_groups": 0}, ValueError, "num_groups=0", id="zero-groups"),
        pytest.param({"num_groups": 2.0}, TypeError, "num_groups", id="float-groups"),
        pytest.param({"num_groups": 4, "top_groups": 0}, ValueError, "top_groups=0", id="zero-top-groups"),
        pytest.param({"num_groups": 4, "top_groups": 5}, ValueError, "top_groups=5", id="too-many-top-groups"),
        pytest.param({"top_k": 3, "num_groups": 4, "top_groups": 1}, ValueError, "top_k=3", id="top-k-too-large"),
        pytest.param({"bias_update_rate": -1e-3}, ValueError, "bias_update_rate", id="negative-rate"),
        pytest.param({"bias_update_rate": "fast"}, TypeError, "bias_update_rate", id="string-rate"),
    ],
)
def test_rejects_bad_configuration(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        SigmoidRouter(D_MODEL, 8, **kwargs)


@pytest.mark.parametrize("loss", ["aux_loss", "z_loss"])
def test_losses_reach_router_weight(loss: str) -> None:
    torch.manual_seed(0)
    router = make_router(8, 2, 4, 2)
    getattr(router.route(torch.randn(7, D_MODEL)), loss).backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_bias_stays_float32_when_router_is_cast_to_bf16() -> None:
    router = SigmoidRouter(8, 4).to(torch.bfloat16)
    assert router.weight.dtype == torch.bfloat16
    assert router.bias.dtype == torch.float32
    router.update_bias(torch.tensor([10, 0, 0, 0]))
    assert router.bias[0].item() == pytest.approx(-1e-3)


@pytest.mark.parametrize("num_groups, top_groups", [(1, 1), (4, 2)], ids=["fused", "grouped"])
def test_routing_and_pending_counts_carry_the_tokens_per_expert(num_groups: int, top_groups: int) -> None:
    torch.manual_seed(0)
    router = make_router(8, 2, num_groups, top_groups).train()
    routing = router.route(torch.randn(33, D_MODEL))
    counts_E = torch.bincount(routing.expert_ids, minlength=8)
    assert routing.tokens_per_expert is not None and torch.equal(routing.tokens_per_expert, counts_E)
    router.route(torch.randn(5, D_MODEL))
    assert int(router.pending_tokens_per_expert.sum()) == (33 + 5) * 2
