"""Which inputs the router-logits kernels take. The kernels themselves are checked on a GPU, in
tests/ops/test_router_logits_cuda.py; the dispatch and the reference, in
tests/ops/test_router_logits_reference.py.

Shape legend: T tokens, D model dim, E experts.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from lightning_moe.ops.router_logits import MAX_KERNEL_EXPERTS, kernels_accept, router_logits, tensor_core_accepts

# The module, not the function of the same name that lightning_moe.ops exports.
router_logits_module = importlib.import_module("lightning_moe.ops.router_logits")

ACCEPTANCE = [
    pytest.param((37, 64), torch.bfloat16, (8, 64), torch.float32, True, id="bfloat16_tokens"),
    pytest.param((37, 64), torch.float16, (8, 64), torch.float32, True, id="float16_tokens"),
    pytest.param((37, 64), torch.float32, (8, 64), torch.float32, True, id="float32_tokens"),
    pytest.param((0, 64), torch.bfloat16, (8, 64), torch.float32, True, id="no_tokens"),
    pytest.param((37, 13), torch.bfloat16, (8, 13), torch.float32, True, id="unaligned_dim"),
    pytest.param((37, 64), torch.bfloat16, (1, 64), torch.float32, True, id="one_expert"),
    pytest.param((37, 64), torch.bfloat16, (MAX_KERNEL_EXPERTS, 64), torch.float32, True, id="most_experts"),
    pytest.param((37, 64), torch.bfloat16, (MAX_KERNEL_EXPERTS + 1, 64), torch.float32, False, id="too_many_experts"),
    pytest.param((37, 64), torch.bfloat16, (0, 64), torch.float32, False, id="no_experts"),
    pytest.param((37, 0), torch.bfloat16, (8, 0), torch.float32, False, id="empty_dim"),
    pytest.param((37, 64), torch.float64, (8, 64), torch.float64, False, id="float64"),
    pytest.param((37, 64), torch.bfloat16, (8, 64), torch.bfloat16, False, id="bfloat16_weight"),
    pytest.param((37, 64), torch.bfloat16, (8, 32), torch.float32, False, id="dims_differ"),
    pytest.param((2, 37, 64), torch.bfloat16, (8, 64), torch.float32, False, id="3d_tokens"),
]


def test_cpu_tensors_are_never_accepted() -> None:
    assert not kernels_accept(torch.randn(4, 8).bfloat16(), torch.randn(2, 8))


TENSOR_CORE_ACCEPTANCE = [
    pytest.param((37, 1024), torch.bfloat16, (64, 1024), torch.float32, True, id="bfloat16_tokens"),
    pytest.param((0, 64), torch.bfloat16, (8, 64), torch.float32, True, id="no_tokens"),
    pytest.param((37, 64), torch.bfloat16, (MAX_KERNEL_EXPERTS, 64), torch.float32, True, id="most_experts"),
    pytest.param((37, 64), torch.float16, (8, 64), torch.float32, False, id="float16_tokens"),
    pytest.param((37, 64), torch.float32, (8, 64), torch.float32, False, id="float32_tokens"),
    pytest.param((37, 64), torch.bfloat16, (8, 64), torch.bfloat16, True, id="bfloat16_weight"),
    pytest.param((37, 64), torch.bfloat16, (8, 64), torch.float16, False, id="float16_weight_not_widened"),
    pytest.param((37, 64), torch.bfloat16, (4, 64), torch.float32, False, id="too_few_experts"),
    pytest.param((37, 64), torch.bfloat16, (12, 64), torch.float32, False, id="experts_not_multiple_of_8"),
    pytest.param((37, 64), torch.bfloat16, (MAX_KERNEL_EXPERTS + 8, 64), torch.float32, False, id="too_many_experts"),
    pytest.param((37, 96), torch.bfloat16, (8, 96), torch.float32, False, id="dim_not_multiple_of_64"),
    pytest.param((37, 0), torch.bfloat16, (8, 0), torch.float32, False, id="empty_dim"),
    pytest.param((37, 64), torch.bfloat16, (8, 128), torch.float32, False, id="dims_differ"),
    pytest.param((2, 37, 64), torch.bfloat16, (8, 64), torch.float32, False, id="3d_tokens"),
]


@pytest.mark.parametrize(
    ("accepts", "x_shape", "x_dtype", "weight_shape", "weight_dtype", "accepted"),
    [pytest.param(kernels_accept, *case.values, id=f"simt-{case.id}") for case in ACCEPTANCE]
    + [pytest.param(tensor_core_accepts, *case.values, id=f"tc-{case.id}") for case in TENSOR_CORE_ACCEPTANCE],
)
def test_kernels_accept_the_documented_inputs(
    accepts: Callable[[Tensor, Tensor], bool],
    x_shape: tuple[int, ...],
    x_dtype: torch.dtype,
    weight_shape: tuple[int, int],
    weight_dtype: torch.dtype,
    accepted: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As if the tensors were on a GPU with the extension loaded: only shapes and dtypes decide.
    monkeypatch.setattr(router_logits_module, "use_cuda_kernels", lambda *tensors: True)
    x = torch.zeros(x_shape, dtype=x_dtype)
    weight = torch.zeros(weight_shape, dtype=weight_dtype)
    assert accepts(x, weight) is accepted


def test_cpu_tensors_never_take_the_tensor_core_kernels() -> None:
    assert not tensor_core_accepts(torch.randn(4, 64).bfloat16(), torch.randn(8, 64))


def test_with_the_tensor_core_router_on_cpu_tensors_take_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(router_logits_module, "TENSOR_CORE_ROUTER", True)
    x = torch.randn(5, 64).bfloat16()
    weight = torch.randn(8, 64)
    torch.testing.assert_close(router_logits(x, weight), x.float() @ weight.t(), rtol=0, atol=0)
