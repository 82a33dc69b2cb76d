"""The router contract: shared losses, validation, the registry and every router in the MoE layer.

Shape legend: T tokens, D model dim, E experts, K top-k, N assignments.
"""

from __future__ import annotations

import math

import pytest
import torch

import lightning_moe
from lightning_moe.ops.reference import token_offsets
from lightning_moe.routers import ROUTERS, Router, base, build_router
from lightning_moe.routers.base import switch_balance_loss, token_choice_routing, token_major_layout, z_loss_of

D_MODEL = 16

# The top_k each registered router accepts with 8 experts.
TOP_K = {"topk": 2, "noisy_topk": 2, "switch": 1, "gshard": 2, "sigmoid": 2, "expert_choice": 2}


@pytest.mark.parametrize("num_tokens", [1, 7, 33], ids=lambda t: f"T{t}")
def test_z_loss_matches_reference(num_tokens: int) -> None:
    torch.manual_seed(num_tokens)
    logits_TE = (3 * torch.randn(num_tokens, 8)).requires_grad_()
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits_TE.tolist()) / num_tokens
    loss = z_loss_of(logits_TE)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert logits_TE.grad is not None and logits_TE.grad.abs().sum() > 0


def test_z_loss_is_zero_without_tokens() -> None:
    loss = z_loss_of(torch.zeros(0, 8))
    assert loss.shape == () and loss.dtype == torch.float32 and loss.item() == 0.0


@pytest.mark.parametrize("num_tokens, top_k", [(1, 1), (7, 2), (33, 3)], ids=["T1-K1", "T7-K2", "T33-K3"])
def test_switch_balance_loss_matches_reference(num_tokens: int, top_k: int) -> None:
    torch.manual_seed(num_tokens)
    num_experts = 8
    probs_TE = torch.softmax(torch.randn(num_tokens, num_experts), dim=-1).requires_grad_()
    expert_ids = torch.randint(0, num_experts, (num_tokens * top_k,))
    fraction = [expert_ids.tolist().count(e) / (num_tokens * top_k) for e in range(num_experts)]
    mean_prob = [sum(row[e] for row in probs_TE.tolist()) / num_tokens for e in range(num_experts)]
    expected = num_experts * sum(f * p for f, p in zip(fraction, mean_prob, strict=True))
    loss = switch_balance_loss(probs_TE, expert_ids, num_experts)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert probs_TE.grad is not None and probs_TE.grad.abs().sum() > 0


def test_switch_balance_loss_is_one_under_perfect_balance() -> None:
    probs_TE = torch.full((8, 4), 0.25)
    assert switch_balance_loss(probs_TE, torch.arange(8) % 4, 4).item() == pytest.approx(1.0)


def test_switch_balance_loss_is_zero_without_tokens() -> None:
    loss = switch_balance_loss(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), 4)
    assert loss.shape == () and loss.dtype == torch.float32 and loss.item() == 0.0


def test_token_choice_routing_is_token_major() -> None:
    expert_ids_TK = torch.tensor([[2, 0], [1, 3], [0, 1]])
    weights_TK = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]], dtype=torch.float64)
    routing = token_choice_routing(expert_ids_TK, weights_TK, weights_TK, torch.zeros(()), torch.zeros(()))
    assert routing.token_ids.tolist() == [0, 0, 1, 1, 2, 2]
    assert routing.expert_ids.tolist() == [2, 0, 1, 3, 0, 1]
    assert routing.weights.dtype == routing.priorities.dtype == torch.float32
    assert routing.token_offsets is not None and routing.token_offsets.tolist() == [0, 2, 4, 6]


@pytest.mark.parametrize("num_tokens", [0, 1, 9], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("top_k", [1, 3])
def test_token_major_layout_matches_a_search_over_the_ids(num_tokens: int, top_k: int) -> None:
    token_ids, offsets = token_major_layout(num_tokens, top_k, torch.device("cpu"))
    expected_ids = [t for t in range(num_tokens) for _ in range(top_k)]
    assert token_ids.dtype == offsets.dtype == torch.int64
    assert token_ids.tolist() == expected_ids
    assert torch.equal(offsets, token_offsets(torch.tensor(expected_ids, dtype=torch.int64), num_tokens))


def test_token_major_layout_is_shared_between_eager_calls() -> None:
    first = token_major_layout(5, 2, torch.device("cpu"))
    again = token_major_layout(5, 2, torch.device("cpu"))
    assert all(a is b for a, b in zip(first, again, strict=True))
    assert token_major_layout(5, 3, torch.device("cpu"))[0] is not first[0]


def test_token_major_layout_made_under_inference_mode_serves_training_too() -> None:
    base._cached_token_major_layout.cache_clear()  # so that inference mode makes them first
    with torch.inference_mode():
        token_ids, _ = token_major_layout(6, 4, torch.device("cpu"))
    assert not token_ids.is_inference()
    # A layer that first ran under inference mode still trains: its backward saves the ids.
    torch.manual_seed(0)
    layer = lightning_moe.MoE(D_MODEL, num_experts=4, top_k=4, d_hidden=8)
    x = torch.randn(6, D_MODEL)
    with torch.inference_mode():
        layer(x)
    layer(x).sum().backward()
    assert layer.router.weight.grad is not None


def test_select_drops_the_counts_it_changes() -> None:
    expert_ids_TK = torch.tensor([[2, 0], [1, 3]])
    weights_TK = torch.full((2, 2), 0.5)
    counts = torch.tensor([1, 1, 1, 1])
    routing = token_choice_routing(expert_ids_TK, weights_TK, weights_TK, torch.zeros(()), torch.zeros(()), counts)
    assert routing.tokens_per_expert is counts
    kept = routing.select(torch.tensor([True, False, True, True]))
    assert kept.expert_ids.tolist() == [2, 1, 3] and kept.tokens_per_expert is None
    assert routing.token_offsets is not None and kept.token_offsets is None


@pytest.mark.parametrize(
    "args, error, match",
    [
        pytest.param((0, 4, 1), ValueError, "d_model must be at least 1", id="zero-d-model"),
        pytest.param((16, 0, 1), ValueError, "num_experts must be at least 1", id="zero-experts"),
        pytest.param((16, 4.0, 1), TypeError, "num_experts must be an int", id="float-experts"),
        pytest.param((16, 4, True), TypeError, "top_k must be an int", id="bool-top-k"),
        pytest.param((16, 4, 0), ValueError, "top_k must be at least 1", id="zero-top-k"),
        pytest.param((16, 4, 5), ValueError, "top_k=5 is larger than num_experts=4", id="top-k-above-experts"),
    ],
)
def test_router_validates_its_arguments(args: tuple, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        Router(*args)


def test_base_router_has_no_scheme() -> None:
    with pytest.raises(NotImplementedError):
        Router(D_MODEL, 4, 1).route(torch.randn(3, D_MODEL))


def test_logits_are_float32() -> None:
    router = Router(D_MODEL, 4, 1)
    assert router.logits(torch.randn(3, D_MODEL, dtype=torch.bfloat16)).dtype == torch.float32


def test_build_router_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="Unknown router 'nope'; choose one of"):
        build_router("nope", D_MODEL, 4, 1)


@pytest.mark.parametrize("name", list(ROUTERS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("num_tokens", [0, 1, 7], ids=lambda t: f"T{t}")
def test_every_router_keeps_the_contract(name: str, training: bool, num_tokens: int) -> None:
    torch.manual_seed(0)
    router = build_router(name, D_MODEL, 8, TOP_K[name]).train(training)
    routing = router(torch.randn(num_tokens, D_MODEL, dtype=torch.bfloat16))
    num_assignments = routing.token_ids.numel()
    for ids in (routing.token_ids, routing.expert_ids):
        assert ids.dtype == torch.int64 and ids.shape == (num_assignments,)
    for values in (routing.weights, routing.priorities):
        assert values.dtype == torch.float32 and values.shape == (num_assignments,)
    for loss in (routing.aux_loss, routing.z_loss):
        assert loss.dtype == torch.float32 and loss.shape == ()
    assert not routing.priorities.requires_grad
    if routing.tokens_per_expert is not None:  # counted by the router: must be the histogram
        assert torch.equal(routing.tokens_per_expert, torch.bincount(routing.expert_ids, minlength=8))
    if num_tokens == 0:
        assert num_assignments == 0 and routing.aux_loss.item() == 0.0 and routing.z_loss.item() == 0.0
    else:
        assert num_assignments > 0 and torch.all((routing.expert_ids >= 0) & (routing.expert_ids < 8))
        assert torch.all((routing.token_ids >= 0) & (routing.token_ids < num_tokens))
    if routing.token_offsets is not None:  # known to the router: must be where each token's assignments start
        assert torch.equal(routing.token_offsets, token_offsets(routing.token_ids, num_tokens))


@pytest.mark.parametrize("name", list(ROUTERS))
def test_moe_layer_runs_forward_and_backward(name: str) -> None:
    torch.manual_seed(0)
    layer = lightning_moe.MoE(D_MODEL, 8, TOP_K[name], d_hidden=32, router=name, aux_loss_weight=0.01)
    x = torch.randn(2, 5, D_MODEL, requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape
    out.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    grad = layer.router.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_every_router_returns_token_major_assignments(name: str) -> None:
    torch.manual_seed(0)
    top_k = {"switch": 1, "gshard": 2}.get(name, 3)
    router = build_router(name, 8, 6, top_k)
    routing = router(torch.randn(21, 8))
    assert torch.all(routing.token_ids[1:] >= routing.token_ids[:-1])
