"""The reference of the fused router op against a per-token float64 loop, and its gradients.

Shape legend: T tokens, E experts, K top-k.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from lightning_moe import ops
from lightning_moe.ops import reference

NUM_EXPERTS = 8
FLOAT32_TINY = torch.finfo(torch.float32).tiny

MODES = [
    pytest.param(scoring, normalize, bias, id=f"{scoring}-{'normalize' if normalize else 'raw'}-{bias_id}")
    for scoring in ("softmax", "sigmoid")
    for normalize in (True, False)
    for bias, bias_id in ((False, "no_bias"), (True, "bias"))
]


def loop_topk_route(logits_TE: Tensor, top_k: int, scoring: str, normalize: bool, bias_E: Tensor | None) -> dict:
    """One token at a time in Python floats: picks best first, ties to the lower expert."""
    num_experts = logits_TE.shape[1]
    bias = bias_E.tolist() if bias_E is not None and scoring == "sigmoid" else [0.0] * num_experts
    picks, counts, prob_sum, lse_sq_sum = [], [0] * num_experts, [0.0] * num_experts, 0.0
    for logits in logits_TE.tolist():
        lse = math.log(sum(math.exp(v) for v in logits))
        if scoring == "softmax":
            scores = [math.exp(v - lse) for v in logits]
            keys = logits  # orders p as p does
            masses = scores
        else:
            scores = [1.0 / (1.0 + math.exp(-v)) for v in logits]
            keys = [s + b for s, b in zip(scores, bias, strict=True)]
            masses = [s / sum(scores) for s in scores]
        top = sorted(range(num_experts), key=lambda e: (-keys[e], e))[:top_k]
        total = sum(scores[e] for e in top)
        if scoring == "sigmoid":
            total = max(total, FLOAT32_TINY)
        priorities = [scores[e] if scoring == "softmax" else keys[e] for e in top]
        weights = [scores[e] / total if normalize else scores[e] for e in top]
        picks.append((top, weights, priorities))
        for e in top:
            counts[e] += 1
        prob_sum = [a + m for a, m in zip(prob_sum, masses, strict=True)]
        lse_sq_sum += lse**2
    num_tokens = len(picks)
    balance_loss = z_loss = 0.0
    if num_tokens:
        fractions = [count / (num_tokens * top_k) for count in counts]
        balance_loss = num_experts * sum(f * p / num_tokens for f, p in zip(fractions, prob_sum, strict=True))
        z_loss = lse_sq_sum / num_tokens
    return {
        "picks": picks,
        "counts": counts,
        "prob_sum": prob_sum,
        "lse_sq_sum": lse_sq_sum,
        "balance_loss": balance_loss,
        "z_loss": z_loss,
    }


def make_inputs(num_tokens: int, bias: bool, seed: int, ties: bool = False) -> tuple[Tensor, Tensor | None]:
    generator = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: many exact ties among a token's experts
        logits_TE = torch.randint(-2, 3, (num_tokens, NUM_EXPERTS), generator=generator).double()
        bias_E = torch.randint(0, 2, (NUM_EXPERTS,), generator=generator).float() / 2 if bias else None
    else:
        logits_TE = 2 * torch.randn(num_tokens, NUM_EXPERTS, generator=generator, dtype=torch.float64)
        bias_E = 0.3 * torch.randn(NUM_EXPERTS, generator=generator) if bias else None
    return logits_TE, bias_E


def assert_matches_loop(logits_TE: Tensor, top_k: int, scoring: str, normalize: bool, bias_E: Tensor | None) -> None:
    outputs = reference.topk_route(logits_TE, top_k, scoring, normalize, bias_E)
    expert_ids, weights, priorities, counts, prob_sum, lse_sq_sum, balance_loss, z_loss = outputs
    expected = loop_topk_route(logits_TE, top_k, scoring, normalize, bias_E)
    num_tokens = logits_TE.shape[0]
    assert expert_ids.shape == weights.shape == priorities.shape == (num_tokens, top_k)
    assert expert_ids.dtype == counts.dtype == torch.int64
    assert expert_ids.tolist() == [top for top, _, _ in expected["picks"]]
    close = {"rel": 1e-12, "abs": 1e-12}
    for t, (_, want_weights, want_priorities) in enumerate(expected["picks"]):
        assert weights[t].tolist() == pytest.approx(want_weights, **close)
        assert priorities[t].tolist() == pytest.approx(want_priorities, **close)
    assert counts.tolist() == expected["counts"]
    assert prob_sum.tolist() == pytest.approx(expected["prob_sum"], **close)
    assert lse_sq_sum.shape == () and lse_sq_sum.item() == pytest.approx(expected["lse_sq_sum"], **close)
    assert balance_loss.shape == () and balance_loss.item() == pytest.approx(expected["balance_loss"], **close)
    assert z_loss.shape == () and z_loss.item() == pytest.approx(expected["z_loss"], **close)


@pytest.mark.parametrize(("scoring", "normalize", "bias"), MODES)
@pytest.mark.parametrize("top_k", [1, 2, NUM_EXPERTS], ids=["K1", "K2", "KE"])
@pytest.mark.parametrize("num_tokens", [0, 1, 37], ids=lambda t: f"T{t}")
def test_reference_matches_the_loop(num_tokens: int, top_k: int, scoring: str, normalize: bool, bias: bool) -> None:
    logits_TE, bias_E = make_inputs(num_tokens, bias, seed=num_tokens * 10 + top_k)
    assert_matches_loop(logits_TE, top_k, scoring, normalize, bias_E)


@pytest.mark.parametrize(("scoring", "normalize", "bias"), MODES)
def test_ties_go_to_the_lower_expert(scoring: str, normalize: bool, bias: bool) -> None:
    logits_TE, bias_E = make_inputs(37, bias, seed=5, ties=True)
    assert_matches_loop(logits_TE, 3, scoring, normalize, bias_E)


def test_one_expert() -> None:
    logits_TE = torch.randn(5, 1, dtype=torch.float64)
    for scoring in ("softmax", "sigmoid"):
        expert_ids, weights, _, counts, prob_sum, *_ = reference.topk_route(logits_TE, 1, scoring, True)
        assert expert_ids.tolist() == [[0]] * 5 and counts.tolist() == [5]
        assert torch.allclose(weights, torch.ones_like(weights)) and prob_sum.item() == pytest.approx(5.0)


def test_sigmoid_weights_of_underflowing_scores_are_zero_not_nan() -> None:
    logits_TE = torch.full((2, 4), -200.0)
    _, weights, *_ = reference.topk_route(logits_TE, 2, "sigmoid", True)
    assert torch.equal(weights, torch.zeros_like(weights))


@pytest.mark.parametrize(("scoring", "normalize", "bias"), MODES)
@pytest.mark.parametrize("top_k", [2, NUM_EXPERTS], ids=["K2", "KE"])
def test_gradcheck_of_the_reference(top_k: int, scoring: str, normalize: bool, bias: bool) -> None:
    logits_TE, bias_E = make_inputs(5, bias, seed=top_k)
    logits_TE.requires_grad_(True)

    def differentiable_outputs(logits: Tensor) -> tuple[Tensor, ...]:
        _, weights, _, _, *sums_and_losses = reference.topk_route(logits, top_k, scoring, normalize, bias_E)
        return weights, *sums_and_losses

    assert torch.autograd.gradcheck(differentiable_outputs, (logits_TE,))


def test_op_on_cpu_is_the_reference() -> None:
    logits_TE, bias_E = make_inputs(37, bias=True, seed=0)
    logits_TE = logits_TE.float()
    route = ops.topk_route(logits_TE, 2, "sigmoid", True, bias_E)
    assert isinstance(route, ops.TopKRoute)
    for got, want in zip(route, reference.topk_route(logits_TE, 2, "sigmoid", True, bias_E), strict=True):
        assert torch.equal(got, want)


def test_softmax_ignores_the_bias() -> None:
    logits_TE, bias_E = make_inputs(7, bias=True, seed=1)
    with_bias = ops.topk_route(logits_TE, 2, "softmax", True, bias_E)
    without = ops.topk_route(logits_TE, 2, "softmax", True)
    for got, want in zip(with_bias, without, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize(
    ("top_k", "scoring", "match"),
    [(0, "softmax", "top_k"), (NUM_EXPERTS + 1, "softmax", "top_k"), (2, "relu", "scoring")],
    ids=["zero_k", "k_above_E", "unknown_scoring"],
)
def test_op_rejects_bad_arguments(top_k: int, scoring: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ops.topk_route(torch.randn(3, NUM_EXPERTS), top_k, scoring, True)  # type: ignore[arg-type]
