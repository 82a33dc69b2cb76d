"""Shared helpers of the GPU tests of the CUDA ops (the ``test_*_cuda.py`` files beside this one).

Shape legend: T tokens, D model dim, E experts, N assignments.

Each output is checked on fresh random inputs, written into memory poisoned with NaN first (the
ops allocate their outputs; freeing a NaN-filled block just before hands that block to them), so
a row the kernel forgets to write shows up as NaN. Rounding is judged against a float64 oracle:
a kernel's error may be at most about twice that of the same computation done by PyTorch in the
same dtype.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lightning_moe.layers.experts import GroupedExperts
from lightning_moe.ops.grouped_mm import grouped_mm_usable
from tests.ops.routing_cases import Case

GPU_MARKS = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["float32", "bfloat16", "float16"]


def poison_cached_memory(num_bytes: int = 1 << 26) -> None:
    """Leave a freed NaN-filled block in the caching allocator for the next outputs to reuse."""
    block = torch.full((num_bytes // 4,), float("nan"), device="cuda")
    del block


def poison_small_blocks() -> None:
    """:func:`poison_cached_memory` for outputs under 1 MiB (the allocator's small pool), with the
    byte 0xAB, which no bool holds."""
    blocks = [torch.full((1 << 20,), 0xAB, dtype=torch.uint8, device="cuda") for _ in range(8)]
    del blocks


def poison_float_blocks() -> None:
    """:func:`poison_cached_memory`, and NaN in the allocator's small pool (outputs under 1 MiB) too."""
    poison_cached_memory()
    blocks = [torch.full((1 << 18,), float("nan"), device="cuda") for _ in range(8)]
    del blocks


def on_cuda(case: Case) -> Case:
    return Case(case.num_tokens, case.num_experts, case.token_ids.cuda(), case.expert_ids.cuda(), case.weights.cuda())


def assert_close_to_oracle(got: Tensor, same_dtype_torch: Tensor, oracle: Tensor) -> None:
    """``got`` no further from the float64 ``oracle`` than twice PyTorch's own result in its dtype."""
    assert not got.isnan().any(), "an output element was never written"
    got_error = (got.double().cpu() - oracle).abs().max().item() if got.numel() else 0.0
    torch_error = (same_dtype_torch.double().cpu() - oracle).abs().max().item() if got.numel() else 0.0
    scale = oracle.abs().max().item() if oracle.numel() else 0.0
    assert got_error <= 2 * torch_error + 1e-6 * max(scale, 1.0), (got_error, torch_error)


def assert_close_to_gpu_oracle(got: Tensor, same_dtype_torch: Tensor, oracle: Tensor) -> None:
    """:func:`assert_close_to_oracle` with the float64 oracle left on the GPU (large shapes).

    A bfloat16 or float16 result may also be one unit in its last place from the oracle, element by
    element: rounded from a float32 sum whose last bits differ from PyTorch's, it can round the
    other way, and PyTorch's largest error may sit at an element of smaller magnitude.
    """
    assert not got.isnan().any(), "an output element was never written"
    if got.numel() == 0:
        return
    error = (got.double() - oracle).abs()
    torch_error = (same_dtype_torch.double() - oracle).abs().max().item()
    scale = oracle.abs().max().item()
    allowed = 2 * torch_error + 1e-6 * max(scale, 1.0)
    if got.dtype in (torch.bfloat16, torch.float16):
        error = error - torch.finfo(got.dtype).eps * oracle.abs()  # eps * |v| is at least one ulp of v
    assert error.max().item() <= allowed, (error.max().item(), torch_error)


def routing_inputs(
    num_tokens: int, num_experts: int, bias: bool, generator: torch.Generator
) -> tuple[Tensor, Tensor | None]:
    """Float32 logits (requiring grad) and an optional bias on the GPU, of the router's scale."""
    logits_TE = 2 * torch.randn(num_tokens, num_experts, generator=generator)
    bias_E = 0.3 * torch.randn(num_experts, generator=generator) if bias else None
    return logits_TE.cuda().requires_grad_(), None if bias_E is None else bias_E.cuda()


def _grouped(experts: GroupedExperts, x_ND: Tensor) -> bool:
    return grouped_mm_usable(x_ND.device, x_ND.dtype, experts.num_experts, experts.d_model, experts.d_hidden)
