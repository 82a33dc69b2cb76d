"""The experts on torch's grouped GEMMs, and with the fused GLU, against a per-expert loop on a GPU.

Shape legend: N assignments, D model dim, F expert hidden dim.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lightning_moe.layers.experts import GroupedExperts, _run_grouped
from lightning_moe.ops import reference
from lightning_moe.ops.grouped_mm import grouped_mm_usable
from tests.ops.gpu_checks import GPU_MARKS, _grouped

pytestmark = GPU_MARKS


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
