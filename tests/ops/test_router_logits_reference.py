"""Router logits: float32 under any input dtype and autocast, without keeping a float32 copy."""

from __future__ import annotations

import importlib

import pytest
import torch

from lightning_moe.ops.router_logits import router_logits
from lightning_moe.routers import build_router

# The module, not the function that lightning_moe.ops exports under the same name.
logits_module = importlib.import_module("lightning_moe.ops.router_logits")


def test_gradients_match_float64_autograd() -> None:
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(router_logits, (x, weight))


def test_bfloat16_tokens_give_the_float32_product_and_gradients() -> None:
    x = torch.randn(9, 6).bfloat16().requires_grad_()
    weight = torch.randn(4, 6, requires_grad=True)
    grad = torch.randn(9, 4)
    logits = router_logits(x, weight)
    logits.backward(grad)
    x_ref = x.detach().float().requires_grad_()
    weight_ref = weight.detach().clone().requires_grad_()
    expected = x_ref @ weight_ref.t()
    expected.backward(grad)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad, x_ref.grad.bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(weight.grad, weight_ref.grad, rtol=0, atol=0)


def test_autocast_does_not_lower_the_precision() -> None:
    x = torch.randn(9, 6).bfloat16()
    weight = torch.randn(4, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = router_logits(x, weight)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, x.float() @ weight.t(), rtol=0, atol=0)


@pytest.mark.parametrize("router", ["topk", "sigmoid", "gshard", "expert_choice"])
def test_no_float32_copy_of_the_tokens_is_kept_for_backward(router: str) -> None:
    num_tokens, d_model = 64, 32
    module = build_router(router, d_model, 8, 2)
    x = torch.randn(num_tokens, d_model).bfloat16().requires_grad_()
    saved = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append((tensor.dtype, tuple(tensor.shape)))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module(x)
    assert (torch.float32, (num_tokens, d_model)) not in saved


def test_cpu_inputs_take_the_reference_function() -> None:
    x = torch.randn(9, 6).bfloat16().requires_grad_()
    logits = router_logits(x, torch.randn(4, 6, requires_grad=True))
    assert type(logits.grad_fn).__name__ == "_RouterLogitsBackward"


def test_inputs_the_kernels_accept_take_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def kernels(x_TD: torch.Tensor, weight_ED: torch.Tensor, weight_f32: torch.Tensor) -> torch.Tensor:
        calls.append((x_TD.shape, weight_ED.shape))
        return x_TD.float() @ weight_ED.t()

    monkeypatch.setattr(logits_module, "kernels_accept", lambda x_TD, weight_ED: True)
    monkeypatch.setattr(logits_module, "_kernel_router_logits", kernels)
    logits = router_logits(torch.randn(9, 6).bfloat16(), torch.randn(4, 6))
    assert calls == [((9, 6), (4, 6))] and logits.shape == (9, 4)


def test_bf16_parts_add_up_to_the_float32_values() -> None:
    # Magnitudes over many binades, and values whose significand fills all 24 bits.
    t = torch.randn(4096, dtype=torch.float64).mul(torch.logspace(-20, 20, 4096, dtype=torch.float64)).float()
    parts = logits_module.bf16_parts(t, 3)
    assert len(parts) == 3 and all(part.dtype == torch.bfloat16 for part in parts)
    total = sum(part.double() for part in parts)
    assert torch.equal(total, t.double())
    two = sum(part.double() for part in logits_module.bf16_parts(t, 2))
    assert not torch.equal(two, t.double())  # two parts hold 16 bits, not 24
    bf16 = t.bfloat16()
    assert logits_module.bf16_parts(bf16, 3) == [bf16]


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_split_weight_logits_match_float64(weight_dtype: torch.dtype) -> None:
    """The tensor-core path's maths (bf16 parts, float32 sums), run on the CPU, against float64."""
    from tests.ops.gpu_checks import assert_close_to_oracle

    generator = torch.Generator().manual_seed(3)
    x = torch.randn(300, 256, generator=generator).bfloat16().requires_grad_()
    weight = (torch.randn(40, 256, generator=generator) / 16).to(weight_dtype).requires_grad_()
    grad = torch.randn(300, 40, generator=generator)
    logits = logits_module._SplitRouterLogits.apply(x, weight)
    grad_x, grad_weight = torch.autograd.grad(logits, (x, weight), grad)
    assert logits.dtype == torch.float32 and grad_x.dtype == torch.bfloat16 and grad_weight.dtype == weight_dtype
    x32, w32 = x.detach().float(), weight.detach().float()
    x64, w64, grad64 = x32.double(), w32.double(), grad.double()
    assert_close_to_oracle(logits, x32 @ w32.t(), x64 @ w64.t())
    assert_close_to_oracle(grad_x, (grad @ w32).bfloat16(), grad64 @ w64)
    assert_close_to_oracle(grad_weight, (grad.t() @ x32).to(weight_dtype), grad64.t() @ x64)
    # float32 accuracy, not bf16's: the logits are within a few float32 ulps of the oracle.
    assert (logits.double() - x64 @ w64.t()).abs().max() < 1e-5 * (x64.abs() @ w64.abs().t()).max()


def test_split_weight_path_is_never_taken_on_the_cpu() -> None:
    x = torch.randn(1 << 16, 256).bfloat16()
    weight = torch.randn(64, 256)
    assert x.numel() * weight.shape[0] >= logits_module.SPLIT_MIN_WORK
    assert not logits_module.split_accepts(x, weight)
