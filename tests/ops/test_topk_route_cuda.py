"""The topk_route kernels against their reference and a float64 oracle, and the routers on a GPU.

Shape legend: T tokens, D model dim, E experts, K experts per token.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lightning_moe import ops
from lightning_moe.ops import reference
from lightning_moe.routers import SigmoidRouter, TopKRouter
from tests.autograd_graph import graph_node_names
from tests.ops.gpu_checks import GPU_MARKS, assert_close_to_oracle, poison_cached_memory, routing_inputs

pytestmark = GPU_MARKS


TOPK_ROUTE_MODES = [
    pytest.param(scoring, normalize, bias, id=f"{scoring}-{'normalize' if normalize else 'raw'}-{bias_id}")
    for scoring, bias_choices in (("softmax", (False,)), ("sigmoid", (False, True)))
    for normalize in (True, False)
    for bias, bias_id in ((choice, "bias" if choice else "no_bias") for choice in bias_choices)
]


def routed_given_picks(logits_TE: Tensor, expert_ids_TK: Tensor, scoring: str, normalize: bool) -> list[Tensor]:
    """The differentiable outputs of topk_route for given picks: the float64 oracle."""
    scores_TE = torch.softmax(logits_TE, -1) if scoring == "softmax" else torch.sigmoid(logits_TE)
    picked_TK = scores_TE.gather(1, expert_ids_TK)
    weights_TK = picked_TK
    if normalize:
        picked_sum_T1 = picked_TK.sum(-1, keepdim=True)
        if scoring == "sigmoid":
            picked_sum_T1 = picked_sum_T1.clamp_min(torch.finfo(torch.float32).tiny)
        weights_TK = picked_TK / picked_sum_T1
    masses_TE = scores_TE if scoring == "softmax" else scores_TE / scores_TE.sum(-1, keepdim=True)
    prob_sum_E, lse_sq_sum = masses_TE.sum(0), torch.logsumexp(logits_TE, -1).square().sum()
    # The losses, written out: E * sum_e (count_e / (T K)) (prob_sum_e / T), and lse_sq_sum / T.
    (num_tokens, num_experts), top_k = logits_TE.shape, expert_ids_TK.shape[1]
    if num_tokens == 0:
        return [weights_TK, prob_sum_E, lse_sq_sum, prob_sum_E.sum() * 0, lse_sq_sum * 0]
    counts_E = torch.bincount(expert_ids_TK.reshape(-1), minlength=num_experts).double()
    balance_loss = num_experts * ((counts_E / (num_tokens * top_k)) * (prob_sum_E / num_tokens)).sum()
    return [weights_TK, prob_sum_E, lse_sq_sum, balance_loss, lse_sq_sum / num_tokens]


@pytest.mark.parametrize(("scoring", "normalize", "bias"), TOPK_ROUTE_MODES)
@pytest.mark.parametrize("top_k", [1, 2, 6, None], ids=["K1", "K2", "K6", "KE"])
@pytest.mark.parametrize("num_experts", [1, 8, 64, 160], ids=lambda e: f"E{e}")
@pytest.mark.parametrize("num_tokens", [0, 1, 37, 4096], ids=lambda t: f"T{t}")
def test_topk_route_forward_and_backward(
    num_tokens: int,
    num_experts: int,
    top_k: int | None,
    scoring: str,
    normalize: bool,
    bias: bool,
    generator: torch.Generator,
) -> None:
    top_k = num_experts if top_k is None else top_k
    if top_k > num_experts:
        pytest.skip("top_k above the number of experts")
    logits_TE, bias_E = routing_inputs(num_tokens, num_experts, bias, generator)
    poison_cached_memory()
    got = ops.topk_route(logits_TE, top_k, scoring, normalize, bias_E)  # type: ignore[arg-type]
    want = reference.topk_route(logits_TE, top_k, scoring, normalize, bias_E)
    # The picks and counts are exact: both sides rank the same float32 keys.
    assert torch.equal(got.expert_ids_TK, want[0]) and torch.equal(got.tokens_per_expert_E, want[3])
    logits64 = logits_TE.detach().double().cpu().requires_grad_()
    oracle = routed_given_picks(logits64, got.expert_ids_TK.cpu(), scoring, normalize)
    bias64 = 0.0 if bias_E is None else bias_E.double().cpu()
    scores64 = torch.softmax(logits64, -1) if scoring == "softmax" else torch.sigmoid(logits64) + bias64
    assert_close_to_oracle(got.priorities_TK, want[2], scores64.detach().gather(1, got.expert_ids_TK.cpu()))
    differentiable = [got.weights_TK, got.prob_sum_E, got.lse_sq_sum, got.balance_loss, got.z_loss]
    torch_differentiable = [want[1], *want[4:]]
    for output, torch_output, oracle_output in zip(differentiable, torch_differentiable, oracle, strict=True):
        assert output.dtype == torch.float32 and output.shape == oracle_output.shape
        assert_close_to_oracle(output, torch_output, oracle_output.detach())

    upstream = [torch.randn(output.shape, generator=generator).cuda() for output in differentiable]
    poison_cached_memory()
    (grad,) = torch.autograd.grad(differentiable, logits_TE, upstream)
    (torch_grad,) = torch.autograd.grad(torch_differentiable, logits_TE, upstream)
    (oracle_grad,) = torch.autograd.grad(oracle, logits64, [u.double().cpu() for u in upstream])
    assert_close_to_oracle(grad, torch_grad, oracle_grad)


@pytest.mark.parametrize("absent", ["prob_sum", "lse_sq_sum", "balance_loss", "z_loss", "all"])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_absent_loss_gradients_count_as_zeros(scoring: str, absent: str, generator: torch.Generator) -> None:
    # A layer without a balance or z-loss leaves those losses and sums without a gradient; the
    # backward kernel then takes none rather than a zero-filled tensor, and must give the same bits
    # as with zeros.
    logits_TE, _ = routing_inputs(300, 16, False, generator)
    route = ops.topk_route(logits_TE, 2, scoring, True)  # type: ignore[arg-type]
    names = ("weights", "prob_sum", "lse_sq_sum", "balance_loss", "z_loss")
    outputs = [route.weights_TK, route.prob_sum_E, route.lse_sq_sum, route.balance_loss, route.z_loss]
    upstream = [torch.randn(output.shape, generator=generator).cuda() for output in outputs]
    keep = [0] + [i for i, name in enumerate(names) if i > 0 and absent not in (name, "all")]
    zeroed = [u if i in keep else torch.zeros_like(u) for i, u in enumerate(upstream)]
    (with_zeros,) = torch.autograd.grad(outputs, logits_TE, zeroed, retain_graph=True)
    poison_cached_memory()
    (without,) = torch.autograd.grad([outputs[i] for i in keep], logits_TE, [upstream[i] for i in keep])
    assert torch.equal(without, with_zeros)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_topk_route_is_the_same_on_every_run(scoring: str, generator: torch.Generator) -> None:
    logits_TE, bias_E = routing_inputs(4096, 64, scoring == "sigmoid", generator)
    upstream_weights = torch.randn(4096, 6, generator=generator).cuda()

    def run() -> list[Tensor]:
        route = ops.topk_route(logits_TE, 6, scoring, True, bias_E)  # type: ignore[arg-type]
        loss = (route.weights_TK * upstream_weights).sum() + route.prob_sum_E.square().sum() + route.lse_sq_sum
        return [*route, *torch.autograd.grad(loss, logits_TE)]

    for first, second in zip(run(), run(), strict=True):
        assert torch.equal(first, second)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_compiled_topk_route_matches_eager(scoring: str, generator: torch.Generator) -> None:
    logits_TE, bias_E = routing_inputs(256, 64, scoring == "sigmoid", generator)
    upstream_weights = torch.randn(256, 6, generator=generator).cuda()

    def losses(logits: Tensor) -> Tensor:
        route = ops.topk_route(logits, 6, scoring, True, bias_E)  # type: ignore[arg-type]
        return (route.weights_TK * upstream_weights).sum() + route.prob_sum_E.square().sum() + route.lse_sq_sum

    compiled = torch.compile(losses, fullgraph=True)
    eager_grad, compiled_grad = (
        torch.autograd.grad(function(logits_TE), logits_TE)[0] for function in (losses, compiled)
    )
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-5, atol=1e-5)


def test_topk_route_and_its_routers_do_not_synchronise_with_the_host(generator: torch.Generator) -> None:
    x_TD = torch.randn(512, 64, generator=generator).cuda().requires_grad_()
    routers = [TopKRouter(64, 64, 6).cuda(), SigmoidRouter(64, 64, 6).cuda().train()]

    def route_and_backward() -> None:
        for router in routers:
            routing = router(x_TD)
            (routing.weights.sum() + routing.aux_loss + routing.z_loss).backward()

    route_and_backward()  # first calls initialise cuBLAS and the allocator, which may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        route_and_backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# (token dtype, weight dtype, experts): the tensor-core logits kernels, with a float32 weight and
# with a bf16 one widened inside the node; the SIMT kernels, few experts and float32 tokens.
ROUTER_KERNELS = {
    "tensor_cores": (torch.bfloat16, torch.float32, 64),
    "tensor_cores_bf16_weight": (torch.bfloat16, torch.bfloat16, 64),
    "simt_few_experts": (torch.bfloat16, torch.float32, 8),
    "simt_float32_tokens": (torch.float32, torch.float32, 16),
}


@pytest.mark.parametrize("kernels", ROUTER_KERNELS)
@pytest.mark.parametrize(("scoring", "bias"), [("softmax", False), ("sigmoid", True)], ids=["softmax", "sigmoid"])
@pytest.mark.parametrize("num_tokens", [0, 300], ids=lambda t: f"T{t}")
def test_router_topk_route_in_one_node_gives_the_bits_of_the_composition(
    kernels: str, scoring: str, bias: bool, num_tokens: int, generator: torch.Generator
) -> None:
    x_dtype, weight_dtype, num_experts = ROUTER_KERNELS[kernels]
    x = torch.randn(num_tokens, 128, generator=generator).to("cuda", x_dtype).requires_grad_()
    weight = (0.1 * torch.randn(num_experts, 128, generator=generator)).to("cuda", weight_dtype).requires_grad_()
    bias_E = 0.3 * torch.randn(num_experts, generator=generator).cuda() if bias else None
    fused = ops.router_topk_route(x, weight, 2, scoring, True, bias_E)  # type: ignore[arg-type]
    assert type(fused.weights_TK.grad_fn).__name__ == "_RouterTopKRouteFunctionBackward"
    composed = ops.topk_route(ops.router_logits(x, weight), 2, scoring, True, bias_E)  # type: ignore[arg-type]
    for got, want in zip(fused, composed, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
    outputs = [fused.weights_TK, fused.prob_sum_E, fused.lse_sq_sum, fused.balance_loss, fused.z_loss]
    upstream = [torch.randn(output.shape, generator=generator).cuda() for output in outputs]
    grads = torch.autograd.grad(outputs, (x, weight), upstream)
    composed_outputs = [composed.weights_TK, composed.prob_sum_E, composed.lse_sq_sum, *composed[6:]]
    expected = torch.autograd.grad(composed_outputs, (x, weight), upstream)
    for got, want in zip(grads, expected, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_routers_take_the_one_node_route_unless_they_compute_their_logits_otherwise(
    generator: torch.Generator,
) -> None:
    class ScaledLogits(TopKRouter):
        def logits(self, x_TD: Tensor) -> Tensor:
            return 2 * super().logits(x_TD)

    x = torch.randn(64, 128, generator=generator).to("cuda", torch.bfloat16)
    one_node = graph_node_names(TopKRouter(128, 64, 2).cuda()(x).weights)
    assert "_RouterTopKRouteFunctionBackward" in one_node and "_TopKRouteFunctionBackward" not in one_node
    own_logits = graph_node_names(ScaledLogits(128, 64, 2).cuda()(x).weights)
    assert "_TopKRouteFunctionBackward" in own_logits and "_RouterTopKRouteFunctionBackward" not in own_logits
