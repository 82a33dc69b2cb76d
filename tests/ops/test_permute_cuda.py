"""The permute and unpermute kernels against their references, forward and backward, on a GPU.

Shape legend: T tokens, D model dim, N assignments.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lightning_moe import ops
from lightning_moe.layers.experts import GroupedExperts
from lightning_moe.ops import reference
from tests.ops.gpu_checks import (
    DTYPE_IDS,
    DTYPES,
    GPU_MARKS,
    _grouped,
    assert_close_to_oracle,
    on_cuda,
    poison_cached_memory,
)
from tests.ops.routing_cases import CASE_NAMES, make_case

pytestmark = GPU_MARKS


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
