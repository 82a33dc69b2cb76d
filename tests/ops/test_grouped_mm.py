"""The grouped-GEMM expert MLP against the per-expert loop, and when it is chosen."""

from __future__ import annotations

import pytest
import torch

from lightning_moe.layers.experts import GroupedExperts, _run_grouped
from lightning_moe.ops import grouped_mm


def cpu_grouped_mm_runs() -> bool:
    function = grouped_mm.grouped_mm_function()
    if function is None:
        return False
    try:
        function(torch.zeros(2, 8), torch.zeros(1, 8, 8), offs=torch.tensor([2], dtype=torch.int32))
    except (RuntimeError, NotImplementedError):
        return False
    return True


@pytest.mark.skipif(not cpu_grouped_mm_runs(), reason="this torch has no CPU grouped_mm")
@pytest.mark.parametrize(("activation", "bias"), [("gelu", False), ("relu", True), ("swiglu", False), ("geglu", True)])
def test_grouped_mlp_matches_the_loop(activation: str, bias: bool) -> None:
    torch.manual_seed(0)
    experts = GroupedExperts(4, d_model=16, d_hidden=24, activation=activation, bias=bias, seed=3)
    tokens_per_expert = torch.tensor([5, 0, 9, 2])  # expert 1 gets no rows
    x_ND = torch.randn(16, 16, requires_grad=True)
    params = (experts.w1, experts.w2, experts.w3, experts.b1, experts.b2)
    out = grouped_mm.grouped_mlp(x_ND, tokens_per_expert, *params, experts.activation)
    expected = _run_grouped(experts.expert_forward, x_ND, tokens_per_expert)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), [x_ND, experts.w1])
    expected_grads = torch.autograd.grad(expected.square().sum(), [x_ND, experts.w1])
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_grouped_mlp_of_no_rows() -> None:
    experts = GroupedExperts(2, d_model=8, d_hidden=8)
    params = (experts.w1, experts.w2, experts.w3, experts.b1, experts.b2)
    out = grouped_mm.grouped_mlp(torch.zeros(0, 8), torch.zeros(2, dtype=torch.int64), *params, experts.activation)
    assert out.shape == (0, 8)


@pytest.mark.parametrize(
    ("device", "dtype", "num_experts", "d_model", "d_hidden", "why"),
    [
        ("cpu", torch.bfloat16, 8, 64, 128, "not on CUDA"),
        ("cuda", torch.float32, 8, 64, 128, "no fused float32 kernel"),
        ("cuda", torch.bfloat16, 8, 60, 128, "rows of 120 bytes are not 16-byte aligned"),
        ("cuda", torch.bfloat16, 8, 64, 100, "hidden rows not 16-byte aligned"),
        ("cuda", torch.bfloat16, 1024, 64, 128, "too many groups"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_grouped_mm_is_not_used_where_torch_cannot_fuse(
    device: str, dtype: torch.dtype, num_experts: int, d_model: int, d_hidden: int, why: str
) -> None:
    # None of these reach the probe, so no GPU is needed to check them.
    assert not grouped_mm.grouped_mm_usable(torch.device(device), dtype, num_experts, d_model, d_hidden)
