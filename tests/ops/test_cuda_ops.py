"""The CUDA kernels against their references, and the MoE layer on a GPU against the CPU.

Shape legend: T tokens, D model dim, E experts, N assignments.

Each output is checked on fresh random inputs, written into memory poisoned with NaN first (the
ops allocate their outputs; freeing a NaN-filled block just before hands that block to them), so
a row the kernel forgets to write shows up as NaN. Rounding is judged against a float64 oracle:
a kernel's error may be at most about twice that of the same computation done by PyTorch in the
same dtype.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor

from lightning_moe import ops
from lightning_moe.layers.experts import GroupedExperts, _run_grouped
from lightning_moe.layers.moe import MoE
from lightning_moe.ops import extension, reference
from lightning_moe.ops.grouped_mm import grouped_mm_usable
from lightning_moe.routers import SigmoidRouter, TopKRouter
from lightning_moe.routers.logits import router_logits
from tests.ops.routing_cases import (
    CASE_NAMES,
    PRIORITY_KINDS,
    Case,
    capacities_to_try,
    loop_sort,
    make_case,
    make_priorities,
    make_skewed_routing,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["float32", "bfloat16", "float16"]


@pytest.fixture(scope="module", autouse=True)
def cuda_extension() -> None:
    """The kernels must build here: a GPU run that silently fell back would test nothing."""
    assert extension.load_extension() is not None, "the CUDA extension did not build; see the warning"


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(torch.seed() % 2**31)


def poison_cached_memory(num_bytes: int = 1 << 26) -> None:
    """Leave a freed NaN-filled block in the caching allocator for the next outputs to reuse."""
    block = torch.full((num_bytes // 4,), float("nan"), device="cuda")
    del block


def on_cuda(case: Case) -> Case:
    return Case(case.num_tokens, case.num_experts, case.token_ids.cuda(), case.expert_ids.cuda(), case.weights.cuda())


def assert_close_to_oracle(got: Tensor, same_dtype_torch: Tensor, oracle: Tensor) -> None:
    """``got`` no further from the float64 ``oracle`` than twice PyTorch's own result in its dtype."""
    assert not got.isnan().any(), "an output element was never written"
    got_error = (got.double().cpu() - oracle).abs().max().item() if got.numel() else 0.0
    torch_error = (same_dtype_torch.double().cpu() - oracle).abs().max().item() if got.numel() else 0.0
    scale = oracle.abs().max().item() if oracle.numel() else 0.0
    assert got_error <= 2 * torch_error + 1e-6 * max(scale, 1.0), (got_error, torch_error)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_sort_by_expert_matches_the_stable_sort(name: str, generator: torch.Generator) -> None:
    case = on_cuda(make_case(name, generator))
    poison_cached_memory()
    order, inverse, counts = ops.sort_by_expert(case.expert_ids, case.num_experts)
    expected = loop_sort(case.expert_ids.cpu(), case.num_experts)
    assert (order.tolist(), inverse.tolist(), counts.tolist()) == expected


@pytest.mark.parametrize(("num_assignments", "num_experts"), [(98_304, 64), (65_536, 8), (100_003, 1024), (777, 8192)])
def test_sort_by_expert_at_scale(num_assignments: int, num_experts: int, generator: torch.Generator) -> None:
    expert_ids = torch.randint(0, num_experts, (num_assignments,), generator=generator).cuda()
    poison_cached_memory()
    order, inverse, counts = ops.sort_by_expert(expert_ids, num_experts)
    expected = reference.sort_by_expert(expert_ids, num_experts)
    for got, want in zip((order, inverse, counts), expected, strict=True):
        assert torch.equal(got, want)


def poison_small_blocks() -> None:
    """:func:`poison_cached_memory` for outputs under 1 MiB (the allocator's small pool), with the
    byte 0xAB, which no bool holds."""
    blocks = [torch.full((1 << 20,), 0xAB, dtype=torch.uint8, device="cuda") for _ in range(8)]
    del blocks


def capacity_routing(
    routing: str, num_assignments: int, num_experts: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Token-major ``(token_ids, expert_ids)`` on the CPU: skewed loads, or one expert taking all."""
    if routing == "one_expert_takes_all":
        return torch.arange(num_assignments), torch.full((num_assignments,), num_experts - 1)
    return make_skewed_routing(num_assignments, num_experts, generator)


@pytest.mark.parametrize("kind", PRIORITY_KINDS)
@pytest.mark.parametrize("routing", ["skewed", "one_expert_takes_all"])
@pytest.mark.parametrize("num_assignments", [0, 1, 1000, 4097, 65_536])
@pytest.mark.parametrize("num_experts", [1, 8, 64, 256])
def test_capacity_mask_matches_the_reference(
    num_experts: int, num_assignments: int, routing: str, kind: str, generator: torch.Generator
) -> None:
    token_ids, expert_ids = capacity_routing(routing, num_assignments, num_experts, generator)
    priorities = make_priorities(kind, num_assignments, generator)
    cpu_args = (expert_ids, priorities, token_ids, num_experts)
    args = (expert_ids.cuda(), priorities.cuda(), token_ids.cuda(), num_experts)
    for capacity in capacities_to_try(expert_ids, num_experts):
        poison_cached_memory()
        poison_small_blocks()
        kept = ops.capacity_mask(*args, capacity)
        assert kept.dtype == torch.bool and kept.shape == (num_assignments,)
        assert kept.view(torch.uint8).le(1).all(), "a mask element was never written"
        assert torch.equal(kept, reference.capacity_mask(*args, capacity)), f"capacity {capacity}"
        assert torch.equal(kept.cpu(), reference.capacity_mask(*cpu_args, capacity)), f"capacity {capacity}"


def test_capacity_mask_orders_zeros_and_nans_like_the_cpu(generator: torch.Generator) -> None:
    token_ids, expert_ids = make_skewed_routing(20_000, 8, generator)
    priorities = make_priorities("few_values", expert_ids.numel(), generator)
    priorities[torch.rand(priorities.shape, generator=generator) < 0.1] = float("nan")
    args = (expert_ids.cuda(), priorities.cuda(), token_ids.cuda(), 8)
    for capacity in capacities_to_try(expert_ids, 8):
        kept = ops.capacity_mask(*args, capacity)
        # The CPU's torch.sort is the rule: NaN above every number, -0.0 equal to 0.0.
        expected = reference.capacity_mask(expert_ids, priorities, token_ids, 8, capacity)
        assert torch.equal(kept.cpu(), expected), f"capacity {capacity}"


def test_capacity_mask_of_bfloat16_priorities(generator: torch.Generator) -> None:
    token_ids, expert_ids = make_skewed_routing(10_000, 16, generator)
    priorities = torch.rand(expert_ids.shape, generator=generator).bfloat16()  # many ties after rounding
    capacity = int(torch.bincount(expert_ids).max()) // 2
    kept = ops.capacity_mask(expert_ids.cuda(), priorities.cuda(), token_ids.cuda(), 16, capacity)
    assert torch.equal(kept.cpu(), reference.capacity_mask(expert_ids, priorities, token_ids, 16, capacity))


def test_capacity_mask_is_the_same_on_every_run(generator: torch.Generator) -> None:
    token_ids, expert_ids = make_skewed_routing(65_536, 64, generator)
    priorities = make_priorities("few_values", expert_ids.numel(), generator)
    capacity = int(torch.bincount(expert_ids).max()) // 2
    args = (expert_ids.cuda(), priorities.cuda(), token_ids.cuda(), 64, capacity)
    first = ops.capacity_mask(*args)
    for _ in range(3):
        assert torch.equal(ops.capacity_mask(*args), first)


def test_capacity_mask_does_not_synchronise_with_the_host(generator: torch.Generator) -> None:
    token_ids, expert_ids = make_skewed_routing(4096, 64, generator)
    priorities = make_priorities("few_values", expert_ids.numel(), generator)
    args = (expert_ids.cuda(), priorities.cuda(), token_ids.cuda(), 64, 16)
    ops.capacity_mask(*args)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.capacity_mask(*args)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_compiled_capacity_mask_matches_eager(generator: torch.Generator) -> None:
    token_ids, expert_ids = make_skewed_routing(3000, 8, generator)
    priorities = make_priorities("few_values", expert_ids.numel(), generator)
    args = (expert_ids.cuda(), priorities.cuda(), token_ids.cuda(), 8, 200)
    compiled = torch.compile(ops.capacity_mask, fullgraph=True)
    assert torch.equal(compiled(*args), ops.capacity_mask(*args))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("dim", [64, 13], ids=["vectorized", "unaligned_dim"])
def test_permute_forward_and_backward(name: str, dtype: torch.dtype, dim: int, generator: torch.Generator) -> None:
    case = on_cuda(make_case(name, generator))
    _, inverse, _ = ops.sort_by_expert(case.expert_ids, case.num_experts)
    x_TD = torch.randn(case.num_tokens, dim, generator=generator).to("cuda", dtype).requires_grad_()
    poison_cached_memory()
    x_ND = ops.permute(x_TD, case.token_ids, inverse)
    assert torch.equal(x_ND, reference.permute(x_TD, case.token_ids, inverse))  # a copy: exact
    grad_ND = torch.randn(x_ND.shape, generator=generator).to("cuda", dtype)
    poison_cached_memory()
    (grad_x,) = torch.autograd.grad(x_ND, x_TD, grad_ND)
    x_ref = x_TD.detach().requires_grad_()
    (torch_grad,) = torch.autograd.grad(reference.permute(x_ref, case.token_ids, inverse), x_ref, grad_ND)
    x64 = x_TD.detach().double().cpu().requires_grad_()
    (oracle,) = torch.autograd.grad(
        reference.permute(x64, case.token_ids.cpu(), inverse.cpu()), x64, grad_ND.double().cpu()
    )
    assert grad_x.dtype == dtype
    assert_close_to_oracle(grad_x, torch_grad, oracle)


def test_permute_of_a_misaligned_view(generator: torch.Generator) -> None:
    case = on_cuda(make_case("random", generator))
    storage = torch.randn(case.num_tokens * 64 + 1, generator=generator).cuda().bfloat16()
    x_TD = storage[1:].view(case.num_tokens, 64)  # contiguous but 2 bytes past a 16-byte boundary
    _, inverse, _ = ops.sort_by_expert(case.expert_ids, case.num_experts)
    assert torch.equal(ops.permute(x_TD, case.token_ids, inverse), reference.permute(x_TD, case.token_ids, inverse))


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["out_float32", "out_bfloat16"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("dim", [64, 13], ids=["vectorized", "unaligned_dim"])
def test_unpermute_forward_and_backward(
    name: str, dtype: torch.dtype, out_dtype: torch.dtype, dim: int, generator: torch.Generator
) -> None:
    case = on_cuda(make_case(name, generator))
    _, inverse, _ = ops.sort_by_expert(case.expert_ids, case.num_experts)
    y_ND = torch.randn(case.token_ids.numel(), dim, generator=generator).to("cuda", dtype).requires_grad_()
    weights = case.weights.clone().requires_grad_()
    args = (case.token_ids, inverse)
    poison_cached_memory()
    out = ops.unpermute(y_ND, *args, weights, case.num_tokens, out_dtype)
    torch_out = reference.unpermute(y_ND, *args, weights, case.num_tokens, out_dtype)
    y64 = y_ND.detach().double().cpu().requires_grad_()
    w64 = weights.detach().double().cpu().requires_grad_()
    cpu_args = (case.token_ids.cpu(), inverse.cpu())
    oracle = reference.unpermute(y64, *cpu_args, w64, case.num_tokens, torch.float64)
    assert out.dtype == out_dtype
    assert_close_to_oracle(out, torch_out, oracle.detach())

    grad_out = torch.randn(out.shape, generator=generator).to("cuda", out_dtype)
    poison_cached_memory()
    grad_y, grad_w = torch.autograd.grad(out, (y_ND, weights), grad_out)
    torch_grad_y, torch_grad_w = torch.autograd.grad(torch_out, (y_ND, weights), grad_out)
    oracle_y, oracle_w = torch.autograd.grad(oracle, (y64, w64), grad_out.double().cpu())
    assert grad_y.dtype == dtype and grad_w.dtype == torch.float32
    assert_close_to_oracle(grad_y, torch_grad_y, oracle_y)
    assert_close_to_oracle(grad_w, torch_grad_w, oracle_w)


def test_results_are_the_same_on_every_run(generator: torch.Generator) -> None:
    case = on_cuda(make_case("random", generator, num_tokens=4096, num_experts=64, top_k=6))
    x_TD = torch.randn(case.num_tokens, 256, generator=generator).to("cuda", torch.bfloat16).requires_grad_()
    weights = case.weights.clone().requires_grad_()

    def run() -> list[Tensor]:
        _, inverse, _ = ops.sort_by_expert(case.expert_ids, case.num_experts)
        y_ND = ops.permute(x_TD, case.token_ids, inverse) * 1.5
        out = ops.unpermute(y_ND, case.token_ids, inverse, weights, case.num_tokens)
        return [out, *torch.autograd.grad(out.square().sum(), (x_TD, weights))]

    for first, second in zip(run(), run(), strict=True):
        assert torch.equal(first, second)


def test_ops_do_not_synchronise_with_the_host(generator: torch.Generator) -> None:
    case = on_cuda(make_case("random", generator, num_tokens=512))
    x_TD = torch.randn(case.num_tokens, 64, generator=generator).to("cuda", torch.bfloat16).requires_grad_()
    weights = case.weights.clone().requires_grad_()
    experts = GroupedExperts(case.num_experts, 64, 128, seed=0).to("cuda", torch.bfloat16)
    grouped = _grouped(experts, x_TD)  # probes torch's grouped GEMM once, which syncs
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _, inverse, tokens_per_expert = ops.sort_by_expert(case.expert_ids, case.num_experts)
        x_ND = ops.permute(x_TD, case.token_ids, inverse)
        y_ND = experts(x_ND, tokens_per_expert) if grouped else x_ND
        out = ops.unpermute(y_ND, case.token_ids, inverse, weights, case.num_tokens)
        out.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _grouped(experts: GroupedExperts, x_ND: Tensor) -> bool:
    return grouped_mm_usable(x_ND.device, x_ND.dtype, experts.num_experts, experts.d_model, experts.d_hidden)


def test_compiled_ops_match_eager(generator: torch.Generator) -> None:
    case = on_cuda(make_case("dropped_assignments", generator, num_tokens=256))
    x_TD = torch.randn(case.num_tokens, 64, generator=generator).to("cuda", torch.bfloat16).requires_grad_()
    weights = case.weights.clone().requires_grad_()

    def pipeline(x: Tensor, w: Tensor) -> Tensor:
        _, inverse, _ = ops.sort_by_expert(case.expert_ids, case.num_experts)
        y_ND = ops.permute(x, case.token_ids, inverse) * 2
        return ops.unpermute(y_ND, case.token_ids, inverse, w, case.num_tokens)

    compiled = torch.compile(pipeline, fullgraph=True)
    outputs = []
    for function in (pipeline, compiled):
        out = function(x_TD, weights)
        outputs.append([out, *torch.autograd.grad(out.square().sum(), (x_TD, weights))])
    for eager, traced in zip(*outputs, strict=True):
        torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-5)


TOPK_ROUTE_MODES = [
    pytest.param(scoring, normalize, bias, id=f"{scoring}-{'normalize' if normalize else 'raw'}-{bias_id}")
    for scoring, bias_choices in (("softmax", (False,)), ("sigmoid", (False, True)))
    for normalize in (True, False)
    for bias, bias_id in ((choice, "bias" if choice else "no_bias") for choice in bias_choices)
]


def routing_inputs(
    num_tokens: int, num_experts: int, bias: bool, generator: torch.Generator
) -> tuple[Tensor, Tensor | None]:
    """Float32 logits (requiring grad) and an optional bias on the GPU, of the router's scale."""
    logits_TE = 2 * torch.randn(num_tokens, num_experts, generator=generator)
    bias_E = 0.3 * torch.randn(num_experts, generator=generator) if bias else None
    return logits_TE.cuda().requires_grad_(), None if bias_E is None else bias_E.cuda()


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
    return [weights_TK, masses_TE.sum(0), torch.logsumexp(logits_TE, -1).square().sum()]


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
    differentiable = [got.weights_TK, got.prob_sum_E, got.lse_sq_sum]
    for output, torch_output, oracle_output in zip(differentiable, (want[1], want[4], want[5]), oracle, strict=True):
        assert output.dtype == torch.float32 and output.shape == oracle_output.shape
        assert_close_to_oracle(output, torch_output, oracle_output.detach())

    upstream = [torch.randn(output.shape, generator=generator).cuda() for output in differentiable]
    poison_cached_memory()
    (grad,) = torch.autograd.grad(differentiable, logits_TE, upstream)
    (torch_grad,) = torch.autograd.grad([want[1], want[4], want[5]], logits_TE, upstream)
    (oracle_grad,) = torch.autograd.grad(oracle, logits64, [u.double().cpu() for u in upstream])
    assert_close_to_oracle(grad, torch_grad, oracle_grad)


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


def test_opcheck_of_every_op(generator: torch.Generator) -> None:
    case = on_cuda(make_case("dropped_assignments", generator))
    _, inverse, _ = ops.sort_by_expert(case.expert_ids, case.num_experts)
    offsets = ops.token_offsets(case.token_ids, case.num_tokens)
    x_TD = torch.randn(case.num_tokens, 16, generator=generator).cuda().requires_grad_()
    y_ND = torch.randn(case.token_ids.numel(), 16, generator=generator).cuda().requires_grad_()
    weights = case.weights.clone().requires_grad_()
    torch.library.opcheck(torch.ops.lightning_moe.sort_by_expert.default, (case.expert_ids, case.num_experts))
    torch.library.opcheck(torch.ops.lightning_moe.permute.default, (x_TD, inverse, offsets))
    torch.library.opcheck(torch.ops.lightning_moe.unpermute.default, (y_ND, inverse, weights, offsets, torch.float32))
    torch.library.opcheck(
        torch.ops.lightning_moe.capacity_mask.default, (case.expert_ids, case.weights, case.num_experts, 3)
    )
    logits_TE, bias_E = routing_inputs(case.num_tokens, case.num_experts, True, generator)
    # Not test_aot_dispatch_dynamic: it adds up the outputs in place starting from the first, an
    # int64 tensor, and fails casting the float sums; test_compiled_topk_route_matches_eager covers it.
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    for args in ((logits_TE, 2, "sigmoid", True, bias_E), (logits_TE, 3, "softmax", False, None)):
        torch.library.opcheck(torch.ops.lightning_moe.topk_route.default, args, test_utils=checks)
    router_weight = torch.randn(5, 16, generator=generator).cuda().requires_grad_()
    grad_TE = torch.randn(case.num_tokens, 5, generator=generator).cuda()
    torch.library.opcheck(torch.ops.lightning_moe.router_logits.default, (x_TD, router_weight))
    grad_x_args = (grad_TE, router_weight.detach(), torch.float32)
    torch.library.opcheck(torch.ops.lightning_moe.router_logits_grad_x.default, grad_x_args)
    torch.library.opcheck(torch.ops.lightning_moe.router_logits_grad_weight.default, (grad_TE, x_TD.detach()))
    a_NF, b_NF = (torch.randn(7, 24, generator=generator).cuda().requires_grad_() for _ in range(2))
    torch.library.opcheck(torch.ops.lightning_moe.glu.default, (a_NF, b_NF, "swiglu"))
    glu_backward_args = (torch.randn(7, 24, generator=generator).cuda(), a_NF.detach(), b_NF.detach(), "geglu")
    torch.library.opcheck(torch.ops.lightning_moe.glu_backward.default, glu_backward_args)


ROUTER_TOKENS = [0, 1, 37, 16_384]
ROUTER_DIMS = [8, 1000, 1024, 2048]
ROUTER_EXPERTS = [1, 2, 8, 64, 160, 256]


def router_inputs(
    num_tokens: int, dim: int, num_experts: int, dtype: torch.dtype, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """Tokens in ``dtype``, a float32 weight scaled like a router's, and a gradient of the logits."""
    x_TD = torch.randn(num_tokens, dim, generator=generator).to("cuda", dtype)
    weight_ED = ((torch.rand(num_experts, dim, generator=generator) * 2 - 1) / dim**0.5).cuda()
    grad_TE = torch.randn(num_tokens, num_experts, generator=generator).cuda()
    return x_TD, weight_ED, grad_TE


def poison_float_blocks() -> None:
    """:func:`poison_cached_memory`, and NaN in the allocator's small pool (outputs under 1 MiB) too."""
    poison_cached_memory()
    blocks = [torch.full((1 << 18,), float("nan"), device="cuda") for _ in range(8)]
    del blocks


def assert_close_to_gpu_oracle(got: Tensor, same_dtype_torch: Tensor, oracle: Tensor) -> None:
    """:func:`assert_close_to_oracle` with the float64 oracle left on the GPU (large shapes)."""
    assert not got.isnan().any(), "an output element was never written"
    if got.numel() == 0:
        return
    got_error = (got.double() - oracle).abs().max().item()
    torch_error = (same_dtype_torch.double() - oracle).abs().max().item()
    scale = oracle.abs().max().item()
    assert got_error <= 2 * torch_error + 1e-6 * max(scale, 1.0), (got_error, torch_error)


def assert_router_logits_close(x_TD: Tensor, weight_ED: Tensor, grad_TE: Tensor) -> None:
    """The kernels' logits and gradients against PyTorch's float32 computation and a float64 oracle."""
    x_TD, weight_ED = x_TD.detach().requires_grad_(), weight_ED.detach().requires_grad_()
    poison_float_blocks()
    logits = ops.router_logits(x_TD, weight_ED)
    poison_float_blocks()
    grad_x, grad_weight = torch.autograd.grad(logits, (x_TD, weight_ED), grad_TE)
    assert logits.dtype == torch.float32 and grad_weight.dtype == torch.float32 and grad_x.dtype == x_TD.dtype
    x32, weight = x_TD.detach().float(), weight_ED.detach()
    x64, weight64, grad64 = x32.double(), weight.double(), grad_TE.double()
    assert_close_to_gpu_oracle(logits, x32 @ weight.t(), x64 @ weight64.t())
    assert_close_to_gpu_oracle(grad_x, (grad_TE @ weight).to(x_TD.dtype), grad64 @ weight64)
    assert_close_to_gpu_oracle(grad_weight, grad_TE.t() @ x32, grad64.t() @ x64)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("num_experts", ROUTER_EXPERTS, ids=lambda e: f"E{e}")
@pytest.mark.parametrize("dim", ROUTER_DIMS, ids=lambda d: f"D{d}")
@pytest.mark.parametrize("num_tokens", ROUTER_TOKENS, ids=lambda t: f"T{t}")
def test_router_logits_forward_and_backward(
    num_tokens: int, dim: int, num_experts: int, dtype: torch.dtype, generator: torch.Generator
) -> None:
    assert_router_logits_close(*router_inputs(num_tokens, dim, num_experts, dtype, generator))


@pytest.mark.parametrize("layout", ["unaligned_dim", "misaligned_view", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_router_logits_of_unaligned_tokens(layout: str, dtype: torch.dtype, generator: torch.Generator) -> None:
    num_tokens, dim, num_experts = 300, 64, 3
    x_TD, weight_ED, grad_TE = router_inputs(num_tokens, 2 * dim + 1, num_experts, dtype, generator)
    if layout == "unaligned_dim":  # rows of 129 elements: no row but the first starts on 16 bytes
        weight = weight_ED
    elif layout == "misaligned_view":  # contiguous, but one element past a 16-byte boundary
        x_TD = x_TD.flatten()[1 : 1 + num_tokens * dim].view(num_tokens, dim)
        weight = weight_ED[:, :dim]
    else:  # every other column: the wrapper makes it contiguous
        x_TD = x_TD[:, : 2 * dim : 2]
        weight = weight_ED[:, :dim]
    assert_router_logits_close(x_TD, weight, grad_TE)


@pytest.mark.parametrize(
    ("num_tokens", "dim", "num_experts"), [(16_384, 1024, 8), (16_384, 2048, 64), (37, 1000, 160), (4096, 13, 3)]
)
def test_router_logits_are_the_same_on_every_run(
    num_tokens: int, dim: int, num_experts: int, generator: torch.Generator
) -> None:
    x_TD, weight_ED, grad_TE = router_inputs(num_tokens, dim, num_experts, torch.bfloat16, generator)
    x_TD.requires_grad_()
    weight_ED.requires_grad_()

    def run() -> list[Tensor]:
        logits = ops.router_logits(x_TD, weight_ED)
        return [logits, *torch.autograd.grad(logits, (x_TD, weight_ED), grad_TE)]

    for first, second in zip(run(), run(), strict=True):
        assert torch.equal(first, second)


def test_router_logits_do_not_synchronise_with_the_host(generator: torch.Generator) -> None:
    inputs = [router_inputs(4096, 1024, num_experts, torch.bfloat16, generator) for num_experts in (1, 8, 64, 160)]
    for x_TD, weight_ED, _ in inputs:
        x_TD.requires_grad_()
        weight_ED.requires_grad_()
    router_logits(*inputs[0][:2])  # loads the extension
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x_TD, weight_ED, grad_TE in inputs:
            router_logits(x_TD, weight_ED).backward(grad_TE)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_compiled_router_logits_match_eager(generator: torch.Generator) -> None:
    x_TD, weight_ED, grad_TE = router_inputs(1000, 256, 8, torch.bfloat16, generator)
    compiled = torch.compile(router_logits, fullgraph=True)
    outputs = []
    for function in (router_logits, compiled):
        x_in, weight_in = x_TD.clone().requires_grad_(), weight_ED.clone().requires_grad_()
        logits = function(x_in, weight_in)
        outputs.append([logits, *torch.autograd.grad(logits, (x_in, weight_in), grad_TE)])
    for eager, traced in zip(*outputs, strict=True):
        assert torch.equal(traced, eager)


def test_router_logits_ignore_autocast(generator: torch.Generator) -> None:
    x_TD, weight_ED, _ = router_inputs(500, 256, 8, torch.float32, generator)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = router_logits(x_TD, weight_ED)
    assert logits.dtype == torch.float32
    assert torch.equal(logits, router_logits(x_TD, weight_ED))


def test_router_logits_of_a_half_precision_weight_take_the_kernels(generator: torch.Generator) -> None:
    """A model cast whole to bf16 still gets the kernels, its weight widened to float32."""
    x_TD, weight_ED, grad_TE = router_inputs(4096, 1024, 8, torch.bfloat16, generator)
    weight_bf16 = weight_ED.bfloat16().requires_grad_()
    x_TD.requires_grad_()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        logits = router_logits(x_TD, weight_bf16)
        grad_x, grad_weight = torch.autograd.grad(logits, (x_TD, weight_bf16), grad_TE)
        torch.cuda.synchronize()
    assert any("logits_forward_kernel" in event.key for event in prof.key_averages()), "the kernels did not run"
    assert logits.dtype == torch.float32 and grad_weight.dtype == torch.bfloat16 and grad_x.dtype == torch.bfloat16
    weight32 = weight_bf16.detach().float()
    x64, weight64, grad64 = x_TD.detach().double(), weight32.double(), grad_TE.double()
    assert_close_to_gpu_oracle(logits, x_TD.detach().float() @ weight32.t(), x64 @ weight64.t())
    expected_grad_weight = (grad_TE.t() @ x_TD.detach().float()).bfloat16()
    assert_close_to_gpu_oracle(grad_weight, expected_grad_weight, (grad64.t() @ x64).bfloat16().double())


@pytest.mark.parametrize(("activation", "bias"), [("gelu", False), ("swiglu", True)])
def test_grouped_gemm_experts_match_the_loop(activation: str, bias: bool, generator: torch.Generator) -> None:
    experts = GroupedExperts(8, 128, 256, activation=activation, bias=bias, seed=1).to("cuda", torch.bfloat16)
    tokens_per_expert = torch.tensor([40, 0, 3, 100, 0, 17, 1, 95], device="cuda")  # empty experts too
    x_ND = torch.randn(256, 128, generator=generator).to("cuda", torch.bfloat16).requires_grad_()
    assert _grouped(experts, x_ND), "the grouped-GEMM path should be taken on this GPU"
    out = experts(x_ND, tokens_per_expert)
    loop = _run_grouped(experts.expert_forward, x_ND, tokens_per_expert)
    torch.testing.assert_close(out, loop, rtol=2e-2, atol=2e-2)
    params = [x_ND, experts.w1, experts.w2] + ([experts.b1] if bias else [])
    grads = torch.autograd.grad(out.float().square().sum(), params)
    loop_grads = torch.autograd.grad(loop.float().square().sum(), params)
    for got, want in zip(grads, loop_grads, strict=True):
        torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2 * want.abs().max().item())


def test_grouped_gemm_experts_under_autocast(generator: torch.Generator) -> None:
    experts = GroupedExperts(8, 128, 256, seed=2).cuda()  # float32 weights, bf16 compute
    tokens_per_expert = torch.tensor([30, 2, 0, 64, 7, 0, 100, 53], device="cuda")
    x_ND = torch.randn(256, 128, generator=generator).cuda().requires_grad_()
    assert grouped_mm_usable(x_ND.device, torch.bfloat16, 8, 128, 256)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = experts(x_ND, tokens_per_expert)
        loop = _run_grouped(experts.expert_forward, x_ND, tokens_per_expert)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, loop.float(), rtol=2e-2, atol=2e-2)
    (grad,) = torch.autograd.grad(out.square().sum(), experts.w2)
    (loop_grad,) = torch.autograd.grad(loop.float().square().sum(), experts.w2)
    torch.testing.assert_close(grad, loop_grad, rtol=3e-2, atol=3e-2 * loop_grad.abs().max().item())


def make_layer(dtype: torch.dtype) -> tuple[MoE, MoE]:
    """The same layer in float32 on the CPU and in ``dtype`` on the GPU, with the same (rounded) weights."""
    torch.manual_seed(0)
    cpu_layer = MoE(d_model=128, num_experts=8, top_k=2, d_hidden=256, aux_loss_weight=0.01)
    gpu_layer = copy.deepcopy(cpu_layer).to("cuda", dtype)
    cpu_layer.load_state_dict({name: value.float().cpu() for name, value in gpu_layer.state_dict().items()})
    return cpu_layer, gpu_layer


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)], ids=["float32", "bf16"])
def test_moe_layer_on_gpu_matches_the_cpu(dtype: torch.dtype, rtol: float, generator: torch.Generator) -> None:
    cpu_layer, gpu_layer = make_layer(dtype)
    x_gpu = torch.randn(4, 64, 128, generator=generator).to("cuda", dtype).requires_grad_()
    # The CPU runs in float32 on the same (rounded) inputs, so both routers see the same logits.
    x_cpu = x_gpu.detach().float().cpu().requires_grad_()
    out_gpu, out_cpu = gpu_layer(x_gpu), cpu_layer(x_cpu)
    grad = torch.randn(out_cpu.shape, generator=generator)
    out_gpu.backward(grad.to("cuda", dtype))
    out_cpu.backward(grad)
    scale = out_cpu.abs().max().item()
    torch.testing.assert_close(out_gpu.float().cpu(), out_cpu, rtol=rtol, atol=rtol * scale)
    pairs = [(x_gpu.grad, x_cpu.grad)] + [
        (p_gpu.grad, p_cpu.grad) for p_gpu, p_cpu in zip(gpu_layer.parameters(), cpu_layer.parameters(), strict=True)
    ]
    for got, want in pairs:
        torch.testing.assert_close(got.float().cpu(), want, rtol=rtol, atol=rtol * want.abs().max().item())


def test_compiled_layer_matches_eager(generator: torch.Generator) -> None:
    _, layer = make_layer(torch.bfloat16)
    compiled = torch.compile(layer)
    x = torch.randn(2, 128, 128, generator=generator).to("cuda", torch.bfloat16).requires_grad_()
    out_eager = layer(x)
    (grad_eager,) = torch.autograd.grad(out_eager.float().sum(), x)
    out_compiled = compiled(x)
    (grad_compiled,) = torch.autograd.grad(out_compiled.float().sum(), x)
    torch.testing.assert_close(out_compiled, out_eager, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grad_compiled, grad_eager, rtol=2e-2, atol=2e-2)


GLU_KINDS = ["swiglu", "geglu"]
GLU_SHAPES = [(0, 8), (1, 1), (37, 1000), (37, 1001), (4096, 1408)]


def glu_inputs(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> list[Tensor]:
    """Pre-activations spread over the gates' curved range, gate values and an upstream gradient."""
    scales = (3.0, 1.0, 1.0)
    return [(scale * torch.randn(shape, generator=generator)).to("cuda", dtype) for scale in scales]


def assert_glu_close(a_NF: Tensor, b_NF: Tensor, grad_NF: Tensor, kind: str) -> None:
    """The op's output and gradients against PyTorch's in the same dtype and a float64 oracle."""
    a_NF, b_NF = a_NF.detach().requires_grad_(), b_NF.detach().requires_grad_()
    poison_float_blocks()
    h_NF = ops.glu(a_NF, b_NF, kind)  # type: ignore[arg-type]
    poison_float_blocks()
    grad_a, grad_b = torch.autograd.grad(h_NF, (a_NF, b_NF), grad_NF)
    assert h_NF.dtype == grad_a.dtype == grad_b.dtype == a_NF.dtype
    torch_h = reference.glu(a_NF, b_NF, kind)
    torch_grads = torch.autograd.grad(torch_h, (a_NF, b_NF), grad_NF)
    a64, b64 = a_NF.detach().double().requires_grad_(), b_NF.detach().double().requires_grad_()
    oracle_h = reference.glu(a64, b64, kind)
    oracle_grads = torch.autograd.grad(oracle_h, (a64, b64), grad_NF.double())
    assert_close_to_gpu_oracle(h_NF, torch_h, oracle_h.detach())
    for got, torch_grad, oracle_grad in zip((grad_a, grad_b), torch_grads, oracle_grads, strict=True):
        assert_close_to_gpu_oracle(got, torch_grad, oracle_grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", GLU_SHAPES, ids=lambda shape: "x".join(map(str, shape)))
@pytest.mark.parametrize("kind", GLU_KINDS)
def test_glu_forward_and_backward(
    kind: str, shape: tuple[int, int], dtype: torch.dtype, generator: torch.Generator
) -> None:
    assert_glu_close(*glu_inputs(shape, dtype, generator), kind)


@pytest.mark.parametrize("layout", ["misaligned_view", "strided"])
@pytest.mark.parametrize("kind", GLU_KINDS)
def test_glu_of_unaligned_inputs(kind: str, layout: str, generator: torch.Generator) -> None:
    rows, hidden = 300, 64
    a_NF, b_NF, grad_NF = glu_inputs((rows, 2 * hidden + 1), torch.bfloat16, generator)
    if layout == "misaligned_view":  # contiguous, but one element past a 16-byte boundary
        a_NF = a_NF.flatten()[1 : 1 + rows * hidden].view(rows, hidden)
    else:  # every other column: the wrapper makes it contiguous
        a_NF = a_NF[:, : 2 * hidden : 2]
    b_NF = b_NF.flatten()[3 : 3 + rows * hidden].view(rows, hidden)
    assert_glu_close(a_NF, b_NF, grad_NF[:, :hidden], kind)


@pytest.mark.parametrize("kind", GLU_KINDS)
def test_glu_is_the_same_on_every_run(kind: str, generator: torch.Generator) -> None:
    a_NF, b_NF, grad_NF = glu_inputs((4096, 1408), torch.bfloat16, generator)
    a_NF.requires_grad_()
    b_NF.requires_grad_()

    def run() -> list[Tensor]:
        h_NF = ops.glu(a_NF, b_NF, kind)  # type: ignore[arg-type]
        return [h_NF, *torch.autograd.grad(h_NF, (a_NF, b_NF), grad_NF)]

    for first, second in zip(run(), run(), strict=True):
        assert torch.equal(first, second)


def test_glu_does_not_synchronise_with_the_host(generator: torch.Generator) -> None:
    a_NF, b_NF, grad_NF = glu_inputs((512, 256), torch.bfloat16, generator)
    a_NF.requires_grad_()
    b_NF.requires_grad_()
    ops.glu(a_NF, b_NF, "swiglu")  # loads the extension
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for kind in GLU_KINDS:
            ops.glu(a_NF, b_NF, kind).backward(grad_NF)  # type: ignore[arg-type]
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("kind", GLU_KINDS)
def test_compiled_glu_matches_eager(kind: str, generator: torch.Generator) -> None:
    a_NF, b_NF, grad_NF = glu_inputs((1000, 256), torch.bfloat16, generator)

    def gated(a: Tensor, b: Tensor) -> Tensor:
        return ops.glu(a, b, kind)  # type: ignore[arg-type]

    compiled = torch.compile(gated, fullgraph=True)
    outputs = []
    for function in (gated, compiled):
        a_in, b_in = a_NF.clone().requires_grad_(), b_NF.clone().requires_grad_()
        h_NF = function(a_in, b_in)
        outputs.append([h_NF, *torch.autograd.grad(h_NF, (a_in, b_in), grad_NF)])
    for eager, traced in zip(*outputs, strict=True):
        assert torch.equal(traced, eager)


def unfused_expert_forward(experts: GroupedExperts, local: int, x_ND: Tensor) -> Tensor:
    """:meth:`GroupedExperts.expert_forward` with the gate as separate PyTorch ops (the reference)."""
    hidden_NF = x_ND @ experts.w1[local].t()
    if experts.b1 is not None:
        hidden_NF = hidden_NF + experts.b1[local]
    hidden_NF = reference.glu(hidden_NF, x_ND @ experts.w3[local].t(), experts.activation)
    out_ND = hidden_NF @ experts.w2[local].t()
    return out_ND if experts.b2 is None else out_ND + experts.b2[local]


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.bfloat16, 3e-2), (torch.float32, 1e-4)], ids=["bf16", "fp32"])
@pytest.mark.parametrize(("activation", "bias"), [("swiglu", False), ("geglu", True)])
def test_glu_experts_match_the_unfused_loop(
    activation: str, bias: bool, dtype: torch.dtype, tolerance: float, generator: torch.Generator
) -> None:
    experts = GroupedExperts(8, 128, 256, activation=activation, bias=bias, seed=4).to("cuda", dtype)
    tokens_per_expert = torch.tensor([40, 0, 3, 100, 0, 17, 1, 95], device="cuda")
    x_ND = torch.randn(256, 128, generator=generator).to("cuda", dtype).requires_grad_()
    # bf16 takes the grouped GEMMs on a Hopper GPU, float32 the per-expert loop: glu in both.
    assert _grouped(experts, x_ND) == (dtype == torch.bfloat16)
    out = experts(x_ND, tokens_per_expert)
    loop = _run_grouped(lambda local, rows: unfused_expert_forward(experts, local, rows), x_ND, tokens_per_expert)
    torch.testing.assert_close(out, loop, rtol=tolerance, atol=tolerance)
    params = [x_ND, experts.w1, experts.w2, experts.w3] + ([experts.b1] if bias else [])
    grads = torch.autograd.grad(out.float().square().sum(), params)
    loop_grads = torch.autograd.grad(loop.float().square().sum(), params)
    for got, want in zip(grads, loop_grads, strict=True):
        atol = tolerance * want.abs().max().item()
        torch.testing.assert_close(got.float(), want.float(), rtol=tolerance, atol=atol)
